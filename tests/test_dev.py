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
import trio

from rescue.client import DataReceived, open_peer

RESCUE = [sys.executable, "-m", "rescue.cli"]
STARTUP_TIMEOUT_S = 30


async def _start_dev() -> tuple[trio.Process, dict[str, str]]:
    proc = await trio.lowlevel.open_process(
        [*RESCUE, "dev", "--api-port", "0", "--relay-port", "0", "--admin-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "RESCUE_ENV": "development", "RESCUE_ADMIN_KEY": ""},
    )
    assert proc.stdout is not None
    text = ""
    with trio.fail_after(STARTUP_TIMEOUT_S):
        while "Stop with Ctrl-C." not in text:
            chunk = await proc.stdout.receive_some()
            assert chunk, f"rescue dev exited early: {text!r}"
            text += chunk.decode()
    found = {
        "api": re.search(r"token service\s+(http://\S+)", text),
        "relay": re.search(r"relay\s+(ws://\S+)", text),
        "admin": re.search(r"relay admin\s+(http://\S+)", text),
        "key_file": re.search(r"\$\(cat (\S+)\)", text),
    }
    missing = [name for name, m in found.items() if m is None]
    assert not missing, f"banner lacks {missing}: {text}"
    return proc, {name: m.group(1) for name, m in found.items() if m is not None}


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
