"""The shared read poller (decision 0007) and ``WebSocketConnection.use_poller`` on real sockets.

Raw poller tests use ``trio.socket.socketpair()`` (delivery is synchronous, so readiness is
deterministic); WebSocket tests use TCP connections on 127.0.0.1 (port 0). Every test is bounded by
``trio.fail_after`` and waits for conditions (events, counters), never for a fixed time.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import struct
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.websocket import (
    CLOSE_TIMEOUT,
    POLLER_AVAILABLE,
    QUIET_RCVLOWAT,
    READ_SIZE,
    CloseFrameReceived,
    Event,
    FrameParser,
    Opcode,
    Pong,
    ReadPoller,
    WebSocketClosedError,
    WebSocketConnection,
    build_frame,
    frame_binary,
    frame_close,
    frame_ping,
)

pytestmark = pytest.mark.skipif(not POLLER_AVAILABLE, reason="the read poller needs select.epoll (Linux)")

TIMEOUT = 10  # seconds for any one test on a loaded 2-core machine; they take milliseconds
MAX_MESSAGE = 1 << 20  # room for the > READ_SIZE messages of the property test

# ------------------------------------------------------------------------------------- helpers


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait for a condition the test cannot await directly (bounded by the caller's fail_after)."""
    while not predicate():
        await trio.sleep(0.001)


def waiting(poller: ReadPoller) -> int:
    return int(poller.statistics()["waiting"])


async def data_wakes_a_waiter(
    poller: ReadPoller, fd: int, sender: trio.socket.SocketType, data: bytes = b"x"
) -> None:
    """Park a task on ``fd``, send ``data`` from ``sender``, and wait until the task is woken."""
    woke = trio.Event()

    async def waiter() -> None:
        await poller.wait_readable(fd)
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await wait_until(lambda: waiting(poller) == 1)
        assert not woke.is_set()
        await sender.send(data)
        await woke.wait()


async def raised_while_parked(
    poller: ReadPoller,
    wait: Callable[[], Awaitable[object]],
    trigger: Callable[[], Awaitable[object] | None],
    error_type: type[BaseException],
) -> BaseException:
    """Park ``wait()`` in the poller, then run ``trigger()``; return the one ``error_type`` it raised."""
    raised: list[BaseException] = []

    async def waiter() -> None:
        try:
            await wait()
        except error_type as exc:
            raised.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await wait_until(lambda: waiting(poller) == 1)
        result = trigger()
        if result is not None:
            await result
    assert len(raised) == 1
    return raised[0]


def running(poller: ReadPoller) -> bool:
    return poller.running  # (a call, so a type checker does not pin the value between asserts)


@pytest.fixture
async def poller(nursery: trio.Nursery) -> ReadPoller:
    """A running poller that looks again at once after each batch (no coalescing)."""
    p = ReadPoller(coalesce_s=0)
    await nursery.start(p.run)
    return p


@contextmanager
def registered(
    poller: ReadPoller, sock: trio.socket.SocketType, callback: Callable[[], bool] | None = None
) -> Iterator[int]:
    fd = sock.fileno()
    assert poller.register(fd, callback)
    try:
        yield fd
    finally:
        poller.unregister(fd)  # while the socket is still open, as the poller asks


async def tcp_socket_pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    """A connected (server, client) TCP socket pair on 127.0.0.1."""
    with trio.socket.socket() as listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = trio.socket.socket()
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    return server, client


@asynccontextmanager
async def ws_pair() -> AsyncIterator[tuple[WebSocketConnection, WebSocketConnection]]:
    """(server side, client side) WebSockets over TCP on 127.0.0.1, the handshake taken as done."""
    server_sock, client_sock = await tcp_socket_pair()
    server = WebSocketConnection(trio.SocketStream(server_sock), client=False, max_message=MAX_MESSAGE)
    client = WebSocketConnection(trio.SocketStream(client_sock), client=True, max_message=MAX_MESSAGE)
    try:
        yield server, client
    finally:
        server.abort()
        client.abort()


@asynccontextmanager
async def ws_and_raw() -> AsyncIterator[tuple[WebSocketConnection, trio.SocketStream]]:
    """A server-side WebSocket and the raw TCP stream of its client (to send any bytes at all)."""
    server_sock, client_sock = await tcp_socket_pair()
    server = WebSocketConnection(trio.SocketStream(server_sock), client=False, max_message=MAX_MESSAGE)
    raw = trio.SocketStream(client_sock)
    try:
        yield server, raw
    finally:
        server.abort()
        await trio.aclose_forcefully(raw)


async def read_until(
    stream: trio.SocketStream, parser: FrameParser, stop: Callable[[Event], bool]
) -> list[Event]:
    """Parse what the server sends until an event matches ``stop`` (or EOF); return the events."""
    events: list[Event] = []
    while chunk := await stream.receive_some(65536):
        for event in parser.feed(chunk):
            events.append(event)
            if stop(event):
                return events
    return events


# --------------------------------------------------------------------------- readiness basics


