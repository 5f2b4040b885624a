"""The relay's session core (:class:`rescue.sessions.SessionCore`) without sockets.

Messages and time in, actions out.

A :class:`Shell` here does what the trio shell does, synchronously: it hands batches in, writes what
the core queues into a per-link list (the "socket"), carries out the actions and calls ``tick``
when time passes the core's deadline. Hypothesis drives random interleavings of attach, input,
writes, closes and time for both roles and checks the SPEC §2 rules after every step.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.protocol import (
    HEADER_SIZE,
    Caps,
    Close,
    Kind,
    PeerEvent,
    Role,
    Welcome,
    decode_header,
    encode_frame,
    encode_header,
)
from rescue.sessions import RELAY_HEARTBEAT, Link, LivenessWheel, RelayStats, SessionCore, SessionLimits
from rescue.sessions._config import MAX_RECENT_NONCES
from rescue.sessions._core import (
    ACTIONS,
    ACTIVE,
    CLOSE,
    CLOSED,
    ECHO_NOW,
    ENDED,
    HOLD,
    LEFT,
    PAIRED,
    QUIET,
    REARM,
    REJOINED,
    REPLACED,
    RESUME,
    WRITE,
    WRITE_NOW,
    WRITE_PARTNER,
    WRITE_SELF,
)

CAPS = Caps(("zlib",))
LIMITS = SessionLimits(heartbeat_s=10, resume_grace_s=20, pair_timeout_s=50.0, queue_max_frames=8,
                       queue_max_bytes=4096, close_timeout_s=5.0)  # fmt: skip


def data(seq: int, size: int = 10) -> bytes:
    return encode_frame(Kind.DATA, bytes([seq % 251]) * size, seq=seq)


def beat(seq: int = 1) -> bytes:
    return encode_frame(Kind.HEARTBEAT, seq=seq)


@dataclass
class Conn:
    """What the shell keeps for one link: what the peer got, and the action log."""

    role: Role
    link: Link[Conn] = field(init=False)
    got: list[bytes] = field(default_factory=list)  # everything written to the socket, in order
    held: list[bytes] | None = None  # a batch the core answered HOLD to
    in_hand: list[bytes] | None = None  # a batch the core gave the link to write (WRITE_NOW)
    resumed: int = 0
    close_began: bool = False
    quiet: bool = False

    def is_held(self) -> bool:
        """Whether the core holds the link's input back (a call: it changes under the test)."""
        return self.link.held

    def is_quiet(self) -> bool:
        return self.quiet


