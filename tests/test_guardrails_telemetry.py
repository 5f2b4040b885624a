"""Missing telemetry pauses minting (decision 0012): the pure rule, and the policy on a MockClock.

The guardrail ratio needs two inputs: activation reports from relays and sessions-started reports
from Beach's control plane. When tokens keep being minted for the grace period without one report
of either kind, the guardrail is blind, and minting pauses with cause ``telemetry_missing``.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ConfigError, GuardrailError
from rescue.guardrails import (
    FleetState,
    GuardrailConfig,
    Guardrails,
    MemoryStore,
    TelemetryGap,
    missing_telemetry,
)

T0 = 1_700_000_000.0
GRACE = 60.0
MIN_TOKENS = 10


# --- the pure rule ---------------------------------------------------------------------------------


def test_rule_needs_enough_tokens_and_the_whole_grace_period() -> None:
    def rule(gap: TelemetryGap, now: float) -> str | None:
        return missing_telemetry(gap, now=now, grace_s=GRACE, min_tokens=MIN_TOKENS)

    both = TelemetryGap(MIN_TOKENS, T0, MIN_TOKENS, T0)
    assert rule(both, T0 + GRACE - 0.001) is None  # not yet the whole grace period
    assert rule(both, T0 + GRACE) == "activations"  # numerator checked first
    assert rule(TelemetryGap(MIN_TOKENS - 1, T0, MIN_TOKENS - 1, T0), T0 + 10 * GRACE) is None
    assert rule(TelemetryGap(0, None, MIN_TOKENS, T0), T0 + GRACE) == "sessions"
    assert rule(TelemetryGap(MIN_TOKENS, T0, 0, None), T0 + GRACE) == "activations"
    assert missing_telemetry(both, now=T0 + 1e9, grace_s=None, min_tokens=1) is None  # off
    # a resume starts a fresh grace period for both inputs
    resumed = T0 + 5 * GRACE
    assert (
        missing_telemetry(
            both, now=resumed + GRACE - 1, grace_s=GRACE, min_tokens=MIN_TOKENS, resumed_at=resumed
        )
        is None
    )
    assert (
        missing_telemetry(both, now=resumed + GRACE, grace_s=GRACE, min_tokens=MIN_TOKENS, resumed_at=resumed)
        == "activations"
    )
    assert (
        missing_telemetry(both, now=T0 + GRACE, grace_s=GRACE, min_tokens=MIN_TOKENS, resumed_at=T0 - 1)
        == "activations"
    )


@given(
    tokens=st.integers(0, 1000),
    first=st.floats(0, 1e10, allow_nan=False),
    elapsed=st.floats(-1e6, 1e6, allow_nan=False),
    grace=st.floats(0.001, 1e5, allow_nan=False),
    min_tokens=st.integers(1, 500),
)
def test_rule_fires_exactly_on_both_conditions(
    tokens: int, first: float, elapsed: float, grace: float, min_tokens: int
) -> None:
    gap = TelemetryGap(tokens, first, 0, None)
    verdict = missing_telemetry(gap, now=first + elapsed, grace_s=grace, min_tokens=min_tokens)
    expected = tokens >= min_tokens and (first + elapsed) - first >= grace
    assert (verdict == "activations") is expected


def test_gap_parses_what_redis_holds() -> None:
    assert TelemetryGap.from_mapping({}) == TelemetryGap()
    raw = {"act_tokens": "7", "act_first": "1700000000.5", "ses_tokens": "x", "ses_first": ""}
    assert TelemetryGap.from_mapping(raw) == TelemetryGap(7, 1_700_000_000.5, 0, None)


# --- config ------------------------------------------------------------------------------------------


def test_config_on_in_production_off_elsewhere_unless_set() -> None:
    assert GuardrailConfig.from_env({}).telemetry_grace_s is None
    prod = GuardrailConfig.from_env({"RESCUE_ENV": "production"})
    assert (prod.telemetry_grace_s, prod.telemetry_min_tokens) == (600.0, 50)
    assert (
        GuardrailConfig.from_env(
            {"RESCUE_ENV": "production", "RESCUE_TELEMETRY_GRACE_S": "0"}
        ).telemetry_grace_s
        is None
    )
    dev = GuardrailConfig.from_env({"RESCUE_TELEMETRY_GRACE_S": "2.5", "RESCUE_TELEMETRY_MIN_TOKENS": "4"})
    assert (dev.telemetry_grace_s, dev.telemetry_min_tokens) == (2.5, 4)


@pytest.mark.parametrize(
    "env",
    [
        {"RESCUE_TELEMETRY_GRACE_S": "soon"},
        {"RESCUE_TELEMETRY_GRACE_S": "-1"},
        {"RESCUE_TELEMETRY_GRACE_S": "nan"},
        {"RESCUE_TELEMETRY_MIN_TOKENS": "many"},
        {"RESCUE_TELEMETRY_MIN_TOKENS": "0"},
    ],
)
def test_bad_telemetry_config_is_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        GuardrailConfig.from_env(env)


# --- the policy, on a MockClock ------------------------------------------------------------------


def _guardrails(store: MemoryStore) -> Guardrails:
    config = GuardrailConfig(telemetry_grace_s=GRACE, telemetry_min_tokens=MIN_TOKENS)
    return Guardrails(store, config, wall_clock=lambda: T0 + trio.current_time())


async def _mint(g: Guardrails, n: int, *, every: float) -> None:
    """Mint ``n`` tokens, one per ``every`` seconds of (mock) time."""
    for i in range(n):
        await g.decide("beta", f"s{i}", now=T0 + trio.current_time(), ttl=300, require_node=False)
        await trio.sleep(every)


async def test_tokens_without_activation_reports_pause_minting(
    autojump_clock: trio.testing.MockClock, events: list[logging.LogRecord]
) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = _guardrails(store)
    await g.record_sessions_started("beta", now=T0)
    # sessions keep being reported, activations never: tokens for a whole grace period
    for _ in range(2):
        await _mint(g, MIN_TOKENS, every=GRACE / MIN_TOKENS / 2)
        await g.record_sessions_started("beta", now=T0 + trio.current_time())
    assert not (await g.fleet_state()).paused
    await trio.sleep(1)
    with pytest.raises(GuardrailError) as info:
        await g.decide("beta", "late", now=T0 + trio.current_time(), ttl=300, require_node=False)
    assert info.value.error == "fallback_paused"
    state = await g.fleet_state()
    assert (state.paused, state.cause, state.drain) == (True, "telemetry_missing", False)
    assert state.reason is not None
    assert "activation report" in state.reason
    missing = [r for r in events if getattr(r, "event", "") == "guardrail_telemetry_missing"]
    assert len(missing) == 1
    assert missing[0].levelno == logging.ERROR
    assert getattr(missing[0], "missing", None) == "activations"
    # the operator resumes after looking: a fresh grace period starts there (reports follow
    # pairings, which need tokens: the first token after the resume must not trip it again) ...
    await g.resume(reason="relays fixed")
    await g.decide("beta", "after", now=T0 + trio.current_time(), ttl=300, require_node=False)
    await trio.sleep(GRACE - 1)
    await g.decide("beta", "still", now=T0 + trio.current_time(), ttl=300, require_node=False)
    assert not (await g.fleet_state()).paused
    # ... but the gap itself closes only with a report: a whole grace period past the resume
    # without one trips it again
    await trio.sleep(1)
    with pytest.raises(GuardrailError):
        await g.decide("beta", "again", now=T0 + trio.current_time(), ttl=300, require_node=False)
    assert (await g.fleet_state()).cause == "telemetry_missing"
    # a report lets minting go on after the next resume, past any grace period
    await g.resume(reason="relays really fixed")
    await g.record_activation("beta", now=T0 + trio.current_time())
    await trio.sleep(2 * GRACE)
    await g.record_sessions_started("beta", now=T0 + trio.current_time())
    await g.decide("beta", "after-report", now=T0 + trio.current_time(), ttl=300, require_node=False)
    assert not (await g.fleet_state()).paused


async def test_reports_keep_minting_going(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = _guardrails(store)
    # ten grace periods of steady minting; each kind of report arrives once per half grace period
    for _ in range(20):
        await _mint(g, MIN_TOKENS, every=GRACE / MIN_TOKENS / 2)
        now = T0 + trio.current_time()
        await g.record_activation("beta", now=now)
        await g.record_sessions_started("beta", now=now)
    assert (await g.fleet_state()) == FleetState()


async def test_missing_sessions_reports_pause_too(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = _guardrails(store)
    for _ in range(2):
        await _mint(g, MIN_TOKENS, every=GRACE / MIN_TOKENS / 2)
        await g.record_activation("beta", now=T0 + trio.current_time())
    with pytest.raises(GuardrailError):
        await _mint(g, 1, every=0)
    state = await g.fleet_state()
    assert (state.paused, state.cause) == (True, "telemetry_missing")
    assert state.reason is not None
    assert "sessions-started report" in state.reason


async def test_an_idle_spell_forgets_the_gap(autojump_clock: trio.testing.MockClock) -> None:
    # A few stray tokens, then nothing for longer than the grace period, then a burst: the burst's
    # tokens precede their activation reports by seconds, which must not read as missing telemetry.
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = _guardrails(store)
    await _mint(g, 3, every=1)
    await trio.sleep(2 * GRACE + 1)
    assert await store.telemetry_gap() == TelemetryGap()
    await _mint(g, 2 * MIN_TOKENS, every=0.1)
    assert not (await g.fleet_state()).paused


async def test_off_by_default_outside_production(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store, GuardrailConfig.from_env({}), wall_clock=lambda: T0 + trio.current_time())
    await _mint(g, 200, every=60)  # 200 minutes of tokens, no report at all
    assert not (await g.fleet_state()).paused


async def test_operator_and_hard_breach_pauses_say_their_cause() -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store, GuardrailConfig(hard_ratio=0.01, min_sample=10))
    assert (await g.pause(reason="INC-1")).cause == "operator"
    assert (await g.resume()).cause is None
    await g.record_sessions_started("beta", now=T0, count=10)
    await g.record_activation("beta", now=T0)
    with pytest.raises(GuardrailError):
        await g.decide("beta", "s", now=T0, ttl=300, require_node=False)
    assert (await g.fleet_state()).cause == "hard_breach"
    env = Guardrails(store, GuardrailConfig(env_paused=True))
    assert (await env.fleet_state()).cause == "env"


def test_unreported_cohorts_from_env() -> None:
    assert GuardrailConfig.from_env({}).telemetry_unreported_cohorts == frozenset({"probe"})
    env = {"RESCUE_TELEMETRY_UNREPORTED_COHORTS": " synthetic, canary "}
    assert GuardrailConfig.from_env(env).telemetry_unreported_cohorts == frozenset({"synthetic", "canary"})
    assert (
        GuardrailConfig.from_env({"RESCUE_TELEMETRY_UNREPORTED_COHORTS": ""}).telemetry_unreported_cohorts
        == frozenset()
    )
    with pytest.raises(ConfigError):
        GuardrailConfig.from_env({"RESCUE_TELEMETRY_UNREPORTED_COHORTS": "a:b"})


async def test_the_probe_alone_overnight_does_not_pause(autojump_clock: trio.testing.MockClock) -> None:
    # No Beach session at all for hours, only the synthetic probe pairing once a minute: its
    # sessions are never reported started, and its activations arrive. Not missing telemetry.
    store = MemoryStore()
    await store.set_cohort_enabled("probe", True)
    g = _guardrails(store)
    for i in range(3 * 60):
        now = T0 + trio.current_time()
        for role in ("host", "guest"):
            await g.decide("probe", f"p{i}-{role}", now=now, ttl=300, require_node=False)
        await g.record_activation("probe", now=now + 1)
        await trio.sleep(GRACE / 4)
    assert not (await g.fleet_state()).paused
    # ...but when the probe's activation reports stop, that is missing telemetry
    with pytest.raises(GuardrailError):
        await _mint_probe(g, 2 * MIN_TOKENS, every=GRACE / MIN_TOKENS)
    assert (await g.fleet_state()).cause == "telemetry_missing"


async def _mint_probe(g: Guardrails, n: int, *, every: float) -> None:
    for i in range(n):
        await g.decide("probe", f"q{i}", now=T0 + trio.current_time(), ttl=300, require_node=False)
        await trio.sleep(every)
