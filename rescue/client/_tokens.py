"""Fetching fallback tokens: ``POST /v1/fallback/token`` (SPEC §4) and the provider interface.

A *token provider* is any ``async () -> TokenGrant`` callable. :class:`TokenClient` is the one that
talks to the token service; tests and integrators with their own control plane can pass any other
(``rescue.testing.LocalTokens`` mints with a local key).

Errors a provider raises decide what the peer does next:

* :class:`~rescue.errors.GuardrailError` (403 ``fallback_paused``, ``cohort_disabled``,
  ``not_entitled``): stop; the fallback is not allowed.
* :class:`TokenRequestError` (400, 401, other 4xx): stop; retrying cannot help.
* :class:`TokenServiceUnavailable` (network errors, timeouts, 5xx such as ``no_relay_available`` or
  ``guardrail_store_unavailable``): retry with backoff.
"""

from __future__ import annotations

import functools
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from urllib.parse import urlsplit

import httpx

from rescue._tracing import trace_headers
from rescue.errors import GuardrailError, RescueError
from rescue.protocol import Role, b64url_decode

__all__ = [
    "DEFAULT_COHORT",
    "TOKEN_PATH",
    "TokenClient",
    "TokenGrant",
    "TokenProvider",
    "TokenRequestError",
    "TokenServiceUnavailable",
]

TOKEN_PATH: Final = "/v1/fallback/token"
DEFAULT_COHORT: Final = "dev"  # the cohort `rescue dev` enables
CLIENT_VERSION: Final = "rescue-py/0.1"
# Refuse token-service answers larger than this: a grant is a few hundred bytes of JSON.
MAX_ANSWER_BYTES: Final = 16 * 1024
# A request that takes longer than this is treated as "unavailable" and retried with backoff.
DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
_GUARDRAIL_ERRORS: Final = frozenset({"fallback_paused", "cohort_disabled", "not_entitled"})


class TokenRequestError(RescueError):
    """The token service refused the request for a reason retrying cannot fix (400, 401, 4xx).

    Attributes:
        status: the HTTP status.
        error: the ``error`` code of the JSON answer (``invalid_request``, ``unauthenticated``, …).
    """

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"token request refused: {status} {error}: {detail}")
        self.status = status
        self.error = error


class TokenServiceUnavailable(RescueError):
    """No token right now, but maybe soon: network failure, timeout or a 5xx answer.

    Attributes:
        error: the ``error`` code of a JSON answer, or ``"unreachable"``/``"bad_answer"``.
    """

    def __init__(self, error: str, detail: str) -> None:
        super().__init__(f"token service unavailable: {error}: {detail}")
        self.error = error


@dataclass(frozen=True, slots=True)
class TokenGrant:
    """A fallback token and where to use it.

    Attributes:
        token: the CWT bytes (goes into HELLO; never log it).
        relay_url: the assigned relay node's ``ws(s)://…/v1/connect``.
        expires_at: the token's expiry, epoch seconds.
        cohort: the cohort it was minted for.
        guardrail_hint: ``"ok"`` or ``"soft_breach"``.
    """

    token: bytes
    relay_url: str
    expires_at: float
    cohort: str = DEFAULT_COHORT
    guardrail_hint: str = "ok"

    def __repr__(self) -> str:
        return f"TokenGrant(relay_url={self.relay_url!r}, expires_at={self.expires_at}, token=<redacted>)"

    def expires_within(self, seconds: float, *, now: float | None = None) -> bool:
        """Whether the token expires within ``seconds`` of ``now`` (wall clock by default)."""
        return self.expires_at - (time.time() if now is None else now) < seconds

    @classmethod
    def from_json(cls, answer: Any) -> TokenGrant:
        """Parse the 200 answer of ``POST /v1/fallback/token``.

        Raises:
            TokenServiceUnavailable: the answer is not a valid grant (``bad_answer``).
        """
        try:
            if not isinstance(answer, dict):
                raise TypeError("not an object")
            token = b64url_decode(answer["token"])
            relay_url = answer["relay_url"]
            expires_at = answer["expires_at"]
            if not isinstance(relay_url, str) or not relay_url.startswith(("ws://", "wss://")):
                raise TypeError("relay_url is not a ws:// or wss:// URL")
            # what connect_websocket will parse: a bad IPv6 host or port is a bad answer here, not a
            # ValueError escaping the peer's connection task later
            parts = urlsplit(relay_url)
            if not parts.hostname or parts.port == 0:
                raise TypeError("relay_url has no host or port")
            if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
                raise TypeError("expires_at is not a number")
            return cls(
                token=token,
                relay_url=relay_url,
                expires_at=float(expires_at),
                cohort=str(answer.get("cohort", "")),
                guardrail_hint=str(answer.get("guardrail_hint", "ok")),
            )
        except (KeyError, TypeError, ValueError, RescueError) as exc:
            raise TokenServiceUnavailable("bad_answer", f"malformed token answer: {exc}") from None


