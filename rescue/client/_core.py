"""The sans-I/O peer: one object per (session, role) that outlives every connection it makes.

:class:`PeerCore` holds everything a peer keeps across reconnects (the pre-shared key, the
:class:`~rescue.protocol._stream.Sender` and :class:`~rescue.protocol._stream.Receiver`, the
partner's current key) and everything one connection needs (its fresh 16-byte HELLO nonce and the
frame key derived from it, the UNSEQUENCED counter). It does no I/O, imports no trio and reads no
clock: the driver (``rescue.client._peer``) passes each received WebSocket message in with the
current time and writes whatever :meth:`PeerCore.data_to_send` hands out.

Driving it::

    core = PeerCore(psk=psk, session_id="demo", role=Role.HOST)
    ws.send(core.connect(token))              # HELLO, with a fresh nonce and key
    for message in ws:                        # every inbound message
        for event in core.receive(message, now):
            ...                               # Welcomed, PeerJoined, DataReceived, ...
        ws.send_all(core.data_to_send())      # resume, acks, (re)transmitted frames
    core.connection_lost()                    # the socket died; connect() again later

SPEC §2 rules it implements (see ``docs/client.md``):

* after its own WELCOME with the partner present, and after every PEER ``joined``/``rejoined``, it
  queues an UNSEQUENCED ``{"resume": last_delivered}`` before anything else;
* on the partner's ``{"resume": n}`` it retransmits every frame after ``n`` sealed under the
  *current* connection key; on PEER ``left`` (and while its own link is down) it transmits nothing,
  application data only accumulates in the bounded replay buffer;
* a frame that fails authentication is dropped and counted; three in a row raise
  ``ProtocolError(INTEGRITY_ERROR)``. Frames still in flight under the partner's *previous* key
  (sent on a connection the relay has just replaced) are not failures: sequenced ones are handled
  normally, UNSEQUENCED ones (stale acks/resumes) are dropped.
"""

from __future__ import annotations

import collections
import math
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.protocol import (
    ACK_EVERY_FRAMES,
    ACK_INTERVAL_S,
    DEFAULT_MAX_FRAME,
    DEFAULT_REPLAY_BUFFER_BYTES,
    HEADER_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    Ack,
    AppControl,
    Caps,
    Close,
    DecryptError,
    Flags,
    FrameCipher,
    Header,
    Hello,
    Kind,
    Outbound,
    PeerEvent,
    PeerInfo,
    Receiver,
    ReceiverStatistics,
    Resume,
    Role,
    Sender,
    SenderStatistics,
    UnsequencedCounter,
    UnsequencedFilter,
    Welcome,
    decode_control,
    decode_frame,
    decode_relay_message,
    derive_frame_key,
    encode_ack,
    encode_frame,
    encode_resume,
)

__all__ = [
    "CLIENT_NAME",
    "FRAME_OVERHEAD",
    "INTEGRITY_FAILURE_LIMIT",
    "RESUME_RETRY_S",
    "Acked",
    "CloseReceived",
    "ControlReceived",
    "CoreStatistics",
    "DataReceived",
    "Event",
    "HeartbeatEcho",
    "PeerCore",
    "PeerJoined",
    "PeerLeft",
    "Resumed",
    "Welcomed",
]

CLIENT_NAME: Final = "rescue-py/0.1"
# Bytes a sealed frame adds to its payload: the 12-byte header and the 16-byte Poly1305 tag.
FRAME_OVERHEAD: Final = HEADER_SIZE + TAG_SIZE
# SPEC §2: "three in a row end the session with INTEGRITY_ERROR".
INTEGRITY_FAILURE_LIMIT: Final = 3
# What we can decode: zlib, inflated with a bound (see _inflate) so a small frame cannot expand
# into unbounded memory. We never compress what we send (a retransmit may reach a partner
# connection with other caps), so this only matters for other clients.
DEFAULT_CAPS: Final = Caps(compression=("zlib",))
# While we wait for the partner's {"resume"} after a (re)pairing, our own resume is sent again this
# often. A correct relay never loses it, so this only fires when the partner cannot read ours: with a
# wrong passphrase each retry is one more authentication failure at the partner, which therefore
# ends the session with INTEGRITY_ERROR within a few seconds instead of both peers waiting forever.
RESUME_RETRY_S: Final = 2.0


