"""A real relay with the shared read poller (decision 0007) on and off, on 127.0.0.1 (port 0).

Every test is bounded by ``trio.fail_after`` and waits for conditions (counters, events). Timers run
in real time with the shortest heartbeat the config allows (1 s), so they take a few seconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest
import trio
import trio.testing

from rescue._codes import CloseCode
from rescue.protocol import Kind, Role, encode_frame
from rescue.relay import Relay, RelayConfig
from rescue.sessions import PeerLink
from rescue.testing import (
    TestKeys,
    TestPeer,
    peer_conn,
    relay_test_config,
    seq_frame,
    start_test_relay,
)
from rescue.websocket import POLLER_AVAILABLE
from rescue.websocket._codec import frame_binary

pytestmark = pytest.mark.skipif(not POLLER_AVAILABLE, reason="the read poller needs select.epoll (Linux)")

TEST_TIMEOUT = 30  # wall clock per test; they take milliseconds to a few seconds


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Wait for a condition the test cannot await directly (bounded by the caller's fail_after)."""
    while not predicate():
        await trio.sleep(0.001)


@pytest.fixture
async def peers() -> AsyncIterator[list[TestPeer]]:
    """Every peer a test connects; aborted at the end whatever happened (no socket leaks)."""
    made: list[TestPeer] = []
    yield made
    for peer in made:
        peer.abort()


async def pair(
    url: str, keys: TestKeys, peers: list[TestPeer], session: str = "p"
) -> tuple[TestPeer, TestPeer]:
    host = await TestPeer.connect(url, keys, session=session, role="host")
    peers.append(host)
    guest = await TestPeer.connect(url, keys, session=session, role="guest")
    peers.append(guest)
    assert (await host.receive_peer_event()).event == "joined"
    return host, guest


def poller_stat(relay: Relay, name: str) -> int | float:
    stats = relay.statistics()["read_poller"]
    assert stats is not None
    return stats[name]  # type: ignore[no-any-return]


def both_parked(relay: Relay) -> bool:
    """Both connections' readers wait in the poller (read-ahead is offered what comes next)."""
    return poller_stat(relay, "registered") == 2 and poller_stat(relay, "waiting") == 2


# ------------------------------------------------------------------------------------ config


def test_config_read_poller_defaults_and_coalesce_bounds() -> None:
    config = relay_test_config()
    assert config.read_poller is True
    assert config.read_coalesce_s == 0.0
    assert config.quiet_after_s == 5.0
    assert config.quiet_tick_s == 0.1
    for bad in (-0.001, -1.0, 1.001, 5.0):
        with pytest.raises(ValueError, match="read_coalesce_s"):
            relay_test_config(read_coalesce_s=bad)
    for good in (0.0, 0.5, 1.0):
        assert relay_test_config(read_coalesce_s=good).read_coalesce_s == good
    assert isinstance(relay_test_config(read_poller=False), RelayConfig)
    keys = TestKeys()
    assert Relay(relay_test_config(read_poller=False), keys=keys.ring).poller is None
    poller = Relay(relay_test_config(read_coalesce_s=0.25), keys=keys.ring).poller
    assert poller is not None
    assert poller.coalesce_s == 0.25


# ------------------------------------------------------------------------------ forwarding


