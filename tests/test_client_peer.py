"""The trio SDK through a REAL in-process relay (127.0.0.1, port 0): byte-exact transfer, lossless
resume while connections are killed and the relay restarts, close-code policy, liveness, backoff."""

from __future__ import annotations

import functools
import gc
import hashlib
import itertools
import logging
import random
import traceback
from collections import Counter

import pytest
import trio

from rescue._codes import Backoff, CloseCode
from rescue.client import (
    BackoffPolicy,
    Connected,
    ConnectionEvent,
    ControlReceived,
    DataReceived,
    Peer,
    Reconnecting,
    SessionClosed,
    TokenGrant,
    TokenServiceUnavailable,
    open_peer,
)
from rescue.errors import ConnectionClosedError, GuardrailError
from rescue.guardrails import FleetState
from rescue.protocol import SigningKey
from rescue.testing import TEST_PSK, LocalTokens, RelayRunner, abort_connection, run_relay
from rescue.websocket import WebSocketConnection

from .test_client_ladder import control_plane

MB = 1024 * 1024


def _stream(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


async def _pump(peer: Peer, data: bytes, chunk: int, channel: int = 0) -> None:
    rng = random.Random(len(data))
    pos = 0
    while pos < len(data):
        n = rng.randint(1, chunk)
        await peer.send(channel, data[pos : pos + n])
        pos += n
    await peer.send_control({"done": channel})


async def _collect(peer: Peer, expect_done: int = 1) -> dict[int, bytearray]:
    got: dict[int, bytearray] = {}
    done = 0
    while done < expect_done:
        message = await peer.receive()
        if isinstance(message, ControlReceived):
            assert "done" in message.data
            done += 1
        else:
            assert isinstance(message, DataReceived)
            got.setdefault(message.channel, bytearray()).extend(message.data)
    return got


def _tokens(keys: SigningKey, relay: RelayRunner, session: str, role: str) -> LocalTokens:
    return LocalTokens(keys, relay, session_id=session, role=role)


async def test_byte_exact_both_directions() -> None:
    keys = SigningKey.generate()
    down = _stream(1, 3 * MB)
    up = _stream(2, 1 * MB)
    with trio.fail_after(30):
        async with run_relay(keys) as relay:
            async with (
                open_peer(_tokens(keys, relay, "bulk", "host"), "bulk", "host", psk=TEST_PSK) as host,
                open_peer(_tokens(keys, relay, "bulk", "guest"), "bulk", "guest", psk=TEST_PSK) as guest,
            ):
                results: dict[str, dict[int, bytearray]] = {}

                async def collect(name: str, peer: Peer) -> None:
                    results[name] = await _collect(peer)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, host, down, 70000)
                    nursery.start_soon(_pump, guest, up, 5000, 1)
                    nursery.start_soon(collect, "guest", guest)
                    nursery.start_soon(collect, "host", host)
                await host.drain()
                await guest.drain()
            assert bytes(results["guest"][0]) == down
            assert bytes(results["host"][1]) == up
            assert host.closed is not None
            assert host.closed.code == CloseCode.NORMAL