# ------------------------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Welcomed:
    """The relay accepted our HELLO.

    Attributes:
        welcome: the WELCOME (heartbeat interval, max frame, resume grace, partner if present).
    """

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """The partner connected (``rejoined``: on a new connection after an earlier one).

    Attributes:
        peer: its role, nonce and caps.
        rejoined: ``True`` for PEER ``rejoined``, ``False`` for ``joined``.
    """

    peer: PeerInfo
    rejoined: bool


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """The partner's connection ended; it may come back within the resume grace.

    Attributes:
        peer: the partner as it was on the connection that ended.
    """

    peer: PeerInfo


@dataclass(frozen=True, slots=True)
class DataReceived:
    """Application bytes from the partner, in order.

    Attributes:
        channel: the DATA channel (0 terminal output, 1 terminal input, 2+ free).
        data: the plaintext.
    """

    channel: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ControlReceived:
    """An application CONTROL map from the partner, in order with the data.

    Attributes:
        data: the decoded map.
    """

    data: Mapping[Any, Any]


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """A CLOSE message (from the relay, or the partner's forwarded by it).

    Attributes:
        code: the close code (a :class:`CloseCode` when known).
        reason: its reason text.
        reconnect_in_ms: for ``SERVER_SHUTDOWN``: how long to wait before reconnecting.
    """

    code: int
    reason: str
    reconnect_in_ms: int | None


@dataclass(frozen=True, slots=True)
class HeartbeatEcho:
    """The relay echoed one of our HEARTBEATs.

    Attributes:
        seq: the echoed value (what :meth:`PeerCore.heartbeat` put in it).
    """

    seq: int


@dataclass(frozen=True, slots=True)
class Acked:
    """The partner acknowledged frames and so freed room in the replay buffer.

    Attributes:
        freed: bytes freed; wake an application blocked on a full buffer.
    """

    freed: int


@dataclass(frozen=True, slots=True)
class Resumed:
    """The partner sent ``{"resume": seq}``: transmission restarts after ``seq``.

    Attributes:
        seq: the last seq the partner had received from us.
        retransmitted: frames queued again (including ones buffered while paused).
    """

    seq: int
    retransmitted: int


Event: TypeAlias = (
    Welcomed
    | PeerJoined
    | PeerLeft
    | DataReceived
    | ControlReceived
    | CloseReceived
    | HeartbeatEcho
    | Acked
    | Resumed
)


@dataclass(frozen=True, slots=True)
class CoreStatistics:
    """An immutable snapshot of a :class:`PeerCore`.

    Attributes:
        connections: HELLOs sent (connections attempted).
        connected: a connection is open (HELLO sent, not yet lost).
        welcomed: the current connection got its WELCOME.
        partner_present: the partner is connected as far as the relay told us.
        integrity_failures: frames dropped because they failed authentication (all time).
        stale_key_frames: frames that arrived under the partner's previous key.
        sender: the Sender's snapshot.
        receiver: the Receiver's snapshot.
    """

    connections: int
    connected: bool
    welcomed: bool
    partner_present: bool
    integrity_failures: int
    stale_key_frames: int
    sender: SenderStatistics
    receiver: ReceiverStatistics


# ------------------------------------------------------------------------------------------- core


class _PartnerKey:
    """The partner's frame cipher for one of its connections, with that key's replay filter."""

    __slots__ = ("cipher", "filter", "nonce")

    def __init__(self, cipher: FrameCipher, nonce: bytes) -> None:
        self.cipher = cipher
        self.nonce = nonce
        self.filter = UnsequencedFilter()