@pytest.mark.parametrize("read_poller", [True, False], ids=["poller", "no-poller"])
async def test_paired_session_exchanges_data_and_heartbeats(
    nursery: trio.Nursery, peers: list[TestPeer], read_poller: bool
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, read_poller=read_poller)
        host, guest = await pair(url, keys, peers)
        if read_poller:
            assert relay.poller is not None
            await wait_until(lambda: both_parked(relay))
        else:
            assert relay.poller is None
            assert relay.statistics()["read_poller"] is None
        # one message at a time, each while both readers are parked: the fast path's case
        sizes = [0, 1, 100, 1000, 20_000, 60_000]
        seq = 0
        for size in sizes:
            for sender, receiver in ((host, guest), (guest, host)):
                seq += 1
                if read_poller:
                    await wait_until(lambda: both_parked(relay))
                await sender.send(seq_frame(seq, size))
                assert await receiver.receive() == seq_frame(seq, size)
        # heartbeats are echoed as the very same bytes
        for peer, beat_seq in ((host, 7), (guest, 8)):
            if read_poller:
                await wait_until(lambda: both_parked(relay))
            beat = encode_frame(Kind.HEARTBEAT, seq=beat_seq)
            await peer.send(beat)
            assert await peer.receive() == beat
        # many messages in a few writes (batches, full reads): byte-exact and in order
        burst = [seq_frame(1000 + i, (i * 7919) % 60_000) for i in range(120)]

        async def send_burst() -> None:
            for i in range(0, len(burst), 40):
                await host.send(*burst[i : i + 40])

        async with trio.open_nursery() as io:
            io.start_soon(send_burst)
            for message in burst:
                assert await guest.receive() == message
        assert relay.stats.messages_forwarded == 2 * len(sizes) + len(burst)
        assert relay.stats.frames_discarded == 0
        assert relay.stats.heartbeats_echoed == 2
        if read_poller:
            # the poller's read-ahead handled the one-at-a-time messages without waking readers
            assert poller_stat(relay, "handled") >= 2 * len(sizes) + 2
            assert poller_stat(relay, "events") >= poller_stat(relay, "handled")
        # a normal close: the partner hears PEER left, both registrations end
        await host.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        await guest.aclose()
        if read_poller:
            await wait_until(lambda: poller_stat(relay, "registered") == 0)
        assert relay.stats.internal_errors == 0


@pytest.mark.parametrize("read_poller", [True, False], ids=["poller", "no-poller"])
async def test_a_peer_that_sends_and_drops_is_seen_to_leave(
    nursery: trio.Nursery, peers: list[TestPeer], read_poller: bool
) -> None:
    """BUG with the poller (rescue/websocket/_poller.py edge-triggered EOF, see test_ws_poller.py):
    a peer that sends DATA and then drops its connection (a crash, a killed process: data and FIN
    arrive together) is not noticed; the relay forwards the DATA through read-ahead and the
    reader stays parked until the liveness timeout (3 x heartbeat_s = 45 s here), so the partner
    hears PEER left 45 s late. Without the poller it is at once."""
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, read_poller=read_poller, heartbeat_s=15)
        host, guest = await pair(url, keys, peers)
        if read_poller:
            await wait_until(lambda: both_parked(relay))
        await host.send(seq_frame(1, 100))
        host.abort()  # data and FIN back to back
        assert await guest.receive() == seq_frame(1, 100)
        with trio.move_on_after(5) as timed:
            event = await guest.receive_peer_event()
        assert not timed.cancelled_caught, "the dropped peer was not noticed"
        assert event.event == "left"


# -------------------------------------------------------------------------------- liveness


async def test_heartbeat_timeout_fires_for_a_silent_connection_with_the_poller_on(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> None:
    """heartbeat_s=1: a silent host is timed out after 3 s, a guest whose heartbeats are all echoed
    by the fast path (its reader never woken) stays alive."""
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, heartbeat_s=1, resume_grace_s=30)
        host, guest = await pair(url, keys, peers)
        await wait_until(lambda: both_parked(relay))
        handled = poller_stat(relay, "handled")
        start_time = trio.current_time()
        beat = encode_frame(Kind.HEARTBEAT, seq=1)

        async def keep_guest_alive() -> None:
            while True:
                await guest.send(beat)
                await trio.sleep(0.25)  # pacing: well inside the guest's 3 s liveness window

        async with trio.open_nursery() as io:
            io.start_soon(keep_guest_alive)
            closed = await host.wait_closed()  # the host never sends anything
            io.cancel_scope.cancel()
        elapsed = trio.current_time() - start_time
        assert closed.wire_code == CloseCode.HEARTBEAT_TIMEOUT
        assert closed.close is not None
        assert closed.close.code == CloseCode.HEARTBEAT_TIMEOUT
        assert 3.0 <= elapsed < 3.0 + 1.0 + 2.0  # 3 x heartbeat_s + slack, plus scheduling
        # the guest, kept alive only through the poller's fast path, hears PEER left
        while True:
            message = await guest.receive()
            if message[1] == Kind.PEER:
                break
            assert message == beat  # the echoes
        assert poller_stat(relay, "handled") > handled
        assert relay.stats.heartbeats_echoed >= 4