async def test_lossless_while_connections_die_and_relay_restarts() -> None:
    keys = SigningKey.generate()
    data = _stream(3, 2 * MB)
    back = _stream(4, 256 * 1024)
    events: list[tuple[str, ConnectionEvent]] = []
    with trio.fail_after(45):
        async with run_relay(keys, drain_s=0.3) as relay:
            async with (
                open_peer(
                    _tokens(keys, relay, "chaos", "host"),
                    "chaos",
                    "host",
                    psk=TEST_PSK,
                    on_event=lambda e: events.append(("host", e)),
                    backoff=BackoffPolicy(base=0.02, cap=0.2),
                    max_buffer_bytes=512 * 1024,
                ) as host,
                open_peer(
                    _tokens(keys, relay, "chaos", "guest"),
                    "chaos",
                    "guest",
                    psk=TEST_PSK,
                    on_event=lambda e: events.append(("guest", e)),
                    backoff=BackoffPolicy(base=0.02, cap=0.2),
                    max_buffer_bytes=512 * 1024,
                ) as guest,
            ):
                results: dict[str, dict[int, bytearray]] = {}

                async def collect(name: str, peer: Peer) -> None:
                    results[name] = await _collect(peer)

                async def chaos() -> None:
                    rng = random.Random(5)
                    for i in range(12):
                        await trio.sleep(rng.uniform(0.05, 0.25))
                        if i % 4 == 3:
                            await relay.restart(drain=i % 8 == 3)
                        else:
                            abort_connection(rng.choice([host, guest]))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump, host, data, 20000)
                    nursery.start_soon(_pump, guest, back, 3000, 1)
                    nursery.start_soon(collect, "guest", guest)
                    nursery.start_soon(collect, "host", host)
                    await chaos()
                await host.drain()
                await guest.drain()
            assert hashlib.sha256(results["guest"][0]).digest() == hashlib.sha256(data).digest()
            assert bytes(results["guest"][0]) == data
            assert bytes(results["host"][1]) == back
            assert relay.restarts == 3
    reconnects = [e for _, e in events if isinstance(e, Reconnecting)]
    assert len(reconnects) >= 10
    assert any(e.code == CloseCode.SERVER_SHUTDOWN and e.fresh_token for e in reconnects)
    assert sum(isinstance(e, Connected) for _, e in events) >= 12
    assert host.statistics().integrity_failures == 0


class _CallerState:
    """Stands for what an application's ``on_event`` callback holds (the soak's session: buffers)."""

    def __init__(self) -> None:
        self.events: list[ConnectionEvent] = []

    def on_event(self, event: ConnectionEvent) -> None:
        self.events.append(event)


async def _session_with_a_dropped_connection(keys: SigningKey, relay: RelayRunner, session: str) -> None:
    state = _CallerState()
    host_tokens = _tokens(keys, relay, session, "host")
    guest_tokens = _tokens(keys, relay, session, "guest")
    async with (
        open_peer(host_tokens, session, "host", psk=TEST_PSK, on_event=state.on_event) as host,
        open_peer(guest_tokens, session, "guest", psk=TEST_PSK, on_event=state.on_event) as guest,
    ):
        await host.send(0, b"ping")
        assert await guest.receive() == DataReceived(0, b"ping")
        assert abort_connection(guest)  # the transport-error path; the guest reconnects and resumes
        await guest.send(1, b"pong")
        assert await host.receive() == DataReceived(1, b"pong")
        await host.drain()
        await guest.drain()


async def test_ended_sessions_are_freed_without_the_cycle_collector() -> None:
    """Once a session ends, its peers, their connections and what the caller's callbacks hold are
    freed by reference counting: nothing waits for a full pass of the cycle collector.

    A closed connection used to keep its error and raise that same instance to every later call;
    each raise gave it a traceback whose frames hold the connection and the peer's reader (whose
    ``self`` is the peer, whose ``on_event`` holds the caller's state). The cycle pinned every ended
    session until a full collection, which a busy process runs rarely: the soak's load generator
    carried tens of MB of ended sessions (docs/perf/soak.md, "The load generator's RSS").
    """
    keys = SigningKey.generate()
    with trio.fail_after(30):
        async with run_relay(keys) as relay:
            gc.collect()
            gc.disable()
            try:
                for i in range(4):
                    await _session_with_a_dropped_connection(keys, relay, f"refcount-{i}")
                left = Counter(
                    type(o).__name__
                    for o in gc.get_objects()
                    if isinstance(o, Peer | _CallerState) or (isinstance(o, WebSocketConnection) and o.client)
                )
            finally:
                gc.enable()
    assert not left, f"still alive (pinned by reference cycles): {dict(left)}"


