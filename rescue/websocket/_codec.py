"""Sans-I/O RFC 6455: frame parser, frame serializer and the HTTP/1.1 upgrade handshake.

Nothing here does I/O or imports trio; :mod:`rescue.websocket._connection` drives it from trio streams.
The parser is written for the relay's hot path: one call parses every complete frame in a chunk with
``struct`` and unmasks each payload with one C call (``websockets.speedups.apply_mask`` when it is
importable, a pure-Python XOR over big integers otherwise).

Rules (SPEC §2: binary messages only, no extensions): every violation raises
:class:`~rescue.errors.ProtocolError` with code ``PROTOCOL_ERROR`` (4010). That includes text
messages and oversize messages, which RFC 6455 would answer with 1003/1009: SPEC wins, and one code
keeps the client policy simple (``PROTOCOL_ERROR`` → do not reconnect).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple, cast

from rescue._codes import CloseCode, clip_close_reason
from rescue._http1 import HEAD_END as _HEAD_END
from rescue._http1 import REASONS, HttpError, check_request_line, parse_head
from rescue.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE",
    "FRAME_BURST",
    "FRAME_BYTES",
    "FRAME_RATE",
    "MAX_CLOSE_REASON",
    "MAX_CONTROL_PAYLOAD",
    "MAX_FRAGMENTS",
    "MAX_HANDSHAKE_SIZE",
    "CloseFrameReceived",
    "Event",
    "FrameBudget",
    "FrameFloodError",
    "FrameParser",
    "HandshakeError",
    "Opcode",
    "Ping",
    "Pong",
    "Rejection",
    "Request",
    "Response",
    "TLSRecords",
    "accept_key",
    "apply_mask",
    "build_frame",
    "build_request",
    "error_response",
    "find_head_end",
    "frame_binary",
    "frame_close",
    "frame_messages",
    "frame_parts",
    "frame_ping",
    "frame_pong",
    "new_key",
    "parse_request",
    "parse_response",
    "switching_protocols",
]

# The largest message (after continuation frames are joined) we accept: SPEC's default max_frame,
# which already counts the 12-byte relay header. Anything larger is a PROTOCOL_ERROR.
DEFAULT_MAX_MESSAGE: Final = 65536
# The most frames one fragmented message may have. Our SDK and browsers never fragment; libraries
# that do cut at 4 KiB or more (16 pieces for a DEFAULT_MAX_MESSAGE message). 64 leaves room for
# 1 KiB pieces. Without a bound, each zero-length continuation frame (6 bytes on the wire) cost the
# relay a list entry and a parse: an unauthenticated connection grew the relay by 130 MB in 10 s.
MAX_FRAGMENTS: Final = 64
# Per-connection frame budget (see FrameBudget). A frame costs the relay a fixed amount of work
# (parse, event, session-core call, maybe an echo or a pong) whatever its size, so a flood of tiny
# frames is a CPU attack a byte rate limit never sees. A legitimate peer's frames are either rare
# (a HEARTBEAT every 15 s, keystrokes, mouse reports: tens a second) or large (DATA up to
# max_frame). So a connection may send FRAME_RATE frames a second of any size (bursts of
# FRAME_BURST), plus one frame for every FRAME_BYTES bytes it sends: bulk traffic whose frames
# average FRAME_BYTES or more is never limited, while a flood of 6-40 byte frames (pings, empty
# continuations, 12-byte HEARTBEATs or DATA) is closed within a read or two.
FRAME_RATE: Final = 500.0
FRAME_BURST: Final = 2000.0
FRAME_BYTES: Final = 64
# RFC 6455 §5.5: control frames carry at most 125 payload bytes and are never fragmented.
MAX_CONTROL_PAYLOAD: Final = 125
# A close payload is a 2-byte code plus a UTF-8 reason, so the reason gets 123 bytes.
MAX_CLOSE_REASON: Final = MAX_CONTROL_PAYLOAD - 2
# Upper bound on an HTTP upgrade request or response head. Real clients send well under 2 KiB;
# 8 KiB leaves room for cookies a browser may attach and stops a slow-loris from growing a buffer.
MAX_HANDSHAKE_SIZE: Final = 8192
# Masks are cut from one urandom read of this size: 1024 masks per system call.
_MASK_POOL_SIZE: Final = 4096

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_U16: Final = struct.Struct(">H")
_U64: Final = struct.Struct(">Q")


class Opcode(enum.IntEnum):
    """RFC 6455 frame opcodes."""

    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


# --------------------------------------------------------------------------------------- masking


def _apply_mask_py(data: bytes | bytearray | memoryview, mask: bytes | bytearray | memoryview) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``mask`` (pure Python, one big-integer XOR)."""
    n = len(data)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


