"""CBOR bodies of the relay-level messages and of the transport CONTROL messages (SPEC §2).

Every message is a frozen dataclass whose constructor validates it, with ``encode() -> bytes`` (the
canonical CBOR body) and ``decode(body) -> Self``. The relay-level kinds (HELLO, WELCOME, PEER,
CLOSE) also have ``to_message()``, the whole WebSocket message (12-byte header + body).

Decoding is strict and total: any input either decodes to a valid message or raises
:class:`~rescue.errors.ProtocolError` (code ``PROTOCOL_ERROR``), never anything else. Before cbor2
sees a byte, :func:`_check_wellformed` walks the item and rejects what a protocol peer never needs:

* semantic tags (cbor2 would turn them into datetimes, bignums, sets, shared references, ...),
* indefinite-length items, non-minimal ("non-preferred") heads, simple values other than
  false/true/null, trailing bytes after the item,
* nesting deeper than :data:`MAX_DEPTH`, declared lengths larger than the input,
* map keys that are not integers, text or byte strings, and duplicate keys.

Decoders ignore unknown text keys in HELLO, WELCOME, PEER, CLOSE and ``caps`` (so a newer client can
add fields without breaking an older relay) but reject non-text keys there. Floats are accepted by
the well-formedness check (application CONTROL maps may carry them) but every field defined here is
an integer, string, byte string, list or map, and ``bool`` is never accepted where an integer is.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Self, TypeAlias, TypeGuard, TypeVar

import cbor2

from rescue._codes import MAX_CLOSE_REASON_BYTES, CloseCode
from rescue.errors import ProtocolError
from rescue.protocol._frames import DEFAULT_MAX_FRAME, MAX_SEQ, VERSION, Flags, Kind, encode_frame

__all__ = [
    "CLOSE_CODE_RANGE",
    "HEARTBEAT_S_RANGE",
    "MAX_CLIENT_LEN",
    "MAX_CLOSE_BODY",
    "MAX_CLOSE_REASON_BYTES",
    "MAX_COMPRESSION_NAMES",
    "MAX_COMPRESSION_NAME_LEN",
    "MAX_DEPTH",
    "MAX_FRAME_RANGE",
    "MAX_HELLO_BODY",
    "MAX_PEER_BODY",
    "MAX_RECONNECT_IN_MS",
    "MAX_SESSION_LEN",
    "MAX_TOKEN_SIZE",
    "MAX_WELCOME_BODY",
    "NONCE_SIZE",
    "RESUME_GRACE_S_RANGE",
    "Ack",
    "AppControl",
    "Caps",
    "Close",
    "ControlMessage",
    "Hello",
    "PeerEvent",
    "PeerEventKind",
    "PeerInfo",
    "RelayMessage",
    "Resume",
    "Role",
    "Welcome",
    "decode_control",
    "decode_relay_message",
    "encode_ack",
    "encode_resume",
    "message_for",
]

NONCE_SIZE: Final = 16  # HELLO nonce and WELCOME server_nonce: 128 random bits (SPEC §2)
MAX_SESSION_LEN: Final = 128  # SPEC §2
# A CWT signed with Ed25519 is ~250 bytes; 2 KiB leaves room for longer claims without letting an
# unauthenticated peer make the relay hold much before the signature check.
MAX_TOKEN_SIZE: Final = 2048
MAX_CLIENT_LEN: Final = 128  # "rescue-py/0.1", "beach-rs/1.4.2 (linux)": a product tag, not prose
MAX_COMPRESSION_NAMES: Final = 8  # zlib, zstd, lz4, ... a handful of algorithms, never more
MAX_COMPRESSION_NAME_LEN: Final = 32
MAX_RECONNECT_IN_MS: Final = 3_600_000  # an hour; a drain window is seconds to minutes
# Nesting bound for any body: our messages need 3 levels (HELLO > caps > compression); 16 leaves
# application CONTROL maps room while keeping the recursive walk far from Python's stack limit.
MAX_DEPTH: Final = 16
MAX_U64: Final = MAX_SEQ  # 2**64 - 1

# Body size bounds, checked before any parsing. HELLO holds the token; the rest are small. Unknown
# extra keys (forward compatibility) must fit in the same bound.
MAX_HELLO_BODY: Final = 4096
MAX_WELCOME_BODY: Final = 2048
MAX_PEER_BODY: Final = 1024
MAX_CLOSE_BODY: Final = 512
# Limits on values the relay announces in WELCOME; a client refuses a WELCOME outside them.
HEARTBEAT_S_RANGE: Final = (1, 3600)
RESUME_GRACE_S_RANGE: Final = (0, 86_400)
# A message must at least hold a header and a HELLO; 16 MiB keeps a relay's per-session queues sane.
MAX_FRAME_RANGE: Final = (1024, 16 * 1024 * 1024)
CLOSE_CODE_RANGE: Final = (1000, 4999)  # the WebSocket close-code space (RFC 6455 §7.4)

# SPEC §2: a session id is 1-128 chars of [A-Za-z0-9._:-]; tokens and the token service share it.
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_COMPRESSION_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,32}")
_PRINTABLE_RE: Final = re.compile(r"[\x20-\x7e]*")


class Role(enum.StrEnum):
    """Which side of a session a peer is."""

    HOST = "host"
    GUEST = "guest"


PeerEventKind: TypeAlias = Literal["joined", "left", "rejoined"]
_PEER_EVENTS: Final = ("joined", "left", "rejoined")
_CLOSE_CODES: Final = frozenset(int(c) for c in CloseCode)
# Top-level keys of the transport's own CONTROL maps; application control must not use them.
_TRANSPORT_KEYS: Final = frozenset({"ack", "resume"})


# ---------------------------------------------------------------------------------------------------
# Strict CBOR reading
# ---------------------------------------------------------------------------------------------------


def _check_wellformed(data: bytes) -> None:
    """Reject everything outside the CBOR subset this protocol uses (see the module docstring).

    Raises:
        ProtocolError: the input is not exactly one well-formed item of the subset.
    """
    end = _skip_item(data, 0, 1)
    if end != len(data):
        raise ProtocolError(f"{len(data) - end} trailing bytes after the CBOR item")


def _read_head(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """Read one item head at ``pos``: (major type, additional info, argument, position after)."""
    if pos >= len(data):
        raise ProtocolError("truncated CBOR item")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info > 27:
        # 28-30 are reserved, 31 is an indefinite length or "break": never used here.
        raise ProtocolError("indefinite-length or reserved CBOR item")
    size = 1 << (info - 24)
    if pos + size > len(data):
        raise ProtocolError("truncated CBOR item")
    arg = int.from_bytes(data[pos : pos + size], "big")
    if major != 7 and arg < (24 if size == 1 else 1 << (4 * size)):
        raise ProtocolError("non-minimal CBOR integer or length encoding")
    return major, info, arg, pos + size


def _skip_item(data: bytes, pos: int, depth: int) -> int:
    """Validate the item at ``pos`` and return the position just after it."""
    if depth > MAX_DEPTH:
        raise ProtocolError(f"CBOR nesting deeper than {MAX_DEPTH}")
    major, info, arg, pos = _read_head(data, pos)
    if major in (0, 1):
        return pos
    if major in (2, 3):
        if arg > len(data) - pos:
            raise ProtocolError("CBOR string longer than the message")
        return pos + arg
    if major == 4:
        if arg > len(data) - pos:  # every item takes at least one byte
            raise ProtocolError("CBOR array longer than the message")
        for _ in range(arg):
            pos = _skip_item(data, pos, depth + 1)
        return pos
    if major == 5:
        if 2 * arg > len(data) - pos:
            raise ProtocolError("CBOR map longer than the message")
        seen: set[bytes] = set()
        for _ in range(arg):
            if pos >= len(data):
                raise ProtocolError("truncated CBOR item")
            if data[pos] >> 5 not in (0, 1, 2, 3):
                raise ProtocolError("CBOR map keys must be integers, text or byte strings")
            key_end = _skip_item(data, pos, depth + 1)
            # Heads are minimal, so equal keys have equal encodings.
            key = data[pos:key_end]
            if key in seen:
                raise ProtocolError("duplicate key in CBOR map")
            seen.add(key)
            pos = _skip_item(data, key_end, depth + 1)
        return pos
    if major == 6:
        raise ProtocolError("CBOR tags are not allowed")
    # major 7: simple values and floats
    if info in (20, 21, 22) or info in (25, 26, 27):  # false, true, null; half/single/double float
        return pos
    raise ProtocolError(f"CBOR simple value {arg} is not allowed")


def _loads(body: bytes, max_size: int, what: str) -> Any:
    """Decode one strictly well-formed CBOR item of at most ``max_size`` bytes.

    Raises:
        ProtocolError: oversize input, anything :func:`_check_wellformed` rejects, or anything
            cbor2 rejects (e.g. invalid UTF-8 in a text string).
    """
    if not isinstance(body, bytes | bytearray | memoryview):
        raise ProtocolError(f"{what} body must be bytes")
    body = bytes(body)
    if len(body) > max_size:
        raise ProtocolError(f"{what} body of {len(body)} bytes exceeds {max_size}")
    _check_wellformed(body)
    try:
        return cbor2.loads(body)
    except Exception as exc:  # cbor2 raises CBORDecodeError, ValueError, ... translate them all
        raise ProtocolError(f"{what} body is not valid CBOR: {exc}") from exc


def _dumps(obj: object) -> bytes:
    # Canonical (RFC 7049 §3.9): shortest heads, map keys sorted by length then bytewise, so test
    # vectors are byte-stable across runs and implementations.
    return cbor2.dumps(obj, canonical=True)


# ---------------------------------------------------------------------------------------------------
# Field validation. Constructors raise ValueError; decode() turns it into ProtocolError, so both
# directions apply exactly the same rules.
# ---------------------------------------------------------------------------------------------------

_T = TypeVar("_T")


def _uint(value: object, name: str, lo: int = 0, hi: int = MAX_U64) -> int:
    # bool is an int subclass and is never a count; IntEnum members (CloseCode) are fine.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} {value} is outside [{lo}, {hi}]")
    return value


def _bytes(value: object, name: str, *, exact: int | None = None, hi: int | None = None) -> bytes:
    if type(value) is not bytes:
        raise ValueError(f"{name} must be a byte string, not {type(value).__name__}")
    if exact is not None and len(value) != exact:
        raise ValueError(f"{name} must be {exact} bytes, not {len(value)}")
    if hi is not None and not 1 <= len(value) <= hi:
        raise ValueError(f"{name} must be 1 to {hi} bytes, not {len(value)}")
    return value


def _text(value: object, name: str) -> str:
    if type(value) is not str:
        raise ValueError(f"{name} must be a text string, not {type(value).__name__}")
    return value


def _role(value: object, name: str = "role") -> Role:
    if isinstance(value, Role):
        return value
    text = _text(value, name)
    try:
        return Role(text)
    except ValueError:
        raise ValueError(f"{name} must be 'host' or 'guest', not {text[:16]!r}") from None


def _version(value: object) -> int:
    v = _uint(value, "v")
    if v != VERSION:
        raise ValueError(f"unsupported message version {v}")
    return v


def is_cbor_array(value: object) -> TypeGuard[list[Any] | tuple[Any, ...]]:
    """Whether ``value`` is what cbor2 decodes a CBOR array to.

    cbor2 5.x gives a ``list`` everywhere; cbor2 6.x gives a ``list`` at top level but a ``tuple``
    inside a tag (it decodes tag contents immutable, and a token is a tagged array). Every shape
    check on decoded CBOR accepts both, so the product works on every cbor2 ``pyproject.toml`` allows.
    """
    return type(value) is list or type(value) is tuple


def is_cbor_map(value: object) -> TypeGuard[Mapping[Any, Any]]:
    """Whether ``value`` is what cbor2 decodes a CBOR map to: a ``dict``, or an immutable mapping where
    cbor2 wants a hashable value (``cbor2.FrozenDict`` in 5.x, ``cbor2.frozendict`` inside any tag in 6.x)."""
    return isinstance(value, Mapping)


def _fields(obj: object, what: str) -> dict[str, Any]:
    """A decoded body as a map with text keys (unknown keys are kept, and later ignored)."""
    if not is_cbor_map(obj):
        raise ProtocolError(f"{what} body must be a CBOR map, not {type(obj).__name__}")
    for key in obj:
        if type(key) is not str:
            raise ProtocolError(f"{what} map keys must be text strings")
    return obj if type(obj) is dict else dict(obj)


def _take(fields: Mapping[str, Any], key: str, what: str) -> Any:
    try:
        return fields[key]
    except KeyError:
        raise ProtocolError(f"{what} is missing {key!r}") from None


def _build(what: str, make: Callable[[], _T]) -> _T:
    try:
        return make()
    except ValueError as exc:
        raise ProtocolError(f"invalid {what}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caps:
    """What a peer can do; carried in HELLO and passed on to its partner.

    Attributes:
        compression: names of the compression algorithms the peer can decode (e.g. ``("zlib",)``),
            at most :data:`MAX_COMPRESSION_NAMES`, each 1-32 chars of ``[A-Za-z0-9._-]``, no
            duplicates. Unknown names are allowed: peers use the ones both sides know.
    """

    compression: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.compression) is not tuple:
            raise ValueError("caps.compression must be a tuple of names")
        if len(self.compression) > MAX_COMPRESSION_NAMES:
            raise ValueError(f"caps.compression lists more than {MAX_COMPRESSION_NAMES} names")
        for name in self.compression:
            if not _COMPRESSION_RE.fullmatch(_text(name, "compression name")):
                raise ValueError(f"bad compression name {name[:40]!r}")
        if len(set(self.compression)) != len(self.compression):
            raise ValueError("caps.compression lists a name twice")

    def to_cbor(self) -> dict[str, Any]:
        """The ``caps`` map as a plain value, ready to embed in another message."""
        return {"compression": list(self.compression)}

    def encode(self) -> bytes:
        """The ``caps`` map on its own, canonical CBOR."""
        return _dumps(self.to_cbor())

    @classmethod
    def from_cbor(cls, value: object) -> Self:
        """Build from a decoded ``caps`` map (unknown text keys ignored).

        Raises:
            ProtocolError: not a map, non-text keys, ``compression`` missing or malformed.
        """
        fields = _fields(value, "caps")
        names = _take(fields, "compression", "caps")
        if not is_cbor_array(names):
            raise ProtocolError("caps.compression must be a list")
        return _build("caps", lambda: cls(compression=tuple(names)))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Decode a standalone ``caps`` map (see :meth:`from_cbor`)."""
        return cls.from_cbor(_loads(body, MAX_PEER_BODY, "caps"))


