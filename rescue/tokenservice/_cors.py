"""CORS for the token API (SPEC §12): cross-origin requests only from an explicit allowlist.

Beach's web app (or any integrator's page) runs on its own origin and calls the token service from
the browser; the ``/join/`` page is same-origin and needs none of this. The policy, kept apart from
the routes as a wrapper around the router:

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

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Final
from urllib.parse import urlsplit

from rescue._http import HttpApp, Request, Response, error_response
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
    """The policy above around ``app`` (served by :func:`rescue._http.serve_http` like the router).

    Args:
        app: the router.
        origins: returns the allowed origins now (read per request, so a service whose config
            is replaced at runtime, as ``rescue dev`` does, is followed).

    Resource handling:
        Holds nothing; requests it does not answer itself go to ``app`` unchanged.
    """

    def __init__(self, app: HttpApp, origins: Callable[[], frozenset[str]]) -> None:
        self.app = app
        self.origins = origins

    @property
    def max_body(self) -> int:
        """The wrapped app's body limit (the server enforces it)."""
        return self.app.max_body

    async def handle(self, request: Request) -> Response:
        """Answer a preflight here; add the CORS headers to an allowed origin's answer."""
        origin = request.headers.get("origin")
        methods = CORS_ROUTES.get(request.path)
        if origin is None or methods is None:
            return await self.app.handle(request)
        allowed = origin in self.origins()
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            return self._preflight(origin, allowed, methods, request.headers)
        if not allowed or request.method not in methods:
            return await self.app.handle(request)
        response = await self.app.handle(request)
        headers = {**response.headers, "access-control-allow-origin": origin, "vary": "Origin"}
        return replace(response, headers=headers)

    @staticmethod
    def _preflight(
        origin: str, allowed: bool, methods: tuple[str, ...], headers: Mapping[str, str]
    ) -> Response:
        requested_method = headers["access-control-request-method"].strip().upper()
        listed = headers.get("access-control-request-headers", "").split(",")
        requested_headers = {h.strip().lower() for h in listed if h.strip()}
        if not allowed:
            return _forbidden("this origin is not allowed to call the token API")
        if requested_method not in methods:
            return _forbidden(f"{requested_method} is not allowed cross-origin here")
        if not requested_headers <= ALLOWED_HEADERS:
            extra = ", ".join(sorted(requested_headers - ALLOWED_HEADERS))[:100]
            return _forbidden(f"request headers not allowed cross-origin: {extra}")
        return Response(
            204,
            b"",
            "",  # no body, no type
            {
                "access-control-allow-origin": origin,
                "access-control-allow-methods": ", ".join(methods),
                "access-control-allow-headers": "authorization, content-type",
                "access-control-max-age": str(PREFLIGHT_MAX_AGE_S),
                "vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            },
        )


def _forbidden(detail: str) -> Response:
    return error_response(403, "cors_forbidden", detail, headers={"vary": "Origin"})