class PeerCore:
    """One side of a session, across all its connections (sans-I/O).

    Args:
        psk: the 32-byte pre-shared key (:func:`rescue.protocol.derive_psk`).
        session_id: the session id.
        role: our role.
        caps: what we announce we can decode.
        client: the product tag sent in HELLO.
        max_buffer_bytes: bound of the replay buffer (SPEC default 4 MiB).
        ack_every: frames delivered before an ack is due.
        ack_interval: seconds after the first unacknowledged delivery before an ack is due.
        resume_retry: seconds between resends of our resume while the partner's is awaited
            (:data:`RESUME_RETRY_S`); it also paces how soon a wrong passphrase ends the session.
        random_bytes: source of HELLO nonces (``os.urandom``; tests may inject a seeded one).

    Raises:
        ValueError: a bad psk, session id or buffer size.
    """

    def __init__(
        self,
        *,
        psk: bytes,
        session_id: str,
        role: Role,
        caps: Caps = DEFAULT_CAPS,
        client: str = CLIENT_NAME,
        max_buffer_bytes: int = DEFAULT_REPLAY_BUFFER_BYTES,
        ack_every: int = ACK_EVERY_FRAMES,
        ack_interval: float = ACK_INTERVAL_S,
        resume_retry: float = RESUME_RETRY_S,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if not resume_retry > 0:
            raise ValueError("resume_retry must be > 0")
        self.session_id: Final = session_id
        self.role: Final = Role(role)
        self.partner_role: Final = Role.GUEST if self.role is Role.HOST else Role.HOST
        self.caps: Final = caps
        self.client: Final = client
        # Validates the psk size and role once, up front.
        derive_frame_key(psk, session_id, self.role.value, bytes(NONCE_SIZE))
        self._psk = bytes(psk)
        self._random = random_bytes
        self.sender: Final = Sender(max_buffer_bytes=max_buffer_bytes)
        self.receiver: Final = Receiver(ack_every=ack_every, ack_interval=ack_interval)
        # Per connection.
        self._nonce: bytes | None = None
        self._cipher: FrameCipher | None = None
        self._counter = UnsequencedCounter()
        self._connected = False
        self._welcome: Welcome | None = None
        self._closed = False
        # Partner.
        self._partner: PeerInfo | None = None
        self._partner_present = False
        self._key: _PartnerKey | None = None
        self._previous_key: _PartnerKey | None = None
        # Outgoing: the transport messages are kept as values and sealed when drained (a newer
        # ack replaces an unsent older one), the sequenced frames as sealed messages in order.
        # Bounded: every entry of _outbox is a distinct frame still in the replay buffer.
        self._pending_resume: int | None = None
        self._resume_sent_at: float | None = None  # when we last asked for a resume (retry timer)
        self._resume_retry = resume_retry
        self._pending_ack: int | None = None
        self._outbox: collections.deque[bytes] = collections.deque()
        self._heartbeat_seq = 0
        self._connections = 0
        self._integrity_run = 0
        self._integrity_total = 0
        self._stale_frames = 0
        self._partner_verified = False

    def __repr__(self) -> str:
        return (
            f"PeerCore(role={self.role.value}, connected={self._connected}, partner={self._partner_present})"
        )

    # ---------------------------------------------------------------------------------- state

    @property
    def connected(self) -> bool:
        """A connection is open: :meth:`connect` was called and :meth:`connection_lost` not since."""
        return self._connected

    @property
    def welcome(self) -> Welcome | None:
        """The current connection's WELCOME, or ``None`` before it (or while disconnected)."""
        return self._welcome

    @property
    def partner(self) -> PeerInfo | None:
        """The partner as last announced (kept while it is away), or ``None`` before it ever came."""
        return self._partner

    @property
    def partner_present(self) -> bool:
        """The partner is connected (per WELCOME/PEER) while we are."""
        return self._connected and self._partner_present

    @property
    def partner_verified(self) -> bool:
        """A frame from the partner has authenticated (ever): it holds the same key.

        Until then nothing the partner sent is known to come from someone with the passphrase; a
        host that runs a command for its guest waits for this (a wrong passphrase never sees a
        prompt). With the wrong one, :meth:`receive` ends with ``INTEGRITY_ERROR`` instead.
        """
        return self._partner_verified

    @property
    def nonce(self) -> bytes | None:
        """Our current connection's HELLO nonce."""
        return self._nonce

    @property
    def max_frame(self) -> int:
        """The largest whole message of the current connection (SPEC default before WELCOME)."""
        return self._welcome.max_frame if self._welcome is not None else DEFAULT_MAX_FRAME

    @property
    def max_payload(self) -> int:
        """The largest plaintext one DATA frame may carry on the current connection."""
        return self.max_frame - FRAME_OVERHEAD

    @property
    def all_acked(self) -> bool:
        """Every frame we ever queued has been acknowledged by the partner."""
        return self.sender.acked == self.sender.next_seq - 1

    def can_send(self, size: int) -> bool:
        """Whether a payload of ``size`` bytes fits in the replay buffer right now."""
        return self.sender.can_send(size)

    def statistics(self) -> CoreStatistics:
        """An immutable snapshot (for logs, ``/debug`` pages and tests)."""
        return CoreStatistics(
            connections=self._connections,
            connected=self._connected,
            welcomed=self._welcome is not None,
            partner_present=self.partner_present,
            integrity_failures=self._integrity_total,
            stale_key_frames=self._stale_frames,
            sender=self.sender.statistics(),
            receiver=self.receiver.statistics(),
        )

    # ----------------------------------------------------------------------------- connection

    def connect(self, token: bytes) -> bytes:
        """Start a new connection: a fresh nonce and key; returns the HELLO message to send first.

        Anything queued for the previous connection is dropped (it was sealed under the old key;
        the partner's next resume recovers it).

        Args:
            token: the fallback token (CWT bytes).

        Raises:
            ValueError: the token is empty or too large for HELLO.
        """
        nonce = bytes(self._random(NONCE_SIZE))
        hello = Hello(
            token=bytes(token),
            session=self.session_id,
            role=self.role,
            nonce=nonce,
            caps=self.caps,
            client=self.client,
        )
        self.connection_lost()
        self._nonce = nonce
        self._cipher = FrameCipher(derive_frame_key(self._psk, self.session_id, self.role.value, nonce))
        self._counter.reset()
        self._connected = True
        self._closed = False
        self._connections += 1
        return hello.to_message()

    def connection_lost(self) -> None:
        """Our connection ended (or is being abandoned): transmit nothing until the next resume."""
        self._connected = False
        self._welcome = None
        self._partner_present = False
        self.sender.pause()
        self._clear_outgoing()

    def _clear_outgoing(self) -> None:
        self._outbox.clear()
        self._pending_ack = None
        self._pending_resume = None

    # -------------------------------------------------------------------------------- sending

    def send_data(self, channel: int, payload: bytes) -> None:
        """Queue application bytes on ``channel``; they go out now or with the next resume.

        Raises:
            BufferFull: the replay buffer has no room; nothing was queued (wait for :class:`Acked`).
            ValueError: bad channel, or a payload over :attr:`max_payload` (split it first).
            ProtocolError: the sequence space is exhausted.
        """
        if len(payload) > self.max_payload:
            raise ValueError(f"payload of {len(payload)} bytes exceeds max_payload {self.max_payload}")
        self._queue(self.sender.send(Kind.DATA, bytes(payload), channel=channel))

    def send_control(self, data: Mapping[Any, Any]) -> None:
        """Queue an application CONTROL map (sequenced, in order with the data).

        Raises:
            BufferFull: the replay buffer has no room; nothing was queued.
            ValueError: the map uses the reserved ``ack``/``resume`` keys or is too large.
        """
        payload = AppControl(data).encode()
        if len(payload) > self.max_payload:
            raise ValueError(f"control map of {len(payload)} bytes exceeds max_payload {self.max_payload}")
        self._queue(self.sender.send(Kind.CONTROL, payload))

    def _queue(self, frame: Outbound | None) -> None:
        if frame is not None:
            self._outbox.append(self._seal(frame))

    def _seal(self, frame: Outbound) -> bytes:
        assert self._cipher is not None  # the Sender only hands out frames while connected
        try:
            return self._cipher.seal_frame(
                frame.kind,
                frame.payload,
                seq=frame.seq,
                channel=frame.channel,
                flags=frame.flags,
                max_frame=self.max_frame,
            )
        except ValueError as exc:
            # Only possible when a node with a smaller max_frame must carry a retransmit.
            raise ProtocolError(f"cannot retransmit frame {frame.seq}: {exc}") from exc

    def heartbeat(self) -> bytes:
        """A HEARTBEAT message (its seq counts up; the echo comes back as :class:`HeartbeatEcho`)."""
        self._heartbeat_seq += 1
        return encode_frame(Kind.HEARTBEAT, seq=self._heartbeat_seq)

    def close_message(self, code: int = CloseCode.NORMAL, reason: str = "") -> bytes:
        """A CLOSE message ending the session for both peers (SPEC §2)."""
        return Close(code=code, reason=reason).to_message()

    def flush_ack(self) -> None:
        """Acknowledge everything delivered so far now (e.g. right before a graceful close)."""
        if self.partner_present:
            seq = self.receiver.ack_due(math.inf)  # "infinitely late": due if anything is unacked
            if seq is not None:
                self._pending_ack = seq

    def poll(self, now: float) -> None:
        """Queue what is due at ``now``: an ack, or a resume retry (call it at :meth:`next_deadline`)."""
        if not self.partner_present:
            return
        if self._resume_sent_at is None:
            self._resume_sent_at = now
        elif self.sender.paused and now >= self._resume_sent_at + self._resume_retry:
            self._pending_resume = self.receiver.begin_resume()
            self._resume_sent_at = now
        seq = self.receiver.ack_due(now)
        if seq is not None:
            self._pending_ack = seq

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has something to do, or ``None`` (wait for the next message)."""
        if not self.partner_present:
            return None
        ack = self.receiver.next_ack_deadline()
        if not self.sender.paused:
            return ack
        retry = 0.0 if self._resume_sent_at is None else self._resume_sent_at + self._resume_retry
        return retry if ack is None else min(ack, retry)

    def data_to_send(self, max_bytes: int | None = None) -> list[bytes]:
        """Messages to write now, in order; they leave the core.

        Args:
            max_bytes: stop before exceeding this many bytes (at least one message is returned if
                any is pending); ``None`` drains everything.
        """
        out: list[bytes] = []
        if not self._connected:
            return out
        size = 0
        if self._pending_resume is not None:
            out.append(self._seal_transport(encode_resume(self._pending_resume)))
            self._pending_resume = None
        if self._pending_ack is not None:
            out.append(self._seal_transport(encode_ack(self._pending_ack)))
            self._pending_ack = None
        size = sum(len(m) for m in out)
        outbox = self._outbox
        while outbox and (max_bytes is None or not out or size + len(outbox[0]) <= max_bytes):
            message = outbox.popleft()
            size += len(message)
            out.append(message)
        return out

    @property
    def has_data_to_send(self) -> bool:
        """Whether :meth:`data_to_send` would return anything."""
        return self._connected and bool(
            self._outbox or self._pending_ack is not None or self._pending_resume is not None
        )

    def _seal_transport(self, plaintext: bytes) -> bytes:
        assert self._cipher is not None
        return self._cipher.seal_frame(
            Kind.CONTROL,
            plaintext,
            seq=self._counter.take(),
            flags=Flags.UNSEQUENCED,
            max_frame=self.max_frame,
        )

    # ------------------------------------------------------------------------------ receiving

    def receive(self, message: bytes, now: float) -> list[Event]:
        """Process one inbound WebSocket message.

        Returns:
            The events it caused, in order. Outgoing messages it caused (resume, acks,
            retransmits) wait in :meth:`data_to_send`.

        Raises:
            ProtocolError: the relay or the partner broke the protocol (a bad WELCOME, a gap in
                the stream, an impossible ack or resume, ...), or ``INTEGRITY_ERROR`` after
                :data:`INTEGRITY_FAILURE_LIMIT` frames in a row failed authentication. The session
                cannot continue: close with ``exc.code``.
        """
        if not self._connected:
            raise ProtocolError("message received without an open connection")
        frame = decode_frame(message, max_frame=self.max_frame)
        kind = frame.header.kind
        if self._closed:
            return []  # after a CLOSE nothing more is acted on
        if kind is Kind.CLOSE:
            close = decode_relay_message(kind, frame.body)
            assert isinstance(close, Close)
            self._closed = True
            return [CloseReceived(int(close.code), close.reason, close.reconnect_in_ms)]
        events: list[Event]
        if self._welcome is None:
            if kind is not Kind.WELCOME:
                raise ProtocolError(f"expected WELCOME, got {kind.name}")
            welcome = decode_relay_message(kind, frame.body)
            assert isinstance(welcome, Welcome)
            events = self._on_welcome(welcome)
        elif kind is Kind.HEARTBEAT:
            return [HeartbeatEcho(frame.header.seq)]
        elif kind is Kind.PEER:
            event = decode_relay_message(kind, frame.body)
            assert isinstance(event, PeerEvent)
            events = self._on_peer(event)
        elif kind in (Kind.DATA, Kind.CONTROL):
            events = self._on_sealed(frame.header, message, now)
        else:
            raise ProtocolError(f"unexpected {kind.name} from the relay")
        self.poll(now)
        return events

    def _on_welcome(self, welcome: Welcome) -> list[Event]:
        if welcome.ack_nonce != self._nonce:
            raise ProtocolError("WELCOME does not echo our HELLO nonce")
        self._welcome = welcome
        events: list[Event] = [Welcomed(welcome)]
        if welcome.peer is not None:
            self._partner_arrived(welcome.peer)
        return events

    def _on_peer(self, event: PeerEvent) -> list[Event]:
        if event.role is not self.partner_role:
            raise ProtocolError(
                f"PEER event for role {event.role.value}, our partner is {self.partner_role.value}"
            )
        info = event.info
        if event.event == "left":
            if self._key is not None and event.nonce != self._key.nonce:
                return []  # about a connection already replaced: nothing changes
            self._partner_present = False
            self.sender.pause()
            self._clear_outgoing()
            return [PeerLeft(info)]
        self._partner_arrived(info)
        return [PeerJoined(info, rejoined=event.event == "rejoined")]

    def _partner_arrived(self, info: PeerInfo) -> None:
        """WELCOME.peer or PEER joined/rejoined: (re)key, stop transmitting, ask for a resume."""
        if info.role is not self.partner_role:
            raise ProtocolError(f"partner has role {info.role.value}, expected {self.partner_role.value}")
        if self._key is None or self._key.nonce != info.nonce:
            cipher = FrameCipher(derive_frame_key(self._psk, self.session_id, info.role.value, info.nonce))
            self._previous_key = self._key
            self._key = _PartnerKey(cipher, info.nonce)
        self._partner = info
        self._partner_present = True
        # Whatever was queued went (or would go) to a connection that is gone; the partner's resume
        # tells us where to restart. Our own resume goes first (SPEC §2).
        self.sender.pause()
        self._clear_outgoing()
        self._pending_resume = self.receiver.begin_resume()
        self._resume_sent_at = None  # set by the poll() that follows every receive()

    def _on_sealed(self, header: Header, message: bytes, now: float) -> list[Event]:
        raw_header = message[:HEADER_SIZE]
        body = message[HEADER_SIZE:]
        plaintext: bytes | None = None
        used: _PartnerKey | None = None
        for key in (self._key, self._previous_key):
            if key is None:
                continue
            try:
                plaintext = key.cipher.open(raw_header, body)
            except DecryptError:
                continue
            used = key
            break
        if plaintext is None or used is None:
            self._integrity_total += 1
            self._integrity_run += 1
            if self._integrity_run >= INTEGRITY_FAILURE_LIMIT:
                raise ProtocolError(
                    f"{self._integrity_run} frames in a row failed authentication (wrong passphrase?)",
                    CloseCode.INTEGRITY_ERROR,
                )
            return []
        self._integrity_run = 0
        self._partner_verified = True
        stale = used is not self._key
        if stale:
            self._stale_frames += 1
        if header.unsequenced:
            if stale or not used.filter.accept(header.seq):
                return []  # a stale or replayed ack/resume: acting on it could only move state back
            return self._on_transport(decode_control(plaintext, flags=header.flags, max_size=self.max_frame))
        if header.flags & Flags.COMPRESSED:
            plaintext = _inflate(plaintext, self.max_frame)
        if not self.receiver.receive(header.seq, now):
            return []
        if header.kind is Kind.DATA:
            return [DataReceived(header.channel, plaintext)]
        control = decode_control(plaintext, flags=header.flags, max_size=self.max_frame)
        assert isinstance(control, AppControl)
        return [ControlReceived(control.data)]

    def _on_transport(self, message: Ack | Resume | AppControl) -> list[Event]:
        if isinstance(message, Ack):
            freed = self.sender.ack(message.seq)
            return [Acked(freed)] if freed else []
        assert isinstance(message, Resume)
        if not self._partner_present:
            return []  # cannot happen with a correct relay; never transmit to an absent partner
        before = self.sender.buffered_bytes
        frames = self.sender.resume(message.seq)
        freed = before - self.sender.buffered_bytes
        # Everything in the outbox is after the resume point and in `frames` again.
        self._outbox.clear()
        self._outbox.extend(self._seal(frame) for frame in frames)
        events: list[Event] = [Resumed(message.seq, len(frames))]
        if freed:
            events.append(Acked(freed))
        return events


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib-decompress a frame body, refusing output larger than ``limit`` (a decompression bomb)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise ProtocolError(f"compressed frame does not inflate: {exc}") from exc
    if inflater.unconsumed_tail or not inflater.eof:
        raise ProtocolError(f"compressed frame is truncated or inflates beyond {limit} bytes")
    return out
