"""The browser join page (SPEC §12) served by the token service at ``GET /join/``.

The page and its assets are built from ``web/`` (``just web``) into ``rescue/tokenservice/web/``
and ship as package data, so serving it needs no node. They are read once, on first use, and
served from memory with a strict Content-Security-Policy: scripts only from this origin (plus
``wasm-unsafe-eval`` for libsodium's WebAssembly), the WebSocket to any relay (``ws:``/``wss:``:
the relay URL comes from the token answer and may be another host), the heartbeat worker from a
``blob:`` URL, no framing by other sites, no referrer (the fragment carries the passphrase; it is
never sent, and the referrer policy makes sure no URL of this page leaks either).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

import trio

from rescue._http import JsonError, Request, Response, Router

__all__ = ["JOIN_PATH", "add_join_routes", "join_url"]

JOIN_PATH: Final = "/join/"
_ASSETS: Final = {
    "index.html": "text/html; charset=utf-8",
    "join.js": "text/javascript; charset=utf-8",
    "join.css": "text/css; charset=utf-8",
    "xterm.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS: Final = {
    "content-security-policy": "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; "
    "style-src 'self' 'unsafe-inline'; connect-src 'self' ws: wss:; worker-src blob:; img-src 'self' data:; "
    "font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}


def join_url(api: str, session: str, cohort: str | None = None) -> str:
    """The page URL for ``session`` (without the passphrase), as ``rescue share`` prints it;
    ``cohort`` (when the host's is not the page's default) goes in the query, ``?cohort=C``."""
    from urllib.parse import quote, urlencode

    query = f"?{urlencode({'cohort': cohort})}" if cohort else ""
    return f"{api.rstrip('/')}{JOIN_PATH}{query}#{quote(session, safe='')}"


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files("rescue.tokenservice").joinpath("web", name).read_bytes()


async def _serve(name: str) -> Response:
    await trio.lowlevel.checkpoint()
    try:
        body = _asset(name)
    except FileNotFoundError:
        raise JsonError(404, "not_found", "the join page is not built into this package") from None
    return Response(200, body, _ASSETS[name], dict(_SECURITY_HEADERS))


async def _index(request: Request) -> Response:
    return await _serve("index.html")


async def _asset_route(request: Request) -> Response:
    name = request.path_params["asset"]
    if name not in _ASSETS:
        raise JsonError(404, "not_found", "no such file")
    return await _serve(name)


async def _redirect(request: Request) -> Response:
    await trio.lowlevel.checkpoint()
    return Response(308, b"", "text/plain; charset=utf-8", {"location": JOIN_PATH})


def add_join_routes(router: Router) -> None:
    """``GET /join/`` (the page), ``GET /join/{asset}``, and ``/join`` redirected to ``/join/``."""
    router.add("GET", "/join", _redirect)
    router.add("GET", JOIN_PATH, _index)
    router.add("GET", JOIN_PATH + "{asset}", _asset_route)