async def test_a_waiter_is_woken_when_data_arrives(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        await data_wakes_a_waiter(poller, fd, b, b"x")
        stats = poller.statistics()
        assert stats["waiting"] == 0
        assert stats["registered"] == 1
        assert stats["wakeups"] >= 1
        assert stats["events"] >= 1


async def test_readiness_while_nobody_waits_is_remembered(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        await b.send(b"x")
        await wait_until(lambda: poller.events >= 1)  # dispatched while nobody waited
        assert waiting(poller) == 0
        await poller.wait_readable(fd)  # returns at once: the readiness was kept
        assert waiting(poller) == 0  # it never parked
        assert await a.recv(10) == b"x"
        # the remembered readiness is used up: the next wait parks until new data arrives
        await data_wakes_a_waiter(poller, fd, b, b"y")


async def test_pending_data_at_registration_counts_as_ready_and_quiet_sockets_stay_parked(
    poller: ReadPoller,
) -> None:
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, c, d:
        await b.send(b"early")  # before the socket is registered
        with registered(poller, a) as fd_a, registered(poller, c) as fd_c:
            await poller.wait_readable(fd_a)
            assert await a.recv(10) == b"early"
            # no spurious wake-ups: a waiter on the quiet socket stays parked while another
            # socket's readiness is dispatched
            quiet_woke = False

            async def quiet_waiter() -> None:
                nonlocal quiet_woke
                await poller.wait_readable(fd_c)
                quiet_woke = True

            async with trio.open_nursery() as nursery:
                nursery.start_soon(quiet_waiter)
                await wait_until(lambda: waiting(poller) == 1)
                events = poller.events
                await b.send(b"more")
                await wait_until(lambda: poller.events > events)
                await trio.testing.wait_all_tasks_blocked()
                assert not quiet_woke
                assert waiting(poller) == 1
                nursery.cancel_scope.cancel()
            assert not quiet_woke


async def test_readiness_after_a_short_read_that_left_eof_is_reported(poller: ReadPoller) -> None:
    """BUG (rescue/websocket/_poller.py, edge-triggered contract): data and EOF that arrive in one
    edge are reported once; a reader that reads the data (a short read, "drained" by the poller's
    contract) and waits again is never told about the EOF that is still pending, because no new
    edge comes. trio's own (level-triggered) wait reports it at once."""
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:

        async def waiter() -> None:
            await poller.wait_readable(fd)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await wait_until(lambda: waiting(poller) == 1)
            os.write(b.fileno(), b"last")  # no checkpoint between the data and the EOF:
            b.close()  # both arrive before the poller looks again
        assert os.read(fd, 100) == b"last"  # a short read: drained by the contract
        with trio.move_on_after(1) as timed:
            await poller.wait_readable(fd)
        assert not timed.cancelled_caught, "EOF pending after a short read was never reported"
        assert os.read(fd, 100) == b""


# ---------------------------------------------------------------------- unregister and closing


async def test_unregister_wakes_a_waiter_with_closed_resource_error(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b:
        fd = a.fileno()
        assert poller.register(fd)
        await raised_while_parked(
            poller, lambda: poller.wait_readable(fd), lambda: poller.unregister(fd), trio.ClosedResourceError
        )
        assert poller.statistics()["registered"] == 0
        assert poller.statistics()["waiting"] == 0
        poller.unregister(fd)  # idempotent
        with pytest.raises(RuntimeError):
            await poller.wait_readable(fd)


@pytest.mark.parametrize("how", ["abort", "close"])
@pytest.mark.parametrize("with_taker", [False, True])
async def test_closing_a_connection_whose_reader_is_parked_in_the_poller(
    poller: ReadPoller, how: str, with_taker: bool
) -> None:
    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, (lambda batch: False) if with_taker else None)
            assert poller.statistics()["registered"] == 1
            errors: list[WebSocketClosedError] = []

            async def server_reader() -> None:
                try:
                    await server.receive_messages()
                except WebSocketClosedError as exc:
                    errors.append(exc)

            async def client_reader() -> None:  # answers the server's close frame
                try:
                    await client.receive_messages()
                except WebSocketClosedError:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                nursery.start_soon(client_reader)
                await wait_until(lambda: waiting(poller) == 1)
                if how == "abort":
                    server.abort()
                else:
                    # the handshake ends it, not CLOSE_TIMEOUT
                    with trio.fail_after(CLOSE_TIMEOUT / 2):
                        await server.close(CloseCode.NORMAL, "bye")
            assert len(errors) == 1
            if how == "close":
                assert errors[0].wire_code == CloseCode.NORMAL
            assert server.closed
            assert poller.statistics()["registered"] == 0
            assert poller.statistics()["waiting"] == 0


@pytest.mark.parametrize("with_taker", [False, True])
async def test_eof_right_after_a_message_ends_receive_messages(poller: ReadPoller, with_taker: bool) -> None:
    """BUG (rescue/websocket/_poller.py + _connection.py ``read_ahead``/``_read_socket``): a peer that
    sends a message and then drops the connection (data and FIN in one epoll edge) is never seen
    to go: the message is read with a short read, the EOF stays unread, and the reader waits in
    the poller forever (the relay only notices at the liveness timeout). Without the poller the
    next receive_messages raises WebSocketClosedError at once."""
    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            got: list[bytes] = []

            def taker(batch: list[bytes]) -> bool:
                got.extend(batch)
                return True

            assert server.use_poller(poller, taker if with_taker else None)
            ended = trio.Event()
            errors: list[WebSocketClosedError] = []

            async def server_reader() -> None:
                try:
                    while True:
                        got.extend(await server.receive_messages())
                except WebSocketClosedError as exc:
                    errors.append(exc)
                ended.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                await wait_until(lambda: waiting(poller) == 1)
                await client.send_message(b"last words")
                client.abort()
                with trio.move_on_after(2):
                    await ended.wait()
                nursery.cancel_scope.cancel()
            assert got == [b"last words"]
            assert ended.is_set(), "the peer's EOF was never noticed"
            assert errors[0].wire_code is None


# ------------------------------------------------------------------------------- cancellation


async def test_a_cancelled_waiter_leaves_the_poller_consistent(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def cancelled_waiter() -> None:
                with scope:
                    await poller.wait_readable(fd)

            nursery.start_soon(cancelled_waiter)
            await wait_until(lambda: waiting(poller) == 1)
            scope.cancel()
        assert scope.cancelled_caught
        assert poller.statistics()["waiting"] == 0
        assert poller.statistics()["registered"] == 1
        await data_wakes_a_waiter(poller, fd, b, b"x")


async def test_a_cancelled_wait_keeps_remembered_readiness(poller: ReadPoller) -> None:
    """BUG (rescue/websocket/_poller.py, ReadPoller.wait_readable): on the remembered-readiness
    path it discards the fd from ``_ready`` *before* its checkpoint; if that checkpoint raises
    Cancelled the readiness is gone, and with edge-triggered epoll no new event comes for the data
    already queued, so the next wait hangs although the socket is readable. (A WebSocket
    receive_messages cancelled at that moment, e.g. under move_on_after, then never sees data that
    is already there.) The docstring promises "cancelling leaves the registration in place"."""
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        await b.send(b"x")
        await wait_until(lambda: poller.events >= 1)  # remembered: nobody waited
        with trio.CancelScope() as scope:
            scope.cancel()
            await poller.wait_readable(fd)
        assert scope.cancelled_caught
        with trio.move_on_after(1) as timed:
            await poller.wait_readable(fd)  # the data is still there: must return at once
        assert not timed.cancelled_caught, "readiness lost by a cancelled wait"


async def test_a_cancelled_receive_loses_no_data(poller: ReadPoller) -> None:
    """BUG (same cause as the test above, seen through WebSocketConnection): receive_messages
    promises "Cancellation: Safe: cancelling loses no data", but a receive cancelled while the
    poller remembers readiness for it (e.g. a ``move_on_after`` that expired) eats that
    readiness; the message stays in the socket and the next receive_messages waits forever."""
    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller)
            await client.send_message(b"already here")
            await wait_until(lambda: poller.events >= 1)  # dispatched while nobody waited
            with trio.CancelScope() as scope:
                scope.cancel()
                await server.receive_messages()
            assert scope.cancelled_caught
            with trio.move_on_after(1) as timed:
                assert await server.receive_messages() == [b"already here"]
            assert not timed.cancelled_caught, "a cancelled receive lost the socket's readiness"


async def test_two_waiters_on_one_socket_and_unregistered_sockets_are_refused(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, c, d, registered(poller, a) as fd:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.wait_readable, fd)
            await wait_until(lambda: waiting(poller) == 1)
            with pytest.raises(trio.BusyResourceError):
                await poller.wait_readable(fd)
            assert waiting(poller) == 1  # the first waiter is untouched
            with pytest.raises(RuntimeError, match="not registered"):
                await poller.wait_readable(c.fileno())
            await b.send(b"x")  # the first waiter ends normally
        assert waiting(poller) == 0


# ------------------------------------------------------------------------- the poller stopping


async def test_stopping_the_poller_wakes_waiters_and_connections_fall_back_to_trio(
    nursery: trio.Nursery,
) -> None:
    poller = ReadPoller(coalesce_s=0)
    poller_scope = trio.CancelScope()

    async def run_poller(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with poller_scope:
            await poller.run(task_status=task_status)

    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b:
        await nursery.start(run_poller)
        assert running(poller)
        with pytest.raises(RuntimeError, match="already running"):
            await poller.run()
        async with ws_pair() as (server, client):
            assert server.use_poller(poller, lambda batch: False)
            assert poller.register(a.fileno())
            send_batches, batches = trio.open_memory_channel[list[bytes]](0)
            raw_woke = trio.Event()

            async def raw_waiter() -> None:
                await poller.wait_readable(a.fileno())  # a spurious wake when the poller stops
                raw_woke.set()

            async def server_reader() -> None:
                while True:
                    await send_batches.send(await server.receive_messages())

            async with trio.open_nursery() as tasks:
                tasks.start_soon(raw_waiter)
                tasks.start_soon(server_reader)
                await wait_until(lambda: waiting(poller) == 2)
                await client.send_message(b"one")
                assert await batches.receive() == [b"one"]  # through the poller
                await wait_until(lambda: waiting(poller) == 2)  # the reader is parked there again
                poller_scope.cancel()
                await raw_woke.wait()
                assert not running(poller)
                assert poller.statistics()["registered"] == 0
                assert poller.statistics()["waiting"] == 0
                assert not poller.register(b.fileno())  # not running: callers keep using trio
                await client.send_message(b"two")
                assert await batches.receive() == [b"two"]  # through trio's own wait
                await client.send_messages([b"three", b"four"])
                assert await batches.receive() == [b"three", b"four"]
                tasks.cancel_scope.cancel()
        assert poller_scope.cancelled_caught


async def test_negative_coalesce_is_refused() -> None:
    with pytest.raises(ValueError, match="coalesce_s"):
        ReadPoller(coalesce_s=-0.001)
    assert ReadPoller(coalesce_s=0).statistics()["coalesce_s"] == 0


# ---------------------------------------------------------------------------------- callbacks


async def test_callback_runs_only_while_a_task_waits_and_true_keeps_it_parked(poller: ReadPoller) -> None:
    a, b = trio.socket.socketpair()
    calls = 0
    decision = True

    def callback() -> bool:
        nonlocal calls
        calls += 1
        try:
            while os.read(a.fileno(), 1024):  # drain: the edge-triggered contract
                pass
        except BlockingIOError:
            pass
        return decision

    with trio.fail_after(TIMEOUT), a, b, registered(poller, a, callback) as fd:
        # nobody waits: the callback is not called, the readiness is remembered
        await b.send(b"x")
        await wait_until(lambda: poller.events >= 1)
        assert calls == 0
        await poller.wait_readable(fd)
        assert os.read(fd, 10) == b"x"
        woke = trio.Event()

        async def waiter() -> None:
            await poller.wait_readable(fd)
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await wait_until(lambda: waiting(poller) == 1)
            # True: handled, the waiter stays parked
            await b.send(b"y")
            await wait_until(lambda: poller.handled == 1)
            assert calls == 1
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            assert waiting(poller) == 1
            # False: the waiter is woken
            decision = False
            await b.send(b"z")
            await woke.wait()
        assert calls == 2
        assert poller.handled == 1
        assert poller.statistics()["handled"] == 1


# ------------------------------------------------------------------- use_poller and read-ahead


async def test_taken_batches_skip_receive_and_rejected_ones_arrive_in_order(poller: ReadPoller) -> None:
    log: list[tuple[str, list[bytes]]] = []

    def taker(batch: list[bytes]) -> bool:
        if batch[0].startswith(b"take"):
            log.append(("taker", batch))
            return True
        log.append(("rejected", list(batch)))
        return False

    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)
            assert not server.use_poller(poller, taker)  # once only

            async def server_reader() -> None:
                while True:
                    log.append(("reader", await server.receive_messages()))

            def delivered_is(n: int) -> Callable[[], bool]:
                return lambda: sum(len(batch) for who, batch in log if who != "rejected") == n

            sequence = [b"take-1", b"keep-1", b"take-2", b"take-3", b"keep-2", b"keep-3", b"take-4"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                for i, message in enumerate(sequence):
                    # the reader waits in the poller: only then is read-ahead offered the batch
                    await wait_until(lambda: waiting(poller) == 1)
                    await client.send_message(message)
                    await wait_until(delivered_is(i + 1))
                # two messages in one write: one batch, rejected whole and delivered whole
                await wait_until(lambda: waiting(poller) == 1)
                await client.send_messages([b"keep-4", b"take-5"])
                await wait_until(delivered_is(9))
                nursery.cancel_scope.cancel()
    assert log == [
        ("taker", [b"take-1"]),
        ("rejected", [b"keep-1"]),
        ("reader", [b"keep-1"]),
        ("taker", [b"take-2"]),
        ("taker", [b"take-3"]),
        ("rejected", [b"keep-2"]),
        ("reader", [b"keep-2"]),
        ("rejected", [b"keep-3"]),
        ("reader", [b"keep-3"]),
        ("taker", [b"take-4"]),
        ("rejected", [b"keep-4", b"take-5"]),
        ("reader", [b"keep-4", b"take-5"]),
    ]
    assert server.statistics().messages_in == 9
    assert poller.handled == 4


def _payload(index: int, tag: int, size: int) -> bytes:
    """Message ``index``: a tag byte (the taker's decision) then the index, repeated to ``size``."""
    return bytes((tag,)) + (struct.pack(">I", index) * (size // 4 + 1))[: size - 1]


def _accept(batch: list[bytes]) -> bool:
    """The taker's deterministic predicate: every message's tag is even."""
    return all(message[0] % 2 == 0 for message in batch)


# Mostly small messages (batches, read-ahead), some larger than one read (READ_SIZE-full reads).
_sizes = st.one_of(st.integers(1, 300), st.integers(1, 3000), st.integers(READ_SIZE - 100, 3 * READ_SIZE))


@settings(max_examples=30, deadline=None)
@given(
    specs=st.lists(st.tuples(_sizes, st.integers(0, 255), st.booleans()), min_size=1, max_size=25),
    group=st.integers(1, 6),
)
async def test_every_message_is_seen_exactly_once_in_order_by_taker_or_reader(
    specs: list[tuple[int, int, bool]], group: int
) -> None:
    """Random sizes (some > READ_SIZE: full reads), random batching, and random pauses (the client
    waits until the reader is parked, so read-ahead is offered the next group) or none (the
    reader is busy and reads for itself)."""
    messages = [_payload(i, tag, size) for i, (size, tag, _) in enumerate(specs)]
    seen: list[tuple[str, list[bytes]]] = []
    count = 0
    all_seen = trio.Event()

    def note(who: str, batch: list[bytes]) -> None:
        nonlocal count
        seen.append((who, batch))
        if who != "rejected":
            count += len(batch)
            if count >= len(messages):
                all_seen.set()

    def taker(batch: list[bytes]) -> bool:
        if _accept(batch):
            note("taker", batch)
            return True
        note("rejected", list(batch))
        return False

    poller = ReadPoller(coalesce_s=0)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            async with ws_pair() as (server, client):
                assert server.use_poller(poller, taker)

                async def server_reader() -> None:
                    while True:
                        note("reader", await server.receive_messages())

                def caught_up(n: int) -> Callable[[], bool]:
                    return lambda: count >= n and waiting(poller) == 1

                async def client_sender() -> None:
                    for i in range(0, len(messages), group):
                        if specs[i][2]:  # pause: everything so far seen, the reader parked
                            await wait_until(caught_up(i))
                        await client.send_messages(messages[i : i + group])

                async with trio.open_nursery() as io:
                    io.start_soon(server_reader)
                    io.start_soon(client_sender)
                    await all_seen.wait()
                    io.cancel_scope.cancel()
                stats = server.statistics()
            nursery.cancel_scope.cancel()
    delivered = [m for who, batch in seen if who != "rejected" for m in batch]
    assert delivered == messages  # exactly once, in order
    assert stats.messages_in == len(messages)
    for i, (who, batch) in enumerate(seen):
        if who == "taker":
            assert _accept(batch)
        if who == "rejected":
            # a rejected batch goes to receive_messages intact, before anything else
            assert seen[i + 1] == ("reader", batch)


async def test_ping_during_read_ahead_is_answered_and_the_close_handshake_completes(
    poller: ReadPoller,
) -> None:
    taken: list[bytes] = []

    def taker(batch: list[bytes]) -> bool:
        taken.extend(batch)
        return True

    async with ws_and_raw() as (server, raw):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)
            received: list[bytes] = []
            errors: list[WebSocketClosedError] = []

            async def server_reader() -> None:
                try:
                    while True:
                        received.extend(await server.receive_messages())
                except WebSocketClosedError as exc:
                    errors.append(exc)

            parser = FrameParser(client=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                await wait_until(lambda: waiting(poller) == 1)
                await raw.send_all(frame_binary(b"a", True))
                await wait_until(lambda: taken == [b"a"])
                assert waiting(poller) == 1  # taken by read-ahead: the reader was never woken
                await raw.send_all(frame_ping(b"p1", mask=True))
                events = await read_until(raw, parser, lambda e: isinstance(e, Pong))
                assert events == [Pong(b"p1")]
                await wait_until(lambda: waiting(poller) == 1)
                await raw.send_all(frame_binary(b"b", True))
                await wait_until(lambda: taken == [b"a", b"b"])
                await raw.send_all(frame_close(CloseCode.NORMAL, "bye", mask=True))
                events = await read_until(raw, parser, lambda e: False)  # to EOF
                assert events == [CloseFrameReceived(CloseCode.NORMAL, "bye")]
            assert received == []
            assert len(errors) == 1
            assert (errors[0].wire_code, errors[0].reason) == (CloseCode.NORMAL, "bye")
            assert server.closed
            assert poller.statistics()["registered"] == 0


@pytest.mark.parametrize(
    "bad_frame",
    [
        pytest.param(build_frame(Opcode.TEXT, b"text!", mask=True), id="text"),
        pytest.param(build_frame(Opcode.BINARY, b"unmasked", mask=False), id="unmasked"),
    ],
)
async def test_protocol_error_seen_by_read_ahead_is_raised_by_receive_messages(
    poller: ReadPoller, bad_frame: bytes
) -> None:
    offered: list[list[bytes]] = []

    def taker(batch: list[bytes]) -> bool:
        offered.append(batch)
        return True

    async with ws_and_raw() as (server, raw):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)
            error = await raised_while_parked(
                poller, server.receive_messages, lambda: raw.send_all(bad_frame), ProtocolError
            )
            assert isinstance(error, ProtocolError)
            assert error.code == CloseCode.PROTOCOL_ERROR
            assert int(error.code) == 4010
            assert offered == []
            with pytest.raises(ProtocolError) as again:
                await server.receive_messages()
            # an equal error, not the same instance (a raised stored instance made a reference cycle)
            assert type(again.value) is type(error)
            same = (again.value.code, again.value.kind, str(again.value))
            assert same == (error.code, error.kind, str(error))
            # the connection still closes with the error's code

            async def answer_close() -> list[Event]:
                parser = FrameParser(client=True)
                events = await read_until(raw, parser, lambda e: isinstance(e, CloseFrameReceived))
                await raw.send_all(frame_close(CloseCode.PROTOCOL_ERROR, "", mask=True))
                return events

            events: list[Event] = []

            async def client_side() -> None:
                events.extend(await answer_close())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_side)
                with trio.fail_after(CLOSE_TIMEOUT / 2):
                    await server.close(error.code, "bad framing")
            assert events == [CloseFrameReceived(CloseCode.PROTOCOL_ERROR, "bad framing")]


async def test_an_exception_from_on_messages_is_raised_by_receive_messages(poller: ReadPoller) -> None:
    class TakerError(Exception):
        pass

    error = TakerError("taker failed")

    def taker(batch: list[bytes]) -> bool:
        raise error

    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)
            raised = await raised_while_parked(
                poller, server.receive_messages, lambda: client.send_message(b"x"), TakerError
            )
            assert raised is error
            assert poller.statistics()["registered"] == 1  # the poller itself carried on


async def test_an_exception_from_on_messages_is_freed_by_reference_counting(poller: ReadPoller) -> None:
    """The taker's error reaches ``receive_messages`` with its own traceback, and once the caller
    has handled it and the connection is dropped, nothing waits for the cycle collector.

    It was raised from a local of the connection's ``_take_read_ahead``: in the pure build (the
    editable install the tests run on) that frame, in the error's traceback, held the error -- a
    cycle that kept the connection (``self`` of the frames) until a full pass of the collector."""

    class TakerError(Exception):
        pass

    def taker(batch: list[bytes]) -> bool:
        raise TakerError("taker failed")

    seen: list[list[str]] = []  # only names: the error itself must not outlive its handler

    async def reader(server: WebSocketConnection) -> None:
        try:
            await server.receive_messages()
        except TakerError as exc:
            seen.append([frame.f_code.co_name for frame, _ in traceback.walk_tb(exc.__traceback__)])

    gc.collect()
    gc.disable()
    try:
        async with ws_pair() as (server, client):
            with trio.fail_after(TIMEOUT):
                assert server.use_poller(poller, taker)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(reader, server)
                    await wait_until(lambda: waiting(poller) == 1)
                    await client.send_message(b"x")
        del server, client
        # DEBUG_SAVEALL keeps what a collection finds unreachable: what only the collector frees
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = Counter(
            type(o).__name__ for o in gc.garbage if isinstance(o, WebSocketConnection | TakerError)
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert len(seen) == 1
    assert seen[0][-1] == "taker"  # the taker's own error, raised where it failed
    assert not left, f"pinned by reference cycles until a full collection: {dict(left)}"


# -------------------------------------------------------------------------------- coalescing


async def test_coalescing_dispatches_several_ready_sockets_in_one_wakeup(nursery: trio.Nursery) -> None:
    # Long enough that the sends below all land while the poller sleeps after its first batch.
    coalesce_s = 0.5
    poller = ReadPoller(coalesce_s=coalesce_s)
    await nursery.start(poller.run)
    n = 8
    pairs = [trio.socket.socketpair() for _ in range(n)]
    try:
        with trio.fail_after(TIMEOUT):
            woke = [trio.Event() for _ in range(n)]
            fds = [a.fileno() for a, _ in pairs]
            for fd in fds:
                assert poller.register(fd)

            async def waiter(i: int) -> None:
                await poller.wait_readable(fds[i])
                woke[i].set()

            async with trio.open_nursery() as tasks:
                for i in range(n):
                    tasks.start_soon(waiter, i)
                await wait_until(lambda: waiting(poller) == n)
                await pairs[0][1].send(b"x")
                await woke[0].wait()  # first batch handled: the poller now lets readiness collect
                for _, b in pairs[1:]:
                    await b.send(b"x")
                    await trio.sleep(0)  # a checkpoint between sends: no help from batching here
                for event in woke:
                    await event.wait()
            stats = poller.statistics()
            assert stats["events"] == n
            assert stats["wakeups"] < stats["events"]
            assert stats["coalesce_s"] == coalesce_s
            for fd in fds:
                poller.unregister(fd)
    finally:
        for a, b in pairs:
            a.close()
            b.close()


# --------------------------------------------------------------------------------- quiet set

QUIET_TICK = 0.05  # short: the grid quiet sockets' looks are batched on
# Short too: a message below SO_RCVLOWAT on a quiet TCP socket is read by the next look.
QUIET_HEARTBEAT = 0.2


@pytest.fixture
async def quiet_poller(nursery: trio.Nursery) -> ReadPoller:
    """A running poller that looks at quiet sockets every ``QUIET_HEARTBEAT`` (``QUIET_TICK`` grid)."""
    p = ReadPoller(coalesce_s=0, quiet_tick_s=QUIET_TICK, heartbeat_s=QUIET_HEARTBEAT)
    await nursery.start(p.run)
    return p


def quiet_state(poller: ReadPoller) -> tuple[int, int, int]:
    """(registered, quiet, moves) from the poller's statistics."""
    stats = poller.statistics()
    return int(stats["registered"]), int(stats["quiet"]), int(stats["moves"])


def drain(sock: trio.socket.SocketType) -> bytes:
    """Read everything a socket holds without blocking (the edge-triggered contract)."""
    data = b""
    try:
        while chunk := os.read(sock.fileno(), 1024):
            data += chunk
    except BlockingIOError:
        pass
    return data


async def test_set_quiet_moves_a_socket_into_the_quiet_set_and_back(quiet_poller: ReadPoller) -> None:
    poller = quiet_poller
    assert poller.statistics()["quiet_tick_s"] == QUIET_TICK
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, c, d:
        with registered(poller, a) as fd:
            assert quiet_state(poller) == (1, 0, 0)
            poller.set_quiet(fd, True)
            assert quiet_state(poller) == (1, 1, 1)
            poller.set_quiet(fd, True)  # already quiet: nothing to do
            assert quiet_state(poller) == (1, 1, 1)
            poller.set_quiet(c.fileno(), True)  # not registered: ignored
            poller.set_quiet(c.fileno(), False)
            assert quiet_state(poller) == (1, 1, 1)
            poller.set_quiet(fd, False)
            assert quiet_state(poller) == (1, 0, 2)
            poller.set_quiet(fd, False)  # already active: nothing to do
            assert quiet_state(poller) == (1, 0, 2)
            # back in the active set, data still wakes a waiter
            await data_wakes_a_waiter(poller, fd, b, b"x")
            assert drain(a) == b"x"
            poller.set_quiet(fd, True)
            assert quiet_state(poller) == (1, 1, 3)
        # unregistered (while quiet): gone from both counts, and moving it is a no-op
        assert quiet_state(poller) == (0, 0, 3)
        poller.set_quiet(a.fileno(), True)
        poller.set_quiet(a.fileno(), False)
        assert quiet_state(poller) == (0, 0, 3)


async def test_set_quiet_on_a_poller_that_is_not_running_is_a_noop() -> None:
    poller = ReadPoller(quiet_tick_s=QUIET_TICK)
    a, b = trio.socket.socketpair()
    with a, b:
        assert not poller.register(a.fileno())
        poller.set_quiet(a.fileno(), True)
        poller.set_quiet(a.fileno(), False)
        assert quiet_state(poller) == (0, 0, 0)


async def test_registering_a_quiet_socket_again_starts_it_over_in_the_active_set(
    quiet_poller: ReadPoller,
) -> None:
    poller = quiet_poller
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        poller.set_quiet(fd, True)
        assert quiet_state(poller) == (1, 1, 1)
        assert poller.register(fd)  # e.g. a reused number: taken over, active again
        assert quiet_state(poller) == (1, 0, 1)
        poller.set_quiet(fd, True)  # and it can be made quiet again (no stale entry in the way)
        assert quiet_state(poller) == (1, 1, 2)
        await data_wakes_a_waiter(poller, fd, b, b"x")
        assert drain(a) == b"x"


async def test_data_on_a_quiet_socket_wakes_its_waiter_and_runs_its_callback(
    quiet_poller: ReadPoller,
) -> None:
    poller = quiet_poller
    a, b = trio.socket.socketpair()  # with a callback
    c, d = trio.socket.socketpair()  # without
    calls = 0
    decision = True
    taken = b""

    def callback() -> bool:
        nonlocal calls, taken
        calls += 1
        taken += drain(a)
        return decision

    with (
        trio.fail_after(TIMEOUT),
        a,
        b,
        c,
        d,
        registered(poller, a, callback) as fd_a,
        registered(poller, c) as fd_c,
    ):
        poller.set_quiet(fd_a, True)
        poller.set_quiet(fd_c, True)
        assert quiet_state(poller) == (2, 2, 2)
        woke_a = trio.Event()
        woke_c = trio.Event()

        async def waiter(fd: int, woke: trio.Event) -> None:
            await poller.wait_readable(fd)
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter, fd_a, woke_a)
            nursery.start_soon(waiter, fd_c, woke_c)
            await wait_until(lambda: waiting(poller) == 2)
            # the callback handles it: its waiter stays parked
            await b.send(b"one")
            await wait_until(lambda: poller.handled == 1)
            assert (calls, taken) == (1, b"one")
            await trio.testing.wait_all_tasks_blocked()
            assert not woke_a.is_set()
            assert waiting(poller) == 2
            # no callback: the waiter is woken
            await d.send(b"two")
            await woke_c.wait()
            assert drain(c) == b"two"
            # the callback declines: the waiter is woken
            decision = False
            await b.send(b"three")
            await woke_a.wait()
        assert (calls, taken) == (2, b"onethree")
        assert poller.handled == 1
        assert quiet_state(poller) == (2, 2, 2)  # the poller never moves a socket by itself


@pytest.mark.parametrize("to_quiet", [True, False], ids=["to-quiet", "to-active"])
@pytest.mark.parametrize("when", ["unseen-parked", "unseen-unwatched", "remembered"])
async def test_data_pending_when_a_socket_moves_is_not_lost(
    quiet_poller: ReadPoller, to_quiet: bool, when: str
) -> None:
    """unseen: the data arrives and the socket moves with no checkpoint in between (the poller
    has not looked: the readiness is only in the old epoll set), with a waiter parked or nobody
    waiting; remembered: the poller saw it while nobody waited."""
    poller = quiet_poller
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, registered(poller, a) as fd:
        if not to_quiet:
            poller.set_quiet(fd, True)
        woke = trio.Event()

        async def waiter() -> None:
            await poller.wait_readable(fd)
            woke.set()

        async with trio.open_nursery() as nursery:
            if when == "unseen-parked":
                nursery.start_soon(waiter)
                await wait_until(lambda: waiting(poller) == 1)
            events = poller.events
            os.write(b.fileno(), b"pending")  # synchronous: no checkpoint
            if when == "remembered":
                await wait_until(lambda: poller.events > events)
                assert waiting(poller) == 0
            else:
                assert poller.events == events  # the poller cannot have looked yet
            poller.set_quiet(fd, to_quiet)
            assert quiet_state(poller) == (1, int(to_quiet), 1 if to_quiet else 2)
            if when != "unseen-parked":
                nursery.start_soon(waiter)
            await woke.wait()
        assert drain(a) == b"pending"
        assert waiting(poller) == 0


async def test_quiet_sockets_are_looked_at_once_per_heartbeat_period_in_one_batch(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """Decision 0015: a quiet socket is looked at (dispatched as if ready) one heartbeat period
    after its last heartbeat, phase-locked, on the ``quiet_tick_s`` grid, all due sockets in one
    pass; a real readiness event re-anchors its looks; an active socket is never looked at."""
    heartbeat, tick = 10.0, 0.5
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=tick, heartbeat_s=heartbeat)
    await nursery.start(poller.run)
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    looked: dict[str, list[float]] = {"a": [], "c": []}

    def note(name: str, sock: trio.socket.SocketType) -> Callable[[], bool]:
        def callback() -> bool:
            looked[name].append(trio.current_time())
            drain(sock)
            return True  # handled: the waiter stays parked

        return callback

    with a, b, c, d, registered(poller, a, note("a", a)) as fd_a, registered(poller, c, note("c", c)) as fd_c:

        async def waiter(fd: int) -> None:
            while True:
                await poller.wait_readable(fd)

        async with trio.open_nursery() as tasks:
            tasks.start_soon(waiter, fd_a)
            tasks.start_soon(waiter, fd_c)
            await wait_until(lambda: waiting(poller) == 2)
            t0 = trio.current_time()
            poller.set_quiet(fd_a, True)
            poller.set_quiet(fd_c, True)
            wakeups = poller.wakeups
            await trio.sleep(heartbeat - 0.1)
            assert looked == {"a": [], "c": []}  # nothing before the period is up
            await trio.sleep(1.0)
            first = looked["a"][0]
            assert looked == {"a": [first], "c": [first]}  # both, in one pass
            assert poller.wakeups == wakeups + 1
            assert poller.looks == 2
            assert first >= t0 + heartbeat
            assert first == math.ceil(first / tick) * tick  # on the grid
            # phase-locked: the next look one period after the first one's heartbeat, not later
            await trio.sleep(heartbeat)
            assert looked["a"] == looked["c"] == [first, first + heartbeat]
            # active again: no more looks for c
            poller.set_quiet(fd_c, False)
            await trio.sleep(heartbeat)
            assert looked["a"] == [first, first + heartbeat, first + 2 * heartbeat]
            assert looked["c"] == [first, first + heartbeat]
            # a readiness event of quiet a (data past its low-water mark) re-anchors its looks
            await trio.sleep(heartbeat / 2)
            t1 = trio.current_time()
            await b.send(b"data")
            await wait_until(lambda: len(looked["a"]) == 4)  # the event itself, at once
            assert looked["a"][3] == t1
            await trio.sleep(heartbeat / 2 + 1)  # the old phase's look is gone
            assert len(looked["a"]) == 4
            await trio.sleep(heartbeat / 2)
            assert len(looked["a"]) == 5
            assert looked["a"][4] >= t1 + heartbeat
            assert poller.looks == 2 + 2 + 1 + 1
            # looks are not readiness events: handled (<= events) counts only the one real event,
            # so the metrics' task wake-ups (events - handled) never go negative
            assert poller.events == poller.handled == 1
            tasks.cancel_scope.cancel()


# One step of the look schedule's property test: (what, which socket, a number).
_LookStep = tuple[str, int, float]
_look_steps = st.lists(
    st.one_of(
        st.tuples(st.just("quiet"), st.integers(0, 2), st.sampled_from([0.0, 0.3, 1.7, 40.0])),
        st.tuples(st.just("active"), st.integers(0, 2), st.just(0.0)),
        st.tuples(st.just("data"), st.integers(0, 2), st.just(0.0)),
        st.tuples(st.just("again"), st.integers(0, 2), st.just(0.0)),  # unregister + register
        st.tuples(st.just("sleep"), st.just(0), st.sampled_from([0.05, 0.25, 0.7, 1.0, 2.5, 9.0])),
    ),
    min_size=1,
    max_size=20,
)


@settings(max_examples=60, deadline=None)
@given(
    steps=_look_steps,
    tick=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
    heartbeat=st.sampled_from([1.0, 2.5, 6.0]),
)
def test_the_look_schedule_matches_its_model(steps: list[_LookStep], tick: float, heartbeat: float) -> None:
    """Decision 0015's looks as a state machine, against a model: a socket made quiet is looked at
    ``heartbeat_s`` after its heartbeat arrived (``heard_s_ago`` before the move, at most one
    period), plus half a tick, at the next grid point, then once per period, phase-locked; a real
    readiness event of a quiet socket is dispatched at once and re-anchors its looks; an active or
    re-registered socket is looked at never again. Every callback run, look or event, is compared
    by socket and (virtual) time."""

    async def scenario() -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
        poller = ReadPoller(coalesce_s=0, quiet_tick_s=tick, heartbeat_s=heartbeat)
        seen: list[tuple[int, float]] = []
        expected: list[tuple[int, float]] = []
        looks: dict[int, float] = {}  # the model: quiet socket -> its next look (exact time)

        def grid(at: float) -> float:
            return math.ceil(at / tick) * tick if tick else at

        def model_until(now: float) -> None:
            """Every look the model has due by ``now``, in time order (ties by socket)."""
            while looks:
                due = min(grid(at) for at in looks.values())
                if due > now:
                    return
                for j in sorted(k for k, t in looks.items() if grid(t) == due):
                    expected.append((j, due))
                    looks[j] += heartbeat

        pairs = [trio.socket.socketpair() for _ in range(3)]
        fds = [a.fileno() for a, _ in pairs]

        def callback(i: int) -> Callable[[], bool]:
            def run() -> bool:
                seen.append((i, trio.current_time()))
                drain(pairs[i][0])
                return True

            return run

        async def waiter(i: int) -> None:
            while True:
                try:
                    await poller.wait_readable(fds[i])
                except trio.ClosedResourceError:
                    await trio.sleep_forever()  # unregistered under it: a new waiter takes over

        async with trio.open_nursery() as nursery:
            await nursery.start(poller.run)
            waiters: list[trio.CancelScope] = []

            async def start_waiter(i: int) -> trio.CancelScope:
                scope = trio.CancelScope()

                async def run() -> None:
                    with scope:
                        await waiter(i)

                nursery.start_soon(run)
                await trio.testing.wait_all_tasks_blocked()
                return scope

            for i in range(3):
                assert poller.register(fds[i], callback(i))
                waiters.append(await start_waiter(i))
            for what, i, value in steps:
                now = trio.current_time()
                if what == "quiet":
                    if i not in looks:
                        looks[i] = now - min(value, heartbeat) + heartbeat + tick / 2
                    poller.set_quiet(fds[i], True, heard_s_ago=value)
                elif what == "active":
                    looks.pop(i, None)
                    poller.set_quiet(fds[i], False)
                elif what == "data":
                    expected.append((i, now))
                    if i in looks:
                        looks[i] = now + heartbeat + tick / 2
                    await pairs[i][1].send(b"x")
                    await trio.testing.wait_all_tasks_blocked()
                elif what == "again":
                    looks.pop(i, None)
                    waiters[i].cancel()
                    poller.unregister(fds[i])
                    assert poller.register(fds[i], callback(i))
                    waiters[i] = await start_waiter(i)
                else:
                    model_until(now + value)
                    await trio.sleep(value)
                    await trio.testing.wait_all_tasks_blocked()
                    continue
                # a look due at once (no grid, the heartbeat a whole period ago) is taken now
                model_until(now)
                await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        for a, b in pairs:
            a.close()
            b.close()
        return seen, expected

    seen, expected = trio.run(scenario, clock=trio.testing.MockClock(autojump_threshold=0))

    # (the order within one pass is not part of the contract)
    def in_time_order(runs: list[tuple[int, float]]) -> list[tuple[float, int]]:
        # (to the microsecond: MockClock's jumps add up to the deadline's time within rounding)
        return sorted((round(at, 6), i) for i, at in runs)

    assert in_time_order(seen) == in_time_order(expected)


async def test_looks_follow_when_the_heartbeat_arrived_not_when_it_was_handled(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    """A relay that handled the heartbeat late must not make every later look late (0015)."""
    heartbeat, tick = 10.0, 0.5
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=tick, heartbeat_s=heartbeat)
    await nursery.start(poller.run)
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    looked: dict[int, float] = {}

    def note(fd: int) -> Callable[[], bool]:
        def callback() -> bool:
            looked.setdefault(fd, trio.current_time())
            return True

        return callback

    with (
        a,
        b,
        c,
        d,
        registered(poller, a, note(a.fileno())) as fd_a,
        registered(poller, c, note(c.fileno())) as fd_c,
    ):

        async def waiter(fd: int) -> None:
            while True:
                await poller.wait_readable(fd)

        async with trio.open_nursery() as tasks:
            tasks.start_soon(waiter, fd_a)
            tasks.start_soon(waiter, fd_c)
            await wait_until(lambda: waiting(poller) == 2)
            t0 = trio.current_time()
            poller.set_quiet(fd_a, True, heard_s_ago=4.0)
            poller.set_quiet(fd_c, True, heard_s_ago=1e9)  # clamped to one period
            await trio.sleep(heartbeat + 1)
            assert t0 - 4.0 + heartbeat <= looked[fd_a] <= t0 - 4.0 + heartbeat + tick / 2 + tick
            assert t0 <= looked[fd_c] <= t0 + tick / 2 + tick
            tasks.cancel_scope.cancel()


async def test_a_tcp_connection_made_quiet_anchors_its_looks_at_the_heartbeats_arrival(
    nursery: trio.Nursery,
) -> None:
    """WebSocketConnection.set_quiet asks the kernel (TCP_INFO) how long ago the data arrived."""
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=0.05, heartbeat_s=60)
    await nursery.start(poller.run)
    async with ws_and_raw() as (server, raw):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller)
            await raw.send_all(heartbeat_frame())
            await trio.sleep(0.3)
            t = trio.current_time()
            server.set_quiet(True)
            sock = server._sock
            assert sock is not None
            look_at = poller._fds[sock.fileno()].look_at
            # at least ~0.3 s before now (4 ms jiffies), one period and half a tick later
            assert look_at <= t - 0.28 + 60 + 0.025


