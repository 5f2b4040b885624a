"""The relay node as a whole: admin port, metrics, token-service link, keys, registry, TLS, leaks."""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import rescue
from rescue import _build as build
from rescue._codes import CloseCode
from rescue._http import Request, Response, Router, json_response, serve_http
from rescue._log import session_tag
from rescue.errors import ConfigError
from rescue.guardrails import MemoryStore
from rescue.protocol import Close, KeyRing, Kind, SigningKey, encode_frame
from rescue.relay import Relay, RelayAddresses
from rescue.testing import SelfSignedTLS, TestKeys, TestPeer, relay_test_config
from rescue.websocket import connect_websocket

TEST_TIMEOUT = 30


async def pair(url: str, keys: TestKeys, session: str) -> tuple[TestPeer, TestPeer]:
    host = await TestPeer.connect(url, keys, session=session, role="host")
    guest = await TestPeer.connect(url, keys, session=session, role="guest")
    assert (await host.receive_peer_event()).event == "joined"
    return host, guest


async def wait_for(predicate: Any, *, poll: float = 0.01) -> None:
    while not predicate():
        await trio.sleep(poll)


# ------------------------------------------------------------------------------------------------
# admin port


async def test_admin_endpoints(nursery: trio.Nursery) -> None:
    keys = TestKeys()
    relay = Relay(relay_test_config(admin_port=0), keys=keys.ring)
    with trio.fail_after(TEST_TIMEOUT):
        addresses: RelayAddresses = await nursery.start(relay.run)
        assert addresses.admin_port
        host, guest = await pair(addresses.url, keys, "secret-session-id")
        await host.send(encode_frame(Kind.DATA, b"x" * 1000, seq=1))
        await guest.receive()
        await guest.send(encode_frame(Kind.HEARTBEAT, seq=1))
        await guest.receive()
        base = f"http://127.0.0.1:{addresses.admin_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            alive = {"status": "ok", "node_id": relay.config.node_id}
            assert (await client.get("/healthz")).json() == alive
            assert (await client.get("/livez")).json() == alive  # the liveness path (decision 0021)
            ready = await client.get("/readyz")
            assert ready.status_code == 200
            assert ready.json()["ready"] is True
            metrics = (await client.get("/metrics")).text
            for name in (
                "beach_rescue_connections_active 2.0",
                "beach_rescue_sessions_active 1.0",
                "beach_rescue_messages_forwarded_total 1.0",
                "beach_rescue_bytes_forwarded_total 1012.0",
                'beach_rescue_message_size_bytes_bucket{le="1024.0"} 1.0',
                "beach_rescue_idle_pruned_total 0.0",
                "beach_rescue_sessions_emptied_total 0.0",
                'beach_rescue_handshakes_total{outcome="ok"} 2.0',
                "beach_rescue_handshake_duration_seconds_count 2.0",
                "beach_rescue_forward_latency_seconds_count",
                "beach_rescue_backpressure_stalls_total 0.0",
                "beach_rescue_heartbeats_echoed_total 1.0",
                "beach_rescue_rejoins_total",
                "beach_rescue_sessions_paired_total 1.0",
                "beach_rescue_draining 0.0",
                # which build runs (decision 0022), as /debug/stats says below
                f'beach_rescue_build_info{{hot_path="{build.kind()}",version="{rescue.__version__}"}} 1.0',
            ):
                assert name in metrics, name
            stats = (await client.get("/debug/stats")).json()
            assert stats["sessions"] == 1
            assert stats["connections"] == 2
            assert stats["tasks"] > 0  # the node's live trio tasks (the soak watches them)
            assert stats["hot_path"] == build.describe()  # compiled (mypyc) or pure Python (0022)
            assert stats["read_poller"]["registered"] == 2
            # the session's liveness deadlines, on the node's wheel (decision 0025)
            assert stats["liveness_wheel"] == {"filed": 1, "refiled": 0, "fired": 0, "tick_s": 1.0}
            [detail] = stats["session_detail"]
            assert detail["session"] == session_tag("secret-session-id")
            assert "secret-session-id" not in json.dumps(stats)
            assert detail["peers"]["host"]["queued_frames"] == 0
            await host.send(Close(CloseCode.NORMAL, "bye").to_message())
            await guest.wait_closed()
            await wait_for(lambda: len(relay.table) == 0)
            metrics = (await client.get("/metrics")).text
            assert 'beach_rescue_closes_total{code="1000",name="NORMAL"} 2.0' in metrics
            assert "beach_rescue_sessions_emptied_total 1.0" in metrics
            relay.shutdown()
            assert relay.readiness()["ready"] is False
            assert "draining" in relay.readiness()["reasons"]
        host.abort()
        guest.abort()


def test_one_registry_per_relay() -> None:
    a = Relay(relay_test_config(), keys=TestKeys().ring)
    b = Relay(relay_test_config(), keys=TestKeys().ring)
    a.stats.messages_forwarded = 5
    assert b"beach_rescue_messages_forwarded_total 5.0" in a.metrics.render()[0]
    assert b"beach_rescue_messages_forwarded_total 0.0" in b.metrics.render()[0]


