"""The sans-I/O WebSocket codec: frames, rejection rules, handshake (bytes in, events out)."""

from __future__ import annotations

import base64
import itertools
import json
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol
from wsproto.frame_protocol import Opcode as WsprotoOpcode

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.websocket import (
    FRAME_BURST,
    FRAME_BYTES,
    FRAME_RATE,
    MAX_FRAGMENTS,
    MAX_HANDSHAKE_SIZE,
    CloseFrameReceived,
    Event,
    FrameBudget,
    FrameFloodError,
    FrameParser,
    HandshakeError,
    Opcode,
    Ping,
    Pong,
    accept_key,
    build_frame,
    build_request,
    error_response,
    find_head_end,
    frame_binary,
    frame_close,
    frame_messages,
    frame_parts,
    frame_ping,
    frame_pong,
    new_key,
    parse_request,
    parse_response,
    switching_protocols,
)
from rescue.websocket._codec import _apply_mask_py, apply_mask

# ------------------------------------------------------------------------------------- helpers


def feed_chunks(parser: FrameParser, data: bytes, cuts: list[int]) -> list[Event]:
    """Feed ``data`` split at ``cuts`` (sorted offsets); all events in order."""
    events: list[Event] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        events.extend(parser.feed(memoryview(data)[start:cut]))
        start = cut
    return events


def encode_script(script: list[tuple[str, bytes, list[int]]], *, mask: bool) -> tuple[bytes, list[Event]]:
    """Frame a script of messages (fragmented at the given offsets) and pings.

    A fragmented message also gets a ping between its first and second fragment (RFC 6455 §5.4
    allows control frames there); that ping is reported before the message it interrupts.
    """
    wire = bytearray()
    expected: list[Event] = []
    for kind, payload, points in script:
        if kind == "ping":
            wire += build_frame(Opcode.PING, payload, mask=mask)
            expected.append(Ping(payload))
            continue
        inner = sorted({p % (len(payload) + 1) for p in points} - {0, len(payload)})
        bounds = [0, *inner, len(payload)]
        pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        for i, piece in enumerate(pieces):
            opcode = Opcode.BINARY if i == 0 else Opcode.CONTINUATION
            wire += build_frame(opcode, piece, mask=mask, fin=i == len(pieces) - 1)
            if i == 0 and len(pieces) > 1:
                wire += build_frame(Opcode.PING, b"mid", mask=mask)
                expected.append(Ping(b"mid"))
        expected.append(payload)
    return bytes(wire), expected


# Large payloads are one repeated byte: hypothesis is slow at drawing 64 KiB of random bytes and the
# parser does not care about content beyond the (unmasked) round trip the small ones check.
payloads = st.binary(max_size=300) | st.builds(
    lambda n, b: bytes([b]) * n, st.integers(126, 65_536), st.integers(0, 255)
)
script_item = st.one_of(
    st.tuples(st.just("msg"), payloads, st.lists(st.integers(min_value=0, max_value=70_000), max_size=4)),
    st.tuples(st.just("ping"), st.binary(max_size=125), st.just([])),
)


# --------------------------------------------------------------------------- split invariance


@given(
    script=st.lists(script_item, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=300_000), max_size=12),
    client_to_server=st.booleans(),
)
def test_any_fragmentation_and_chunking_yields_exactly_the_messages(
    script: list[tuple[str, bytes, list[int]]], cuts: list[int], client_to_server: bool
) -> None:
    wire, expected = encode_script(script, mask=client_to_server)
    parser = FrameParser(client=not client_to_server)
    events = feed_chunks(parser, wire, [c % (len(wire) + 1) for c in cuts])
    assert events == expected
    assert parser.buffered == 0
    pings = [e for e in expected if isinstance(e, Ping)]
    pong = parser.data_to_send()
    if pings:
        # Only the last ping is answered (RFC 6455 §5.5.3), masked iff we are the client.
        reply = FrameParser(client=client_to_server).feed(pong)
        assert reply == [Pong(pings[-1].payload)]
    else:
        assert pong == b""


def test_a_16k_batch_split_in_two_at_every_byte_offset_parses_the_same() -> None:
    # three large frames (16-bit lengths) around small ones: every cut lands once in every part
    # of a frame (header, masking key, payload) and on every boundary (decision 0019's tail path)
    batch = [bytes([i]) * size for i, size in enumerate((16_384, 5, 20_000, 0, 16_400))]
    for mask in (True, False):
        wire = frame_messages(batch, mask=mask)
        for cut in range(len(wire) + 1):
            parser = FrameParser(client=not mask)
            events = parser.feed(wire[:cut])
            assert parser.buffered < 20_000 + 8  # at most one frame is held
            events += parser.feed(memoryview(wire)[cut:])
            assert events == batch, cut
            assert parser.buffered == 0