def heartbeat_frame() -> bytes:
    """A client HEARTBEAT as the SDK sends it: 12-byte header, empty body, masked (18 bytes)."""
    frame = frame_binary(bytes((1, 0x02, 0, 0)) + (7).to_bytes(8, "big"), mask=True)
    assert len(frame) == 18 < QUIET_RCVLOWAT
    return frame


def keystroke_frame() -> bytes:
    """The smallest DATA a client sends: header + 1 byte + 16-byte AEAD tag, masked (35 bytes)."""
    frame = frame_binary(bytes((1, 0x01, 0, 1)) + (8).to_bytes(8, "big") + b"k" + b"t" * 16, mask=True)
    assert len(frame) == 35 >= QUIET_RCVLOWAT
    return frame


def rcvlowat(server: WebSocketConnection) -> int:
    sock = server._sock
    assert sock is not None
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))


async def test_a_quiet_tcp_connection_wakes_for_data_at_once_but_not_for_a_lone_heartbeat(
    nursery: trio.Nursery,
) -> None:
    """The first message after a quiet spell pays no tick (issue 15): quiet raises SO_RCVLOWAT
    above a heartbeat frame, so a lone heartbeat stays in the kernel and the first keystroke
    wakes the poller at once, heartbeat and keystroke in one batch. (The heartbeat period is
    60 s here: no look can have delivered anything.)"""
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=0.05, heartbeat_s=60)
    await nursery.start(poller.run)
    taken: list[list[bytes]] = []

    def taker(batch: list[bytes]) -> bool:
        taken.append(list(batch))
        return True

    async with ws_and_raw() as (server, raw):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)
            assert rcvlowat(server) == 1

            async def server_reader() -> None:
                while True:
                    await server.receive_messages()

            async with trio.open_nursery() as tasks:
                tasks.start_soon(server_reader)
                await wait_until(lambda: waiting(poller) == 1)
                server.set_quiet(True)
                assert rcvlowat(server) == QUIET_RCVLOWAT
                events = poller.events
                await raw.send_all(heartbeat_frame())
                await trio.testing.wait_all_tasks_blocked()
                assert taken == []  # no wake-up for a lone heartbeat
                assert poller.events == events
                await raw.send_all(keystroke_frame())
                await wait_until(lambda: len(taken) == 1)
                assert [len(m) for m in taken[0]] == [12, 29]  # both, in one batch
                assert poller.looks == 0  # the data woke it, not a look
                # made active again, a lone heartbeat left pending is reported by the kernel
                await raw.send_all(heartbeat_frame())
                await trio.testing.wait_all_tasks_blocked()
                assert len(taken) == 1
                server.set_quiet(False)
                assert rcvlowat(server) == 1
                await wait_until(lambda: len(taken) == 2)
                assert [len(m) for m in taken[1]] == [12]
                # and active, every heartbeat wakes it at once
                await raw.send_all(heartbeat_frame())
                await wait_until(lambda: len(taken) == 3)
                assert poller.looks == 0
                tasks.cancel_scope.cancel()


