"""A tiny JSON-over-HTTP toolkit: a router and a lean HTTP/1.1 server on trio streams.

The token service and the relay's admin port are small JSON APIs; a framework would cost more
dependencies and startup time than it saves. This module gives them:

- :class:`Router`: method + path routes with ``{name}`` path parameters, JSON answers, and errors
  that are always JSON ``{"error": code, "detail": text}`` (404, 405, 413, 400 ``invalid_request``
  for malformed JSON, 415 ``unsupported_media_type`` for a body that is not declared
  ``application/json``, 500 ``internal_error`` for an unexpected exception, logged, never a
  traceback to the client);
- :class:`JsonError`: raise it from a handler to answer with that status and error code;
- :func:`json_response` / :func:`text_response` (``/metrics`` is plain text);
- :func:`serve_http`: serve a router over HTTP/1.1 (keep-alive, pipelining, HTTP/1.0, chunked
  bodies; the parser is :mod:`rescue._http1`), report the bound port with
  ``task_status.started(port)`` (port 0 works) and shut down gracefully when cancelled. Why not
  hypercorn any more: decision 0017;
- :class:`HttpShutdown`: the steps before and after that cancellation, driven from outside (the
  token service's SIGTERM drain, decision 0023): answers that close their connection, and an abort.

Example::

    router = Router()

    @router.get("/v1/things/{thing_id}")
    async def get_thing(request: Request) -> Response:
        return json_response({"id": request.path_params["thing_id"]})

    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_http, router, "127.0.0.1", 0)
"""

from __future__ import annotations

import json
import logging
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any, Final, Protocol
from urllib.parse import parse_qsl, unquote

import trio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from rescue._http1 import MAX_HEAD, MAX_HEADERS, REASONS, HttpError, ParsedRequest, RequestParser
from rescue._log import get_logger, log_event
from rescue._net import accept_in_bursts, refuse_at_once

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_MAX_BODY",
    "Handler",
    "HttpApp",
    "HttpLimits",
    "HttpShutdown",
    "HttpStats",
    "JsonError",
    "Request",
    "Response",
    "Router",
    "error_response",
    "is_json_media_type",
    "json_response",
    "render_parts",
    "render_response",
    "serve_http",
    "text_response",
]

Handler = Callable[["Request"], Awaitable["Response"]]