@dataclass(frozen=True, slots=True)
class Hello:
    """HELLO, the first message a peer sends (kind 0x10).

    Attributes:
        token: the fallback token (CWT bytes), 1 to :data:`MAX_TOKEN_SIZE` bytes.
        session: session id, 1-128 chars of ``[A-Za-z0-9._:-]``.
        role: ``host`` or ``guest``.
        nonce: 16 random bytes, fresh for every connection (it keys the peer's frame cipher).
        caps: what the peer can decode.
        client: product tag such as ``"rescue-py/0.1"``; printable ASCII, at most 128 chars.
        v: message version, always 1.
    """

    token: bytes
    session: str
    role: Role
    nonce: bytes
    caps: Caps = field(default_factory=Caps)
    client: str = ""
    v: int = VERSION

    def __post_init__(self) -> None:
        _version(self.v)
        _bytes(self.token, "token", hi=MAX_TOKEN_SIZE)
        if not SESSION_ID_RE.fullmatch(_text(self.session, "session")):
            raise ValueError(f"session id must be 1-{MAX_SESSION_LEN} chars of [A-Za-z0-9._:-]")
        object.__setattr__(self, "role", _role(self.role))
        _bytes(self.nonce, "nonce", exact=NONCE_SIZE)
        if type(self.caps) is not Caps:
            raise ValueError("caps must be a Caps")
        client = _text(self.client, "client")
        if len(client) > MAX_CLIENT_LEN or not _PRINTABLE_RE.fullmatch(client):
            raise ValueError(f"client must be at most {MAX_CLIENT_LEN} printable ASCII chars")

    def encode(self) -> bytes:
        """The canonical CBOR body."""
        return _dumps(
            {
                "v": self.v,
                "token": self.token,
                "session": self.session,
                "role": self.role.value,
                "nonce": self.nonce,
                "caps": self.caps.to_cbor(),
                "client": self.client,
            }
        )

    def to_message(self) -> bytes:
        """Header + body, ready to send as one binary WebSocket message."""
        return encode_frame(Kind.HELLO, self.encode())

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a HELLO body.

        Raises:
            ProtocolError: anything that breaks SPEC §2 or the limits above.
        """
        f = _fields(_loads(body, MAX_HELLO_BODY, "HELLO"), "HELLO")
        values = {
            k: _take(f, k, "HELLO") for k in ("v", "token", "session", "role", "nonce", "caps", "client")
        }
        caps = Caps.from_cbor(values.pop("caps"))
        return _build("HELLO", lambda: cls(caps=caps, **values))


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """The partner as the relay saw it in its HELLO: role, nonce (for its frame key) and caps."""

    role: Role
    nonce: bytes
    caps: Caps = field(default_factory=Caps)

    def __post_init__(self) -> None:
        object.__setattr__(self, "role", _role(self.role))
        _bytes(self.nonce, "nonce", exact=NONCE_SIZE)
        if type(self.caps) is not Caps:
            raise ValueError("caps must be a Caps")

    def to_cbor(self) -> dict[str, Any]:
        """The map as a plain value, ready to embed in WELCOME."""
        return {"role": self.role.value, "nonce": self.nonce, "caps": self.caps.to_cbor()}

    def encode(self) -> bytes:
        """The map on its own, canonical CBOR."""
        return _dumps(self.to_cbor())

    @classmethod
    def from_cbor(cls, value: object) -> Self:
        """Build from a decoded ``{role, nonce, caps}`` map (unknown text keys ignored).

        Raises:
            ProtocolError: the map breaks the rules.
        """
        f = _fields(value, "peer")
        role, nonce = _take(f, "role", "peer"), _take(f, "nonce", "peer")
        caps = Caps.from_cbor(_take(f, "caps", "peer"))
        return _build("peer", lambda: cls(role=role, nonce=nonce, caps=caps))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Decode a standalone ``{role, nonce, caps}`` map (see :meth:`from_cbor`)."""
        return cls.from_cbor(_loads(body, MAX_PEER_BODY, "peer"))