class Shell:
    """A synchronous stand-in for the trio shell: auto-writes unless ``stall`` says a socket is full."""

    def __init__(self, limits: SessionLimits = LIMITS, now: float = 0.0) -> None:
        self.now = now
        self.stats = RelayStats()
        self.wheel = LivenessWheel()
        self.core: SessionCore[Conn] = SessionCore(limits, self.stats, now=now, wheel=self.wheel)
        self.limits = limits
        self.stalled: set[Role] = set()  # roles whose socket takes nothing (their peer does not read)
        self.lifecycle: list[tuple[int, Role | None]] = []
        self.times: list[float] = []  # when each lifecycle entry happened
        self.links: list[Link[Conn] | None] = []  # and for which link
        self.conns: list[Conn] = []
        self.armed = self.core.next_deadline()
        self.ticks = 0  # the session timer's wake-ups
        self.wheel_passes = 0  # the liveness wheel's task taking a slot

    # -- events in

    def attach(self, role: Role, nonce: bytes | None = None) -> Conn:
        conn = Conn(role)
        conn.link = self.core.attach(
            role, nonce or os.urandom(16), CAPS, now=self.now, server_nonce=bytes(16), handle=conn
        )
        self.conns.append(conn)
        self.run_actions()
        return conn

    def receive(self, conn: Conn, batch: list[bytes]) -> int:
        flags = self.core.receive(conn.link, batch, self.now)
        conn.held = list(batch) if flags & HOLD else None
        self.apply(conn, flags, batch)
        return flags

    def retry(self, conn: Conn) -> int:
        assert conn.held is not None
        return self.receive(conn, conn.held)

    def advance(self, dt: float) -> None:
        """Let ``dt`` pass, ticking the core exactly at each deadline it hands out (as a timer would),
        and taking the liveness wheel's slots when they are due (as the node's wheel task would)."""
        target = self.now + dt
        for _ in range(10_000):
            at = min(self.armed, self.wheel.next_at())
            if at > target:
                break
            self.now = max(self.now, at)
            if self.armed <= self.now:
                self.ticks += 1
                self.core.tick(self.now)
                self.run_actions()
            if self.wheel.next_at() <= self.now:
                self.wheel_passes += 1
                for core in self.wheel.due(self.now):
                    assert core is self.core
                    core.tick(self.now)
                    self.run_actions()
            self.armed = self.core.next_deadline()
        else:  # pragma: no cover - the core must make progress at every tick
            raise AssertionError("tick() keeps asking for the same time")
        self.now = target

    def unstall(self, role: Role) -> None:
        self.stalled.discard(role)
        for conn in self.conns:
            if conn.role is role:
                self.write(conn)

    # -- carrying out

    def apply(self, conn: Conn, flags: int, batch: list[bytes] | None = None) -> None:
        if flags & ACTIONS:
            self.run_actions()
        if flags & WRITE_NOW:
            partner = self.core.slots[conn.link.other]
            assert partner is not None  # only the all-relayed hot path writes at once
            assert batch is not None
            self.write_taken(partner.handle, batch)
        if flags & ECHO_NOW:
            assert batch is not None
            assert len(batch) == 1
            self.write_taken(conn, batch)
        if flags & WRITE_PARTNER:
            partner = self.core.slots[conn.link.other]
            if partner is not None:  # (one that closed meanwhile got a CLOSE action)
                self.write(partner.handle)
        if flags & WRITE_SELF:
            self.write(conn)

    def write_taken(self, conn: Conn, batch: list[bytes]) -> None:
        """A batch the core made the link's write at once: written unless the socket is stalled."""
        conn.in_hand = batch
        self.write(conn)

    def write(self, conn: Conn) -> None:
        """The writer: take everything queued and 'write' it, unless the socket is stalled."""
        if conn.role in self.stalled and not conn.link.closing:
            return
        if conn.in_hand is not None:
            taken, conn.in_hand = conn.in_hand, None
            if not conn.link.closing or conn.link.flush:
                conn.got.extend(taken)
            self.apply(conn, self.core.sent(conn.link, self.now))
        while (messages := self.core.take_output(conn.link)) is not None:
            conn.got.extend(messages)
            self.apply(conn, self.core.sent(conn.link, self.now))

    def run_actions(self) -> None:
        for kind, link in self.core.take_actions():
            if kind == REARM:
                self.armed = self.core.next_deadline()
                continue
            self.lifecycle.append((kind, None if link is None else link.role))
            self.times.append(self.now)
            self.links.append(link)
            if link is None:
                continue
            conn = link.handle
            if kind == WRITE:
                self.write(conn)
            elif kind == CLOSE:
                conn.close_began = True
                if link.flush:
                    self.write(conn)
            elif kind == RESUME:
                conn.resumed += 1
            elif kind in (QUIET, ACTIVE):
                conn.quiet = kind == QUIET


def decoded(conn: Conn) -> list[object]:
    """The relay messages a peer got, decoded (DATA/HEARTBEAT as raw bytes)."""
    out: list[object] = []
    for m in conn.got:
        kind = decode_header(m).kind
        if kind is Kind.WELCOME:
            out.append(Welcome.decode(m[HEADER_SIZE:]))
        elif kind is Kind.PEER:
            out.append(PeerEvent.decode(m[HEADER_SIZE:]))
        elif kind is Kind.CLOSE:
            out.append(Close.decode(m[HEADER_SIZE:]))
        else:
            out.append(m)
    return out


# ------------------------------------------------------------------------------ pairing and PEER


def test_welcome_then_joined_and_paired_once() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    (welcome,) = decoded(host)
    assert isinstance(welcome, Welcome)
    assert welcome.peer is None
    assert welcome.ack_nonce == host.link.nonce
    assert (welcome.heartbeat_s, welcome.resume_grace_s) == (10, 20)
    guest = shell.attach(Role.GUEST)
    welcome_g = decoded(guest)[0]
    assert isinstance(welcome_g, Welcome)
    assert welcome_g.peer == host.link.info
    joined = decoded(host)[1]
    assert isinstance(joined, PeerEvent)
    assert (joined.event, joined.role, joined.nonce) == ("joined", Role.GUEST, guest.link.nonce)
    assert (PAIRED, Role.GUEST) in shell.lifecycle
    assert shell.stats.pairings == 1
    assert shell.core.paired
    assert shell.core.connected == 2