@given(
    batch=st.lists(st.binary(max_size=300) | st.integers(126, 20_000).map(bytes), min_size=1, max_size=5),
    cuts=st.lists(st.integers(min_value=0, max_value=400_000), max_size=6),
    close_at=st.integers(min_value=0, max_value=5),
)
def test_a_split_stream_with_a_close_keeps_nothing_after_it(
    batch: list[bytes], cuts: list[int], close_at: int
) -> None:
    close_at = min(close_at, len(batch))
    wire = (
        frame_messages(batch[:close_at], mask=True)
        + frame_close(1000, "bye", mask=True)
        + frame_messages(batch[close_at:], mask=True)
    )
    parser = FrameParser(client=False)
    events = feed_chunks(parser, wire, [c % (len(wire) + 1) for c in cuts])
    assert events == [*batch[:close_at], CloseFrameReceived(1000, "bye")]
    assert parser.closed
    assert parser.buffered == 0


def test_a_tail_takes_only_what_its_frame_lacks() -> None:
    # a frame split across reads is completed from the next read, whose other frames are parsed
    # where they lie: only the last incomplete frame is kept
    first, second, third = b"a" * 16_384, b"b" * 1000, b"c" * 16_384
    wire = frame_messages([first, second, third], mask=True)
    parser = FrameParser(client=False)
    assert parser.feed(wire[:100]) == []
    cut = len(wire) - 10
    assert parser.feed(wire[100:cut]) == [first, second]
    assert parser.buffered == len(third) + 8 - 10
    assert parser.feed(wire[cut:]) == [third]


@given(batch=st.lists(payloads, max_size=6), mask=st.booleans())
def test_frame_parts_joined_are_frame_messages(batch: list[bytes], mask: bool) -> None:
    parts = frame_parts(batch, mask=mask)
    if not mask:
        assert b"".join(parts) == frame_messages(batch, mask=False)
        assert all(parts[i + 1] is p for i, p in zip(range(0, len(parts), 2), batch, strict=True))
    assert FrameParser(client=not mask).feed(b"".join(parts)) == batch


@given(batch=st.lists(payloads, max_size=6))
def test_frame_messages_round_trips_both_directions(batch: list[bytes]) -> None:
    assert FrameParser(client=True).feed(frame_messages(batch, mask=False)) == batch
    assert FrameParser(client=False).feed(frame_messages(batch, mask=True)) == batch


@given(data=st.binary(max_size=2000), client=st.booleans(), cuts=st.lists(st.integers(0, 2000), max_size=5))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes, client: bool, cuts: list[int]) -> None:
    parser = FrameParser(client=client, max_message=1000)
    error: ProtocolError | None = None
    try:
        feed_chunks(parser, data, [c % (len(data) + 1) for c in cuts])
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code == CloseCode.PROTOCOL_ERROR
        with pytest.raises(ProtocolError):
            parser.feed(b"")  # a failed parser stays failed


@given(data=st.binary(max_size=5000), mask=st.binary(min_size=4, max_size=4))
def test_c_and_python_unmasking_agree(data: bytes, mask: bytes) -> None:
    assert apply_mask(data, mask) == _apply_mask_py(data, mask)
    assert _apply_mask_py(_apply_mask_py(data, mask), mask) == data


# ----------------------------------------------------------------- independent implementation