@dataclass(frozen=True, slots=True)
class Welcome:
    """WELCOME, the relay's answer to a valid HELLO (kind 0x11).

    Attributes:
        ack_nonce: the peer's own HELLO nonce, echoed.
        server_nonce: 16 random bytes from the relay.
        features: feature bitmap (u64); no bits are defined in v1, so the relay sends 0.
        heartbeat_s: heartbeat interval in seconds, 1-3600 (15 by default).
        max_frame: largest whole message (header included) either side may send, 1024 B-16 MiB.
        resume_grace_s: how long a session waits for a peer to come back, 0-86400 s (30).
        peer: the partner if it is already connected, else ``None``.
        v: message version, always 1.
    """

    ack_nonce: bytes
    server_nonce: bytes
    features: int = 0
    heartbeat_s: int = 15
    max_frame: int = DEFAULT_MAX_FRAME
    resume_grace_s: int = 30
    peer: PeerInfo | None = None
    v: int = VERSION

    def __post_init__(self) -> None:
        _version(self.v)
        _bytes(self.ack_nonce, "ack_nonce", exact=NONCE_SIZE)
        _bytes(self.server_nonce, "server_nonce", exact=NONCE_SIZE)
        _uint(self.features, "features")
        _uint(self.heartbeat_s, "heartbeat_s", *HEARTBEAT_S_RANGE)
        _uint(self.max_frame, "max_frame", *MAX_FRAME_RANGE)
        _uint(self.resume_grace_s, "resume_grace_s", *RESUME_GRACE_S_RANGE)
        if self.peer is not None and type(self.peer) is not PeerInfo:
            raise ValueError("peer must be a PeerInfo or None")

    def encode(self) -> bytes:
        """The canonical CBOR body (``peer`` is always present, ``null`` when absent)."""
        return _dumps(
            {
                "v": self.v,
                "ack_nonce": self.ack_nonce,
                "server_nonce": self.server_nonce,
                "features": self.features,
                "heartbeat_s": self.heartbeat_s,
                "max_frame": self.max_frame,
                "resume_grace_s": self.resume_grace_s,
                "peer": None if self.peer is None else self.peer.to_cbor(),
            }
        )

    def to_message(self) -> bytes:
        """Header + body, ready to send as one binary WebSocket message."""
        return encode_frame(Kind.WELCOME, self.encode())

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a WELCOME body.

        Raises:
            ProtocolError: anything that breaks SPEC §2 or the limits above.
        """
        f = _fields(_loads(body, MAX_WELCOME_BODY, "WELCOME"), "WELCOME")
        keys = ("v", "ack_nonce", "server_nonce", "features", "heartbeat_s", "max_frame", "resume_grace_s")
        values = {k: _take(f, k, "WELCOME") for k in keys}
        raw_peer = _take(f, "peer", "WELCOME")
        peer = None if raw_peer is None else PeerInfo.from_cbor(raw_peer)
        return _build("WELCOME", lambda: cls(peer=peer, **values))


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """PEER (kind 0x12): the partner joined, left, or came back on a new connection.

    Attributes:
        event: ``"joined"``, ``"left"`` or ``"rejoined"``.
        role: the partner's role.
        nonce: the partner's HELLO nonce on the connection concerned (for ``left``: the one that
            ended).
        caps: the partner's caps.
    """

    event: PeerEventKind
    role: Role
    nonce: bytes
    caps: Caps = field(default_factory=Caps)

    def __post_init__(self) -> None:
        if _text(self.event, "event") not in _PEER_EVENTS:
            raise ValueError(f"event must be one of {_PEER_EVENTS}, not {self.event[:16]!r}")
        object.__setattr__(self, "role", _role(self.role))
        _bytes(self.nonce, "nonce", exact=NONCE_SIZE)
        if type(self.caps) is not Caps:
            raise ValueError("caps must be a Caps")

    @property
    def info(self) -> PeerInfo:
        """The partner as a :class:`PeerInfo`."""
        return PeerInfo(role=self.role, nonce=self.nonce, caps=self.caps)

    def encode(self) -> bytes:
        """The canonical CBOR body."""
        return _dumps(
            {"event": self.event, "role": self.role.value, "nonce": self.nonce, "caps": self.caps.to_cbor()}
        )

    def to_message(self) -> bytes:
        """Header + body, ready to send as one binary WebSocket message."""
        return encode_frame(Kind.PEER, self.encode())

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a PEER body.

        Raises:
            ProtocolError: anything that breaks SPEC §2.
        """
        f = _fields(_loads(body, MAX_PEER_BODY, "PEER"), "PEER")
        event, role, nonce = (_take(f, k, "PEER") for k in ("event", "role", "nonce"))
        caps = Caps.from_cbor(_take(f, "caps", "PEER"))
        return _build("PEER", lambda: cls(event=event, role=role, nonce=nonce, caps=caps))