# Request bodies of these APIs are small JSON objects (a token request is < 4 KiB even with an
# entitlement JWT); 64 KiB leaves room and still stops a client from making us buffer megabytes.
DEFAULT_MAX_BODY: Final = 64 * 1024
# How long in-flight requests get to finish after the server is asked to stop; idle keep-alive
# connections close at once. Short, because every request these APIs serve takes milliseconds.
DEFAULT_GRACEFUL_TIMEOUT: Final = 2.0
# Idle keep-alive connections are kept this long; relays poll status every second, so a
# connection is reused while polling, and an idle one is closed well before load balancers give up.
KEEP_ALIVE_TIMEOUT: Final = 15.0
# A whole request (head and body, at most ~80 KiB) must arrive within this time of its first byte:
# any link that can use these APIs sends it in well under a second; a slow-loris trickling bytes
# gets 408 and the connection closed instead of holding it forever.
REQUEST_TIMEOUT: Final = 10.0
# A response (a few KiB) must be taken by the client within this time, or the connection is
# dropped: a client that stops reading cannot hold a connection (and a shutdown) up.
SEND_TIMEOUT: Final = 10.0
# After an error answer the server half-closes and reads (and drops) what the client still sends
# for this long, at most LINGER_BYTES, before closing: closing with unread bytes makes the kernel
# send RST, which can destroy the error answer before the client reads it (nginx's lingering close).
LINGER_TIMEOUT: Final = 2.0
LINGER_BYTES: Final = 256 * 1024
# One receive_some per request is the aim: a request of these APIs is < 1 KiB, a pipelined burst
# or a 64 KiB body takes a few.
RECEIVE_SIZE: Final = 64 * 1024
# A body up to this size is joined to its head (one write); a larger one is sent as it is.
JOIN_LIMIT: Final = 16 * 1024
# A large body is sent in pieces of this size; each one the client takes renews the send timeout.
SEND_PIECE: Final = 64 * 1024
# The listen backlog: a storm opens hundreds of connections at once (the kernel caps it at somaxconn).
BACKLOG: Final = 4096
# At most this many connections at once (half the process's file descriptors, so a flood of idle
# sockets leaves fds for the store, the relay and the log): past it, a new connection first takes
# the place of the longest-idle one (closed: it sent nothing yet or waits between requests); with
# none idle it is answered 503 and closed. Without a cap, thousands of idle sockets ran the process
# out of fds: accept() failed with EMFILE and /healthz went unanswered until they timed out. Both
# happen inside the accept loop, socket closed there and then: it takes a whole burst before any
# connection's task runs, so a close left to those tasks held the cap plus whole bursts of sockets.
MAX_CONNECTIONS: Final = max(64, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2)
# The over-capacity warnings (connection cap, accept() out of fds) are logged at most this often,
# with the counts since the last line: a flood must not turn into a log flood.
CAPACITY_LOG_INTERVAL: Final = 10.0


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The per-connection limits of :func:`serve_http` (seconds and bytes; see the constants)."""

    keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT
    request_timeout: float = REQUEST_TIMEOUT
    send_timeout: float = SEND_TIMEOUT
    linger_timeout: float = LINGER_TIMEOUT
    max_head: int = MAX_HEAD
    max_headers: int = MAX_HEADERS
    max_connections: int = MAX_CONNECTIONS


DEFAULT_LIMITS: Final = HttpLimits()


class HttpShutdown:
    """A graceful stop of :func:`serve_http` in steps, driven by its caller (decision 0023).

    Cancelling :func:`serve_http` is the stop itself (listener closed, idle connections closed,
    in-flight requests get ``graceful_timeout``). This object adds a step before it and a way out
    of it:

    - :meth:`close_connections`: every answer from now on says ``Connection: close``, nothing is
      refused. A keep-alive client (a relay polling status, a control plane's connection pool)
      then opens a new connection for its next request, which a load balancer that has taken this
      process out sends elsewhere; its old connection would have kept it here until the stop.
    - :meth:`abort`: every connection is cut at once, the graceful period skipped (before or
      during it); the caller still cancels :func:`serve_http`, which then returns without waiting.

    Resource handling:
        Holds the connection handlers' cancel scopes of the servers it is passed to, nothing else.
    """

    def __init__(self) -> None:
        self.closing = False
        self.aborted = False
        self._scopes: list[trio.CancelScope] = []

    def close_connections(self) -> None:
        """Answer ``Connection: close`` from now on (idempotent)."""
        self.closing = True

    def abort(self) -> None:
        """Cut every connection now; a later :func:`serve_http` stop does not wait (idempotent)."""
        self.aborted = True
        for scope in self._scopes:
            scope.cancel()

    def watch(self, scope: trio.CancelScope) -> None:
        """Cancel ``scope`` on :meth:`abort` (:func:`serve_http` passes its handlers' scope)."""
        self._scopes.append(scope)
        if self.aborted:
            scope.cancel()


@dataclass(slots=True)
class HttpStats:
    """What :func:`serve_http` counts, for a service's ``/metrics`` (cumulative but ``open``).

    Attributes:
        open: connections being served now (their sockets are open; at most ``max_connections``).
        shed_idle: idle connections closed to make room for a new one over ``max_connections``.
        refused: connections answered 503 ``server_busy`` (over the cap, none idle).
        accept_errors: ``accept()`` failures for lack of fds or memory (each retry counts).
    """

    open: int = 0
    shed_idle: int = 0
    refused: int = 0
    accept_errors: int = 0

    def metrics(
        self, *, subject: str = "HTTP connections", cap: str = "the connection cap"
    ) -> Iterator[Metric]:
        """These counts for ``/metrics`` (``beach_rescue_http_*``), read at scrape time."""
        yield GaugeMetricFamily(
            "beach_rescue_http_open_connections", f"{subject} being served", value=self.open
        )
        away = CounterMetricFamily(
            "beach_rescue_http_connections_turned_away",
            f"{subject} over {cap} (shed_idle: an idle one closed for a newcomer; refused: answered "
            "503) and accept() failures for lack of fds or memory (accept_error)",
            labels=["reason"],
        )
        away.add_metric(["shed_idle"], self.shed_idle)
        away.add_metric(["refused"], self.refused)
        away.add_metric(["accept_error"], self.accept_errors)
        yield away


_LOG = get_logger("rescue.http")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


class JsonError(Exception):
    """Raise from a handler to answer ``{"error": error, "detail": detail}`` with ``status``.

    Attributes:
        status: the HTTP status code.
        error: a short stable machine-readable code (``invalid_request``, ``unauthenticated``…).
        detail: human-readable text; never include secrets.
        headers: extra response headers (e.g. ``WWW-Authenticate``).
    """

    def __init__(
        self, status: int, error: str, detail: str, *, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers: dict[str, str] = dict(headers or {})


@dataclass(frozen=True, slots=True)
class Response:
    """A complete HTTP response (these APIs never stream)."""

    status: int
    body: bytes
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200, *, headers: Mapping[str, str] | None = None) -> Response:
    """A JSON response (compact, UTF-8)."""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False).encode()
    return Response(status, body, "application/json", dict(headers or {}))


def text_response(
    text: str, status: int = 200, *, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    """A plain-text response (``/metrics`` passes Prometheus' content type)."""
    return Response(status, text.encode(), content_type)


def error_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> Response:
    """The JSON error shape every endpoint uses: ``{"error": code, "detail": text}``."""
    return json_response({"error": error, "detail": detail}, status, headers=headers)


@dataclass(frozen=True, slots=True)
class Request:
    """One fully-read HTTP request.

    Attributes:
        method: upper-case method.
        path: the decoded path (no query string).
        path_params: values of the route's ``{name}`` placeholders.
        query: query parameters (the first value of each name).
        headers: header names lower-cased (the last value of each name).
        body: the raw body, at most the router's ``max_body`` bytes.
        client: the peer's ``(host, port)`` when the server knows it.
    """

    method: str
    path: str
    path_params: Mapping[str, str]
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    client: tuple[str, int] | None = None

    def json(self) -> Any:
        """The body parsed as JSON.

        Raises:
            JsonError: 415 ``unsupported_media_type`` when a body is sent without
                ``Content-Type: application/json`` (see :func:`is_json_media_type`); 400
                ``invalid_request`` when the body is empty, not UTF-8 or not JSON.
        """
        if not self.body:
            raise JsonError(400, "invalid_request", "request body must be JSON")
        self._require_json_media_type()
        try:
            return json.loads(self.body.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise JsonError(400, "invalid_request", "request body is not valid JSON") from exc

    def json_object(self, *, allow_empty: bool = False) -> dict[str, Any]:
        """The body parsed as a JSON object (``{}`` for an empty body when ``allow_empty``).

        Raises:
            JsonError: 400 ``invalid_request`` when it isn't a JSON object.
        """
        if allow_empty and not self.body:
            return {}
        if allow_empty and not self.body.strip():
            self._require_json_media_type()  # whitespace is a body: it must say what it is
            return {}
        data = self.json()
        if not isinstance(data, dict):
            raise JsonError(400, "invalid_request", "request body must be a JSON object")
        return data

    def _require_json_media_type(self) -> None:
        content_type = self.headers.get("content-type")
        if content_type is None or not is_json_media_type(content_type):
            shown = "none" if content_type is None else repr(content_type[:64])
            raise JsonError(
                415,
                "unsupported_media_type",
                f"request bodies must be sent as Content-Type: application/json (got {shown})",
            )

    def bearer_token(self) -> str | None:
        """The credential of an ``Authorization: Bearer …`` header, or None if absent/garbled."""
        value = self.headers.get("authorization")
        if value is None:
            return None
        scheme, _, credential = value.strip().partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential or " " in credential:
            return None
        return credential


def is_json_media_type(content_type: str) -> bool:
    """Whether a ``Content-Type`` value is ``application/json`` (any case, any spacing), with
    at most a ``charset=utf-8`` parameter (these APIs read bodies as UTF-8).

    Why this is required of every body: a browser sends ``text/plain``,
    ``application/x-www-form-urlencoded`` and ``multipart/form-data`` POSTs cross-site without
    a CORS preflight, so a server that parses any body as JSON lets any page make a visitor's
    browser act on it. ``application/json`` is not a "simple" content type: a cross-origin page
    can only send it after a preflight, which the CORS policy (``rescue.tokenservice._cors``)
    answers only for allowed origins.
    """
    media_type, *params = content_type.split(";")
    if media_type.strip().lower() != "application/json":
        return False
    for param in params:
        name, _, value = param.partition("=")
        name = name.strip().lower()
        if not name and not value:
            continue  # "application/json;" (a stray separator)
        if name != "charset" or value.strip().strip('"').lower() not in ("utf-8", "utf8"):
            return False
    return True


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler


class Router:
    """Requests dispatched on method and path (what :func:`serve_http` serves).

    Args:
        max_body: the largest request body accepted; a larger one gets 413 ``payload_too_large``.

    Resource handling:
        The router holds no I/O resources; :func:`serve_http` owns the connections.

    Error handling:
        A :class:`JsonError` from a handler becomes its JSON error response. Any other exception is
        logged (``http.unhandled_error`` with the traceback) and answered with 500
        ``internal_error``; ``trio.Cancelled`` and other ``BaseException`` propagate.
    """

    def __init__(self, *, max_body: int = DEFAULT_MAX_BODY) -> None:
        self.max_body = max_body
        self._routes: list[_Route] = []

    @property
    def routes(self) -> list[tuple[str, str]]:
        """``(method, path template)`` for every route, in registration order."""
        return [(r.method, r.template) for r in self._routes]

    def add(self, method: str, template: str, handler: Handler) -> None:
        """Route ``method`` requests on paths matching ``template`` (``{name}`` = one segment)."""
        if not template.startswith("/"):
            raise ValueError(f"route template must start with '/': {template!r}")
        regex = "".join(
            f"(?P<{part}>[^/]+)" if i % 2 else re.escape(part)
            for i, part in enumerate(_PARAM.split(template))
        )
        self._routes.append(_Route(method.upper(), template, re.compile(f"^{regex}$"), handler))

    def route(self, method: str, template: str) -> Callable[[Handler], Handler]:
        """Decorator form of :meth:`add`."""

        def decorate(handler: Handler) -> Handler:
            self.add(method, template, handler)
            return handler

        return decorate

    def get(self, template: str) -> Callable[[Handler], Handler]:
        return self.route("GET", template)

    def post(self, template: str) -> Callable[[Handler], Handler]:
        return self.route("POST", template)

    def put(self, template: str) -> Callable[[Handler], Handler]:
        return self.route("PUT", template)

    def delete(self, template: str) -> Callable[[Handler], Handler]:
        return self.route("DELETE", template)

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]] | Response:
        """The handler and path parameters for a request, or the 404/405 response to send."""
        allowed: list[str] = []
        for route in self._routes:
            found = route.pattern.match(path)
            if found is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route.handler, found.groupdict()
            allowed.append(route.method)
        if allowed:
            allow = ", ".join(sorted(set(allowed)))
            return error_response(
                405, "method_not_allowed", f"{method} is not allowed here", headers={"allow": allow}
            )
        return error_response(404, "not_found", "no such endpoint")

    async def handle(self, request: Request) -> Response:
        """Dispatch one already-read request (:func:`serve_http` calls this)."""
        matched = self.match(request.method, request.path)
        if isinstance(matched, Response):
            return matched
        handler, params = matched
        request = Request(
            request.method, request.path, params, request.query, request.headers, request.body, request.client
        )
        try:
            return await handler(request)
        except JsonError as exc:
            return error_response(exc.status, exc.error, exc.detail, exc.headers)
        except Exception as exc:
            # log_event() has no exc_info; the traceback goes to our log, never to the client
            _LOG.error(
                "http.unhandled_error",
                exc_info=exc,
                extra={"event": "http.unhandled_error", "method": request.method, "path": request.path},
            )
            return error_response(500, "internal_error", "internal server error")


class HttpApp(Protocol):
    """What :func:`serve_http` serves: a :class:`Router`, or a wrapper around one (CORS).

    The server reads a request completely (at most ``max_body`` bytes of body) and awaits
    ``handle`` for its answer; ``handle`` should answer every failure itself (as :class:`Router`
    does). If it raises anyway, the server logs ``http.server.app_error`` and answers 500.
    """

    @property
    def max_body(self) -> int: ...

    async def handle(self, request: Request) -> Response: ...


# ------------------------------------------------------------------------------------- the server

_SERVER_LOG = get_logger("rescue.http.server")
_STATUS_LINES: dict[int, bytes] = {}
_date_cache: list[Any] = [0, b""]  # [second, the Date header line of that second]
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_BUSY: Final = error_response(
    503, "server_busy", "too many connections; retry shortly", headers={"retry-after": "1"}
)
_CR_OR_LF: Final = re.compile(r"[\r\n]")  # in a response header: response splitting


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}\r\n".encode()
    return line


