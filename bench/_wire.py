"""Bytes on the wire for the load generator: preambles, a lean masking WebSocket client, HELLO.

The load generator has to stay cheaper per message than the relays it drives (two cores shared by
everything), so it does not use a WebSocket library: it writes RFC 6455 client frames itself and keeps
per-message work to a struct pack, one 20-byte XOR and a join.

Every relayed message has the same layout, whatever the target::

    12-byte rescue header (">BBBBQ": version 1, kind, flags 0, channel 0, seq)
    8-byte send timestamp (time.monotonic_ns(), CLOCK_MONOTONIC: one clock for every process)
    filler up to the message size

* ``tcp``: each message is prefixed with its length (u32, big-endian) after the 64-byte preamble.
* ``ws``: each message is one masked binary WebSocket message; the first message is the preamble.
* ``rescue``: each message is one masked binary WebSocket message; the first one is a HELLO.

Masking is real: every frame carries one of a few random 32-bit keys per connection and its whole
payload is XORed with it. Only the 20-byte head changes per message, so the masked filler is computed
once per key; the relay still has to unmask every byte.
"""

from __future__ import annotations

import base64
import hashlib
import os
import struct
from typing import Final

PREAMBLE_SIZE: Final = 64  # magic (4) + role (1) + session id (59, NUL-padded)
PREAMBLE_MAGIC: Final = b"BRP1"
MAX_SESSION_ID: Final = PREAMBLE_SIZE - 5

HEAD: Final = struct.Struct(">BBBBQQ")  # rescue header + send timestamp
HEAD_SIZE: Final = HEAD.size  # 20
SEQ_TS: Final = struct.Struct(">4xQQ")  # seq and timestamp of a HEAD
_HEAD_WORDS: Final = struct.Struct(">IQQ")  # the same 20 bytes as three words, for masking
RESCUE_HEADER: Final = struct.Struct(">BBBBQ")
VERSION: Final = 1
KIND_DATA: Final = 0x01
KIND_HEARTBEAT: Final = 0x02
KIND_CLOSE: Final = 0x03
KIND_HELLO: Final = 0x10
KIND_WELCOME: Final = 0x11
KIND_PEER: Final = 0x12
LEN_PREFIX: Final = struct.Struct(">I")
_DATA_WORD: Final = (VERSION << 24) | (KIND_DATA << 16)  # version, kind, flags 0, channel 0

# Distinct mask keys per connection: enough that frames do not all share one key, few enough that
# the premasked filler stays small (keys x message size bytes per connection).
MASK_KEYS_PER_CONN: Final = 4
WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# The HTTP upgrade response is a few hundred bytes; anything longer is not a relay we understand.
MAX_HANDSHAKE_RESPONSE: Final = 16384

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA


class WireError(Exception):
    """The target sent something the load generator does not accept."""


def encode_preamble(session: str, role: str) -> bytes:
    """The 64-byte pairing preamble of the reference relays."""
    sid = session.encode("ascii")
    if len(sid) > MAX_SESSION_ID or role not in ("host", "guest"):
        raise ValueError(f"session id over {MAX_SESSION_ID} bytes or bad role {role!r}")
    return PREAMBLE_MAGIC + role[0].encode() + sid.ljust(MAX_SESSION_ID, b"\0")


def handshake_request(host: str, port: int, path: str) -> tuple[bytes, bytes]:
    """An HTTP/1.1 upgrade request and the ``Sec-WebSocket-Accept`` value it must get back."""
    key = base64.b64encode(os.urandom(16))
    accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
    request = (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}:{port}\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "User-Agent: rescue-bench/0.1\r\n"
        "\r\n"
    ).encode("ascii")
    return request, accept


def check_handshake_response(head: bytes, accept: bytes) -> None:
    """Validate the response head (up to and excluding the blank line).

    Raises:
        WireError: not a 101, or a wrong/missing ``Sec-WebSocket-Accept``, or an extension.
    """
    lines = head.split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"101":
        raise WireError(f"upgrade refused: {lines[0][:200]!r}")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"sec-websocket-accept") != accept:
        raise WireError("bad Sec-WebSocket-Accept")
    if headers.get(b"sec-websocket-extensions"):
        raise WireError("server negotiated an extension nobody offered")