@dataclass(frozen=True, slots=True)
class Close:
    """CLOSE (kind 0x03), sent by the relay before it closes a socket, or by a peer to end a session.

    Attributes:
        code: a close code, normalised to a :class:`~rescue.protocol.CloseCode` member when known.
            Any value in 1000-4999 is accepted so that a newer relay's codes reach an older
            client, which then treats an unknown code like an abnormal closure (``policy_for``).
        reason: human-readable text, at most 123 UTF-8 bytes (same limit as a WebSocket close).
        reconnect_in_ms: for ``SERVER_SHUTDOWN`` (required there): how long to wait before
            reconnecting, 0 to one hour. Allowed but optional on other codes.
    """

    code: int
    reason: str = ""
    reconnect_in_ms: int | None = None

    def __post_init__(self) -> None:
        code = _uint(self.code, "code", *CLOSE_CODE_RANGE)
        if code in _CLOSE_CODES:
            object.__setattr__(self, "code", CloseCode(code))
        if len(_text(self.reason, "reason").encode()) > MAX_CLOSE_REASON_BYTES:
            raise ValueError(f"reason is longer than {MAX_CLOSE_REASON_BYTES} UTF-8 bytes")
        if self.reconnect_in_ms is not None:
            _uint(self.reconnect_in_ms, "reconnect_in_ms", 0, MAX_RECONNECT_IN_MS)
        elif self.code == CloseCode.SERVER_SHUTDOWN:
            raise ValueError("a SERVER_SHUTDOWN close must carry reconnect_in_ms")

    def encode(self) -> bytes:
        """The canonical CBOR body (``reconnect_in_ms`` only when set)."""
        body: dict[str, Any] = {"code": int(self.code), "reason": self.reason}
        if self.reconnect_in_ms is not None:
            body["reconnect_in_ms"] = self.reconnect_in_ms
        return _dumps(body)

    def to_message(self) -> bytes:
        """Header + body, ready to send as one binary WebSocket message."""
        return encode_frame(Kind.CLOSE, self.encode())

    @classmethod
    def decode(cls, body: bytes) -> Self:
        """Parse a CLOSE body (``reconnect_in_ms`` absent or ``null`` both mean "not set").

        Raises:
            ProtocolError: anything that breaks SPEC §2 or the limits above.
        """
        f = _fields(_loads(body, MAX_CLOSE_BODY, "CLOSE"), "CLOSE")
        code, reason = _take(f, "code", "CLOSE"), _take(f, "reason", "CLOSE")
        reconnect = f.get("reconnect_in_ms")
        return _build("CLOSE", lambda: cls(code=code, reason=reason, reconnect_in_ms=reconnect))


