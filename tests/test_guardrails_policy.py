"""Guardrail policy and pure maths: kill switch, cohorts, soft/hard breach, window, HRW."""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ConfigError, GuardrailError, StoreUnavailable
from rescue.guardrails import (
    FleetState,
    GuardrailConfig,
    Guardrails,
    HourCounts,
    MemoryStore,
    NodeInfo,
    counter_key,
    hour_bucket,
    rendezvous_pick,
    rolling_window,
)

HOUR = 3600.0
T0 = 1_699_999_200.0  # 2023-11-14 22:00:00 UTC, an hour boundary
assert T0 % HOUR == 0


def names(records: list[logging.LogRecord]) -> list[str]:
    return [getattr(r, "event", "") for r in records]


# --- config ------------------------------------------------------------------------------------


def test_config_from_env() -> None:
    c = GuardrailConfig.from_env({})
    assert (c.environment, c.env_paused, c.dev_enable_all_cohorts) == ("development", False, False)
    assert (c.soft_ratio, c.min_sample, c.hard_ratio) == (0.005, 200, None)
    c = GuardrailConfig.from_env(
        {
            "FALLBACK_WS_PAUSED": "1",
            "BEACH_DEV_ENABLE_FALLBACK_WS": "1",
            "RESCUE_SOFT_BREACH_RATIO": "0.01",
            "RESCUE_GUARDRAIL_MIN_SAMPLE": "50",
            "RESCUE_HARD_BREACH_RATIO": "0.05",
        }
    )
    assert (c.env_paused, c.dev_enable_all_cohorts, c.soft_ratio, c.min_sample, c.hard_ratio) == (
        True,
        True,
        0.01,
        50,
        0.05,
    )


def test_dev_override_never_in_production() -> None:
    env = {"BEACH_DEV_ENABLE_FALLBACK_WS": "1", "RESCUE_ENV": "production"}
    assert GuardrailConfig.from_env(env).dev_enable_all_cohorts is False
    assert (
        GuardrailConfig(environment="Production", dev_enable_all_cohorts=True).dev_enable_all_cohorts is False
    )


@pytest.mark.parametrize(
    "env",
    [
        {"RESCUE_SOFT_BREACH_RATIO": "lots"},
        {"RESCUE_SOFT_BREACH_RATIO": "0"},
        {"RESCUE_HARD_BREACH_RATIO": "2"},
        {"RESCUE_GUARDRAIL_MIN_SAMPLE": "1.5"},
        {"RESCUE_GUARDRAIL_MIN_SAMPLE": "0"},
        {"RESCUE_SOFT_BREACH_RATIO": "0.1", "RESCUE_HARD_BREACH_RATIO": "0.05"},
    ],
)
def test_bad_config_is_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        GuardrailConfig.from_env(env)


# --- kill switch and cohorts ---------------------------------------------------------------------


async def test_kill_switch_from_store_and_env() -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store, wall_clock=lambda: 1234.5)
    assert (await g.authorize_token("beta", now=T0)).hint == "ok"
    state = await g.pause(reason="incident", drain=True)
    assert state == FleetState(True, "incident", 1234.5, True, cause="operator")
    with pytest.raises(GuardrailError) as info:
        await g.authorize_token("beta", now=T0)
    assert info.value.error == "fallback_paused"
    await g.resume()
    assert (await g.authorize_token("beta", now=T0)).hint == "ok"

    env_paused = Guardrails(store, GuardrailConfig(env_paused=True))
    with pytest.raises(GuardrailError) as info:
        await env_paused.authorize_token("beta", now=T0)
    assert info.value.error == "fallback_paused"


async def test_fail_closed_when_store_unavailable() -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store)
    store.available = False
    with pytest.raises(StoreUnavailable):
        await g.authorize_token("beta", now=T0)
    with pytest.raises(StoreUnavailable):
        await g.fleet_state()