def test_left_then_rejoined_and_the_grace_timer() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.core.connection_lost(guest.link, shell.now)
    shell.run_actions()
    left = decoded(host)[-1]
    assert isinstance(left, PeerEvent)
    assert (left.event, left.nonce) == ("left", guest.link.nonce)
    assert (LEFT, Role.GUEST) in shell.lifecycle
    assert shell.stats.transport_lost == 1
    assert shell.core.timer_deadline() == shell.now + 20
    shell.advance(19)
    guest2 = shell.attach(Role.GUEST)
    back = decoded(host)[-1]
    assert isinstance(back, PeerEvent)
    assert (back.event, back.nonce) == ("rejoined", guest2.link.nonce)
    assert (REJOINED, Role.GUEST) in shell.lifecycle
    assert shell.stats.rejoins == {"replaced": 0, "returned": 1}
    assert math.isinf(shell.core.timer_deadline())
    assert shell.stats.pairings == 1  # paired once per session


def test_takeover_replaces_the_old_link_without_peer_left() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    host2 = shell.attach(Role.HOST)
    assert host.link.closing
    assert host.link.close_code == CloseCode.REPLACED
    assert (REPLACED, Role.HOST) in shell.lifecycle
    events = [m for m in decoded(guest) if isinstance(m, PeerEvent)]
    assert [e.event for e in events] == ["rejoined"]  # no "left" in between
    assert shell.core.peer(Role.HOST) is host2.link
    assert shell.stats.rejoins["replaced"] == 1
    assert shell.stats.closes == {CloseCode.REPLACED: 1}


def test_a_replayed_nonce_is_refused_before_anything_changes() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    with pytest.raises(ProtocolError, match="replay"):
        shell.attach(Role.HOST, nonce=host.link.nonce)
    assert shell.core.peer(Role.HOST) is host.link
    assert not host.link.closing


def test_the_last_max_recent_nonces_are_refused_and_older_ones_forgotten() -> None:
    shell = Shell()
    nonces = [os.urandom(16) for _ in range(MAX_RECENT_NONCES + 1)]
    for nonce in nonces:
        shell.attach(Role.HOST, nonce=nonce)  # each takes over the one before
    for nonce in nonces[1:]:  # the newest MAX_RECENT_NONCES: replays
        with pytest.raises(ProtocolError, match="replay"):
            shell.attach(Role.HOST, nonce=nonce)
    shell.attach(Role.HOST, nonce=nonces[0])  # the oldest has been forgotten (the bound)


def test_the_last_link_leaving_ends_the_session() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    shell.core.connection_lost(host.link, shell.now)
    shell.run_actions()
    assert (ENDED, None) in shell.lifecycle
    assert shell.core.ended
    assert shell.stats.sessions_emptied == 1
    with pytest.raises(RuntimeError):
        shell.attach(Role.GUEST)


# -------------------------------------------------------------------------------- forwarding


def test_forwarding_hands_the_very_list_on_and_echoes_heartbeats_ahead() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    batch = [data(1), data(2)]
    written = shell.stats.forward_latency.count  # (WELCOME and PEER count too)
    # the guest's output is idle: the batch is its write at once (no queue traffic)
    assert shell.core.receive(host.link, batch, shell.now) == WRITE_NOW
    assert guest.link.q_frames == 2  # counted until written
    # while it is being written, the next batch is queued
    batch2 = [data(3)]
    assert shell.core.receive(host.link, batch2, shell.now) == WRITE_PARTNER
    assert shell.core.take_output(guest.link) is None  # one write at a time
    assert shell.core.sent(guest.link, shell.now + 0.5) == ACTIONS
    assert shell.core.take_actions() == [(WRITE, guest.link)]  # there is more to write
    assert guest.link.q_frames == 1
    assert shell.core.take_output(guest.link) is batch2  # one batch queued: the very list
    assert shell.core.sent(guest.link, shell.now) == 0
    # an echo for an idle link is its write at once; while that is written, the next one waits
    # in the priority lane (ahead of any data)
    assert shell.core.receive(guest.link, [beat(7)], shell.now) == ECHO_NOW
    assert shell.core.receive(guest.link, [beat(8)], shell.now) == WRITE_SELF
    shell.core.sent(guest.link, shell.now)
    assert shell.core.take_actions() == [(WRITE, guest.link)]
    assert shell.core.take_output(guest.link) == [beat(8)]
    assert shell.stats.heartbeats_echoed == 2
    assert shell.stats.messages_forwarded == 3
    assert shell.stats.bytes_forwarded == sum(map(len, batch + batch2))
    assert shell.stats.forward_latency.count == written + 2
    assert shell.stats.forward_latency.total == 0.5


