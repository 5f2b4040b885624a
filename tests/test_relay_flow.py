"""Relay flow control over real WebSockets: backpressure, stalled receivers, throttling, bounded closes."""

from __future__ import annotations

import contextlib

import trio
import trio.testing

from rescue._codes import CloseCode
from rescue.errors import ConnectionClosedError
from rescue.protocol import HEADER_SIZE, Kind, Role, encode_frame
from rescue.sessions import RELAY_HEARTBEAT
from rescue.testing import TestKeys, TestPeer, peer_conn, seq_frame, start_test_relay
from rescue.websocket import READ_SIZE

TEST_TIMEOUT = 60  # wall clock; the 50 MB test moves the most data
VIRTUAL_TIMEOUT = 10_000  # autojump tests, virtual seconds


async def pair(url: str, keys: TestKeys, session: str = "f") -> tuple[TestPeer, TestPeer]:
    host = await TestPeer.connect(url, keys, session=session, role="host", max_message=1 << 20)
    guest = await TestPeer.connect(url, keys, session=session, role="guest", max_message=1 << 20)
    assert (await host.receive_peer_event()).event == "joined"
    return host, guest


async def flood(host: TestPeer) -> None:
    """Send 24 MB of DATA, far more than the socket buffers hold, until done or closed.

    Bounded: an endless flood would keep the autojump clock from ever advancing while the relay
    drains it during a close.
    """
    with contextlib.suppress(ConnectionClosedError):  # the relay closes the host at the end
        for seq in range(1, 3000, 16):
            await host.send(*[seq_frame(s, 8192) for s in range(seq, seq + 16)])


async def test_slow_receiver_holds_back_sender_with_bounded_queue(nursery: trio.Nursery) -> None:
    """50 MB to a guest that does not read: the relay's queue stays bounded, the host is held back,
    and once the guest reads everything arrives byte-exact."""
    body = 60_000
    total_frames = 50_000_000 // body + 1
    queue_max_bytes = 256 * 1024
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, queue_max_bytes=queue_max_bytes)
        assert relay.poller is not None  # the default: backpressure through the shared read poller
        host, guest = await pair(url, keys)
        sent = 0

        async def send_everything() -> None:
            nonlocal sent
            batch = 8
            for first in range(1, total_frames + 1, batch):
                messages = [
                    seq_frame(seq, body) for seq in range(first, min(first + batch, total_frames + 1))
                ]
                await host.send(*messages)
                sent += len(messages)

        async with trio.open_nursery() as io:
            io.start_soon(send_everything)
            # wait until everyone is stuck: host in send (TCP full), relay reader parked on
            # backpressure, and still so 0.2 s later. A few rounds may be needed: loopback TCP grows
            # the guest's receive window (autotuning) while nobody reads, which lets one more batch
            # through on a loaded machine; what must hold is that it settles, far short of 50 MB.
            for _ in range(20):
                while True:
                    before = sent
                    await trio.testing.wait_all_tasks_blocked(cushion=0.1)
                    if sent == before and relay.stats.backpressure_stalls:
                        break
                held_at = sent
                await trio.sleep(0.2)
                if sent == held_at:
                    break  # still held while the guest does not read
            assert sent == held_at, "the host was never held back for 0.2 s"
            assert sent < total_frames  # held back: kernel buffers + bounded queue < 50 MB
            to_guest = peer_conn(relay, "f", Role.GUEST)
            stats = to_guest.statistics()
            # the bound: queue limit + one read's batch + the batch being written
            assert stats["peak_queued_bytes"] <= queue_max_bytes + READ_SIZE + 65536
            for seq in range(1, total_frames + 1):
                message = await guest.receive()
                assert message[:HEADER_SIZE] == seq_frame(seq, body)[:HEADER_SIZE]
                assert message == seq_frame(seq, body), seq
        assert sent == total_frames
        assert relay.stats.messages_forwarded == total_frames
        assert relay.stats.frames_discarded == 0
        assert to_guest.statistics()["peak_queued_bytes"] <= queue_max_bytes + READ_SIZE + 65536
        host.abort()
        guest.abort()