async def test_a_lone_heartbeat_on_a_quiet_tcp_connection_is_collected_by_a_look(
    nursery: trio.Nursery,
) -> None:
    heartbeat = 0.3
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=0.05, heartbeat_s=heartbeat)
    await nursery.start(poller.run)
    taken: list[bytes] = []

    def taker(batch: list[bytes]) -> bool:
        taken.extend(batch)
        return True

    async with ws_and_raw() as (server, raw):
        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)

            async def server_reader() -> None:
                while True:
                    await server.receive_messages()

            async with trio.open_nursery() as tasks:
                tasks.start_soon(server_reader)
                await wait_until(lambda: waiting(poller) == 1)
                t0 = trio.current_time()
                server.set_quiet(True)
                events = poller.events
                for n in (1, 2, 3):  # one heartbeat per look, each read by its look
                    await raw.send_all(heartbeat_frame())
                    await wait_until(lambda n=n: len(taken) == n)
                    assert poller.looks >= n
                    assert trio.current_time() - t0 >= n * heartbeat
                assert poller.events == events  # never made ready by a lone heartbeat
                tasks.cancel_scope.cancel()


async def test_unregistering_a_quiet_socket_wakes_its_waiter_with_closed_resource_error(
    quiet_poller: ReadPoller,
) -> None:
    poller = quiet_poller
    a, b = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b:
        fd = a.fileno()
        assert poller.register(fd, lambda: True)
        poller.set_quiet(fd, True)
        await raised_while_parked(
            poller, lambda: poller.wait_readable(fd), lambda: poller.unregister(fd), trio.ClosedResourceError
        )
        assert quiet_state(poller) == (0, 0, 1)
        assert waiting(poller) == 0
        poller.unregister(fd)  # idempotent
        with pytest.raises(RuntimeError, match="not registered"):
            await poller.wait_readable(fd)
        # really gone from the quiet epoll set: registered afresh it is active, and its data
        # wakes a waiter (no callback now)
        events = poller.events
        await b.send(b"ignored")  # nobody registered: not remembered anywhere
        await trio.testing.wait_all_tasks_blocked()
        assert poller.events == events
        assert drain(a) == b"ignored"
        with registered(poller, a):
            assert quiet_state(poller) == (1, 0, 1)
            await data_wakes_a_waiter(poller, fd, b, b"x")
            assert drain(a) == b"x"