_MaskFn = Callable[[bytes | bytearray | memoryview, bytes | bytearray | memoryview], bytes]


def _mask_function() -> _MaskFn:
    try:  # pragma: no branch - which one wins depends on the environment
        from websockets.speedups import apply_mask as c_apply_mask
    except ImportError:  # pragma: no cover - websockets is installed in dev and CI
        return _apply_mask_py
    # The C routine takes any buffer for both arguments (its stub says ``bytes`` for the mask).
    return cast("_MaskFn", c_apply_mask)


# Bound once (Final: compiled code reads it without a lookup in the module, decision 0022).
apply_mask: Final[_MaskFn] = _mask_function()
"""XOR ``data`` with the repeated 4-byte ``mask`` (C speedup from ``websockets`` when installed)."""


class _MaskPool:
    """Random 4-byte masking keys cut from a pooled ``os.urandom`` buffer."""

    __slots__ = ("_pool", "_pos")

    def __init__(self) -> None:
        self._pool = b""
        self._pos = 0

    def take(self) -> bytes:
        pos = self._pos
        if pos + 4 > len(self._pool):
            self._pool = os.urandom(_MASK_POOL_SIZE)
            pos = 0
        self._pos = pos + 4
        return self._pool[pos : pos + 4]


_masks = _MaskPool()


# ------------------------------------------------------------------------------------ serializer


def build_frame(
    opcode: int, payload: bytes | bytearray | memoryview, *, mask: bool, fin: bool = True, rsv: int = 0
) -> bytes:
    """One frame, byte for byte.

    Args:
        opcode: the 4-bit opcode (any value: tests use this to build bad frames).
        payload: the unmasked payload.
        mask: mask the payload with a fresh random key (clients must, servers must not).
        fin: the FIN bit.
        rsv: the three RSV bits, as a value 0..7.

    Returns:
        The encoded frame.
    """
    n = len(payload)
    b0 = (0x80 if fin else 0) | ((rsv & 7) << 4) | (opcode & 0x0F)
    mbit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + _U16.pack(n)
    else:
        head = bytes((b0, mbit | 127)) + _U64.pack(n)
    if mask:
        key = _masks.take()
        return head + key + apply_mask(payload, key)
    return head + bytes(payload)


def frame_binary(payload: bytes | bytearray | memoryview, mask: bool) -> bytes:
    """One unfragmented binary message."""
    return build_frame(Opcode.BINARY, payload, mask=mask)


def frame_messages(payloads: Iterable[bytes | bytearray | memoryview], mask: bool) -> bytes:
    """Several binary messages framed back to back, ready for one ``send_all``."""
    return b"".join(frame_parts(payloads, mask))


def frame_parts(
    payloads: Iterable[bytes | bytearray | memoryview], mask: bool
) -> list[bytes | bytearray | memoryview]:
    """The frames of several binary messages as buffers for one gathering write (``writev``).

    Unmasked (server side), each message is its 2-4 byte header and the payload object itself:
    the payload is not copied into a joined frame (decision 0019). ``b"".join`` of the result is
    :func:`frame_messages`.
    """
    if mask:
        return [build_frame(Opcode.BINARY, p, mask=True) for p in payloads]
    parts: list[bytes | bytearray | memoryview] = []
    for p in payloads:
        n = len(p)
        if n < 126:
            parts.append(bytes((0x82, n)))
        elif n < 65536:
            parts.append(b"\x82\x7e" + n.to_bytes(2, "big"))
        else:
            parts.append(b"\x82\x7f" + n.to_bytes(8, "big"))
        parts.append(p)
    return parts


