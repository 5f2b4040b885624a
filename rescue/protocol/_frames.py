"""The 12-byte frame header (SPEC §2) and whole-message encode/decode.

One WebSocket binary message carries exactly one frame: header + body. ``max_frame`` limits the whole
message, header included.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from rescue.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HEADER",
    "HEADER_SIZE",
    "MAX_SEQ",
    "VERSION",
    "Flags",
    "Frame",
    "Header",
    "Kind",
    "decode_frame",
    "decode_header",
    "encode_frame",
    "encode_header",
]

VERSION: Final = 1
HEADER: Final = struct.Struct(">BBBBQ")  # version, kind, flags, channel, seq
HEADER_SIZE: Final = HEADER.size  # 12
# 64 KiB: a terminal burst fits in one frame, and the relay's per-direction queues stay small.
DEFAULT_MAX_FRAME: Final = 65536
MAX_SEQ: Final = 2**64 - 1


class Kind(enum.IntEnum):
    CONTROL = 0x00
    DATA = 0x01
    HEARTBEAT = 0x02
    CLOSE = 0x03
    HELLO = 0x10
    WELCOME = 0x11
    PEER = 0x12


class Flags(enum.IntFlag):
    NONE = 0
    COMPRESSED = 0x01  # body compressed before encryption (peer-to-peer)
    UNSEQUENCED = 0x02  # CONTROL only: transport ack/resume with its own counter


_KNOWN_KINDS: Final = frozenset(int(k) for k in Kind)
_KNOWN_FLAGS: Final = int(Flags.COMPRESSED | Flags.UNSEQUENCED)
_SEQUENCED_KINDS: Final = frozenset({Kind.CONTROL, Kind.DATA})


@dataclass(frozen=True, slots=True)
class Header:
    kind: Kind
    flags: Flags = Flags.NONE
    channel: int = 0
    seq: int = 0
    version: int = VERSION

    def encode(self) -> bytes:
        return HEADER.pack(self.version, self.kind, self.flags, self.channel, self.seq)

    @property
    def unsequenced(self) -> bool:
        return bool(self.flags & Flags.UNSEQUENCED)


@dataclass(frozen=True, slots=True)
class Frame:
    header: Header
    body: bytes = b""

    def encode(self) -> bytes:
        return self.header.encode() + self.body


def encode_header(kind: Kind, *, flags: Flags = Flags.NONE, channel: int = 0, seq: int = 0) -> bytes:
    """Pack a header, validating it with the same rules :func:`decode_header` applies."""
    if not _in_range(kind, flags, channel, seq):
        raise ValueError(f"kind {kind}, flags {flags}, channel {channel} or seq {seq} out of range")
    raw = HEADER.pack(VERSION, kind, flags, channel, seq)
    decode_header(raw)  # one set of rules for both directions
    return raw


def _in_range(kind: int, flags: int, channel: int, seq: int) -> bool:
    return 0 <= kind <= 0xFF and 0 <= flags <= 0xFF and 0 <= channel <= 0xFF and 0 <= seq <= MAX_SEQ


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Parse and validate the first 12 bytes of a message.

    Raises:
        ProtocolError: short input, unknown version, unknown kind, reserved flag bits, a flag or
            channel not allowed for the kind, or a seq that the kind forbids (all ``PROTOCOL_ERROR``).
    """
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"message of {len(data)} bytes is shorter than the 12-byte header")
    version, kind, flags, channel, seq = HEADER.unpack_from(data)
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    if kind not in _KNOWN_KINDS:
        raise ProtocolError(f"unknown message kind 0x{kind:02x}")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"reserved flag bits set: 0x{flags:02x}")
    k = Kind(kind)
    if flags and k not in _SEQUENCED_KINDS:
        raise ProtocolError(f"{k.name} carries no flags")
    if flags & Flags.UNSEQUENCED and k is not Kind.CONTROL:
        raise ProtocolError("only CONTROL may be UNSEQUENCED")
    if channel and k is not Kind.DATA:
        raise ProtocolError(f"{k.name} must use channel 0")
    if k in _SEQUENCED_KINDS:
        if seq == 0:
            raise ProtocolError(f"{k.name} sequence numbers start at 1")
    elif k is not Kind.HEARTBEAT and seq != 0:
        raise ProtocolError(f"{k.name} must carry seq 0")
    return Header(kind=k, flags=Flags(flags), channel=channel, seq=seq, version=version)


def encode_frame(
    kind: Kind, body: bytes = b"", *, flags: Flags = Flags.NONE, channel: int = 0, seq: int = 0
) -> bytes:
    """Header + body as one message."""
    if kind is Kind.HEARTBEAT and body:
        raise ValueError("HEARTBEAT has an empty body")
    return encode_header(kind, flags=flags, channel=channel, seq=seq) + body


def decode_frame(message: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> Frame:
    """Parse one whole message.

    Raises:
        ProtocolError: anything :func:`decode_header` rejects, a message over ``max_frame`` bytes,
            or a HEARTBEAT with a body.
    """
    if len(message) > max_frame:
        raise ProtocolError(f"message of {len(message)} bytes exceeds max_frame {max_frame}")
    header = decode_header(message)
    body = bytes(message[HEADER_SIZE:])
    if header.kind is Kind.HEARTBEAT and body:
        raise ProtocolError("HEARTBEAT has an empty body")
    return Frame(header, body)
