"""The relay's session shell over real WebSockets on 127.0.0.1: handshake refusals, and each mechanism once.

What a session *decides* (PEER events, holds, every close code and its cause, timers) is tested
without sockets in ``tests/test_session_core.py``; here a real relay shows that the trio shell carries
it out: bytes forwarded exactly, takeover and peer CLOSE reaching the sockets, framing errors,
the session timer, shutdown. Every test starts its own in-process :class:`~rescue.relay.Relay` on
port 0 and bounds itself with ``trio.fail_after``; time-based behaviour runs on the
``autojump_clock``.
"""

from __future__ import annotations

import collections
import gc
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue._codes import CloseCode
from rescue._tracing import RecordedSpan
from rescue.protocol import Close, Flags, Hello, Kind, Role, SigningKey, encode_frame, encode_header
from rescue.relay import Relay, RelayAddresses
from rescue.testing import TestKeys, TestPeer, peer_conn, relay_test_config
from rescue.websocket import (
    CloseFrameReceived,
    FrameParser,
    Opcode,
    WebSocketConnection,
    build_frame,
    build_request,
    connect_websocket,
    new_key,
)

# Generous wall-clock bound per test: they take milliseconds, but the CI box is shared.
TEST_TIMEOUT = 20
# Bound for autojump_clock tests, in virtual seconds: a deadlock jumps straight to it and fails.
VIRTUAL_TIMEOUT = 1000


@dataclass
class Env:
    relay: Relay
    addresses: RelayAddresses
    keys: TestKeys
    peers: list[TestPeer] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.addresses.url

    async def peer(self, session: str = "s1", role: str = "host", **kwargs: object) -> TestPeer:
        peer = await TestPeer.connect(self.url, self.keys, session=session, role=role, **kwargs)  # type: ignore[arg-type]
        self.peers.append(peer)
        return peer

    async def pair(self, session: str = "s1") -> tuple[TestPeer, TestPeer]:
        host = await self.peer(session, "host")
        guest = await self.peer(session, "guest")
        joined = await host.receive_peer_event()
        assert joined.event == "joined"
        return host, guest


StartRelay = Callable[..., Awaitable[Env]]


@pytest.fixture
async def start_relay(nursery: trio.Nursery) -> AsyncIterator[StartRelay]:
    envs: list[Env] = []

    async def start(**overrides: object) -> Env:
        keys = TestKeys()
        relay = Relay(relay_test_config(**overrides), keys=keys.ring)
        addresses = await nursery.start(relay.run)
        envs.append(Env(relay, addresses, keys))
        return envs[-1]

    yield start
    for env in envs:
        for peer in env.peers:
            peer.abort()
        assert env.relay.stats.internal_errors == 0  # no bad input ever reaches a bug


def data(seq: int, body: bytes = b"x", channel: int = 0) -> bytes:
    return encode_frame(Kind.DATA, body, seq=seq, channel=channel)


# ------------------------------------------------------------------------------------------------
# pairing and forwarding


