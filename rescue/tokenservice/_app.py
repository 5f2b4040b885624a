"""The token service's HTTP API (SPEC §4) on :mod:`rescue._http`.

One :class:`TokenService` per process (or per test): it owns its routers, its Prometheus registry
and its guardrails. Serve it with :func:`serve_token_service` (or ``serve_http(service.app, …)``:
the router behind the CORS policy), and its probes and metrics on a port of their own with
:func:`serve_token_service_admin` (``service.admin_router``: ``/livez``, ``/readyz``, ``/healthz``,
``/metrics``, behind a connection cap of their own, so a flood of the API port cannot fail a
liveness probe or a scrape; decision 0024). The API port keeps those four paths too.

Every request except ``/metrics``, the health endpoints and the relays' status polls is one server span when
tracing is configured (``rescue._tracing.record_span``; ``docs/operations/tracing.md``): route,
status, and for token requests outcome, guardrail state and cohort. A caller's W3C ``traceparent``
becomes the span's parent, except for token requests of sessions that did not opt in to telemetry:
their span is a root with no session tag, role or client version. Tokens never appear in a span.
The same requests are timed in ``beach_fallback_request_duration_seconds{route}``, with the trace
id as exemplar (OpenMetrics).
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from rescue._http import (
    DEFAULT_LIMITS,
    Handler,
    HttpLimits,
    HttpShutdown,
    HttpStats,
    JsonError,
    Request,
    Response,
    Router,
    json_response,
    serve_http,
    text_response,
)
from rescue._log import get_logger, log_event, session_tag
from rescue._tracing import current_record, record_span
from rescue.errors import GuardrailError, StoreUnavailable
from rescue.guardrails import PAUSE_CAUSES, FleetState, Guardrails, check_cohort_id, store_deadline
from rescue.protocol import MAX_TTL, ROLES, SESSION_ID_RE, b64url_encode, mint_token
from rescue.tokenservice._cors import CorsMiddleware
from rescue.tokenservice._keys import PublishedKeys
from rescue.tokenservice._oidc import EntitlementError, OidcUnavailable, OidcVerifier
from rescue.tokenservice._openapi import openapi_document
from rescue.tokenservice._web import add_join_routes

__all__ = [
    "ADMIN_MAX_CONNECTIONS",
    "ADMIN_PATHS",
    "DEFAULT_ADMIN_PORT",
    "TokenService",
    "TokenServiceConfig",
    "serve_token_service",
    "serve_token_service_admin",
]

_LOG = get_logger("rescue.tokenservice")

MAX_CLIENT_VERSION: Final = 64  # "rescue-py/0.1", "beach-web/2024.11.3": short strings
MAX_ENTITLEMENT_PROOF: Final = 8 * 1024  # an ID token; matches the OIDC verifier's bound
MAX_REASON: Final = 256  # operator free text for pause/resume
# Sessions reported per call: the control plane batches per cohort; a cap stops a typo (or an
# attacker with a service key) from making one cohort's denominator meaningless in one request.
MAX_SESSIONS_PER_REPORT: Final = 100_000
# Distinct cohort label values per counter: cohort ids come from requests, and every label value is
# a time series kept forever; past this, cohorts are counted as "other".
MAX_COHORT_LABELS: Final = 1_000

# All the store work of one request (about five Redis round trips of ~1 ms) must fit in this, so
# a stalled Redis answers 503 in half a second instead of waiting out socket timeouts per call.
STORE_DEADLINE_S: Final = 0.5

_CHALLENGE: Final = {"www-authenticate": "Bearer"}
# The admin port (decision 0024): what orchestrators and Prometheus ask, apart from the API port's
# connection cap. The API's 8080 plus 1000; not next to the relay's admin port, 9090, because
# `rescue relay --nodes N` counts up from it (9090, 9091, …): both run on one host with defaults.
DEFAULT_ADMIN_PORT: Final = 9080
ADMIN_PATHS: Final = ("/livez", "/readyz", "/healthz", "/metrics")
# The admin port's connection cap: a kubelet's two probes, a scrape or two, an operator's curl; a
# handful each at most. It bounds the fds a caller that reaches the admin port can take.
ADMIN_MAX_CONNECTIONS: Final = 16
# Request latency: a token request is a few Redis round trips plus one Ed25519 signature
# (milliseconds); the top buckets catch a slow store or an OIDC key fetch.
REQUEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Scrapes, health checks and the relays' kill-switch polls (every node, every second) come all the
# time and say nothing about a session: not traced.
_UNTRACED: Final = frozenset({"/metrics", "/healthz", "/livez", "/readyz", "/v1/fallback/status"})
# beach_fallback_store_errors_total{route} counts the requests answered 503
# guardrail_store_unavailable. Not these: a scrape or a health probe during an outage is no failed
# operation (a probe answers 503 store_unavailable, a scrape keeps the last kill-switch gauges), and
# counting them made the error rate the scrape and probe rate. Nor routes that never use the store.
_STORE_UNAVAILABLE: Final = "guardrail_store_unavailable"
_STORE_ERROR_UNCOUNTED: Final = frozenset(
    {"/metrics", "/healthz", "/livez", "/readyz", "/v1/fallback/keys", "/openapi.json"}
)

# SPEC §4 error code -> HTTP status for guardrail refusals.
_GUARDRAIL_STATUS: Final = {
    "fallback_paused": 403,
    "cohort_disabled": 403,
    "not_entitled": 403,
    "no_relay_available": 503,
}
# beach_fallback_no_relay_total{reason}: why no relay could be named (GuardrailError.reason).
NO_RELAY_REASONS: Final = ("none", "draining", "full")
# Metric label values for beach_fallback_token_requests_total{outcome, guardrail}.
_REFUSAL_GUARDRAIL_LABEL: Final = {
    "fallback_paused": "paused",
    "cohort_disabled": "cohort_disabled",
    "no_relay_available": "no_relay",
}


@dataclass(frozen=True)
class TokenServiceConfig:
    """Everything the token service needs besides its guardrails.

    Attributes:
        keys: the signing key and the published key set.
        service_keys: bearer keys of callers allowed to mint (Beach's control plane).
        admin_key: the admin bearer key; None disables the admin API (403).
        relay_url: the relay's public ``wss://…/v1/connect`` used when no node is registered
            (single-node deployments); None means a node registry is required.
        disable_oidc: ``BEACH_RESCUE_DISABLE_OIDC=1`` outside production: no authentication needed
            to mint or to report sessions.
        oidc: checks ``entitlement_proof``; None means proofs are not accepted.
        report_keys: bearer keys relays use for ``POST /v1/fallback/activations``; empty means the
            endpoint is open (put the token service on a private network then).
        issuer: the tokens' ``iss``.
        token_ttl: token lifetime in seconds (≤ 300), also the session→node assignment lifetime.
        store_deadline_s: the budget for all guardrail-store calls of one request; past it the
            request fails with 503 ``guardrail_store_unavailable``.
        cors_origins: origins whose pages may call the token API cross-origin (SPEC §12; empty:
            none). See :mod:`rescue.tokenservice._cors`.
    """

    keys: PublishedKeys
    service_keys: frozenset[str] = frozenset()
    admin_key: str | None = None
    relay_url: str | None = None
    disable_oidc: bool = False
    oidc: OidcVerifier | None = None
    report_keys: frozenset[str] = field(default_factory=frozenset)
    issuer: str = "beach-rescue"
    token_ttl: int = MAX_TTL
    store_deadline_s: float = STORE_DEADLINE_S
    cors_origins: frozenset[str] = frozenset()


def _key_in(candidate: str, keys: Iterable[str]) -> bool:
    # compare with every key in constant time, and don't stop early
    found = False
    for key in keys:
        found |= hmac.compare_digest(candidate.encode(), key.encode())
    return found


def _require(body: dict[str, Any], name: str, kind: type, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise JsonError(400, "invalid_request", f"{name} must be a {kind.__name__}")
    return value


class TokenService:
    """The control-plane API.

    Args:
        config: keys, credentials, relay URL.
        guardrails: the guardrail policy over the shared store.
        wall_clock: epoch seconds for token claims and counters (injectable for tests).

    Resource handling:
        Owns no I/O resources itself; the store belongs to ``guardrails`` (close it yourself).
    """

    def __init__(
        self,
        config: TokenServiceConfig,
        guardrails: Guardrails,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.guardrails = guardrails
        self._now = wall_clock
        # True once a SIGTERM began the drain (rescue token-service, decision 0023): /readyz answers
        # 503 "draining" so load balancers stop sending work, everything else is still served.
        self.draining = False
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total etc. for the CPU alert
        self.http_stats = HttpStats()  # kept by serve_token_service's server
        self.registry.register(_HttpCollector(self.http_stats))
        self.token_requests = Counter(
            "beach_fallback_token_requests",
            "Token requests by outcome and guardrail state",
            ["outcome", "guardrail"],
            registry=self.registry,
        )
        self.sessions_started = Counter(
            "beach_fallback_sessions_started",
            "Sessions reported started (the guardrail denominator)",
            ["cohort"],
            registry=self.registry,
        )
        self.activations = Counter(
            "beach_fallback_activations",
            "Fallback activations reported by relays",
            ["cohort"],
            registry=self.registry,
        )
        self.paused_gauge = Gauge(
            "beach_fallback_paused",
            "1 when the kill switch was on at the last check (status, healthz, token request)",
            registry=self.registry,
        )
        self.pause_cause = Gauge(
            "beach_fallback_pause_cause",
            "1 for the cause of the kill switch at the last check (operator, env, hard_breach, "
            "telemetry_missing, store_uninitialised); all 0 when not paused",
            ["cause"],
            registry=self.registry,
        )
        for cause in PAUSE_CAUSES:
            self.pause_cause.labels(cause).set(0)
        self.store_initialised = Gauge(
            "beach_fallback_store_initialised",
            "0 when the guardrail store was not initialised at the last check (new, or it lost its "
            "data): the fleet then reads as paused until `rescue admin init-store`",
            registry=self.registry,
        )
        self.store_initialised.set(1)
        self._initialised_seen = True  # what the last check found (logs once per change)
        self.store_up = Gauge(
            "beach_fallback_store_up",
            "1 when the guardrail store answered the kill-switch read of the last /metrics scrape, 0 "
            "when it did not (every mint then fails closed: 503 guardrail_store_unavailable)",
            registry=self.registry,
        )
        self.store_up.set(1)
        self.draining_gauge = Gauge(
            "beach_fallback_draining",
            "1 from the SIGTERM that began the drain until the process exits (decision 0023: /readyz "
            "503 draining while every other request is still served), 0 while serving",
            registry=self.registry,
        )
        self.draining_gauge.set_function(lambda: 1.0 if self.draining else 0.0)
        self.store_errors = Counter(
            "beach_fallback_store_errors",
            "Requests answered 503 guardrail_store_unavailable (the guardrail store could not be read "
            "or written), by route; /metrics scrapes and health probes are not counted",
            ["route"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "beach_fallback_request_duration_seconds",
            "Token service request latency by route (exemplars: trace ids when tracing is on)",
            ["route"],
            buckets=REQUEST_BUCKETS,
            registry=self.registry,
        )
        self.no_relay = Counter(
            "beach_fallback_no_relay",
            "Token requests refused with no_relay_available, by why: none (no relay registered), "
            "draining (every relay is), full (every relay is full or draining)",
            ["reason"],
            registry=self.registry,
        )
        for reason in NO_RELAY_REASONS:
            self.no_relay.labels(reason)
        self.assignment_moves = Counter(
            "beach_rescue_assignment_moves",
            "Session assignments moved off a relay node that was gone or draining",
            ["reason"],
            registry=self.registry,
        )
        if guardrails.on_move is None:
            guardrails.on_move = lambda reason: self.assignment_moves.labels(reason).inc()
        self._cohort_labels: set[str] = set()
        self.router = Router()
        # The admin port's routes (serve_token_service_admin): the probes and /metrics, no CORS.
        self.admin_router = Router()
        self._routes()
        # What serve_token_service serves: the router behind the CORS policy (read per request).
        self.app = CorsMiddleware(self.router, lambda: self.config.cors_origins)

    # --- plumbing --------------------------------------------------------------------------------

    def _routes(self) -> None:
        routes: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/fallback/token", self.token),
            ("GET", "/v1/fallback/keys", self.keys),
            ("GET", "/v1/fallback/status", self.status),
            ("POST", "/v1/fallback/activations", self.report_activation),
            ("POST", "/v1/sessions/started", self.sessions_started_report),
            ("GET", "/healthz", self.healthz),
            ("GET", "/livez", self.livez),
            ("GET", "/readyz", self.readyz),
            ("GET", "/metrics", self.metrics),
            ("GET", "/openapi.json", self.openapi),
            ("POST", "/v1/admin/pause", self.admin_pause),
            ("POST", "/v1/admin/resume", self.admin_resume),
            ("POST", "/v1/admin/store/init", self.admin_init_store),
            ("PUT", "/v1/admin/cohorts/{cohort_id}", self.admin_put_cohort),
            ("GET", "/v1/admin/cohorts/{cohort_id}", self.admin_get_cohort),
            ("GET", "/v1/admin/guardrails", self.admin_guardrails),
            ("GET", "/v1/admin/nodes", self.admin_nodes),
        ]
        for method, template, handler in routes:
            bounded = self._with_store_deadline(handler, template)
            traced = bounded if template in _UNTRACED else self._traced(template, bounded)
            self.router.add(method, template, traced)
            if template in ADMIN_PATHS:  # the same handler on both ports (untraced, uncounted)
                self.admin_router.add(method, template, traced)
        add_join_routes(self.router)  # static files: no store, no span

    def _with_store_deadline(self, handler: Handler, template: str) -> Handler:
        """One budget for all the store calls of one request (``store_deadline_s``): a stalled
        store turns into a fast 503, never into a request that waits once per call. A request
        answered 503 ``guardrail_store_unavailable`` counts once in ``store_errors`` under its
        route, however many store calls it made (probes and scrapes: not at all)."""
        budget = self.config.store_deadline_s
        if template in _STORE_ERROR_UNCOUNTED:

            async def bounded(request: Request) -> Response:
                with store_deadline(budget):
                    return await handler(request)

            return bounded
        errors = self.store_errors.labels(route=template)  # 0 from the start: rate() sees the first

        async def counted(request: Request) -> Response:
            with store_deadline(budget):
                try:
                    return await handler(request)
                except JsonError as exc:
                    if exc.error == _STORE_UNAVAILABLE:
                        errors.inc()
                    raise

        return counted

    def _traced(self, template: str, handler: Handler) -> Handler:
        """``handler`` inside a recorded server span and timed in ``request_seconds``."""
        latency = self.request_seconds.labels(route=template)

        async def traced(request: Request) -> Response:
            started = trio.current_time()
            status = 500
            recorded = record_span(f"{request.method} {template}", carrier=request.headers)
            try:
                with recorded as span:
                    span.set_attribute("http.route", template)
                    span.set_attribute("http.request.method", request.method)
                    try:
                        response = await handler(request)
                        status = response.status
                    except JsonError as exc:
                        status = exc.status
                        span.set_attribute("error.code", exc.error)
                        raise
                    finally:
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_attribute("error", True)
                return response
            finally:
                # after the span is recorded, so its trace id can be the exemplar
                latency.observe(trio.current_time() - started, exemplar=span.exemplar())

        return traced

    def _saw_fleet_state(self, state: FleetState) -> None:
        """Update the kill-switch gauges from a fleet state just read; log when the store turns
        out not to be initialised (once per change: relays poll the status every second)."""
        self.paused_gauge.set(1 if state.paused else 0)
        cause = (state.cause or "operator") if state.paused else None
        for name in PAUSE_CAUSES:
            self.pause_cause.labels(name).set(1 if name == cause else 0)
        self.store_initialised.set(1 if state.initialised else 0)
        was, self._initialised_seen = self._initialised_seen, state.initialised
        if was and not state.initialised:
            log_event(
                _LOG,
                "guardrail_store_uninitialised",
                level=logging.ERROR,
                detail="fail closed: the store is new or lost its data; see the runbook, "
                "'Redis came back empty', then run `rescue admin init-store`",
            )

    def _cohort_label(self, cohort: str) -> str:
        if cohort in self._cohort_labels:
            return cohort
        if len(self._cohort_labels) >= MAX_COHORT_LABELS:
            return "other"
        self._cohort_labels.add(cohort)
        return cohort

    def _store_down(self, exc: StoreUnavailable) -> JsonError:
        """The 503 for a request the store failed (counted by the route's wrapper) and its log."""
        log_event(_LOG, "guardrail_store_unavailable", level=logging.ERROR, error=str(exc)[:200])
        return JsonError(503, _STORE_UNAVAILABLE, "the guardrail store is unavailable")

    @staticmethod
    def _cohort_from(value: object, name: str) -> str:
        try:
            return check_cohort_id(value)  # type: ignore[arg-type]
        except ValueError:
            raise JsonError(
                400, "invalid_request", f"{name} must be 1-64 characters of [A-Za-z0-9._-]"
            ) from None

    def _require_key(self, request: Request, keys: Iterable[str], what: str) -> None:
        credential = request.bearer_token()
        if credential is None:
            raise JsonError(
                401,
                "unauthenticated",
                f"{what} requires Authorization: Bearer",
                headers={"www-authenticate": "Bearer"},
            )
        if not _key_in(credential, keys):
            raise JsonError(
                401, "unauthenticated", f"unknown {what} key", headers={"www-authenticate": "Bearer"}
            )

    def _require_admin(self, request: Request) -> None:
        credential = request.bearer_token()
        if credential is None:
            raise JsonError(
                401,
                "unauthenticated",
                "admin API requires Authorization: Bearer <admin key>",
                headers={"www-authenticate": "Bearer"},
            )
        if self.config.admin_key is None or not _key_in(credential, [self.config.admin_key]):
            raise JsonError(403, "forbidden", "not the admin key")

    # --- POST /v1/fallback/token ------------------------------------------------------------------

    async def token(self, request: Request) -> Response:
        """Mint a fallback token (SPEC §4)."""
        try:
            body = self._parse_token_request(request)
        except JsonError as exc:
            self._count_token_request(None, outcome="invalid", guardrail="none")
            raise exc from None
        try:
            await self._authenticate_minting(request, body.get("entitlement_proof"))
        except JsonError as exc:
            outcome = "auth_failed" if exc.status in (401, 403) else "unavailable"
            self._count_token_request(body, outcome=outcome, guardrail="none")
            self._considered(body, outcome=exc.error)
            raise
        try:
            answer = await self._decide_and_mint(body)
        except GuardrailError as exc:
            label = _REFUSAL_GUARDRAIL_LABEL.get(exc.error, exc.error)
            if exc.error == "no_relay_available":
                self.no_relay.labels(exc.reason or "none").inc()
            self._count_token_request(body, outcome="refused", guardrail=label)
            self._considered(body, outcome=exc.error)
            raise JsonError(_GUARDRAIL_STATUS.get(exc.error, 403), exc.error, str(exc)) from None
        except StoreUnavailable as exc:
            self._count_token_request(body, outcome="unavailable", guardrail="store_unavailable")
            self._considered(body, outcome="guardrail_store_unavailable")
            raise self._store_down(exc) from None
        self._count_token_request(body, outcome="issued", guardrail=answer["guardrail_hint"])
        self._considered(body, outcome="issued", hint=answer["guardrail_hint"])
        return json_response(answer)

    def _count_token_request(self, body: dict[str, Any] | None, *, outcome: str, guardrail: str) -> None:
        """The request counter, and the same facts on the request's span (SPEC §5 telemetry rule)."""
        self.token_requests.labels(outcome=outcome, guardrail=guardrail).inc()
        recorded = current_record()
        if recorded is None:
            return
        recorded.set_attribute("outcome", outcome)
        recorded.set_attribute("guardrail", guardrail)
        if body is None:  # unparsed: nothing says the session opted in
            recorded.follow_caller = False
            return
        recorded.set_attribute("cohort", body["cohort_id"])
        if body["telemetry_opt_in"] is True:
            recorded.set_attribute("session", session_tag(body["session_id"]))
            recorded.set_attribute("role", body["role"])
            recorded.set_attribute("client_version", body["client_version"])
        else:
            recorded.follow_caller = False  # no link to the caller's (per-session) trace either

    def _parse_token_request(self, request: Request) -> dict[str, Any]:
        body = request.json_object()
        session_id = _require(body, "session_id", str)
        if SESSION_ID_RE.fullmatch(session_id) is None:
            raise JsonError(400, "invalid_request", "session_id must be 1-128 characters of [A-Za-z0-9._:-]")
        if body.get("role") not in ROLES:
            raise JsonError(400, "invalid_request", "role must be 'host' or 'guest'")
        self._cohort_from(body.get("cohort_id"), "cohort_id")
        version = _require(body, "client_version", str)
        if not 0 < len(version) <= MAX_CLIENT_VERSION:
            raise JsonError(
                400, "invalid_request", f"client_version must be 1-{MAX_CLIENT_VERSION} characters"
            )
        proof = _require(body, "entitlement_proof", str, optional=True)
        if proof is not None and len(proof) > MAX_ENTITLEMENT_PROOF:
            raise JsonError(400, "invalid_request", "entitlement_proof is too long")
        _require(body, "telemetry_opt_in", bool)
        return body

    async def _authenticate_minting(self, request: Request, proof: str | None) -> None:
        """Service key, or a valid entitlement proof, or nothing with OIDC disabled (SPEC §4)."""
        if self.config.disable_oidc:
            return
        if request.bearer_token() is not None or proof is None:
            self._require_key(request, self.config.service_keys, "service")
            return
        if self.config.oidc is None:
            raise JsonError(401, "unauthenticated", "entitlement proofs are not accepted by this service")
        try:
            await self.config.oidc.verify(proof, now=self._now())
        except EntitlementError as exc:
            raise JsonError(401 if exc.error == "unauthenticated" else 403, exc.error, str(exc)) from None
        except OidcUnavailable as exc:
            raise JsonError(503, "entitlement_unavailable", str(exc)) from None

    async def _decide_and_mint(self, body: dict[str, Any]) -> dict[str, Any]:
        cohort: str = body["cohort_id"]
        now = self._now()
        try:
            auth, node = await self.guardrails.decide(
                cohort,
                body["session_id"],
                now=now,
                ttl=self.config.token_ttl,
                require_node=self.config.relay_url is None,
            )
        except GuardrailError as exc:
            if exc.error != "no_relay_available":
                self.paused_gauge.set(1 if exc.error == "fallback_paused" else 0)
            raise
        self.paused_gauge.set(0)
        relay_url = node.public_url if node is not None else self.config.relay_url
        assert relay_url is not None
        token = mint_token(
            self.config.keys.signing_key,
            session_id=body["session_id"],
            role=body["role"],
            audience=node.node_id if node is not None else "*",
            cohort=cohort,
            ttl=self.config.token_ttl,
            fb=1 if body["telemetry_opt_in"] else 0,
            issuer=self.config.issuer,
            now=now,
        )
        return {
            "token": b64url_encode(token),
            "expires_at": int(now) + self.config.token_ttl,
            "cohort": cohort,
            "guardrail_hint": auth.hint,
            "relay_url": relay_url,
        }

    def _considered(self, body: dict[str, Any], *, outcome: str, hint: str | None = None) -> None:
        """``transport.fallback.considered``: only for sessions that opted in to telemetry."""
        if body.get("telemetry_opt_in") is not True:
            return
        log_event(
            _LOG,
            "transport.fallback.considered",
            session=session_tag(body["session_id"]),
            role=body.get("role"),
            cohort=body.get("cohort_id"),
            client_version=body.get("client_version"),
            outcome=outcome,
            guardrail_hint=hint,
        )

    # --- public read endpoints ------------------------------------------------------------------------

    async def keys(self, request: Request) -> Response:
        """The JWK set relays verify tokens with: current key plus retired keys in their grace."""
        await trio.lowlevel.checkpoint()
        return json_response(self.config.keys.jwks(now=self._now()))

    async def status(self, request: Request) -> Response:
        """The fleet's kill switch, polled by relays (fails with 503 if it can't be read)."""
        try:
            state = await self.guardrails.fleet_state()
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self._saw_fleet_state(state)
        return json_response(state.to_json())

    async def healthz(self, request: Request) -> Response:
        """``{"status": "ok", "fallback_paused": bool}``; 503 ``store_unavailable`` (reported paused).

        SPEC §4's health answer: it reads the kill switch, so it follows the store like ``/readyz``
        and is no liveness check (``/livez`` is; decision 0021)."""
        try:
            state = await self.guardrails.fleet_state()
        except StoreUnavailable:  # a probe's answer, not a failed operation: not in store_errors
            return json_response({"status": "store_unavailable", "fallback_paused": True}, 503)
        self._saw_fleet_state(state)
        return json_response({"status": "ok", "fallback_paused": state.paused})

    async def livez(self, request: Request) -> Response:
        """Liveness: 200 ``{"status": "ok"}`` while the process serves HTTP. Never reads the store
        (decision 0021): a Redis outage is not cured by a restart, so an orchestrator's liveness
        probe must not see it."""
        await trio.lowlevel.checkpoint()
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness: 200 while the guardrail store answers (this replica can mint or refuse with
        a reason), 503 ``{"ready": false, "reasons": ["store_unavailable"]}`` while it cannot, and
        503 with ``"draining"`` first among the reasons once a SIGTERM began the drain (decision
        0023; the replica still serves every request meanwhile). A pause is not a reason: a paused
        replica still does its job (it answers the relays' status polls with the pause and refuses
        mints with 403)."""
        reasons = ["draining"] if self.draining else []
        try:
            state = await self.guardrails.fleet_state()
        except StoreUnavailable:  # a probe's answer, not a failed operation: not in store_errors
            return json_response(
                {"ready": False, "reasons": [*reasons, "store_unavailable"], "fallback_paused": True}, 503
            )
        self._saw_fleet_state(state)
        return json_response(
            {"ready": not reasons, "reasons": reasons, "fallback_paused": state.paused},
            503 if reasons else 200,
        )

    async def metrics(self, request: Request) -> Response:
        """Prometheus text, or OpenMetrics (with exemplars) when the scraper's Accept asks for it.

        The kill-switch gauges are refreshed first (one store read; left as they were when the
        store is down), so every replica's scrape says whether, and why, the fleet is paused, and
        ``beach_fallback_store_up`` whether that read succeeded. A scrape the store fails is not
        counted in ``store_errors`` (it would count the scrape rate).
        """
        try:
            self._saw_fleet_state(await self.guardrails.fleet_state())
            self.store_up.set(1)
        except StoreUnavailable:
            # Scrapes reach a replica that is not ready (decision 0021): during an outage this is
            # what keeps saying so once the Service sends it no more mints to fail.
            self.store_up.set(0)
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return text_response(encode(self.registry).decode(), content_type=content_type)

    async def openapi(self, request: Request) -> Response:
        await trio.lowlevel.checkpoint()
        return json_response(openapi_document())

    # --- reports ----------------------------------------------------------------------------------------

    async def report_activation(self, request: Request) -> Response:
        """A relay paired a session: ``{"cohort": id}``, counts only."""
        if self.config.report_keys:
            self._require_key(request, self.config.report_keys, "relay report")
        body = request.json_object()
        cohort = self._cohort_from(body.get("cohort"), "cohort")
        try:
            await self.guardrails.record_activation(cohort, now=self._now())
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self.activations.labels(cohort=self._cohort_label(cohort)).inc()
        return json_response({"cohort": cohort, "recorded": 1})

    async def sessions_started_report(self, request: Request) -> Response:
        """Beach's control plane reports sessions created: ``{"cohort": id, "count": n = 1}``."""
        if not self.config.disable_oidc:
            self._require_key(request, self.config.service_keys, "service")
        body = request.json_object()
        cohort = self._cohort_from(body.get("cohort"), "cohort")
        count = body.get("count", 1)
        if isinstance(count, float) and count.is_integer():
            count = int(count)  # JSON Schema's "integer" includes 3.0, and so does /openapi.json
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= MAX_SESSIONS_PER_REPORT:
            raise JsonError(
                400, "invalid_request", f"count must be an integer in 1..{MAX_SESSIONS_PER_REPORT}"
            )
        try:
            await self.guardrails.record_sessions_started(cohort, now=self._now(), count=count)
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self.sessions_started.labels(cohort=self._cohort_label(cohort)).inc(count)
        return json_response({"cohort": cohort, "recorded": count})

    # --- admin ----------------------------------------------------------------------------------------------

    @staticmethod
    def _reason(body: dict[str, Any]) -> str | None:
        reason = _require(body, "reason", str, optional=True)
        if reason is not None and len(reason) > MAX_REASON:
            raise JsonError(400, "invalid_request", f"reason must be at most {MAX_REASON} characters")
        return reason  # type: ignore[no-any-return]

    @classmethod
    def _pause_body(cls, request: Request) -> tuple[str | None, bool]:
        body = request.json_object(allow_empty=True)
        reason = cls._reason(body)
        drain = body.get("drain", False)
        if not isinstance(drain, bool):
            raise JsonError(400, "invalid_request", "drain must be a boolean")
        return reason, drain

    async def admin_pause(self, request: Request) -> Response:
        self._require_admin(request)
        reason, drain = self._pause_body(request)
        try:
            state = await self.guardrails.pause(reason=reason, drain=drain)
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self._saw_fleet_state(state)
        return json_response(state.to_json())

    async def admin_resume(self, request: Request) -> Response:
        self._require_admin(request)
        reason, _ = self._pause_body(request)
        try:
            state = await self.guardrails.resume(reason=reason)
            effective = await self.guardrails.fleet_state()  # FALLBACK_WS_PAUSED may still hold
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self._saw_fleet_state(effective)
        return json_response(effective.to_json() if effective.paused else state.to_json())

    async def admin_init_store(self, request: Request) -> Response:
        """Mark the store initialised (``rescue admin init-store``); answers the effective state."""
        self._require_admin(request)
        reason = self._reason(request.json_object(allow_empty=True))
        try:
            state = await self.guardrails.initialise_store(reason=reason)
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        self._saw_fleet_state(state)
        return json_response(state.to_json())

    async def _cohort_view(self, cohort: str) -> dict[str, Any]:
        stored = await self.guardrails.store.cohort_enabled(cohort)
        dev = self.guardrails.config.dev_enable_all_cohorts
        return {
            "cohort": cohort,
            "fallback_ws_enabled": stored,
            "effective": stored or dev,
            "dev_override": dev,
        }

    async def admin_put_cohort(self, request: Request) -> Response:
        self._require_admin(request)
        cohort = self._cohort_from(request.path_params["cohort_id"], "cohort_id")
        body = request.json_object()
        enabled = body.get("fallback_ws_enabled")
        if not isinstance(enabled, bool):
            raise JsonError(400, "invalid_request", "fallback_ws_enabled must be a boolean")
        try:
            await self.guardrails.set_cohort_enabled(cohort, enabled)
            return json_response(await self._cohort_view(cohort))
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None

    async def admin_get_cohort(self, request: Request) -> Response:
        self._require_admin(request)
        cohort = self._cohort_from(request.path_params["cohort_id"], "cohort_id")
        try:
            return json_response(await self._cohort_view(cohort))
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None

    async def admin_guardrails(self, request: Request) -> Response:
        self._require_admin(request)
        cohort = self._cohort_from(request.query.get("cohort"), "cohort")
        try:
            window = await self.guardrails.window(cohort, now=self._now())
            gap = await self.guardrails.store.telemetry_gap()
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        return json_response({**window.to_json(), "telemetry": gap.to_json()})

    async def admin_nodes(self, request: Request) -> Response:
        self._require_admin(request)
        try:
            nodes = await self.guardrails.store.live_nodes()
        except StoreUnavailable as exc:
            raise self._store_down(exc) from None
        return json_response({"nodes": [n.to_json() for n in nodes]})


async def serve_token_service(
    service: TokenService,
    host: str,
    port: int,
    *,
    limits: HttpLimits = DEFAULT_LIMITS,
    shutdown: HttpShutdown | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``service`` until cancelled; reports the bound port (see :func:`rescue._http.serve_http`;
    ``limits`` its connection cap and timeouts, ``shutdown`` its :class:`~rescue._http.HttpShutdown`,
    the CLI's SIGTERM drain). Its connections are counted in ``service.http_stats`` (``/metrics``)."""
    await serve_http(
        service.app,
        host,
        port,
        limits=limits,
        stats=service.http_stats,
        shutdown=shutdown,
        task_status=task_status,
    )


async def serve_token_service_admin(
    service: TokenService,
    host: str,
    port: int,
    *,
    shutdown: HttpShutdown | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``service``'s admin port until cancelled (decision 0024): :data:`ADMIN_PATHS` only,
    behind a cap of :data:`ADMIN_MAX_CONNECTIONS` of its own, so that a flood holding every
    connection the API port may open (its callers get 503 ``server_busy``) leaves the liveness
    probe, the readiness probe and the scrape answered. Reports the bound port; ``shutdown`` as for
    :func:`serve_token_service` (one object may drive both servers).

    Resource handling and cancellation: as :func:`rescue._http.serve_http`.
    """
    await serve_http(
        service.admin_router,
        host,
        port,
        limits=HttpLimits(max_connections=ADMIN_MAX_CONNECTIONS),
        shutdown=shutdown,
        task_status=task_status,
    )


class _HttpCollector(Collector):
    """The HTTP server's connection counts (decision 0017's connection cap) on ``/metrics``."""

    def __init__(self, stats: HttpStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        yield from self.stats.metrics()
