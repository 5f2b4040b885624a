"""The fallback ladder (SPEC §9): WebRTC → TURN → guardrail check (token request) → relay.

The WebRTC and TURN rungs are pluggable ``async () -> transport`` callables (Beach's own
transports, or mocks in tests): an attempt succeeds by returning, fails by raising. The relay rung
is reached only after they all failed, and only through the token service: a refusal there
(:class:`~rescue.errors.GuardrailError`) stops the ladder before anything touches a relay.

Log events (JSON lines, ``rescue._log``; the session appears only as a short hash):

* ``transport.fallback.considered`` with ``reason`` ``webrtc_failed`` (after the last WebRTC
  attempt), ``turn_failed`` or ``turn_unavailable`` (no TURN configured), and, when the relay
  rung itself cannot be used, ``guardrail_refused`` (with the ``guardrail`` error code) or
  ``token_unavailable``;
* ``transport.fallback.activated`` when the guardrails allowed the fallback (a token was granted).

Spans (when tracing is configured, ``rescue._tracing``; ``docs/operations/tracing.md``): one
``client.fallback.ladder`` span per :meth:`FallbackLadder.run` with the decision (``rung``,
``reasons``, ``webrtc_attempts``), and a child per rung tried: ``client.fallback.webrtc`` (one per
attempt, with ``attempt``, ``outcome`` and the failure ``error``), ``client.fallback.turn`` and
``client.fallback.token`` (the guardrail check; its W3C ``traceparent`` goes to the token service, so
the token service's span is its child). The session appears only as the short hash, and not at all
when ``telemetry`` is off.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import trio

from rescue._log import get_logger, log_event, session_tag
from rescue._tracing import SpanLike, span
from rescue.client._backoff import BackoffPolicy
from rescue.client._tokens import TokenGrant, TokenProvider, TokenRequestError, TokenServiceUnavailable
from rescue.errors import GuardrailError

__all__ = [
    "DEFAULT_ATTEMPT_TIMEOUT_S",
    "DEFAULT_WEBRTC_ATTEMPTS",
    "Attempt",
    "FallbackLadder",
    "LadderResult",
    "prefetched",
]

_LOG: Final = get_logger("rescue.client.ladder")

DEFAULT_WEBRTC_ATTEMPTS: Final = 3  # SPEC §9: N, default 3
# One WebRTC or TURN attempt that has not connected in this long has failed (ICE gathering and
# checks normally finish in a few seconds; a hanging attempt must not keep the user waiting).
DEFAULT_ATTEMPT_TIMEOUT_S: Final = 10.0
# Between WebRTC attempts: exponential with full jitter, 0.5 s doubling up to 4 s, so three attempts
# cost at most ~1.5 s of waiting on top of the attempts themselves.
WEBRTC_BACKOFF: Final = BackoffPolicy(base=0.5, cap=4.0)

Attempt: TypeAlias = Callable[[], Awaitable[Any]]
Rung: TypeAlias = Literal["webrtc", "turn", "relay"]


@dataclass(frozen=True, slots=True)
class LadderResult:
    """Where the ladder ended.

    Attributes:
        rung: ``"webrtc"``, ``"turn"`` or ``"relay"``.
        transport: what the winning WebRTC/TURN callable returned (``None`` for the relay).
        grant: the token for the relay rung (``None`` otherwise); hand it to
            :func:`rescue.client.open_peer` through :func:`prefetched`.
        reasons: the reason codes of the rungs that failed, in order.
        webrtc_attempts: how many WebRTC attempts ran.
    """

    rung: Rung
    transport: Any = None
    grant: TokenGrant | None = None
    reasons: tuple[str, ...] = ()
    webrtc_attempts: int = 0


def prefetched(grant: TokenGrant, tokens: TokenProvider) -> TokenProvider:
    """A provider that hands out ``grant`` first, then asks ``tokens`` for fresh ones."""
    pending: list[TokenGrant] = [grant]

    async def provider() -> TokenGrant:
        if pending:
            await trio.lowlevel.checkpoint()
            return pending.pop()
        return await tokens()

    return provider


class FallbackLadder:
    """Runs the rungs in order and stops at the first that works.

    Args:
        session_id: the session (logged only as :func:`rescue._log.session_tag`).
        tokens: the guardrail check: a token provider (normally a :class:`TokenClient`).
        webrtc: one WebRTC connection attempt; ``None`` skips the rung (counted as failed).
        turn: one TURN attempt; ``None`` means TURN is not configured.
        webrtc_attempts: how many WebRTC attempts before moving on.
        backoff: delays between WebRTC attempts.
        attempt_timeout: bound on each WebRTC/TURN attempt (``None``: no bound).
        telemetry: whether this session may be logged per session (``telemetry_opt_in``); when
            ``False`` the events carry no session tag.
        logger: where the JSON events go.

    Raises:
        ValueError: ``webrtc_attempts`` < 1 while ``webrtc`` is given.
    """

    def __init__(
        self,
        *,
        session_id: str,
        tokens: TokenProvider,
        webrtc: Attempt | None = None,
        turn: Attempt | None = None,
        webrtc_attempts: int = DEFAULT_WEBRTC_ATTEMPTS,
        backoff: BackoffPolicy = WEBRTC_BACKOFF,
        attempt_timeout: float | None = DEFAULT_ATTEMPT_TIMEOUT_S,
        telemetry: bool = True,
        logger: logging.Logger = _LOG,
    ) -> None:
        if webrtc is not None and webrtc_attempts < 1:
            raise ValueError("webrtc_attempts must be at least 1")
        self._session = session_tag(session_id) if telemetry else None
        self._tokens = tokens
        self._webrtc = webrtc
        self._turn = turn
        self._attempts = webrtc_attempts
        self._backoff = backoff
        self._timeout = attempt_timeout
        self._logger = logger

    def _log(self, event: str, **fields: Any) -> None:
        if self._session is not None:
            fields["session"] = self._session
        log_event(self._logger, event, **fields)

    async def _try(self, rung: Rung, fn: Attempt, /, **attributes: Any) -> tuple[bool, Any, str]:
        with span(f"client.fallback.{rung}", **attributes) as s:
            ok, transport, error = await self._attempt(fn)
            s.set_attribute("outcome", "ok" if ok else "failed")
            if error:
                s.set_attribute("error", error)
            return ok, transport, error

    async def _attempt(self, attempt: Attempt) -> tuple[bool, Any, str]:
        try:
            if self._timeout is None:
                return True, await attempt(), ""
            with trio.fail_after(self._timeout):
                return True, await attempt(), ""
        except trio.TooSlowError:
            return False, None, "timeout"
        except Exception as exc:  # a pluggable transport failed in its own way; Cancelled passes
            return False, None, type(exc).__name__

    async def run(self) -> LadderResult:
        """Climb the ladder.

        Returns:
            The first rung that worked.

        Raises:
            GuardrailError: the token service refused the fallback (``fallback_paused``,
                ``cohort_disabled``, ``not_entitled``); no relay was contacted.
            TokenServiceUnavailable: no token could be had (the caller may run the ladder again).
            TokenRequestError: the token request itself was rejected (bad credentials, ...).

        Cancellation:
            Safe at any point; a running attempt is cancelled.
        """
        with span("client.fallback.ladder", session=self._session) as ladder:
            result = await self._climb(ladder)
            ladder.set_attribute("rung", result.rung)
            ladder.set_attribute("reasons", ",".join(result.reasons))
            ladder.set_attribute("webrtc_attempts", result.webrtc_attempts)
            return result

    async def _climb(self, ladder: SpanLike) -> LadderResult:
        reasons: list[str] = []
        attempts = 0
        if self._webrtc is not None:
            last_error = ""
            for attempt in range(self._attempts):
                if attempt:
                    await trio.sleep(self._backoff.full_jitter(attempt - 1))
                attempts += 1
                ok, transport, last_error = await self._try("webrtc", self._webrtc, attempt=attempts)
                if ok:
                    return LadderResult("webrtc", transport, webrtc_attempts=attempts)
            self._log(
                "transport.fallback.considered", reason="webrtc_failed", attempts=attempts, error=last_error
            )
        else:
            self._log(
                "transport.fallback.considered", reason="webrtc_failed", attempts=0, error="not_configured"
            )
        reasons.append("webrtc_failed")
        if self._turn is None:
            reasons.append("turn_unavailable")
            self._log("transport.fallback.considered", reason="turn_unavailable")
        else:
            ok, transport, error = await self._try("turn", self._turn)
            if ok:
                return LadderResult("turn", transport, reasons=tuple(reasons), webrtc_attempts=attempts)
            reasons.append("turn_failed")
            self._log("transport.fallback.considered", reason="turn_failed", error=error)
        ladder.set_attribute("reasons", ",".join(reasons))
        with span("client.fallback.token") as token_span:
            try:
                grant = await self._tokens()
            except GuardrailError as exc:
                token_span.set_attribute("outcome", "guardrail_refused")
                token_span.set_attribute("guardrail", exc.error)
                ladder.set_attribute("rung", "none")
                self._log("transport.fallback.considered", reason="guardrail_refused", guardrail=exc.error)
                raise
            except (TokenServiceUnavailable, TokenRequestError) as exc:
                token_span.set_attribute("outcome", "token_unavailable")
                token_span.set_attribute("error", exc.error)
                ladder.set_attribute("rung", "none")
                self._log("transport.fallback.considered", reason="token_unavailable", error=exc.error)
                raise
            token_span.set_attribute("outcome", "granted")
            token_span.set_attribute("guardrail_hint", grant.guardrail_hint)
            token_span.set_attribute("cohort", grant.cohort)
        self._log(
            "transport.fallback.activated",
            reasons=list(reasons),
            cohort=grant.cohort,
            guardrail_hint=grant.guardrail_hint,
        )
        return LadderResult("relay", None, grant, tuple(reasons), attempts)