def test_a_mixed_batch_keeps_its_order_and_validates_every_heartbeat() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.receive(host, [data(1), beat(3), data(2)])
    assert decoded(guest)[-2:] == [data(1), data(2)]
    assert host.got[-1] == beat(3)
    bad = beat(4)[:3] + b"\x02" + beat(4)[4:]  # channel 2: not the lone-heartbeat shortcut
    shell.receive(host, [data(3), bad, data(4)])
    assert host.link.close_code == CloseCode.PROTOCOL_ERROR
    assert decoded(guest)[-2] == data(3)  # what came before the bad message was forwarded
    assert data(4) not in guest.got  # nothing after it


@pytest.mark.parametrize(
    "message",
    [
        encode_frame(Kind.HELLO, b"\xa0"),
        encode_frame(Kind.WELCOME, b"\xa0"),
        encode_frame(Kind.PEER, b"\xa0"),
        encode_header(Kind.HEARTBEAT) + b"body",
        b"\x01\x7f" + bytes(10),
        b"\x01\x01\x80" + bytes(9),
        encode_frame(Kind.CLOSE, b"not cbor"),
        b"\x01",
        b"",
    ],
)
def test_bad_input_closes_with_protocol_error_and_the_partner_hears_left(message: bytes) -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.receive(host, [message])
    assert host.link.close_code == CloseCode.PROTOCOL_ERROR
    assert host.link.close_body is not None
    assert Close.decode(host.link.close_body[HEADER_SIZE:]).code == CloseCode.PROTOCOL_ERROR
    left = decoded(guest)[-1]
    assert isinstance(left, PeerEvent)
    assert left.event == "left"


_BEAT = encode_frame(Kind.HEARTBEAT, seq=7)


@pytest.mark.parametrize(
    "message",
    [
        _BEAT[:2] + b"\x01" + _BEAT[3:],  # a flag bit (HEARTBEAT carries none)
        _BEAT[:3] + b"\x02" + _BEAT[4:],  # channel 2
        b"\x02" + _BEAT[1:],  # version 2
        _BEAT + b"x",  # a body
    ],
)
def test_a_lone_heartbeat_takes_the_shortcut_only_when_valid(message: bytes) -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    shell.attach(Role.GUEST)
    assert shell.receive(host, [_BEAT]) == ECHO_NOW  # echoed, the very same bytes
    assert host.got[-1] == _BEAT
    shell.receive(host, [message])
    assert host.link.close_code == CloseCode.PROTOCOL_ERROR
    assert host.got[-1] == _BEAT  # no echo of the bad one


def test_a_peer_close_is_forwarded_after_the_data_and_ends_both() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    bye = Close(4321, "done").to_message()
    shell.stalled.add(Role.GUEST)
    shell.receive(host, [data(1), bye])
    assert host.link.closing
    assert host.link.close_body is None  # the peer's own CLOSE: only the close frame goes back
    assert guest.link.flush  # everything queued first
    assert guest.link.close_code == 4321
    assert guest.link.ws_code == 4321
    assert decoded(guest)[-2:] == [data(1), Close(4321, "done")]
    assert not [m for m in decoded(guest) if isinstance(m, PeerEvent) and m.event == "left"]


def test_a_peer_close_code_a_close_frame_cannot_carry_becomes_1000() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    shell.attach(Role.GUEST)
    shell.receive(host, [Close(2000, "odd").to_message()])
    assert host.link.close_code == 2000
    assert host.link.ws_code == 1000


def test_frames_without_a_partner_are_discarded_and_counted() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    assert shell.receive(host, [data(1), data(2)]) == 0
    assert shell.stats.frames_discarded == 2


# ------------------------------------------------------------------------- flow control, holds


def stalled_pair() -> tuple[Shell, Conn, Conn, int]:
    """A paired session whose guest reads nothing, after the host sent until it was held back."""
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.stalled.add(Role.GUEST)
    seq = 0
    while not shell.receive(host, [data(seq := seq + 1, 500)]) & HOLD:
        pass
    return shell, host, guest, seq