# ------------------------------------------------------------------------------------------------
# the token-service link (SPEC §6) against a fake token service on a real HTTP port


@dataclass
class FakeTokenService:
    keys: TestKeys
    paused: bool = False
    drain: bool = False
    up: bool = True
    activations: list[str] = field(default_factory=list)
    extra_keys: list[SigningKey] = field(default_factory=list)

    def router(self) -> Router:
        router = Router()

        @router.get("/v1/fallback/status")
        async def status(request: Request) -> Response:
            if not self.up:
                return json_response({"error": "down", "detail": "simulated outage"}, 503)
            return json_response({"paused": self.paused, "drain": self.drain})

        @router.post("/v1/fallback/activations")
        async def activations(request: Request) -> Response:
            self.activations.append(request.json_object()["cohort"])
            return json_response({"ok": True}, 202)

        @router.get("/v1/fallback/keys")
        async def jwks(request: Request) -> Response:
            return json_response(KeyRing([self.keys.signing, *self.extra_keys]).to_jwks())

        return router


async def start_with_token_service(
    nursery: trio.Nursery, **overrides: Any
) -> tuple[Relay, RelayAddresses, FakeTokenService]:
    service = FakeTokenService(TestKeys())
    port = await nursery.start(serve_http, service.router(), "127.0.0.1", 0)
    config = relay_test_config(
        keys=None,
        token_service=f"http://127.0.0.1:{port}",
        status_poll_s=0.05,
        status_stale_s=0.5,
        **overrides,
    )
    relay = Relay(config)  # keys fetched from the token service's /v1/fallback/keys
    addresses = await nursery.start(relay.run)
    return relay, addresses, service


