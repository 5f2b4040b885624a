"""The token service API (SPEC §4) over real HTTP on 127.0.0.1:0.

Every response in this file passes through an httpx hook that checks it against the service's own
OpenAPI document (status documented for that operation, body valid against its schema), so the
document can't drift from what the server really does.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jsonschema
import pytest
import trio

from rescue._http import serve_http
from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore, NodeInfo, RedisStore
from rescue.protocol import KeyRing, SigningKey, b64url_decode, verify_token
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, openapi_document

TIMEOUT = 10
T0 = 1_700_000_000.0
SERVICE_KEY = "svc-key-0123456789"
ADMIN_KEY = "admin-key-9876543210"
RELAY_URL = "wss://relay.example/v1/connect"


# --- OpenAPI conformance hook -------------------------------------------------------------------


def _template_for(path: str) -> str | None:
    for template in openapi_document()["paths"]:
        pattern = "^" + re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            return template
    return None


def check_against_openapi(response: httpx.Response) -> None:
    """Assert ``response`` is documented: its status for the operation and its body's schema."""
    doc = openapi_document()
    request = response.request
    template = _template_for(request.url.path)
    if template is None:  # the document's info says: unknown paths answer 404 not_found
        assert response.status_code == 404
        assert response.json() == {"error": "not_found", "detail": "no such endpoint"}
        return
    method = request.method.lower()
    operation = doc["paths"][template].get(method)
    if operation is None:
        assert response.status_code == 405
        assert response.json()["error"] == "method_not_allowed"
        return
    status = str(response.status_code)
    assert status in operation["responses"], f"{request.method} {template} answered undocumented {status}"
    content = operation["responses"][status].get("content", {})
    media = response.headers["content-type"].split(";")[0]
    if media == "application/json":
        schema = content["application/json"]["schema"]
        jsonschema.Draft202012Validator({**schema, "components": doc["components"]}).validate(response.json())
    else:
        assert media in content, f"{template} {status} answered undocumented {media}"


# --- harness -------------------------------------------------------------------------------------


@dataclass
class WallClock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    client: httpx.AsyncClient
    service: TokenService
    store: MemoryStore | RedisStore
    clock: WallClock
    signing_key: SigningKey
    seen: list[httpx.Response] = field(default_factory=list)

    async def jwks(self) -> KeyRing:
        return KeyRing.from_jwks((await self.client.get("/v1/fallback/keys")).json())


def token_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "session_id": "sess-1",
        "role": "host",
        "cohort_id": "beta",
        "client_version": "rescue-py/0.1",
        "telemetry_opt_in": True,
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


SVC = {"authorization": f"Bearer {SERVICE_KEY}"}
ADMIN = {"authorization": f"Bearer {ADMIN_KEY}"}


def make_service(
    store: MemoryStore | RedisStore,
    clock: WallClock,
    key: SigningKey,
    *,
    guardrail_config: GuardrailConfig | None = None,
    **overrides: Any,
) -> TokenService:
    settings: dict[str, Any] = {
        "keys": PublishedKeys(key),
        "service_keys": frozenset({SERVICE_KEY, "second-service-key"}),
        "admin_key": ADMIN_KEY,
        "relay_url": RELAY_URL,
    }
    settings.update(overrides)
    guardrails = Guardrails(store, guardrail_config or GuardrailConfig(), wall_clock=clock)
    return TokenService(TokenServiceConfig(**settings), guardrails, wall_clock=clock)


@pytest.fixture
def service_factory() -> Callable[..., TokenService]:
    return make_service


@pytest.fixture
async def harness_factory(
    nursery: trio.Nursery,
) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def start(store: MemoryStore | RedisStore | None = None, **overrides: Any) -> Harness:
        store = store if store is not None else MemoryStore()
        clock = WallClock()
        key = SigningKey.generate()
        service = make_service(store, clock, key, **overrides)
        port = await nursery.start(serve_http, service.router, "127.0.0.1", 0)

        async def hook(response: httpx.Response) -> None:
            await response.aread()
            check_against_openapi(response)

        client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", event_hooks={"response": [hook]}, timeout=TIMEOUT
        )
        clients.append(client)
        return Harness(client, service, store, clock, key)

    yield start
    for client in clients:
        await client.aclose()
    nursery.cancel_scope.cancel()