def test_a_full_partner_queue_holds_the_sender_until_written() -> None:
    shell, host, guest, seq = stalled_pair()
    assert host.link.held
    assert shell.stats.backpressure_stalls == 1
    assert shell.retry(host) & HOLD  # again: still full, counted once
    assert shell.stats.backpressure_stalls == 1
    # held: no liveness timeout, a relay HEARTBEAT every heartbeat_s instead (the guest, which
    # does not read, still heartbeats)
    for _ in range(20):
        shell.advance(5)
        shell.receive(guest, [beat()])
    assert not host.link.closing
    assert host.got.count(RELAY_HEARTBEAT) == 10
    assert shell.stats.relay_heartbeats == 10
    shell.unstall(Role.GUEST)
    assert host.resumed >= 1
    assert not shell.retry(host) & HOLD
    assert not host.is_held()
    sent = [m for m in guest.got if m[1] == Kind.DATA]
    assert sent == [data(s, 500) for s in range(1, seq + 1)]
    # after the hold the peer gets a full liveness timeout from now
    shell.advance(29)
    assert not host.link.closing
    shell.advance(2)
    assert host.link.close_code == CloseCode.HEARTBEAT_TIMEOUT


def test_a_held_sender_is_released_when_its_partner_leaves_and_then_discards() -> None:
    shell, host, guest, _ = stalled_pair()
    shell.core.connection_lost(guest.link, shell.now)
    shell.run_actions()
    assert host.resumed == 1
    discarded = shell.stats.frames_discarded
    assert not shell.retry(host) & HOLD
    assert not host.is_held()
    assert shell.stats.frames_discarded == discarded + 1


def test_throttling_holds_the_next_batch_until_the_debt_is_paid() -> None:
    limits = SessionLimits(heartbeat_s=1, max_bytes_per_s=1000, burst_bytes=1000, queue_max_bytes=1 << 20)
    shell = Shell(limits)
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    assert shell.receive(host, [data(1, 3000)]) & WRITE_NOW  # the burst, then 2 s of debt
    assert shell.stats.throttle_waits == 1
    assert shell.receive(host, [data(2, 10)]) & HOLD
    shell.advance(1.9)
    assert host.resumed == 0
    assert not host.link.closing  # liveness suspended while we hold it back (heartbeat_s=1)
    shell.advance(0.2)
    assert host.resumed == 1
    assert not shell.retry(host) & HOLD
    assert guest.got[-1] == data(2, 10)


# ------------------------------------------------------------------------------------ timers


def test_pair_timeout_and_peer_gone() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    for _ in range(4):
        shell.advance(10)
        shell.receive(host, [beat()])  # alive, but alone
    shell.advance(9.9)
    assert not host.link.closing
    shell.advance(0.1)
    assert host.link.close_code == CloseCode.PAIR_TIMEOUT
    shell2 = Shell()
    host = shell2.attach(Role.HOST)
    guest = shell2.attach(Role.GUEST)
    shell2.core.connection_lost(guest.link, shell2.now)
    shell2.run_actions()
    shell2.advance(19.9)
    assert not host.link.closing
    shell2.advance(0.1)
    assert host.link.close_code == CloseCode.PEER_GONE


def test_liveness_stays_exact_to_the_slack() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    for _ in range(10):  # a heartbeat every 10 s keeps both alive
        shell.advance(10)
        shell.receive(host, [beat()])
        shell.receive(guest, [beat()])
    assert not host.link.closing
    last = shell.now  # the host's last message
    for _ in range(2):
        shell.advance(10)
        shell.receive(guest, [beat()])
    shell.advance(9.9)
    assert not host.link.closing  # 29.9 s of silence
    shell.advance(1.2)
    assert host.link.close_code == CloseCode.HEARTBEAT_TIMEOUT
    closed_at = shell.times[shell.lifecycle.index((CLOSED, Role.HOST))]
    assert 30 <= closed_at - last <= 31  # never early, at most the slack late
    assert shell.stats.idle_pruned == 1
    assert not guest.link.closing


def test_live_peers_move_no_timer_and_the_wheel_looks_at_the_session_twice_a_timeout_at_most() -> None:
    """Liveness deadlines are on the node's wheel (decision 0025): heartbeats move no session timer
    (none is armed at all for a paired session whose peers talk), and the wheel looks at the
    session about once per liveness timeout less a heartbeat, until a real silence."""
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    for i in range(30):  # 300 s, a heartbeat every 10 s (liveness timeout 30 s)
        shell.advance(10)
        for conn in (host, guest) if i % 2 else (guest, host):
            assert not shell.receive(conn, [beat()]) & ACTIONS  # (no REARM)
    assert shell.core.next_deadline() == math.inf
    assert shell.ticks == 0
    assert shell.wheel.fired == 0
    assert len(shell.wheel) == 1
    assert 300 / 30 <= shell.wheel.refiled <= 300 / (30 - 10) + 1  # the earlier peer's last beat + 30 s
    assert not host.link.closing
    assert not guest.link.closing
    shell.advance(31)  # silence: both timed out by the wheel, the session timer still never fired
    assert host.link.close_code == guest.link.close_code == CloseCode.HEARTBEAT_TIMEOUT
    assert shell.ticks == 0
    assert 1 <= shell.wheel.fired <= 2
    assert shell.core.ended
    assert len(shell.wheel) == 0  # an ended session leaves the wheel at once


