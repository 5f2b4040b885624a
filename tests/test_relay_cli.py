"""``rescue relay`` as an operator runs it: a real process, SIGTERM drains and exits 0.

The node runs on ports 0 with a JWK set file; its bound addresses come from its own JSON log line
(``relay.listening``). Two peers pair through it, then SIGTERM must turn into CLOSE SERVER_SHUTDOWN
with a ``reconnect_in_ms`` inside the drain window, and exit status 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from rescue.protocol import CloseCode, Kind, encode_frame
from rescue.testing import TestKeys, TestPeer

from .conftest import start_relay_process

RESCUE = [sys.executable, "-P", "-m", "rescue.cli"]
DRAIN_S = 3.0


async def test_relay_process_pairs_then_drains_on_sigterm(tmp_path: Path) -> None:
    keys = TestKeys()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    proc, listening = await start_relay_process(
        jwks, tmp_path / "relay.log", "--drain-s", str(DRAIN_S), "--node-id", "cli-node"
    )
    peers: list[TestPeer] = []
    terminated = False
    try:
        url = str(listening["url"])
        with trio.fail_after(20):
            host = await TestPeer.connect(url, keys, session="cli-1", role="host", audience="cli-node")
            peers.append(host)
            guest = await TestPeer.connect(url, keys, session="cli-1", role="guest")
            peers.append(guest)
            assert (await host.receive_peer_event()).event == "joined"
            frame = encode_frame(Kind.DATA, b"through a real process", seq=1)
            await host.send(frame)
            assert await guest.receive() == frame
            async with httpx.AsyncClient() as http:
                ready = await http.get(f"http://127.0.0.1:{listening['admin_port']}/readyz")
            assert ready.status_code == 200
            proc.send_signal(signal.SIGTERM)
            terminated = True
            closed = await guest.wait_closed()
        assert closed.wire_code == CloseCode.SERVER_SHUTDOWN
        assert closed.close is not None
        assert closed.close.reconnect_in_ms is not None
        assert 0 <= closed.close.reconnect_in_ms <= DRAIN_S * 1000
    finally:
        for peer in peers:
            peer.abort()
        if not terminated:
            proc.send_signal(signal.SIGTERM)
        with trio.fail_after(DRAIN_S + 15):
            code = await proc.wait()
    assert code == 0


def test_relay_config_errors_are_one_line(tmp_path: Path) -> None:
    cases = [
        ["relay", "--port", "0", "--admin-port", "-1"],  # no key source at all
        ["relay", "--keys", str(tmp_path / "missing.json"), "--port", "0", "--admin-port", "-1"],
        ["relay", "--keys", "x.json", "--tls-cert", "c.pem", "--port", "0"],  # cert without key
    ]
    for argv in cases:
        result = subprocess.run(
            [*RESCUE, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={k: v for k, v in os.environ.items() if not k.startswith("RESCUE_")},
        )
        assert result.returncode == 1, (argv, result.stderr)
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert len(lines) == 1, (argv, result.stderr)
        assert lines[0].startswith("rescue relay: error:")


def test_read_poller_options_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rescue.cli import build_parser
    from rescue.commands.relay import build_config

    args = build_parser().parse_args(
        ["relay", "--keys", "k.json", "--quiet-tick-s", "0.2", "--read-coalesce-s", "0"]
    )
    config = build_config(args, {})
    assert config.read_poller is True
    assert config.quiet_tick_s == 0.2
    assert config.quiet_after_s == 5.0
    monkeypatch.setenv("RESCUE_NO_READ_POLLER", "1")
    monkeypatch.setenv("RESCUE_QUIET_AFTER_S", "0")
    config = build_config(build_parser().parse_args(["relay", "--keys", "k.json"]), {})
    assert config.read_poller is False
    assert config.quiet_after_s == 0.0
    assert config.session_limits().quiet_after_s == 0.0
