"""Test helpers for the relay: throwaway keys, token minting and a minimal HELLO-speaking peer.

::

    keys = TestKeys()
    relay = Relay(RelayConfig(keys="unused", port=0, admin_port=None), keys=keys.ring)
    addresses = await nursery.start(relay.run)
    host = await TestPeer.connect(addresses.url, keys, session="s1", role="host")
    guest = await TestPeer.connect(addresses.url, keys, session="s1", role="guest")
    await host.send(encode_frame(Kind.DATA, b"hi", seq=1))
    assert await guest.receive() == encode_frame(Kind.DATA, b"hi", seq=1)

The peer does no encryption: the relay forwards CONTROL/DATA bodies byte for byte, which is all the
relay's tests need (the SDK in ``rescue.client`` is the real peer).
"""

from __future__ import annotations

import os
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field

import trio

from rescue.errors import ConnectionClosedError
from rescue.protocol import (
    HEADER_SIZE,
    NONCE_SIZE,
    Caps,
    Close,
    Hello,
    KeyRing,
    Kind,
    PeerEvent,
    Role,
    SigningKey,
    Welcome,
    decode_header,
    encode_frame,
    mint_token,
)
from rescue.relay import Relay, RelayConfig
from rescue.sessions import PeerLink
from rescue.websocket import WebSocketClosedError, WebSocketConnection, connect_websocket

__all__ = [
    "ClosedBy",
    "TestKeys",
    "TestPeer",
    "peer_conn",
    "relay_test_config",
    "seq_frame",
    "start_test_relay",
]