def frame_ping(payload: bytes = b"", *, mask: bool) -> bytes:
    """A ping frame; ``payload`` must be at most 125 bytes."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("ping payload longer than 125 bytes")
    return build_frame(Opcode.PING, payload, mask=mask)


def frame_pong(payload: bytes = b"", *, mask: bool) -> bytes:
    """A pong frame; ``payload`` must be at most 125 bytes."""
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("pong payload longer than 125 bytes")
    return build_frame(Opcode.PONG, payload, mask=mask)


def frame_close(code: int | None, reason: str = "", *, mask: bool) -> bytes:
    """A close frame.

    Args:
        code: the close code (1000-4999, not one of the reserved 1004/1005/1006/1015), or ``None``
            for an empty close payload.
        reason: UTF-8 text, cut at a character boundary to fit 123 bytes.
        mask: mask the payload (client side).

    Raises:
        ValueError: the code may not be sent on the wire.
    """
    if code is None:
        return build_frame(Opcode.CLOSE, b"", mask=mask)
    if not _valid_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    return build_frame(Opcode.CLOSE, _U16.pack(code) + clip_close_reason(reason).encode(), mask=mask)


def _valid_close_code(code: int) -> bool:
    # RFC 6455 §7.4: 1000-1003 and 1007-1014 are defined for the wire (1012-1014 by IANA later),
    # 3000-4999 are for libraries and applications. 1004/1005/1006/1015 must never be sent.
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


# --------------------------------------------------------------------------------------- parser


@dataclass(frozen=True, slots=True)
class Ping:
    """A ping arrived; the parser already queued the pong (see :meth:`FrameParser.data_to_send`)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    """A pong arrived."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseFrameReceived:
    """The peer sent a close frame.

    Attributes:
        code: the close code, or ``None`` when the close payload was empty (RFC 1005).
        reason: the reason text ("" if none).
    """

    code: int | None
    reason: str


Event = bytes | Ping | Pong | CloseFrameReceived
"""What :meth:`FrameParser.feed` yields: a complete binary message is plain ``bytes``."""


def _fail(message: str) -> ProtocolError:
    return ProtocolError(message, CloseCode.PROTOCOL_ERROR)


class FrameFloodError(ProtocolError):
    """Too many frames for what they carry (a ``PROTOCOL_ERROR``, 4010).

    Attributes:
        kind: ``"fragments"`` (a message of more than :data:`MAX_FRAGMENTS` frames) or
            ``"small_frames"`` (over the :class:`FrameBudget`); the relay counts closes by it.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message, CloseCode.PROTOCOL_ERROR, kind=kind)


class FrameBudget:
    """How many frames a connection may send: a token bucket in frames, refilled by time and bytes.

    Sans-I/O: every call takes ``now``. Each frame takes one token; ``rate`` tokens come back every
    second and one for every ``frame_bytes`` bytes received; the bucket holds at most ``burst``.
    See :data:`FRAME_RATE` for why.

    Args:
        now: the current time (any monotonic origin); the bucket starts full.
    """

    __slots__ = ("_stamp", "_tokens", "burst", "frame_bytes", "rate")

    def __init__(
        self,
        now: float,
        *,
        rate: float = FRAME_RATE,
        burst: float = FRAME_BURST,
        frame_bytes: int = FRAME_BYTES,
    ) -> None:
        if rate <= 0 or burst < 1 or frame_bytes < 1:
            raise ValueError("rate, burst and frame_bytes must be positive")
        self.rate = rate
        self.burst = burst
        self.frame_bytes = frame_bytes
        self._tokens = burst
        self._stamp = now

    def charge(self, frames: int, nbytes: int, now: float) -> bool:
        """Take ``frames`` frames that arrived in ``nbytes`` bytes; False once over the budget."""
        tokens = self._tokens + nbytes / self.frame_bytes
        if now > self._stamp:
            tokens += (now - self._stamp) * self.rate
            self._stamp = now
        if tokens > self.burst:
            tokens = self.burst
        tokens -= frames
        self._tokens = tokens
        return tokens >= 0