RelayMessage: TypeAlias = Hello | Welcome | PeerEvent | Close

_RELAY_KINDS: Final[dict[Kind, type[Hello] | type[Welcome] | type[PeerEvent] | type[Close]]] = {
    Kind.HELLO: Hello,
    Kind.WELCOME: Welcome,
    Kind.PEER: PeerEvent,
    Kind.CLOSE: Close,
}


def message_for(msg: RelayMessage) -> bytes:
    """Header + body of a relay-level message, ready to send as one binary WebSocket message."""
    return msg.to_message()


def decode_relay_message(kind: Kind, body: bytes) -> RelayMessage:
    """Decode the body of a HELLO, WELCOME, PEER or CLOSE frame by its header's kind.

    Raises:
        ProtocolError: ``kind`` has no relay-level body (CONTROL, DATA, HEARTBEAT), or the body is
            invalid for the kind.
    """
    try:
        cls = _RELAY_KINDS[kind]
    except KeyError:
        raise ProtocolError(f"{getattr(kind, 'name', kind)} is not a relay-level message") from None
    return cls.decode(body)


# ---------------------------------------------------------------------------------------------------
# Transport CONTROL bodies (plaintext; the peer encrypts them before sending)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ack:
    """``{"ack": n}``: the receiver has delivered every frame up to seq ``n`` (u64)."""

    seq: int

    def __post_init__(self) -> None:
        _uint(self.seq, "ack")

    def encode(self) -> bytes:
        """The canonical CBOR plaintext."""
        return _dumps({"ack": self.seq})


