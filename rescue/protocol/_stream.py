"""The ordered stream under SPEC §2 "Ordering, acks and lossless resume", as pure state machines.

Nothing here does I/O, reads a clock or encrypts: the client drives these objects from its own
shell, passes time in as ``now`` (seconds, any monotonic origin), and encrypts/decrypts the frames
they name. The rules a Rust or browser implementation must follow are in ``docs/protocol.md``
("Ordering, acks and lossless resume"); this module is the reference implementation of them.

- :class:`Sender` numbers outgoing DATA/CONTROL frames (from 1, across reconnects), keeps every
  unacknowledged frame in a bounded replay buffer, and hands frames out for transmission only while
  the link is live: from :meth:`Sender.pause` (link lost, partner left or rejoined) until the
  partner's ``{"resume": n}`` arrives, new frames are buffered, never transmitted.
- :class:`Receiver` delivers strictly in order, drops retransmits, treats a gap as a protocol error
  (except for the stale tail right after it asked for a resume, see :meth:`Receiver.begin_resume`)
  and schedules the UNSEQUENCED ``{"ack": n}`` messages.
- :class:`UnsequencedCounter` / :class:`UnsequencedFilter` number and filter the UNSEQUENCED CONTROL
  messages (``ack``, ``resume``) per connection key.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Final

from rescue.errors import BufferFull, ProtocolError
from rescue.protocol._frames import MAX_SEQ, Flags, Kind

__all__ = [
    "ACK_EVERY_FRAMES",
    "ACK_INTERVAL_S",
    "DEFAULT_REPLAY_BUFFER_BYTES",
    "FRAME_OVERHEAD_BYTES",
    "BufferFull",
    "Outbound",
    "Receiver",
    "ReceiverStatistics",
    "Sender",
    "SenderStatistics",
    "UnsequencedCounter",
    "UnsequencedFilter",
]

# SPEC §2: "a bounded replay buffer (default 4 MiB)". 4 MiB holds several seconds of a busy terminal
# at typical rates, so a reconnect that takes a few seconds loses nothing, while a peer that stops
# acknowledging can pin at most 4 MiB of memory per direction before the application is blocked.
DEFAULT_REPLAY_BUFFER_BYTES: Final = 4 * 1024 * 1024
# Charged per buffered frame on top of its payload: 12-byte header + 16-byte AEAD tag + our own
# bookkeeping, rounded up. Without it a flood of empty frames would fill memory without ever
# counting against the buffer bound (4 MiB / 64 B = at most 65,536 frames).
FRAME_OVERHEAD_BYTES: Final = 64
# SPEC §2: acknowledge "at least every 64 frames or 1 s of receiving".
ACK_EVERY_FRAMES: Final = 64
ACK_INTERVAL_S: Final = 1.0

_SEQUENCED_KINDS: Final = frozenset({Kind.DATA, Kind.CONTROL})


@dataclass(frozen=True, slots=True)
class Outbound:
    """One sequenced frame in plaintext, as the driver must encrypt and transmit it.

    The same ``seq`` always carries the same kind, channel, flags and payload, however often it is
    retransmitted (only the encryption key changes between connections).
    """

    seq: int
    kind: Kind
    channel: int
    flags: Flags
    payload: bytes

    @property
    def cost(self) -> int:
        """Bytes this frame is charged in the replay buffer."""
        return len(self.payload) + FRAME_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class SenderStatistics:
    """An immutable snapshot of a :class:`Sender` (for ``/debug/stats`` and metrics)."""

    next_seq: int
    acked: int
    highest_transmitted: int
    paused: bool
    buffered_frames: int
    buffered_bytes: int
    max_buffer_bytes: int
    peak_buffered_bytes: int
    retransmitted_frames: int
    resumes: int


@dataclass(frozen=True, slots=True)
class ReceiverStatistics:
    """An immutable snapshot of a :class:`Receiver`."""

    last_delivered: int
    last_acked: int
    delivered_frames: int
    duplicates_dropped: int
    stale_dropped: int
    acks_sent: int
    resyncing: bool


def _check_seq(seq: int, what: str) -> None:
    if not 0 <= seq <= MAX_SEQ:
        raise ProtocolError(f"{what} {seq} is outside 0..2**64-1")


class Sender:
    """Sequence numbers, replay buffer and resume for one direction of a session.

    One instance lives as long as the session (not the connection): ``next_seq`` continues across
    reconnects. It starts paused: nothing is transmitted before the partner's first
    ``{"resume": n}`` (``n`` is 0 on a fresh session), so frames written before the partner
    arrives are buffered and go out with that first resume.

    The driver must transmit the frames it is handed in exactly the order it gets them, under one
    lock (or from one task), encrypted under its current connection key.

    Args:
        max_buffer_bytes: bound on the replay buffer, counting each frame's payload plus
            ``FRAME_OVERHEAD_BYTES``.

    Raises:
        ValueError: ``max_buffer_bytes`` too small to hold even an empty frame.
    """

    def __init__(self, *, max_buffer_bytes: int = DEFAULT_REPLAY_BUFFER_BYTES) -> None:
        if max_buffer_bytes < FRAME_OVERHEAD_BYTES:
            raise ValueError(f"max_buffer_bytes must be at least {FRAME_OVERHEAD_BYTES}")
        self.max_buffer_bytes: Final = max_buffer_bytes
        self._next_seq = 1
        self._acked = 0  # every seq <= this is acknowledged and gone from the buffer
        self._transmitted = 0  # highest seq ever handed out for transmission
        self._paused = True
        self._buffer: collections.deque[Outbound] = collections.deque()
        self._buffered_bytes = 0
        self._peak = 0
        self._retransmitted = 0
        self._resumes = 0

    # -- state -----------------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        """The seq the next :meth:`send` will use."""
        return self._next_seq

    @property
    def acked(self) -> int:
        """Highest seq the partner has acknowledged (0 before any ack)."""
        return self._acked

    @property
    def highest_transmitted(self) -> int:
        """Highest seq ever handed to the driver for transmission (0 before any)."""
        return self._transmitted

    @property
    def paused(self) -> bool:
        """True from :meth:`pause` (and at start) until the next :meth:`resume`."""
        return self._paused

    @property
    def buffered_bytes(self) -> int:
        return self._buffered_bytes

    @property
    def buffered_frames(self) -> int:
        return len(self._buffer)

    @property
    def free_bytes(self) -> int:
        return self.max_buffer_bytes - self._buffered_bytes

    def can_send(self, size: int) -> bool:
        """Whether a payload of ``size`` bytes fits in the replay buffer right now."""
        return size + FRAME_OVERHEAD_BYTES <= self.free_bytes

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(
            next_seq=self._next_seq,
            acked=self._acked,
            highest_transmitted=self._transmitted,
            paused=self._paused,
            buffered_frames=len(self._buffer),
            buffered_bytes=self._buffered_bytes,
            max_buffer_bytes=self.max_buffer_bytes,
            peak_buffered_bytes=self._peak,
            retransmitted_frames=self._retransmitted,
            resumes=self._resumes,
        )

    # -- application side ------------------------------------------------------------------------
    def send(
        self, kind: Kind, payload: bytes, *, channel: int = 0, flags: Flags = Flags.NONE
    ) -> Outbound | None:
        """Number a frame and record it in the replay buffer.

        Args:
            kind: ``Kind.DATA`` or ``Kind.CONTROL`` (application CONTROL; transport ``ack`` and
                ``resume`` are UNSEQUENCED and never go through a Sender).
            payload: the plaintext body (before compression flags are applied by the caller).
            channel: DATA channel 0-255; must be 0 for CONTROL.
            flags: ``Flags.NONE`` or ``Flags.COMPRESSED``.

        Returns:
            The frame to encrypt and transmit now, or ``None`` while paused: the frame is buffered
            and goes out with the list the next :meth:`resume` returns.

        Raises:
            BufferFull: no room yet; nothing was recorded. Wait for an ack and try again.
            ValueError: a frame no Sender may send (wrong kind, flag or channel), or one larger
                than the whole buffer, which could never fit.
            ProtocolError: the 64-bit sequence space is exhausted (the session must end).
        """
        if kind not in _SEQUENCED_KINDS:
            raise ValueError(f"{kind!r} is not a sequenced kind")
        if flags & ~Flags.COMPRESSED:
            raise ValueError("only the COMPRESSED flag may be set on a sequenced frame")
        if not 0 <= channel <= 0xFF or (kind is Kind.CONTROL and channel):
            raise ValueError(f"channel {channel} is not allowed for {kind.name}")
        cost = len(payload) + FRAME_OVERHEAD_BYTES
        if cost > self.max_buffer_bytes:
            raise ValueError(
                f"a {len(payload)}-byte payload can never fit a {self.max_buffer_bytes}-byte buffer"
            )
        if cost > self.free_bytes:
            raise BufferFull(cost, self.free_bytes)
        if self._next_seq > MAX_SEQ:
            raise ProtocolError("sequence space exhausted")
        frame = Outbound(self._next_seq, Kind(kind), channel, Flags(flags), bytes(payload))
        self._next_seq += 1
        self._buffer.append(frame)
        self._buffered_bytes += cost
        self._peak = max(self._peak, self._buffered_bytes)
        if self._paused:
            return None
        self._transmitted = frame.seq
        return frame

    # -- partner side ----------------------------------------------------------------------------
    def ack(self, seq: int) -> int:
        """Apply the partner's ``{"ack": seq}``: free every buffered frame up to ``seq``.

        A stale ack (not above the current one) is ignored.

        Returns:
            Bytes freed (0 when nothing was freed); a positive value is the driver's cue to wake an
            application blocked on :class:`BufferFull`.

        Raises:
            ProtocolError: ``seq`` was never transmitted (the partner acknowledges frames it cannot
                have), or is not a u64.
        """
        _check_seq(seq, "ack")
        if seq > self._transmitted:
            raise ProtocolError(f"ack {seq} is beyond the highest frame sent ({self._transmitted})")
        if seq <= self._acked:
            return 0
        freed = 0
        buffer = self._buffer
        while buffer and buffer[0].seq <= seq:
            freed += buffer.popleft().cost
        self._buffered_bytes -= freed
        self._acked = seq
        return freed

    def pause(self) -> None:
        """Stop transmitting: our link went down, or the partner left or (re)joined.

        Until the next :meth:`resume`, :meth:`send` only buffers. Idempotent.
        """
        self._paused = True

    def resume(self, seq: int) -> list[Outbound]:
        """Apply the partner's ``{"resume": seq}``: ack ``seq``, then retransmit everything after it.

        Also ends a pause. Allowed at any time (a resume on a live link only causes duplicates,
        which the partner drops).

        Returns:
            Every buffered frame after ``seq``, in order, to encrypt under the current key and
            transmit before anything else. It includes frames buffered while paused.

        Raises:
            ProtocolError: ``seq`` is below what the partner already acknowledged (the frames in
                between were freed, so the stream cannot be recovered: the partner lost its state),
                beyond the highest frame ever transmitted, or not a u64.
        """
        _check_seq(seq, "resume")
        if seq < self._acked:
            raise ProtocolError(
                f"resume from {seq} but {self._acked} was already acknowledged: frames "
                f"{seq + 1}..{self._acked} were discarded and cannot be retransmitted"
            )
        if seq > self._transmitted:
            raise ProtocolError(f"resume {seq} is beyond the highest frame sent ({self._transmitted})")
        self.ack(seq)
        self._paused = False
        self._resumes += 1
        frames = list(self._buffer)  # after ack(seq) the buffer holds exactly the frames after seq
        if frames:
            self._retransmitted += sum(1 for f in frames if f.seq <= self._transmitted)
            self._transmitted = frames[-1].seq
        return frames


class Receiver:
    """In-order delivery, duplicate and gap detection, and the ack schedule for one direction.

    One instance lives as long as the session. The driver calls :meth:`receive` for every
    decrypted sequenced frame, then :meth:`ack_due` (after each receive and whenever the timer set
    from :meth:`next_ack_deadline` fires) and sends ``{"ack": n}`` for the value it returns.

    Ack schedule: an ack is due when something is unacknowledged and either ``ack_every`` frames
    were delivered since the last ack, ``ack_interval`` seconds passed since the first of them was
    delivered, or a retransmitted duplicate arrived (the sender is evidently still holding frames we
    have: one prompt ack lets it free them; at most one per ack value, so a retransmit storm does not
    become an ack storm).

    Args:
        ack_every: frames delivered before an ack is due.
        ack_interval: seconds after the first unacknowledged delivery before an ack is due.

    Raises:
        ValueError: ``ack_every < 1`` or ``ack_interval <= 0``.
    """

    def __init__(self, *, ack_every: int = ACK_EVERY_FRAMES, ack_interval: float = ACK_INTERVAL_S) -> None:
        if ack_every < 1 or not ack_interval > 0:
            raise ValueError("ack_every must be >= 1 and ack_interval > 0")
        self.ack_every: Final = ack_every
        self.ack_interval: Final = ack_interval
        self._last = 0
        self._acked = 0  # highest seq we told the partner about (ack or resume)
        self._unacked = 0  # frames delivered since the last ack
        self._first_unacked_at: float | None = None
        self._dup_pending = False
        self._resyncing = False
        self._delivered = 0
        self._dups = 0
        self._stale = 0
        self._acks = 0

    @property
    def last_delivered(self) -> int:
        """Highest seq delivered to the application (0 before any)."""
        return self._last

    @property
    def last_acked(self) -> int:
        """Highest seq reported to the partner by an ack or a resume."""
        return self._acked

    @property
    def resyncing(self) -> bool:
        """True between :meth:`begin_resume` and the next in-order frame."""
        return self._resyncing

    def statistics(self) -> ReceiverStatistics:
        return ReceiverStatistics(
            last_delivered=self._last,
            last_acked=self._acked,
            delivered_frames=self._delivered,
            duplicates_dropped=self._dups,
            stale_dropped=self._stale,
            acks_sent=self._acks,
            resyncing=self._resyncing,
        )

    def receive(self, seq: int, now: float) -> bool:
        """Classify one decrypted sequenced frame.

        Returns:
            ``True``: the next frame in order, deliver it to the application now. ``False``: drop
            it silently (a retransmit of a frame already delivered, or a frame from the stale tail
            while resyncing, which the partner will retransmit).

        Raises:
            ProtocolError: a gap (``seq > last_delivered + 1`` outside a resync), or seq 0 or not
                a u64.
        """
        if not 1 <= seq <= MAX_SEQ:
            raise ProtocolError(f"sequenced frame with seq {seq}; sequence numbers are 1..2**64-1")
        if seq <= self._last:
            self._dups += 1
            if self._last > self._acked:
                self._dup_pending = True
            return False
        if seq > self._last + 1:
            if self._resyncing:
                self._stale += 1
                return False
            raise ProtocolError(f"gap in the stream: got seq {seq} after {self._last}")
        self._resyncing = False
        self._last = seq
        self._delivered += 1
        self._unacked += 1
        if self._first_unacked_at is None:
            self._first_unacked_at = now
        return True

    def ack_due(self, now: float) -> int | None:
        """The seq to acknowledge now, or ``None``; a returned value counts as sent.

        The driver sends ``{"ack": n}`` as an UNSEQUENCED CONTROL for every value returned.
        """
        if self._last <= self._acked:
            return None
        started = self._first_unacked_at
        if not (
            self._dup_pending
            or self._unacked >= self.ack_every
            or (started is not None and now - started >= self.ack_interval)
        ):
            return None
        self._mark_acked()
        self._acks += 1
        return self._last

    def next_ack_deadline(self) -> float | None:
        """When :meth:`ack_due` will next return a value (already due if ``<= now``), or ``None``.

        ``None`` means nothing is unacknowledged: no timer is needed until the next receive.
        """
        if self._last <= self._acked or self._first_unacked_at is None:
            return None
        if self._dup_pending or self._unacked >= self.ack_every:
            return self._first_unacked_at
        return self._first_unacked_at + self.ack_interval

    def begin_resume(self) -> int:
        """The ``n`` for the ``{"resume": n}`` to send now, after our link or the partner's changed.

        Call it when the partner (re)joins, and after our own WELCOME when the partner is already
        there. The resume acknowledges ``n``, so the ack schedule restarts. Until the next in-order
        frame arrives, frames above ``n + 1`` are dropped instead of being a gap: they are the
        stale tail the partner transmitted before it learned of the new connection (the relay
        forwarded them to our new connection after frames in between were lost with the old one),
        and the partner retransmits them, in order from ``n + 1``, when our resume arrives.
        """
        self._mark_acked()
        self._resyncing = True
        return self._last

    def _mark_acked(self) -> None:
        self._acked = self._last
        self._unacked = 0
        self._first_unacked_at = None
        self._dup_pending = False


class UnsequencedCounter:
    """Numbers the UNSEQUENCED CONTROL messages (``ack``, ``resume``) we send on one connection.

    Starts at 1 and strictly increases; :meth:`reset` on every new connection (a new HELLO nonce
    means a new key, and the AEAD nonce space 1 restarts with it).
    """

    def __init__(self) -> None:
        self._next = 1

    @property
    def next_value(self) -> int:
        """The counter the next :meth:`take` returns."""
        return self._next

    def take(self) -> int:
        """The counter for the next UNSEQUENCED message.

        Raises:
            ProtocolError: the 64-bit space is exhausted on this key (the connection must be
                replaced; unreachable in practice).
        """
        value = self._next
        if value > MAX_SEQ:
            raise ProtocolError("unsequenced counter exhausted on this connection key")
        self._next = value + 1
        return value

    def reset(self) -> None:
        """Restart at 1: call it when our own connection (and so our key) is new."""
        self._next = 1


class UnsequencedFilter:
    """Replay filter for the partner's UNSEQUENCED CONTROL messages under its current key.

    :meth:`accept` keeps a message only if its counter is above the last one accepted; :meth:`reset`
    when the partner's key changes (a new partner nonce from WELCOME.peer or a PEER event).
    """

    def __init__(self) -> None:
        self._last = 0
        self._dropped = 0

    @property
    def last(self) -> int:
        """Highest counter accepted under the current key (0 after a reset)."""
        return self._last

    @property
    def dropped(self) -> int:
        """Messages dropped as replays or out of order since creation."""
        return self._dropped

    def accept(self, counter: int) -> bool:
        """Whether to act on an UNSEQUENCED message with this counter (and record it if so).

        Counter 0 or a value not above the last accepted one is dropped (``False``), never an
        error: it is a replay or reordering, acting on it would only move state backwards.
        """
        if counter <= self._last or counter > MAX_SEQ:
            self._dropped += 1
            return False
        self._last = counter
        return True

    def reset(self) -> None:
        """Forget the last counter: the partner's key changed, its counter restarts at 1."""
        self._last = 0