def _date_line() -> bytes:
    # RFC 9110 §6.6.1: an origin server with a clock sends Date; formatted once per second.
    now = int(time.time())  # wall-clock time for a header, not a deadline
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = f"date: {formatdate(now, usegmt=True)}\r\n".encode()
    line: bytes = _date_cache[1]
    return line


def render_response(response: Response, *, head_only: bool, keep_alive: bool, http10: bool) -> bytes:
    """The bytes of ``response`` on the wire (see :func:`render_parts`)."""
    head, body = render_parts(response, head_only=head_only, keep_alive=keep_alive, http10=http10)
    return head + body if body else head


def render_parts(
    response: Response, *, head_only: bool, keep_alive: bool, http10: bool
) -> tuple[bytes, bytes]:
    """The head of ``response`` on the wire (status line, headers, blank line) and its body (empty
    for HEAD, 204 and 304), apart: the body is the response's own bytes object, not a copy.

    Every answer has ``Content-Type`` (unless empty), ``Content-Length`` (not on 204/304),
    ``Cache-Control: no-store`` and ``Date``; ``Connection: close`` when the connection ends after
    it, ``Connection: keep-alive`` to an HTTP/1.0 client whose connection stays open.

    Raises:
        ValueError: a header name or value holds CR or LF (response splitting).
    """
    status = response.status
    lines = [_status_line(status), _date_line(), b"cache-control: no-store\r\n"]
    extra = [f"{name.lower()}: {value}\r\n" for name, value in response.headers.items()]
    if response.content_type:
        extra.append(f"content-type: {response.content_type}\r\n")
    if status not in (204, 304):
        extra.append(f"content-length: {len(response.body)}\r\n")
    if not keep_alive:
        extra.append("connection: close\r\n")
    elif http10:
        extra.append("connection: keep-alive\r\n")
    if response.headers and _CR_OR_LF.search("".join([*response.headers, *response.headers.values()])):
        raise ValueError("CR or LF in a response header")
    if _CR_OR_LF.search(response.content_type):
        raise ValueError("CR or LF in the content type")
    lines.append("".join(extra).encode("latin-1"))
    lines.append(b"\r\n")
    body = b"" if head_only or status in (204, 304) else response.body
    return b"".join(lines), body