@dataclass(frozen=True, slots=True)
class Resume:
    """``{"resume": n}``: the last seq the sender of this message delivered from its partner."""

    seq: int

    def __post_init__(self) -> None:
        _uint(self.seq, "resume")

    def encode(self) -> bytes:
        """The canonical CBOR plaintext."""
        return _dumps({"resume": self.seq})


@dataclass(frozen=True, slots=True)
class AppControl:
    """An application CONTROL map (any map without the reserved top-level keys ``ack``/``resume``).

    Attributes:
        data: the decoded map. Keys are integers, text or byte strings; values any CBOR of the
            subset described in the module docstring.
    """

    data: Mapping[Any, Any]

    def __post_init__(self) -> None:
        if not isinstance(self.data, Mapping):
            raise ValueError("application control must be a map")
        if any(key in self.data for key in _TRANSPORT_KEYS):
            raise ValueError("'ack' and 'resume' are reserved for transport control")

    def encode(self) -> bytes:
        """The canonical CBOR plaintext."""
        return _dumps(dict(self.data))


ControlMessage: TypeAlias = Ack | Resume | AppControl


def encode_ack(seq: int) -> bytes:
    """CBOR plaintext of ``{"ack": seq}`` (send UNSEQUENCED)."""
    return Ack(seq).encode()


