"""``serve_websocket``: listeners, the HTTP upgrade under a timeout, one handler task per connection."""

from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import trio

from rescue._codes import CloseCode
from rescue._log import get_logger, log_event
from rescue._net import ACCEPT_CAPACITY_ERRNOS, ACCEPT_RETRY_S, accept_in_bursts, refuse_at_once
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

__all__ = [
    "DEFAULT_HANDSHAKE_TIMEOUT",
    "AcceptCheck",
    "ConnectionCap",
    "ConnectionStats",
    "Handler",
    "WebSocketServer",
    "serve_websocket",
]

_logger = get_logger("rescue.websocket")

# A client that has not finished its HTTP upgrade (TLS included) by then is dropped: it holds a
# socket and a task, and a slow-loris would otherwise hold them forever.
DEFAULT_HANDSHAKE_TIMEOUT: Final = 10.0
# RFC 6455 1011: the server hit an unexpected condition (a handler raised).
_INTERNAL_ERROR: Final = 1011
# accept() failing for lack of fds or memory (retried every rescue._net.ACCEPT_RETRY_S) is logged at
# most this often, with the count of failures since the last line (it logged every retry: 10 ERROR
# lines a second while a connection flood held every fd).
ACCEPT_LOG_INTERVAL_S: Final = 10.0
# The over-capacity warning (ConnectionCap) is logged at most this often, with counts since the last.
CAPACITY_LOG_INTERVAL_S: Final = 10.0
# What a newcomer over the cap gets (plain ws:// only; TLS clients are just closed): written at
# once into the empty socket buffer after what already arrived of its request is read and dropped,
# and the socket closed (rescue._net.refuse_at_once, shared with the HTTP server).
_BUSY_RESPONSE: Final = error_response(
    503, "server_busy", "too many connections; retry shortly", headers=(("Retry-After", "1"),)
)

Handler = Callable[[WebSocketConnection], Awaitable[None]]
AcceptCheck = Callable[[Request, "tuple[str, int] | None"], Awaitable[Rejection | None]]
Listener: TypeAlias = trio.SocketListener


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


@dataclass(slots=True)
class ConnectionStats:
    """What a :class:`ConnectionCap` counts, for ``/metrics`` (cumulative but ``open``).

    Attributes:
        open: accepted sockets not yet closed (handshaking, waiting for their first message, or
            handed to their owner: a relay session).
        shed: connections not yet established (upgrade or first message pending) closed to make
            room for a newcomer over the cap.
        refused: newcomers over the cap with nothing to shed: answered 503 ``server_busy`` (TLS:
            closed) at once.
        accept_errors: ``accept()`` failures for lack of fds or memory (each retry counts).
    """

    open: int = 0
    shed: int = 0
    refused: int = 0
    accept_errors: int = 0