@given(payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_wsproto_parses_our_client_frames(payloads: list[bytes]) -> None:
    proto = FrameProtocol(client=False, extensions=[])
    proto.receive_bytes(frame_messages(payloads, mask=True))
    frames = list(proto.received_frames())
    assert [(f.opcode, bytes(f.payload)) for f in frames] == [(WsprotoOpcode.BINARY, p) for p in payloads]


@given(payloads=st.lists(st.binary(max_size=3000), min_size=1, max_size=5))
def test_we_parse_wsproto_client_frames(payloads: list[bytes]) -> None:
    proto = FrameProtocol(client=True, extensions=[])
    wire = b"".join(proto.send_data(p, fin=True) for p in payloads)
    assert FrameParser(client=False).feed(wire) == payloads


# ----------------------------------------------------------------------------- rejection rules


def _rejects(wire: bytes, *, client: bool = False, max_message: int = 65536, match: str = "") -> None:
    parser = FrameParser(client=client, max_message=max_message)
    with pytest.raises(ProtocolError, match=match) as info:
        parser.feed(wire)
    assert info.value.code == CloseCode.PROTOCOL_ERROR == 4010


def test_text_message_is_a_protocol_error() -> None:
    _rejects(build_frame(Opcode.TEXT, b"hi", mask=True), match="text")


def test_oversize_message_is_rejected_from_its_header_alone() -> None:
    head = build_frame(Opcode.BINARY, b"x" * 1001, mask=True)[:8]  # payload not even sent
    _rejects(head, max_message=1000, match="larger")


def test_oversize_across_fragments_is_rejected() -> None:
    wire = build_frame(Opcode.BINARY, b"x" * 600, mask=True, fin=False)
    wire += build_frame(Opcode.CONTINUATION, b"x" * 401, mask=True)
    _rejects(wire, max_message=1000, match="larger")


def test_message_of_exactly_max_size_is_accepted() -> None:
    wire = build_frame(Opcode.BINARY, b"x" * 600, mask=True, fin=False)
    wire += build_frame(Opcode.CONTINUATION, b"y" * 400, mask=True)
    assert FrameParser(client=False, max_message=1000).feed(wire) == [b"x" * 600 + b"y" * 400]


@pytest.mark.parametrize("opcode", [Opcode.PING, Opcode.PONG, Opcode.CLOSE])
def test_fragmented_control_frame(opcode: Opcode) -> None:
    _rejects(build_frame(opcode, b"", mask=True, fin=False), match="fragmented control")


def test_control_frame_over_125_bytes() -> None:
    _rejects(build_frame(Opcode.PING, b"x" * 126, mask=True), match="125")


@pytest.mark.parametrize("rsv", [1, 2, 4])
def test_rsv_bits(rsv: int) -> None:
    _rejects(build_frame(Opcode.BINARY, b"z", mask=True, rsv=rsv), match="RSV")


@pytest.mark.parametrize("opcode", [3, 4, 5, 6, 7, 0xB, 0xC, 0xF])
def test_bad_opcodes(opcode: int) -> None:
    _rejects(build_frame(opcode, b"", mask=True), match="opcode")


def test_server_rejects_unmasked_client_frames() -> None:
    _rejects(frame_binary(b"a", False), match="not masked")


def test_client_rejects_masked_server_frames() -> None:
    _rejects(frame_binary(b"a", True), client=True, match="masked")


def test_continuation_without_a_message() -> None:
    _rejects(build_frame(Opcode.CONTINUATION, b"a", mask=True), match="continuation")


def test_new_message_inside_fragmented_message() -> None:
    wire = build_frame(Opcode.BINARY, b"a", mask=True, fin=False) + frame_binary(b"b", True)
    _rejects(wire, match="inside a fragmented")


def test_non_minimal_lengths() -> None:
    _rejects(b"\x82\xfe\x00\x05" + b"\x00" * 4 + b"hello", match="non-minimal")
    _rejects(b"\x82\xff" + struct.pack(">Q", 200) + b"\x00" * 4, match="64-bit")
    _rejects(b"\x82\xff" + struct.pack(">Q", 1 << 63) + b"\x00" * 4, match="64-bit")


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x03", "one byte"),
        (struct.pack(">H", 1005), "invalid close code"),
        (struct.pack(">H", 999), "invalid close code"),
        (struct.pack(">H", 2000), "invalid close code"),
        (struct.pack(">H", 5000), "invalid close code"),
        (struct.pack(">H", 1000) + b"\xff\xfe", "UTF-8"),
    ],
)
def test_bad_close_payloads(payload: bytes, match: str) -> None:
    _rejects(build_frame(Opcode.CLOSE, payload, mask=True), match=match)


# ------------------------------------------------------------------------------------- control


def test_close_frame_ends_parsing_and_keeps_earlier_messages() -> None:
    wire = frame_binary(b"one", True) + frame_close(4011, "replaced", mask=True) + frame_binary(b"no", True)
    parser = FrameParser(client=False)
    assert parser.feed(wire) == [b"one", CloseFrameReceived(4011, "replaced")]
    assert parser.closed
    assert parser.feed(frame_binary(b"later", True)) == []