def _depth(error: BaseException) -> int:
    return len(list(traceback.walk_tb(error.__traceback__)))


async def test_the_error_that_ended_a_peer_is_raised_as_a_fresh_copy_each_time() -> None:
    """A peer that ended with an error (here the token service's ``fallback_paused``) raises that
    error from every later call: each time a new copy, with the kept one's type and attributes.

    It used to raise the kept instance itself: every raise added the raising frames to its
    traceback (which grew with each call after the end), and those frames hold the peer, which
    holds the error -- a cycle that pinned the peer and the callers' frames until a full pass of
    the cycle collector. The kept error never gets a traceback now, and an ended peer, its error
    and what was raised from it are freed by reference counting alone.
    """
    calls = 5
    with trio.fail_after(30):
        async with control_plane() as (plane, _):
            await plane.store.set_fleet_state(FleetState(paused=True, reason="soak"))
            gc.collect()
            gc.disable()
            try:
                async with open_peer(plane.api_url, "copies", "host", psk=TEST_PSK, cohort="dev") as peer:
                    closed = await peer.wait_closed()
                    kept = closed.error
                    assert isinstance(kept, GuardrailError)
                    assert kept.error == "fallback_paused"
                    raised: dict[str, list[BaseException]] = {"receive": [], "send": [], "drain": []}
                    depths: dict[str, list[int]] = {name: [] for name in raised}  # as each was raised
                    for _ in range(calls):
                        for name, call in (
                            ("receive", peer.receive),
                            ("send", functools.partial(peer.send, 0, b"x")),
                            ("send", functools.partial(peer.send_control, {"k": 1})),
                        ):
                            with pytest.raises(GuardrailError) as info:
                                await call()
                            raised[name].append(info.value)
                            depths[name].append(_depth(info.value))
                        peer.core.send_data(0, b"unacked")  # so that drain() has to wait, and raises
                        with pytest.raises(GuardrailError) as info:
                            await peer.drain()
                        raised["drain"].append(info.value)
                        depths["drain"].append(_depth(info.value))
                    assert kept.__traceback__ is None  # never raised itself
                    every = [e for errors in raised.values() for e in errors]
                    assert len({id(e) for e in every}) == len(every)  # never one object twice
                    assert all(e is not kept for e in every)
                    for name, found in depths.items():  # the same frames each time: no growth
                        assert len(set(found)) == 1, (name, found)
                        assert found == [_depth(e) for e in raised[name]]  # nor later
                    for error in every:
                        assert type(error) is GuardrailError
                        assert (error.args, error.error, error.reason) == (kept.args, "fallback_paused", None)
                        assert str(error) == str(kept)
                    for error in raised["receive"]:  # `from None`, as before
                        assert error.__cause__ is None
                        assert error.__suppress_context__
                    del closed, kept, raised, every, error, info
                    del call
                del peer
                left = Counter(
                    type(o).__name__ for o in gc.get_objects() if isinstance(o, Peer | GuardrailError)
                )
            finally:
                gc.enable()
    assert not left, f"still alive (pinned by reference cycles): {dict(left)}"


async def test_graceful_close_reaches_partner_as_end_of_stream() -> None:
    keys = SigningKey.generate()
    with trio.fail_after(15):
        async with (
            run_relay(keys) as relay,
            open_peer(_tokens(keys, relay, "bye", "guest"), "bye", "guest", psk=TEST_PSK) as guest,
        ):
            async with open_peer(_tokens(keys, relay, "bye", "host"), "bye", "host", psk=TEST_PSK) as host:
                await host.send(0, b"last words")
                await host.send_control({"exit": 7})
                await host.drain()
            assert await guest.receive() == DataReceived(0, b"last words")
            assert await guest.receive() == ControlReceived({"exit": 7})
            with pytest.raises(trio.EndOfChannel):
                await guest.receive()
            closed = await guest.wait_closed()
            assert closed.code == CloseCode.NORMAL
            assert not closed.local
            with pytest.raises(ConnectionClosedError):
                await guest.send(0, b"too late")