async def test_stalled_receiver_does_not_stop_sender_supervision(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """A guest that heartbeats but never reads: the host, held back, is not timed out, and hears
    HEARTBEAT seq 0 from the relay every heartbeat_s."""
    with trio.fail_after(VIRTUAL_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, heartbeat_s=15, queue_max_bytes=16384)
        host, guest = await pair(url, keys)
        total = 24_000_000 // 8192
        sent = 0
        relay_beats: list[float] = []

        async def host_sender() -> None:
            nonlocal sent
            for seq in range(1, total + 1, 16):
                await host.send(*[seq_frame(s, 8192) for s in range(seq, min(seq + 16, total + 1))])
                sent = min(seq + 15, total)

        async def host_reader() -> None:
            while True:
                message = await host.receive()
                assert message == RELAY_HEARTBEAT  # nothing else comes to the host here
                relay_beats.append(trio.current_time())

        async def guest_heartbeats() -> None:
            seq = 0
            while True:
                seq += 1
                await guest.send(encode_frame(Kind.HEARTBEAT, seq=seq))
                await trio.sleep(10)

        async with trio.open_nursery() as io:
            io.start_soon(host_sender)
            io.start_soon(host_reader)
            io.start_soon(guest_heartbeats)
            start_time = trio.current_time()
            await trio.sleep(200)
            assert sent < total  # still held back
            assert relay.stats.backpressure_stalls >= 1
            assert relay.stats.idle_pruned == 0  # nobody timed out
            assert len(relay_beats) >= 10  # one per 15 s
            gaps = [b - a for a, b in zip([start_time, *relay_beats], relay_beats, strict=False)]
            assert max(gaps[1:]) <= 15.5
            assert relay.table.connections() == 2
            # now the guest reads: everything arrives in order (its heartbeat echoes interleave)
            seq = 1
            while seq <= total:
                message = await guest.receive()
                if message[1] == Kind.HEARTBEAT:
                    continue
                assert message == seq_frame(seq, 8192)
                seq += 1
            io.cancel_scope.cancel()
        host.abort()
        guest.abort()


async def test_throttle_by_not_reading(nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    rate = 100_000
    with trio.fail_after(VIRTUAL_TIMEOUT):
        relay, url, keys = await start_test_relay(
            nursery, max_bytes_per_s=rate, burst_bytes=rate, heartbeat_s=1
        )
        host, guest = await pair(url, keys)
        frames = [seq_frame(seq, 10_000) for seq in range(1, 61)]  # ~600 KB
        start_time = trio.current_time()

        async def guest_heartbeats() -> None:  # the receiver stays alive; the host only sends
            while True:
                await guest.send(encode_frame(Kind.HEARTBEAT, seq=1))
                await trio.sleep(0.5)

        async with trio.open_nursery() as io:
            io.start_soon(host.send, *frames)
            io.start_soon(guest_heartbeats)
            for expected in frames:
                message = await guest.receive()
                while message[1] == Kind.HEARTBEAT:
                    message = await guest.receive()
                assert message == expected
            io.cancel_scope.cancel()
        elapsed = trio.current_time() - start_time
        size = sum(map(len, frames))
        # the burst goes at once, and the last read batch is forwarded before its debt is waited off
        assert (size - rate - READ_SIZE - len(frames[0])) / rate <= elapsed <= size / rate + 1.0
        assert relay.stats.throttle_waits >= 1
        # the liveness deadline was suspended while throttled (heartbeat_s=1 would have cut it)
        assert relay.stats.idle_pruned == 0
        host.abort()
        guest.abort()


async def test_closing_a_stalled_peer_is_bounded(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """REPLACED on a guest whose socket is full: the relay gives up after close_timeout_s."""
    with trio.fail_after(VIRTUAL_TIMEOUT):
        relay, url, keys = await start_test_relay(
            nursery, heartbeat_s=600, close_timeout_s=5, queue_max_bytes=16384
        )
        host, guest = await pair(url, keys)
        old = peer_conn(relay, "f", Role.GUEST)

        async with trio.open_nursery() as io:
            io.start_soon(flood, host)
            while not relay.stats.backpressure_stalls:
                await trio.sleep(1)
            guest2 = await TestPeer.connect(url, keys, session="f", role="guest", max_message=1 << 20)
            replaced_at = trio.current_time()
            await old.wait_done()
            assert trio.current_time() - replaced_at <= 5.5
            # the host is released and now feeds the new guest
            event = None
            while event is None:
                message = await guest2.receive()
                if message[1] == Kind.DATA:
                    event = message
            assert relay.stats.closes[CloseCode.REPLACED] == 1
            io.cancel_scope.cancel()
        host.abort()
        guest.abort()
        guest2.abort()


async def test_shutdown_with_a_stalled_peer_finishes_within_drain(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(VIRTUAL_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, heartbeat_s=600, drain_s=20, queue_max_bytes=16384)
        host, guest = await pair(url, keys)

        async with trio.open_nursery() as io:
            io.start_soon(flood, host)
            while not relay.stats.backpressure_stalls:
                await trio.sleep(1)
            started = trio.current_time()
            await relay.drain()
            assert trio.current_time() - started <= 20.5
            io.cancel_scope.cancel()
        assert len(relay.table) == 0
        host.abort()
        guest.abort()
