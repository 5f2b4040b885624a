"""``connect_websocket``: the client side of the upgrade, over TCP or TLS."""

from __future__ import annotations

import functools
import re
import ssl
from collections.abc import Sequence
from typing import Final
from urllib.parse import urlsplit

import trio

from rescue.websocket._codec import (
    DEFAULT_MAX_MESSAGE,
    MAX_HANDSHAKE_SIZE,
    build_request,
    find_head_end,
    new_key,
    parse_response,
)
from rescue.websocket._connection import CLOSE_TIMEOUT, WebSocketClosedError, WebSocketConnection

__all__ = ["connect_websocket"]

# Of a refusal's body (the server's small JSON error), read at most this much for the message.
_MAX_ERROR_BODY: Final = 4096
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*(\d{1,9})[ \t]*\r\n", re.IGNORECASE)


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """``ssl.create_default_context()``, once per process: each one loads the system's CA store
    (milliseconds of CPU and short-lived allocations that fragment the heap of a client that
    reconnects often); a context is safe to share between connections."""
    return ssl.create_default_context()


async def connect_websocket(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    headers: Sequence[tuple[str, str]] = (),
    close_timeout: float = CLOSE_TIMEOUT,
) -> WebSocketConnection:
    """Open a client WebSocket to ``url`` (``ws://host:port/path`` or ``wss://…``).

    Outgoing frames are masked with random keys; the server's must not be masked. No extension
    or subprotocol is offered. The connection is an async context manager that closes (1000) on
    exit: ``async with await connect_websocket(url) as ws: ...``.

    Args:
        url: where to connect; the path defaults to ``/``.
        ssl_context: TLS settings for ``wss://`` (default: ``ssl.create_default_context()``, made
            once per process).
        max_message: the largest message accepted from the server.
        headers: extra request headers (never put a token here if it could be logged: SPEC §2
            sends tokens in HELLO, not in the upgrade).
        close_timeout: the connection's :attr:`WebSocketConnection.close_timeout`.

    Returns:
        The open connection.

    Raises:
        ValueError: the URL is not ``ws://`` or ``wss://`` with a host.
        HandshakeError: the server refused the upgrade (``status``, ``error``, ``detail`` from its
            answer) or answered something that is not a valid 101.
        WebSocketClosedError: the TCP or TLS connection failed or closed during the handshake.

    Cancellation:
        Safe: the half-open connection is closed. There is no built-in timeout: wrap the call in
        ``trio.fail_after``.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"[{host}]" if ":" in host else host
    if port != (443 if secure else 80):
        host_header += f":{port}"
    try:
        tcp = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        raise WebSocketClosedError(None, f"cannot connect to {host}:{port}: {exc}") from exc
    stream: trio.abc.Stream = tcp
    if secure:
        stream = trio.SSLStream(tcp, ssl_context or _default_tls(), server_hostname=host)
    key = new_key()
    ok = False
    try:
        try:
            await stream.send_all(build_request(host_header, target, key, headers=headers))
            rest = await _read_response(stream, key)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise WebSocketClosedError(None, f"connection failed during the handshake: {exc}") from exc
        conn = WebSocketConnection(
            stream,
            client=True,
            max_message=max_message,
            path=target,
            request_headers=tuple((k.lower(), v) for k, v in headers),
            initial_data=rest,
            close_timeout=close_timeout,
        )
        ok = True
        return conn
    finally:
        if not ok:
            await trio.aclose_forcefully(stream)


async def _read_response(stream: trio.abc.Stream, key: str) -> bytes:
    """Read and validate the 101; the bytes read past it (early frames)."""
    buf = bytearray()
    while True:
        end = find_head_end(buf)
        if end >= 0:
            break
        chunk = await stream.receive_some(MAX_HANDSHAKE_SIZE)
        if not chunk:
            raise WebSocketClosedError(None, "server closed the connection during the handshake")
        buf += chunk
    head = bytes(buf[:end])
    body = bytes(buf[end:])
    if not head.startswith(b"HTTP/1.1 101 "):
        # A refusal: read its (small) body so the error carries the server's reason.
        match = _CONTENT_LENGTH.search(head)
        want = min(int(match.group(1)), _MAX_ERROR_BODY) if match else 0
        while len(body) < want:
            chunk = await stream.receive_some(want - len(body))
            if not chunk:
                break
            body += chunk
        body = body[:want]
    parse_response(head, key, body)
    return body