async def test_cancelling_the_block_still_sends_close_to_the_partner() -> None:
    """open_peer's contract: cancelling the block closes the session politely (a shielded,
    bounded CLOSE). The outer cancel used to stop the peer's writer before it could send the
    CLOSE, so the partner never learnt the session ended and the block took its whole close
    bound (~4 s) to exit; a race also raised "Nursery is closed to new arrivals" from aclose()."""
    keys = SigningKey.generate()
    with trio.fail_after(15):
        async with (
            run_relay(keys) as relay,
            open_peer(_tokens(keys, relay, "cxl", "host"), "cxl", "host", psk=TEST_PSK) as host,
        ):
            with trio.CancelScope() as scope:
                async with open_peer(
                    _tokens(keys, relay, "cxl", "guest"), "cxl", "guest", psk=TEST_PSK
                ) as guest:
                    await guest.wait_partner()
                    await host.send(0, b"hello")
                    assert await guest.receive() == DataReceived(0, b"hello")
                    scope.cancel()
                    await guest.receive()  # nothing comes: the cancel ends the block here
            assert scope.cancelled_caught
            closed = await host.wait_closed()
            assert closed.code == CloseCode.NORMAL
            assert not closed.local
            guest_closed = await guest.wait_closed()
            assert guest_closed.local


async def test_a_connection_lost_while_the_application_is_not_reading_loses_no_message() -> None:
    """The reader waits for room in a full receive queue when the connection dies: the message it
    held was accepted (and resumed from) already, so it must reach the application afterwards."""
    keys = SigningKey.generate()
    messages = [bytes([n]) * 100 for n in range(1, 5)]
    with trio.fail_after(20):
        async with (
            run_relay(keys) as relay,
            open_peer(_tokens(keys, relay, "full", "host"), "full", "host", psk=TEST_PSK) as host,
            open_peer(
                _tokens(keys, relay, "full", "guest"), "full", "guest", psk=TEST_PSK, receive_queue=1
            ) as guest,
        ):
            await guest.wait_partner()
            for message in messages:
                await host.send(0, message)
            # the queue holds the first; the reader is parked handing over the second
            while not guest._deliver.statistics().tasks_waiting_send:
                await trio.sleep(0.01)
            old_link = guest._link
            assert abort_connection(guest)
            await guest.send(1, b"poke")  # the writer finds the socket gone and ends the connection
            while guest._link is old_link or guest._link is None:
                await trio.sleep(0.01)
            received = [(await guest.receive()).data for _ in messages]  # type: ignore[union-attr]
            assert received == messages


async def _drop_and_wait_welcomed(peer: Peer) -> None:
    """Drop the peer's socket and wait until a new connection of it is welcomed."""
    old = peer._link
    assert abort_connection(peer)
    while peer._link is old or peer._link is None or not peer._link.welcomed.is_set():
        await trio.sleep(0.01)