@pytest.fixture
async def h(harness_factory: Callable[..., Any]) -> Harness:
    harness: Harness = await harness_factory()
    await harness.store.set_cohort_enabled("beta", True)
    return harness


# --- minting -------------------------------------------------------------------------------------


async def test_mint_happy_path(h: Harness) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert r.status_code == 200
        doc = r.json()
        assert set(doc) == {"token", "expires_at", "cohort", "guardrail_hint", "relay_url"}
        assert (doc["cohort"], doc["guardrail_hint"], doc["relay_url"]) == ("beta", "ok", RELAY_URL)
        claims = verify_token(b64url_decode(doc["token"]), await h.jwks(), now=T0, audience="any-node")
        assert (claims.sid, claims.role, claims.cohort, claims.aud) == ("sess-1", "host", "beta", "*")
        assert claims.exp == doc["expires_at"] == int(T0) + 300
        assert claims.analytics_allowed
        counts = await h.service.guardrails.window("beta", now=T0)
        assert counts.counts.tokens == 1


async def test_telemetry_opt_out_turns_bit_off_and_logs_nothing_per_session(
    h: Harness, events: list[logging.LogRecord]
) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post(
            "/v1/fallback/token", json=token_body(session_id="private-1", telemetry_opt_in=False), headers=SVC
        )
        assert r.status_code == 200
        claims = verify_token(b64url_decode(r.json()["token"]), await h.jwks(), now=T0)
        assert not claims.analytics_allowed
        assert not [e for e in events if getattr(e, "event", "") == "transport.fallback.considered"]
        r = await h.client.post("/v1/fallback/token", json=token_body(session_id="public-1"), headers=SVC)
        considered = [e for e in events if getattr(e, "event", "") == "transport.fallback.considered"]
        assert len(considered) == 1
        fields = considered[0].__dict__
        assert fields["outcome"] == "issued"
        assert "public-1" not in str(fields.values())  # session ids only as a short hash
        assert "private-1" not in " ".join(str(e.__dict__) for e in events)


@pytest.mark.parametrize(
    "body",
    [
        token_body(session_id=...),
        token_body(session_id="has space"),
        token_body(session_id="x" * 129),
        token_body(role="admin"),
        token_body(cohort_id="a:b"),
        token_body(cohort_id=7),
        token_body(client_version=""),
        token_body(client_version="v" * 65),
        token_body(telemetry_opt_in=...),
        token_body(telemetry_opt_in="yes"),
        token_body(entitlement_proof=5),
        token_body(entitlement_proof="x" * 9000),
    ],
)
async def test_mint_invalid_request(h: Harness, body: dict[str, Any]) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=body, headers=SVC)
        assert r.status_code == 400
        assert r.json()["error"] == "invalid_request"