# ------------------------------------------------------------------------------- quiet mode


def test_config_quiet_bounds_and_what_reaches_the_sessions() -> None:
    for bad in (-0.001, -1.0, float("-inf")):
        with pytest.raises(ValueError, match="quiet_after_s"):
            relay_test_config(quiet_after_s=bad)
    for bad in (-0.001, 1.001, 5.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="quiet_tick_s"):
            relay_test_config(quiet_tick_s=bad)
    for good in (0.0, 0.05, 1.0):
        assert relay_test_config(quiet_tick_s=good).quiet_tick_s == good
    # with the poller the sessions get quiet_after_s as configured (0 = never)
    for quiet_after in (0.0, 0.5, 15.0, 3600.0):
        config = relay_test_config(quiet_after_s=quiet_after)
        assert config.session_limits().quiet_after_s == quiet_after
    # without it there is nothing to be quiet in: always 0
    for quiet_after in (0.0, 0.5, 15.0):
        config = relay_test_config(read_poller=False, quiet_after_s=quiet_after)
        assert config.session_limits().quiet_after_s == 0
    keys = TestKeys()
    relay = Relay(relay_test_config(read_poller=False, quiet_after_s=0.5), keys=keys.ring)
    assert relay.poller is None
    assert relay.limits.quiet_after_s == 0
    relay = Relay(relay_test_config(quiet_after_s=0.5, quiet_tick_s=0.05), keys=keys.ring)
    assert relay.poller is not None
    assert relay.poller.quiet_tick_s == 0.05
    assert relay.limits.quiet_after_s == 0.5


def is_quiet(conn: PeerLink) -> bool:
    """Whether the session core marked the connection quiet (and told its transport so)."""
    return conn.link.quiet


async def heartbeat_round(peers: list[TestPeer], seq: int) -> None:
    """Each peer sends a HEARTBEAT and gets the very same bytes back."""
    beat = encode_frame(Kind.HEARTBEAT, seq=seq)
    for peer in peers:
        await peer.send(beat)
    for peer in peers:
        assert await peer.receive() == beat


# Pacing of heartbeat rounds: far inside the 3 s liveness window of heartbeat_s=1.
BEAT_PACE_S = 0.05


