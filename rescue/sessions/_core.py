"""The relay session as one sans-I/O state machine: messages and time in, actions out.

:class:`SessionCore` decides everything a relay session decides (SPEC §2 "Relay behaviour"): the two
role slots and the HELLO nonces, pairing and resume-grace deadlines, PEER events, takeover
(``REPLACED``), the per-direction queues (frames and bytes), throttling, liveness, and every close
and its code. It imports no trio, touches no socket and reads no clock: every call takes ``now``.
The trio shell (:mod:`rescue.sessions._session`, :mod:`rescue.sessions._link`) feeds it what the
sockets did and carries out what it asks for.

One connection is a :class:`Link` (made by :meth:`SessionCore.attach`). Driving it::

    wheel = LivenessWheel()                    # one per node: every session's liveness deadline
    core = SessionCore(limits, stats, now=now, wheel=wheel)
    link = core.attach(Role.HOST, nonce, caps, now=now, server_nonce=os.urandom(16), handle=shell)
    run(core.take_actions())                  # WELCOME queued for link: WRITE, ...
    flags = core.receive(link, batch, now)     # one read's messages, from the poller or the reader
    if flags & HOLD: ...wait for RESUME, then receive the same batch again
    if flags & WRITE_PARTNER: write core.take_output(partner) ... core.sent(partner, now)
    core.tick(now) when now >= core.next_deadline(), or when wheel.due(now) names the core

Events in: :meth:`~SessionCore.attach`, :meth:`~SessionCore.receive`, :meth:`~SessionCore.sent` (a
taken batch is written: the link is writable again), :meth:`~SessionCore.close` (a close decided
outside: shutdown, drain, a framing error), :meth:`~SessionCore.connection_lost` (the socket died),
:meth:`~SessionCore.tick`. Out: an ``int`` of flags from the two hot calls (``receive``, ``sent``), so
forwarding a batch allocates nothing, and ``(kind, link)`` actions for the rest
(:meth:`~SessionCore.take_actions`): write, close, resume a held reader, quiet/active, and the
session's lifecycle (paired, joined, rejoined, replaced, left, closed, ended) -- the one place a
log line, a metric or a tracing span event hooks in.

Invariant: a role slot holds only a link that is not closing. A link leaves its slot the moment a
close is decided, so the partner hears ``left`` at once and a reconnecting peer takes the role
without waiting for the old socket's closing handshake.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

from rescue._codes import CloseCode, clip_close_reason
from rescue.errors import ProtocolError
from rescue.protocol import (
    HEADER_SIZE,
    Caps,
    Close,
    Kind,
    PeerEvent,
    PeerInfo,
    Role,
    Welcome,
    decode_header,
    encode_frame,
)
from rescue.sessions._config import LIVENESS_SLACK_S, MAX_PRIORITY_FRAMES, MAX_RECENT_NONCES, SessionLimits
from rescue.sessions._limits import TokenBucket
from rescue.sessions._stats import RelayStats

__all__ = [
    "ACTIONS",
    "ACTIVE",
    "CLOSE",
    "CLOSED",
    "ECHO_NOW",
    "ENDED",
    "HOLD",
    "JOINED",
    "LEFT",
    "PAIRED",
    "PEER_CLOSED",
    "QUIET",
    "REARM",
    "REJOINED",
    "RELAY_HEARTBEAT",
    "REPLACED",
    "RESUME",
    "WRITE",
    "WRITE_NOW",
    "WRITE_PARTNER",
    "WRITE_SELF",
    "Link",
    "LivenessWheel",
    "SessionCore",
    "websocket_close_code",
]

H = TypeVar("H")

# What the relay sends a sender it is holding back: a HEARTBEAT whose seq 0 no peer ever uses.
RELAY_HEARTBEAT: Final = encode_frame(Kind.HEARTBEAT, seq=0)

# Flags returned by receive() and sent(): what the shell must do now.
WRITE_SELF: Final = 1  # the link's own output has something (a heartbeat echo)
WRITE_PARTNER: Final = 2  # the partner's output has something (the partner now in the slot: one
# that closed during the call got a CLOSE action instead, and its writer flushes what it must)
HOLD: Final = 4  # nothing was taken: wait for RESUME, then hand the same batch in again
ACTIONS: Final = 8  # take_actions() has something
# The partner's output was idle, so the batch handed in *is* its next write, already taken (as if
# by take_output): write that very list to the partner, then call sent(). The light-load case,
# with no queue traffic at all (decision 0006).
WRITE_NOW: Final = 16
# The same for a lone heartbeat's echo: the batch handed in is the link's own next write.
ECHO_NOW: Final = 32

# Action kinds, as (kind, link) from take_actions(). Mechanics first:
WRITE: Final = 1  # the link's output has something: write it (take_output ... sent)
CLOSE: Final = 2  # the link is closing: stop reading, finish writing, send link.close_body, close
RESUME: Final = 3  # a held link may hand its batch in again
QUIET: Final = 4  # only heartbeats from the link lately: its transport may look at it less often
ACTIVE: Final = 5  # data flows (or is about to): look at the link at once again
REARM: Final = 6  # (link: None) next_deadline() moved earlier: re-arm the timer with it
# ... then the session's lifecycle (log lines, metrics, tracing span events hook in here):
PAIRED: Final = 10  # both roles connected for the first time (the relay reports an activation)
JOINED: Final = 11  # the link's role is here for the first time (its partner got PEER joined)
REJOINED: Final = 12  # the link's role came back on a new connection (PEER rejoined, or alone)
REPLACED: Final = 13  # the link was replaced by a newer connection of its role
LEFT: Final = 14  # the link left and its partner stays (PEER left; the resume grace runs)
CLOSED: Final = 15  # the link closes with link.close_code (None: its transport died)
PEER_CLOSED: Final = 16  # the link's peer sent CLOSE: the session ends for both
ENDED: Final = 17  # the last link left (link: None): the session takes no more connections

_HEARTBEAT: Final = int(Kind.HEARTBEAT)
_CLOSE_KIND: Final = int(Kind.CLOSE)
_HELLO: Final = int(Kind.HELLO)
# Fast-path test on the raw header bytes: version 1, kind CONTROL (0) or DATA (1), no reserved
# flag bits. The rest of the header is authenticated end to end (it is the AEAD's AAD).
_VERSION: Final = 1
_MAX_RELAYED_KIND: Final = 1
_RESERVED_FLAGS: Final = 0xFC
# Close codes a WebSocket close frame may carry (RFC 6455 §7.4): a peer's CLOSE body may name others.
_SENDABLE_WS_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def websocket_close_code(code: int) -> int:
    """``code`` if a close frame may carry it, else 1000."""
    return code if code in _SENDABLE_WS_CODES or 3000 <= code <= 4999 else 1000


def _all_relayed(batch: list[bytes]) -> bool:
    """Whether every message is CONTROL/DATA with a well-formed fixed header (forwarded as is)."""
    for message in batch:
        if (
            len(message) < HEADER_SIZE
            or message[1] > _MAX_RELAYED_KIND
            or message[0] != _VERSION
            or message[2] & _RESERVED_FLAGS
        ):
            return False
    return True


def _is_lone_heartbeat(message: bytes) -> bool:
    """A HEARTBEAT as peers send it: version 1, no flags, channel 0, empty body (echoed as is)."""
    return (
        len(message) == HEADER_SIZE
        and message[1] == _HEARTBEAT
        and message[0] == _VERSION
        and not message[2]
        and not message[3]
    )


class Link(Generic[H]):
    """One peer connection as the session core sees it (made by :meth:`SessionCore.attach`).

    The shell reads the attributes; only the core changes them.

    Attributes:
        role: the peer's role; ``index`` is 0 for host, 1 for guest (``other`` the partner's).
        nonce: the peer's HELLO nonce; ``caps`` its capabilities; ``info`` both with the role.
        handle: whatever the shell attached it with (its connection object).
        closing: a close was decided (or the transport died); the link holds no role any more.
        close_code: the code it closes with (``None``: the transport died, nothing to send).
        close_reason: the close frame's reason (clipped); ``ws_code`` the close frame's code.
        close_body: the CLOSE message to send before the close frame, if any.
        flush: deliver everything queued before closing (a forwarded peer CLOSE).
        close_deadline: when the close must be done (the shell aborts the socket past it).
        held: the peer's input waits (partner queue full, or rate limit): its liveness is suspended.
        quiet: only heartbeats from the peer for ``quiet_after_s``.
    """

    __slots__ = (
        "_beat_at",
        "_bucket",
        "_fifo",
        "_fifo_t0",
        "_hold_until",
        "_last_data",
        "_last_in",
        "_live_at",
        "_prio",
        "_taken",
        "_taken_bytes",
        "_taken_frames",
        "_taken_t0",
        "caps",
        "close_body",
        "close_code",
        "close_deadline",
        "close_reason",
        "closing",
        "flush",
        "handle",
        "held",
        "index",
        "info",
        "nonce",
        "other",
        "peak_bytes",
        "peak_frames",
        "q_bytes",
        "q_frames",
        "quiet",
        "role",
        "ws_code",
    )

    def __init__(
        self, role: Role, nonce: bytes, caps: Caps, handle: H, now: float, limits: SessionLimits
    ) -> None:
        self.role = role
        self.index = 0 if role is Role.HOST else 1
        self.other = 1 - self.index
        self.nonce = nonce
        self.caps = caps
        self.info = PeerInfo(role=role, nonce=nonce, caps=caps)
        self.handle = handle
        # outbound: priority list (heartbeat echoes) and the bounded FIFO of batches; q_* count
        # what is queued plus what the shell took and has not finished writing
        self._prio: list[bytes] = []
        # a list, not a deque: batches only go in at the end and all come out at once
        # (take_output), and an empty deque holds a 64-slot block (~600 B per connection)
        self._fifo: list[list[bytes]] = []
        self._fifo_t0 = 0.0
        self.q_frames = self.q_bytes = 0
        self.peak_frames = self.peak_bytes = 0
        self._taken = False  # the shell is writing what take_output() gave
        self._taken_frames = self._taken_bytes = 0
        self._taken_t0 = 0.0
        # input: liveness, quiet, holding back
        self._last_in = self._last_data = now
        self._live_at = now + limits.liveness_timeout_s
        self.quiet = False
        self.held = False
        self._hold_until = 0.0  # rate limit: input waits until then
        self._beat_at = math.inf  # held: next relay HEARTBEAT
        self._bucket = (
            TokenBucket(limits.max_bytes_per_s, limits.burst_bytes or limits.max_bytes_per_s, now=now)
            if limits.max_bytes_per_s
            else None
        )
        # closing
        self.closing = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.ws_code = 1000
        self.close_body: bytes | None = None
        self.flush = False
        self.close_deadline = math.inf

    def __repr__(self) -> str:
        return f"<Link {self.role.value} q={self.q_frames}/{self.q_bytes} closing={self.closing}>"

    def statistics(self) -> dict[str, int | bool]:
        """A snapshot of the outbound queue (for ``/debug/stats``)."""
        return {
            "queued_frames": self.q_frames,
            "queued_bytes": self.q_bytes,
            "peak_queued_frames": self.peak_frames,
            "peak_queued_bytes": self.peak_bytes,
            "priority_frames": len(self._prio),
            "closing": self.closing,
            "held": self.held,
            "quiet": self.quiet,
        }


_NOT_FILED: Final = -1


class LivenessWheel:
    """Every session's liveness deadline of one node, filed on one grid of ``tick_s`` (decision 0025).

    A live peer's message only moves its link's ``_live_at`` (a float store in compiled code):
    no timer of the session moves. One task per node sleeps until the earliest slot in use and
    takes it with :meth:`due`: a core whose deadline moved later meanwhile is filed again (in
    compiled code, once or twice per liveness timeout per session), one whose peer really fell
    silent is handed back for :meth:`SessionCore.tick`. Moving a trio deadline instead (one
    interpreted ``CancelScope.deadline`` store and a heap entry in trio's run loop, every third
    heartbeat per link) was a fifth of an idle node's busy time.

    A core is filed in at most one slot (``core._wheel_slot``): the slot of its earliest
    liveness deadline, rounded *up* to the grid, so a timeout is never early and at most
    ``tick_s`` late.

    Attributes:
        tick_s: the grid (the most a liveness timeout is late).
        wake: called with the new :meth:`next_at` when a filing made it earlier (the task's
            sleep must end sooner); set by whoever runs the wheel.
        refiled: cores filed again from a due slot (their peers were heard meanwhile).
        fired: cores handed back by :meth:`due` (a deadline passed).
    """

    __slots__ = ("_heap", "_slots", "fired", "refiled", "tick_s", "wake")

    def __init__(self, tick_s: float = LIVENESS_SLACK_S) -> None:
        if not 0 < tick_s <= 60:  # (NaN fails too)
            raise ValueError("tick_s must be above 0 and at most 60")
        self.tick_s = float(tick_s)
        # slot -> the cores filed there (a dict: an ended session leaves its slot at once)
        self._slots: dict[int, dict[SessionCore[Any], None]] = {}
        self._heap: list[int] = []  # the slots in use (a slot left empty stays until it is due)
        self.wake: Callable[[float], None] | None = None
        self.refiled = 0
        self.fired = 0

    def __len__(self) -> int:
        """How many cores are filed."""
        return sum(len(cores) for cores in self._slots.values())

    def next_at(self) -> float:
        """When the earliest slot in use is due (``inf``: none)."""
        heap = self._heap
        return heap[0] * self.tick_s if heap else math.inf

    def file(self, core: SessionCore[Any], at: float) -> None:
        """File ``core`` for a liveness deadline at ``at``, unless it is filed for no later already."""
        slot = math.ceil(at / self.tick_s)
        old = core._wheel_slot
        if old != _NOT_FILED:
            if old <= slot:
                return  # looked at no later than needed; due() files it again from there
            del self._slots[old][core]
        core._wheel_slot = slot
        cores = self._slots.get(slot)
        if cores is not None:
            cores[core] = None
            return
        self._slots[slot] = {core: None}
        heapq.heappush(self._heap, slot)
        if self._heap[0] == slot and self.wake is not None:
            self.wake(slot * self.tick_s)

    def discard(self, core: SessionCore[Any]) -> None:
        """``core`` needs no liveness checks any more (its session ended)."""
        old = core._wheel_slot
        if old != _NOT_FILED:
            core._wheel_slot = _NOT_FILED
            del self._slots[old][core]

    def due(self, now: float) -> list[SessionCore[Any]]:
        """Take every slot due by ``now``: the cores whose liveness deadline passed, in filing order.

        The caller ticks each (``core.tick(now)``, which closes a silent link or files the core
        again) and carries out its actions.
        """
        out: list[SessionCore[Any]] = []
        heap = self._heap
        tick = self.tick_s
        while heap and heap[0] * tick <= now:
            for core in self._slots.pop(heapq.heappop(heap)):
                core._wheel_slot = _NOT_FILED
                at = core.liveness_at()
                if at <= now:
                    out.append(core)
                elif at != math.inf:
                    self.refiled += 1
                    self.file(core, at)  # a slot after now: not taken by this loop
        self.fired += len(out)
        return out


class SessionCore(Generic[H]):
    """One relay session's decisions, without I/O (see the module docstring).

    Args:
        limits: the node's session limits.
        stats: the node's counters (plain integers, updated here).
        now: the time the session is created (the pairing deadline starts).
        wheel: the node's liveness wheel: the links' liveness deadlines are filed there, not in
            :meth:`next_deadline`.

    Attributes:
        shell: whatever carries out this core's actions (the trio session): the wheel's task
            hands a due core back to it.
    """

    __slots__ = (
        "_actions",
        "_armed",
        "_ending",
        "_liveness_s",
        "_max_bytes",
        "_max_frames",
        "_nonces",
        "_quiet_after_s",
        "_seen",
        "_timer",
        "_wheel",
        "_wheel_slot",
        "ended",
        "limits",
        "paired",
        "shell",
        "slots",
        "stats",
    )

    def __init__(self, limits: SessionLimits, stats: RelayStats, *, now: float, wheel: LivenessWheel) -> None:
        self.limits = limits
        self.stats = stats
        self._max_frames = limits.queue_max_frames
        self._max_bytes = limits.queue_max_bytes
        # read on every message (limits is an interpreted dataclass: a generic lookup each, 0022)
        self._liveness_s = float(limits.liveness_timeout_s)
        self._quiet_after_s = float(limits.quiet_after_s)
        # the role slots, by Link.index (host, guest); read-only for the shell
        self.slots: list[Link[H] | None] = [None, None]
        self._seen = [False, False]
        self._nonces: list[bytes] = []  # the last MAX_RECENT_NONCES (a list: a deque is ~600 B)
        self.paired = False
        self._ending = False  # a peer sent CLOSE (or close_all): no PEER left, no grace
        self.ended = False  # the last link left: no new connections
        self._timer = now + limits.pair_timeout_s  # PAIR_TIMEOUT or PEER_GONE, when finite
        self._armed = math.inf  # the deadline last handed out by next_deadline()
        self._actions: list[tuple[int, Link[H] | None]] = []
        self._wheel = wheel
        self._wheel_slot = _NOT_FILED
        self.shell: Any = None

    # ------------------------------------------------------------------------------------ queries

    @property
    def connected(self) -> int:
        """How many roles hold a link (0-2)."""
        return (self.slots[0] is not None) + (self.slots[1] is not None)

    def peer(self, role: Role) -> Link[H] | None:
        """The link holding ``role``, if any."""
        return self.slots[0 if role is Role.HOST else 1]

    def timer_deadline(self) -> float:
        """The pairing or resume-grace deadline (``inf`` when none runs)."""
        return self._timer

    def next_deadline(self) -> float:
        """When :meth:`tick` has something to do at the latest (``inf``: nothing scheduled).

        The pairing or resume-grace deadline and a held link's relay heartbeat or end of its
        rate wait; liveness deadlines are on the node's wheel (:meth:`liveness_at`). The shell
        arms its timer with it; a later call that moves it earlier asks for re-arming with the
        ``ACTIONS`` flag (a ``REARM`` action).
        """
        deadline = self._timer
        for link in self.slots:
            if link is None or not link.held:
                continue
            at = link._hold_until if link._hold_until else link._beat_at
            if at < deadline:
                deadline = at
        self._armed = deadline
        return deadline

    def liveness_at(self) -> float:
        """The earliest liveness deadline of a link: its last message plus the liveness timeout
        (``inf``: no link, or only held ones, whose liveness is suspended)."""
        deadline = math.inf
        for link in self.slots:
            if link is not None and link._live_at < deadline:
                deadline = link._live_at
        return deadline

    def take_actions(self) -> list[tuple[int, Link[H] | None]]:
        """Everything decided since the last call, in order (``(kind, link)``)."""
        actions, self._actions = self._actions, []
        return actions

    # ----------------------------------------------------------------------------------- attach

    def attach(
        self, role: Role, nonce: bytes, caps: Caps, *, now: float, server_nonce: bytes, handle: H
    ) -> Link[H]:
        """A verified HELLO for ``role``: the new link takes the role (WELCOME to it, PEER to its partner).

        A live link of the same role is closed with ``REPLACED``.

        Raises:
            ProtocolError: the nonce was already used in this session (a replayed HELLO).
            RuntimeError: the session has ended (make a new one).
        """
        if self.ended:
            raise RuntimeError("session has ended")
        if nonce in self._nonces:
            raise ProtocolError("HELLO replay: this nonce was already used in this session")
        if len(self._nonces) >= MAX_RECENT_NONCES:
            del self._nonces[0]
        self._nonces.append(nonce)
        link: Link[H] = Link(role, nonce, caps, handle, now, self.limits)
        index = link.index
        old = self.slots[index]
        returning = self._seen[index]
        self.slots[index] = link  # first, so closing the old link frees nothing
        self._seen[index] = True
        if old is not None:
            self.stats.rejoins["replaced"] += 1
            self._actions.append((REPLACED, old))
            self.close(old, CloseCode.REPLACED, "a newer connection took this role", now)
        elif returning:
            self.stats.rejoins["returned"] += 1
        partner = self.slots[link.other]
        welcome = Welcome(
            ack_nonce=nonce,
            server_nonce=server_nonce,
            heartbeat_s=self.limits.heartbeat_s,
            max_frame=self.limits.max_frame,
            resume_grace_s=self.limits.resume_grace_s,
            peer=None if partner is None else partner.info,
        ).to_message()
        self._push_ordered(link, welcome, now)
        self._actions.append((REJOINED if returning else JOINED, link))
        if partner is not None:
            self._push_ordered(
                partner, PeerEvent("rejoined" if returning else "joined", role, nonce, caps).to_message(), now
            )
            self._timer = math.inf
            if partner.held:  # held for the old link's room, or its own rate: look again
                self._actions.append((RESUME, partner))
            if not self.paired:
                self.paired = True
                self.stats.pairings += 1
                self._actions.append((PAIRED, link))
        elif not self.paired:
            self._set_timer(now + self.limits.pair_timeout_s)
        self._wheel.file(self, link._live_at)
        return link

    # ---------------------------------------------------------------------------------- receive

    def receive(self, link: Link[H], batch: list[bytes], now: float) -> int:
        """One read's messages from ``link``'s peer, all or nothing.

        Returns:
            Flags. ``HOLD``: nothing was taken (the partner's queue is full, or the link is over
            its rate); wait for a ``RESUME`` action for the link (or its close) and hand the same
            batch in again. Else the whole batch is handled: ``WRITE_NOW`` (forwarded, and it is
            the partner's next write: write ``batch`` itself), ``WRITE_PARTNER`` (forwarded),
            ``WRITE_SELF`` (a heartbeat echo), ``ECHO_NOW`` (the echo is ``batch`` itself: write
            it to the link), ``ACTIONS`` (see :meth:`take_actions`).
        """
        if link.closing:
            return 0
        partner = self.slots[link.other]
        if (
            partner is not None
            and (partner.q_frames >= self._max_frames or partner.q_bytes >= self._max_bytes)
        ) or link._hold_until > now:
            return self._hold(link, now)
        if link.held:
            self._unhold(link, now)
        # liveness: only this store; the wheel files the core again when the slot it was filed
        # in comes (decision 0025), or hands it back for tick() if the peer fell silent
        link._last_in = now
        link._live_at = now + self._liveness_s
        if _all_relayed(batch):
            # the common case: every message is CONTROL/DATA, forward the list as it is
            flags = self._forward(link, partner, batch, now, direct=True)
        elif len(batch) == 1 and _is_lone_heartbeat(batch[0]):
            # the next most common: a lone HEARTBEAT (version 1, no flags, channel 0, empty body)
            flags = self._echo(link, batch[0], now, direct=True)
        else:
            flags = self._receive_mixed(link, partner, batch, now)
        return (flags | ACTIONS) if self._actions else flags

    def _receive_mixed(self, link: Link[H], partner: Link[H] | None, batch: list[bytes], now: float) -> int:
        """Anything else: runs of relayed messages, heartbeats, a CLOSE, bad input; in order."""
        flags = 0
        run: list[bytes] = []
        try:
            for message in batch:
                if (
                    len(message) >= HEADER_SIZE
                    and message[1] <= _MAX_RELAYED_KIND
                    and message[0] == _VERSION
                    and not message[2] & _RESERVED_FLAGS
                ):
                    run.append(message)
                    continue
                kind = message[1] if len(message) > 1 else -1
                if kind == _HEARTBEAT and len(message) == HEADER_SIZE:
                    decode_header(message)  # validates the rest of the header
                    flags |= self._echo(link, message, now)
                    continue
                if run:
                    flags |= self._forward(link, partner, run, now)
                    run = []
                if kind == _CLOSE_KIND:
                    decode_header(message)
                    close = Close.decode(message[HEADER_SIZE:])
                    self._peer_close(link, message, int(close.code), close.reason, now)
                    return flags
                header = decode_header(message)  # raises ProtocolError for garbage and unknown kinds
                if header.kind is Kind.HEARTBEAT:
                    raise ProtocolError("HEARTBEAT has an empty body")
                if kind == _HELLO:
                    raise ProtocolError("second HELLO on a live connection")
                raise ProtocolError(f"{header.kind.name} is sent by the relay, never by a peer")
        except ProtocolError as exc:
            if run:  # everything before the bad message goes on
                flags |= self._forward(link, partner, run, now)
            self.stats.count_protocol_error(exc.kind)
            self.close(link, exc.code, str(exc), now)
            return flags
        if run:
            flags |= self._forward(link, partner, run, now)
        return flags

    def _forward(
        self,
        link: Link[H],
        partner: Link[H] | None,
        messages: list[bytes],
        now: float,
        *,
        direct: bool = False,
    ) -> int:
        """Hand a run of relayed messages to the partner's queue (ownership passes), or discard it.

        With ``direct`` (``messages`` is the whole batch handed in) and the partner's output idle,
        the batch becomes the partner's write in progress at once (``WRITE_NOW``).
        """
        stats = self.stats
        link._last_data = now
        if link.quiet:
            # The first message after a quiet spell (it woke the poller at once: decision 0015).
            # Only the sender: a quiet partner's answer wakes the poller at once just the same,
            # and a partner that only reads (a viewer) stays quiet instead of waking the relay
            # with a heartbeat after every burst it is sent.
            link.quiet = False
            self._actions.append((ACTIVE, link))
        if partner is None:
            stats.frames_discarded += len(messages)
            return 0
        count = len(messages)
        size = 0
        for message in messages:  # (compiled: a loop, where sum(map(len, ...)) is two generic calls)
            size += len(message)
        if direct and not partner._taken and not partner._fifo and not partner._prio:
            partner._taken = True
            partner._taken_frames = count
            partner._taken_bytes = size
            partner._taken_t0 = now
            flags = WRITE_NOW
        else:
            if not partner._fifo:
                partner._fifo_t0 = now
            partner._fifo.append(messages)
            flags = WRITE_PARTNER
        frames = partner.q_frames = partner.q_frames + count
        total = partner.q_bytes = partner.q_bytes + size
        if total > partner.peak_bytes:
            partner.peak_bytes = total
        if frames > partner.peak_frames:
            partner.peak_frames = frames
        stats.messages_forwarded += count
        stats.bytes_forwarded += size
        stats.message_sizes.observe(size / count, count)
        bucket = link._bucket
        if bucket is not None:
            delay = bucket.consume(size, now)
            if delay > 0:
                # over the rate: the next batch waits (TCP pushes back on the sender meanwhile)
                stats.throttle_waits += 1
                link._hold_until = now + delay
        return flags

    def _echo(self, link: Link[H], heartbeat: bytes, now: float, *, direct: bool = False) -> int:
        """Echo a HEARTBEAT (the very same bytes) ahead of data.

        With ``direct`` (the batch handed in is this one heartbeat) and the link's output idle,
        the batch itself becomes the link's write in progress (``ECHO_NOW``).
        """
        flags = 0
        if direct and not link._taken and not link._fifo and not link._prio:
            link._taken = True  # (no frames: an echo is not counted against the queue bounds)
            self.stats.heartbeats_echoed += 1
            flags = ECHO_NOW
        elif len(link._prio) < MAX_PRIORITY_FRAMES:
            link._prio.append(heartbeat)
            self.stats.heartbeats_echoed += 1
            flags = WRITE_SELF
        else:
            self.stats.heartbeats_dropped += 1
        quiet_after = self._quiet_after_s
        if quiet_after and not link.quiet and now - link._last_data >= quiet_after:
            link.quiet = True
            self._actions.append((QUIET, link))
        return flags

    def _peer_close(self, link: Link[H], message: bytes, code: int, reason: str, now: float) -> None:
        """A peer sent CLOSE: it ends the session for both (SPEC §2)."""
        self._ending = True
        self._actions.append((PEER_CLOSED, link))
        partner = self.slots[link.other]
        if partner is not None:
            self._push_ordered(partner, message, now)  # byte for byte, after everything before it
            self.close(partner, code, reason, now, send_body=False, flush=True)
        self.close(link, code, reason, now, send_body=False)

    # ------------------------------------------------------------------------------ holding back

    def _hold(self, link: Link[H], now: float) -> int:
        """The batch waits: the partner's queue is full, or the link is over its rate."""
        link.held = True
        link._live_at = math.inf  # the stall is not the peer's fault: liveness is suspended
        if link._hold_until > now:
            link._beat_at = math.inf  # a rate wait is short: it ends at _hold_until
            self._check_armed(link._hold_until)
        elif link._beat_at == math.inf:
            # backpressure: the relay sends the held peer a HEARTBEAT (seq 0) every heartbeat_s so
            # it does not take the relay for dead
            link._hold_until = 0.0
            self.stats.backpressure_stalls += 1
            link._beat_at = now + self.limits.heartbeat_s
            self._check_armed(link._beat_at)
        return (HOLD | ACTIONS) if self._actions else HOLD

    def _unhold(self, link: Link[H], now: float) -> None:
        """The hold is over: the peer gets a full liveness timeout from now."""
        link.held = False
        link._beat_at = math.inf
        link._hold_until = 0.0
        link._last_in = now
        link._live_at = now + self._liveness_s
        self._wheel.file(self, link._live_at)

    # ----------------------------------------------------------------------------------- output

    def _push_ordered(self, link: Link[H], message: bytes, now: float) -> None:
        """Queue a relay message that must stay in order with data (WELCOME, PEER, a peer's CLOSE)."""
        if not link._fifo:
            link._fifo_t0 = now
        link._fifo.append([message])
        link.q_frames += 1
        link.q_bytes += len(message)
        self._actions.append((WRITE, link))

    def take_output(self, link: Link[H]) -> list[bytes] | None:
        """Everything queued for ``link``, to write as one batch (``None``: nothing to write).

        What is taken still counts against the queue bounds until :meth:`sent`. The shell takes
        again only after :meth:`sent` (one writer per link). A closing link without ``flush``
        gives nothing more.
        """
        if link._taken or (link.closing and not link.flush):
            return None
        prio = link._prio
        fifo = link._fifo
        if prio:
            link._prio = []
            messages = prio
            for batch in fifo:
                messages += batch
        elif not fifo:
            return None
        elif len(fifo) == 1:
            messages = fifo[0]  # the usual case: the very list the sender's read produced
        else:
            messages = []
            for batch in fifo:
                messages += batch
        fifo.clear()
        link._taken = True
        link._taken_frames = link.q_frames
        link._taken_bytes = link.q_bytes
        link._taken_t0 = link._fifo_t0
        return messages

    def sent(self, link: Link[H], now: float) -> int:
        """What :meth:`take_output` gave is written: it leaves the queue; the sender may go on.

        Returns:
            Flags: ``ACTIONS`` when a held partner may resume (or the link has more to write).
        """
        frames = link._taken_frames
        link._taken = False
        link._taken_frames = 0
        taken_bytes = link._taken_bytes
        link._taken_bytes = 0
        if frames:
            # queued bytes count until written: memory stays within the bound
            link.q_frames -= frames
            link.q_bytes -= taken_bytes
            delay = now - link._taken_t0
            if delay > 0:
                self.stats.forward_latency.observe(delay)
            else:
                self.stats.forward_latency.observe_first()  # written at once (same now): latency 0
            sender = self.slots[link.other]
            if (
                sender is not None
                and sender.held
                and link.q_frames < self._max_frames
                and link.q_bytes < self._max_bytes
            ):
                self._actions.append((RESUME, sender))
        if link._prio or link._fifo:
            self._actions.append((WRITE, link))
        return ACTIONS if self._actions else 0

    # ---------------------------------------------------------------------------------- closing

    def close(
        self,
        link: Link[H],
        code: int,
        reason: str,
        now: float,
        *,
        send_body: bool = True,
        reconnect_in_ms: int | None = None,
        flush: bool = False,
        deadline: float | None = None,
    ) -> None:
        """Close ``link`` with ``code`` (idempotent: the first decision wins).

        Args:
            link: the link.
            code: the close code (CLOSE body and WebSocket close frame).
            reason: human-readable text (clipped, see :func:`clip_close_reason`).
            now: the current time.
            send_body: send a CLOSE message before the WebSocket close frame.
            reconnect_in_ms: for ``SERVER_SHUTDOWN``: when the client should reconnect.
            flush: deliver everything already queued first (a forwarded peer CLOSE).
            deadline: when the close must be done; default ``now + close_timeout_s``.
        """
        if link.closing:
            return
        reason = clip_close_reason(reason)
        link.close_code = code
        link.close_reason = reason
        link.ws_code = websocket_close_code(code)
        link.close_body = Close(code, reason, reconnect_in_ms).to_message() if send_body else None
        self.stats.count_close(code)
        if code == CloseCode.HEARTBEAT_TIMEOUT:
            self.stats.idle_pruned += 1
        self._begin_close(link, now, flush=flush, deadline=deadline)

    def connection_lost(self, link: Link[H], now: float) -> None:
        """``link``'s transport died (or its shell ended): no close handshake, free its role."""
        if link.closing:
            return
        self.stats.transport_lost += 1
        self._begin_close(link, now, flush=False, deadline=now)

    def end(self) -> None:
        """The shell is gone (cancelled, torn down): the session takes no more connections."""
        self.ended = True
        self._timer = math.inf
        self._wheel.discard(self)

    def close_all(
        self,
        code: int,
        reason: str,
        now: float,
        *,
        reconnect_in_ms: int | None = None,
        deadline: float | None = None,
    ) -> None:
        """Close every link of the session with ``code`` (no PEER ``left`` in between)."""
        self._ending = True
        for link in list(self.slots):
            if link is not None:
                self.close(link, code, reason, now, reconnect_in_ms=reconnect_in_ms, deadline=deadline)

    def _begin_close(self, link: Link[H], now: float, *, flush: bool, deadline: float | None) -> None:
        link.closing = True
        link.flush = flush
        link.held = False
        link.close_deadline = now + self.limits.close_timeout_s if deadline is None else deadline
        if not flush:
            # what the shell has taken is being written; the rest is dropped
            if link.q_frames > link._taken_frames:
                self.stats.frames_discarded += link.q_frames - link._taken_frames
            link._fifo.clear()
            link._prio.clear()
            link.q_frames = link._taken_frames
            link.q_bytes = link._taken_bytes
        self._actions.append((CLOSED, link))
        self._actions.append((CLOSE, link))
        self._release(link, now)

    def _release(self, link: Link[H], now: float) -> None:
        """``link`` started closing: free its role, tell the partner, start the grace timer."""
        if self.slots[link.index] is not link:
            return  # replaced
        self.slots[link.index] = None
        partner = self.slots[link.other]
        if partner is None:
            self.ended = True
            self._timer = math.inf
            self._wheel.discard(self)
            self.stats.sessions_emptied += 1
            self._actions.append((ENDED, None))
            return
        if partner.held:
            self._actions.append((RESUME, partner))  # it waited for room here: it discards now
        if self._ending:
            return
        self._push_ordered(partner, PeerEvent("left", link.role, link.nonce, link.caps).to_message(), now)
        self._actions.append((LEFT, link))
        self._set_timer(now + self.limits.resume_grace_s)

    # ------------------------------------------------------------------------------------ timers

    def _set_timer(self, deadline: float) -> None:
        self._timer = deadline
        self._check_armed(deadline)

    def _check_armed(self, deadline: float) -> None:
        """A deadline was set: ask the shell to re-arm its timer if it is earlier than the armed one."""
        if deadline < self._armed:
            self._armed = deadline
            self._actions.append((REARM, None))

    def tick(self, now: float) -> None:
        """Time passed: fire what is due (timeouts, relay heartbeats, the end of rate waits)."""
        for link in self.slots:
            if link is None:
                continue
            if link.held:
                if link._hold_until:
                    if link._hold_until <= now:  # the rate wait is over
                        link._hold_until = 0.0
                        self._actions.append((RESUME, link))
                elif link._beat_at <= now:
                    link._beat_at = now + self.limits.heartbeat_s
                    if len(link._prio) < MAX_PRIORITY_FRAMES:
                        link._prio.append(RELAY_HEARTBEAT)
                        self.stats.relay_heartbeats += 1
                        self._actions.append((WRITE, link))
            elif link._live_at <= now:
                timeout = self.limits.liveness_timeout_s
                if now - link._last_in >= timeout:
                    self.close(
                        link,
                        CloseCode.HEARTBEAT_TIMEOUT,
                        f"no message for {timeout:g} s (3 x heartbeat_s)",
                        now,
                    )
                else:  # (rounding: the sum said due, the difference not yet) due just after now
                    link._live_at = math.nextafter(now, math.inf)
        if self._timer <= now:
            self._timer = math.inf
            for link in list(self.slots):
                if link is None:
                    continue
                if self.paired:
                    reason = f"partner did not return within {self.limits.resume_grace_s} s"
                    self.close(link, CloseCode.PEER_GONE, reason, now)
                else:
                    reason = f"no partner within {self.limits.pair_timeout_s:g} s"
                    self.close(link, CloseCode.PAIR_TIMEOUT, reason, now)
        if not self.ended:
            at = self.liveness_at()
            if at != math.inf:
                self._wheel.file(self, at)  # (a no-op when filed for no later already)