def encode_resume(seq: int) -> bytes:
    """CBOR plaintext of ``{"resume": seq}`` (send UNSEQUENCED)."""
    return Resume(seq).encode()


def decode_control(
    body: bytes, *, flags: Flags | None = None, max_size: int = DEFAULT_MAX_FRAME
) -> ControlMessage:
    """Decode a decrypted CONTROL plaintext.

    A top-level map with an ``ack`` or ``resume`` key is a transport message and must have exactly
    that one key with a u64 value; any other map is application control.

    Args:
        body: the plaintext after AEAD decryption.
        flags: the frame's header flags, if the caller wants the pairing checked: transport
            messages must be UNSEQUENCED and application control must not be.
        max_size: the largest plaintext accepted (bounded by the connection's ``max_frame``).

    Raises:
        ProtocolError: invalid CBOR, not a map, a malformed transport message, or a message whose
            sequencing does not match ``flags``.
    """
    value = _loads(body, max_size, "CONTROL")
    if not is_cbor_map(value):
        raise ProtocolError(f"CONTROL body must be a CBOR map, not {type(value).__name__}")
    value = value if type(value) is dict else dict(value)
    msg: ControlMessage
    if any(key in value for key in _TRANSPORT_KEYS):
        if len(value) != 1:
            raise ProtocolError("a transport CONTROL map has exactly one key")
        ((key, seq),) = value.items()
        msg = _build("CONTROL", lambda: Ack(seq) if key == "ack" else Resume(seq))
    else:
        msg = AppControl(value)
    if flags is not None:
        unsequenced = bool(flags & Flags.UNSEQUENCED)
        if unsequenced != (not isinstance(msg, AppControl)):
            raise ProtocolError("ack/resume must be UNSEQUENCED and application control must be sequenced")
    return msg
