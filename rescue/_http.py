"""A tiny JSON-over-HTTP toolkit: an ASGI router and a trio server on hypercorn.

The token service and the relay's admin port are small JSON APIs; a framework would cost more
dependencies and startup time than it saves. This module gives them:

- :class:`Router`: method + path routes with ``{name}`` path parameters, JSON answers, and errors
  that are always JSON ``{"error": code, "detail": text}`` (404, 405, 413, 400 ``invalid_request``
  for malformed JSON, 415 ``unsupported_media_type`` for a body that is not declared
  ``application/json``, 500 ``internal_error`` for an unexpected exception, logged, never a
  traceback to the client);
- :class:`JsonError`: raise it from a handler to answer with that status and error code;
- :func:`json_response` / :func:`text_response` (``/metrics`` is plain text);
- :func:`serve_http`: serve an ASGI app with hypercorn's trio worker, report the bound port with
  ``task_status.started(port)`` (port 0 works) and shut down gracefully when cancelled.

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
import socket
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, cast
from urllib.parse import parse_qsl

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from rescue._log import get_logger, log_event

__all__ = [
    "DEFAULT_MAX_BODY",
    "Handler",
    "JsonError",
    "Request",
    "Response",
    "Router",
    "is_json_media_type",
    "json_response",
    "serve_http",
    "text_response",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Handler = Callable[["Request"], Awaitable["Response"]]

# Request bodies of these APIs are small JSON objects (a token request is < 4 KiB even with an
# entitlement JWT); 64 KiB leaves room and still stops a client from making us buffer megabytes.
DEFAULT_MAX_BODY: Final = 64 * 1024
# How long in-flight requests get to finish after the server is asked to stop; idle keep-alive
# connections close at once. Short, because every request these APIs serve takes milliseconds.
DEFAULT_GRACEFUL_TIMEOUT: Final = 2.0
# Hypercorn keeps idle keep-alive connections this long; relays poll status every second, so a
# connection is reused while polling, and an idle one is closed well before load balancers give up.
KEEP_ALIVE_TIMEOUT: Final = 15.0

_LOG = get_logger("rescue.http")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# hypercorn's own lines (its "error log") go through this logger; _name_server_event gives each one
# an ``event`` like ours instead of hypercorn's free text.
_SERVER_LOG = get_logger("rescue.http.server")
_SERVER_EVENTS: Final = (
    # (what hypercorn's message starts with, our event name)
    ("Running on ", "http.server.bound"),
    ("Error in ASGI Framework", "http.server.app_error"),
    ("ASGI Framework Lifespan", "http.server.lifespan_error"),
)


def _name_server_event(record: logging.LogRecord) -> bool:
    """A logging filter: name one of hypercorn's records (``event``), its text goes to ``detail``."""
    if "event" not in record.__dict__:
        text = record.getMessage()
        event = next(
            (event for prefix, event in _SERVER_EVENTS if text.startswith(prefix)), "http.server.log"
        )
        fields = {"event": event, "detail": text}
        if event == "http.server.bound":
            fields["url"] = text.removeprefix("Running on ").split(" ", 1)[0]
        record.__dict__.update(fields)  # what log_event's extra= does
    return True


_SERVER_LOG.addFilter(_name_server_event)


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
    """An ASGI application dispatching on method and path.

    Args:
        max_body: the largest request body accepted; a larger one gets 413 ``payload_too_large``.

    Resource handling:
        The router holds no I/O resources; hypercorn owns the connections.

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
        """Dispatch one already-read request (the ASGI entry point calls this)."""
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":  # websocket: these APIs have none
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        body_or_response = await _read_body(receive, headers, self.max_body)
        if body_or_response is None:  # the client went away
            return
        if isinstance(body_or_response, Response):
            response = body_or_response
        else:
            query = dict(reversed(parse_qsl(scope.get("query_string", b"").decode("latin-1"))))
            client = scope.get("client")
            request = Request(
                method=scope["method"].upper(),
                path=scope["path"],
                path_params={},
                query=query,
                headers=headers,
                body=body_or_response,
                client=(str(client[0]), int(client[1])) if client else None,
            )
            response = await self.handle(request)
        await _send_response(send, response, head_only=scope["method"].upper() == "HEAD")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive, headers: Mapping[str, str], limit: int) -> bytes | Response | None:
    too_large = error_response(413, "payload_too_large", f"request body over {limit} bytes")
    declared = headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return too_large
        except ValueError:
            return error_response(400, "invalid_request", "bad Content-Length")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send_response(send: Send, response: Response, *, head_only: bool = False) -> None:
    headers = [
        (b"content-type", response.content_type.encode("latin-1")),
        (b"content-length", str(len(response.body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in response.headers.items()]
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head_only else response.body})


def _bind_socket(host: str, port: int) -> int:
    """Bind a listening-ready TCP socket and return its detached file descriptor."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock.detach()


def _port_of(bind: str) -> int:
    # hypercorn reports binds as "http://127.0.0.1:43817" or "http://[::1]:43817"
    return int(bind.rsplit(":", 1)[1])


async def serve_http(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` over HTTP/1.1 on ``host:port`` until cancelled.

    Args:
        app: an ASGI application (usually a :class:`Router`).
        host: the address to bind (``127.0.0.1``, ``0.0.0.0``, ``::``).
        port: the TCP port; 0 picks a free one.
        graceful_timeout: seconds that in-flight requests get to finish once cancelled.
        task_status: receives the bound port once the socket listens.

    Resource handling:
        The listening socket and every connection live in hypercorn's nurseries inside this call;
        nothing outlives it.

    Cancellation:
        Cancelling this task triggers hypercorn's graceful shutdown: the listener closes at once,
        idle connections close, in-flight requests get up to ``graceful_timeout`` seconds, then
        everything is cancelled and the call returns (re-raising the cancellation).

    Raises:
        OSError: the address could not be bound.
    """
    config = HypercornConfig()
    # We bind the socket ourselves and hand hypercorn its file descriptor: hypercorn leaks the
    # socket when its own bind() fails (address in use), and this way a bind error is a clean
    # OSError from here.
    config.bind = [f"fd://{_bind_socket(host, port)}"]
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = KEEP_ALIVE_TIMEOUT
    config.accesslog = None
    config.errorlog = _SERVER_LOG  # its lines get an event name from _name_server_event
    config.include_server_header = False
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        # hypercorn runs in a shielded scope so our cancellation turns into its graceful shutdown
        # (shutdown_trigger) instead of tearing connections down mid-response; the scope's
        # deadline bounds that shutdown.
        scope = trio.CancelScope(shield=True)
        binds: list[str] = await nursery.start(partial(_shielded_serve, scope, app, config, shutdown.wait))
        try:
            task_status.started(_port_of(binds[0]))
            await trio.sleep_forever()
        finally:
            shutdown.set()
            scope.deadline = trio.current_time() + graceful_timeout + 1.0


async def _shielded_serve(
    scope: trio.CancelScope,
    app: ASGIApp,
    config: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    with scope:
        # cast: our ASGI aliases are looser than hypercorn's TypedDicts
        await hypercorn_serve(
            cast("Any", app),
            config,
            shutdown_trigger=shutdown_trigger,
            task_status=task_status,
            mode="asgi",
        )
    if scope.cancelled_caught:
        log_event(_LOG, "http.shutdown_forced", level=logging.WARNING)
