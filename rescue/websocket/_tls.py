"""TLS over a plain socket through ``ssl.MemoryBIO``: the handshake here, the data path in the connection.

Why (``docs/decisions/0018-tls-on-the-fast-path.md``): :class:`trio.SSLStream` hides the socket, so
a TLS connection could not use the shared read poller, its read-ahead or quiet sockets (decisions
0007, 0015) and paid one trio wait per connection (about 3.5x the idle CPU of plain ``ws://``).
:class:`TLSSocketStream` keeps the TLS state (an :class:`ssl.SSLObject` between two memory BIOs)
next to the :class:`trio.SocketStream` it runs over. The handshake and the HTTP upgrade use it as
an ordinary :class:`trio.abc.Stream`; afterwards :class:`~rescue.websocket.WebSocketConnection`
drives the socket itself (non-blocking ``readv`` into the BIO, decrypt, parse; encrypt, ``write``)
exactly as it does for plain TCP, so everything built on the socket path works unchanged.
"""

from __future__ import annotations

import ssl
from typing import Final

import trio

from rescue.websocket._codec import TLSRecords

__all__ = ["TLSSocketStream", "quiet_rcvlowat"]

# Bytes per read from the socket during the handshake and upgrade (the data path reads READ_SIZE).
_HANDSHAKE_READ: Final = 16384
# TLS record overhead (bytes on the wire beyond the plaintext) for the AEAD suites whose overhead
# is fixed: TLS 1.3 (5-byte header + 1 content-type byte + 16-byte tag, every default suite),
# TLS 1.2 AES-GCM (header + 8-byte explicit nonce + tag), TLS 1.2 ChaCha20-Poly1305 (header + tag).
_TLS13_OVERHEAD: Final = 22
_TLS12_GCM_OVERHEAD: Final = 29
_TLS12_CHACHA_OVERHEAD: Final = 21


def quiet_rcvlowat(ssl_object: ssl.SSLObject, plain_mark: int) -> int | None:
    """``SO_RCVLOWAT`` that passes a record of ``plain_mark`` plaintext bytes and holds back smaller ones.

    On plain TCP the quiet mark is the smallest real frame (34 bytes: a heartbeat is 18). Under
    TLS each frame is one record (the peer writes one frame per record when idle), so the mark
    moves up by the record overhead of the negotiated suite. ``None`` when that overhead is not
    fixed (CBC suites pad to the block size): such a connection is looked at as usual but keeps a
    mark of 1 (every heartbeat wakes the poller: correct, only dearer).
    """
    version = ssl_object.version()
    cipher = ssl_object.cipher()
    if version == "TLSv1.3":
        name = cipher[0] if cipher else ""
        return None if "CCM_8" in name else plain_mark + _TLS13_OVERHEAD
    if version == "TLSv1.2" and cipher:
        if "GCM" in cipher[0]:
            return plain_mark + _TLS12_GCM_OVERHEAD
        if "CHACHA20" in cipher[0]:
            return plain_mark + _TLS12_CHACHA_OVERHEAD
    return None


class TLSSocketStream(trio.abc.Stream):
    """TLS over a :class:`trio.SocketStream`, with the TLS state open to its owner.

    ``ssl_object`` reads ciphertext from ``incoming`` and writes it to ``outgoing``; as a stream
    (handshake, HTTP upgrade) every call moves bytes between them and the socket. Once a
    :class:`~rescue.websocket.WebSocketConnection` takes it over, the connection does that itself
    and this object only holds the state. One reader and one writer at a time, like any stream.

    Args:
        transport_stream: the TCP stream (its socket is non-blocking, as trio makes them).
        ssl_context: the server's (or client's) context.
        server_side: whether we are the server.
        server_hostname: the name to check the server's certificate against (client side).
    """

    def __init__(
        self,
        transport_stream: trio.SocketStream,
        ssl_context: ssl.SSLContext,
        *,
        server_side: bool = True,
        server_hostname: str | None = None,
    ) -> None:
        self.transport_stream = transport_stream
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        # every byte written to ``incoming`` is fed here too: whether a record is partly in
        self.records = TLSRecords()
        self.ssl_object = ssl_context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=server_hostname
        )
        # how the data path ended (set by the connection's reads): an EOFError for close_notify
        # or a TCP EOF, an ssl.SSLError for bad records; reported again by every later read
        self.end: BaseException | None = None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The TCP socket underneath."""
        return self.transport_stream.socket

    async def do_handshake(self) -> None:
        """Run the TLS handshake to its end (bound it with a timeout: the peer may stall).

        Raises:
            trio.BrokenResourceError: the peer sent something that is not TLS, failed the
                handshake, or went away during it.
        """
        while True:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
            except ssl.SSLError as exc:
                await self._flush_quietly()  # the alert, if OpenSSL made one
                raise trio.BrokenResourceError(f"TLS handshake failed: {exc}") from exc
            else:
                await self._flush()  # the last flight (and TLS 1.3 session tickets)
                return

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Decrypted bytes (``b""`` at the peer's close_notify or EOF)."""
        while True:
            try:
                data = self.ssl_object.read(max_bytes or _HANDSHAKE_READ)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
            if self.outgoing.pending:
                await self._flush()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt ``data`` and write it all."""
        if data:
            try:
                self.ssl_object.write(data)
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS error: {exc}") from exc
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        """Close the socket (no close_notify: the connection sends it when it closes cleanly)."""
        await self.transport_stream.aclose()

    async def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            await self.transport_stream.send_all(data)

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _fill(self) -> None:
        data = await self.transport_stream.receive_some(_HANDSHAKE_READ)
        if data:
            self.incoming.write(data)
            self.records.fed(data)
        else:
            self.incoming.write_eof()
