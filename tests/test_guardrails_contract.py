"""One contract for every GuardrailStore: MemoryStore and RedisStore, on a private redis-server and on
a private three-master Redis Cluster (``redis+cluster://``)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest
import trio

from rescue.guardrails import (
    CounterField,
    FleetState,
    GuardrailStore,
    HourCounts,
    MemoryStore,
    NodeInfo,
    RedisStore,
    TelemetryGap,
    hour_bucket,
)

TIMEOUT = 10
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("cluster", marks=pytest.mark.redis),  # a real three-master Redis Cluster
    ]
)
async def store(request: pytest.FixtureRequest) -> AsyncIterator[GuardrailStore]:
    s: GuardrailStore
    if request.param == "memory":
        s = MemoryStore()
    else:
        s = RedisStore(
            request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")
        )
    try:
        yield s
    finally:
        await s.aclose()


async def test_ping(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.ping()


async def test_fleet_state_round_trip(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.fleet_state() == FleetState()
        paused = FleetState(
            paused=True, reason="incident 42 — ünïcode", since=NOW + 0.125, drain=True, cause="operator"
        )
        await store.set_fleet_state(paused)
        assert await store.fleet_state() == paused
        resumed = FleetState(paused=False, reason=None, since=NOW + 1)
        await store.set_fleet_state(resumed)
        assert await store.fleet_state() == resumed


async def test_cohort_flags_default_false_and_are_per_cohort(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.cohort_enabled("beta") is False
        await store.set_cohort_enabled("beta", True)
        assert await store.cohort_enabled("beta") is True
        assert await store.cohort_enabled("gamma") is False
        await store.set_cohort_enabled("beta", False)
        assert await store.cohort_enabled("beta") is False


@pytest.mark.parametrize("bad", ["", "a:b", "x" * 65, "sp ace", "é"])
async def test_bad_cohort_ids_are_refused(store: GuardrailStore, bad: str) -> None:
    with trio.fail_after(TIMEOUT):
        with pytest.raises(ValueError):
            await store.cohort_enabled(bad)
        with pytest.raises(ValueError):
            await store.increment(bad, CounterField.SESSIONS, now=NOW)


async def test_counters_per_cohort_per_hour(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        for _ in range(3):
            await store.increment("beta", CounterField.TOKENS, now=NOW)
        await store.increment("beta", CounterField.SESSIONS, now=NOW, amount=500)
        await store.increment("beta", CounterField.ACTIVATIONS, now=NOW + 1)
        await store.increment("beta", CounterField.SESSIONS, now=NOW - 3600, amount=7)
        await store.increment("gamma", CounterField.SESSIONS, now=NOW, amount=11)
        this_hour, last_hour, never = hour_bucket(NOW), hour_bucket(NOW - 3600), hour_bucket(NOW - 7200)
        assert await store.hour_counts("beta", [this_hour, last_hour, never]) == [
            HourCounts(sessions=500, tokens=3, activations=1),
            HourCounts(sessions=7),
            HourCounts(),
        ]
        assert await store.hour_counts("gamma", [this_hour]) == [HourCounts(sessions=11)]
        assert await store.hour_counts("delta", []) == []


async def test_node_registry(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.live_nodes() == []
        b = NodeInfo("node-b", "wss://b.example/v1/connect")
        a = NodeInfo("node-a", "wss://a.example/v1/connect")
        await store.register_node(b, ttl=30)
        await store.register_node(a, ttl=30)
        assert await store.live_nodes() == [a, b]
        a_draining = NodeInfo("node-a", "wss://a.example/v1/connect", draining=True)
        await store.register_node(a_draining, ttl=30)  # refresh replaces the record
        assert await store.live_nodes() == [a_draining, b]
        await store.remove_node("node-a")
        assert await store.live_nodes() == [b]
        b_full = NodeInfo("node-b", "wss://b.example/v1/connect", full=True)
        await store.register_node(b_full, ttl=30)
        assert await store.live_nodes() == [b_full]
        assert not b_full.accepting
        await store.register_node(b, ttl=30)  # and back
        assert await store.live_nodes() == [b]


async def test_session_node_reads_the_assignment_without_touching_it(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.session_node("sess-r") is None
        assert await store.assign_session("sess-r", "node-a", ttl=0.3) == "node-a"
        assert await store.session_node("sess-r") == "node-a"
        while await store.session_node("sess-r") is not None:  # read, not extended: it expires
            await trio.sleep(0.02)
        assert await store.assign_session("sess-r", "node-b", ttl=60) == "node-b"


async def test_node_registration_expires_unless_refreshed(store: GuardrailStore) -> None:
    short = NodeInfo("short-lived", "wss://s.example/v1/connect")
    kept = NodeInfo("kept", "wss://k.example/v1/connect")
    with trio.fail_after(TIMEOUT):
        await store.register_node(short, ttl=0.05)
        await store.register_node(kept, ttl=30)
        while short in await store.live_nodes():  # real expiry (Redis PX): bounded by fail_after
            await trio.sleep(0.02)
        assert await store.live_nodes() == [kept]
        await store.register_node(short, ttl=30)  # re-registers after expiry
        assert await store.live_nodes() == [kept, short]


async def test_session_assignment_is_set_nx(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.assign_session("sess-1", "node-a", ttl=60) == "node-a"
        assert await store.assign_session("sess-1", "node-b", ttl=60) == "node-a"  # existing wins
        assert await store.assign_session("sess-2", "node-b", ttl=60) == "node-b"
        # compare-and-set: only replaces the value we expected
        assert await store.reassign_session("sess-1", expected="node-x", node_id="node-c", ttl=60) == (
            "node-a",
            False,
        )
        assert await store.reassign_session("sess-1", expected="node-a", node_id="node-c", ttl=60) == (
            "node-c",
            True,
        )
        assert await store.assign_session("sess-1", "node-a", ttl=60) == "node-c"
        # a missing assignment is simply set
        assert await store.reassign_session("sess-3", expected="node-x", node_id="node-d", ttl=60) == (
            "node-d",
            True,
        )


async def test_a_token_use_belongs_to_the_first_node_until_it_expires(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        first, second = os.urandom(16), os.urandom(16)
        assert await store.claim_token_use(first, "node-a", ttl=60) == "node-a"
        assert await store.claim_token_use(first, "node-b", ttl=60) == "node-a"  # a copy elsewhere
        assert await store.claim_token_use(first, "node-a", ttl=60) == "node-a"  # its node again
        assert await store.claim_token_use(second, "node-b", ttl=0.05) == "node-b"
        while await store.claim_token_use(second, "node-c", ttl=60) != "node-c":  # expires with the token
            await trio.sleep(0.02)
        assert await store.claim_token_use(second, "node-b", ttl=60) == "node-c"


async def test_keep_assignments_holds_free_and_own_sessions_and_reports_others(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.assign_session("mine", "node-a", ttl=60) == "node-a"
        assert await store.assign_session("theirs", "node-b", ttl=60) == "node-b"
        ids = ["mine", "theirs", "free", *(f"bulk-{i}" for i in range(1200))]  # > one Redis batch
        held = await store.keep_assignments("node-a", ids, ttl=60)
        assert held == {**dict.fromkeys(ids, "node-a"), "theirs": "node-b"}
        # what it held is assigned to node-a now: the token service's SET NX honours it
        assert await store.assign_session("free", "node-c", ttl=60) == "node-a"
        assert await store.assign_session("bulk-1199", "node-c", ttl=60) == "node-a"
        assert await store.assign_session("theirs", "node-c", ttl=60) == "node-b"
        assert await store.keep_assignments("node-a", [], ttl=60) == {}


async def test_keep_assignments_extends_them(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.assign_session("kept", "node-a", ttl=0.2) == "node-a"
        for _ in range(3):  # 0.45 s in all, more than twice the ttl
            await trio.sleep(0.15)
            assert await store.keep_assignments("node-a", ["kept"], ttl=0.2) == {"kept": "node-a"}
        assert await store.assign_session("kept", "node-b", ttl=0.1) == "node-a"


async def test_session_assignment_expires(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.assign_session("sess-e", "node-a", ttl=0.2) == "node-a"
        await trio.sleep(0.1)
        # reading an assignment extends it to the full ttl again
        assert await store.assign_session("sess-e", "node-b", ttl=0.2) == "node-a"
        await trio.sleep(0.15)  # 0.25 s after creation, 0.15 s after the refresh: still there
        assert await store.assign_session("sess-e", "node-b", ttl=0.1) == "node-a"
        await trio.sleep(0.15)  # past the last ttl (expiry on access is exact in both stores)
        assert await store.assign_session("sess-e", "node-c", ttl=60) == "node-c"


async def test_node_info_validation() -> None:
    with pytest.raises(ValueError):
        NodeInfo("bad id", "wss://x")
    with pytest.raises(ValueError):
        NodeInfo("ok", "")
    with pytest.raises(ValueError):
        NodeInfo.from_json({"id": "ok", "url": 3})
    assert NodeInfo.from_json(NodeInfo("n", "wss://n", True).to_json()) == NodeInfo("n", "wss://n", True)


async def test_mint_snapshot_reads_what_a_token_decision_needs(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        empty = await store.mint_snapshot("beta", now=NOW)
        assert (empty.fleet, empty.cohort_enabled, empty.nodes) == (FleetState(), False, ())
        assert empty.current == empty.previous == HourCounts()
        await store.set_fleet_state(FleetState(paused=True, reason="r", since=NOW))
        await store.set_cohort_enabled("beta", True)
        await store.increment("beta", CounterField.SESSIONS, now=NOW, amount=5)
        await store.increment("beta", CounterField.ACTIVATIONS, now=NOW - 3600, amount=2)
        await store.register_node(NodeInfo("n-b", "wss://b/v1/connect"), ttl=60)
        await store.register_node(NodeInfo("n-a", "wss://a/v1/connect", draining=True), ttl=60)
        snap = await store.mint_snapshot("beta", now=NOW)
        assert snap.fleet == FleetState(paused=True, reason="r", since=NOW)
        assert snap.cohort_enabled is True
        assert snap.current == HourCounts(sessions=5)
        assert snap.previous == HourCounts(activations=2)
        assert [n.node_id for n in snap.nodes] == ["n-a", "n-b"]
        assert snap.nodes[0].draining


async def test_record_mint_counts_and_assigns_like_its_parts(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.record_mint("beta", now=NOW, session_id="m", node_id="n-1", ttl=60) == "n-1"
        assert await store.record_mint("beta", now=NOW, session_id="m", node_id="n-2", ttl=60) == "n-1"
        assert await store.record_mint("beta", now=NOW, session_id="m", node_id=None, ttl=60) is None
        assert (await store.hour_counts("beta", [hour_bucket(NOW)]))[0] == HourCounts(tokens=3)
        assert await store.assign_session("m", "n-3", ttl=60) == "n-1"


async def test_telemetry_gap_counts_tokens_until_each_report(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        assert await store.telemetry_gap() == TelemetryGap()
        for i in range(3):
            await store.record_mint("beta", now=NOW + i, session_id=f"g{i}", node_id=None, ttl=60)
        assert await store.telemetry_gap() == TelemetryGap(3, NOW, 3, NOW)
        assert (await store.mint_snapshot("beta", now=NOW)).telemetry == TelemetryGap(3, NOW, 3, NOW)
        await store.increment("gamma", CounterField.ACTIVATIONS, now=NOW + 5)  # any cohort: fleet-wide
        assert await store.telemetry_gap() == TelemetryGap(0, None, 3, NOW)
        await store.record_mint("beta", now=NOW + 6, session_id="g9", node_id="n-1", ttl=60)
        assert await store.telemetry_gap() == TelemetryGap(1, NOW + 6, 4, NOW)
        await store.increment("beta", CounterField.SESSIONS, now=NOW + 7, amount=10)
        assert await store.telemetry_gap() == TelemetryGap(1, NOW + 6, 0, None)
        await store.increment("beta", CounterField.TOKENS, now=NOW + 8)  # not a report
        assert await store.telemetry_gap() == TelemetryGap(1, NOW + 6, 0, None)


async def test_telemetry_gap_expires_after_its_ttl_without_tokens(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.record_mint("beta", now=NOW, session_id="e", node_id=None, ttl=60, telemetry_ttl=60)
        assert (await store.telemetry_gap()).tokens_since_activation == 1
        # each token sets the TTL anew (here shorter: only to see it expire)
        await store.record_mint("beta", now=NOW, session_id="f", node_id=None, ttl=60, telemetry_ttl=0.2)
        await trio.sleep(0.3)  # the real clock: Redis expires keys on its own
        assert await store.telemetry_gap() == TelemetryGap()


async def test_unreported_cohorts_count_towards_the_activation_gap_only(store: GuardrailStore) -> None:
    with trio.fail_after(TIMEOUT):
        await store.record_mint(
            "probe", now=NOW, session_id="p1", node_id=None, ttl=60, sessions_reported=False
        )
        assert await store.telemetry_gap() == TelemetryGap(1, NOW, 0, None)
        await store.record_mint("beta", now=NOW + 1, session_id="b1", node_id=None, ttl=60)
        assert await store.telemetry_gap() == TelemetryGap(2, NOW, 1, NOW + 1)