async def test_a_hang_up_on_a_quiet_socket_wakes_its_waiter_without_the_callback(
    quiet_poller: ReadPoller,
) -> None:
    poller = quiet_poller
    a, b = trio.socket.socketpair()
    calls = 0

    def callback() -> bool:
        nonlocal calls
        calls += 1
        return True

    with trio.fail_after(TIMEOUT), a, b, registered(poller, a, callback) as fd:
        poller.set_quiet(fd, True)
        woke = trio.Event()

        async def waiter() -> None:
            await poller.wait_readable(fd)
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await wait_until(lambda: waiting(poller) == 1)
            b.close()  # the peer goes (closing it again on the way out is harmless)
            await woke.wait()
        assert calls == 0  # hung up: the waiter is woken, the callback is not used
        for _ in range(3):  # and every later wait returns at once (no new edge needed)
            await poller.wait_readable(fd)
            assert waiting(poller) == 0
        assert os.read(fd, 10) == b""


async def test_stopping_the_poller_clears_quiet_sockets_and_wakes_their_waiters(
    nursery: trio.Nursery,
) -> None:
    poller = ReadPoller(coalesce_s=0, quiet_tick_s=QUIET_TICK)
    a, b = trio.socket.socketpair()
    c, d = trio.socket.socketpair()
    with trio.fail_after(TIMEOUT), a, b, c, d:
        first = trio.CancelScope()

        async def run_poller(
            scope: trio.CancelScope, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
        ) -> None:
            with scope:
                await poller.run(task_status=task_status)

        await nursery.start(run_poller, first)
        fd_a, fd_c = a.fileno(), c.fileno()
        assert poller.register(fd_a, lambda: True)
        assert poller.register(fd_c)
        poller.set_quiet(fd_a, True)
        assert quiet_state(poller) == (2, 1, 1)
        woke: list[int] = []

        async def waiter(fd: int) -> None:
            await poller.wait_readable(fd)  # a spurious wake when the poller stops
            woke.append(fd)

        async with trio.open_nursery() as tasks:
            tasks.start_soon(waiter, fd_a)
            tasks.start_soon(waiter, fd_c)
            await wait_until(lambda: waiting(poller) == 2)
            first.cancel()
        assert sorted(woke) == sorted([fd_a, fd_c])
        assert not running(poller)
        assert quiet_state(poller) == (0, 0, 1)
        assert waiting(poller) == 0
        poller.set_quiet(fd_a, False)  # nothing registered any more: a no-op
        assert quiet_state(poller) == (0, 0, 1)
        # it can run again, with empty sets: the old quiet socket starts over as active
        second = trio.CancelScope()
        await nursery.start(run_poller, second)
        assert poller.register(fd_a)
        assert quiet_state(poller) == (1, 0, 1)
        poller.set_quiet(fd_a, True)
        assert quiet_state(poller) == (1, 1, 2)
        async with trio.open_nursery() as tasks:
            tasks.start_soon(waiter, fd_a)
            await wait_until(lambda: waiting(poller) == 1)
            await b.send(b"x")
        assert drain(a) == b"x"
        poller.unregister(fd_a)
        second.cancel()