_WHEEL_LIMITS = SessionLimits(heartbeat_s=10)
_WHEEL_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("beat"), st.integers(0, 3), st.sampled_from(list(Role))),
        st.tuples(st.just("attach"), st.integers(0, 3), st.sampled_from(list(Role))),
        st.tuples(st.just("lose"), st.integers(0, 3), st.sampled_from(list(Role))),
        st.tuples(st.just("end"), st.integers(0, 3), st.just(Role.HOST)),
        st.tuples(st.just("sleep"), st.floats(0.0, 45.0), st.just(Role.HOST)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops=_WHEEL_OPS, tick=st.sampled_from([0.25, 1.0, 2.5]))
def test_the_wheel_times_out_every_silent_link_never_early_and_at_most_a_tick_late(
    ops: list[tuple[str, float, Role]], tick: float
) -> None:
    """Four sessions on one wheel, driven as the node's task drives it (each slot taken when due):
    a link is timed out only after a whole liveness timeout of silence, and by a tick after it."""
    timeout = _WHEEL_LIMITS.liveness_timeout_s
    wheel = LivenessWheel(tick)
    stats = RelayStats()
    now = 0.0
    cores = [SessionCore[None](_WHEEL_LIMITS, stats, now=now, wheel=wheel) for _ in range(4)]
    heard: dict[Link[None], float] = {}  # when each peer was last heard (the links kept alive)
    closed_at: dict[Link[None], float] = {}

    def links() -> list[Link[None]]:
        return [link for core in cores if not core.ended for link in core.slots if link is not None]

    def settle(until: float) -> None:
        nonlocal now
        while wheel.next_at() <= until:
            now = max(now, wheel.next_at())
            for core in wheel.due(now):
                before = [link for link in core.slots if link is not None]
                core.tick(now)
                for link in before:
                    if link.close_code == CloseCode.HEARTBEAT_TIMEOUT:
                        closed_at[link] = now
            check()
        now = until
        check()

    def check() -> None:
        for link in links():  # every live link was heard within a timeout and a tick
            assert now - heard[link] < timeout + tick
        for key, at in closed_at.items():
            assert timeout <= at - heard[key] <= timeout + tick  # never early, at most a tick late
        filed = [core for core in cores if not core.ended and core.liveness_at() != math.inf]
        assert len(wheel) == len(filed)  # each live session filed once, ended ones not at all

    for name, arg, role in ops:
        if name == "sleep":
            settle(now + float(arg))
            continue
        core = cores[int(arg)]
        link = core.peer(role)
        if name == "attach" and not core.ended:
            link = core.attach(role, os.urandom(16), CAPS, now=now, server_nonce=bytes(16), handle=None)
            heard[link] = now
        elif name == "beat" and link is not None:
            core.receive(link, [beat()], now)
            heard[link] = now
        elif name == "lose" and link is not None:
            core.connection_lost(link, now)
        elif name == "end":
            core.end()
        for core in cores:
            core.take_actions()
        check()
    settle(now + timeout + tick)
    assert not links()  # everyone fell silent in the end: all timed out


def test_quiet_after_heartbeats_only_and_data_makes_only_its_sender_active() -> None:
    limits = SessionLimits(heartbeat_s=10, quiet_after_s=15)
    shell = Shell(limits)
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.advance(10)
    shell.receive(host, [beat()])
    shell.receive(guest, [beat()])
    assert not host.is_quiet()
    shell.advance(6)
    shell.receive(host, [beat()])
    shell.receive(guest, [beat()])
    assert host.is_quiet()
    assert guest.is_quiet()
    shell.receive(host, [data(1)])
    assert not host.is_quiet()
    assert (ACTIVE, Role.HOST) in shell.lifecycle
    # the guest only reads: it stays quiet (its answer, if any, is data and wakes the relay)
    assert guest.is_quiet()
    assert (ACTIVE, Role.GUEST) not in shell.lifecycle
    shell.receive(guest, [data(1)])
    assert not guest.is_quiet()
    assert (ACTIVE, Role.GUEST) in shell.lifecycle