def test_empty_close_payload_has_no_code() -> None:
    assert FrameParser(client=True).feed(frame_close(None, mask=False)) == [CloseFrameReceived(None, "")]


def test_pong_is_reported() -> None:
    assert FrameParser(client=False).feed(frame_pong(b"p", mask=True)) == [Pong(b"p")]
    assert FrameParser(client=True).feed(frame_ping(b"q", mask=False)) == [Ping(b"q")]


def test_control_payload_limits_on_the_sending_side() -> None:
    with pytest.raises(ValueError, match="125"):
        frame_ping(b"x" * 126, mask=False)
    with pytest.raises(ValueError, match="125"):
        frame_pong(b"x" * 126, mask=False)
    for bad in (1005, 1006, 999, 5000, 2999):
        with pytest.raises(ValueError, match="may not be sent"):
            frame_close(bad, mask=False)


def test_close_reason_is_cut_at_a_character_boundary() -> None:
    frame = frame_close(1000, "é" * 100, mask=False)  # 200 bytes of UTF-8
    [event] = FrameParser(client=True).feed(frame)
    assert isinstance(event, CloseFrameReceived)
    assert event.reason == "é" * 61  # 122 bytes: the 62nd character would need byte 124
    assert len(frame) == 2 + 2 + 122


def test_length_encodings_at_the_boundaries() -> None:
    for n in (0, 125, 126, 65535, 65536):
        wire = frame_binary(b"q" * n, True)
        assert FrameParser(client=False, max_message=70_000).feed(wire) == [b"q" * n]


def test_feed_does_not_keep_the_callers_buffer() -> None:
    wire = frame_binary(b"abcdef", True)
    buf = bytearray(wire)
    parser = FrameParser(client=False)
    assert parser.feed(memoryview(buf)[:5]) == []
    buf[:] = b"\x00" * len(buf)  # the caller reuses its buffer
    assert parser.feed(wire[5:]) == [b"abcdef"]


# ------------------------------------------------------------------------------------ handshake

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3 example


def request(
    *, method: str = "GET", path: str = "/v1/connect", drop: str = "", extra: str = "", version: str = "13"
) -> bytes:
    headers = {
        "Host": "relay.example:443",
        "Upgrade": "websocket",
        "Connection": "keep-alive, Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": version,
    }
    headers.pop(drop, None)
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items())]
    if extra:
        lines.append(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_rfc_example_accept_key() -> None:
    assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_good_request_parses() -> None:
    req = parse_request(request(path="/v1/connect?x=1"), path="/v1/connect")
    assert (req.method, req.path, req.target, req.key) == ("GET", "/v1/connect", "/v1/connect?x=1", KEY)
    assert req.header("HOST") == "relay.example:443"


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"drop": "Host"}, 400),
        ({"drop": "Sec-WebSocket-Key"}, 400),
        ({"drop": "Upgrade"}, 426),
        ({"drop": "Connection"}, 426),
        ({"drop": "Sec-WebSocket-Version"}, 426),
        ({"version": "8"}, 426),
        ({"path": "/other"}, 404),
        ({"method": "POST"}, 405),
    ],
)
def test_bad_requests_get_the_right_status(kwargs: dict[str, str], status: int) -> None:
    with pytest.raises(HandshakeError) as info:
        parse_request(request(**kwargs), path="/v1/connect")
    assert info.value.status == status


def test_wrong_version_answer_names_version_13() -> None:
    with pytest.raises(HandshakeError) as info:
        parse_request(request(version="8"), path="/v1/connect")
    assert ("Sec-WebSocket-Version", "13") in info.value.headers


def test_bad_key() -> None:
    bad = request().replace(KEY.encode(), base64.b64encode(b"short").decode().encode())
    with pytest.raises(HandshakeError, match="16 bytes"):
        parse_request(bad)


def test_oversize_head_is_431() -> None:
    big = request(extra="Cookie: " + "c" * MAX_HANDSHAKE_SIZE)
    with pytest.raises(HandshakeError) as info:
        find_head_end(big)
    assert info.value.status == 431
    assert find_head_end(b"GET / HTTP/1.1\r\n") == -1
    assert find_head_end(request()) == len(request())


def test_extensions_offered_are_never_accepted() -> None:
    req = parse_request(request(extra="Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"))
    response = switching_protocols(req)
    assert b"extensions" not in response.lower()
    assert parse_response(response, KEY).status == 101


