"""``rescue relay`` under a connection flood, in a real process with a real fd limit.

The node runs with ``RLIMIT_NOFILE`` lowered to 132 and ``--fd-reserve 100``: its WebSocket listener
takes at most 32 connections. More sockets than the whole fd limit (upgraded ones that never say
HELLO, then bare TCP ones) must not cost the node its admin port or its live session: the oldest
pending connections are shed for newcomers, ``/healthz`` answers, the paired session forwards
byte-exact. Once the flood is gone new sessions pair again; with every slot held by a session a
newcomer is answered 503 ``server_busy`` at once (not after the 60 s upgrade timeout).
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from rescue.errors import ConnectionClosedError, ProtocolError
from rescue.protocol import Kind, encode_frame
from rescue.testing import TestKeys, TestPeer
from rescue.websocket import WebSocketConnection, connect_websocket

from .conftest import clean_env, start_relay_process

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_NOFILE on Linux")

RESCUE = [sys.executable, "-P", "-m", "rescue.cli"]
NOFILE = 132
RESERVE = 100
CAP = NOFILE - RESERVE  # 32
UPGRADED_FLOOD = 20  # upgraded, never send HELLO (the oldest: shed first)
RAW_FLOOD = 150  # bare TCP, never send a byte: with the upgraded ones, more than the fd limit
HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
PROMPT_S = 5.0
# how the SDK's connect sees a refusal: HandshakeError (a ProtocolError) for the 503, or a reset
# when its request crossed the close
REFUSED = (
    ProtocolError,
    ConnectionClosedError,
    OSError,
)  # well inside the 60 s upgrade/HELLO timeouts the node runs with


def _lower_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


async def _start(jwks: Path, log: Path, *extra: str) -> tuple[trio.Process, dict[str, object]]:
    return await start_relay_process(
        jwks, log, "--fd-reserve", str(RESERVE), "--handshakes-per-ip-per-min", "0",
        "--upgrade-timeout-s", "60", "--hello-timeout-s", "60", "--drain-s", "1", *extra,
        preexec_fn=_lower_nofile,
    )  # fmt: skip


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def _wait_metrics(http: httpx.AsyncClient, admin: str, **want: float) -> str:
    """Poll /metrics until every ``name=value`` holds (the relay handles closes asynchronously)."""
    names = {
        "open": "beach_rescue_ws_open_connections",
        "shed": 'beach_rescue_ws_connections_turned_away_total{reason="shed_pending"}',
        "refused": 'beach_rescue_ws_connections_turned_away_total{reason="refused"}',
        "accept_error": 'beach_rescue_ws_connections_turned_away_total{reason="accept_error"}',
    }
    text = ""
    try:
        with trio.fail_after(PROMPT_S):
            while True:
                text = (await http.get(f"{admin}/metrics")).text
                if all(_metric(text, names[key]) == value for key, value in want.items()):
                    return text
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"/metrics never showed {want}:\n{text}") from None


async def _forwards(a: TestPeer, b: TestPeer, payload: bytes) -> None:
    frame = encode_frame(Kind.DATA, payload, seq=1)
    await a.send(frame)
    assert await b.receive() == frame
    back = encode_frame(Kind.DATA, payload[::-1], seq=1)
    await b.send(back)
    assert await a.receive() == back


async def _healthy(admin: str) -> None:
    """Three probes, each on a new connection (as a liveness probe does: it needs a new fd)."""
    for _ in range(3):
        async with httpx.AsyncClient(timeout=PROMPT_S) as probe:
            answer = await probe.get(f"{admin}/healthz")
        assert answer.status_code == 200, answer.text


async def _pair(url: str, keys: TestKeys, session: str) -> tuple[TestPeer, TestPeer]:
    host = await TestPeer.connect(url, keys, session=session, role="host")
    guest = await TestPeer.connect(url, keys, session=session, role="guest")
    assert (await host.receive_peer_event()).event == "joined"
    return host, guest


async def _shed(ws: WebSocketConnection) -> None:
    with pytest.raises(ConnectionClosedError):
        await ws.receive_messages()


async def test_relay_keeps_admin_port_and_sessions_through_a_connection_flood(tmp_path: Path) -> None:
    keys = TestKeys()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    log = tmp_path / "relay.log"
    proc, listening = await _start(jwks, log)
    url = str(listening["url"])
    port = int(str(url).rsplit(":", 1)[1].split("/")[0])
    admin = f"http://127.0.0.1:{listening['admin_port']}"
    peers: list[TestPeer] = []
    upgraded: list[WebSocketConnection] = []
    raw: list[trio.SocketStream] = []
    try:
        async with httpx.AsyncClient(timeout=PROMPT_S) as http:
            with trio.fail_after(60):  # the whole test; a few seconds when it passes
                await _wait_metrics(http, admin, open=0)
                assert "beach_rescue_ws_max_connections 32.0" in (await http.get(f"{admin}/metrics")).text
                host, guest = await _pair(url, keys, "live")
                peers += [host, guest]

                # the flood: more sockets than the process has fds
                for _ in range(UPGRADED_FLOOD):
                    upgraded.append(await connect_websocket(url))
                for _ in range(RAW_FLOOD):
                    raw.append(await trio.open_tcp_stream("127.0.0.1", port))
                await _healthy(admin)
                shed = UPGRADED_FLOOD + RAW_FLOOD - (CAP - 2)
                text = await _wait_metrics(http, admin, open=CAP, shed=shed, refused=0)
                assert (
                    _metric(text, 'beach_rescue_ws_connections_turned_away_total{reason="accept_error"}') == 0
                )
                assert _metric(text, "process_open_fds") < NOFILE - RESERVE // 2
                await _forwards(host, guest, os.urandom(4096))
                with trio.fail_after(PROMPT_S):  # the oldest pending ones went first
                    for ws in upgraded:
                        await _shed(ws)
                    for stream in raw[: shed - UPGRADED_FLOOD]:
                        assert await stream.receive_some() == b""

                # the flood goes away: new sessions pair again
                for ws in upgraded:
                    ws.abort()
                for stream in raw:
                    await trio.aclose_forcefully(stream)
                await _wait_metrics(http, admin, open=2)
                again = await _pair(url, keys, "after")
                peers += again
                await _forwards(*again, b"\x00\xffafter the flood")

                # every slot held by a session: a newcomer is refused at once, sessions stay
                for i in range(CAP - 4):
                    peers.append(await TestPeer.connect(url, keys, session=f"lone-{i}", role="host"))
                await _wait_metrics(http, admin, open=CAP)
                with trio.fail_after(PROMPT_S):
                    newcomer = await trio.open_tcp_stream("127.0.0.1", port)
                    answer = b""
                    while chunk := await newcomer.receive_some():
                        answer += chunk
                    await newcomer.aclose()
                assert answer.startswith(b"HTTP/1.1 503 "), answer
                assert b'"error":"server_busy"' in answer
                assert b"retry-after: 1" in answer.lower()
                with (
                    trio.fail_after(PROMPT_S),
                    pytest.raises((ProtocolError, ConnectionClosedError, OSError)),
                ):
                    await connect_websocket(url)  # the SDK's upgrade sees the refusal (or the reset)
                await _wait_metrics(http, admin, open=CAP, refused=2)
                await _healthy(admin)
                await _forwards(host, guest, b"still here")
                stats = (await http.get(f"{admin}/debug/stats")).json()["websocket_connections"]
                assert stats == {
                    "open": CAP,
                    "pending": 0,
                    "max": CAP,
                    "shed": shed,
                    "refused": 2,
                    "accept_errors": 0,
                }
                for peer in peers:  # the count follows sessions' sockets to the end, too
                    peer.abort()
                await _wait_metrics(http, admin, open=0)
    finally:
        for peer in peers:
            peer.abort()
        for ws in upgraded:
            ws.abort()
        for stream in raw:
            await trio.aclose_forcefully(stream)
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
    assert code == 0, log.read_text(errors="replace")
    lines = [json.loads(line) for line in log.read_bytes().splitlines() if line.startswith(b"{")]
    warnings = [line for line in lines if line.get("event") == "websocket.over_capacity"]
    assert 1 <= len(warnings) <= 3, warnings  # one per 10 s at most, with counts
    assert warnings[0]["max_connections"] == CAP
    assert not [line for line in lines if line.get("event") == "websocket.accept_failed"]


SMALL_CAP = 6  # --max-connections for the readiness test (inside the fd limit's 32)


async def _readyz(http: httpx.AsyncClient, admin: str, *, ready: bool) -> dict[str, object]:
    """Poll /readyz until it answers 200 (``ready``) or 503; its JSON (closes land asynchronously)."""
    answer: httpx.Response | None = None
    try:
        with trio.fail_after(PROMPT_S):
            while True:
                answer = await http.get(f"{admin}/readyz")
                if answer.status_code == (200 if ready else 503):
                    detail: dict[str, object] = answer.json()
                    assert detail["ready"] is ready
                    return detail
                await trio.sleep(0.05)
    except trio.TooSlowError:
        shown = f"{answer.status_code} {answer.text}" if answer is not None else "nothing"
        raise AssertionError(f"/readyz never answered {'200' if ready else '503'}: {shown}") from None


async def test_readyz_is_503_while_the_connection_cap_turns_newcomers_away(tmp_path: Path) -> None:
    """A load balancer's readiness check stops sending new connections to a full node: /readyz is
    503 ``at max_connections`` exactly while a newcomer would be refused (every slot a session or a
    handshake past HELLO), 200 again once one is free; a pending (HELLO-less) socket in the last slot
    does not count, since a newcomer displaces it."""
    keys = TestKeys()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    log = tmp_path / "relay.log"
    proc, listening = await _start(jwks, log, "--max-connections", str(SMALL_CAP))
    url = str(listening["url"])
    admin = f"http://127.0.0.1:{listening['admin_port']}"
    peers: list[TestPeer] = []
    silent: list[WebSocketConnection] = []
    try:
        async with httpx.AsyncClient(timeout=PROMPT_S) as http:
            with trio.fail_after(60):  # the whole test; a second or two when it passes
                ready = await _readyz(http, admin, ready=True)
                assert ready["reasons"] == []
                assert ready["websocket_connections"] == {"open": 0, "pending": 0, "max": SMALL_CAP}
                host, guest = await _pair(url, keys, "live")
                peers += [host, guest]
                for i in range(SMALL_CAP - 3):
                    peers.append(await TestPeer.connect(url, keys, session=f"lone-{i}", role="host"))
                await _wait_metrics(http, admin, open=SMALL_CAP - 1)
                await _readyz(http, admin, ready=True)  # one slot left

                last = await TestPeer.connect(url, keys, session="last", role="host")
                full = await _readyz(http, admin, ready=False)
                assert full["reasons"] == ["at max_connections"]
                assert full["websocket_connections"] == {"open": SMALL_CAP, "pending": 0, "max": SMALL_CAP}
                with trio.fail_after(PROMPT_S), pytest.raises(REFUSED):  # what /readyz warned of
                    await connect_websocket(url)
                await _forwards(host, guest, b"a full node still forwards")

                # a slot frees: ready again, and a real client gets in
                last.abort()
                await _wait_metrics(http, admin, open=SMALL_CAP - 1)
                assert (await _readyz(http, admin, ready=True))["reasons"] == []
                # the free slot held by a socket that never says HELLO: still ready (a newcomer
                # takes its place), then a real client does, and the node is full again
                silent.append(await connect_websocket(url))
                await _wait_metrics(http, admin, open=SMALL_CAP)
                still = await _readyz(http, admin, ready=True)
                assert still["websocket_connections"] == {"open": SMALL_CAP, "pending": 1, "max": SMALL_CAP}
                peers.append(await TestPeer.connect(url, keys, session="newcomer", role="host"))
                with trio.fail_after(PROMPT_S):
                    await _shed(silent[0])
                assert (await _readyz(http, admin, ready=False))["reasons"] == ["at max_connections"]

                for peer in peers[-2:]:
                    peer.abort()
                await _wait_metrics(http, admin, open=SMALL_CAP - 2)
                await _readyz(http, admin, ready=True)
    finally:
        for peer in peers:
            peer.abort()
        for ws in silent:
            ws.abort()
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
    assert code == 0, log.read_text(errors="replace")


def test_fd_reserve_and_max_connections_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rescue.cli import build_parser
    from rescue.commands.relay import build_config

    config = build_config(build_parser().parse_args(["relay", "--keys", "k.json"]), {})
    assert (config.max_connections, config.fd_reserve) == (0, 128)
    assert config.connection_cap(1024) == 896
    assert config.admin_connections() == 32
    monkeypatch.setenv("RESCUE_FD_RESERVE", "200")
    monkeypatch.setenv("RESCUE_MAX_CONNECTIONS", "500")
    config = build_config(build_parser().parse_args(["relay", "--keys", "k.json"]), {})
    assert config.connection_cap(1024) == 500
    with pytest.raises(ValueError, match="fd limit of at least 700"):
        config.connection_cap(600)
    config = config.replace(max_connections=0)
    with pytest.raises(ValueError, match="leaves 10 connections"):
        config.connection_cap(210)


def test_an_fd_limit_below_the_reserve_is_a_one_line_start_up_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [*RESCUE, "relay", "--keys", str(tmp_path / "k.json"), "--port", "0", "--admin-port", "-1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=clean_env(),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (100, HARD)),
    )
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        "rescue relay: error: the fd limit 100 leaves -28 connections past --fd-reserve 128: "
        "raise it (ulimit -n, LimitNOFILE=) or lower --fd-reserve"
    ]
