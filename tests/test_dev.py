"""``rescue dev``: the zero-setup default works end to end, as the README promises.

The real command runs as a subprocess on ports 0; two SDK peers get tokens from its token service,
pair on its relay and exchange bytes; the admin key file it names is private; SIGTERM stops it with
exit status 0; and it refuses to start in production.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from rescue.client import DataReceived, open_peer
from rescue.testing import RESCUE_CLI, start_dev_process

RESCUE = list(RESCUE_CLI)


async def _start_dev(
    rescue: list[str] = RESCUE, env: dict[str, str] | None = None
) -> tuple[trio.Process, dict[str, str]]:
    dev = await start_dev_process(rescue, env)
    urls = {"banner": dev.banner, "api": dev.api, "relay": dev.relay, "admin": dev.admin}
    return dev.proc, urls | {"key_file": dev.key_file}


# A shell without the venv on PATH: what a fresh terminal has after `./run dev`.
FRESH_SHELL_PATH = "/usr/local/bin:/usr/bin:/bin"


def _banner_commands(banner: str) -> list[str]:
    """The indented lines of the banner that are commands to paste (not URLs or descriptions)."""
    joined = banner.replace("\\\n", " ")  # a command continued on the next line is one command
    return [
        line.strip()
        for line in joined.splitlines()
        if line.startswith("  ") and re.match(r"\s+(RESCUE_\w+=|export |/|curl )", line)
    ]


async def test_the_commands_dev_prints_work_when_pasted_into_a_fresh_shell() -> None:
    script = Path(sys.executable).with_name("rescue")
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (not an installed venv)")
    env = {**os.environ, "PATH": FRESH_SHELL_PATH}
    proc, urls = await _start_dev([str(script)], env)
    try:
        commands = _banner_commands(urls["banner"])
        assert not [c for c in commands if re.search(r"(^|[\s=])rescue ", c)], commands  # no bare `rescue`
        share = next(c for c in commands if " share " in c)
        join = next(c for c in commands if " join " in c)
        assert share.startswith(f"RESCUE_PASSPHRASE=correct-horse {script} share")
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                results: dict[str, subprocess.CompletedProcess[bytes]] = {}

                async def paste(name: str, line: str, stdin: bytes) -> None:
                    results[name] = await trio.run_process(
                        ["sh", "-c", line], stdin=stdin, capture_stdout=True, capture_stderr=True,
                        check=False, env=env,
                    )  # fmt: skip

                nursery.start_soon(paste, "share", share, b"")
                nursery.start_soon(paste, "join", join, b"echo pasted-ok; exit 3\n")
            assert results["join"].stdout == b"pasted-ok\n", results["join"].stderr
            assert (results["share"].returncode, results["join"].returncode) == (3, 3)
            (curl,) = [c for c in commands if c.startswith("curl ")]
            assert curl.startswith("curl -fsS ")  # fails loudly, unlike curl -s
            token = await trio.run_process(["sh", "-c", curl], capture_stdout=True, check=False, env=env)
            assert token.returncode == 0
            assert b'"token"' in token.stdout
            # the operator's lines: the key export, then status/pause/resume, pasted one after another
            operator = [c for c in commands if c.startswith("export ") or " admin " in c]
            assert len(operator) == 4, commands
            result = await trio.run_process(
                ["sh", "-ec", "\n".join(operator)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
        assert result.returncode == 0, result.stderr
        assert b'"paused": false' in result.stdout  # resume was the last one and answered
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()


async def test_dev_pairs_two_sdk_peers_and_stops_cleanly_on_sigterm() -> None:
    proc, urls = await _start_dev()
    try:
        key_file = Path(urls["key_file"])
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        payload = bytes(range(256)) * 64
        with trio.fail_after(30):
            async with (
                open_peer(urls["api"], "dev-test-1", "host", "pw") as host,
                open_peer(urls["api"], "dev-test-1", "guest", "pw") as guest,
            ):
                await host.send(0, payload)
                await guest.send(1, b"keys")
                got = b""
                while len(got) < len(payload):
                    msg = await guest.receive()
                    assert isinstance(msg, DataReceived)
                    got += msg.data
                assert got == payload
                assert await host.receive() == DataReceived(1, b"keys")
            async with httpx.AsyncClient() as http:
                admin = (await http.get(urls["admin"] + "/readyz")).status_code
                status = await http.get(
                    urls["api"] + "/v1/admin/nodes",
                    headers={"authorization": f"Bearer {key_file.read_text().strip()}"},
                )
        assert admin == 200
        assert status.status_code == 200
        assert [(n["id"], n["url"]) for n in status.json()["nodes"]] == [("dev", urls["relay"])]
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
    assert code == 0
    assert not key_file.parent.exists(), "the throwaway admin key's folder outlived rescue dev"


async def test_ctrl_c_removes_the_throwaway_admin_key_folder() -> None:
    proc, urls = await _start_dev()
    folder = Path(urls["key_file"]).parent
    assert folder.is_dir()
    proc.send_signal(signal.SIGINT)
    with trio.fail_after(20):
        code = await proc.wait()
    assert code in (0, 130)
    assert not folder.exists()


def _closed_pipe() -> int:
    """The write end of a pipe whose reader is already gone (``| head`` that has finished)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def _run_into_closed_pipe(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    stdout = _closed_pipe()
    try:
        return subprocess.run(
            [*RESCUE, *args],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
    finally:
        os.close(stdout)


async def test_admin_status_into_a_closed_pipe_exits_quietly() -> None:
    proc, urls = await _start_dev()
    try:
        env = {**os.environ, "RESCUE_ADMIN_KEY": Path(urls["key_file"]).read_text().strip()}
        result = await trio.to_thread.run_sync(
            _run_into_closed_pipe, ["admin", "status", "--api", urls["api"]], env
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            await proc.wait()
    assert result.stderr == ""  # no "error: [Errno 32] Broken pipe", no "Exception ignored"
    assert result.returncode == 128 + signal.SIGPIPE


def test_help_and_keygen_into_a_closed_pipe_exit_quietly(tmp_path: Path) -> None:
    result = _run_into_closed_pipe(["keygen", "--out", str(tmp_path / "k.jwk")], dict(os.environ))
    assert (result.returncode, result.stderr) == (128 + signal.SIGPIPE, "")
    for args in (["--help"], ["admin", "--help"]):  # argparse ignores write errors: 0 is quiet too
        result = _run_into_closed_pipe(args, dict(os.environ))
        assert result.returncode in (0, 128 + signal.SIGPIPE), args
        assert result.stderr == "", args


def test_dev_refuses_production() -> None:
    result = subprocess.run(
        [*RESCUE, "dev", "--api-port", "0", "--relay-port", "0", "--admin-port", "0"],
        env={**os.environ, "RESCUE_ENV": "production"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "production" in lines[0]