async def test_kill_switch_activations_and_fail_closed(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, addresses, service = await start_with_token_service(nursery, admin_port=0)
        keys = service.keys
        host, guest = await pair(addresses.url, keys, "k1")
        await wait_for(lambda: service.activations == ["test"])  # one report, cohort only
        # pause: new handshakes refused within a poll, the existing session goes on
        service.paused = True
        await wait_for(lambda: relay.control.refusal() is not None)
        refused = await TestPeer.connect(addresses.url, keys, session="k2", expect_welcome=False)
        closed = await refused.wait_closed()
        assert closed.wire_code == CloseCode.GUARDRAIL_TRIPPED
        await host.send(encode_frame(Kind.DATA, b"still here", seq=1))
        assert await guest.receive() == encode_frame(Kind.DATA, b"still here", seq=1)
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{addresses.admin_port}/readyz")
            assert ready.status_code == 503
            assert ready.json()["control"]["paused"] is True
        # drain: existing sessions are closed too
        service.drain = True
        assert (await host.wait_closed()).wire_code == CloseCode.GUARDRAIL_TRIPPED
        assert (await guest.wait_closed()).wire_code == CloseCode.GUARDRAIL_TRIPPED
        # resume, then lose the token service: after status_stale_s the node fails closed
        service.paused = service.drain = False
        await wait_for(lambda: relay.control.refusal() is None)
        ok = await TestPeer.connect(addresses.url, keys, session="k3")
        service.up = False
        await wait_for(lambda: relay.control.stale())
        refused = await TestPeer.connect(addresses.url, keys, session="k4", expect_welcome=False)
        # unknown is not paused: OVERLOADED tells the client to come back (fresh token, backoff),
        # where GUARDRAIL_TRIPPED would end its session for good during a control-plane outage
        assert (await refused.wait_closed()).wire_code == CloseCode.OVERLOADED
        async with httpx.AsyncClient() as client:
            ready = await client.get(f"http://127.0.0.1:{addresses.admin_port}/readyz")
            assert ready.status_code == 503
            assert ready.json()["control"]["stale"] is True
            assert ready.json()["control"]["last_error"]
            # not ready, still alive: a restart would not bring the token service back
            alive = await client.get(f"http://127.0.0.1:{addresses.admin_port}/livez")
            assert (alive.status_code, alive.json()["status"]) == (200, "ok")
            metrics = (await client.get(f"http://127.0.0.1:{addresses.admin_port}/metrics")).text
            assert 'beach_rescue_control_polls_total{outcome="error"}' in metrics
            assert "beach_rescue_fallback_paused 1.0" in metrics
        beat = encode_frame(Kind.HEARTBEAT, seq=2)
        await ok.send(beat)  # the connection made before the outage is unaffected
        assert await ok.receive() == beat
        service.up = True
        await wait_for(lambda: not relay.control.stale())
        ok.abort()


async def test_key_rotation_refetches_on_unknown_kid(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, addresses, service = await start_with_token_service(nursery)
        new = TestKeys(SigningKey.generate())
        service.extra_keys.append(new.signing)  # published after the relay loaded its keys
        peer = await TestPeer.connect(addresses.url, new, session="rot")
        assert peer.welcome is not None
        assert relay.keys.refreshes_ok >= 2
        # a kid nobody publishes is refused, and does not trigger another fetch within 10 s
        stranger = TestKeys(SigningKey.generate())
        before = relay.keys.refreshes_ok
        for _ in range(3):
            refused = await TestPeer.connect(addresses.url, stranger, session="x", expect_welcome=False)
            assert (await refused.wait_closed()).wire_code == CloseCode.AUTH_FAILED
        assert relay.keys.refreshes_ok <= before + 1
        peer.abort()


async def test_keys_from_file(nursery: trio.Nursery, tmp_path: Path) -> None:
    keys = TestKeys()
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(keys.jwks()))
    relay = Relay(relay_test_config(keys=str(path)))
    with trio.fail_after(TEST_TIMEOUT):
        addresses = await nursery.start(relay.run)
        peer = await TestPeer.connect(addresses.url, keys, session="file")
        assert peer.welcome is not None
        peer.abort()


async def test_bad_keys_fail_startup(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("{not json")
    relay = Relay(relay_test_config(keys=str(path)))
    with (
        trio.fail_after(TEST_TIMEOUT),
        pytest.raises(ConfigError, match="not valid JSON"),  # a plain error, not a group
    ):
        await relay.run()


async def test_node_registration(nursery: trio.Nursery) -> None:
    store = MemoryStore()
    relay = Relay(relay_test_config(node_id="node-7", drain_s=1), keys=TestKeys().ring, store=store)
    with trio.fail_after(TEST_TIMEOUT):
        addresses = await nursery.start(relay.run)
        [node] = await store.live_nodes()
        assert (node.node_id, node.public_url, node.draining) == ("node-7", addresses.url, False)
        await relay.drain()
        assert await store.live_nodes() == []


# ------------------------------------------------------------------------------------------------
# TLS


async def test_tls(nursery: trio.Nursery, tmp_path: Path) -> None:
    tls = SelfSignedTLS.create(tmp_path)
    cert, key = tls.cert_file, tls.key_file
    keys = TestKeys()
    relay = Relay(relay_test_config(tls_cert=str(cert), tls_key=str(key)), keys=keys.ring)
    with trio.fail_after(TEST_TIMEOUT):
        addresses = await nursery.start(relay.run)
        assert addresses.url.startswith("wss://")
        client_context = ssl.create_default_context(cafile=str(cert))
        ws = await connect_websocket(
            f"wss://localhost:{addresses.port}/v1/connect", ssl_context=client_context
        )
        peer = TestPeer(ws, os.urandom(16))
        await ws.send_message(encode_frame(Kind.DATA, b"x", seq=1))  # not HELLO: refused, over TLS
        assert (await peer.wait_closed()).wire_code == CloseCode.PROTOCOL_ERROR


# ------------------------------------------------------------------------------------------------
# leaks


def _task_count() -> int:
    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for nursery in task.child_nurseries for child in nursery.child_tasks)

    return walk(trio.lowlevel.current_root_task())


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_no_leaks_after_thousands_of_sessions(nursery: trio.Nursery) -> None:
    keys = TestKeys()
    relay = Relay(relay_test_config(handshakes_per_ip_per_min=100_000), keys=keys.ring)
    sessions = 1000
    with trio.fail_after(120):
        addresses = await nursery.start(relay.run)
        await trio.testing.wait_all_tasks_blocked()
        base_tasks, base_fds = _task_count(), _fd_count()
        url = addresses.url

        async def one(i: int) -> None:
            host, guest = await pair(url, keys, f"leak-{i}")
            message = encode_frame(Kind.DATA, b"payload", seq=1)
            await host.send(message)
            assert await guest.receive() == message
            match i % 4:
                case 0:  # a peer's CLOSE ends the session for both
                    await guest.send(Close(CloseCode.NORMAL, "done").to_message())
                    await host.wait_closed()
                    await guest.wait_closed()
                case 1:  # both vanish without a word
                    host.abort()
                    guest.abort()
                case 2:  # takeover, then everyone leaves politely
                    host2 = await TestPeer.connect(url, keys, session=f"leak-{i}", role="host")
                    await host.wait_closed()
                    await host2.aclose()
                    await guest.aclose()
                case _:  # one leaves, then the other
                    await guest.aclose()
                    assert (await host.receive_peer_event()).event == "left"
                    await host.aclose()

        for start in range(0, sessions, 50):
            async with trio.open_nursery() as batch:
                for i in range(start, min(start + 50, sessions)):
                    batch.start_soon(one, i)
        await wait_for(lambda: len(relay.table) == 0)
        await trio.testing.wait_all_tasks_blocked(cushion=0.05)
        assert relay.stats.pairings == sessions
        assert relay.stats.sessions_emptied == sessions
        assert relay.stats.internal_errors == 0
        assert _task_count() == base_tasks
        assert _fd_count() == base_fds
        assert relay.table.connections() == 0
