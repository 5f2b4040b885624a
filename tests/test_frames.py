"""The 12-byte frame header (rescue/protocol/_frames.py, SPEC §2)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.protocol import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    Flags,
    Frame,
    Header,
    Kind,
    decode_frame,
    decode_header,
    encode_frame,
    encode_header,
)
from rescue.protocol._frames import MAX_SEQ

U64 = st.integers(min_value=0, max_value=MAX_SEQ)
SEQ = st.integers(min_value=1, max_value=MAX_SEQ)
BODY = st.binary(max_size=256)


def _raw(version: int = 1, kind: int = 0, flags: int = 0, channel: int = 0, seq: int = 0) -> bytes:
    return struct.pack(">BBBBQ", version, kind, flags, channel, seq)


@st.composite
def valid_headers(draw: st.DrawFn) -> Header:
    """Every header the rules allow, kind by kind."""
    kind = draw(st.sampled_from(Kind))
    if kind is Kind.DATA:
        flags = draw(st.sampled_from([Flags.NONE, Flags.COMPRESSED]))
        return Header(kind, flags, draw(st.integers(0, 255)), draw(SEQ))
    if kind is Kind.CONTROL:
        flags = Flags(draw(st.integers(0, 3)))
        return Header(kind, flags, 0, draw(SEQ))
    if kind is Kind.HEARTBEAT:
        return Header(kind, seq=draw(U64))
    return Header(kind)


@given(valid_headers(), BODY)
def test_round_trip_of_every_valid_header(header: Header, body: bytes) -> None:
    if header.kind is Kind.HEARTBEAT:
        body = b""
    raw = encode_frame(header.kind, body, flags=header.flags, channel=header.channel, seq=header.seq)
    assert len(raw) == HEADER_SIZE + len(body)
    assert raw[:HEADER_SIZE] == header.encode()
    frame = decode_frame(raw)
    assert frame == Frame(header, body)
    assert frame.encode() == raw
    assert decode_header(raw) == header
    assert header.unsequenced == bool(header.flags & Flags.UNSEQUENCED)


@given(st.binary(max_size=64))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    error: ProtocolError | None = None
    try:
        frame = decode_frame(data)
    except ProtocolError as exc:
        error = exc
    else:
        assert frame.encode() == data  # anything accepted re-encodes to the same bytes
    if error is not None:
        assert error.code is CloseCode.PROTOCOL_ERROR


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), U64)
def test_decode_accepts_exactly_what_encode_produces(
    version: int, kind: int, flags: int, channel: int, seq: int
) -> None:
    """decode_header and encode_header agree on every possible header (no rule is one-sided)."""
    raw = _raw(version, kind, flags, channel, seq)
    try:
        header = decode_header(raw)
    except ProtocolError:
        accepted = False
    else:
        accepted = True
        assert header.encode() == raw
    if version != 1:
        return  # encode_header always writes version 1
    try:
        made = encode_header(Kind(kind), flags=Flags(flags), channel=channel, seq=seq)
    except (ValueError, ProtocolError):
        assert not accepted
    else:
        assert accepted
        assert made == raw


def test_header_layout_is_big_endian() -> None:
    raw = encode_header(Kind.DATA, flags=Flags.COMPRESSED, channel=2, seq=0x0102030405060708)
    assert raw.hex() == "010101020102030405060708"


@pytest.mark.parametrize("data", [b"", b"\x01", _raw()[:11]])
def test_short_input(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="shorter than the 12-byte header"):
        decode_header(data)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode_header(_raw(version=version, kind=Kind.DATA, seq=1))


@pytest.mark.parametrize("kind", [0x04, 0x0F, 0x13, 0x20, 0xFF])
def test_unknown_kind(kind: int) -> None:
    with pytest.raises(ProtocolError, match="unknown message kind") as info:
        decode_header(_raw(kind=kind))
    assert info.value.code is CloseCode.PROTOCOL_ERROR


@pytest.mark.parametrize("flags", [0x04, 0x08, 0x80, 0xFC, 0x07])
def test_reserved_flag_bits(flags: int) -> None:
    with pytest.raises(ProtocolError, match="reserved flag bits"):
        decode_header(_raw(kind=Kind.CONTROL, flags=flags, seq=1))


def test_unsequenced_only_on_control() -> None:
    decode_header(_raw(kind=Kind.CONTROL, flags=Flags.UNSEQUENCED, seq=1))
    with pytest.raises(ProtocolError, match="only CONTROL may be UNSEQUENCED"):
        decode_header(_raw(kind=Kind.DATA, flags=Flags.UNSEQUENCED, seq=1))


@pytest.mark.parametrize("kind", [Kind.HEARTBEAT, Kind.CLOSE, Kind.HELLO, Kind.WELCOME, Kind.PEER])
@pytest.mark.parametrize("flags", [Flags.COMPRESSED, Flags.UNSEQUENCED])
def test_flags_only_on_relayed_kinds(kind: Kind, flags: Flags) -> None:
    with pytest.raises(ProtocolError, match="carries no flags"):
        decode_header(_raw(kind=kind, flags=flags))


@pytest.mark.parametrize(
    "kind", [Kind.CONTROL, Kind.HEARTBEAT, Kind.CLOSE, Kind.HELLO, Kind.WELCOME, Kind.PEER]
)
def test_channel_only_on_data(kind: Kind) -> None:
    seq = 1 if kind is Kind.CONTROL else 0
    with pytest.raises(ProtocolError, match="must use channel 0"):
        decode_header(_raw(kind=kind, channel=1, seq=seq))
    decode_header(_raw(kind=Kind.DATA, channel=255, seq=1))


@pytest.mark.parametrize("kind", [Kind.DATA, Kind.CONTROL])
@pytest.mark.parametrize("flags", [Flags.NONE, Flags.COMPRESSED])
def test_seq_zero_on_sequenced_kinds(kind: Kind, flags: Flags) -> None:
    with pytest.raises(ProtocolError, match="start at 1"):
        decode_header(_raw(kind=kind, flags=flags, seq=0))


def test_seq_zero_on_unsequenced_control() -> None:
    with pytest.raises(ProtocolError, match="start at 1"):
        decode_header(_raw(kind=Kind.CONTROL, flags=Flags.UNSEQUENCED, seq=0))


@pytest.mark.parametrize("kind", [Kind.CLOSE, Kind.HELLO, Kind.WELCOME, Kind.PEER])
@pytest.mark.parametrize("seq", [1, MAX_SEQ])
def test_seq_forbidden_on_relay_kinds(kind: Kind, seq: int) -> None:
    with pytest.raises(ProtocolError, match="must carry seq 0"):
        decode_header(_raw(kind=kind, seq=seq))


@pytest.mark.parametrize("seq", [0, 1, MAX_SEQ])
def test_heartbeat_echoes_any_seq(seq: int) -> None:
    assert decode_frame(_raw(kind=Kind.HEARTBEAT, seq=seq)).header.seq == seq


def test_heartbeat_with_body() -> None:
    with pytest.raises(ProtocolError, match="HEARTBEAT has an empty body"):
        decode_frame(_raw(kind=Kind.HEARTBEAT) + b"x")
    with pytest.raises(ValueError, match="empty body"):
        encode_frame(Kind.HEARTBEAT, b"x")


def test_oversize_message() -> None:
    body = b"\0" * (DEFAULT_MAX_FRAME - HEADER_SIZE)
    raw = encode_frame(Kind.DATA, body, seq=1)
    assert decode_frame(raw).body == body  # exactly max_frame, header included: fine
    with pytest.raises(ProtocolError, match="exceeds max_frame"):
        decode_frame(raw + b"\0")
    with pytest.raises(ProtocolError, match="exceeds max_frame"):
        decode_frame(encode_frame(Kind.DATA, b"abcde", seq=1), max_frame=HEADER_SIZE + 4)


def test_decode_accepts_buffer_types() -> None:
    raw = encode_frame(Kind.DATA, b"hi", channel=1, seq=7)
    assert decode_header(memoryview(raw)) == decode_header(bytearray(raw)) == decode_header(raw)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"channel": 256}, ValueError),
        ({"channel": -1}, ValueError),
        ({"seq": MAX_SEQ + 1}, ValueError),
        ({"seq": -1}, ValueError),
        ({"flags": 0x100}, ValueError),
        ({"seq": 5}, ProtocolError),  # CLOSE with a seq: the decode rules apply on encode too
    ],
)
def test_encode_header_rejects_invalid_values(kwargs: dict[str, int], error: type[Exception]) -> None:
    with pytest.raises(error):
        encode_header(Kind.CLOSE, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", [-1, 256, 0x05])
def test_encode_header_rejects_invalid_kinds(kind: int) -> None:
    with pytest.raises((ValueError, ProtocolError)):
        encode_header(kind)  # type: ignore[arg-type]


@given(valid_headers(), st.integers(1, HEADER_SIZE - 1))
def test_any_truncated_header_is_rejected(header: Header, cut: int) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(header.encode()[:cut])