def _to_request(parsed: ParsedRequest, client: tuple[str, int] | None) -> Request:
    target = parsed.target
    query = dict(reversed(parse_qsl(parsed.query))) if parsed.query else {}
    return Request(
        method=parsed.method,
        path=unquote(target) if "%" in target else target,
        path_params={},
        query=query,
        headers=parsed.headers,
        body=parsed.body,
        client=client,
    )


class _Server:
    """The connections of one :func:`serve_http` call and their shutdown state."""

    def __init__(
        self, app: HttpApp, limits: HttpLimits, stats: HttpStats, shutdown: HttpShutdown | None = None
    ) -> None:
        self.app = app
        self.limits = limits
        self.stats = stats
        self.shutdown = shutdown if shutdown is not None else HttpShutdown()
        self.draining = False
        # connections waiting for a (next) request, longest-waiting first (dicts keep order): the
        # scope their task waits in, and their socket, closed by admit() when one is shed
        self._idle: dict[trio.CancelScope, trio.SocketStream] = {}
        # shed connections whose task has not ended yet: closed and no longer counted as open
        self._shed_streams: set[trio.SocketStream] = set()
        self._shed = 0  # closed to make room, since the last capacity log line
        self._refused = 0  # answered 503, since the last capacity log line
        self._accept_errors = 0  # accept() out of fds, since the last capacity log line
        self._capacity_logged = -CAPACITY_LOG_INTERVAL

    def drain(self) -> None:
        """Stop taking requests: idle connections close now, busy ones after their answer."""
        self.draining = True
        for scope in self._idle:
            scope.cancel()

    def admit(self) -> bool:
        """Whether a just-accepted connection may be served (then it is counted as open): under
        the cap, or once the longest-idle connection is closed in its favour.

        The shed connection's socket is closed here, not by its task (cancelled, it only returns):
        the accept loop takes a whole burst before any task runs, and may take the next burst
        first, so a close left to the task held the cap plus every such burst of sockets. If not
        admitted, the caller refuses the newcomer at once (:meth:`refuse`).
        """
        stats = self.stats
        if stats.open >= self.limits.max_connections:
            if not self._idle:
                stats.refused += 1
                self._refused += 1
                self._log_capacity()
                return False
            oldest, shed = next(iter(self._idle.items()))
            del self._idle[oldest]
            oldest.cancel()
            shed.socket.close()
            self._shed_streams.add(shed)
            stats.open -= 1
            stats.shed_idle += 1
            self._shed += 1
            self._log_capacity()
        stats.open += 1
        return True

    def accept_failed(self, exc: OSError) -> None:
        """accept() ran out of fds (or memory); counted and logged at most every interval."""
        self.stats.accept_errors += 1
        self._accept_errors += 1
        self._log_capacity(str(exc))

    def _log_capacity(self, detail: str = "") -> None:
        now = trio.current_time()
        if now - self._capacity_logged < CAPACITY_LOG_INTERVAL:
            return
        self._capacity_logged = now
        log_event(
            _SERVER_LOG,
            "http.server.over_capacity",
            level=logging.WARNING,
            open=self.stats.open,
            max_connections=self.limits.max_connections,
            shed_idle=self._shed,
            refused=self._refused,
            accept_errors=self._accept_errors,
            detail=detail
            or f"{self.stats.open} connections open (the cap is {self.limits.max_connections}): idle "
            "ones are closed to make room, new ones get 503 while none is idle",
        )
        self._shed = self._refused = self._accept_errors = 0

    @staticmethod
    def refuse(conn: socket.socket) -> None:
        """Answer 503 ``server_busy`` to a connection over the cap and close it, without a task or
        a wait (:func:`rescue._net.refuse_at_once`, as the WebSocket listener's refusal)."""
        refuse_at_once(conn, render_response(_BUSY, head_only=False, keep_alive=False, http10=False))

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        """Answer the requests of one connection in order until it closes.

        Never raises but ``Cancelled`` (a server bug is logged as ``http.server.connection_error``
        and closes this connection only).
        """
        try:
            try:
                peer = stream.socket.getpeername()
                client: tuple[str, int] | None = (str(peer[0]), int(peer[1]))
            except (OSError, IndexError):
                client = None
            await self._exchange(stream, client)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception as exc:
            _SERVER_LOG.error(
                "http.server.connection_error",
                exc_info=exc,
                extra={"event": "http.server.connection_error"},
            )
        finally:
            if stream in self._shed_streams:
                self._shed_streams.discard(stream)  # closed and uncounted by admit()
            else:
                self.stats.open -= 1
            await trio.aclose_forcefully(stream)

    async def _exchange(self, stream: trio.SocketStream, client: tuple[str, int] | None) -> None:
        limits = self.limits
        parser = RequestParser(
            max_body=self.app.max_body, max_head=limits.max_head, max_headers=limits.max_headers
        )
        while True:
            try:
                parsed = await self._receive_request(stream, parser)
            except HttpError as exc:
                response = error_response(exc.status, exc.error, exc.detail)
                await self._send(
                    stream, render_response(response, head_only=False, keep_alive=False, http10=False)
                )
                await self._linger(stream)
                return
            if parsed is None:
                return
            response = await self._answer(_to_request(parsed, client))
            keep_alive = parsed.keep_alive and not self.draining and not self.shutdown.closing
            try:
                head, body = render_parts(
                    response, head_only=parsed.method == "HEAD", keep_alive=keep_alive, http10=parsed.http10
                )
            except ValueError as exc:
                self._log_app_error(exc, parsed)
                head, body = render_parts(
                    error_response(500, "internal_error", "internal server error"),
                    head_only=parsed.method == "HEAD",
                    keep_alive=keep_alive,
                    http10=parsed.http10,
                )
            if not await self._send(stream, head, body):
                return
            if not keep_alive:
                if parser.buffered:
                    await self._linger(stream)
                return

    async def _receive_request(
        self, stream: trio.SocketStream, parser: RequestParser
    ) -> ParsedRequest | None:
        """The next request of the connection, or None when it ends cleanly (EOF, keep-alive timeout,
        drain). Raises HttpError for a bad or too slow request."""
        limits = self.limits
        started = -1.0  # when the first byte of this request arrived
        idle_since = -1.0  # when the connection went idle (blank lines between requests do not renew it)
        while True:
            parsed = parser.next_request()
            if parsed is not None:
                return parsed
            idle = parser.idle
            if idle:
                if self.draining:
                    return None
                if idle_since < 0:
                    idle_since = trio.current_time()
                scope = trio.CancelScope(deadline=idle_since + limits.keep_alive_timeout)
                self._idle[scope] = stream
            else:
                if started < 0:
                    started = trio.current_time()
                if parser.expects_continue:
                    parser.continue_sent()
                    if not await self._send(stream, _CONTINUE):
                        return None
                scope = trio.CancelScope(deadline=started + limits.request_timeout)
            data = None
            try:
                with scope:
                    data = await stream.receive_some(RECEIVE_SIZE)
            finally:
                shed = idle and self._idle.pop(scope, None) is None
            if shed:
                # admit() closed it for a newcomer; bytes that arrived meanwhile (the receive had
                # returned, not yet to us) are dropped with it: answering on it cannot work
                return None
            if data is None:  # the scope expired or the server is draining
                if idle:
                    return None
                raise HttpError(408, "request_timeout", "the request did not arrive in time")
            if not data:
                return None  # EOF (a half-sent request is dropped: nobody is left to answer)
            parser.feed(data)

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.app.handle(request)
        except Exception as exc:
            self._log_app_error(exc, request)
            return error_response(500, "internal_error", "internal server error")

    @staticmethod
    def _log_app_error(exc: Exception, request: Request | ParsedRequest) -> None:
        path = request.path if isinstance(request, Request) else request.target
        _SERVER_LOG.error(
            "http.server.app_error",
            exc_info=exc,
            extra={"event": "http.server.app_error", "method": request.method, "path": path},
        )

    async def _send(self, stream: trio.SocketStream, data: bytes, body: bytes = b"") -> bool:
        """Send ``data`` then ``body``; False if the client did not take them within the send timeout.

        A small body goes in the same write as the head; a large one is sent as it is, uncopied: a
        client that asks for the 944 KB join.js and never reads held a joined copy for the send
        timeout (300 such connections: +274 MB of RSS for 12 KB of requests). The timeout is on
        progress: each SEND_PIECE taken gives the client the send timeout again, so a phone on a
        slow link gets the whole join.js (it was cut off after 10 s below ~95 KB/s).
        """
        timeout = self.limits.send_timeout
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            if len(body) <= JOIN_LIMIT:
                await stream.send_all(data + body if body else data)
                return True
            await stream.send_all(data)
            view = memoryview(body)
            for start in range(0, len(body), SEND_PIECE):
                await stream.send_all(view[start : start + SEND_PIECE])
                scope.deadline = trio.current_time() + timeout  # progress: the client is reading
            return True
        return False

    async def _linger(self, stream: trio.SocketStream) -> None:
        """Half-close, then drop what the client still sends (bounded), so the answer is read."""
        await stream.send_eof()
        received = 0
        with trio.move_on_after(self.limits.linger_timeout):
            while received < LINGER_BYTES:
                data = await stream.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                received += len(data)