async def test_mint_malformed_json_and_too_large(h: Harness) -> None:
    json_svc = {**SVC, "content-type": "application/json"}
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", content=b"{", headers=json_svc)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        r = await h.client.post("/v1/fallback/token", content=b"[]", headers=json_svc)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        r = await h.client.post("/v1/fallback/token", content=b" " * (65 * 1024), headers=json_svc)
        assert (r.status_code, r.json()["error"]) == (413, "payload_too_large")


# What a browser sends cross-site without a CORS preflight (a <form>, or fetch with a "simple"
# content type), plus no declaration at all and near misses.
NOT_JSON_CONTENT_TYPES = [
    "text/plain",
    "text/plain;charset=UTF-8",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=x",
    None,
    "application/json-seq",
    "application/json; charset=latin-1",
    "text/json",
]


def _raw(body: dict[str, Any], content_type: str | None, auth: dict[str, str]) -> dict[str, Any]:
    """httpx arguments for ``body`` as JSON text declared as ``content_type`` (None: undeclared)."""
    headers = dict(auth)
    if content_type is not None:
        headers["content-type"] = content_type
    return {"content": json.dumps(body).encode(), "headers": headers}


@pytest.mark.parametrize("content_type", NOT_JSON_CONTENT_TYPES)
async def test_bodies_not_declared_json_are_415_and_do_nothing(h: Harness, content_type: str | None) -> None:
    """Every POST/PUT with a body: a valid JSON body declared as anything but application/json is
    refused before it acts (no token, no count, no pause, no cohort change)."""
    with trio.fail_after(TIMEOUT):
        calls = [
            ("POST", "/v1/fallback/token", token_body(), SVC),
            ("POST", "/v1/fallback/activations", {"cohort": "beta"}, {}),
            ("POST", "/v1/sessions/started", {"cohort": "beta", "count": 5}, SVC),
            ("POST", "/v1/admin/pause", {"reason": "csrf"}, ADMIN),
            ("PUT", "/v1/admin/cohorts/gamma", {"fallback_ws_enabled": True}, ADMIN),
        ]
        for method, path, body, auth in calls:
            r = await h.client.request(method, path, **_raw(body, content_type, auth))
            assert r.status_code == 415, (path, r.text)
            assert r.json()["error"] == "unsupported_media_type"
            assert "application/json" in r.json()["detail"]
        # nothing happened
        assert (await h.client.get("/v1/fallback/status")).json()["paused"] is False
        window = (await h.client.get("/v1/admin/guardrails?cohort=beta", headers=ADMIN)).json()
        assert (window["sessions"], window["tokens"], window["activations"]) == (0, 0, 0)
        r = await h.client.get("/v1/admin/cohorts/gamma", headers=ADMIN)
        assert r.json()["fallback_ws_enabled"] is False
        assert h.service.token_requests.labels(outcome="invalid", guardrail="none")._value.get() == 1
        # and the resume endpoint is guarded the same way (tested last: it must not undo a pause)
        r = await h.client.post("/v1/admin/resume", **_raw({}, content_type, ADMIN))
        assert (r.status_code, r.json()["error"]) == (415, "unsupported_media_type")


@pytest.mark.parametrize(
    "content_type",
    ["application/json", "application/json; charset=utf-8", 'Application/JSON;Charset="UTF-8"'],
)
async def test_json_content_types_are_accepted(h: Harness, content_type: str) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", **_raw(token_body(), content_type, SVC))
        assert r.status_code == 200
        r = await h.client.post("/v1/admin/pause", **_raw({"reason": "r"}, content_type, ADMIN))
        assert r.json()["paused"] is True


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": "Basic abc"},
        {"authorization": "Bearer"},
        {"authorization": f"Bearer {ADMIN_KEY}"},  # the admin key is not a service key
    ],
)
async def test_mint_unauthenticated(h: Harness, headers: dict[str, str]) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=headers)
        assert r.status_code == 401
        assert r.json()["error"] == "unauthenticated"
        assert r.headers["www-authenticate"] == "Bearer"