async def test_a_heartbeat_only_connection_goes_quiet_and_data_makes_it_active_again(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(
            nursery, heartbeat_s=1, quiet_after_s=0.5, quiet_tick_s=0.05
        )
        assert poller_stat(relay, "quiet_tick_s") == 0.05
        host, guest = await pair(url, keys, peers)
        await wait_until(lambda: both_parked(relay))
        assert poller_stat(relay, "moves") == 0
        host_conn = peer_conn(relay, "p", Role.HOST)
        guest_conn = peer_conn(relay, "p", Role.GUEST)
        # both peers send only heartbeats: after quiet_after_s both are moved to the quiet set
        seq = 0
        while poller_stat(relay, "quiet") < 2:
            seq += 1
            await heartbeat_round([host, guest], seq)
            await trio.sleep(BEAT_PACE_S)
        assert poller_stat(relay, "moves") == 2
        assert poller_stat(relay, "registered") == 2
        assert is_quiet(host_conn)
        assert is_quiet(guest_conn)
        # quiet connections still have their heartbeats echoed (and kept alive)
        echoed = relay.stats.heartbeats_echoed
        for _ in range(3):
            seq += 1
            await heartbeat_round([host, guest], seq)
        assert relay.stats.heartbeats_echoed == echoed + 6
        assert poller_stat(relay, "quiet") == 2
        # DATA from the quiet host: forwarded byte-exact, and the host is active again (moved
        # before the data is handed on, so this holds as soon as the guest has it); the guest,
        # which only reads, stays quiet
        for size in (0, 100, 60_000):
            seq += 1
            await host.send(seq_frame(seq, size))
            assert await guest.receive() == seq_frame(seq, size)
            assert poller_stat(relay, "quiet") == 1
            assert poller_stat(relay, "moves") == 3
            assert not is_quiet(host_conn)
            assert is_quiet(guest_conn)
        # the quiet guest's answer is not held back: it wakes the relay at once (a mark of 34
        # bytes passes every DATA frame), reaches the host, and makes the guest active
        for size in (0, 1000):
            seq += 1
            await guest.send(seq_frame(seq, size))
            assert await host.receive() == seq_frame(seq, size)
            assert poller_stat(relay, "quiet") == 0
            assert poller_stat(relay, "moves") == 4
            assert not is_quiet(guest_conn)
        # heartbeats alone again: quiet again after another quiet_after_s
        while poller_stat(relay, "quiet") < 2:
            seq += 1
            await heartbeat_round([host, guest], seq)
            await trio.sleep(BEAT_PACE_S)
        assert poller_stat(relay, "moves") == 6
        assert relay.stats.messages_forwarded == 5
        assert relay.stats.frames_discarded == 0
        assert is_quiet(host_conn)
        assert is_quiet(guest_conn)
        # closing quiet connections takes them out of the quiet set
        await host.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        await guest.aclose()
        await wait_until(lambda: poller_stat(relay, "registered") == 0)
        assert poller_stat(relay, "quiet") == 0
        assert relay.stats.internal_errors == 0


async def quiet_pair(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> tuple[Relay, TestPeer, TestPeer, PeerLink, PeerLink, int]:
    """A session on a relay with a 30 s heartbeat whose two connections are quiet: (relay, host,
    guest, their connections, the last heartbeat seq). With a 30 s heartbeat the next look of
    either socket is ~30 s away, so a test's 5 s bound fails if a message waited for one."""
    relay, url, keys = await start_test_relay(nursery, heartbeat_s=30, quiet_after_s=0.3, quiet_tick_s=0.05)
    host, guest = await pair(url, keys, peers)
    await wait_until(lambda: both_parked(relay))
    host_conn = peer_conn(relay, "p", Role.HOST)
    guest_conn = peer_conn(relay, "p", Role.GUEST)
    seq = 0
    while poller_stat(relay, "quiet") < 2:  # heartbeats only, read as they come
        seq += 1
        # only peers not quiet yet: a quiet one's lone heartbeat would wait ~30 s for its look
        await heartbeat_round(
            [p for p, c in ((host, host_conn), (guest, guest_conn)) if not is_quiet(c)], seq
        )
        await trio.sleep(BEAT_PACE_S)
    return relay, host, guest, host_conn, guest_conn, seq


async def test_a_quiet_reader_stays_quiet_and_its_answer_still_wakes_the_relay_at_once(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> None:
    """Data makes only its sender active; the partner that only read stays quiet, and its answer
    is not held for a look. With a 30 s heartbeat the next look of either socket is ~30 s away,
    so each of the 5 s bounds below fails if a message waited for one."""
    with trio.fail_after(TEST_TIMEOUT):
        relay, host, guest, host_conn, guest_conn, seq = await quiet_pair(nursery, peers)
        # (16 bytes: the smallest body the SDK sends, an AEAD tag; a bare 18-byte frame would be
        # held below the quiet mark like a heartbeat, decision 0015)
        for size in (16, 500):  # the host types: it wakes the relay, the guest only reads
            seq += 1
            await host.send(seq_frame(seq, size))
            with trio.fail_after(5):
                assert await guest.receive() == seq_frame(seq, size)
            assert not is_quiet(host_conn)
            assert is_quiet(guest_conn)
        seq += 1  # the quiet guest answers: at once, and now it is active too
        await guest.send(seq_frame(seq, 16))
        with trio.fail_after(5):
            assert await host.receive() == seq_frame(seq, 16)
        assert not is_quiet(guest_conn)
        assert poller_stat(relay, "quiet") == 0
        assert poller_stat(relay, "moves") == 4
        assert relay.stats.internal_errors == 0


async def read_again(conn: PeerLink, reads: int) -> None:
    """Wait until the relay has read ``conn``'s socket more than ``reads`` times."""
    await wait_until(lambda: conn.transport.statistics().reads > reads)


async def test_the_tail_of_a_first_message_split_below_the_quiet_mark_is_not_held_for_a_look(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> None:
    """The first message after quiet may arrive in two TCP segments, the second shorter than the
    quiet mark (34 bytes): a paste of 1,460 bytes over a 1,448-byte MSS leaves 12. The first part
    wakes the relay, but its read holds no whole frame yet, so nothing made the socket active:
    the tail must still wake the relay, not wait ~30 s (the heartbeat) for the socket's look."""
    with trio.fail_after(TEST_TIMEOUT):
        relay, host, guest, host_conn, _, seq = await quiet_pair(nursery, peers)
        for size, tail in ((1_400, 12), (40, 5), (500, 33)):  # (each first part passes the mark)
            seq += 1
            message = seq_frame(seq, size)
            wire = frame_binary(message, mask=True)
            reads = host_conn.transport.statistics().reads
            await host.ws._stream.send_all(wire[:-tail])  # the first segment: wakes the relay
            await read_again(host_conn, reads)  # ... which read it
            await host.ws._stream.send_all(wire[-tail:])  # the tail, under the quiet mark
            with trio.fail_after(5):
                assert await guest.receive() == message
            assert not is_quiet(host_conn)  # (the core made it active when the message was whole)
            while poller_stat(relay, "quiet") < 2:  # quiet again before the next split message
                seq += 1
                await heartbeat_round([host], seq)
                await trio.sleep(BEAT_PACE_S)
        assert relay.stats.internal_errors == 0


async def test_with_quiet_after_zero_nothing_ever_goes_quiet(
    nursery: trio.Nursery, peers: list[TestPeer]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(
            nursery, heartbeat_s=1, quiet_after_s=0.0, quiet_tick_s=0.05
        )
        assert relay.limits.quiet_after_s == 0
        host, guest = await pair(url, keys, peers)
        await wait_until(lambda: both_parked(relay))
        # heartbeats only, for longer than the 0.5 s that makes connections quiet in the test above
        started = trio.current_time()
        seq = 0
        while trio.current_time() - started < 0.75:
            seq += 1
            await heartbeat_round([host, guest], seq)
            assert poller_stat(relay, "quiet") == 0
            await trio.sleep(BEAT_PACE_S)
        seq += 1
        await host.send(seq_frame(seq, 100))
        assert await guest.receive() == seq_frame(seq, 100)
        assert poller_stat(relay, "quiet") == 0
        assert poller_stat(relay, "moves") == 0
        assert relay.stats.heartbeats_echoed == 2 * (seq - 1)


@pytest.mark.parametrize("read_poller", [True, False], ids=["poller", "no-poller"])
async def test_bulk_16k_frames_both_ways_with_a_stalled_reader_arrive_byte_exact(
    nursery: trio.Nursery, peers: list[TestPeer], read_poller: bool
) -> None:
    """Large frames in bursts (reads that fill the buffer, frames split across reads, gathering
    writes that stop part-way while a receiver does not read): every byte arrives, in order (0019)."""
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery, read_poller=read_poller)
        host, guest = await pair(url, keys, peers)
        count = 160
        flows = {
            peer: [seq_frame(side * 100_000 + i + 1, 16_384 + (i * 997) % 8_000) for i in range(count)]
            for side, peer in enumerate((host, guest))
        }
        stalled = trio.Event()

        async def send_all(sender: TestPeer) -> None:
            burst = flows[sender]
            for i in range(0, count, 20):
                await sender.send(*burst[i : i + 20])

        async def receive_all(receiver: TestPeer, sender: TestPeer, stall: bool) -> None:
            if stall:  # the relay's writes to this peer fill its socket and stop part-way
                await wait_until(lambda: relay.stats.messages_forwarded >= 40)
                stalled.set()
            for message in flows[sender]:
                assert await receiver.receive() == message

        async with trio.open_nursery() as io:
            io.start_soon(send_all, host)
            io.start_soon(send_all, guest)
            io.start_soon(receive_all, guest, host, True)
            io.start_soon(receive_all, host, guest, False)
        assert stalled.is_set()
        assert relay.stats.messages_forwarded == 2 * count
        assert relay.stats.internal_errors == 0