class ConnectionCap:
    """At most ``max_connections`` sockets open on one :func:`serve_websocket` server.

    A connection is *pending* from ``accept()`` until its handler calls :meth:`established`
    (the relay: its first message, the HELLO, has arrived) or returns. Past the cap a newcomer takes
    the place of the longest-pending connection (its task is cancelled, its socket closed there and
    then, not when its task next runs: the accept loop may take another burst first, and the
    sockets it holds are what the cap bounds): a
    connection that never finishes its upgrade or never says HELLO is the cheapest thing to drop,
    and a client that is really connecting gets there within the time it takes the flood to cycle
    through every pending slot. Established connections (sessions, paired or waiting for their
    partner) are never shed. With nothing pending the newcomer is refused at once: ``503
    server_busy`` with ``Retry-After: 1`` on ``ws://`` (the upgrade path's JSON error body), a plain
    close on ``wss://``. A warning, ``websocket.over_capacity``, says so at most every
    :data:`CAPACITY_LOG_INTERVAL_S` with the counts since the last one.

    Args:
        max_connections: the cap (≥ 1).
        stats: the counters to keep (default: new ones, :attr:`stats`).
    """

    def __init__(self, max_connections: int, stats: ConnectionStats | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.max_connections = max_connections
        self.stats = stats if stats is not None else ConnectionStats()
        # pending connections' task scopes, longest-pending first (dicts keep order), with the
        # accepted socket, or the connection once upgraded: what to close when it is shed
        self._pending: dict[trio.CancelScope, trio.abc.Stream | WebSocketConnection | None] = {}
        self._scope_of: dict[int, trio.CancelScope] = {}  # id(connection) -> its pending scope
        # shed before their upgrade: their socket was closed and counted by the cap, not their task
        self._counted: set[trio.CancelScope] = set()
        self._shed = self._refused = self._accept_errors = 0  # since the last log line
        self._logged = -CAPACITY_LOG_INTERVAL_S

    @property
    def pending(self) -> int:
        """Connections that could be shed now."""
        return len(self._pending)

    @property
    def room(self) -> int:
        """Newcomers that would get in now: free slots plus pending connections they would displace."""
        return self.max_connections - self.stats.open + len(self._pending)

    @property
    def full(self) -> bool:
        """Whether a newcomer would be refused now: the cap is reached and nothing is pending.

        Pending connections do not make the node full: a newcomer takes the place of one, so a
        flood of sockets that never say HELLO leaves the node taking real clients (the relay's
        ``/readyz`` stays 200 through it and turns 503 only when this is true).
        """
        return self.stats.open >= self.max_connections and not self._pending

    def admit(self, stream: trio.abc.Stream | None = None) -> trio.CancelScope | None:
        """Admit a just-accepted socket (then it counts as open and pending): under the cap, or
        once the longest-pending connection is closed in its favour.

        Args:
            stream: the accepted socket, closed here if it is shed before its upgrade (without it,
                only its task closes it, when that task next runs).

        Returns:
            The scope to serve it in (cancelled to shed it while it is pending), or ``None``:
            refused. Pending order is admission order, also for a burst admitted in one pass of
            the accept loop before any of its tasks has run.
        """
        stats = self.stats
        if stats.open >= self.max_connections:
            if not self._pending:
                stats.refused += 1
                self._refused += 1
                self._log()
                return None
            oldest, held = next(iter(self._pending.items()))
            del self._pending[oldest]
            oldest.cancel()
            self._close_shed(oldest, held)
            stats.shed += 1
            self._shed += 1
            self._log()
        stats.open += 1
        scope = trio.CancelScope()
        self._pending[scope] = stream
        return scope

    def _close_shed(
        self, scope: trio.CancelScope, held: trio.abc.Stream | WebSocketConnection | None
    ) -> None:
        if isinstance(held, WebSocketConnection):
            held.abort()  # its transport-closed hook counts it
        elif isinstance(held, trio.SocketStream):
            held.socket.close()
            self._counted.add(scope)
            self.closed()

    def established(self, conn: WebSocketConnection) -> None:
        """``conn`` is past the point where shedding it is cheap: never shed it from now on."""
        scope = self._scope_of.pop(id(conn), None)
        if scope is not None:
            self._pending.pop(scope, None)

    def closed(self) -> None:
        """An admitted socket is closed."""
        self.stats.open -= 1

    def accept_failed(self) -> None:
        """``accept()`` ran out of fds or memory (logged by the accept loop)."""
        self.stats.accept_errors += 1

    def _bind(self, conn: WebSocketConnection, scope: trio.CancelScope) -> None:
        if scope in self._pending:
            self._pending[scope] = conn
            self._scope_of[id(conn)] = scope
        conn.on_transport_closed = self.closed

    def _release(self, scope: trio.CancelScope, conn: WebSocketConnection | None) -> None:
        self._pending.pop(scope, None)
        if conn is not None:
            self._scope_of.pop(id(conn), None)

    def _stream_closed(self, scope: trio.CancelScope) -> None:
        """A socket that never became a connection is closed by its task (counted once)."""
        if scope in self._counted:
            self._counted.discard(scope)
        else:
            self.closed()

    def _log(self) -> None:
        now = trio.current_time()
        if now - self._logged < CAPACITY_LOG_INTERVAL_S:
            return
        self._logged = now
        log_event(
            _logger,
            "websocket.over_capacity",
            level=logging.WARNING,
            open=self.stats.open,
            max_connections=self.max_connections,
            shed=self._shed,
            refused=self._refused,
            detail=f"{self.stats.open} connections open (the cap is {self.max_connections}): "
            "connections still in their upgrade or before their first message are closed to make "
            "room, newcomers are refused while there are none",
        )
        self._shed = self._refused = 0


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
    cap: ConnectionCap | None = None,
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
        cap: bound the open connections (:class:`ConnectionCap`: past it, shed a pending one or
            refuse the newcomer); ``None``: no bound but the process's fd limit.
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
        cap=cap,
    )
    log_event(_logger, "websocket.listening", addresses=[f"{h}:{p}" for h, p in server.addresses])
    # Not trio.serve_listeners: its wrapper closes the stream when the handler task ends, which
    # would make WebSocketConnection.detach() impossible. _serve_connection closes it instead.
    async with trio.open_nursery() as nursery:
        handlers = handler_nursery if handler_nursery is not None else nursery
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handlers, serve_one, cap, ssl_context is not None)
        task_status.started(server)


