"""``serve_websocket``: listeners, the HTTP upgrade under a timeout, one handler task per connection."""

from __future__ import annotations

import errno
import functools
import logging
import ssl
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from rescue._codes import CloseCode
from rescue._log import get_logger, log_event
from rescue.errors import ConnectionClosedError, ProtocolError
from rescue.websocket._codec import (
    DEFAULT_MAX_MESSAGE,
    MAX_HANDSHAKE_SIZE,
    HandshakeError,
    Rejection,
    Request,
    check_request_start,
    error_response,
    find_head_end,
    parse_request,
    switching_protocols,
)
from rescue.websocket._connection import CLOSE_TIMEOUT, WebSocketConnection, _socket_of
from rescue.websocket._tls import TLSSocketStream

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "AcceptCheck", "Handler", "WebSocketServer", "serve_websocket"]

_logger = get_logger("rescue.websocket")

# A client that has not finished its HTTP upgrade (TLS included) by then is dropped: it holds a
# socket and a task, and a slow-loris would otherwise hold them forever.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
# RFC 6455 1011: the server hit an unexpected condition (a handler raised).
_INTERNAL_ERROR: Final = 1011
# accept() failures that mean "out of descriptors/memory for now" (as trio.serve_listeners): the
# listener logs, waits ACCEPT_RETRY_S and tries again instead of dying.
_ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S: Final = 0.1
# ... and logs it at most this often, with the count of failures since the last line (it logged
# every retry: 10 ERROR lines a second while a connection flood held every fd).
ACCEPT_LOG_INTERVAL_S: Final = 10.0

Handler = Callable[[WebSocketConnection], Awaitable[None]]
AcceptCheck = Callable[[Request, "tuple[str, int] | None"], Awaitable[Rejection | None]]
Listener = trio.SocketListener


@dataclass(frozen=True, slots=True)
class WebSocketServer:
    """What :func:`serve_websocket` reports once it is listening.

    Attributes:
        listeners: the bound TCP listeners (TLS, if served, runs per connection over MemoryBIO:
            :class:`~rescue.websocket._tls.TLSSocketStream`, decision 0018).
        addresses: each listener's bound ``(host, port)``.
    """

    listeners: tuple[Listener, ...]
    addresses: tuple[tuple[str, int], ...]

    @property
    def port(self) -> int:
        """The port of the first listener (all share one port unless it was 0 on a dual stack)."""
        return self.addresses[0][1]


def _address(listener: Listener) -> tuple[str, int]:
    name = listener.socket.getsockname()
    return (str(name[0]), int(name[1]))