class FrameParser:
    """Incremental RFC 6455 frame parser for one side of a connection.

    Feed it bytes as they arrive; it returns every event the bytes complete. Binary messages are
    returned as ``bytes`` (continuation frames already joined); pings come back as :class:`Ping` and
    their pong is queued for :meth:`data_to_send`; a close frame ends parsing (later bytes are
    ignored, as RFC 6455 §5.5.1 says nothing may follow it).

    Args:
        client: ``True`` on the client side (frames from the server must not be masked),
            ``False`` on the server side (frames from the client must be masked).
        max_message: the largest message accepted, summed over its continuation frames.

    Raises from :meth:`feed`:
        ProtocolError (code 4010): a text message, an oversize message, RSV bits set, an unknown
        opcode, wrong masking, a fragmented or >125-byte control frame, a continuation frame with
        no message to continue, a new message inside a fragmented one, a non-minimal length, or a
        bad close payload (1 byte, invalid code, invalid UTF-8); :class:`FrameFloodError` (a
        ProtocolError, ``kind="fragments"``) for a message of more than :data:`MAX_FRAGMENTS`
        frames. After it raises, the parser is unusable and the connection must be closed. (Frames
        per second are the owner's to bound: :class:`FrameBudget` with :attr:`frames`.)
    """

    __slots__ = (
        "_closed",
        "_expect_mask",
        "_failed",
        "_frag",
        "_frag_count",
        "_frames",
        "_max",
        "_pong",
        "_tail",
    )

    def __init__(self, *, client: bool, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < 1:
            raise ValueError("max_message must be positive")
        self._expect_mask = not client
        self._max = max_message
        # Bytes of an incomplete frame kept between feeds: at most one frame header plus one
        # payload (the length is checked against max_message before we wait for the payload).
        self._tail = bytearray()
        # The parts of a fragmented message, joined as they come: one buffer of at most max_message
        # bytes however many frames carried them (a list of parts cost a pointer and an object per
        # frame, empty ones included). _frag_count <= MAX_FRAGMENTS.
        self._frag: bytearray | None = None
        self._frag_count = 0
        self._frames = 0  # frames parsed so far, for the owner's FrameBudget
        # Only the pong for the most recent ping is kept (RFC 6455 §5.5.3 allows it): a flood of
        # pings can never grow this beyond one frame.
        self._pong = b""
        self._closed = False
        self._failed = False

    @property
    def closed(self) -> bool:
        """Whether a close frame was parsed (nothing after it is parsed)."""
        return self._closed

    @property
    def buffered(self) -> int:
        """Bytes held: an incomplete frame plus the parts of an incomplete fragmented message."""
        return len(self._tail) + (len(self._frag) if self._frag is not None else 0)

    @property
    def frames(self) -> int:
        """Frames parsed so far (every opcode; a frame counts once it is complete)."""
        return self._frames

    def data_to_send(self) -> bytes:
        """The pong owed for the last ping, if any; clears it."""
        out, self._pong = self._pong, b""
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse ``data`` together with any bytes left from earlier calls.

        ``data`` is not referenced after the call returns, so the caller may reuse its buffer.

        Returns:
            The complete events, in order (possibly empty).

        Raises:
            ProtocolError: the bytes break RFC 6455 or this relay's rules (see the class docs).
        """
        if self._failed:
            raise _fail("connection already failed")
        if self._closed:
            return []
        try:
            if self._tail:
                return self._feed_after_tail(data)
            events, pos = self._parse(data)
        except ProtocolError:
            self._failed = True
            raise
        if pos < len(data):
            self._tail += data[pos:]
        return events

    def _feed_after_tail(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Complete the frame held in the tail with just the bytes it lacks; parse the rest in place.

        Appending all of ``data`` to the tail (as this once did) copied every read that followed
        a frame split across reads -- nearly every read of a 16 KiB flow -- once more (0019).
        """
        tail = self._tail
        events: list[Event] = []
        n = len(data)
        off = 0
        while tail:
            if off >= n:
                return events
            size = _frame_size(tail)
            # what the tail lacks: the rest of its first frame, or enough for the longest header
            take = min((size if size else _MAX_HEAD) - len(tail), n - off)
            tail += data[off : off + take]
            off += take
            view = memoryview(tail)
            try:
                got, pos = self._parse(view)
            finally:
                view.release()
            del tail[:pos]
            events += got
            if self._closed:
                return events
        if off < n:
            rest = data[off:] if off else data
            got, pos = self._parse(rest)
            events += got
            if pos < len(rest) and not self._closed:
                tail += rest[pos:]
        return events

    def _parse(self, buf: bytes | bytearray | memoryview) -> tuple[list[Event], int]:
        events: list[Event] = []
        n = len(buf)
        pos = 0
        expect_mask = self._expect_mask
        mask_bit = 0x80 if expect_mask else 0
        key_len = 4 if expect_mask else 0
        max_message = self._max
        frames = 0
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            # Fast path: a whole binary message in one frame, correctly masked, length < 64 KiB
            # (nearly every relayed message). Anything else takes the general path below.
            if b0 == 0x82 and b1 & 0x80 == mask_bit and self._frag is None:
                length = b1 & 0x7F
                if length < 126:
                    start = pos + 2 + key_len
                elif length == 126 and n - pos >= 4:
                    length = _U16.unpack_from(buf, pos + 2)[0]
                    if length < 126:
                        raise _fail("non-minimal 16-bit payload length")
                    start = pos + 4 + key_len
                else:
                    start = -1
                if start >= 0:
                    if length > max_message:
                        raise _fail(f"message larger than {max_message} bytes")
                    end = start + length
                    if end > n:
                        break
                    if key_len:
                        events.append(apply_mask(buf[start:end], buf[start - 4 : start]))
                    else:
                        events.append(bytes(buf[start:end]))
                    pos = end
                    frames += 1
                    continue
            if b0 & 0x70:
                raise _fail("RSV bits set but no extension was negotiated")
            opcode = b0 & 0x0F
            if bool(b1 & 0x80) is not expect_mask:
                raise _fail("client frame not masked" if expect_mask else "server frame masked")
            length = b1 & 0x7F
            if opcode >= 0x8:
                if opcode > 0xA:
                    raise _fail(f"unknown opcode {opcode:#x}")
                if not b0 & 0x80:
                    raise _fail("fragmented control frame")
                if length > MAX_CONTROL_PAYLOAD:
                    raise _fail("control frame payload longer than 125 bytes")
                head = 2
            elif opcode == 0x2 or opcode == 0x0:
                if length < 126:
                    head = 2
                elif length == 126:
                    if n - pos < 4:
                        break
                    length = _U16.unpack_from(buf, pos + 2)[0]
                    if length < 126:
                        raise _fail("non-minimal 16-bit payload length")
                    head = 4
                else:
                    if n - pos < 10:
                        break
                    length = _U64.unpack_from(buf, pos + 2)[0]
                    if length < 65536 or length >> 63:
                        raise _fail("bad 64-bit payload length")
                    head = 10
                if opcode == 0x2:
                    if self._frag is not None:
                        raise _fail("new message started inside a fragmented message")
                    if length > max_message:
                        raise _fail(f"message larger than {max_message} bytes")
                else:
                    if self._frag is None:
                        raise _fail("continuation frame without a message to continue")
                    if len(self._frag) + length > max_message:
                        raise _fail(f"message larger than {max_message} bytes")
                    if self._frag_count >= MAX_FRAGMENTS:
                        raise FrameFloodError(
                            "fragments", f"a message in more than {MAX_FRAGMENTS} fragments"
                        )
            elif opcode == 0x1:
                raise _fail("text messages are not allowed (binary only)")
            else:
                raise _fail(f"unknown opcode {opcode:#x}")
            if expect_mask:
                head += 4
            end = pos + head + length
            if end > n:
                break
            if expect_mask:
                payload = apply_mask(buf[pos + head : end], buf[pos + head - 4 : pos + head])
            else:
                payload = bytes(buf[pos + head : end])
            pos = end
            frames += 1
            if opcode == 0x2:
                if b0 & 0x80:
                    events.append(payload)
                else:
                    self._frag = bytearray(payload)
                    self._frag_count = 1
            elif opcode == 0x0:
                frag = self._frag
                assert frag is not None
                frag += payload
                if b0 & 0x80:
                    events.append(bytes(frag))
                    self._frag = None
                    self._frag_count = 0
                else:
                    self._frag_count += 1
            elif opcode == 0x9:
                events.append(Ping(payload))
                self._pong = build_frame(Opcode.PONG, payload, mask=not expect_mask)
            elif opcode == 0xA:
                events.append(Pong(payload))
            else:
                events.append(_parse_close(payload))
                self._closed = True
                self._frag = None
                self._frag_count = 0
                self._frames += frames
                return events, n
        self._frames += frames
        return events, pos


# The longest frame header: 2 bytes, a 64-bit length, a 4-byte masking key.
_MAX_HEAD: Final = 14


def _frame_size(buf: bytearray) -> int:
    """The whole size of the frame ``buf`` starts with, from its header; 0 if the header is incomplete.

    Not a validation (the parser does that): a bad header just yields some size, and the parser
    rejects the frame once it sees its header.
    """
    have = len(buf)
    if have < 2:
        return 0
    b1 = buf[1]
    length = b1 & 0x7F
    head = 6 if b1 & 0x80 else 2
    if length == 126:
        if have < 4:
            return 0
        return head + 2 + int(_U16.unpack_from(buf, 2)[0])
    if length == 127:
        if have < 10:
            return 0
        return head + 8 + int(_U64.unpack_from(buf, 2)[0])
    return head + length


_TLS_HEADER: Final = 5  # content type, version (2), length (2): RFC 8446 §5.1


class TLSRecords:
    """Where a peer's stream of TLS records stands: whether one is partly received.

    Fed every ciphertext byte the peer sent, in order, from the first (the handshake's records
    too), it follows the record headers only: no decryption, no validation (OpenSSL does both).
    The read path lowers a quiet socket's ``SO_RCVLOWAT`` while a record is partly in, since
    its rest may be shorter than the quiet mark (decision 0015).
    """

    __slots__ = ("_head", "_left")

    def __init__(self) -> None:
        self._head = b""  # the first bytes of a record header (fewer than 5)
        self._left = 0  # bytes of the current record's body still to come

    @property
    def partial(self) -> bool:
        """Whether a record has begun and not ended."""
        return self._left > 0 or len(self._head) > 0

    def fed(self, data: bytes | bytearray | memoryview) -> None:
        """``data`` arrived, right after everything fed before."""
        n = len(data)
        pos = 0
        left = self._left
        while pos < n:
            if left:
                step = min(left, n - pos)
                left -= step
                pos += step
                continue
            take = min(_TLS_HEADER - len(self._head), n - pos)
            head = self._head + bytes(data[pos : pos + take])
            pos += take
            if len(head) < _TLS_HEADER:
                self._head = head
            else:
                self._head = b""
                left = (head[3] << 8) | head[4]
        self._left = left


def _parse_close(payload: bytes) -> CloseFrameReceived:
    if not payload:
        return CloseFrameReceived(None, "")
    if len(payload) == 1:
        raise _fail("close payload of one byte")
    code = _U16.unpack_from(payload)[0]
    if not _valid_close_code(code):
        raise _fail(f"invalid close code {code}")
    try:
        reason = payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise _fail("close reason is not valid UTF-8") from None
    return CloseFrameReceived(code, reason)


# ------------------------------------------------------------------------------------ handshake


class HandshakeError(ProtocolError):
    """The HTTP upgrade failed (either side).

    Attributes:
        status: the HTTP status the server answers (server side), or the status the server sent
            (client side; 0 if the response was not even HTTP).
        error: a short machine-readable reason (``"bad_request"``, ``"not_found"``, …; on the client
            side, the ``error`` field of the server's JSON body when there was one).
        detail: a human-readable sentence.
        headers: extra response headers the server must send with the error (e.g. 426's
            ``Sec-WebSocket-Version: 13``).
    """

    def __init__(
        self, status: int, error: str, detail: str, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(f"handshake failed: {status} {error}: {detail}", CloseCode.PROTOCOL_ERROR)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


class Rejection(NamedTuple):
    """An HTTP-level refusal of an upgrade (returned by a server's ``accept_check`` hook)."""

    status: int
    error: str
    detail: str


@dataclass(frozen=True, slots=True)
class Request:
    """A parsed, valid WebSocket upgrade request.

    Attributes:
        method: always ``"GET"``.
        target: the request target as sent (path plus any query).
        path: the target without its query string.
        headers: every header as ``(lower-case name, value)`` in arrival order.
        key: the ``Sec-WebSocket-Key`` value.
    """

    method: str
    target: str
    path: str
    headers: tuple[tuple[str, str], ...]
    key: str

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive; repeated headers joined with ", ")."""
        return _header(self.headers, name)


@dataclass(frozen=True, slots=True)
class Response:
    """A parsed HTTP response head (client side).

    Attributes:
        status: the status code.
        reason: the reason phrase.
        headers: every header as ``(lower-case name, value)``.
    """

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive; repeated headers joined with ", ")."""
        return _header(self.headers, name)


def _header(headers: tuple[tuple[str, str], ...], name: str) -> str | None:
    name = name.lower()
    values = [v for k, v in headers if k == name]
    return ", ".join(values) if values else None


def _tokens(value: str | None) -> set[str]:
    return {t.strip().lower() for t in value.split(",")} if value else set()


def find_head_end(buf: bytes | bytearray) -> int:
    """Where an HTTP head ends in ``buf``.

    Returns:
        The index just past the blank line ending the head, or ``-1`` if it is not complete yet.

    Raises:
        HandshakeError: status 431, the head is (or has grown) longer than ``MAX_HANDSHAKE_SIZE``.
    """
    idx = buf.find(_HEAD_END, 0, MAX_HANDSHAKE_SIZE)
    if idx >= 0:
        return idx + 4
    if len(buf) >= MAX_HANDSHAKE_SIZE:
        raise HandshakeError(431, "headers_too_large", f"request head exceeds {MAX_HANDSHAKE_SIZE} bytes")
    return -1


def check_request_start(buf: bytes | bytearray, checked: int = 0) -> int:
    """:func:`rescue._http1.check_request_line` for an upgrade request still arriving: a head that
    can never become a request is refused at once, not at the upgrade timeout.

    Raises:
        HandshakeError: 400 ``bad_request``.
    """
    try:
        return check_request_line(buf, checked, MAX_HANDSHAKE_SIZE)
    except HttpError as exc:
        raise HandshakeError(exc.status, exc.error, exc.detail) from None


def _parse_head(head: bytes, status_on_error: int) -> tuple[str, list[tuple[str, str]]]:
    """The start line and the headers of an HTTP head (``head`` ends with CRLF CRLF)."""
    try:
        return parse_head(head, max_size=MAX_HANDSHAKE_SIZE)
    except HttpError as exc:
        status = exc.status if exc.status == 431 else status_on_error
        raise HandshakeError(status, exc.error, exc.detail) from None


def parse_request(head: bytes, *, path: str | None = None) -> Request:
    """Validate a WebSocket upgrade request head.

    Args:
        head: the request head, up to and including the blank line (see :func:`find_head_end`).
        path: the only path served (the query string is ignored), or ``None`` for any path.

    Returns:
        The parsed request.

    Raises:
        HandshakeError: with the status to answer — 400 malformed or a bad/missing key or Host,
            404 wrong path, 405 not GET, 426 not an upgrade or a version other than 13, 431 head
            too large.
    """
    start, headers = _parse_head(head, 400)
    parts = start.split(" ")
    if len(parts) != 3 or not parts[1] or not parts[2].startswith("HTTP/"):
        raise HandshakeError(400, "bad_request", "malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeError(400, "bad_request", "HTTP/1.1 is required")
    hdrs = tuple(headers)
    if method != "GET":
        raise HandshakeError(405, "method_not_allowed", "only GET upgrades", headers=(("Allow", "GET"),))
    req_path = target.partition("?")[0]
    if path is not None and req_path != path:
        raise HandshakeError(404, "not_found", f"only {path} is served")
    if _header(hdrs, "host") is None:
        raise HandshakeError(400, "bad_request", "missing Host header")
    upgrade_headers = (("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Version", "13"))
    if "websocket" not in _tokens(_header(hdrs, "upgrade")):
        raise HandshakeError(426, "upgrade_required", "Upgrade: websocket required", headers=upgrade_headers)
    if "upgrade" not in _tokens(_header(hdrs, "connection")):
        raise HandshakeError(426, "upgrade_required", "Connection: upgrade required", headers=upgrade_headers)
    if _header(hdrs, "sec-websocket-version") != "13":
        raise HandshakeError(
            426, "unsupported_version", "Sec-WebSocket-Version 13 required", headers=upgrade_headers
        )
    key = _header(hdrs, "sec-websocket-key")
    if key is None:
        raise HandshakeError(400, "bad_request", "missing Sec-WebSocket-Key")
    try:
        raw = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw = b""
    if len(raw) != 16:
        raise HandshakeError(400, "bad_request", "Sec-WebSocket-Key is not 16 bytes of base64")
    return Request(method=method, target=target, path=req_path, headers=hdrs, key=key)


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def switching_protocols(request: Request) -> bytes:
    """The 101 response accepting ``request``.

    No ``Sec-WebSocket-Extensions`` (permessage-deflate is refused: bodies are ciphertext) and no
    ``Sec-WebSocket-Protocol`` are ever sent, whatever the client offered.
    """
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(request.key)}\r\n\r\n"
    ).encode("ascii")


