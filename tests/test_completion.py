"""``rescue completion bash|zsh``: the printed script loads in the real shell and completes.

Each case sources the script the real command prints and asks its completion function what it
offers for a partly typed command line, the way bash does on <Tab> (COMP_WORDS/COMP_CWORD).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

RESCUE = [sys.executable, "-P", "-m", "rescue.cli"]


def _script(shell: str) -> str:
    result = subprocess.run(
        [*RESCUE, "completion", shell], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stderr == ""
    return result.stdout


def _bash_offers(script: str, line: str) -> list[str]:
    """What bash's completion for `rescue` offers for ``line`` (a trailing space: a new word)."""
    program = (
        script
        + 'read -ra COMP_WORDS <<<"$LINE"\n'
        + '[[ "$LINE" == *" " ]] && COMP_WORDS+=("")\n'
        + "COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))\n"
        + "_rescue\n"
        + 'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", program],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"LINE": line, "PATH": "/usr/bin:/bin"},
    )
    return result.stdout.split()


@pytest.fixture(scope="module")
def bash_script() -> str:
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    return _script("bash")


def test_bash_registers_the_completion(bash_script: str) -> None:
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", bash_script + "complete -p rescue\n"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert result.stdout.strip() == "complete -o default -F _rescue rescue"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("rescue re", ["relay"]),
        ("rescue admin st", ["status"]),
        ("rescue mint --ro", ["--role"]),
        ("rescue mint --role ", ["host", "guest"]),
        ("rescue completion ", ["bash", "zsh"]),
        ("rescue admin cohort beta --", ["--help", "--enable", "--disable", "--api"]),
        ("rescue relay --keys keys.json --node", ["--node-id", "--nodes"]),
        ("rescue relay --keys ", []),  # a file: the shell's own completion (-o default)
    ],
)
def test_bash_completes(bash_script: str, line: str, expected: list[str]) -> None:
    assert _bash_offers(bash_script, line) == expected


def test_every_command_and_admin_action_completes(bash_script: str) -> None:
    from rescue.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert sorted(_bash_offers(bash_script, "rescue ")) == sorted(commands)
    actions = commands["admin"]._subparsers._group_actions[0].choices
    assert {"pause", "resume", "status", "cohort"} <= set(actions)
    assert sorted(_bash_offers(bash_script, "rescue admin ")) == sorted(actions)


def test_zsh_loads_the_script() -> None:
    if shutil.which("zsh") is None:
        pytest.skip("zsh is not installed (.ci/run installs it)")
    script = _script("zsh")
    result = subprocess.run(
        ["zsh", "-f", "-c", script + 'print -r -- "${_comps[rescue]}"\n'],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"},
    )
    assert "_rescue" in result.stdout, result.stdout + result.stderr