async def test_cohort_disabled_by_default_and_dev_override() -> None:
    store = MemoryStore()
    with pytest.raises(GuardrailError) as info:
        await Guardrails(store).authorize_token("new-cohort", now=T0)
    assert info.value.error == "cohort_disabled"
    dev = Guardrails(store, GuardrailConfig(dev_enable_all_cohorts=True))
    assert (await dev.authorize_token("new-cohort", now=T0)).hint == "ok"
    prod = Guardrails(store, GuardrailConfig(environment="production", dev_enable_all_cohorts=True))
    with pytest.raises(GuardrailError):
        await prod.authorize_token("new-cohort", now=T0)
    with pytest.raises(ValueError):
        await dev.authorize_token("bad:cohort", now=T0)


# --- soft / hard breach ----------------------------------------------------------------------------


async def test_soft_breach_at_half_a_percent_with_min_sample(events: list[logging.LogRecord]) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store)
    now = T0 + 60
    await g.record_sessions_started("beta", now=now, count=199)
    await g.record_activation("beta", now=now)  # 1/199 > 0.5 % but under the minimum sample
    auth = await g.authorize_token("beta", now=now)
    assert auth.hint == "ok"
    assert auth.window.state == "insufficient_sample"
    await g.record_sessions_started("beta", now=now)  # 1/200 = 0.5 %: exactly at the threshold
    auth = await g.authorize_token("beta", now=now)
    assert auth.hint == "soft_breach"
    assert auth.window.to_json()["ratio"] == 0.005
    # the event is logged once per cohort per minute, not once per token
    await g.authorize_token("beta", now=now + 30)
    await g.authorize_token("beta", now=now + 61)
    breaches = [r for r in events if getattr(r, "event", "") == "guardrail_soft_breach"]
    assert len(breaches) == 2
    assert breaches[0].__dict__["cohort"] == "beta"
    # below the threshold again
    await g.record_sessions_started("beta", now=now, count=200)
    assert (await g.authorize_token("beta", now=now)).hint == "ok"


async def test_hard_breach_auto_pauses(events: list[logging.LogRecord]) -> None:
    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    g = Guardrails(store, GuardrailConfig(hard_ratio=0.01, min_sample=100))
    await g.record_sessions_started("beta", now=T0, count=100)
    await g.record_activation("beta", now=T0)  # 1 %
    with pytest.raises(GuardrailError) as info:
        await g.authorize_token("beta", now=T0)
    assert info.value.error == "fallback_paused"
    state = await store.fleet_state()
    assert state.paused
    assert state.reason is not None
    assert "auto-pause" in state.reason
    assert "guardrail_auto_pause" in names(events)
    # other cohorts are paused too: the kill switch is fleet-wide
    await store.set_cohort_enabled("gamma", True)
    with pytest.raises(GuardrailError):
        await g.authorize_token("gamma", now=T0)


async def test_window_uses_previous_hour_with_fading_weight() -> None:
    store = MemoryStore()
    g = Guardrails(store, GuardrailConfig(min_sample=1))
    await g.record_sessions_started("beta", now=T0 - 10, count=1000)  # previous hour
    await g.record_activation("beta", now=T0 - 10, count=10)
    await g.record_sessions_started("beta", now=T0 + 10, count=100)  # current hour
    w = await g.window("beta", now=T0 + 900)  # quarter past: previous hour weight 0.5
    assert w.counts.sessions == pytest.approx(100 + 500)
    assert w.counts.activations == pytest.approx(5)
    w = await g.window("beta", now=T0 + 1800)  # half past: previous hour no longer counted
    assert w.counts.sessions == pytest.approx(100)
    assert w.state == "ok"
    assert w.counts.ratio == 0


async def test_counter_ttl_in_memory_store(autojump_clock: trio.testing.MockClock) -> None:
    store = MemoryStore()
    g = Guardrails(store)
    await g.record_tokens("beta", now=T0)
    assert (await store.hour_counts("beta", [hour_bucket(T0)]))[0] == HourCounts(tokens=1)
    await trio.sleep(89 * 60)
    await g.record_tokens("beta", now=T0)  # does not extend the TTL
    await trio.sleep(61)
    assert (await store.hour_counts("beta", [hour_bucket(T0)]))[0] == HourCounts()