def ws_frame_prefix(opcode: int, length: int, key: bytes) -> bytes:
    """FIN + opcode, MASK bit + length, then the 4-byte mask key."""
    if length < 126:
        return bytes((0x80 | opcode, 0x80 | length)) + key
    if length < 65536:
        return bytes((0x80 | opcode, 0xFE)) + length.to_bytes(2, "big") + key
    return bytes((0x80 | opcode, 0xFF)) + length.to_bytes(8, "big") + key


def mask(data: bytes, key: bytes) -> bytes:
    """XOR ``data`` with the repeated 4-byte ``key`` (RFC 6455 §5.3), key aligned at offset 0."""
    n = len(data)
    if not n:
        return b""
    repeated = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(n, "big")


def ws_client_message(payload: bytes, *, opcode: int = OP_BINARY) -> bytes:
    """One complete masked client frame with a fresh random key (cold path: handshakes, control)."""
    key = os.urandom(4)
    return ws_frame_prefix(opcode, len(payload), key) + mask(payload, key)


def make_filler(size: int) -> bytes:
    """The constant filler after the 20-byte head: random, so nothing can compress it."""
    return os.urandom(max(0, size - HEAD_SIZE))


class MessageBuilder:
    """Builds one connection's DATA messages (and heartbeats) for one transport, fast.

    Args:
        transport: ``"tcp"`` (length-prefixed) or ``"ws"``/``"rescue"`` (masked WebSocket frames).
        size: whole message size in bytes, rescue header included (>= 20).
        filler: the shared filler (``make_filler(size)``).
    """

    __slots__ = ("_heads", "_masks", "_tails", "_tcp", "size")

    def __init__(self, transport: str, size: int, filler: bytes) -> None:
        if size < HEAD_SIZE:
            raise ValueError(f"message size must be at least {HEAD_SIZE}")
        self.size = size
        self._tcp = transport == "tcp"
        if self._tcp:
            self._heads = [LEN_PREFIX.pack(size)]
            self._masks = [(0, 0)]
            self._tails = [filler]
        else:
            keys = [os.urandom(4) for _ in range(MASK_KEYS_PER_CONN)]
            self._heads = [ws_frame_prefix(OP_BINARY, size, k) for k in keys]
            # (32-bit key, 64-bit key+key): the words of the head XOR these, since HEAD_SIZE % 4 == 0.
            self._masks = [(int.from_bytes(k, "big"), int.from_bytes(k * 2, "big")) for k in keys]
            # HEAD_SIZE is a multiple of 4, so the filler starts key-aligned.
            self._tails = [mask(filler, k) for k in keys]

    def data(self, seq: int, now_ns: int) -> tuple[bytes, bytes, bytes]:
        """The three pieces of DATA message ``seq`` stamped ``now_ns`` (join them to send)."""
        i = seq % len(self._heads)
        k32, k64 = self._masks[i]
        return self._heads[i], _HEAD_WORDS.pack(_DATA_WORD ^ k32, seq ^ k64, now_ns ^ k64), self._tails[i]

    def heartbeat(self, value: int) -> bytes:
        """A HEARTBEAT (kind 0x02, empty body) whose seq carries ``value`` (the send time)."""
        header = RESCUE_HEADER.pack(VERSION, KIND_HEARTBEAT, 0, 0, value)
        if self._tcp:
            return LEN_PREFIX.pack(len(header)) + header
        return ws_client_message(header)


def close_message(transport: str) -> bytes:
    """A polite goodbye: a WebSocket close frame (1000) for ws/rescue, nothing for tcp."""
    if transport == "tcp":
        return b""
    return ws_client_message((1000).to_bytes(2, "big"), opcode=OP_CLOSE)


def hello_message(
    *, token: bytes, session: str, role: str, nonce: bytes, client: str = "rescue-bench/0.1"
) -> bytes:
    """A HELLO (SPEC §2): header kind 0x10 + CBOR map, as one masked WebSocket message."""
    import cbor2

    body = cbor2.dumps(
        {
            "v": 1,
            "token": token,
            "session": session,
            "role": role,
            "nonce": nonce,
            "caps": {"compression": []},
            "client": client,
        }
    )
    return ws_client_message(RESCUE_HEADER.pack(VERSION, KIND_HELLO, 0, 0, 0) + body)