async def test_every_reconnect_takes_a_fresh_token_and_the_last_one_while_the_service_is_down() -> None:
    """Issue 11: a relay admits a used token only into an empty role slot, so the SDK asks for a
    fresh token per attempt; while the token service is down the last token stands in."""
    keys = SigningKey.generate()
    with trio.fail_after(30):
        async with run_relay(keys) as relay:
            minted = _tokens(keys, relay, "fresh", "host")
            service_up = True
            handed: list[bytes] = []

            async def tokens() -> TokenGrant:
                if not service_up:
                    await trio.lowlevel.checkpoint()
                    raise TokenServiceUnavailable("unreachable", "token service down (test)")
                grant = await minted()
                handed.append(grant.token)
                return grant

            async with (
                open_peer(
                    tokens, "fresh", "host", psk=TEST_PSK, backoff=BackoffPolicy(base=0.02, cap=0.1)
                ) as host,
                open_peer(_tokens(keys, relay, "fresh", "guest"), "fresh", "guest", psk=TEST_PSK) as guest,
            ):
                await host.wait_partner()
                for round_no in range(2):
                    await _drop_and_wait_welcomed(host)
                    await host.send(0, b"round %d" % round_no)
                    assert (await guest.receive()).data == b"round %d" % round_no  # type: ignore[union-attr]
                assert len(handed) == 3  # one fresh token per connection
                assert len(set(handed)) == 3
                service_up = False
                await _drop_and_wait_welcomed(host)
                await host.send(0, b"while the service is down")
                assert (await guest.receive()).data == b"while the service is down"  # type: ignore[union-attr]
            node = relay.relay
            assert node is not None
            assert node.replay.outcomes["reused"] == 1
            assert node.replay.outcomes["refused_live"] == 0


# A wrong passphrase ends the session on the third unreadable frame: the partner's resume and two
# resends of it, RESUME_RETRY_S (2 s) apart by default. The tests resend every 0.25 s: the same
# frames, failures and closes, ~4 s sooner each.
FAST_RESUME: dict[str, float] = {"resume_retry_s": 0.25}


async def test_wrong_passphrase_ends_with_integrity_error() -> None:
    keys = SigningKey.generate()
    with trio.fail_after(20):
        async with (
            run_relay(keys) as relay,
            open_peer(_tokens(keys, relay, "pw", "host"), "pw", "host", psk=TEST_PSK, **FAST_RESUME) as host,
            open_peer(
                _tokens(keys, relay, "pw", "guest"), "pw", "guest", psk=bytes(32), **FAST_RESUME
            ) as guest,
        ):
            await host.send(0, b"secret")
            with pytest.raises(ConnectionClosedError) as info:
                await guest.receive()
            assert info.value.code in (CloseCode.INTEGRITY_ERROR,)
            assert (await host.wait_closed()).code == CloseCode.INTEGRITY_ERROR
            node = relay.relay
            assert node is not None
            while len(node.table):  # both sides' closes have gone through the relay
                await trio.sleep(0.01)
            # one sender per socket: no BusyResourceError (or any other bug) while both close
            assert node.stats.internal_errors == 0


# Enough runs to meet both orders of the race cb7ad13 fixed (the guest's CLOSE and close frame
# arriving while the relay's writer sends), which the single run above meets only sometimes.
WRONG_PASSPHRASE_RUNS = 5