TokenProvider: TypeAlias = Callable[[], Awaitable[TokenGrant]]


@functools.cache
def _default_tls() -> ssl.SSLContext:
    """The TLS settings of every token request that brings no client of its own: httpx's default
    (certifi's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``), made once per process.

    httpx makes one per client, and a client per request loaded the whole CA bundle for every
    token fetch, even over plain http: ~25 ms of CPU and about a megabyte of short-lived
    allocations each time, which left the heap of a process that reconnects many peers
    fragmented (docs/perf/soak.md). A context is safe to share between connections.
    """
    return httpx.create_ssl_context()


class TokenClient:
    """Fetches tokens for one (session, role) from the token service; a :data:`TokenProvider`.

    Args:
        api_url: the token service's base URL, e.g. ``http://127.0.0.1:8080``.
        session_id: the session.
        role: ``host`` or ``guest``.
        cohort: the cohort id (``dev`` by default, which ``rescue dev`` enables).
        service_key: bearer key of a trusted caller (Beach's control plane), if any.
        entitlement_proof: an OIDC JWT proving entitlement, if any.
        telemetry_opt_in: whether per-session telemetry is allowed (feature bit 0).
        client: an ``httpx.AsyncClient`` to use (it stays yours); by default one is made per
            request with :data:`DEFAULT_REQUEST_TIMEOUT_S`.

    Raises:
        ValueError: ``api_url`` is not http(s).
    """

    def __init__(
        self,
        api_url: str,
        *,
        session_id: str,
        role: Role | str,
        cohort: str = DEFAULT_COHORT,
        service_key: str | None = None,
        entitlement_proof: str | None = None,
        telemetry_opt_in: bool = False,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not api_url.startswith(("http://", "https://")):
            raise ValueError(f"token service URL must be http(s)://, not {api_url!r}")
        self.url: Final = api_url.rstrip("/") + TOKEN_PATH
        self.session_id = session_id
        self.role = Role(role)
        self.cohort = cohort
        self._service_key = service_key
        self._proof = entitlement_proof
        self.telemetry_opt_in = telemetry_opt_in
        self._client = client

    def __repr__(self) -> str:
        return f"TokenClient({self.url!r}, role={self.role.value})"

    async def __call__(self) -> TokenGrant:
        """Request one token.

        Raises:
            GuardrailError: 403 ``fallback_paused`` / ``cohort_disabled`` / ``not_entitled``.
            TokenRequestError: 400, 401 or another 4xx.
            TokenServiceUnavailable: network error, timeout, 5xx, or an unparsable answer.

        Cancellation:
            Safe; the request is abandoned.
        """
        body: dict[str, Any] = {
            "session_id": self.session_id,
            "role": self.role.value,
            "cohort_id": self.cohort,
            "client_version": CLIENT_VERSION,
            "telemetry_opt_in": self.telemetry_opt_in,
        }
        if self._proof is not None:
            body["entitlement_proof"] = self._proof
        headers = {"authorization": f"Bearer {self._service_key}"} if self._service_key else {}
        # W3C traceparent of the caller's span (the ladder's token rung) when tracing is on; the
        # token service links to it only for sessions that opted in to telemetry
        headers.update(trace_headers())
        try:
            if self._client is not None:
                response = await self._client.post(self.url, json=body, headers=headers)
            else:
                async with httpx.AsyncClient(
                    timeout=DEFAULT_REQUEST_TIMEOUT_S, verify=_default_tls()
                ) as client:
                    response = await client.post(self.url, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise TokenServiceUnavailable("unreachable", f"{type(exc).__name__}: {exc}") from None
        return _grant_from(response)


def _grant_from(response: httpx.Response) -> TokenGrant:
    if len(response.content) > MAX_ANSWER_BYTES:
        raise TokenServiceUnavailable("bad_answer", f"answer of {len(response.content)} bytes")
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if response.status_code == 200:
        return TokenGrant.from_json(answer)
    error, detail = "http_error", response.reason_phrase
    if isinstance(answer, dict):
        error = str(answer.get("error", error))[:64]
        detail = str(answer.get("detail", detail))[:200]
    if response.status_code == 403 and error in _GUARDRAIL_ERRORS:
        raise GuardrailError(error, detail)
    if response.status_code >= 500 or response.status_code == 429:
        raise TokenServiceUnavailable(error, detail)
    raise TokenRequestError(response.status_code, error, detail)
