"""CORS on the token API and the /join/ page (SPEC §12), over real HTTP on 127.0.0.1:0.

Cross-origin calls are allowed only from configured origins, only on the endpoints a browser peer
uses, with correct preflight answers; the join page is served same-origin with a strict CSP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from rescue.cli import build_parser
from rescue.commands.token_service import build_config
from rescue.errors import ConfigError
from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.tokenservice import (
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
    join_url,
    parse_origins,
    serve_token_service,
)

TIMEOUT = 10
ALLOWED = "https://beach.example"
OTHER = "https://evil.example"
TOKEN_BODY = {
    "session_id": "s-1",
    "role": "guest",
    "cohort_id": "dev",
    "client_version": "test",
    "telemetry_opt_in": False,
}


@pytest.fixture
async def client_for(nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def start(origins: frozenset[str]) -> httpx.AsyncClient:
        store = MemoryStore()
        await store.set_cohort_enabled("dev", True)
        config = TokenServiceConfig(
            keys=PublishedKeys(SigningKey.generate()),
            disable_oidc=True,
            relay_url="ws://127.0.0.1:1/v1/connect",
            cors_origins=origins,
        )
        service = TokenService(config, Guardrails(store, GuardrailConfig()))
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


def preflight(method: str = "POST", headers: str = "content-type", origin: str = ALLOWED) -> dict[str, str]:
    return {
        "origin": origin,
        "access-control-request-method": method,
        "access-control-request-headers": headers,
    }


async def test_preflight_and_request_from_an_allowed_origin(client_for: Callable[..., Any]) -> None:
    with trio.fail_after(TIMEOUT):
        client = await client_for(frozenset({ALLOWED}))
        r = await client.options(
            "/v1/fallback/token", headers=preflight(headers="Content-Type, Authorization")
        )
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == ALLOWED
        assert r.headers["access-control-allow-methods"] == "POST"
        assert set(r.headers["access-control-allow-headers"].split(", ")) == {"authorization", "content-type"}
        assert int(r.headers["access-control-max-age"]) > 0
        assert "Origin" in r.headers["vary"]
        assert "access-control-allow-credentials" not in r.headers
        r = await client.post("/v1/fallback/token", json=TOKEN_BODY, headers={"origin": ALLOWED})
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ALLOWED
        assert r.headers["vary"] == "Origin"
        r = await client.get("/v1/fallback/keys", headers={"origin": ALLOWED})
        assert r.headers["access-control-allow-origin"] == ALLOWED
        # An error answer carries the header too, so the page can read the JSON error.
        r = await client.post("/v1/fallback/token", json={}, headers={"origin": ALLOWED})
        assert (r.status_code, r.headers["access-control-allow-origin"]) == (400, ALLOWED)


@pytest.mark.parametrize(
    ("path", "headers", "status", "error"),
    [
        ("/v1/fallback/token", preflight(origin=OTHER), 403, "cors_forbidden"),
        ("/v1/fallback/token", preflight(origin="null"), 403, "cors_forbidden"),
        ("/v1/fallback/token", preflight(method="PUT"), 403, "cors_forbidden"),
        ("/v1/fallback/token", preflight(headers="content-type, x-custom"), 403, "cors_forbidden"),
        ("/v1/fallback/keys", preflight(method="POST"), 403, "cors_forbidden"),
        # Endpoints that are never cross-origin: the router answers, without CORS headers.
        ("/v1/admin/pause", preflight(), 405, "method_not_allowed"),
        ("/v1/fallback/activations", preflight(), 405, "method_not_allowed"),
        ("/metrics", preflight(method="GET"), 405, "method_not_allowed"),
    ],
)
async def test_refused_preflights(
    client_for: Callable[..., Any], path: str, headers: dict[str, str], status: int, error: str
) -> None:
    with trio.fail_after(TIMEOUT):
        client = await client_for(frozenset({ALLOWED}))
        r = await client.options(path, headers=headers)
        assert (r.status_code, r.json()["error"]) == (status, error)
        assert "access-control-allow-origin" not in r.headers


async def test_nothing_is_allowed_by_default(client_for: Callable[..., Any]) -> None:
    with trio.fail_after(TIMEOUT):
        client = await client_for(frozenset())
        r = await client.options("/v1/fallback/token", headers=preflight())
        assert r.status_code == 403
        r = await client.post("/v1/fallback/token", json=TOKEN_BODY, headers={"origin": ALLOWED})
        assert r.status_code == 200  # the browser hides it from the page: no CORS header
        assert "access-control-allow-origin" not in r.headers
        # Other origins never get the header on an allowlisted service either.
        client = await client_for(frozenset({ALLOWED}))
        r = await client.post("/v1/fallback/token", json=TOKEN_BODY, headers={"origin": OTHER})
        assert "access-control-allow-origin" not in r.headers


def test_origin_parsing() -> None:
    assert parse_origins(["https://a.example, http://LOCALHOST:8000", "", "https://b.example:443"]) == {
        "https://a.example",
        "http://localhost:8000",
        "https://b.example:443",
    }
    for bad in [
        "*",
        "null",
        "https://a.example/",
        "https://a.example/path",
        "ftp://a.example",
        "a.example",
        "https://user@a.example",
        "https://a.example:99999",
        "https://a.example?q",
    ]:
        with pytest.raises(ConfigError):
            parse_origins([bad])


def test_cli_flag_and_environment(tmp_path: Any) -> None:
    key = tmp_path / "key.jwk"
    key.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    args = build_parser().parse_args(
        [
            "token-service",
            "--signing-key",
            str(key),
            "--redis-url",
            "redis://x",
            "--cors-origin",
            "https://a.example",
            "--cors-origin",
            "https://b.example",
        ]
    )
    env = {"BEACH_RESCUE_DISABLE_OIDC": "1", "RESCUE_CORS_ORIGINS": "https://c.example,https://d.example"}
    assert build_config(args, env).cors_origins == {f"https://{x}.example" for x in "abcd"}
    args = build_parser().parse_args(["token-service", "--signing-key", str(key), "--redis-url", "redis://x"])
    assert build_config(args, {"BEACH_RESCUE_DISABLE_OIDC": "1"}).cors_origins == frozenset()
    with pytest.raises(ConfigError):
        build_config(args, {"BEACH_RESCUE_DISABLE_OIDC": "1", "RESCUE_CORS_ORIGINS": "*"})
    dev = build_parser().parse_args(["dev", "--cors-origin", "http://localhost:3000"])
    assert dev.cors_origin == ["http://localhost:3000"]


async def test_join_page_is_served_same_origin(client_for: Callable[..., Any]) -> None:
    with trio.fail_after(TIMEOUT):
        client = await client_for(frozenset())
        r = await client.get("/join")
        assert (r.status_code, r.headers["location"]) == (308, "/join/")
        r = await client.get("/join/")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/html; charset=utf-8"
        csp = r.headers["content-security-policy"]
        assert "script-src 'self' 'wasm-unsafe-eval'" in csp
        assert "frame-ancestors 'none'" in csp
        assert r.headers["referrer-policy"] == "no-referrer"
        assert '<script src="join.js">' in r.text
        for asset, media in [
            ("join.js", "text/javascript"),
            ("join.css", "text/css"),
            ("xterm.css", "text/css"),
        ]:
            r = await client.get(f"/join/{asset}")
            assert r.status_code == 200
            assert r.headers["content-type"].startswith(media)
            assert r.headers["x-content-type-options"] == "nosniff"
        for missing in ["BUILD.json", "..%2F_app.py", "nope.js"]:
            r = await client.get(f"/join/{missing}")
            assert (r.status_code, r.json()["error"]) == (404, "not_found")


def test_join_url() -> None:
    assert join_url("http://127.0.0.1:8080/", "demo-1") == "http://127.0.0.1:8080/join/#demo-1"
    assert join_url("http://h:1", "s", "beta team") == "http://h:1/join/?cohort=beta+team#s"
    assert join_url("https://api.example", "a:b") == "https://api.example/join/#a%3Ab"
