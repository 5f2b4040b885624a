"""CBOR message bodies (rescue/protocol/_messages.py, SPEC §2): round trips, strictness, vectors."""

from __future__ import annotations

import pathlib
import re
import string
from collections.abc import Callable
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.protocol import Flags, Kind, decode_frame
from rescue.protocol._frames import MAX_SEQ
from rescue.protocol._messages import (
    MAX_CLIENT_LEN,
    MAX_CLOSE_REASON_BYTES,
    MAX_COMPRESSION_NAMES,
    MAX_DEPTH,
    MAX_RECONNECT_IN_MS,
    MAX_TOKEN_SIZE,
    Ack,
    AppControl,
    Caps,
    Close,
    Hello,
    PeerEvent,
    PeerInfo,
    Resume,
    Role,
    Welcome,
    decode_control,
    decode_relay_message,
    encode_ack,
    encode_resume,
    message_for,
)

# ---------------------------------------------------------------------------------------------------
# Strategies for valid messages
# ---------------------------------------------------------------------------------------------------

NONCES = st.binary(min_size=16, max_size=16)
ROLES = st.sampled_from(Role)
SESSIONS = st.text(string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128)
COMPRESSION_NAMES = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=32)
CAPS = st.builds(
    Caps,
    compression=st.lists(COMPRESSION_NAMES, max_size=MAX_COMPRESSION_NAMES, unique=True).map(tuple),
)
HELLOS = st.builds(
    Hello,
    token=st.binary(min_size=1, max_size=MAX_TOKEN_SIZE),
    session=SESSIONS,
    role=ROLES,
    nonce=NONCES,
    caps=CAPS,
    client=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=MAX_CLIENT_LEN),
)
PEER_INFOS = st.builds(PeerInfo, role=ROLES, nonce=NONCES, caps=CAPS)
WELCOMES = st.builds(
    Welcome,
    ack_nonce=NONCES,
    server_nonce=NONCES,
    features=st.integers(0, MAX_SEQ),
    heartbeat_s=st.integers(1, 3600),
    max_frame=st.integers(1024, 16 * 1024 * 1024),
    resume_grace_s=st.integers(0, 86_400),
    peer=st.none() | PEER_INFOS,
)
PEER_EVENTS = st.builds(
    PeerEvent,
    event=st.sampled_from(["joined", "left", "rejoined"]),
    role=ROLES,
    nonce=NONCES,
    caps=CAPS,
)
# A reason of at most 123 UTF-8 bytes: multi-byte characters make the byte limit matter.
REASONS = st.text(max_size=MAX_CLOSE_REASON_BYTES).filter(lambda r: len(r.encode()) <= 123)
CLOSES = st.one_of(
    st.builds(
        Close,
        code=st.integers(1000, 4999).filter(lambda c: c != CloseCode.SERVER_SHUTDOWN),
        reason=REASONS,
        reconnect_in_ms=st.none() | st.integers(0, MAX_RECONNECT_IN_MS),
    ),
    st.builds(
        Close,
        code=st.just(CloseCode.SERVER_SHUTDOWN),
        reason=REASONS,
        reconnect_in_ms=st.integers(0, MAX_RECONNECT_IN_MS),
    ),
)
RELAY_MESSAGES = st.one_of(HELLOS, WELCOMES, PEER_EVENTS, CLOSES)

# Any CBOR value of the accepted subset (text keys only, to keep Python's dict happy).
CBOR_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)

DECODERS: list[Callable[[bytes], object]] = [
    Hello.decode,
    Welcome.decode,
    PeerEvent.decode,
    Close.decode,
    Caps.decode,
    PeerInfo.decode,
    decode_control,
]


def _fields(msg: object) -> dict[str, Any]:
    encoded: bytes = msg.encode()  # type: ignore[attr-defined]
    return cbor2.loads(encoded)  # type: ignore[no-any-return]


def _nonce(i: int) -> bytes:
    return bytes(range(i, i + 16))