async def serve_websocket(
    handler: Handler,
    host: str | None,
    port: int,
    *,
    path: str | None = "/v1/connect",
    ssl_context: ssl.SSLContext | None = None,
    max_message: int = DEFAULT_MAX_MESSAGE,
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
    accept_check: AcceptCheck | None = None,
    handler_nursery: trio.Nursery | None = None,
    close_timeout: float = CLOSE_TIMEOUT,
    frame_budget: bool = True,
    task_status: trio.TaskStatus[WebSocketServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept WebSocket connections forever, running ``await handler(conn)`` for each.

    Each connection: read the upgrade request (bounded to 8 KiB) within ``handshake_timeout``
    (which also covers TLS), validate it (errors answered 400/404/405/426/431 with a JSON body),
    ask ``accept_check``, answer 101 (never with an extension), then run the handler.

    Args:
        handler: ``async def handler(conn)``; the connection is closed when it returns, unless
            the handler called :meth:`WebSocketConnection.detach` (then its new owner closes it).
        host: the address to bind, or ``None`` for every interface.
        port: the port (0 picks one; read it from ``WebSocketServer.port``).
        path: the only path served (404 otherwise), or ``None`` for any.
        ssl_context: serve TLS (``wss://``) with this context.
        max_message: the largest message accepted; larger ones are a ``PROTOCOL_ERROR``.
        handshake_timeout: seconds a client gets to complete TCP→TLS→HTTP upgrade.
        accept_check: ``async def check(request, remote_addr) -> Rejection | None``, awaited
            before the 101; a ``Rejection`` is sent as that HTTP status with a JSON body (e.g.
            503 while draining). Exceptions from it are logged and answered 500.
        handler_nursery: run connection tasks here (so they can outlive the listeners during a
            graceful shutdown); by default in a nursery inside this call.
        close_timeout: each connection's :attr:`WebSocketConnection.close_timeout`.
        frame_budget: hold each client to a :class:`~rescue.websocket.FrameBudget` (a flood of
            tiny frames is a ``PROTOCOL_ERROR``).
        task_status: ``started(WebSocketServer)`` once every listener is bound.

    Resource handling:
        The socket is always closed when the handler returns or raises: after ``close()`` with
        ``NORMAL`` (returned), ``exc.code`` (``ProtocolError``), or 1011 (any other exception) --
        except a detached connection, which its new owner must close.

    Error handling:
        A handler's exception never stops the server: ``ConnectionClosedError`` is expected
        (logged at debug), anything else is logged with its traceback. ``BaseException``\\ s
        (``Cancelled``, ``KeyboardInterrupt``) propagate.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    server = WebSocketServer(tuple(listeners), tuple(_address(lst) for lst in listeners))
    serve_one = functools.partial(
        _serve_connection,
        handler=handler,
        ssl_context=ssl_context,
        path=path,
        max_message=max_message,
        handshake_timeout=handshake_timeout,
        accept_check=accept_check,
        close_timeout=close_timeout,
        frame_budget=frame_budget,
    )
    log_event(_logger, "websocket.listening", addresses=[f"{h}:{p}" for h, p in server.addresses])
    # Not trio.serve_listeners: its wrapper closes the stream when the handler task ends, which
    # would make WebSocketConnection.detach() impossible. _serve_connection closes it instead.
    async with trio.open_nursery() as nursery:
        handlers = handler_nursery if handler_nursery is not None else nursery
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handlers, serve_one)
        task_status.started(server)


async def _accept_loop(
    listener: Listener,
    handlers: trio.Nursery,
    serve_one: Callable[[trio.abc.Stream], Awaitable[None]],
) -> None:
    failures = 0
    logged = -ACCEPT_LOG_INTERVAL_S
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                failures += 1
                if trio.current_time() - logged >= ACCEPT_LOG_INTERVAL_S:
                    logged = trio.current_time()
                    log_event(
                        _logger,
                        "websocket.accept_failed",
                        level=logging.ERROR,
                        error=str(exc),
                        failures=failures,
                    )
                    failures = 0
                await trio.sleep(ACCEPT_RETRY_S)
            else:
                handlers.start_soon(serve_one, stream)


async def _serve_connection(
    stream: trio.abc.Stream,
    *,
    handler: Handler,
    ssl_context: ssl.SSLContext | None,
    path: str | None,
    max_message: int,
    handshake_timeout: float,
    accept_check: AcceptCheck | None,
    close_timeout: float,
    frame_budget: bool,
) -> None:
    conn: WebSocketConnection | None = None
    remote: tuple[str, int] | None = None
    try:  # from here on, every path closes the stream (or hands it off: detach)
        sock = _socket_of(stream)
        if sock is not None:
            try:
                peer = sock.getpeername()
                remote = (str(peer[0]), int(peer[1]))
            except OSError:
                pass
        upgraded: tuple[Request, bytes] | None = None
        with trio.move_on_after(handshake_timeout) as scope:
            if ssl_context is not None and isinstance(stream, trio.SocketStream):
                # TLS over MemoryBIO, so the connection keeps the socket path (decision 0018)
                tls = TLSSocketStream(stream, ssl_context)
                stream = tls
                try:
                    await tls.do_handshake()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    log_event(
                        _logger,
                        "websocket.tls_failed",
                        level=logging.DEBUG,
                        remote=_fmt(remote),
                        error=str(exc),
                    )
                    return
            upgraded = await _handshake(stream, path, accept_check, remote)
        if scope.cancelled_caught:
            log_event(_logger, "websocket.handshake_timeout", level=logging.DEBUG, remote=_fmt(remote))
        if upgraded is None:
            return
        request, rest = upgraded
        conn = WebSocketConnection(
            stream,
            client=False,
            max_message=max_message,
            path=request.path,
            request_headers=request.headers,
            initial_data=rest,
            close_timeout=close_timeout,
            frame_budget=frame_budget,
        )
        try:
            await handler(conn)
        except ProtocolError as exc:
            log_event(_logger, "websocket.protocol_error", level=logging.DEBUG, error=str(exc))
            if not conn.detached:
                await conn.close(exc.code, str(exc)[:60])
        except ConnectionClosedError as exc:
            log_event(_logger, "websocket.closed", level=logging.DEBUG, code=exc.code, reason=exc.reason)
        except Exception as exc:  # a handler bug must not take the server down
            log_event(
                _logger,
                "websocket.handler_error",
                level=logging.ERROR,
                remote=_fmt(remote),
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
            if not conn.detached:
                await conn.close(_INTERNAL_ERROR, "internal error")
    finally:
        if conn is None:
            await trio.aclose_forcefully(stream)
        elif not conn.detached:  # a detached connection belongs to whoever took it
            await conn.close(CloseCode.NORMAL)


def _fmt(remote: tuple[str, int] | None) -> str | None:
    return f"{remote[0]}:{remote[1]}" if remote else None


async def _handshake(
    stream: trio.abc.Stream,
    path: str | None,
    accept_check: AcceptCheck | None,
    remote: tuple[str, int] | None,
) -> tuple[Request, bytes] | None:
    """Read and answer the upgrade; the request and bytes read past it, or ``None`` if refused."""
    buf = bytearray()
    checked = 0  # how much of the request line is known plausible (-1: all of it)
    try:
        while True:
            end = find_head_end(buf)
            if end >= 0:
                break
            if checked >= 0 and buf:
                checked = check_request_start(buf, checked)
            chunk = await stream.receive_some(MAX_HANDSHAKE_SIZE)
            if not chunk:
                return None
            buf += chunk
        request = parse_request(bytes(buf[:end]), path=path)
    except HandshakeError as exc:
        log_event(
            _logger, "websocket.handshake_rejected", level=logging.DEBUG, status=exc.status, error=exc.error
        )
        await _send_quietly(stream, error_response(exc.status, exc.error, exc.detail, headers=exc.headers))
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return None
    if accept_check is not None:
        try:
            rejection = await accept_check(request, remote)
        except Exception as exc:
            log_event(
                _logger,
                "websocket.accept_check_error",
                level=logging.ERROR,
                error=repr(exc),
                traceback="".join(traceback.format_exception(exc)),
            )
            rejection = Rejection(500, "internal_error", "the server could not evaluate the request")
        if rejection is not None:
            await _send_quietly(stream, error_response(*rejection))
            return None
    if not await _send_quietly(stream, switching_protocols(request)):
        return None
    return request, bytes(buf[end:])


async def _send_quietly(stream: trio.abc.Stream, data: bytes) -> bool:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return False
    return True