def test_wsproto_client_offering_deflate_accepts_our_101() -> None:
    """An independent client (wsproto + h11) offering permessage-deflate accepts our answer."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection
    from wsproto.events import Request as WsRequest

    client = WSConnection(ConnectionType.CLIENT)
    wire = client.send(WsRequest(host="relay", target="/v1/connect", extensions=[PerMessageDeflate()]))
    req = parse_request(wire, path="/v1/connect")
    assert "permessage-deflate" in (req.header("sec-websocket-extensions") or "")
    client.receive_data(switching_protocols(req))
    [event] = list(client.events())
    assert isinstance(event, AcceptConnection)
    assert event.extensions == []


@given(data=st.binary(max_size=600))
def test_arbitrary_request_bytes_raise_only_handshake_error(data: bytes) -> None:
    status = 0
    try:
        parse_request(data + b"\r\n\r\n")
    except HandshakeError as exc:
        status = exc.status
    assert status in {0, 400, 404, 405, 426, 431}


@given(data=st.binary(max_size=600))
def test_arbitrary_response_bytes_raise_only_handshake_error(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        parse_response(data + b"\r\n\r\n", KEY)


def test_error_response_is_json() -> None:
    raw = error_response(429, "rate_limited", "slow down", headers=[("Retry-After", "5")])
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 429 Too Many Requests\r\n")
    assert b"Retry-After: 5" in head
    assert json.loads(body) == {"error": "rate_limited", "detail": "slow down"}
    with pytest.raises(HandshakeError) as info:
        parse_response(head + b"\r\n\r\n", KEY, body)
    assert (info.value.status, info.value.error, info.value.detail) == (429, "rate_limited", "slow down")


def test_client_request_round_trips_through_the_server_parser() -> None:
    key = new_key()
    raw = build_request("127.0.0.1:9", "/v1/connect", key, headers=[("X-Trace", "1")])
    req = parse_request(raw, path="/v1/connect")
    assert req.key == key
    assert req.header("x-trace") == "1"
    assert parse_response(switching_protocols(req), key).status == 101
    with pytest.raises(ValueError, match="CR or LF"):
        build_request("h", "/", key, headers=[("X", "a\r\nInjected: 1")])


@pytest.mark.parametrize(
    "mutation",
    [
        lambda r: r.replace(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"AAAAAAAAAAAAAAAAAAAAAAAAAAA="),
        lambda r: r.replace(b"Upgrade: websocket\r\n", b""),
        lambda r: r.replace(b"Connection: Upgrade\r\n", b""),
        lambda r: r[:-2] + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        lambda r: r[:-2] + b"Sec-WebSocket-Protocol: chat\r\n\r\n",
    ],
)
def test_client_rejects_a_bad_101(mutation: object) -> None:
    good = switching_protocols(parse_request(request()))
    assert callable(mutation)
    with pytest.raises(HandshakeError) as info:
        parse_response(mutation(good), KEY)
    assert info.value.status == 101


def test_codec_module_is_sans_io() -> None:
    """The codec imports no I/O library (STYLE rule 1), like rescue/protocol."""
    import ast
    import pathlib

    # the source (the installed module may be compiled: docs/decisions/0022-compiled-hot-path.md)
    tree = ast.parse((pathlib.Path(__file__).parents[1] / "rescue" / "websocket" / "_codec.py").read_text())
    imported = {
        (node.module or "").split(".")[0] if isinstance(node, ast.ImportFrom) else alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert imported & {"trio", "socket", "asyncio", "ssl", "anyio", "trio_websocket"} == set()


# ---------------------------------------------------------------------------- floods (issue 11)


def _fragmented(pieces: int, *, piece: bytes = b"", mask: bool = True) -> bytes:
    """One binary message in ``pieces`` frames (the first BINARY, the rest CONTINUATION)."""
    frames = [build_frame(Opcode.BINARY, piece, mask=mask, fin=pieces == 1)]
    frames += [
        build_frame(Opcode.CONTINUATION, piece, mask=mask, fin=i == pieces - 1) for i in range(1, pieces)
    ]
    return b"".join(frames)


def test_a_message_of_max_fragments_is_accepted() -> None:
    parser = FrameParser(client=False)
    assert parser.feed(_fragmented(MAX_FRAGMENTS, piece=b"ab")) == [b"ab" * MAX_FRAGMENTS]
    assert parser.frames == MAX_FRAGMENTS
    assert parser.buffered == 0


def test_one_fragment_more_is_a_flood() -> None:
    parser = FrameParser(client=False)
    # empty continuation frames, never finished: the old parser kept a list entry for each
    wire = build_frame(Opcode.BINARY, b"x", mask=True, fin=False) + build_frame(
        Opcode.CONTINUATION, b"", mask=True, fin=False
    ) * (MAX_FRAGMENTS + 10)
    with pytest.raises(FrameFloodError) as caught:
        parser.feed(wire)
    assert caught.value.code == CloseCode.PROTOCOL_ERROR
    assert caught.value.kind == "fragments"


def test_fragments_are_held_as_their_bytes_only() -> None:
    parser = FrameParser(client=False)
    parser.feed(_fragmented(MAX_FRAGMENTS + 1, piece=b"abc")[:-9])  # all but the final frame
    assert parser.buffered == 3 * MAX_FRAGMENTS


# Frames as an attacker would mix them: any opcode (valid or not), FIN or not, masked or not, short
# payloads (zero-length ones often), sometimes an absurd 64-bit length.
_soup_frame = st.one_of(
    st.builds(
        lambda op, fin, mask, payload: build_frame(op, payload, mask=mask, fin=fin),
        st.sampled_from([0x0, 0x0, 0x0, 0x1, 0x2, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB]),
        st.booleans(),
        st.booleans() | st.just(True),
        st.binary(max_size=8) | st.just(b"") | st.builds(lambda n: b"z" * n, st.integers(120, 1200)),
    ),
    st.builds(lambda n: b"\x82\xff" + struct.pack(">Q", n) + b"\0\0\0\0", st.integers(0, (1 << 64) - 1)),
    st.binary(min_size=1, max_size=16),
)


@given(
    frames=st.lists(_soup_frame, max_size=200),
    cuts=st.lists(st.integers(0, 100_000), max_size=8),
    client=st.booleans(),
)
def test_hostile_frame_soup_raises_only_protocol_errors_and_holds_little(
    frames: list[bytes], cuts: list[int], client: bool
) -> None:
    max_message = 1000
    parser = FrameParser(client=client, max_message=max_message)
    wire = b"".join(frames)
    start = 0
    error: ProtocolError | None = None
    try:
        for cut in [*sorted({c % (len(wire) + 1) for c in cuts}), len(wire)]:
            parser.feed(wire[start:cut])
            start = cut
            # an incomplete frame (14-byte head + payload of at most max_message) plus an
            # incomplete message (at most max_message): never more, whatever arrived
            assert parser.buffered <= 14 + 2 * max_message
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code == CloseCode.PROTOCOL_ERROR
        assert error.kind in ("protocol", "fragments")


def test_budget_never_limits_bulk_frames_of_frame_bytes_or_more() -> None:
    budget = FrameBudget(0.0)
    size = FRAME_BYTES  # on the wire: e.g. a 58-byte DATA message plus its 6-byte frame head
    # ten minutes of one read every millisecond, each read a whole 64 KiB buffer of such frames
    for ms in range(600_000):
        assert budget.charge(65536 // size, 65536, ms / 1000)


def test_budget_allows_the_rate_of_tiny_frames_and_a_burst_then_refuses() -> None:
    budget = FrameBudget(0.0)
    # heartbeats (18 bytes on the wire) at twice FRAME_RATE: the burst absorbs a few seconds
    t = 0.0
    per_tick = int(2 * FRAME_RATE / 100)
    ok_ticks = 0
    while budget.charge(per_tick, 18 * per_tick, t):
        ok_ticks += 1
        t += 0.01
        assert ok_ticks < 10_000, "never refused"
    # the burst drains at (sent - FRAME_RATE - bytes / FRAME_BYTES) frames a second
    drain = 2 * FRAME_RATE - FRAME_RATE - 2 * FRAME_RATE * 18 / FRAME_BYTES
    assert abs(ok_ticks / 100 - FRAME_BURST / drain) < 0.05
    # ...while a peer at a heartbeat every 15 s, or FRAME_RATE tiny frames a second, never is
    calm = FrameBudget(0.0)
    for second in range(3600):
        assert calm.charge(int(FRAME_RATE) - 1, 6 * int(FRAME_RATE), float(second + 1))


def test_one_read_of_pings_is_refused_at_once() -> None:
    budget = FrameBudget(0.0)
    assert not budget.charge(65536 // 6, 65536, 0.0)