# ---------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------


@given(RELAY_MESSAGES)
def test_relay_message_round_trip(msg: Hello | Welcome | PeerEvent | Close) -> None:
    body = msg.encode()
    assert type(msg).decode(body) == msg
    assert cbor2.dumps(cbor2.loads(body), canonical=True) == body  # canonical, byte-stable
    frame = decode_frame(message_for(msg), max_frame=16 * 1024)
    assert frame.header.kind is msg_kind(msg)
    assert frame.body == body
    assert decode_relay_message(frame.header.kind, frame.body) == msg
    assert msg.to_message() == message_for(msg)


def msg_kind(msg: object) -> Kind:
    return {Hello: Kind.HELLO, Welcome: Kind.WELCOME, PeerEvent: Kind.PEER, Close: Kind.CLOSE}[type(msg)]


@given(st.one_of(CAPS, PEER_INFOS))
def test_nested_map_round_trip(msg: Caps | PeerInfo) -> None:
    assert type(msg).decode(msg.encode()) == msg


@given(st.integers(0, MAX_SEQ))
def test_transport_control_round_trip(seq: int) -> None:
    assert decode_control(encode_ack(seq), flags=Flags.UNSEQUENCED) == Ack(seq)
    assert decode_control(encode_resume(seq), flags=Flags.UNSEQUENCED | Flags.COMPRESSED) == Resume(seq)
    assert Ack(seq).encode() == encode_ack(seq)
    assert Resume(seq).encode() == encode_resume(seq)


@given(
    st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("ack", "resume")), CBOR_VALUES, max_size=5)
)
def test_app_control_round_trip(data: dict[str, Any]) -> None:
    msg = decode_control(AppControl(data).encode(), flags=Flags.NONE)
    assert isinstance(msg, AppControl)
    assert cbor2.dumps(msg.data, canonical=True) == AppControl(data).encode()


@given(RELAY_MESSAGES, st.dictionaries(st.text(min_size=1, max_size=8), CBOR_VALUES, max_size=3))
def test_unknown_text_keys_are_ignored(
    msg: Hello | Welcome | PeerEvent | Close, extra: dict[str, Any]
) -> None:
    fields = _fields(msg)
    fields.update({f"x-{k}": v for k, v in extra.items()})
    if "caps" in fields:
        fields["caps"]["x-future"] = extra
    assert type(msg).decode(cbor2.dumps(fields)) == msg


def test_decoders_accept_any_key_order_and_buffer_types() -> None:
    hello = Hello(token=b"t", session="s", role=Role.GUEST, nonce=_nonce(0))
    fields = _fields(hello)
    reordered = cbor2.dumps(dict(reversed(list(fields.items()))))  # not canonical
    assert reordered != hello.encode()
    assert Hello.decode(reordered) == hello
    assert Hello.decode(bytearray(hello.encode())) == hello  # type: ignore[arg-type]
    assert Hello.decode(memoryview(hello.encode())) == hello  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------
# Garbage in → ProtocolError only
# ---------------------------------------------------------------------------------------------------


def _only_protocol_error(decoder: Callable[[bytes], object], data: bytes) -> None:
    error: ProtocolError | None = None
    try:
        decoder(data)
    except ProtocolError as exc:
        error = exc
    if error is not None:
        assert error.code is CloseCode.PROTOCOL_ERROR