async def _bind(host: str, port: int) -> socket.socket:
    """A listening, non-blocking stdlib socket (the accept loop takes connections in batches)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" serves IPv4 too
        await sock.bind((host, port))  # trio's bind resolves a host name without blocking
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    listening = socket.socket(family, socket.SOCK_STREAM, fileno=sock.detach())
    listening.setblocking(False)
    return listening


async def serve_http(
    app: HttpApp,
    host: str,
    port: int,
    *,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    limits: HttpLimits = DEFAULT_LIMITS,
    stats: HttpStats | None = None,
    shutdown: HttpShutdown | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP/1.1 on ``host:port`` until cancelled (decision 0017).

    Each connection is one task answering its requests in order (keep-alive and pipelining);
    requests are parsed by :class:`rescue._http1.RequestParser` and handed to ``app.handle``.

    Args:
        app: a :class:`Router` (or anything with its ``max_body`` and ``handle``).
        host: the address to bind (``127.0.0.1``, ``0.0.0.0``, ``::``).
        port: the TCP port; 0 picks a free one.
        graceful_timeout: seconds that in-flight requests get to finish once cancelled.
        limits: the per-connection timeouts and head limits (:class:`HttpLimits`).
        stats: counters this server keeps up to date (:class:`HttpStats`), for ``/metrics``.
        shutdown: the caller's steps around the stop (:class:`HttpShutdown`): answers that close
            their connection before it, an abort that skips its graceful period.
        task_status: receives the bound port once the socket listens.

    Resource handling:
        The listening socket and every connection live in nurseries inside this call; nothing
        outlives it. A malformed request is answered 400 (431 for an oversized head, 413 for an
        oversized body, 408 for one that arrives too slowly) and its connection closed.

    Cancellation:
        The listener closes at once, idle keep-alive connections close, in-flight requests get up to
        ``graceful_timeout`` seconds (their answers say ``Connection: close``), then whatever is
        left is cancelled and the call returns (re-raising the cancellation). After
        ``shutdown.abort()`` nothing is waited for.

    Raises:
        OSError: the address could not be bound.
    """
    listener = await _bind(host, port)
    bound = listener.getsockname()
    url = f"http://{bound[0]}:{bound[1]}" if ":" not in bound[0] else f"http://[{bound[0]}]:{bound[1]}"
    server = _Server(app, limits, stats if stats is not None else HttpStats(), shutdown)
    # Two nurseries (STYLE 5): the connections run in a shielded scope that our cancellation does
    # not reach; it turns into drain() and a deadline on that scope instead (or shutdown.abort()).
    handlers_scope = trio.CancelScope(shield=True)
    server.shutdown.watch(handlers_scope)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        handlers: trio.Nursery = await nursery.start(_run_handlers, handlers_scope, stop)
        try:
            log_event(_SERVER_LOG, "http.server.bound", url=url, detail=f"listening on {url}")
            task_status.started(int(bound[1]))
            await _accept(listener, handlers, server)
        finally:
            listener.close()  # nobody waits on it any more: _accept has returned
            server.drain()
            stop.set()
            handlers_scope.deadline = trio.current_time() + graceful_timeout


async def _run_handlers(
    scope: trio.CancelScope, stop: trio.Event, *, task_status: trio.TaskStatus[trio.Nursery]
) -> None:
    with scope:
        async with trio.open_nursery() as handlers:
            task_status.started(handlers)
            await stop.wait()
    if scope.cancelled_caught:
        log_event(_LOG, "http.shutdown_forced", level=logging.WARNING)


async def _accept(listener: socket.socket, handlers: trio.Nursery, server: _Server) -> None:
    """Take up to :data:`rescue._net.ACCEPT_BATCH` waiting connections per wake-up, each served by
    its task; one over the cap is refused (or an idle one shed for it) right here, its socket
    closed at once."""

    def take(conn: socket.socket) -> None:
        if server.admit():
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
            handlers.start_soon(server.serve_connection, stream)
        else:
            server.refuse(conn)

    await accept_in_bursts(listener, take, server.accept_failed)
