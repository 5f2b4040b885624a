"""The runbook's commands work as printed: each ```sh block of docs/operations/runbook.md is run.

The operator at 3 a.m. pastes what the runbook says; a command that fails (or, worse, fails
silently, like ``curl -s :9090/…`` with Debian's curl 7.88) is a bug in the runbook. So every
``sh`` block runs here, in document order, in one ``bash -euo pipefail`` per block, in a scratch
directory, against a real ``rescue dev`` (token service + relay) and a private Redis, with the
variables the runbook tells the operator to set:

- ``RESCUE_API`` — the token service, ``RESCUE_ADMIN_KEY`` — its admin key,
- ``RELAY_ADMIN`` — one relay's admin URL (``http://…:9090``),
- ``RESCUE_REDIS_URL`` — the guardrail Redis,
- ``rescue`` on ``PATH`` (as in the image).

A block that needs what this test cannot start (a Kubernetes cluster, AWS, a registry, a second
deployment) says so inside itself, with a reason::

    # runbook-test: skip (needs a Kubernetes cluster)

Anything else must run and exit 0: a new block that fails makes this test fail with the block's
section, line and output, so its author fixes the command or marks it. Only ``sh`` blocks are
commands; other fences must name their language (``json``, ``text``, …) so nothing is skipped by
accident.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from rescue.testing import start_dev_process

RUNBOOK = Path(__file__).resolve().parents[1] / "docs" / "operations" / "runbook.md"
SKIP_MARKER = re.compile(r"#\s*runbook-test:\s*skip\s*\((?P<reason>[^)]+)\)")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
# Fence languages that are not commands (output, configuration shown for reading).
NOT_COMMANDS = frozenset({"json", "text", "yaml", "promql", "console-output"})
# One block (a few commands against local processes) is quick; a stuck one must not hang CI.
BLOCK_TIMEOUT_S = 60


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    section: str
    lang: str
    text: str

    @property
    def skip_reason(self) -> str | None:
        found = SKIP_MARKER.search(self.text)
        return found.group("reason") if found else None

    def where(self) -> str:
        return f"runbook.md:{self.line} ({self.section})"


def parse_blocks(markdown: str) -> list[Block]:
    """Every fenced block, dedented (blocks inside list items are indented), with its section."""
    blocks: list[Block] = []
    section = "(top)"
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        opening = FENCE.match(line)
        if opening is None:
            i += 1
            continue
        indent = opening.group("indent")
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        if i >= len(lines):
            raise AssertionError(f"runbook.md:{len(blocks)}: a ``` block is never closed")
        blocks.append(Block(i - len(body), section, opening.group("lang"), "\n".join(body) + "\n"))
        i += 1
    return blocks


def test_parse_blocks_handles_indented_blocks_and_skip_markers() -> None:
    doc = (
        "# A\n```sh\necho one\n```\n## B\n1. step\n\n   ```sh\n   echo two \\\n     three\n   ```\n"
        "```json\n{}\n```\n```sh\nkubectl get pods  # runbook-test: skip (needs a cluster)\n```\n"
    )
    blocks = parse_blocks(doc)
    assert [(b.section, b.lang, b.text) for b in blocks] == [
        ("A", "sh", "echo one\n"),
        ("B", "sh", "echo two \\\n  three\n"),
        ("B", "json", "{}\n"),
        ("B", "sh", "kubectl get pods  # runbook-test: skip (needs a cluster)\n"),
    ]
    assert blocks[3].skip_reason == "needs a cluster"
    assert blocks[0].skip_reason is None


def test_every_block_says_what_it_is() -> None:
    for block in parse_blocks(RUNBOOK.read_text()):
        assert block.lang == "sh" or block.lang in NOT_COMMANDS, (
            f"{block.where()}: a ``` block without a known language ({block.lang!r}): commands are "
            f"```sh (run by this test), other text one of {sorted(NOT_COMMANDS)}"
        )


# a curl that exits non-zero on an HTTP error and says so
LOUD_CURL = re.compile(
    r"\s-[a-zA-Z]*f[a-zA-Z]*S|\s-[a-zA-Z]*S[a-zA-Z]*f"  # -fsS, -sSf, …
    r"|\s-[a-zA-Z]*S[a-zA-Z]*\s+--fail-with-body"
)


def test_no_curl_that_fails_silently() -> None:
    """``curl -s`` alone hides every error (and ``:9090/…`` is not a URL to curl 7.88): the runbook
    says ``curl -fsS`` with a full URL, in prose too (or ``curl -sS --fail-with-body`` where the
    error's body is the point, like a 503 ``/readyz`` and its reasons)."""
    text = RUNBOOK.read_text()
    for number, line in enumerate(text.splitlines(), 1):
        for call in re.findall(r"\bcurl\s+(?:-|[\"'$]|https?:|:\d)[^`\n|]*", line):
            assert LOUD_CURL.search(call), (
                f"runbook.md:{number}: {call.strip()!r} should be curl -fsS (fails loudly)"
            )
            assert not re.search(r"\s['\"]?:\d+/", call), (
                f"runbook.md:{number}: {call.strip()!r}: use a full URL"
            )


async def test_every_runbook_command_runs(redis_url: str, tmp_path: Path) -> None:
    blocks = [b for b in parse_blocks(RUNBOOK.read_text()) if b.lang == "sh"]
    assert blocks, "no ```sh blocks found: has the runbook moved?"
    dev = await start_dev_process()
    proc = dev.proc
    variables = {
        "RESCUE_API": dev.api,
        "RELAY_ADMIN": dev.admin,
        "RESCUE_ADMIN_KEY": dev.admin_key(),
    }
    # Only what a block needs, and a scratch HOME: a block that slipped through unmarked must not
    # reach a real cluster or cloud account through this machine's kubeconfig or credentials.
    env = {k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "TZ", "TMPDIR")}
    env.setdefault("LANG", "C.UTF-8")  # an operator's terminal
    env |= variables | {
        "RESCUE_REDIS_URL": redis_url,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(tmp_path),
        "KUBECONFIG": str(tmp_path / "no-kubeconfig"),
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    ran: list[str] = []
    failures: list[str] = []
    try:
        for block in blocks:
            if block.skip_reason is not None:
                continue
            with trio.move_on_after(BLOCK_TIMEOUT_S) as timer:
                result = await trio.run_process(
                    ["bash", "-euo", "pipefail", "-c", block.text],
                    cwd=tmp_path,
                    env=env,
                    stdin=b"",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
            if timer.cancelled_caught:
                failures.append(f"{block.where()}: still running after {BLOCK_TIMEOUT_S} s\n{block.text}")
            elif result.returncode != 0:
                output = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
                failures.append(f"{block.where()}: exit {result.returncode}\n{block.text}---\n{output}")
            else:
                ran.append(block.where())
    finally:
        proc.terminate()
        with trio.fail_after(20):
            await proc.wait()
    assert not failures, (
        "runbook commands that do not work as printed (fix them, or mark a block that needs a real "
        "fleet with '# runbook-test: skip (reason)'):\n\n" + "\n\n".join(failures)
    )
    assert ran


@pytest.mark.parametrize("needle", ["rescue admin status", "/debug/stats", "rescue admin pause"])
def test_the_runbook_still_runs_its_core_commands(needle: str) -> None:
    """The commands an operator needs most stay in blocks this test runs (not only in prose or in
    skipped blocks)."""
    runnable = [b.text for b in parse_blocks(RUNBOOK.read_text()) if b.lang == "sh" and b.skip_reason is None]
    assert any(needle in text for text in runnable), needle