def _accepting_socket(listener: Listener) -> socket.socket:
    """A second, non-blocking descriptor of ``listener``'s socket, for :func:`accept_in_bursts`
    (trio's accept takes one connection per pass of the run loop)."""
    accepting = socket.socket(fileno=os.dup(listener.socket.fileno()))
    accepting.setblocking(False)
    return accepting


async def _accept_loop(
    listener: Listener,
    handlers: trio.Nursery,
    serve_one: Callable[[trio.abc.Stream, trio.CancelScope | None], Awaitable[None]],
    cap: ConnectionCap | None,
    tls: bool,
) -> None:
    failures = 0
    logged = -ACCEPT_LOG_INTERVAL_S

    def take(conn: socket.socket) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        if cap is None:
            handlers.start_soon(serve_one, stream, None)
        elif (scope := cap.admit(stream)) is not None:
            handlers.start_soon(serve_one, stream, scope)
        else:
            refuse_at_once(stream.socket, b"" if tls else _BUSY_RESPONSE)

    def accept_failed(exc: OSError) -> None:
        nonlocal failures, logged
        failures += 1
        if cap is not None:
            cap.accept_failed()
        if trio.current_time() - logged >= ACCEPT_LOG_INTERVAL_S:
            logged = trio.current_time()
            log_event(
                _logger, "websocket.accept_failed", level=logging.ERROR, error=str(exc), failures=failures
            )
            failures = 0

    async with listener:
        # made at once (a descriptor for the listener's life, before any session); a node that
        # starts out of fds waits for one as for a failed accept
        while True:
            try:
                accepting = _accepting_socket(listener)
                break
            except OSError as exc:
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                accept_failed(exc)
                await trio.sleep(ACCEPT_RETRY_S)
        try:
            await accept_in_bursts(accepting, take, accept_failed)
        finally:
            accepting.close()


async def _serve_connection(
    stream: trio.abc.Stream,
    scope: trio.CancelScope | None,
    *,
    cap: ConnectionCap | None,
    **options: Any,
) -> None:
    """Serve one admitted socket; ``scope`` is its pending scope from :meth:`ConnectionCap.admit`
    (cancelled by the cap to shed it while it is pending, maybe before this task has started)."""
    if cap is None or scope is None:
        await _serve_one(stream, None, None, **options)
        return
    try:
        with scope:
            await _serve_one(stream, cap, scope, **options)
    finally:
        cap._release(scope, None)


async def _serve_one(
    stream: trio.abc.Stream,
    cap: ConnectionCap | None,
    cap_scope: trio.CancelScope | None,
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
        if cap is not None and cap_scope is not None:
            cap._bind(conn, cap_scope)  # from here on, the connection's close is the count's
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
        if cap is not None and cap_scope is not None:
            cap._release(cap_scope, conn)
        if conn is None:
            try:
                await trio.aclose_forcefully(stream)
            finally:
                if cap is not None and cap_scope is not None:
                    cap._stream_closed(cap_scope)
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