async def test_websocket_set_quiet_is_a_noop_without_a_poller_and_forwards_with_one(
    quiet_poller: ReadPoller,
) -> None:
    poller = quiet_poller
    async with ws_pair() as (server, client):
        with trio.fail_after(TIMEOUT):
            # no poller: nothing happens, nothing breaks
            server.set_quiet(True)
            server.set_quiet(True)
            server.set_quiet(False)
            await client.send_message(b"one")
            assert await server.receive_messages() == [b"one"]
            assert quiet_state(poller) == (0, 0, 0)
            # with a poller: forwarded (repeats are no-ops there too)
            assert server.use_poller(poller)
            server.set_quiet(True)
            server.set_quiet(True)
            assert quiet_state(poller) == (1, 1, 1)
            server.set_quiet(False)
            assert quiet_state(poller) == (1, 0, 2)
            server.set_quiet(True)
            assert quiet_state(poller) == (1, 1, 3)
            received: list[bytes] = []

            async def server_reader() -> None:
                while True:
                    received.extend(await server.receive_messages())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                for i, message in enumerate([b"two", b"three"]):
                    await wait_until(lambda: waiting(poller) == 1)  # parked on the quiet socket
                    await client.send_message(message)
                    await wait_until(lambda n=i: len(received) == n + 1)
                await client.send_messages([b"four", b"five"])
                await wait_until(lambda: len(received) == 4)
                nursery.cancel_scope.cancel()
            assert received == [b"two", b"three", b"four", b"five"]
            # closing a quiet connection unregisters it from the quiet set; set_quiet is a no-op
            server.abort()
            assert quiet_state(poller) == (0, 0, 3)
            server.set_quiet(False)
            server.set_quiet(True)
            assert quiet_state(poller) == (0, 0, 3)