@given(st.sampled_from(DECODERS), st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(decoder: Callable[[bytes], object], data: bytes) -> None:
    _only_protocol_error(decoder, data)


@given(st.sampled_from(DECODERS), CBOR_VALUES)
def test_arbitrary_cbor_values_raise_only_protocol_error(
    decoder: Callable[[bytes], object], value: object
) -> None:
    _only_protocol_error(decoder, cbor2.dumps(value))


@given(st.sampled_from(DECODERS), RELAY_MESSAGES, st.data())
def test_corrupted_valid_bodies_raise_only_protocol_error(
    decoder: Callable[[bytes], object], msg: object, data: st.DataObject
) -> None:
    """Flip, cut or splice bytes of real bodies: parsers see almost-right input."""
    body = bytearray(msg.encode())  # type: ignore[attr-defined]
    i = data.draw(st.integers(0, len(body) - 1))
    mutation = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if mutation == "flip":
        body[i] ^= data.draw(st.integers(1, 255))
    elif mutation == "cut":
        del body[i:]
    else:
        body[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    _only_protocol_error(decoder, bytes(body))


# ---------------------------------------------------------------------------------------------------
# Near-valid maps: one field mutated → ProtocolError, always
# ---------------------------------------------------------------------------------------------------

NOT_INT = st.one_of(
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
)
NOT_STR = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=4),
    st.lists(st.text(max_size=2), max_size=2),
)
NOT_BYTES = st.one_of(
    st.booleans(),
    st.none(),
    st.integers(),
    st.floats(),
    st.text(max_size=16),
    st.lists(st.integers(0, 255), max_size=16),
)
NOT_MAP = st.one_of(
    st.booleans(), st.integers(), st.text(max_size=4), st.binary(max_size=4), st.lists(st.none(), max_size=2)
)
BAD_NONCE = NOT_BYTES | st.binary(max_size=15) | st.binary(min_size=17, max_size=40)
BAD_ROLE = (
    NOT_STR
    | st.text(max_size=8).filter(lambda r: r not in ("host", "guest"))
    | st.sampled_from(["HOST", "Guest"])
)


def _uint_outside(lo: int, hi: int) -> st.SearchStrategy[object]:
    return (
        NOT_INT | st.integers(max_value=lo - 1) | st.integers(min_value=hi + 1)
    )  # above u64: cbor2 writes a bignum tag


BAD_COMPRESSION = st.one_of(
    NOT_MAP.filter(lambda v: not isinstance(v, list)),
    st.lists(COMPRESSION_NAMES, min_size=MAX_COMPRESSION_NAMES + 1, max_size=12, unique=True),
    st.lists(NOT_STR, min_size=1, max_size=2),
    st.text(string.printable, min_size=1, max_size=40)
    .filter(lambda n: not (n.isascii() and all(c.isalnum() or c in "._-" for c in n) and len(n) <= 32))
    .map(lambda n: [n]),
    COMPRESSION_NAMES.map(lambda n: [n, n]),
)
BAD_CAPS = NOT_MAP | st.none() | st.just({}) | BAD_COMPRESSION.map(lambda c: {"compression": c})
BAD_PEER_INFO = st.one_of(
    NOT_MAP,
    st.fixed_dictionaries({"role": BAD_ROLE, "nonce": NONCES, "caps": st.just({"compression": []})}),
    st.fixed_dictionaries(
        {"role": st.just("host"), "nonce": BAD_NONCE, "caps": st.just({"compression": []})}
    ),
    st.fixed_dictionaries({"role": st.just("host"), "nonce": NONCES, "caps": BAD_CAPS}),
    st.just({"role": "host", "nonce": bytes(16)}),
)