def test_close_all_and_shutdown_codes() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    guest = shell.attach(Role.GUEST)
    shell.core.close_all(CloseCode.SERVER_SHUTDOWN, "bye", shell.now, reconnect_in_ms=250, deadline=99.0)
    shell.run_actions()
    for conn in (host, guest):
        assert conn.link.close_code == CloseCode.SERVER_SHUTDOWN
        assert conn.link.close_deadline == 99.0
        assert conn.link.close_body is not None
        assert Close.decode(conn.link.close_body[HEADER_SIZE:]).reconnect_in_ms == 250
    assert not [m for m in decoded(host) + decoded(guest) if isinstance(m, PeerEvent) and m.event == "left"]
    assert (ENDED, None) in shell.lifecycle


def test_a_long_reason_is_clipped_once_for_body_and_frame() -> None:
    shell = Shell()
    host = shell.attach(Role.HOST)
    shell.core.close(host.link, CloseCode.PROTOCOL_ERROR, "é" * 200, shell.now)
    assert len(host.link.close_reason.encode()) <= 123
    assert host.link.close_reason == "é" * 61
    assert host.link.close_body is not None
    assert Close.decode(host.link.close_body[HEADER_SIZE:]).reason == host.link.close_reason


# ------------------------------------------------------------------- random interleavings


_roles = st.sampled_from([Role.HOST, Role.GUEST])
_ops = st.one_of(
    st.tuples(st.just("attach"), _roles),
    st.tuples(st.just("send"), _roles, st.integers(1, 6), st.integers(0, 900)),
    st.tuples(st.just("beat"), _roles),
    st.tuples(st.just("stall"), _roles),
    st.tuples(st.just("unstall"), _roles),
    st.tuples(st.just("retry"), _roles),
    st.tuples(st.just("lose"), _roles),
    st.tuples(st.just("bad"), _roles),
    st.tuples(st.just("peer_close"), _roles),
    st.tuples(st.just("time"), st.floats(0.01, 40)),
    st.tuples(st.just("shutdown")),
)


