"""A WebSocket client that sends whatever bytes it is told: for hostile-input tests and chaos runs.

:class:`RawClient` does a real HTTP upgrade over TCP (or none, for garbage before the upgrade) and
then writes raw bytes: malformed frames, floods of tiny frames, 2^63 length headers. Meanwhile it
reads what the relay answers, so a flood never deadlocks against a relay that stopped reading, and
:meth:`RawClient.flood` reports how the relay ended the connection::

    client = await RawClient.connect("127.0.0.1", port)
    outcome = await client.flood(build_frame(Opcode.PING, b"", mask=True) * 1000, limit=10 << 20)
    assert outcome.wire_code == 4010
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

import trio

from rescue.errors import ProtocolError
from rescue.protocol import HEADER_SIZE, Close, Kind
from rescue.websocket import (
    CloseFrameReceived,
    FrameParser,
    build_request,
    find_head_end,
    new_key,
    parse_response,
)

__all__ = ["RawClient", "RawOutcome"]

# What the client reads per call, and the most messages it keeps (a relay says little to a hostile
# peer: WELCOME/CLOSE; a peer in a session may get its partner's data, counted but not kept).
_READ_SIZE: Final = 65536
_MAX_KEPT: Final = 64


@dataclass
class RawOutcome:
    """How a raw connection ended.

    Attributes:
        sent: bytes written before the connection ended (or the flood's limit was reached).
        messages: the first binary messages received (at most 64); ``received`` counts them all.
        close: the relay's CLOSE message, if it sent one.
        wire_code: the close frame's code (``None``: no close frame; 1005: one without a code).
        reason: the close frame's reason.
        http: the raw HTTP answer when the upgrade was refused or never happened.
        eof: the relay closed the TCP connection.
    """

    sent: int = 0
    messages: list[bytes] = field(default_factory=list)
    received: int = 0
    close: Close | None = None
    wire_code: int | None = None
    reason: str = ""
    http: bytes = b""
    eof: bool = False


class RawClient:
    """One TCP connection to a WebSocket server, driven byte by byte.

    Make it with :meth:`connect` (upgraded) or :meth:`open_tcp` (no upgrade: send garbage or a
    slow upgrade yourself). Close it with :meth:`aclose`.
    """

    def __init__(self, stream: trio.SocketStream, *, upgraded: bool, initial: bytes = b"") -> None:
        self.stream = stream
        self.upgraded = upgraded
        self._parser = FrameParser(client=True, max_message=1 << 24)
        self._initial = initial
        self.outcome = RawOutcome()

    @classmethod
    async def open_tcp(cls, host: str, port: int) -> RawClient:
        """A plain TCP connection, no upgrade."""
        return cls(await trio.open_tcp_stream(host, port), upgraded=False)

    @classmethod
    async def connect(cls, host: str, port: int, path: str = "/v1/connect") -> RawClient:
        """TCP plus a valid WebSocket upgrade.

        Raises:
            HandshakeError: the server refused the upgrade.
            OSError / trio.BrokenResourceError: the connection failed.
        """
        stream = await trio.open_tcp_stream(host, port)
        try:
            key = new_key()
            await stream.send_all(build_request(f"{host}:{port}", path, key))
            buf = bytearray()
            while (end := find_head_end(buf)) < 0:
                chunk = await stream.receive_some(_READ_SIZE)
                if not chunk:
                    raise trio.BrokenResourceError("closed during the upgrade")
                buf += chunk
            parse_response(bytes(buf[:end]), key)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, upgraded=True, initial=bytes(buf[end:]))

    async def send(self, data: bytes) -> bool:
        """Write ``data``; False when the connection is already broken."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            return False
        self.outcome.sent += len(data)
        return True

    async def flood(self, chunk: bytes, *, limit: int, first: bytes = b"") -> RawOutcome:
        """Send ``first``, then ``chunk`` again and again until ``limit`` bytes or the end.

        Reads concurrently; returns when the server closed (close frame and/or EOF) or the limit
        was sent and the server then said nothing for a moment. Wrap it in ``trio.fail_after``.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_flood, chunk, limit, first, nursery.cancel_scope)
            await self._read_until_end()
            nursery.cancel_scope.cancel()
        return self.outcome

    async def _send_flood(self, chunk: bytes, limit: int, first: bytes, scope: trio.CancelScope) -> None:
        if first and not await self.send(first):
            return
        while self.outcome.sent < limit:
            if not await self.send(chunk):
                return
        # everything sent: give the server a moment to answer, then stop reading
        await trio.sleep(1.0)
        scope.cancel()

    async def expect_message(self) -> bytes:
        """Read until the next binary message (e.g. WELCOME after a HELLO); wrap in ``trio.fail_after``.

        Raises:
            trio.BrokenResourceError: the server closed first.
        """
        kept = len(self.outcome.messages)
        while True:
            data, self._initial = self._initial, b""
            if not data:
                data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                raise trio.BrokenResourceError("the server closed the connection")
            for event in self._parser.feed(data):
                if isinstance(event, bytes):
                    self.outcome.received += 1
                    self.outcome.messages.append(event)
                elif isinstance(event, CloseFrameReceived):
                    raise trio.BrokenResourceError(f"closed with {event.code}: {event.reason}")
            if len(self.outcome.messages) > kept:
                return self.outcome.messages[kept]

    async def finish(self) -> RawOutcome:
        """Read until the server closes; the outcome. Wrap it in ``trio.fail_after``."""
        await self._read_until_end()
        return self.outcome

    async def _read_until_end(self) -> None:
        outcome = self.outcome
        data, self._initial = self._initial, b""
        while True:
            if not data:
                try:
                    data = await self.stream.receive_some(_READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    outcome.eof = True
                    return
                if not data:
                    outcome.eof = True
                    return
            if not self.upgraded:
                outcome.http += data[: max(0, 16384 - len(outcome.http))]
                data = b""
                continue
            try:
                events = self._parser.feed(data)
            except ProtocolError:
                return  # the server broke framing: nothing more to learn
            data = b""
            for event in events:
                if isinstance(event, bytes):
                    outcome.received += 1
                    if len(outcome.messages) < _MAX_KEPT:
                        outcome.messages.append(event)
                    if len(event) >= HEADER_SIZE and event[1] == Kind.CLOSE:
                        try:
                            outcome.close = Close.decode(event[HEADER_SIZE:])
                        except ProtocolError:
                            pass
                elif isinstance(event, CloseFrameReceived):
                    outcome.wire_code = 1005 if event.code is None else event.code
                    outcome.reason = event.reason
                    return

    async def aclose(self) -> None:
        """Drop the connection."""
        await trio.aclose_forcefully(self.stream)