BAD_FIELDS: dict[type, dict[str, st.SearchStrategy[object]]] = {
    Hello: {
        "v": _uint_outside(1, 1),
        "token": NOT_BYTES
        | st.just(b"")
        | st.binary(min_size=MAX_TOKEN_SIZE + 1, max_size=MAX_TOKEN_SIZE + 1),
        "session": NOT_STR
        | st.just("")
        | st.just("a" * 129)
        | st.text(min_size=1, max_size=10).filter(
            lambda s: any(not (c.isascii() and (c.isalnum() or c in "._:-")) for c in s)
        ),
        "role": BAD_ROLE,
        "nonce": BAD_NONCE,
        "caps": BAD_CAPS,
        "client": NOT_STR
        | st.just("x" * (MAX_CLIENT_LEN + 1))
        | st.text(min_size=1, max_size=5).filter(lambda c: any(not " " <= ch <= "~" for ch in c)),
    },
    Welcome: {
        "v": _uint_outside(1, 1),
        "ack_nonce": BAD_NONCE,
        "server_nonce": BAD_NONCE,
        "features": _uint_outside(0, 2**64 - 1),
        "heartbeat_s": _uint_outside(1, 3600),
        "max_frame": _uint_outside(1024, 16 * 1024 * 1024),
        "resume_grace_s": _uint_outside(0, 86_400),
        "peer": BAD_PEER_INFO,
    },
    PeerEvent: {
        "event": NOT_STR | st.text(max_size=9).filter(lambda e: e not in ("joined", "left", "rejoined")),
        "role": BAD_ROLE,
        "nonce": BAD_NONCE,
        "caps": BAD_CAPS,
    },
    Close: {
        "code": _uint_outside(1000, 4999),
        "reason": NOT_STR
        | st.text(min_size=1, max_size=200).filter(lambda r: len(r.encode()) > MAX_CLOSE_REASON_BYTES),
        "reconnect_in_ms": NOT_INT.filter(lambda v: v is not None)
        | _uint_outside(0, MAX_RECONNECT_IN_MS).filter(lambda v: v is not None),
    },
}
REQUIRED: dict[type, tuple[str, ...]] = {
    Hello: ("v", "token", "session", "role", "nonce", "caps", "client"),
    Welcome: (
        "v",
        "ack_nonce",
        "server_nonce",
        "features",
        "heartbeat_s",
        "max_frame",
        "resume_grace_s",
        "peer",
    ),
    PeerEvent: ("event", "role", "nonce", "caps"),
    Close: ("code", "reason"),
}


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> tuple[type, bytes]:
    """A valid message's map with exactly one thing wrong with it."""
    msg = draw(RELAY_MESSAGES)
    cls = type(msg)
    fields = _fields(msg)
    how = draw(st.sampled_from(["bad value", "missing key", "non-text key"]))
    if how == "bad value":
        key = draw(st.sampled_from(sorted(BAD_FIELDS[cls])))
        fields[key] = draw(BAD_FIELDS[cls][key])
    elif how == "missing key":
        del fields[draw(st.sampled_from(REQUIRED[cls]))]
    else:
        fields[draw(st.integers() | st.binary(max_size=4))] = draw(CBOR_VALUES)
    return cls, cbor2.dumps(fields)


@given(near_valid_bodies())
def test_near_valid_bodies_are_rejected(case: tuple[type, bytes]) -> None:
    cls, body = case
    with pytest.raises(ProtocolError) as info:
        cls.decode(body)  # type: ignore[attr-defined]
    assert info.value.code is CloseCode.PROTOCOL_ERROR


@given(
    st.sampled_from(["ack", "resume"]),
    st.one_of(
        _uint_outside(0, MAX_SEQ).map(lambda v: ("value", v)),
        st.dictionaries(st.text(min_size=1, max_size=5), CBOR_VALUES, min_size=1, max_size=2).map(
            lambda d: ("extra", d)
        ),
    ),
)
def test_near_valid_transport_control_is_rejected(key: str, mutation: tuple[str, Any]) -> None:
    what, value = mutation
    body = {key: value} if what == "value" else {key: 1, **{f"{k}!": v for k, v in value.items()}}
    with pytest.raises(ProtocolError):
        decode_control(cbor2.dumps(body))


# ---------------------------------------------------------------------------------------------------
# Explicit rules
# ---------------------------------------------------------------------------------------------------

HELLO = Hello(
    token=b"\xa1\x01\x02",
    session="demo-1",
    role=Role.HOST,
    nonce=_nonce(0),
    caps=Caps(("zlib",)),
    client="rescue-py/0.1",
)
WELCOME = Welcome(
    ack_nonce=_nonce(0), server_nonce=_nonce(16), peer=PeerInfo(Role.GUEST, _nonce(32), Caps(("zlib",)))
)


