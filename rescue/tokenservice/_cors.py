"""CORS for the token API (SPEC §12): cross-origin requests only from an explicit allowlist.

Beach's web app (or any integrator's page) runs on its own origin and calls the token service from
the browser; the ``/join/`` page is same-origin and needs none of this. The policy, kept apart from
the routes as an ASGI middleware around the router:

* **Nothing is allowed by default.** Origins come from ``--cors-origin`` (repeatable) and
  ``RESCUE_CORS_ORIGINS`` (comma-separated) and must be exact ``scheme://host[:port]`` strings;
  ``*`` and ``null`` are refused at startup (a wildcard would let any page mint tokens with a
  user's service key pasted into it, and ``null`` is every sandboxed iframe and ``file:`` page).
* Only the endpoints a browser peer uses are cross-origin: ``POST /v1/fallback/token`` and
  ``GET /v1/fallback/keys`` (:data:`CORS_ROUTES`). The admin API, reports and metrics never are.
* **Preflight** (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) on those paths
  is answered here: 204 with ``Access-Control-Allow-Origin`` (the origin itself, never ``*``),
  ``-Allow-Methods``, ``-Allow-Headers`` (``content-type``, ``authorization``), ``-Max-Age`` and
  ``Vary: Origin``; a disallowed origin, method or header gets 403 ``cors_forbidden`` (JSON, no
  CORS headers, so the browser refuses). No credentials (cookies) are involved anywhere: callers
  authenticate with a bearer header, so ``Access-Control-Allow-Credentials`` is never sent.
* **Actual requests** from an allowed origin get ``Access-Control-Allow-Origin`` and
  ``Vary: Origin`` added to whatever the route answered; from any other origin the answer carries
  no CORS headers (the browser hides it from the page). Whether the body is JSON is the route's
  business (``application/json`` is required of request bodies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from typing import Final
from urllib.parse import urlsplit

from rescue._http import ASGIApp, Message, Receive, Scope, Send
from rescue.errors import ConfigError

__all__ = ["CORS_ROUTES", "CorsMiddleware", "parse_origins"]

# path -> methods a cross-origin page may use on it.
CORS_ROUTES: Final = {"/v1/fallback/token": ("POST",), "/v1/fallback/keys": ("GET", "HEAD")}
ALLOWED_HEADERS: Final = frozenset({"content-type", "authorization"})
# Browsers cap this anyway (Chromium: 2 h); 10 minutes keeps a changed allowlist effective soon.
PREFLIGHT_MAX_AGE_S: Final = 600
_HOST_RE: Final = re.compile(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")


def parse_origins(values: Iterable[str]) -> frozenset[str]:
    """Validate configured origins (each may be a comma-separated list) into a normalised set.

    Raises:
        ConfigError: an entry is not exactly ``http(s)://host[:port]`` (``*``, ``null``, a path,
            a trailing slash, credentials, a query).
    """
    origins: set[str] = set()
    for value in values:
        for raw in value.split(","):
            entry = raw.strip()
            if not entry:
                continue
            if entry in ("*", "null"):
                raise ConfigError(f"CORS origin {entry!r} is not allowed: list exact origins")
            parts = urlsplit(entry)
            host = parts.hostname or ""
            try:
                port = parts.port
            except ValueError:
                port = -1
            netloc = parts.netloc.rsplit(":", 1)[0] if port else parts.netloc
            if (
                parts.scheme not in ("http", "https")
                or parts.path
                or parts.query
                or parts.fragment
                or "@" in parts.netloc
                or port == -1
                or not _HOST_RE.fullmatch(netloc)
                or not host
            ):
                raise ConfigError(
                    f"CORS origin {entry!r} must be scheme://host[:port], e.g. https://beach.example"
                )
            origins.add(f"{parts.scheme}://{netloc.lower()}" + (f":{port}" if port else ""))
    return frozenset(origins)


class CorsMiddleware:
    """ASGI middleware applying the policy above around ``app``.

    Args:
        app: the router.
        origins: returns the allowed origins now (read per request, so a service whose config
            is replaced at runtime, as ``rescue dev`` does, is followed).

    Resource handling:
        Holds nothing; requests it does not answer itself go to ``app`` unchanged.
    """

    def __init__(self, app: ASGIApp, origins: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self.origins = origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        methods = CORS_ROUTES.get(scope["path"])
        method = scope["method"].upper()
        if origin is None or methods is None:
            await self.app(scope, receive, send)
            return
        allowed = origin in self.origins()
        if method == "OPTIONS" and "access-control-request-method" in headers:
            await self._preflight(send, origin, allowed, methods, headers)
            return
        if not allowed or method not in methods:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", []),
                    (b"access-control-allow-origin", origin.encode("latin-1")),
                    (b"vary", b"Origin"),
                ]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    async def _preflight(
        self, send: Send, origin: str, allowed: bool, methods: tuple[str, ...], headers: dict[str, str]
    ) -> None:
        requested_method = headers["access-control-request-method"].strip().upper()
        listed = headers.get("access-control-request-headers", "").split(",")
        requested_headers = {h.strip().lower() for h in listed if h.strip()}
        if not allowed:
            await _answer(send, 403, "cors_forbidden", "this origin is not allowed to call the token API")
        elif requested_method not in methods:
            await _answer(send, 403, "cors_forbidden", f"{requested_method} is not allowed cross-origin here")
        elif not requested_headers <= ALLOWED_HEADERS:
            extra = ", ".join(sorted(requested_headers - ALLOWED_HEADERS))[:100]
            await _answer(send, 403, "cors_forbidden", f"request headers not allowed cross-origin: {extra}")
        else:
            await send(
                {
                    "type": "http.response.start",
                    "status": 204,
                    "headers": [
                        (b"access-control-allow-origin", origin.encode("latin-1")),
                        (b"access-control-allow-methods", ", ".join(methods).encode()),
                        (b"access-control-allow-headers", b"authorization, content-type"),
                        (b"access-control-max-age", str(PREFLIGHT_MAX_AGE_S).encode()),
                        (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
                        (b"cache-control", b"no-store"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})


async def _answer(send: Send, status: int, error: str, detail: str) -> None:
    body = json.dumps({"error": error, "detail": detail}, separators=(",", ":")).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                (b"vary", b"Origin"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