@pytest.mark.slow  # the guest gives up on its third bad frame (resends FAST_RESUME apart)
async def test_wrong_passphrase_sessions_log_no_internal_error(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 11: each wrong-passphrase session ends in INTEGRITY_ERROR with nothing logged as a bug."""
    keys = SigningKey.generate()
    caplog.set_level(logging.DEBUG, logger="rescue")
    with trio.fail_after(60):
        async with run_relay(keys) as relay:
            node = relay.relay
            assert node is not None
            for run in range(WRONG_PASSPHRASE_RUNS):
                session = f"pw{run}"
                async with (
                    open_peer(
                        _tokens(keys, relay, session, "host"),
                        session,
                        "host",
                        psk=TEST_PSK,
                        close_timeout_s=0.5,
                        **FAST_RESUME,
                    ) as host,
                    open_peer(
                        _tokens(keys, relay, session, "guest"),
                        session,
                        "guest",
                        psk=bytes(32),
                        close_timeout_s=0.5,
                        **FAST_RESUME,
                    ) as guest,
                ):
                    for n in range(3):  # the guest gives up after 3 frames in a row fail
                        await host.send(0, b"secret" * (run + n + 1))
                    with pytest.raises(ConnectionClosedError) as info:
                        await guest.receive()
                    assert info.value.code == CloseCode.INTEGRITY_ERROR
                while len(node.table):
                    await trio.sleep(0.01)
            assert node.stats.internal_errors == 0
            assert node.stats.closes.get(CloseCode.INTEGRITY_ERROR, 0) >= WRONG_PASSPHRASE_RUNS
    relay_records = [
        r for r in caplog.records if r.name.startswith("rescue.relay") or r.name == "rescue.sessions"
    ]
    assert relay_records, "the relay logged nothing at all: the capture is not working"
    events = [getattr(r, "event", r.getMessage()) for r in caplog.records]
    assert "relay.connection_error" not in events
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_auth_failure_stops_without_retry() -> None:
    keys = SigningKey.generate()
    other = SigningKey.generate()  # the relay does not trust it
    events: list[ConnectionEvent] = []
    with trio.fail_after(15):
        async with run_relay(keys) as relay:
            tokens = _tokens(other, relay, "auth", "host")
            async with open_peer(tokens, "auth", "host", psk=TEST_PSK, on_event=events.append) as host:
                closed = await host.wait_closed()
                assert closed.code == CloseCode.AUTH_FAILED
                with pytest.raises(ConnectionClosedError):
                    await host.receive()
            assert tokens.grants == 1
    assert not any(isinstance(e, Reconnecting) for e in events)
    assert isinstance(events[-1], SessionClosed)


async def test_liveness_timeout_reconnects(autojump_clock: trio.testing.MockClock) -> None:
    """A relay that accepts the WebSocket and WELCOMEs but then says nothing: reconnect after 3 x hb."""
    from rescue.protocol import HEADER_SIZE, Hello, Kind, Welcome, decode_header
    from rescue.websocket import serve_websocket

    hellos: list[float] = []

    async def silent_relay(ws: WebSocketConnection) -> None:
        (first,) = await ws.receive_messages()
        assert decode_header(first).kind is Kind.HELLO
        hello = Hello.decode(first[HEADER_SIZE:])
        hellos.append(trio.current_time())
        await ws.send_message(
            Welcome(ack_nonce=hello.nonce, server_nonce=bytes(16), heartbeat_s=5).to_message()
        )
        await trio.sleep_forever()

    events: list[ConnectionEvent] = []
    keys = SigningKey.generate()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, silent_relay, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{server.port}/v1/connect"
        with trio.fail_after(200):
            async with open_peer(
                LocalTokens(keys, url, session_id="live", role="host"),
                "live",
                "host",
                psk=TEST_PSK,
                on_event=events.append,
                backoff=BackoffPolicy(base=1.0, cap=1.0),
            ):
                while len(hellos) < 3:
                    await trio.sleep(1)
        nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(hellos)]
    assert all(15 <= gap <= 25 for gap in gaps), gaps  # 3 x 5 s of silence (+ heartbeat tick, backoff)
    reasons = [e.reason for e in events if isinstance(e, Reconnecting)]
    assert reasons
    assert all("no message from the relay" in r for r in reasons)


def test_backoff_policy_full_jitter_and_kinds() -> None:
    policy = BackoffPolicy(rng=random.Random(1))
    assert policy.window(0) == 0.25
    assert policy.window(3) == 2.0
    assert policy.window(20) == 30.0
    for attempt in range(12):
        delay = policy.delay(Backoff.NORMAL, attempt)
        assert 0 <= delay <= policy.window(attempt)
    samples = [policy.delay(Backoff.NORMAL, 10) for _ in range(200)]
    assert min(samples) < 5
    assert max(samples) > 25
    assert all(policy.delay(Backoff.LONG, 0) <= policy.window(4) for _ in range(50))
    assert max(policy.delay(Backoff.LONG, 0) for _ in range(200)) > policy.window(1)
    assert policy.delay(Backoff.SERVER, 5, reconnect_in_ms=1500) == 1.5
    assert policy.delay(Backoff.NONE, 0) == 0.0
    assert 0 <= policy.delay(Backoff.NONE, 3) <= policy.window(3)