@dataclass
class Model:
    """What the test knows about causes, to check every close code against."""

    seq: dict[Role, int] = field(default_factory=lambda: {Role.HOST: 0, Role.GUEST: 0})
    # frames the core took for forwarding, per receiving link, in order
    accepted: dict[int, list[bytes]] = field(default_factory=dict)
    last_in: dict[int, float] = field(default_factory=dict)
    bad_sent: set[int] = field(default_factory=set)
    peer_closed: bool = False
    shutdown: bool = False
    replaced: set[int] = field(default_factory=set)
    last_attach: float = 0.0


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(_ops, max_size=60), rate=st.sampled_from([0, 2000]))
def test_random_interleavings_keep_every_rule(ops: list[tuple[object, ...]], rate: int) -> None:
    limits = SessionLimits(heartbeat_s=10, resume_grace_s=20, pair_timeout_s=50.0, queue_max_frames=8,
                           queue_max_bytes=4096, max_bytes_per_s=rate, quiet_after_s=15)  # fmt: skip
    shell = Shell(limits)
    core = shell.core
    model = Model()
    max_batch_frames, max_batch_bytes = 6, 6 * (900 + HEADER_SIZE)
    paired_at: float | None = None

    def closed_at(conn: Conn) -> float:
        for (kind, _), t, link in zip(shell.lifecycle, shell.times, shell.links, strict=True):
            if kind == CLOSED and link is conn.link:
                return t
        raise AssertionError("no CLOSED action")

    def live(role: Role) -> Conn | None:
        link = core.peer(role)
        return None if link is None else link.handle

    def note_receive(conn: Conn, batch: list[bytes], flags: int) -> None:
        if flags & HOLD:
            return
        model.last_in[id(conn.link)] = shell.now
        partner = core.slots[conn.link.other]
        if partner is not None and not conn.link.closing:
            relayed = [m for m in batch if m[1] == Kind.DATA]
            model.accepted.setdefault(id(partner), []).extend(relayed)

    for op in ops:
        name = op[0]
        closing_before = {id(c.link): c.link.closing for c in shell.conns}
        if name == "attach" and not core.ended:
            role = op[1]
            assert isinstance(role, Role)
            old = live(role)
            conn = shell.attach(role)
            model.last_in[id(conn.link)] = shell.now
            model.last_attach = shell.now
            if old is not None:
                model.replaced.add(id(old.link))
        elif name in ("send", "beat", "bad", "peer_close"):
            sender = live(op[1])  # type: ignore[arg-type]
            if sender is None or sender.held is not None:
                continue
            conn = sender
            if name == "send":
                count, size = op[2], op[3]
                assert isinstance(count, int)
                assert isinstance(size, int)
                batch = []
                for _ in range(count):
                    model.seq[conn.role] += 1
                    batch.append(data(model.seq[conn.role], size))
            elif name == "beat":
                batch = [beat()]
            elif name == "bad":
                batch = [encode_frame(Kind.WELCOME, b"\xa0")]
                model.bad_sent.add(id(conn.link))
            else:
                batch = [Close(CloseCode.NORMAL, "bye").to_message()]
                model.peer_closed = True
            note_receive(conn, batch, shell.receive(conn, batch))
        elif name == "retry":
            waiting = live(op[1])  # type: ignore[arg-type]
            if waiting is not None and waiting.held is not None:
                batch = waiting.held
                note_receive(waiting, batch, shell.retry(waiting))
        elif name == "stall":
            shell.stalled.add(op[1])  # type: ignore[arg-type]
        elif name == "unstall":
            shell.unstall(op[1])  # type: ignore[arg-type]
        elif name == "lose":
            lost = live(op[1])  # type: ignore[arg-type]
            if lost is not None:
                core.connection_lost(lost.link, shell.now)
                shell.run_actions()
        elif name == "time":
            dt = op[1]
            assert isinstance(dt, float)
            shell.advance(dt)
        elif name == "shutdown":
            model.shutdown = True
            core.close_all(CloseCode.SERVER_SHUTDOWN, "bye", shell.now, reconnect_in_ms=0)
            shell.run_actions()

        # -- after every step
        if core.connected == 2 and paired_at is None:
            paired_at = shell.now
        for conn in shell.conns:
            link = conn.link
            key = id(link)
            # no queue beyond its bound (a batch is admitted while below both bounds)
            assert link.q_frames < limits.queue_max_frames + max_batch_frames
            assert link.q_bytes < limits.queue_max_bytes + max_batch_bytes
            assert link.q_frames >= 0
            assert link.q_bytes >= 0
            # a slot holds only a link that is not closing
            if core.slots[link.index] is link:
                assert not link.closing
            if link.closing and not closing_before.get(key, False):
                # every close code only from its cause
                code = link.close_code
                if code is None:
                    assert name == "lose"
                elif code == CloseCode.REPLACED:
                    assert key in model.replaced
                elif code == CloseCode.PROTOCOL_ERROR:
                    assert key in model.bad_sent
                elif code == CloseCode.NORMAL:
                    assert model.peer_closed
                elif code == CloseCode.SERVER_SHUTDOWN:
                    assert model.shutdown
                elif code == CloseCode.HEARTBEAT_TIMEOUT:
                    assert name == "time"
                    assert closed_at(conn) - model.last_in[key] >= limits.liveness_timeout_s
                elif code == CloseCode.PAIR_TIMEOUT:
                    assert name == "time"
                    assert paired_at is None
                    assert closed_at(conn) - model.last_attach >= limits.pair_timeout_s
                elif code == CloseCode.PEER_GONE:
                    assert name == "time"
                    assert paired_at is not None
                    lefts = [t for (k, _), t in zip(shell.lifecycle, shell.times, strict=True) if k == LEFT]
                    assert lefts
                    assert closed_at(conn) - lefts[-1] >= limits.resume_grace_s
                else:  # pragma: no cover - a code with no cause in this model
                    raise AssertionError(f"unexpected close code {code}")
            # no frame lost while both are connected: what the peer got is what was accepted
            # for it, in order; once its socket is writable and the queue written, all of it
            got = [m for m in conn.got if m[1] == Kind.DATA]
            accepted = model.accepted.get(key, [])
            assert got == accepted[: len(got)]
            if not link.closing and conn.role not in shell.stalled:
                assert got == accepted
    # the counters add up
    assert shell.stats.messages_forwarded == sum(len(v) for v in model.accepted.values())
    for conn in shell.conns:
        if conn.link.closing and conn.link.close_code is not None:
            assert (CLOSED, conn.role) in shell.lifecycle
            assert conn.close_began
