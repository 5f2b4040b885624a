"""The guardrail policy (SPEC §5, §7): kill switch, cohort flags, activation ratio, node assignment.

Everything here reads the store on every call (no caching), so every token-service replica sees a
pause, a resume or a cohort change on its next request. Time is passed in (``now``, wall-clock
seconds) so the maths is testable without a clock.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from rescue._log import get_logger, log_event
from rescue.errors import ConfigError, GuardrailError
from rescue.guardrails._store import (
    SECONDS_PER_HOUR,
    CounterField,
    FleetState,
    GuardrailStore,
    NodeInfo,
    TelemetryGap,
    WindowCounts,
    check_cohort_id,
    hour_bucket,
    rendezvous_pick,
    rolling_window,
)

__all__ = [
    "STORE_UNINITIALISED_REASON",
    "Authorization",
    "GuardrailConfig",
    "GuardrailWindow",
    "Guardrails",
    "effective_fleet_state",
    "missing_telemetry",
]

_LOG = get_logger("rescue.guardrails")

DEFAULT_SOFT_RATIO: Final = 0.005  # SPEC §5: activations / sessions ≥ 0.5 %
DEFAULT_MIN_SAMPLE: Final = 200  # SPEC §5: below this many sessions the ratio means nothing
# One guardrail_soft_breach log line per cohort per process per minute: enough for alerting,
# not one line per token while a cohort stays in breach.
SOFT_BREACH_LOG_INTERVAL_S: Final = 60.0
# Cohort entries in the soft-breach log limiter; when full it is cleared (worst case: one extra line).
MAX_TRACKED_BREACHES: Final = 10_000
# Missing telemetry (decision 0012): in production, minting pauses when tokens kept being minted for
# this long without one activation report (or one sessions-started report) reaching the service...
DEFAULT_TELEMETRY_GRACE_S: Final = 600.0
# ...and at least this many tokens were minted meanwhile (25 sessions' worth: a few sessions whose
# partner never came cannot trip it).
DEFAULT_TELEMETRY_MIN_TOKENS: Final = 50

# The synthetic probe (`rescue probe`) mints for its own cohort and no Beach session is ever
# reported for it: alone at night it must not look like a control plane that stopped reporting.
DEFAULT_UNREPORTED_COHORTS: Final = frozenset({"probe"})

MissingInput = Literal["activations", "sessions"]

_TRUE = frozenset({"1", "true", "yes", "on"})

# The effective kill switch's reason while the store is not initialised (new, or it lost its
# data): stable text, so alerts and runbooks can match it.
STORE_UNINITIALISED_REASON: Final = (
    "guardrail store not initialised (new, or it lost its data): fallback is paused until an "
    "operator runs `rescue admin init-store` (docs/operations/runbook.md)"
)

WindowState = Literal["ok", "insufficient_sample", "soft_breach", "hard_breach"]


def _env_flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def _env_float(environ: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if not 0 < value <= 1:
        raise ConfigError(f"{name} must be in (0, 1], got {raw!r}")
    return value


@dataclass(frozen=True, slots=True)
class GuardrailConfig:
    """Guardrail settings, normally from the environment (:meth:`from_env`).

    Attributes:
        environment: ``RESCUE_ENV`` (``production`` disables the dev overrides).
        env_paused: ``FALLBACK_WS_PAUSED=1``: this process's own kill switch.
        dev_enable_all_cohorts: ``BEACH_DEV_ENABLE_FALLBACK_WS=1`` outside production.
        soft_ratio: activations/sessions at or above which tokens are tagged ``soft_breach``.
        min_sample: weighted sessions in the window needed before the ratio is judged.
        hard_ratio: if set, a ratio at or above it pauses the fleet (auto-pause).
        telemetry_grace_s: pause minting once tokens were minted for this long without a single
            activation or sessions-started report (None: off; decision 0012).
        telemetry_min_tokens: ...and at least this many tokens were minted in that time.
        telemetry_unreported_cohorts: cohorts whose sessions Beach never reports started (the
            synthetic probe's): their tokens don't count towards the sessions-started gap.
    """

    environment: str = "development"
    env_paused: bool = False
    dev_enable_all_cohorts: bool = False
    soft_ratio: float = DEFAULT_SOFT_RATIO
    min_sample: int = DEFAULT_MIN_SAMPLE
    hard_ratio: float | None = None
    telemetry_grace_s: float | None = None
    telemetry_min_tokens: int = DEFAULT_TELEMETRY_MIN_TOKENS
    telemetry_unreported_cohorts: frozenset[str] = DEFAULT_UNREPORTED_COHORTS

    def __post_init__(self) -> None:
        if self.is_production and self.dev_enable_all_cohorts:
            # never silently honoured in production, whoever built the config
            object.__setattr__(self, "dev_enable_all_cohorts", False)
        if self.hard_ratio is not None and self.hard_ratio < self.soft_ratio:
            raise ConfigError("the hard breach ratio must not be below the soft breach ratio")
        if self.min_sample < 1:
            raise ConfigError("the guardrail minimum sample must be at least 1")
        if self.telemetry_grace_s is not None and not self.telemetry_grace_s > 0:
            raise ConfigError("the telemetry grace period must be positive (or None: off)")
        if self.telemetry_min_tokens < 1:
            raise ConfigError("the telemetry minimum token count must be at least 1")

    @property
    def is_production(self) -> bool:
        return self.environment.strip().lower() == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GuardrailConfig:
        """Read ``RESCUE_ENV``, ``FALLBACK_WS_PAUSED``, ``BEACH_DEV_ENABLE_FALLBACK_WS``,
        ``RESCUE_SOFT_BREACH_RATIO``, ``RESCUE_GUARDRAIL_MIN_SAMPLE``, ``RESCUE_HARD_BREACH_RATIO``,
        ``RESCUE_TELEMETRY_GRACE_S`` (unset: 600 in production, off elsewhere; ``0``: off) and
        ``RESCUE_TELEMETRY_MIN_TOKENS`` (50), ``RESCUE_TELEMETRY_UNREPORTED_COHORTS`` (``probe``;
        comma-separated, empty for none).

        Raises:
            ConfigError: a numeric setting is malformed or out of range.
        """
        env = os.environ if environ is None else environ
        environment = env.get("RESCUE_ENV", "development").strip() or "development"
        raw_sample = env.get("RESCUE_GUARDRAIL_MIN_SAMPLE", "").strip()
        try:
            min_sample = int(raw_sample) if raw_sample else DEFAULT_MIN_SAMPLE
        except ValueError:
            raise ConfigError(f"RESCUE_GUARDRAIL_MIN_SAMPLE must be an integer, got {raw_sample!r}") from None
        soft = _env_float(env, "RESCUE_SOFT_BREACH_RATIO", DEFAULT_SOFT_RATIO)
        assert soft is not None
        production = environment.lower() == "production"
        raw_grace = env.get("RESCUE_TELEMETRY_GRACE_S", "").strip()
        grace: float | None = DEFAULT_TELEMETRY_GRACE_S if production else None
        if raw_grace:
            try:
                grace = float(raw_grace)
            except ValueError:
                raise ConfigError(f"RESCUE_TELEMETRY_GRACE_S must be a number, got {raw_grace!r}") from None
            if grace < 0 or grace != grace:
                raise ConfigError(f"RESCUE_TELEMETRY_GRACE_S must be >= 0 (0: off), got {raw_grace!r}")
            grace = grace or None
        raw_tokens = env.get("RESCUE_TELEMETRY_MIN_TOKENS", "").strip()
        try:
            min_tokens = int(raw_tokens) if raw_tokens else DEFAULT_TELEMETRY_MIN_TOKENS
        except ValueError:
            raise ConfigError(f"RESCUE_TELEMETRY_MIN_TOKENS must be an integer, got {raw_tokens!r}") from None
        return cls(
            environment=environment,
            env_paused=_env_flag(env, "FALLBACK_WS_PAUSED"),
            dev_enable_all_cohorts=_env_flag(env, "BEACH_DEV_ENABLE_FALLBACK_WS")
            and environment.lower() != "production",
            soft_ratio=soft,
            min_sample=min_sample,
            hard_ratio=_env_float(env, "RESCUE_HARD_BREACH_RATIO", None),
            telemetry_grace_s=grace,
            telemetry_min_tokens=min_tokens,
            telemetry_unreported_cohorts=_cohort_set(
                env.get("RESCUE_TELEMETRY_UNREPORTED_COHORTS"), DEFAULT_UNREPORTED_COHORTS
            ),
        )


def _cohort_set(raw: str | None, default: frozenset[str]) -> frozenset[str]:
    """A comma-separated cohort list (unset: ``default``; empty: none).

    Raises:
        ConfigError: an entry is not a valid cohort id.
    """
    if raw is None:
        return default
    cohorts = frozenset(c.strip() for c in raw.split(",") if c.strip())
    for cohort in cohorts:
        try:
            check_cohort_id(cohort)
        except ValueError:
            raise ConfigError(f"not a cohort id in RESCUE_TELEMETRY_UNREPORTED_COHORTS: {cohort!r}") from None
    return cohorts


def _telemetry_silence(first: float | None, *, now: float, resumed_at: float | None) -> float | None:
    """Seconds an input has been silent: since its first unreported token, or since the last
    resume when that is later (see :func:`missing_telemetry`); None when nothing is unreported."""
    if first is None:
        return None
    return now - (first if resumed_at is None else max(first, resumed_at))


def missing_telemetry(
    gap: TelemetryGap,
    *,
    now: float,
    grace_s: float | None,
    min_tokens: int,
    resumed_at: float | None = None,
) -> MissingInput | None:
    """Which guardrail input has gone missing, if any (decision 0012; pure).

    An input is missing when at least ``min_tokens`` tokens were minted fleet-wide since it was last
    reported, the first of them ``grace_s`` or more seconds ago. Activation reports (the ratio's
    numerator, from relays) are checked before sessions-started reports (its denominator, from
    Beach's control plane): without either, the ratio cannot breach, so the guardrail is blind.

    ``resumed_at`` (wall clock of the kill switch's last change while it is off) starts a fresh
    grace period: an activation report only follows a pairing, which needs tokens, so after an
    operator's resume the silence must be counted from the resume, or the first token after it
    would trip the pause again before any report could arrive.
    """
    if grace_s is None:
        return None
    activation_silence = _telemetry_silence(gap.since_activation, now=now, resumed_at=resumed_at)
    if (
        activation_silence is not None
        and gap.tokens_since_activation >= min_tokens
        and activation_silence >= grace_s
    ):
        return "activations"
    sessions_silence = _telemetry_silence(gap.since_sessions, now=now, resumed_at=resumed_at)
    if (
        sessions_silence is not None
        and gap.tokens_since_sessions >= min_tokens
        and sessions_silence >= grace_s
    ):
        return "sessions"
    return None


@dataclass(frozen=True, slots=True)
class GuardrailWindow:
    """A cohort's rolling-hour view (``GET /v1/admin/guardrails``)."""

    cohort_id: str
    counts: WindowCounts
    state: WindowState

    def to_json(self) -> dict[str, object]:
        ratio = self.counts.ratio
        return {
            "cohort": self.cohort_id,
            "sessions": round(self.counts.sessions, 3),
            "tokens": round(self.counts.tokens, 3),
            "activations": round(self.counts.activations, 3),
            "ratio": round(ratio, 6) if ratio is not None else None,
            "state": self.state,
            "previous_hour_weight": round(self.counts.previous_weight, 4),
        }


@dataclass(frozen=True, slots=True)
class Authorization:
    """The guardrails allow a token; ``hint`` goes into the answer as ``guardrail_hint``."""

    hint: Literal["ok", "soft_breach"]
    window: GuardrailWindow


class Guardrails:
    """The guardrail policy on top of a :class:`~rescue.guardrails.GuardrailStore`.

    Args:
        store: shared state (Redis in a fleet, memory in ``rescue dev``).
        config: thresholds and environment switches.
        wall_clock: wall-clock seconds, for ``since`` stamps (injectable for tests).
        on_move: called with ``"gone"`` or ``"draining"`` each time a session's assignment is moved
            off a node (the token service counts it as a metric).

    Error handling:
        :class:`~rescue.errors.StoreUnavailable` propagates from every store read: callers fail
        closed (503). :class:`~rescue.errors.GuardrailError` carries the SPEC §4 error code.
    """

    def __init__(
        self,
        store: GuardrailStore,
        config: GuardrailConfig | None = None,
        *,
        wall_clock: Callable[[], float] = time.time,
        on_move: Callable[[str], None] | None = None,
    ) -> None:
        self.store = store
        self.config = config or GuardrailConfig()
        self._wall_clock = wall_clock
        self.on_move = on_move
        self._last_breach_log: dict[str, float] = {}

    # --- kill switch -------------------------------------------------------------------------

    async def fleet_state(self) -> FleetState:
        """The effective kill switch: ``FALLBACK_WS_PAUSED=1`` in this process, or the store's flag.

        Raises:
            StoreUnavailable: the store can't be read (unless the env switch already pauses).
        """
        if self.config.env_paused:
            return FleetState(paused=True, reason="FALLBACK_WS_PAUSED is set on this process", cause="env")
        return effective_fleet_state(await self.store.fleet_state())

    async def initialise_store(self, *, reason: str | None = None) -> FleetState:
        """Mark the store initialised (an operator's confirmation that its state, the kill switch
        and the cohort flags, is what it should be); returns the effective kill switch after."""
        await self.store.initialise(now=self._wall_clock())
        log_event(_LOG, "guardrail_store_initialised", level=logging.WARNING, reason=reason)
        return await self.fleet_state()

    async def pause(
        self, *, reason: str | None = None, drain: bool = False, cause: str = "operator"
    ) -> FleetState:
        """Set the fleet-wide kill switch (stored, so every replica and relay sees it).

        ``cause`` says who paused (``FleetState.cause``): ``operator`` for the admin API, the
        guardrails' own ``hard_breach`` and ``telemetry_missing``.
        """
        state = FleetState(paused=True, reason=reason, since=self._wall_clock(), drain=drain, cause=cause)
        await self.store.set_fleet_state(state)
        log_event(_LOG, "guardrail_paused", level=logging.WARNING, reason=reason, drain=drain, cause=cause)
        return state

    async def resume(self, *, reason: str | None = None) -> FleetState:
        """Clear the fleet-wide kill switch (the env switch of a process still applies)."""
        state = FleetState(paused=False, reason=reason, since=self._wall_clock(), drain=False)
        await self.store.set_fleet_state(state)
        log_event(_LOG, "guardrail_resumed", reason=reason)
        return state

    # --- cohorts -----------------------------------------------------------------------------

    async def cohort_enabled(self, cohort_id: str) -> bool:
        """``fallback_ws_enabled`` for the cohort, or True under the dev override."""
        check_cohort_id(cohort_id)
        if self.config.dev_enable_all_cohorts:
            return True
        return await self.store.cohort_enabled(cohort_id)

    async def set_cohort_enabled(self, cohort_id: str, enabled: bool) -> None:
        await self.store.set_cohort_enabled(cohort_id, enabled)
        log_event(_LOG, "guardrail_cohort_changed", cohort=cohort_id, fallback_ws_enabled=enabled)

    # --- counters and the rolling window -----------------------------------------------------

    async def window(self, cohort_id: str, *, now: float) -> GuardrailWindow:
        """The cohort's rolling-hour counts and their state (see ``rolling_window``)."""
        buckets = [hour_bucket(now), hour_bucket(now - SECONDS_PER_HOUR)]
        current, previous = await self.store.hour_counts(cohort_id, buckets)
        counts = rolling_window(current, previous, now)
        return GuardrailWindow(cohort_id, counts, self.judge(counts))

    def judge(self, counts: WindowCounts) -> WindowState:
        """Classify a window: below the minimum sample nothing is judged."""
        ratio = counts.ratio
        if ratio is None or counts.sessions < self.config.min_sample:
            return "insufficient_sample"
        if self.config.hard_ratio is not None and ratio >= self.config.hard_ratio:
            return "hard_breach"
        if ratio >= self.config.soft_ratio:
            return "soft_breach"
        return "ok"

    async def record_tokens(self, cohort_id: str, *, now: float, count: int = 1) -> None:
        await self.store.increment(cohort_id, CounterField.TOKENS, now=now, amount=count)

    async def record_activation(self, cohort_id: str, *, now: float, count: int = 1) -> None:
        await self.store.increment(cohort_id, CounterField.ACTIVATIONS, now=now, amount=count)

    async def record_sessions_started(self, cohort_id: str, *, now: float, count: int = 1) -> None:
        await self.store.increment(cohort_id, CounterField.SESSIONS, now=now, amount=count)

    # --- the token decision --------------------------------------------------------------------

    async def authorize_token(self, cohort_id: str, *, now: float) -> Authorization:
        """Decide whether a token may be minted for ``cohort_id`` now.

        Order: kill switch, cohort flag, rolling-window ratio (soft breach → hint; hard breach with
        auto-pause configured → the fleet is paused and this request refused).

        Raises:
            GuardrailError: ``fallback_paused`` or ``cohort_disabled``.
            StoreUnavailable: the store can't be read (fail closed).
            ValueError: ``cohort_id`` is malformed.
        """
        check_cohort_id(cohort_id)
        _check_switches(await self.fleet_state(), cohort_id, enabled=None)
        _check_switches(FleetState(), cohort_id, enabled=await self.cohort_enabled(cohort_id))
        return await self._judge_window(await self.window(cohort_id, now=now), now)

    async def decide(
        self, cohort_id: str, session_id: str, *, now: float, ttl: float, require_node: bool
    ) -> tuple[Authorization, NodeInfo | None]:
        """The whole token decision in two store round trips (decision 0010).

        The same checks, in the same order, as :meth:`authorize_token`, then :meth:`assign_node`,
        then :meth:`record_tokens`: one :meth:`~GuardrailStore.mint_snapshot` reads everything,
        one :meth:`~GuardrailStore.record_mint` counts the token and records the assignment. A
        move off a gone or draining node costs one more (rare), and so does a request while every
        node is full or draining (reading whether the session is already on a full node).

        Args:
            require_node: without registered nodes, refuse (``no_relay_available``) instead of
                returning None (the caller has no relay URL of its own).

        Raises:
            GuardrailError: ``fallback_paused``, ``cohort_disabled`` or ``no_relay_available``.
            StoreUnavailable: the store can't be read or written (fail closed).
            ValueError: ``cohort_id`` is malformed.
        """
        check_cohort_id(cohort_id)
        if self.config.env_paused:
            raise GuardrailError("fallback_paused", "WebSocket fallback is paused fleet-wide")
        snap = await self.store.mint_snapshot(cohort_id, now=now)
        enabled = snap.cohort_enabled or self.config.dev_enable_all_cohorts
        _check_switches(effective_fleet_state(snap.fleet), cohort_id, enabled=enabled)
        await self._check_telemetry(snap.telemetry, now, resumed_at=snap.fleet.since)
        counts = rolling_window(snap.current, snap.previous, now)
        auth = await self._judge_window(GuardrailWindow(cohort_id, counts, self.judge(counts)), now)
        nodes = list(snap.nodes)
        if not nodes:
            if require_node:
                raise GuardrailError("no_relay_available", "no relay node is registered", reason="none")
            await self.store.record_mint(
                cohort_id,
                now=now,
                session_id=session_id,
                node_id=None,
                ttl=ttl,
                telemetry_ttl=self._gap_ttl,
                sessions_reported=cohort_id not in self.config.telemetry_unreported_cohorts,
            )
            return auth, None
        holders, choice = _candidates(session_id, nodes)
        node_id = choice.node_id if choice is not None else await self._own_full_node(session_id, holders)
        current = await self.store.record_mint(
            cohort_id,
            now=now,
            session_id=session_id,
            node_id=node_id,
            ttl=ttl,
            telemetry_ttl=self._gap_ttl,
            sessions_reported=cohort_id not in self.config.telemetry_unreported_cohorts,
        )
        assert current is not None
        return auth, await self._settle(session_id, current, nodes, holders, choice, ttl=ttl)

    @property
    def _gap_ttl(self) -> float:
        """How long the telemetry gap outlives the last token: twice the grace period (an hour when
        off). Tokens further apart than that are no steady use that reports should have followed."""
        grace = self.config.telemetry_grace_s
        return 2 * grace if grace is not None else float(SECONDS_PER_HOUR)

    async def _check_telemetry(self, gap: TelemetryGap, now: float, *, resumed_at: float | None) -> None:
        """Pause the fleet when a guardrail input went missing (decision 0012); ``resumed_at`` is
        the kill switch's last change (it is off here), from which a fresh grace period runs.

        Raises:
            GuardrailError: ``fallback_paused`` after pausing.
        """
        missing = missing_telemetry(
            gap,
            now=now,
            grace_s=self.config.telemetry_grace_s,
            min_tokens=self.config.telemetry_min_tokens,
            resumed_at=resumed_at,
        )
        if missing is None:
            return
        tokens, first = (
            (gap.tokens_since_activation, gap.since_activation)
            if missing == "activations"
            else (gap.tokens_since_sessions, gap.since_sessions)
        )
        silent_s = _telemetry_silence(first, now=now, resumed_at=resumed_at) or 0.0
        report = "activation" if missing == "activations" else "sessions-started"
        reason = (
            f"auto-pause: telemetry missing: {tokens} tokens minted over {silent_s:.0f} s"
            f" without one {report} report"
        )
        await self.pause(reason=reason, cause="telemetry_missing")
        log_event(
            _LOG,
            "guardrail_telemetry_missing",
            level=logging.ERROR,
            missing=missing,
            tokens=tokens,
            silent_s=round(silent_s, 1),
            grace_s=self.config.telemetry_grace_s,
        )
        raise GuardrailError(
            "fallback_paused", "WebSocket fallback was auto-paused: guardrail telemetry is missing"
        )

    async def _judge_window(self, window: GuardrailWindow, now: float) -> Authorization:
        """The rolling-window part of the decision: auto-pause on a hard breach, hint on a soft one."""
        cohort_id = window.cohort_id
        if window.state == "hard_breach":
            ratio = window.counts.ratio or 0.0
            reason = (
                f"auto-pause: cohort {cohort_id} activation ratio {ratio:.4f} >= {self.config.hard_ratio}"
            )
            await self.pause(reason=reason, cause="hard_breach")
            log_event(
                _LOG,
                "guardrail_auto_pause",
                level=logging.ERROR,
                cohort=cohort_id,
                ratio=round(ratio, 6),
                sessions=round(window.counts.sessions, 1),
            )
            raise GuardrailError("fallback_paused", "WebSocket fallback was auto-paused by the guardrails")
        if window.state == "soft_breach":
            self._log_soft_breach(window, now)
            return Authorization("soft_breach", window)
        return Authorization("ok", window)

    def _log_soft_breach(self, window: GuardrailWindow, now: float) -> None:
        last = self._last_breach_log.get(window.cohort_id)
        if last is not None and 0 <= now - last < SOFT_BREACH_LOG_INTERVAL_S:
            return
        if len(self._last_breach_log) >= MAX_TRACKED_BREACHES:
            self._last_breach_log.clear()
        self._last_breach_log[window.cohort_id] = now
        log_event(
            _LOG,
            "guardrail_soft_breach",
            level=logging.WARNING,
            cohort=window.cohort_id,
            ratio=round(window.counts.ratio or 0.0, 6),
            sessions=round(window.counts.sessions, 1),
            activations=round(window.counts.activations, 1),
            threshold=self.config.soft_ratio,
        )

    # --- nodes ---------------------------------------------------------------------------------

    async def assign_node(self, session_id: str, *, ttl: float) -> NodeInfo | None:
        """The relay node for ``session_id``: its live assignment, else rendezvous hashing.

        An assignment in force is honoured whatever the node set has become since (scale-out or
        scale-in never moves a session), because the node holding the session live keeps it alive
        (``keep_assignments``, docs/decisions/0008-session-affinity.md), and also while that node
        is full (its own peers coming back are what it holds their places for). A new one is the
        rendezvous pick over live nodes that are neither draining nor full, recorded with SET NX
        for ``ttl`` seconds so both peers land on the same node even when they ask at once. Only
        an assignment to a node that is gone or draining is moved (compare-and-set, so racing
        requests agree); each move is logged (``assignment_moved``) and reported to ``on_move``.

        Returns:
            The node, or None when no node is registered at all (single-node / no registry: the
            caller uses ``aud="*"`` and its configured relay URL).

        Raises:
            GuardrailError: ``no_relay_available`` when nodes are registered but none can take the
                session: all draining, or all draining or full and the session is not assigned to
                one of the full ones (``reason`` says which).
            StoreUnavailable: the store can't be read.
        """
        nodes = await self.store.live_nodes()
        if not nodes:
            return None
        holders, choice = _candidates(session_id, nodes)
        node_id = choice.node_id if choice is not None else await self._own_full_node(session_id, holders)
        current = await self.store.assign_session(session_id, node_id, ttl=ttl)
        return await self._settle(session_id, current, nodes, holders, choice, ttl=ttl)

    async def _own_full_node(self, session_id: str, holders: dict[str, NodeInfo]) -> str:
        """Every live node is draining or full: the full node the session is already assigned to
        (one more store read, only in this case), for its peers coming back.

        Between this read and the SET NX that follows, the assignment may expire: the session is
        then assigned to that full node anew, which is where it just was.

        Raises:
            GuardrailError: ``no_relay_available`` (``reason="full"``): a new session.
        """
        held = await self.store.session_node(session_id)
        if held is None or held not in holders:
            raise GuardrailError("no_relay_available", "every relay node is full or draining", reason="full")
        return held

    async def _settle(
        self,
        session_id: str,
        current: str,
        nodes: list[NodeInfo],
        holders: dict[str, NodeInfo],
        choice: NodeInfo | None,
        *,
        ttl: float,
    ) -> NodeInfo:
        """The assignment in force is ``current``: keep it (full or not), or move it off a
        gone/draining node to ``choice``."""
        if current in holders:
            return holders[current]
        if choice is None:  # it left or began draining since we read it, and nothing else has room
            raise GuardrailError("no_relay_available", "every relay node is full or draining", reason="full")
        reason = "draining" if any(n.node_id == current for n in nodes) else "gone"
        moved_from = current
        current, moved = await self.store.reassign_session(
            session_id, expected=current, node_id=choice.node_id, ttl=ttl
        )
        if moved:  # of racing requests, only the one that wrote records the move
            log_event(_LOG, "assignment_moved", from_node=moved_from, to_node=current, reason=reason)
            if self.on_move is not None:
                self.on_move(reason)
        return holders.get(current, choice)


def _candidates(session_id: str, nodes: list[NodeInfo]) -> tuple[dict[str, NodeInfo], NodeInfo | None]:
    """The nodes that may hold a session (live, not draining; full ones too) by id, and the
    rendezvous pick among those that may take a new one (not full either): None when all are full.

    Raises:
        GuardrailError: ``no_relay_available`` (``reason="draining"``) when every node is draining.
    """
    holders = {n.node_id: n for n in nodes if not n.draining}
    if not holders:
        raise GuardrailError("no_relay_available", "every relay node is draining", reason="draining")
    return holders, rendezvous_pick(session_id, (n for n in holders.values() if n.accepting))


def effective_fleet_state(stored: FleetState) -> FleetState:
    """The kill switch a stored state means: as stored, except that a store which is not
    initialised reads as paused (it may have lost a pause), with :data:`STORE_UNINITIALISED_REASON`.
    Existing sessions are not drained: their relays keep them, as during a store outage."""
    if stored.initialised:
        return stored
    return FleetState(
        paused=True, reason=STORE_UNINITIALISED_REASON, cause="store_uninitialised", initialised=False
    )


def _check_switches(fleet: FleetState, cohort_id: str, *, enabled: bool | None) -> None:
    """The kill switch, then the cohort flag (``None``: not read yet).

    Raises:
        GuardrailError: ``fallback_paused`` or ``cohort_disabled``.
    """
    if fleet.paused:
        raise GuardrailError("fallback_paused", "WebSocket fallback is paused fleet-wide")
    if enabled is False:
        raise GuardrailError("cohort_disabled", f"WebSocket fallback is not enabled for cohort {cohort_id}")