# --- node assignment -------------------------------------------------------------------------------


def nodes(*ids: str, draining: frozenset[str] = frozenset()) -> list[NodeInfo]:
    return [NodeInfo(i, f"wss://{i}.example/v1/connect", i in draining) for i in ids]


async def test_no_registry_means_single_node() -> None:
    assert await Guardrails(MemoryStore()).assign_node("s", ttl=300) is None


async def test_all_draining_is_no_relay_available() -> None:
    store = MemoryStore()
    for n in nodes("a", "b", draining=frozenset({"a", "b"})):
        await store.register_node(n, ttl=30)
    with pytest.raises(GuardrailError) as info:
        await Guardrails(store).assign_node("s", ttl=300)
    assert info.value.error == "no_relay_available"


async def test_assignment_sticks_and_moves_off_dead_or_draining_nodes() -> None:
    store = MemoryStore()
    g = Guardrails(store)
    for n in nodes("a", "b", "c"):
        await store.register_node(n, ttl=30)
    first = await g.assign_node("sess", ttl=300)
    assert first is not None
    assert first == rendezvous_pick("sess", nodes("a", "b", "c"))
    # a new node that would now win HRW does not move an assigned session
    for extra in ("d", "e", "f", "g", "h"):
        await store.register_node(nodes(extra)[0], ttl=30)
    assert await g.assign_node("sess", ttl=300) == first
    # the assigned node starts draining: the session moves, and stays moved
    await store.register_node(NodeInfo(first.node_id, first.public_url, draining=True), ttl=30)
    second = await g.assign_node("sess", ttl=300)
    assert second is not None
    assert second.node_id != first.node_id
    assert await g.assign_node("sess", ttl=300) == second
    # the node dies: moves again
    await store.remove_node(second.node_id)
    third = await g.assign_node("sess", ttl=300)
    assert third is not None
    assert third.node_id not in {first.node_id, second.node_id}


def node(node_id: str, *, draining: bool = False, full: bool = False) -> NodeInfo:
    return NodeInfo(node_id, f"wss://{node_id}.example/v1/connect", draining, full)


def sessions_picking(node_id: str, ids: list[str], count: int) -> list[str]:
    """Session ids whose rendezvous pick among ``ids`` is ``node_id``."""
    out = [f"s-{i}" for i in range(1000) if rendezvous_pick(f"s-{i}", nodes(*ids)) == node(node_id)]
    assert len(out) >= count
    return out[:count]


@pytest.mark.parametrize("path", ["assign_node", "decide"])
async def test_full_nodes_get_no_new_sessions_but_keep_their_own(path: str) -> None:
    """A full node (max_sessions or its connection cap) is skipped for new sessions, like a draining
    one, but unlike a draining one the sessions assigned to it stay: their peers are sent back."""
    store = MemoryStore()
    g = Guardrails(store, GuardrailConfig(dev_enable_all_cohorts=True), wall_clock=lambda: T0)
    moves: list[str] = []
    g.on_move = moves.append

    async def assigned(session_id: str) -> str:
        if path == "assign_node":
            got = await g.assign_node(session_id, ttl=300)
        else:
            _, got = await g.decide("beta", session_id, now=T0, ttl=300, require_node=True)
        assert got is not None
        return got.node_id

    for n in nodes("a", "b"):
        await store.register_node(n, ttl=30)
    mine, new = sessions_picking("a", ["a", "b"], 2)
    assert await assigned(mine) == "a"
    await store.register_node(node("a", full=True), ttl=30)
    assert await assigned(new) == "b"  # would be a's
    assert await assigned(mine) == "a"  # its partner, or a peer back from a blip: its own node
    # every node full: a new session is refused, an assigned one still goes to its node
    await store.register_node(node("b", full=True), ttl=30)
    with pytest.raises(GuardrailError) as info:
        await assigned("brand-new")
    assert (info.value.error, info.value.reason) == ("no_relay_available", "full")
    assert await store.session_node("brand-new") is None  # nothing recorded for it
    assert await assigned(mine) == "a"
    assert await assigned(new) == "b"
    # full and draining together: still only the full node's own sessions
    await store.register_node(node("b", draining=True), ttl=30)
    assert await assigned(mine) == "a"
    with pytest.raises(GuardrailError) as info:
        await assigned(new)  # b is leaving and a has no room: its peers must wait
    assert info.value.reason == "full"
    # a frees a place: new sessions are assigned to it again, and the one on b moves there
    await store.register_node(node("a"), ttl=30)
    assert await assigned("another-new") == "a"
    assert await assigned(new) == "a"
    assert moves == ["draining"]
    assert await assigned(mine) == "a"