def error_response(status: int, error: str, detail: str, *, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """An HTTP error response with a small JSON body ``{"error": …, "detail": …}``.

    The connection is always closed after it (``Connection: close``).
    """
    body = json.dumps({"error": error, "detail": detail}, separators=(",", ":")).encode("utf-8")
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def new_key() -> str:
    """A fresh random ``Sec-WebSocket-Key``."""
    return base64.b64encode(os.urandom(16)).decode("ascii")


def build_request(host: str, path: str, key: str, *, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A client's upgrade request (no extensions, no subprotocols offered).

    Args:
        host: the ``Host`` header value (``host`` or ``host:port``).
        path: the request target.
        key: from :func:`new_key`.
        headers: extra headers (must not contain CR or LF).
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    for k, v in headers:
        if any(c in k + v for c in "\r\n"):
            raise ValueError("header names and values may not contain CR or LF")
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_response(head: bytes, key: str, body: bytes = b"") -> Response:
    """Validate the server's answer to an upgrade request.

    Args:
        head: the response head, up to and including the blank line.
        key: the ``Sec-WebSocket-Key`` that was sent.
        body: whatever of the body has been read (used for the error message on a refusal).

    Returns:
        The parsed 101 response.

    Raises:
        HandshakeError: not a 101 (``status`` is the server's status; ``error``/``detail`` come from
            its JSON body when it has one), or a 101 that fails RFC 6455 §4.1 checks (status 101),
            or not HTTP at all (status 0).
    """
    start, headers = _parse_head(head, 0)
    parts = start.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HandshakeError(0, "bad_response", "not an HTTP response")
    status = int(parts[1])
    reason = parts[2] if len(parts) == 3 else ""
    hdrs = tuple(headers)
    if status != 101:
        error, detail = "http_error", f"server answered {status} {reason}".rstrip()
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            error = str(doc.get("error", error))
            detail = str(doc.get("detail", detail))
        raise HandshakeError(status, error, detail)
    if "websocket" not in _tokens(_header(hdrs, "upgrade")):
        raise HandshakeError(101, "bad_response", "101 without Upgrade: websocket")
    if "upgrade" not in _tokens(_header(hdrs, "connection")):
        raise HandshakeError(101, "bad_response", "101 without Connection: upgrade")
    if _header(hdrs, "sec-websocket-accept") != accept_key(key):
        raise HandshakeError(101, "bad_response", "wrong Sec-WebSocket-Accept")
    if _header(hdrs, "sec-websocket-extensions") is not None:
        raise HandshakeError(101, "bad_response", "server accepted an extension that was not offered")
    if _header(hdrs, "sec-websocket-protocol") is not None:
        raise HandshakeError(101, "bad_response", "server chose a subprotocol that was not offered")
    return Response(status=status, reason=reason, headers=hdrs)