@dataclass
class TestKeys:
    """A throwaway Ed25519 signing key and the key ring that verifies it."""

    __test__ = False  # not a pytest test class

    signing: SigningKey = field(default_factory=SigningKey.generate)

    @property
    def ring(self) -> KeyRing:
        """The verification keys (pass to ``Relay(..., keys=...)``)."""
        return KeyRing([self.signing])

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWK set (to write to a file or serve)."""
        return self.ring.to_jwks()

    def mint(
        self,
        session: str,
        role: str,
        *,
        audience: str = "*",
        ttl: int = 300,
        cohort: str = "test",
        now: float | None = None,
        fb: int = 0,
    ) -> bytes:
        """A token for ``session``/``role`` (``now`` defaults to the wall clock)."""
        return mint_token(
            self.signing,
            session_id=session,
            role=role,
            audience=audience,
            cohort=cohort,
            ttl=ttl,
            fb=fb,
            now=time.time() if now is None else now,
        )


@dataclass(frozen=True)
class ClosedBy:
    """How the relay ended a connection.

    Attributes:
        close: the CLOSE message the relay sent before its close frame, if any.
        wire_code: the WebSocket close code (``None``: the socket just died).
        reason: the close frame's reason.
    """

    close: Close | None
    wire_code: int | None
    reason: str


class TestPeer:
    """A peer that speaks just enough of the protocol to exercise the relay.

    Attributes:
        ws: the WebSocket.
        welcome: the relay's WELCOME (``None`` when connected with ``expect_welcome=False``).
        nonce: the HELLO nonce used.
    """

    __test__ = False

    def __init__(self, ws: WebSocketConnection, nonce: bytes) -> None:
        self.ws = ws
        self.nonce = nonce
        self.welcome: Welcome | None = None
        self._pending: deque[bytes] = deque()

    @classmethod
    async def connect(
        cls,
        url: str,
        keys: TestKeys | None = None,
        *,
        session: str = "s1",
        role: str = "host",
        token: bytes | None = None,
        audience: str = "*",
        nonce: bytes | None = None,
        caps: Caps | None = None,
        expect_welcome: bool = True,
        max_message: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
    ) -> TestPeer:
        """Connect, send HELLO and (by default) wait for WELCOME (``wss://``: with ``ssl_context``).

        Raises:
            ConnectionClosedError: the relay closed the connection instead of welcoming it.
        """
        if token is None:
            assert keys is not None, "pass keys or a token"
            token = keys.mint(session, role, audience=audience)
        nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
        ws = await connect_websocket(url, max_message=max_message, ssl_context=ssl_context)
        peer = cls(ws, nonce)
        caps = Caps(("zlib",)) if caps is None else caps
        hello = Hello(token=token, session=session, role=Role(role), nonce=nonce, caps=caps)
        await ws.send_message(hello.to_message())
        if expect_welcome:
            first = await peer.receive()
            if first[1] == Kind.CLOSE:
                closed = await peer.wait_closed(first_message=first)
                raise ConnectionClosedError(None, f"refused: {closed}")
            assert first[1] == Kind.WELCOME, f"expected WELCOME, got kind {first[1]}"
            peer.welcome = Welcome.decode(first[HEADER_SIZE:])
        return peer

    async def send(self, *messages: bytes) -> None:
        """Send raw messages (one write)."""
        await self.ws.send_messages(list(messages))

    async def receive(self) -> bytes:
        """The next message from the relay (buffered across batches)."""
        while not self._pending:
            self._pending.extend(await self.ws.receive_messages())
        return self._pending.popleft()

    async def receive_peer_event(self) -> PeerEvent:
        """The next message, which must be a PEER event."""
        message = await self.receive()
        assert decode_header(message).kind is Kind.PEER, f"expected PEER, got kind {message[1]}"
        return PeerEvent.decode(message[HEADER_SIZE:])

    async def wait_closed(self, *, first_message: bytes | None = None) -> ClosedBy:
        """Read until the relay closes; return its CLOSE message (if any) and close code.

        Messages other than CLOSE that arrive first are discarded.
        """
        close: Close | None = None
        message = first_message
        while True:
            if message is not None and len(message) >= HEADER_SIZE and message[1] == Kind.CLOSE:
                close = Close.decode(message[HEADER_SIZE:])
            try:
                message = await self.receive()
            except WebSocketClosedError as exc:
                return ClosedBy(close, exc.wire_code, exc.reason)
            except ConnectionClosedError as exc:
                return ClosedBy(close, None if exc.code is None else int(exc.code), exc.reason)

    async def aclose(self) -> None:
        """Close the WebSocket normally."""
        await self.ws.close()

    def abort(self) -> None:
        """Drop the socket without a close handshake."""
        self.ws.abort()


def relay_test_config(**overrides: object) -> RelayConfig:
    """A :class:`RelayConfig` for in-process tests: loopback, port 0, no admin port, no rate limit."""
    settings: dict[str, object] = {
        "keys": "test-keys-given-in-process",
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": None,
        "handshakes_per_ip_per_min": 0,
        "node_id": "test-node",
    }
    settings.update(overrides)
    return RelayConfig(**settings)  # type: ignore[arg-type]


async def start_test_relay(nursery: trio.Nursery, **overrides: object) -> tuple[Relay, str, TestKeys]:
    """Start a :func:`relay_test_config` relay (with ``overrides``) in ``nursery``: (relay, url, keys)."""
    keys = TestKeys()
    relay = Relay(relay_test_config(**overrides), keys=keys.ring)
    addresses = await nursery.start(relay.run)
    return relay, addresses.url, keys


def seq_frame(seq: int, size: int) -> bytes:
    """A DATA frame whose body is derived from its seq, so any corruption or reordering shows."""
    stamp = struct.pack(">Q", seq)
    return encode_frame(Kind.DATA, (stamp * (size // 8 + 1))[:size], seq=seq)


def peer_conn(relay: Relay, session: str, role: Role) -> PeerLink:
    """The relay's connection object for ``role`` in ``session`` (which must be connected)."""
    found = relay.table.get(session)
    assert found is not None, f"no session {session!r}"
    conn = found.peer(role)
    assert conn is not None, f"no {role.value} in {session!r}"
    return conn