async def test_second_service_key_and_disabled_oidc(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory()
    await h.store.set_cohort_enabled("beta", True)
    with trio.fail_after(TIMEOUT):
        r = await h.client.post(
            "/v1/fallback/token", json=token_body(), headers={"authorization": "Bearer second-service-key"}
        )
        assert r.status_code == 200
    open_h: Harness = await harness_factory(disable_oidc=True)
    await open_h.store.set_cohort_enabled("beta", True)
    with trio.fail_after(TIMEOUT):
        assert (await open_h.client.post("/v1/fallback/token", json=token_body())).status_code == 200
        r = await open_h.client.post("/v1/sessions/started", json={"cohort": "beta", "count": 3})
        assert r.status_code == 200


async def test_metrics_show_the_http_servers_connection_counts(h: Harness) -> None:
    # what serve_token_service's server counts (decision 0017's connection cap) is on /metrics
    h.service.http_stats.open = 7
    h.service.http_stats.shed_idle = 3
    h.service.http_stats.refused = 2
    with trio.fail_after(TIMEOUT):
        metrics = (await h.client.get("/metrics")).text
    assert "beach_rescue_http_open_connections 7.0" in metrics
    assert 'beach_rescue_http_connections_turned_away_total{reason="shed_idle"} 3.0' in metrics
    assert 'beach_rescue_http_connections_turned_away_total{reason="refused"} 2.0' in metrics
    assert 'beach_rescue_http_connections_turned_away_total{reason="accept_error"} 0.0' in metrics


async def test_mint_refused_by_guardrails(h: Harness) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(cohort_id="gamma"), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (403, "cohort_disabled")
        await h.service.guardrails.pause(reason="test")
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
        metrics = (await h.client.get("/metrics")).text
        assert 'beach_fallback_token_requests_total{guardrail="paused",outcome="refused"} 1.0' in metrics
        assert (
            'beach_fallback_token_requests_total{guardrail="cohort_disabled",outcome="refused"} 1.0'
            in metrics
        )
        assert "beach_fallback_paused 1.0" in metrics


async def test_env_kill_switch(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(guardrail_config=GuardrailConfig(env_paused=True))
    await h.store.set_cohort_enabled("beta", True)
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
        assert (await h.client.get("/v1/fallback/status")).json()["paused"] is True
        assert (await h.client.get("/healthz")).json() == {"status": "ok", "fallback_paused": True}
        # paused is still ready: the relays must go on reading the pause from this replica
        r = await h.client.get("/readyz")
        assert (r.status_code, r.json()) == (200, {"ready": True, "reasons": [], "fallback_paused": True})
        # resuming the stored flag can't override this process's env switch
        r = await h.client.post("/v1/admin/resume", headers=ADMIN)
        assert r.json()["paused"] is True


async def test_dev_override_enables_any_cohort(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(guardrail_config=GuardrailConfig(dev_enable_all_cohorts=True))
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(cohort_id="anything"), headers=SVC)
        assert r.status_code == 200
        r = await h.client.get("/v1/admin/cohorts/anything", headers=ADMIN)
        assert r.json() == {
            "cohort": "anything",
            "fallback_ws_enabled": False,
            "effective": True,
            "dev_override": True,
        }


async def test_fail_closed_when_store_down(h: Harness) -> None:
    assert isinstance(h.store, MemoryStore)
    h.store.available = False
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (503, "guardrail_store_unavailable")
        r = await h.client.get("/v1/fallback/status")
        assert (r.status_code, r.json()["error"]) == (503, "guardrail_store_unavailable")
        r = await h.client.get("/healthz")
        assert r.status_code == 503
        assert r.json() == {"status": "store_unavailable", "fallback_paused": True}
        # not ready, but alive: a restart cannot bring the store back (decision 0021)
        r = await h.client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"ready": False, "reasons": ["store_unavailable"], "fallback_paused": True}
        r = await h.client.get("/livez")
        assert (r.status_code, r.json()) == (200, {"status": "ok"})
        assert "beach_fallback_store_up 0.0" in (await h.client.get("/metrics")).text
        for method, path, body in [
            ("POST", "/v1/fallback/activations", {"cohort": "beta"}),
            ("POST", "/v1/sessions/started", {"cohort": "beta"}),
            ("POST", "/v1/admin/pause", None),
            ("POST", "/v1/admin/resume", None),
            ("PUT", "/v1/admin/cohorts/beta", {"fallback_ws_enabled": True}),
            ("GET", "/v1/admin/cohorts/beta", None),
            ("GET", "/v1/admin/guardrails?cohort=beta", None),
            ("GET", "/v1/admin/nodes", None),
        ]:
            headers = ADMIN if "/admin/" in path else SVC
            r = await h.client.request(method, path, json=body, headers=headers)
            assert (r.status_code, r.json()["error"]) == (503, "guardrail_store_unavailable"), path
        metrics = (await h.client.get("/metrics")).text
        assert (
            'beach_fallback_token_requests_total{guardrail="store_unavailable",outcome="unavailable"}'
            in metrics
        )


async def test_no_relay_available(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(relay_url=None)
    await h.store.set_cohort_enabled("beta", True)
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (503, "no_relay_available")
        await h.store.register_node(NodeInfo("n1", "wss://n1/v1/connect", draining=True), ttl=30)
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (503, "no_relay_available")
        await h.store.register_node(NodeInfo("n2", "wss://n2/v1/connect", full=True), ttl=30)
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (503, "no_relay_available")
        assert "full" in r.json()["detail"]
        metrics = (await h.client.get("/metrics")).text
        for reason in ("none", "draining", "full"):
            assert f'beach_fallback_no_relay_total{{reason="{reason}"}} 1.0' in metrics, reason
        assert 'beach_fallback_token_requests_total{guardrail="no_relay",outcome="refused"} 3.0' in metrics


async def test_node_assignment_sets_aud_and_relay_url(h: Harness) -> None:
    for i in range(4):
        await h.store.register_node(NodeInfo(f"node-{i}", f"wss://node-{i}.example/v1/connect"), ttl=30)
    with trio.fail_after(TIMEOUT):
        host = await h.client.post("/v1/fallback/token", json=token_body(session_id="s-42"), headers=SVC)
        guest = await h.client.post(
            "/v1/fallback/token", json=token_body(session_id="s-42", role="guest"), headers=SVC
        )
        assert host.json()["relay_url"] == guest.json()["relay_url"]
        ring = await h.jwks()
        claims = verify_token(b64url_decode(host.json()["token"]), ring, now=T0)
        assert host.json()["relay_url"] == f"wss://{claims.aud}.example/v1/connect"
        verify_token(b64url_decode(guest.json()["token"]), ring, now=T0, audience=claims.aud)


async def test_soft_breach_hint_and_metric(h: Harness, events: list[logging.LogRecord]) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/sessions/started", json={"cohort": "beta", "count": 200}, headers=SVC)
        assert r.json() == {"cohort": "beta", "recorded": 200}
        r = await h.client.post("/v1/fallback/activations", json={"cohort": "beta"})
        assert r.json() == {"cohort": "beta", "recorded": 1}
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert r.status_code == 200
        assert r.json()["guardrail_hint"] == "soft_breach"
        metrics = (await h.client.get("/metrics")).text
        assert 'beach_fallback_token_requests_total{guardrail="soft_breach",outcome="issued"} 1.0' in metrics
        assert 'beach_fallback_sessions_started_total{cohort="beta"} 200.0' in metrics
        assert 'beach_fallback_activations_total{cohort="beta"} 1.0' in metrics
        assert "guardrail_soft_breach" in [getattr(e, "event", "") for e in events]
        r = await h.client.get("/v1/admin/guardrails", params={"cohort": "beta"}, headers=ADMIN)
        assert r.json()["state"] == "soft_breach"
        assert r.json()["ratio"] == 0.005
        assert r.json()["tokens"] == 1


# --- reports -----------------------------------------------------------------------------------


async def test_reports_validation_and_auth(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(report_keys=frozenset({"relay-key"}))
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/sessions/started", json={"cohort": "beta"})
        assert r.status_code == 401
        for bad in [{"cohort": "beta", "count": 0}, {"cohort": "beta", "count": True}, {"cohort": ""}, {}]:
            r = await h.client.post("/v1/sessions/started", json=bad, headers=SVC)
            assert (r.status_code, r.json()["error"]) == (400, "invalid_request"), bad
        r = await h.client.post("/v1/fallback/activations", json={"cohort": "beta"})
        assert r.status_code == 401
        r = await h.client.post(
            "/v1/fallback/activations", json={"cohort": "beta"}, headers={"authorization": "Bearer relay-key"}
        )
        assert r.status_code == 200
        r = await h.client.post(
            "/v1/fallback/activations", json={"session": "x"}, headers={"authorization": "Bearer relay-key"}
        )
        assert r.status_code == 400


# --- read endpoints -------------------------------------------------------------------------------


async def test_status_healthz_metrics_openapi(h: Harness) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.get("/v1/fallback/status")
        assert r.json() == {"paused": False, "reason": None, "since": None, "drain": False, "cause": None}
        assert (await h.client.get("/healthz")).json() == {"status": "ok", "fallback_paused": False}
        assert (await h.client.get("/livez")).json() == {"status": "ok"}
        r = await h.client.get("/readyz")
        assert (r.status_code, r.json()) == (200, {"ready": True, "reasons": [], "fallback_paused": False})
        r = await h.client.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain")
        assert "beach_fallback_paused 0.0" in r.text
        assert "beach_fallback_store_up 1.0" in r.text
        r = await h.client.get("/openapi.json")
        assert r.json()["openapi"].startswith("3.")
        routes = {(m.lower(), p) for m, p in h.service.router.routes}
        documented = {(m, p) for p, ops in r.json()["paths"].items() for m in ops if m != "parameters"}
        assert routes == documented


async def test_unknown_path_and_method(h: Harness) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.get("/v1/nope")
        assert (r.status_code, r.json()["error"]) == (404, "not_found")
        r = await h.client.delete("/v1/fallback/token")
        assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")


# --- admin -----------------------------------------------------------------------------------------


ADMIN_ENDPOINTS = [
    ("POST", "/v1/admin/pause", None),
    ("POST", "/v1/admin/resume", None),
    ("PUT", "/v1/admin/cohorts/beta", {"fallback_ws_enabled": True}),
    ("GET", "/v1/admin/cohorts/beta", None),
    ("GET", "/v1/admin/guardrails?cohort=beta", None),
    ("GET", "/v1/admin/nodes", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ENDPOINTS)
async def test_admin_auth(h: Harness, method: str, path: str, body: Any) -> None:
    with trio.fail_after(TIMEOUT):
        for headers in ({}, {"authorization": "Bearer"}, {"authorization": f"Token {ADMIN_KEY}"}):
            r = await h.client.request(method, path, json=body, headers=headers)
            assert (r.status_code, r.json()["error"]) == (401, "unauthenticated")
        for wrong in ("wrong", SERVICE_KEY):
            r = await h.client.request(method, path, json=body, headers={"authorization": f"Bearer {wrong}"})
            assert (r.status_code, r.json()["error"]) == (403, "forbidden")
        r = await h.client.request(method, path, json=body, headers=ADMIN)
        assert r.status_code == 200


async def test_admin_disabled_without_key(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(admin_key=None)
    with trio.fail_after(TIMEOUT):
        r = await h.client.post("/v1/admin/pause", headers=ADMIN)
        assert r.status_code == 403


async def test_admin_pause_resume_cohorts_nodes(h: Harness) -> None:
    with trio.fail_after(TIMEOUT):
        r = await h.client.post(
            "/v1/admin/pause", json={"reason": "incident 7", "drain": True}, headers=ADMIN
        )
        assert r.json() == {
            "paused": True,
            "reason": "incident 7",
            "since": T0,
            "drain": True,
            "cause": "operator",
        }
        assert (await h.client.get("/v1/fallback/status")).json()["drain"] is True
        h.clock.now += 60
        r = await h.client.post("/v1/admin/resume", headers=ADMIN)
        assert r.json() == {"paused": False, "reason": None, "since": T0 + 60, "drain": False, "cause": None}
        # an empty body is fine for pause/resume, and needs no content type (it has none)
        r = await h.client.post("/v1/admin/pause", content=b"", headers=ADMIN)
        assert r.json()["paused"] is True
        for bad in ({"drain": "yes"}, {"reason": 5}, {"reason": "r" * 300}):
            r = await h.client.post("/v1/admin/pause", json=bad, headers=ADMIN)
            assert r.status_code == 400

        r = await h.client.put("/v1/admin/cohorts/gamma", json={"fallback_ws_enabled": True}, headers=ADMIN)
        assert r.json() == {
            "cohort": "gamma",
            "fallback_ws_enabled": True,
            "effective": True,
            "dev_override": False,
        }
        r = await h.client.get("/v1/admin/cohorts/gamma", headers=ADMIN)
        assert r.json()["fallback_ws_enabled"] is True
        r = await h.client.put("/v1/admin/cohorts/gamma", json={"fallback_ws_enabled": "no"}, headers=ADMIN)
        assert r.status_code == 400
        r = await h.client.put(
            "/v1/admin/cohorts/bad%20id", json={"fallback_ws_enabled": True}, headers=ADMIN
        )
        assert r.status_code == 400
        r = await h.client.get("/v1/admin/guardrails", headers=ADMIN)  # cohort is required
        assert r.status_code == 400

        await h.store.register_node(NodeInfo("n1", "wss://n1/v1/connect"), ttl=30)
        r = await h.client.get("/v1/admin/nodes", headers=ADMIN)
        assert r.json() == {
            "nodes": [{"id": "n1", "url": "wss://n1/v1/connect", "draining": False, "full": False}]
        }


# --- on real Redis ------------------------------------------------------------------------------------


@pytest.mark.redis
async def test_two_services_on_one_redis(harness_factory: Callable[..., Any], redis_url: str) -> None:
    a: Harness = await harness_factory(RedisStore(redis_url))
    b: Harness = await harness_factory(RedisStore(redis_url))
    with trio.fail_after(TIMEOUT):
        r = await a.client.put("/v1/admin/cohorts/beta", json={"fallback_ws_enabled": True}, headers=ADMIN)
        assert r.status_code == 200
        assert (await b.client.post("/v1/fallback/token", json=token_body(), headers=SVC)).status_code == 200
        await a.client.post("/v1/admin/pause", headers=ADMIN)
        r = await b.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
        assert (await b.client.get("/v1/fallback/status")).json()["paused"] is True
        await b.client.post("/v1/admin/resume", headers=ADMIN)
        assert (await a.client.post("/v1/fallback/token", json=token_body(), headers=SVC)).status_code == 200
        await a.store.aclose()
        await b.store.aclose()


def test_openapi_hook_catches_drift() -> None:
    request = httpx.Request("GET", "http://127.0.0.1/healthz")
    with pytest.raises(jsonschema.ValidationError):
        check_against_openapi(httpx.Response(200, json={"status": "ok"}, request=request))
    with pytest.raises(AssertionError):
        check_against_openapi(httpx.Response(418, json={"error": "x", "detail": "y"}, request=request))
    token = httpx.Request("POST", "http://127.0.0.1/v1/fallback/token")
    with pytest.raises(jsonschema.ValidationError):  # an error code the operation doesn't document
        check_against_openapi(httpx.Response(403, json={"error": "forbidden", "detail": ""}, request=token))


# --- a store that lost its data (issue #11; end to end on real Redis: tests/test_store_init.py) ---


async def test_uninitialised_store_answers_are_documented(harness_factory: Callable[..., Any]) -> None:
    h: Harness = await harness_factory(MemoryStore(initialised=False))
    await h.store.set_cohort_enabled("beta", True)
    with trio.fail_after(TIMEOUT):
        status = (await h.client.get("/v1/fallback/status")).json()  # checked against the document
        assert (status["paused"], status["cause"]) == (True, "store_uninitialised")
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
        assert (await h.client.get("/healthz")).json() == {"status": "ok", "fallback_paused": True}
        metrics = (await h.client.get("/metrics")).text
        assert "beach_fallback_store_initialised 0.0" in metrics
        assert 'beach_fallback_pause_cause{cause="store_uninitialised"} 1.0' in metrics
        r = await h.client.post("/v1/admin/store/init", json={"reason": "x"})
        assert r.status_code == 401
        r = await h.client.post("/v1/admin/store/init", json={"reason": 5}, headers=ADMIN)
        assert (r.status_code, r.json()["error"]) == (400, "invalid_request")
        r = await h.client.post("/v1/admin/store/init", headers=ADMIN)  # no body: fine
        assert r.json() == {"paused": False, "reason": None, "since": None, "drain": False, "cause": None}
        r = await h.client.post("/v1/fallback/token", json=token_body(), headers=SVC)
        assert r.status_code == 200
        assert "beach_fallback_store_initialised 1.0" in (await h.client.get("/metrics")).text