async def test_a_taker_may_move_its_connection_during_a_dispatch(quiet_poller: ReadPoller) -> None:
    """As the relay's PeerLink does: a heartbeat handled by read-ahead marks the connection quiet,
    data handled later (these frames are below SO_RCVLOWAT, so a look reads them) marks it active
    again; every message still arrives once, in order, all through read-ahead."""
    poller = quiet_poller
    heartbeat = b"hb"
    async with ws_pair() as (server, client):
        taken: list[bytes] = []
        offered = 0

        def taker(batch: list[bytes]) -> bool:
            nonlocal offered
            offered += len(batch)
            taken.extend(batch)
            server.set_quiet(batch == [heartbeat])
            return True

        with trio.fail_after(TIMEOUT):
            assert server.use_poller(poller, taker)

            async def server_reader() -> None:
                while True:
                    taken.extend(await server.receive_messages())

            sequence = [heartbeat, b"data-1", heartbeat, heartbeat, b"data-2", b"data-3", heartbeat]
            expected_quiet = [1, 0, 1, 1, 0, 0, 1]
            expected_moves = [1, 2, 3, 3, 4, 4, 5]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server_reader)
                for i, message in enumerate(sequence):
                    await wait_until(lambda: waiting(poller) == 1)
                    await client.send_message(message)
                    await wait_until(lambda n=i: len(taken) == n + 1)
                    assert quiet_state(poller) == (1, expected_quiet[i], expected_moves[i])
                nursery.cancel_scope.cancel()
            assert taken == sequence
            assert offered == len(sequence)  # every one through read-ahead, none via the reader