async def test_pairing_welcome_and_peer_joined(start_relay: StartRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        env = await start_relay()
        host = await env.peer("s1", "host")
        assert host.welcome is not None
        assert host.welcome.peer is None
        assert host.welcome.ack_nonce == host.nonce
        assert (host.welcome.heartbeat_s, host.welcome.max_frame, host.welcome.resume_grace_s) == (
            15,
            65536,
            30,
        )
        guest = await env.peer("s1", "guest")
        assert guest.welcome is not None
        assert guest.welcome.peer is not None
        assert guest.welcome.peer.role is Role.HOST
        assert guest.welcome.peer.nonce == host.nonce
        assert guest.welcome.peer.caps.compression == ("zlib",)
        event = await host.receive_peer_event()
        assert (event.event, event.role, event.nonce) == ("joined", Role.GUEST, guest.nonce)
        assert env.relay.statistics()["sessions"] == 1
        assert env.relay.statistics()["connections"] == 2
        assert env.relay.stats.pairings == 1


async def test_sessions_are_isolated(start_relay: StartRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        env = await start_relay()
        a_host, a_guest = await env.pair("a")
        b_host, b_guest = await env.pair("b")
        await a_host.send(data(1, b"for a"))
        await b_host.send(data(1, b"for b"))
        assert await a_guest.receive() == data(1, b"for a")
        assert await b_guest.receive() == data(1, b"for b")


async def test_heartbeat_is_echoed_with_same_seq(start_relay: StartRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        env = await start_relay()
        host = await env.peer()
        beat = encode_frame(Kind.HEARTBEAT, seq=123456789)
        await host.send(beat)
        assert await host.receive() == beat
        assert env.relay.stats.heartbeats_echoed == 1


_frames = st.lists(
    st.tuples(
        st.booleans(),  # direction: host → guest?
        st.sampled_from([Kind.CONTROL, Kind.DATA]),
        st.booleans(),  # compressed / unsequenced flag
        st.integers(0, 255),  # channel (DATA only)
        st.integers(1, 2**64 - 1),
        st.binary(max_size=3000),
    ),
    max_size=40,
)


@settings(max_examples=25)
@given(frames=_frames, chunk=st.integers(1, 8))
async def test_forwarding_is_byte_exact_in_both_directions(
    frames: list[tuple[bool, Kind, bool, int, int, bytes]], chunk: int
) -> None:
    keys = TestKeys()
    relay = Relay(relay_test_config(), keys=keys.ring)
    with trio.fail_after(TEST_TIMEOUT):
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(relay.run)
            host = await TestPeer.connect(addresses.url, keys, session="p", role="host")
            guest = await TestPeer.connect(addresses.url, keys, session="p", role="guest")
            await host.receive_peer_event()
            to_guest: list[bytes] = []
            to_host: list[bytes] = []
            for forward, kind, flag, channel, seq, body in frames:
                if kind is Kind.DATA:
                    message = encode_frame(kind, body, flags=Flags.COMPRESSED if flag else Flags.NONE,
                                           channel=channel, seq=seq)  # fmt: skip
                else:
                    message = encode_frame(
                        kind, body, flags=Flags.UNSEQUENCED if flag else Flags.NONE, seq=seq
                    )
                (to_guest if forward else to_host).append(message)

            async def send_all(peer: TestPeer, messages: list[bytes]) -> None:
                for i in range(0, len(messages), chunk):
                    await peer.send(*messages[i : i + chunk])

            async def expect(peer: TestPeer, messages: list[bytes]) -> None:
                for message in messages:
                    assert await peer.receive() == message

            async with trio.open_nursery() as io:
                io.start_soon(send_all, host, to_guest)
                io.start_soon(send_all, guest, to_host)
                io.start_soon(expect, guest, to_guest)
                io.start_soon(expect, host, to_host)
            host.abort()
            guest.abort()
            assert relay.stats.messages_forwarded == len(frames)
            assert relay.stats.bytes_forwarded == sum(map(len, to_guest + to_host))
            nursery.cancel_scope.cancel()


async def test_takeover_replaces_old_connection(start_relay: StartRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        env = await start_relay()
        host, guest = await env.pair()
        host2 = await env.peer(role="host")  # the old socket is still open: no waiting for it to die
        closed = await host.wait_closed()
        assert closed.wire_code == CloseCode.REPLACED
        assert closed.close is not None
        assert closed.close.code == CloseCode.REPLACED
        event = await guest.receive_peer_event()
        assert (event.event, event.nonce) == ("rejoined", host2.nonce)
        await guest.send(data(5))
        assert await host2.receive() == data(5)
        await host2.send(data(6))
        assert await guest.receive() == data(6)
        assert env.relay.stats.rejoins["replaced"] == 1


async def test_peer_close_ends_the_session_for_both(start_relay: StartRelay) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        env = await start_relay()
        host, guest = await env.pair()
        bye = Close(CloseCode.NORMAL, "done").to_message()
        await host.send(data(1, b"last words"), bye)
        assert await guest.receive() == data(1, b"last words")  # data first, then the CLOSE
        closed = await guest.wait_closed()
        assert closed.close == Close(CloseCode.NORMAL, "done")
        assert closed.wire_code == 1000
        assert (await host.wait_closed()).wire_code == 1000
        with trio.fail_after(5):
            while len(env.relay.table):
                await trio.sleep(0.01)


# ------------------------------------------------------------------------------------------------
# what an idle connection keeps (docs/perf/memory.md): structure, not bytes


def session_tasks() -> collections.Counter[str]:
    """The relay's session and connection tasks running in this trio run, by function name."""
    names: collections.Counter[str] = collections.Counter()
    todo = [trio.lowlevel.current_root_task()]
    while todo:
        task = todo.pop()
        # (by the task's name, not its coroutine's: a compiled coroutine is named after its class,
        # and a compiled method's task name is its repr, "<bound method PeerLink.run of ...>")
        found = re.search(r"\b(?:Session|PeerLink)\.\w+", task.name)
        if found:
            names[found.group()] += 1
        todo.extend(child for nursery in task.child_nurseries for child in nursery.child_tasks)
    return names


async def test_an_idle_connection_is_one_task_and_a_writer_exists_only_while_output_waits(
    start_relay: StartRelay,
) -> None:
    env = await start_relay()
    with trio.fail_after(TEST_TIMEOUT):
        host, guest = await env.pair()
        beat = encode_frame(Kind.HEARTBEAT, seq=5)
        await guest.send(beat)
        assert await guest.receive() == beat  # echoed
        # a session: its own task (the timer) and one parked reader per connection; no writers
        assert session_tasks() == {"Session.run": 1, "PeerLink.run": 2}
        link = peer_conn(env.relay, "s1", Role.GUEST)
        assert not link.writing
        # the guest stops reading: once its socket is full, a writer task takes the rest
        body = bytes(60_000)
        sent = 0
        while not link.writing:  # (the host is held only after the guest's queue is full)
            sent += 1
            await host.send(data(sent, body))
        assert session_tasks()["PeerLink._writer_task"] == 1
        # the guest reads everything: the writer finishes and ends; back to one task per connection
        for seq in range(1, sent + 1):
            assert await guest.receive() == data(seq, body)
        while link.writing:
            await trio.sleep(0.005)
        assert session_tasks() == {"Session.run": 1, "PeerLink.run": 2}


async def test_a_connection_keeps_neither_its_handshake_span_nor_its_upgrade_headers(
    start_relay: StartRelay,
) -> None:
    env = await start_relay()
    with trio.fail_after(TEST_TIMEOUT):
        await env.pair()
        gc.collect()
        # a task started inside the handshake's record_span would keep that record in its context
        assert not [o for o in gc.get_objects() if isinstance(o, RecordedSpan)]
        for role in Role:
            transport = peer_conn(env.relay, "s1", role).transport
            assert isinstance(transport, WebSocketConnection)
            assert transport.request_headers == ()


# ------------------------------------------------------------------------------------------------
# handshake refusals: every close code's path


async def expect_refused(
    url: str, token: bytes, code: CloseCode, *, session: str = "s1", role: str = "host"
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        peer = await TestPeer.connect(url, token=token, session=session, role=role, expect_welcome=False)
        closed = await peer.wait_closed()
        assert closed.wire_code == code, closed
        assert closed.close is not None
        assert closed.close.code == code


async def test_auth_failed_for_foreign_key_and_garbage_token(start_relay: StartRelay) -> None:
    env = await start_relay()
    other = TestKeys(SigningKey.generate())
    await expect_refused(env.url, other.mint("s1", "host"), CloseCode.AUTH_FAILED)
    await expect_refused(env.url, b"\x00not a token", CloseCode.AUTH_FAILED)
    assert env.relay.stats.closes[CloseCode.AUTH_FAILED] == 2


async def test_token_expired(start_relay: StartRelay) -> None:
    env = await start_relay()
    old = env.keys.mint("s1", "host", ttl=60, now=time.time() - 600)
    await expect_refused(env.url, old, CloseCode.TOKEN_EXPIRED)


async def test_wrong_node(start_relay: StartRelay) -> None:
    env = await start_relay(node_id="node-a")
    await expect_refused(env.url, env.keys.mint("s1", "host", audience="node-b"), CloseCode.WRONG_NODE)
    # its own id is accepted as well as "*"
    with trio.fail_after(TEST_TIMEOUT):
        env.peers.append(
            await TestPeer.connect(env.url, token=env.keys.mint("s1", "host", audience="node-a"))
        )


async def test_session_mismatch(start_relay: StartRelay) -> None:
    env = await start_relay()
    await expect_refused(env.url, env.keys.mint("other", "host"), CloseCode.SESSION_MISMATCH)
    await expect_refused(env.url, env.keys.mint("s1", "guest"), CloseCode.SESSION_MISMATCH, role="host")


async def test_guardrail_tripped_when_paused(start_relay: StartRelay) -> None:
    env = await start_relay(paused=True)
    await expect_refused(env.url, env.keys.mint("s1", "host"), CloseCode.GUARDRAIL_TRIPPED)
    assert env.relay.readiness()["ready"] is False


async def test_rate_limited(start_relay: StartRelay) -> None:
    env = await start_relay(handshakes_per_ip_per_min=2)
    with trio.fail_after(TEST_TIMEOUT):
        await env.peer("r1", "host")
        await env.peer("r2", "host")
    await expect_refused(env.url, env.keys.mint("r3", "host"), CloseCode.RATE_LIMITED, session="r3")
    assert env.relay.metrics.handshakes.labels("rate_limited")._value.get() == 1


async def test_overloaded_past_max_sessions(start_relay: StartRelay) -> None:
    env = await start_relay(max_sessions=1)
    with trio.fail_after(TEST_TIMEOUT):
        await env.pair("only")  # the partner of an existing session is not a new session
    await expect_refused(env.url, env.keys.mint("second", "host"), CloseCode.OVERLOADED, session="second")


async def _raw_first_message(url: str, message: bytes) -> int | None:
    with trio.fail_after(TEST_TIMEOUT):
        ws = await connect_websocket(url, max_message=1 << 20)
        peer = TestPeer(ws, b"")
        await ws.send_message(message)
        closed = await peer.wait_closed()
        return closed.wire_code


async def test_protocol_error_for_bad_first_messages(start_relay: StartRelay) -> None:
    env = await start_relay()
    hello = Hello(token=env.keys.mint("s1", "host"), session="s1", role=Role.HOST, nonce=os.urandom(16))
    bad = [
        b"garbage",  # shorter than a header
        b"\x07" + bytes(11),  # unknown version
        encode_header(Kind.HELLO)[:1] + b"\x7f" + bytes(10),  # unknown kind
        data(1),  # not HELLO first
        encode_frame(Kind.HELLO, b"\xa0"),  # HELLO with an empty map
        encode_frame(Kind.HELLO, hello.encode()[:-3]),  # truncated CBOR
        bytes(70_000),  # oversize (over max_frame)
    ]
    for message in bad:
        assert await _raw_first_message(env.url, message) == CloseCode.PROTOCOL_ERROR, message[:16]
    assert env.relay.stats.closes[CloseCode.PROTOCOL_ERROR] == len(bad)


async def _raw_frames_then_close_code(env: Env, *frames: bytes) -> int | None:
    """Upgrade by hand, write raw WebSocket frames, and return the close code the relay answers."""
    with trio.fail_after(TEST_TIMEOUT):
        stream = await trio.open_tcp_stream("127.0.0.1", env.addresses.port)
        async with stream:
            await stream.send_all(build_request(f"127.0.0.1:{env.addresses.port}", "/v1/connect", new_key()))
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(4096)
            assert buf.startswith(b"HTTP/1.1 101")
            await stream.send_all(b"".join(frames))
            parser = FrameParser(client=True, max_message=1 << 20)
            parser.feed(buf.split(b"\r\n\r\n", 1)[1])
            while chunk := await stream.receive_some(65536):
                for event in parser.feed(chunk):
                    if isinstance(event, CloseFrameReceived):
                        return event.code
        return None


async def test_protocol_error_for_text_and_bad_websocket_frames(start_relay: StartRelay) -> None:
    env = await start_relay()
    text = build_frame(Opcode.TEXT, b"a text message", mask=True)
    assert await _raw_frames_then_close_code(env, text) == CloseCode.PROTOCOL_ERROR
    unmasked = build_frame(Opcode.BINARY, b"x" * 20, mask=False)
    assert await _raw_frames_then_close_code(env, unmasked) == CloseCode.PROTOCOL_ERROR
    compressed = build_frame(Opcode.BINARY, b"x" * 20, mask=True, rsv=4)
    assert await _raw_frames_then_close_code(env, compressed) == CloseCode.PROTOCOL_ERROR
    # after a valid HELLO, too
    hello = Hello(token=env.keys.mint("s1", "host"), session="s1", role=Role.HOST, nonce=os.urandom(16))
    code = await _raw_frames_then_close_code(
        env, build_frame(Opcode.BINARY, hello.to_message(), mask=True), text
    )
    assert code == CloseCode.PROTOCOL_ERROR


async def test_protocol_error_on_live_connection(start_relay: StartRelay) -> None:
    env = await start_relay()
    cases = [
        encode_frame(Kind.HELLO, b"\xa0"),  # a second HELLO
        encode_frame(Kind.WELCOME, b"\xa0"),  # relay-only kinds
        encode_frame(Kind.PEER, b"\xa0"),
        encode_header(Kind.HEARTBEAT) + b"body",  # HEARTBEAT with a body
        b"\x01\x7f" + bytes(10),  # unknown kind
        b"\x01\x01\x80" + bytes(9),  # reserved flag bit on DATA
        encode_frame(Kind.CLOSE, b"not cbor"),
        b"\x01",  # short
    ]
    with trio.fail_after(TEST_TIMEOUT):
        for i, message in enumerate(cases):
            host, guest = await env.pair(f"live{i}")
            await host.send(data(1, b"before"), message, data(2, b"after"))
            assert await guest.receive() == data(1, b"before")
            closed = await host.wait_closed()
            assert closed.wire_code == CloseCode.PROTOCOL_ERROR, message
            assert closed.close is not None
            assert closed.close.code == CloseCode.PROTOCOL_ERROR
            left = await guest.receive_peer_event()  # nothing after the bad message was forwarded
            assert left.event == "left"
            await guest.aclose()


async def test_hello_replay_is_refused(start_relay: StartRelay) -> None:
    env = await start_relay()
    with trio.fail_after(TEST_TIMEOUT):
        host = await env.peer()
        replay = await TestPeer.connect(env.url, env.keys, session="s1", role="host", nonce=host.nonce,
                                        expect_welcome=False)  # fmt: skip
        closed = await replay.wait_closed()
        assert closed.wire_code == CloseCode.PROTOCOL_ERROR
        beat = encode_frame(Kind.HEARTBEAT, seq=3)
        await host.send(beat)  # the original connection is unaffected
        assert await host.receive() == beat


async def test_oversize_message_on_live_connection(start_relay: StartRelay) -> None:
    env = await start_relay(max_frame=4096)
    with trio.fail_after(TEST_TIMEOUT):
        host, guest = await env.pair()
        await host.send(data(1, bytes(5000)))
        assert (await host.wait_closed()).wire_code == CloseCode.PROTOCOL_ERROR
        assert (await guest.receive_peer_event()).event == "left"


# ------------------------------------------------------------------------------------------------
# timers (autojump clock)


async def test_hello_timeout(start_relay: StartRelay, autojump_clock: trio.testing.MockClock) -> None:
    env = await start_relay()
    with trio.fail_after(VIRTUAL_TIMEOUT):
        ws = await connect_websocket(env.url)
        start = trio.current_time()
        closed = await TestPeer(ws, b"").wait_closed()
        assert closed.wire_code == CloseCode.HEARTBEAT_TIMEOUT
        assert 10 <= trio.current_time() - start < 11


async def test_heartbeat_timeout_and_peer_gone(
    start_relay: StartRelay, autojump_clock: trio.testing.MockClock
) -> None:
    env = await start_relay(heartbeat_s=15, resume_grace_s=30)
    with trio.fail_after(VIRTUAL_TIMEOUT):
        host, guest = await env.pair()
        start = trio.current_time()

        async def keep_guest_alive() -> None:
            beat = encode_frame(Kind.HEARTBEAT, seq=1)
            while True:
                await guest.send(beat)
                await trio.sleep(10)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(keep_guest_alive)
            closed = await host.wait_closed()  # the host never sends anything
            assert closed.wire_code == CloseCode.HEARTBEAT_TIMEOUT
            assert 45 <= trio.current_time() - start <= 47
            nursery.cancel_scope.cancel()
        while True:  # skip the heartbeat echoes up to PEER left
            message = await guest.receive()
            if message[1] == Kind.PEER:
                break
        left_at = trio.current_time()
        closed = await guest.wait_closed()  # the guest stops too, but PEER_GONE comes first at 30 s
        assert closed.wire_code == CloseCode.PEER_GONE
        assert 30 <= trio.current_time() - left_at <= 31
        assert env.relay.stats.idle_pruned == 1
        assert len(env.relay.table) == 0


async def test_shutdown_sends_server_shutdown_with_spread_reconnect(start_relay: StartRelay) -> None:
    env = await start_relay(drain_s=5)
    with trio.fail_after(TEST_TIMEOUT):
        peers = []
        for i in range(4):
            peers.extend(await env.pair(f"d{i}"))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(env.relay.drain)
            delays = []
            for peer in peers:
                closed = await peer.wait_closed()
                assert closed.wire_code == CloseCode.SERVER_SHUTDOWN
                assert closed.close is not None
                assert closed.close.code == CloseCode.SERVER_SHUTDOWN
                assert closed.close.reconnect_in_ms is not None
                delays.append(closed.close.reconnect_in_ms)
        assert all(0 <= d <= 5000 for d in delays)
        assert len(set(delays)) > 1  # spread, not one thundering moment
        assert env.relay.readiness()["ready"] is False
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", env.addresses.port)