async def test_no_relay_reasons() -> None:
    store = MemoryStore()
    g = Guardrails(store, GuardrailConfig(dev_enable_all_cohorts=True), wall_clock=lambda: T0)
    with pytest.raises(GuardrailError) as info:
        await g.decide("beta", "s", now=T0, ttl=300, require_node=True)
    assert (info.value.error, info.value.reason) == ("no_relay_available", "none")
    await store.register_node(node("a", draining=True), ttl=30)
    with pytest.raises(GuardrailError) as info:
        await g.decide("beta", "s", now=T0, ttl=300, require_node=True)
    assert (info.value.error, info.value.reason) == ("no_relay_available", "draining")


@given(st.lists(st.sampled_from("abcdefgh"), min_size=2, max_size=8, unique=True), st.data())
def test_hrw_removing_a_node_moves_only_its_sessions(ids: list[str], data: st.DataObject) -> None:
    removed = data.draw(st.sampled_from(ids))
    before = nodes(*ids)
    after = [n for n in before if n.node_id != removed]
    for i in range(50):
        session = f"session-{i}"
        was = rendezvous_pick(session, before)
        now = rendezvous_pick(session, after)
        assert was is not None
        if was.node_id != removed:
            assert now == was


def test_hrw_spreads_sessions() -> None:
    pool = nodes("a", "b", "c", "d")
    picks = [rendezvous_pick(f"s{i}", pool) for i in range(4000)]
    counts = Counter(p.node_id for p in picks if p is not None)
    assert set(counts) == {"a", "b", "c", "d"}
    assert all(800 <= c <= 1200 for c in counts.values())  # 1000 ± 20 %: deterministic for these ids
    assert rendezvous_pick("s", []) is None


# --- pure maths -----------------------------------------------------------------------------------


def test_hour_bucket_and_key() -> None:
    assert hour_bucket(T0) == "2023-11-14-22"
    assert hour_bucket(T0 - 0.001) == "2023-11-14-21"
    assert counter_key("beta", "2023-11-14-22") == "fallback:cohort:beta:2023-11-14-22"
    with pytest.raises(ValueError):
        counter_key("beta:2023-11-14-22", "x")


@given(st.floats(0, 4_000_000_000))
def test_hour_bucket_is_the_utc_hour_of_the_time(now: float) -> None:
    # hour_bucket caches the name per hour: the cache must never name a neighbouring hour
    assert hour_bucket(now) == datetime.fromtimestamp(now, UTC).strftime("%Y-%m-%d-%H")


counts = st.builds(HourCounts, st.integers(0, 10**9), st.integers(0, 10**9), st.integers(0, 10**9))


@given(counts, counts, st.floats(0, 10 * HOUR))
def test_window_bounds(current: HourCounts, previous: HourCounts, offset: float) -> None:
    w = rolling_window(current, previous, T0 + offset)
    assert 0.0 <= w.previous_weight <= 1.0
    assert current.sessions <= w.sessions <= current.sessions + previous.sessions
    assert current.activations <= w.activations <= current.activations + previous.activations


@given(counts, counts)
def test_window_is_continuous_across_the_hour(older: HourCounts, last: HourCounts) -> None:
    # just before the hour turns the window is `last` alone; just after, `last` is the previous
    # bucket with full weight and the new bucket is still empty
    before = rolling_window(last, older, T0 - 1e-6)
    after = rolling_window(HourCounts(), last, T0)
    assert before.sessions == after.sessions == last.sessions
    assert before.activations == after.activations == last.activations