def _with(msg: object, **changes: object) -> bytes:
    fields = _fields(msg)
    fields.update(changes)
    return cbor2.dumps(fields, canonical=True)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("v", 2, "unsupported message version 2"),
        ("v", 0, "unsupported message version"),
        ("v", True, "v must be an integer"),
        ("token", b"", "token must be 1 to"),
        ("token", b"x" * (MAX_TOKEN_SIZE + 1), "token must be 1 to"),
        ("token", "text", "token must be a byte string"),
        ("session", "", "session id"),
        ("session", "a" * 129, "session id"),
        ("session", "has space", "session id"),
        ("session", "sess/1", "session id"),
        ("session", "séance", "session id"),
        ("role", "admin", "role must be 'host' or 'guest'"),
        ("role", 1, "role must be a text string"),
        ("nonce", bytes(15), "nonce must be 16 bytes"),
        ("nonce", bytes(17), "nonce must be 16 bytes"),
        ("client", "x" * (MAX_CLIENT_LEN + 1), "printable ASCII"),
        ("client", "bad\nclient", "printable ASCII"),
        ("client", None, "client must be a text string"),
        ("caps", [], "caps body must be a CBOR map"),
        ("caps", {}, "caps is missing 'compression'"),
        ("caps", {"compression": "zlib"}, "caps.compression must be a list"),
        ("caps", {"compression": ["zlib", "zlib"]}, "lists a name twice"),
        ("caps", {"compression": [f"c{i}" for i in range(9)]}, "more than 8 names"),
        ("caps", {"compression": ["x" * 33]}, "bad compression name"),
        ("caps", {"compression": [1]}, "compression name must be a text string"),
        ("caps", {"compression": [], 1: 2}, "caps map keys must be text strings"),
    ],
)
def test_hello_rules(field: str, value: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Hello.decode(_with(HELLO, **{field: value}))


def test_hello_boundaries_accepted() -> None:
    ok = Hello(
        token=b"x" * MAX_TOKEN_SIZE,
        session="aZ09._:-" * 16,
        role=Role.GUEST,
        nonce=bytes(16),
        caps=Caps(tuple(f"n{i}" for i in range(MAX_COMPRESSION_NAMES))),
        client="~" * MAX_CLIENT_LEN,
    )
    assert Hello.decode(ok.encode()) == ok


def test_unknown_keys_ignored_but_non_text_keys_rejected() -> None:
    assert Hello.decode(_with(HELLO, future={"x": [1, 2]})) == HELLO
    fields = _fields(HELLO)
    fields[7] = "x"
    with pytest.raises(ProtocolError, match="HELLO map keys must be text strings"):
        Hello.decode(cbor2.dumps(fields))


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("features", -1, "features -1 is outside"),
        ("features", True, "features must be an integer"),
        ("heartbeat_s", 0, "heartbeat_s 0 is outside"),
        ("heartbeat_s", 15.0, "heartbeat_s must be an integer"),
        ("max_frame", 1023, "max_frame 1023 is outside"),
        ("resume_grace_s", False, "resume_grace_s must be an integer"),
        ("ack_nonce", b"short", "ack_nonce must be 16 bytes"),
        ("server_nonce", None, "server_nonce must be a byte string"),
        ("peer", {"role": "guest", "nonce": bytes(16)}, "peer is missing 'caps'"),
        ("peer", [], "peer body must be a CBOR map"),
    ],
)
def test_welcome_rules(field: str, value: object, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        Welcome.decode(_with(WELCOME, **{field: value}))


def test_welcome_peer_null_and_missing() -> None:
    alone = Welcome(ack_nonce=_nonce(0), server_nonce=_nonce(1))
    assert Welcome.decode(alone.encode()) == alone
    assert cbor2.loads(alone.encode())["peer"] is None
    fields = _fields(alone)
    del fields["peer"]
    with pytest.raises(ProtocolError, match="WELCOME is missing 'peer'"):
        Welcome.decode(cbor2.dumps(fields))


@pytest.mark.parametrize("event", ["joined", "left", "rejoined"])
def test_peer_events(event: str) -> None:
    msg = PeerEvent(event, Role.GUEST, _nonce(3))  # type: ignore[arg-type]
    assert PeerEvent.decode(msg.encode()) == msg
    assert msg.info == PeerInfo(Role.GUEST, _nonce(3))
    with pytest.raises(ProtocolError, match="event must be one of"):
        PeerEvent.decode(_with(msg, event=event.upper()))


def test_close_rules() -> None:
    assert Close.decode(Close(4010, "é" * 61 + "x").encode()).reason == "é" * 61 + "x"  # 123 bytes
    with pytest.raises(ProtocolError, match="longer than 123 UTF-8 bytes"):
        Close.decode(cbor2.dumps({"code": 4010, "reason": "é" * 62}))  # 124 bytes, 62 chars
    with pytest.raises(ProtocolError, match="must carry reconnect_in_ms"):
        Close.decode(cbor2.dumps({"code": 1012, "reason": ""}))
    with pytest.raises(ProtocolError, match="must carry reconnect_in_ms"):
        Close.decode(cbor2.dumps({"code": 1012, "reason": "", "reconnect_in_ms": None}))
    with pytest.raises(ProtocolError, match="reconnect_in_ms -1 is outside"):
        Close.decode(cbor2.dumps({"code": 1012, "reason": "", "reconnect_in_ms": -1}))
    with pytest.raises(ProtocolError, match="code 999 is outside"):
        Close.decode(cbor2.dumps({"code": 999, "reason": ""}))
    with pytest.raises(ProtocolError, match="code must be an integer"):
        Close.decode(cbor2.dumps({"code": True, "reason": ""}))
    with pytest.raises(ProtocolError, match="CLOSE is missing 'reason'"):
        Close.decode(cbor2.dumps({"code": 1000}))


def test_close_codes_normalised() -> None:
    shutdown = Close.decode(Close(1012, "drain", 2500).encode())
    assert shutdown.code is CloseCode.SERVER_SHUTDOWN
    assert shutdown.reconnect_in_ms == 2500
    unknown = Close.decode(Close(4500).encode())
    assert unknown.code == 4500
    assert not isinstance(unknown.code, CloseCode)
    assert Close.decode(cbor2.dumps({"code": 4011, "reason": "r", "reconnect_in_ms": None})) == Close(
        4011, "r"
    )
    assert "reconnect_in_ms" not in cbor2.loads(Close(CloseCode.NORMAL).encode())


def test_constructors_apply_the_same_rules() -> None:
    with pytest.raises(ValueError, match="nonce must be 16 bytes"):
        Hello(token=b"t", session="s", role=Role.HOST, nonce=b"short")
    with pytest.raises(ValueError, match="role must be"):
        PeerInfo("admin", bytes(16))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must carry reconnect_in_ms"):
        Close(CloseCode.SERVER_SHUTDOWN)
    with pytest.raises(ValueError, match="ack must be an integer"):
        Ack(True)
    with pytest.raises(ValueError, match="resume -1 is outside"):
        Resume(-1)
    with pytest.raises(ValueError, match="reserved for transport control"):
        AppControl({"ack": 1, "other": 2})
    with pytest.raises(ValueError, match=r"caps\.compression must be a tuple"):
        Caps(["zlib"])  # type: ignore[arg-type]
    assert Hello(token=b"t", session="s", role="guest", nonce=bytes(16)).role is Role.GUEST  # type: ignore[arg-type]


# Well-formedness (applies to every body, shown here through decode_control and HELLO).


@pytest.mark.parametrize(
    ("hex_body", "match"),
    [
        ("c074323031332d30332d32315432303a30343a30305a", "tags are not allowed"),  # tag 0 datetime
        ("a16161c249010000000000000000", "tags are not allowed"),  # tag 2 bignum inside a map
        ("a16161d9010280", "tags are not allowed"),  # tag 258 set
        ("a16161d81c80", "tags are not allowed"),  # tag 28 shareable
        ("a16161bf6162ff", "indefinite-length"),  # indefinite map
        ("a161615f4101ff", "indefinite-length"),  # indefinite byte string
        ("a16161f7", "simple value 23"),  # undefined
        ("a16161f820", "simple value 32"),
        ("a16161181800", "trailing bytes"),
        ("a1616101ff", "trailing bytes"),
        ("a1616101a0", "trailing bytes"),
        ("a161611801", "non-minimal"),
        ("b801616101", "non-minimal"),  # map length 1 in a one-byte extension
        ("a16161190001", "non-minimal"),
        ("a2616101616102", "duplicate key"),
        ("a2016101016102", "duplicate key"),
        ("a1a00101", "map keys must be integers, text or byte strings"),
        ("a1f40101", "map keys must be integers, text or byte strings"),
        ("a161615bffffffffffffffff", "string longer than the message"),  # 2**64-1 byte string
        ("a161619bffffffffffffffff", "array longer than the message"),
        ("bbffffffffffffffff", "map longer than the message"),
        ("a1616162ffff", "not valid CBOR"),  # invalid UTF-8
        ("a16161", "truncated"),
        ("", "truncated"),
        ("a16161fc", "reserved"),  # additional info 28
    ],
)
def test_wellformedness_rules(hex_body: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_control(bytes.fromhex(hex_body))


def test_nesting_bound() -> None:
    def nested(depth: int) -> bytes:  # {"a": [[[...0...]]]} with `depth` levels in total
        return bytes.fromhex("a16161") + b"\x81" * (depth - 2) + b"\x00"

    assert isinstance(decode_control(nested(MAX_DEPTH)), AppControl)
    with pytest.raises(ProtocolError, match="nesting deeper"):
        decode_control(nested(MAX_DEPTH + 1))
    with pytest.raises(ProtocolError, match="nesting deeper"):
        decode_control(bytes.fromhex("a16161") + b"\x81" * 100_000 + b"\x00", max_size=200_000)


def test_oversize_bodies_rejected_before_parsing() -> None:
    big = cbor2.dumps({"x": b"\0" * 5000})
    for decoder in (Hello.decode, Welcome.decode, PeerEvent.decode, Close.decode):
        with pytest.raises(ProtocolError, match="exceeds"):
            decoder(big)
    with pytest.raises(ProtocolError, match="exceeds 100"):
        decode_control(big, max_size=100)


def test_non_bytes_input_rejected() -> None:
    with pytest.raises(ProtocolError, match="must be bytes"):
        Hello.decode("a0")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("body", "flags", "match"),
    [
        ({"ack": 1, "x": 2}, None, "exactly one key"),
        ({"resume": 1, "ack": 2}, None, "exactly one key"),
        ({"ack": True}, None, "ack must be an integer"),
        ({"ack": -1}, None, "ack -1 is outside"),
        ({"resume": "1"}, None, "resume must be an integer"),
        ({"ack": 1}, Flags.NONE, "must be UNSEQUENCED"),
        ({"resume": 1}, Flags.COMPRESSED, "must be UNSEQUENCED"),
        ({"app": 1}, Flags.UNSEQUENCED, "application control must be sequenced"),
        ([1, 2], None, "CONTROL body must be a CBOR map"),
    ],
)
def test_control_rules(body: object, flags: Flags | None, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_control(cbor2.dumps(body), flags=flags)


def test_app_control_may_use_other_key_types() -> None:
    msg = decode_control(cbor2.dumps({1: "x", b"ack": 2.5, "resume-ish": None}))
    assert msg == AppControl({1: "x", b"ack": 2.5, "resume-ish": None})


def test_decode_relay_message_rejects_relayed_kinds() -> None:
    for kind in (Kind.CONTROL, Kind.DATA, Kind.HEARTBEAT):
        with pytest.raises(ProtocolError, match="not a relay-level message"):
            decode_relay_message(kind, b"\xa0")


# ---------------------------------------------------------------------------------------------------
# Byte-exact vectors (the same ones docs/protocol.md shows)
# ---------------------------------------------------------------------------------------------------

VECTORS: list[tuple[str, object, str]] = [
    (
        "hello",
        HELLO,
        "011000000000000000000000a76176016463617073a16b636f6d7072657373696f6e81647a6c696264726f6c6564686f73"
        "74656e6f6e636550000102030405060708090a0b0c0d0e0f65746f6b656e43a1010266636c69656e746d7265736375652d"
        "70792f302e316773657373696f6e6664656d6f2d31",
    ),
    (
        "welcome, partner not there yet",
        Welcome(ack_nonce=_nonce(0), server_nonce=_nonce(16)),
        "011100000000000000000000a86176016470656572f6686665617475726573006961636b5f6e6f6e636550000102030405"
        "060708090a0b0c0d0e0f696d61785f6672616d651a000100006b6865617274626561745f730f6c7365727665725f6e6f6e"
        "636550101112131415161718191a1b1c1d1e1f6e726573756d655f67726163655f73181e",
    ),
    (
        "welcome, partner connected",
        WELCOME,
        "011100000000000000000000a86176016470656572a36463617073a16b636f6d7072657373696f6e81647a6c696264726f"
        "6c65656775657374656e6f6e636550202122232425262728292a2b2c2d2e2f686665617475726573006961636b5f6e6f6e"
        "636550000102030405060708090a0b0c0d0e0f696d61785f6672616d651a000100006b6865617274626561745f730f6c73"
        "65727665725f6e6f6e636550101112131415161718191a1b1c1d1e1f6e726573756d655f67726163655f73181e",
    ),
    (
        "peer joined",
        PeerEvent("joined", Role.GUEST, _nonce(32), Caps(("zlib",))),
        "011200000000000000000000a46463617073a16b636f6d7072657373696f6e81647a6c696264726f6c6565677565737465"
        "6576656e74666a6f696e6564656e6f6e636550202122232425262728292a2b2c2d2e2f",
    ),
    (
        "close, server shutdown",
        Close(CloseCode.SERVER_SHUTDOWN, "server shutting down", 2500),
        "010300000000000000000000a364636f64651903f466726561736f6e74736572766572207368757474696e6720646f776e"
        "6f7265636f6e6e6563745f696e5f6d731909c4",
    ),
    (
        "close, replaced",
        Close(CloseCode.REPLACED, "replaced by a newer connection"),
        "010300000000000000000000a264636f6465190fab66726561736f6e781e7265706c616365642062792061206e65776572"
        "20636f6e6e656374696f6e",
    ),
]


@pytest.mark.parametrize(("name", "msg", "expected"), VECTORS, ids=[v[0] for v in VECTORS])
def test_vectors(name: str, msg: Hello | Welcome | PeerEvent | Close, expected: str) -> None:
    assert message_for(msg).hex() == expected
    frame = decode_frame(bytes.fromhex(expected))
    assert decode_relay_message(frame.header.kind, frame.body) == msg


def test_control_vectors() -> None:
    assert encode_ack(64).hex() == "a16361636b1840"
    assert encode_resume(1000).hex() == "a166726573756d651903e8"
    assert encode_resume(0).hex() == "a166726573756d6500"


def test_docs_show_the_pinned_vectors() -> None:
    """Every full message hex string in docs/protocol.md is one of the vectors above."""
    doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text()
    shown = re.findall(r"`(01[0-9a-f]{22,})`", doc)
    assert len(shown) == len(VECTORS)
    assert set(shown) == {expected for _, _, expected in VECTORS}
