"""RedisStore specifics on a private redis-server: key layout, TTLs, outages, shared state."""

from __future__ import annotations

import json
import time

import pytest
import trio

from rescue.errors import GuardrailError, StoreUnavailable
from rescue.guardrails import (
    COUNTER_TTL_S,
    CounterField,
    GuardrailConfig,
    Guardrails,
    NodeInfo,
    RedisStore,
    hour_bucket,
)

from .conftest import RedisServer

pytestmark = pytest.mark.redis

TIMEOUT = 10
NOW = 1_700_000_000.0


async def test_counter_key_fields_and_ttl_set_once(redis_url: str, redis_session_server: RedisServer) -> None:
    store = RedisStore(redis_url)
    key = f"fallback:cohort:beta:{hour_bucket(NOW)}"
    assert key == "fallback:cohort:beta:2023-11-14-22"
    with trio.fail_after(TIMEOUT), redis_session_server.client() as raw:
        await store.increment("beta", CounterField.SESSIONS, now=NOW, amount=2)
        await store.increment("beta", CounterField.TOKENS, now=NOW)
        assert raw.hgetall(key) == {"sessions": "2", "tokens": "1"}
        assert COUNTER_TTL_S - 5 <= raw.ttl(key) <= COUNTER_TTL_S
        raw.expire(key, 100)
        await store.increment("beta", CounterField.ACTIVATIONS, now=NOW)
        assert raw.ttl(key) <= 100  # the TTL is set on the first increment only (EXPIRE NX)
        assert raw.hget(key, "activations") == "1"
        # counts only: no other keys (besides the fixture's initialised fleet hash), no identifiers
        assert sorted(raw.keys("*")) == sorted([key, "fallback:fleet"])
        await store.aclose()


async def test_node_and_assignment_ttls_and_no_session_ids_in_keys(
    redis_url: str, redis_session_server: RedisServer
) -> None:
    store = RedisStore(redis_url)
    with trio.fail_after(TIMEOUT), redis_session_server.client() as raw:
        await store.register_node(NodeInfo("n1", "wss://n1/v1/connect"), ttl=15)
        assert 14_000 <= raw.pttl("fallback:{nodes}:n1") <= 15_000
        assert raw.smembers("fallback:{nodes}") == {"n1"}
        await store.assign_session("my-secret-session", "n1", ttl=300)
        keys = raw.keys("fallback:assign:*")
        assert len(keys) == 1
        assert "my-secret-session" not in keys[0]
        assert 299_000 <= raw.pttl(keys[0]) <= 300_000
        # an expired node is pruned from the registry set when listed
        raw.delete("fallback:{nodes}:n1")
        assert await store.live_nodes() == []
        assert raw.smembers("fallback:{nodes}") == set()
        # a corrupt record counts as a dead node, not an outage
        raw.set("fallback:{nodes}:bad", "{not json")
        raw.sadd("fallback:{nodes}", "bad")
        assert await store.live_nodes() == []
        await store.aclose()


# NodeInfo.from_json as it was before records carried "full" (af9dd72): what a token service of
# that version runs on the records of newer relays during a rolling upgrade.
def _from_json_before_full(data: object) -> NodeInfo:
    if not isinstance(data, dict):
        raise ValueError("node record must be an object")
    node_id, url, draining = data.get("id"), data.get("url"), data.get("draining", False)
    if not isinstance(node_id, str) or not isinstance(url, str) or not isinstance(draining, bool):
        raise ValueError("node record needs id (str), url (str), draining (bool)")
    return NodeInfo(node_id, url, draining)


async def test_node_records_of_older_and_newer_versions_read_both_ways(
    redis_url: str, redis_session_server: RedisServer
) -> None:
    """A rolling upgrade mixes versions: an older relay's record (no "full") reads as a node that is
    not full; a newer relay's record keeps id/url/draining as they were, so an older token service
    reads it as before (a full node then still gets new sessions there, as it always did, but never
    counts as draining: its sessions are not moved)."""
    store = RedisStore(redis_url)
    with trio.fail_after(TIMEOUT), redis_session_server.client() as raw:
        raw.set("fallback:{nodes}:old-1", '{"id":"old-1","url":"wss://old-1/v1/connect","draining":false}')
        raw.sadd("fallback:{nodes}", "old-1")
        assert await store.live_nodes() == [NodeInfo("old-1", "wss://old-1/v1/connect")]
        await store.register_node(NodeInfo("new-1", "wss://new-1/v1/connect", full=True), ttl=15)
        record = json.loads(raw.get("fallback:{nodes}:new-1"))
        assert record == {"id": "new-1", "url": "wss://new-1/v1/connect", "draining": False, "full": True}
        assert _from_json_before_full(record) == NodeInfo("new-1", "wss://new-1/v1/connect")
        # a record from a later version with fields we do not know still reads
        raw.set(
            "fallback:{nodes}:later-1",
            '{"id":"later-1","url":"wss://l/v1/connect","draining":false,"full":false,"zone":"b"}',
        )
        raw.sadd("fallback:{nodes}", "later-1")
        assert [n.node_id for n in await store.live_nodes()] == ["later-1", "new-1", "old-1"]
        # "full" of the wrong type is a corrupt record: a dead node, not an outage
        raw.set("fallback:{nodes}:bad-1", '{"id":"bad-1","url":"wss://b/v1/connect","full":"yes"}')
        raw.sadd("fallback:{nodes}", "bad-1")
        assert "bad-1" not in [n.node_id for n in await store.live_nodes()]
        await store.aclose()


async def test_outage_raises_store_unavailable(private_redis: RedisServer) -> None:
    store = RedisStore(private_redis.url)
    guardrails = Guardrails(store, GuardrailConfig())
    with trio.fail_after(TIMEOUT):
        await store.set_cohort_enabled("beta", True)
        assert (await guardrails.authorize_token("beta", now=NOW)).hint == "ok"
        private_redis.stop()  # kill the server mid-test
        with pytest.raises(StoreUnavailable):
            await store.ping()
        with pytest.raises(StoreUnavailable):
            await guardrails.authorize_token("beta", now=NOW)  # fail closed
        with pytest.raises(StoreUnavailable):
            await store.increment("beta", CounterField.TOKENS, now=NOW)
        with pytest.raises(StoreUnavailable):
            await guardrails.assign_node("s", ttl=300)
        # the env kill switch still answers without the store
        env_paused = Guardrails(store, GuardrailConfig(env_paused=True))
        assert (await env_paused.fleet_state()).paused is True
        await store.aclose()


async def test_bad_url_is_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable):
        RedisStore("http://not-redis")


async def test_two_instances_share_pause_resume_and_cohorts(redis_url: str) -> None:
    a = Guardrails(RedisStore(redis_url), GuardrailConfig())
    b = Guardrails(RedisStore(redis_url), GuardrailConfig())
    with trio.fail_after(TIMEOUT):
        await a.set_cohort_enabled("beta", True)
        assert await b.cohort_enabled("beta") is True
        assert (await b.authorize_token("beta", now=NOW)).hint == "ok"
        before = time.time()
        await a.pause(reason="incident", drain=True)
        state = await b.fleet_state()
        assert state.paused
        assert state.reason == "incident"
        assert state.drain
        assert state.since is not None
        assert state.since >= before - 1
        with pytest.raises(GuardrailError) as info:
            await b.authorize_token("beta", now=NOW)
        assert info.value.error == "fallback_paused"
        await b.resume()
        assert (await a.fleet_state()).paused is False
        assert (await a.authorize_token("beta", now=NOW)).hint == "ok"
        await a.store.aclose()
        await b.store.aclose()


async def test_auto_pause_reaches_other_instances(redis_url: str) -> None:
    config = GuardrailConfig(hard_ratio=0.02)
    a = Guardrails(RedisStore(redis_url), config)
    b = Guardrails(RedisStore(redis_url), GuardrailConfig())
    with trio.fail_after(TIMEOUT):
        await a.set_cohort_enabled("beta", True)
        await a.record_sessions_started("beta", now=NOW, count=200)
        await a.record_activation("beta", now=NOW, count=5)  # 2.5 % >= 2 %
        with pytest.raises(GuardrailError):
            await a.authorize_token("beta", now=NOW)
        state = await b.fleet_state()
        assert state.paused
        assert state.reason is not None
        assert "auto-pause" in state.reason
        await a.store.aclose()
        await b.store.aclose()


async def test_concurrent_assignments_agree(redis_url: str) -> None:
    """Many concurrent requests for one session (both peers, retries) all get one node."""
    store = RedisStore(redis_url)
    guardrails = Guardrails(store)
    with trio.fail_after(TIMEOUT):
        for i in range(5):
            await store.register_node(NodeInfo(f"n{i}", f"wss://n{i}/v1/connect"), ttl=30)
        results: list[str] = []

        async def one() -> None:
            node = await guardrails.assign_node("shared-session", ttl=300)
            assert node is not None
            results.append(node.node_id)

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
        assert len(set(results)) == 1
        await store.aclose()


async def test_scripts_lost_by_a_redis_restart_are_reloaded_without_counting_twice(
    redis_url: str, redis_session_server: RedisServer
) -> None:
    store = RedisStore(redis_url)
    try:
        with trio.fail_after(10):
            now = time.time()
            await store.register_node(NodeInfo("n-1", "wss://n1/v1/connect"), ttl=60)
            assert await store.record_mint("beta", now=now, session_id="s", node_id="n-1", ttl=60) == "n-1"
            for _ in range(2):  # the transaction (record_mint) and the plain pipelines
                with redis_session_server.client() as client:
                    client.script_flush()
                assert (
                    await store.record_mint("beta", now=now, session_id="s", node_id="n-2", ttl=60) == "n-1"
                )
                assert [n.node_id for n in (await store.mint_snapshot("beta", now=now)).nodes] == ["n-1"]
                with redis_session_server.client() as client:
                    client.script_flush()
                assert await store.keep_assignments("n-1", ["s", "t"], ttl=60) == {"s": "n-1", "t": "n-1"}
            counts = await store.hour_counts("beta", [hour_bucket(now)])
            assert counts[0].tokens == 3
    finally:
        await store.aclose()


async def test_a_mint_is_two_round_trips(redis_url: str, redis_sends: list[str]) -> None:
    """Decision 0010 on one server: one read pipeline, one pipeline of scripts, nothing else."""
    store = RedisStore(redis_url)
    guardrails = Guardrails(store)
    try:
        with trio.fail_after(TIMEOUT):
            await store.set_cohort_enabled("beta", True)
            await store.register_node(NodeInfo("n-1", "wss://n1/v1/connect"), ttl=60)
            await guardrails.decide(
                "beta", "warm-up", now=time.time(), ttl=60, require_node=True
            )  # loads scripts
            redis_sends.clear()
            auth, node = await guardrails.decide("beta", "s-1", now=time.time(), ttl=60, require_node=True)
            assert (auth.hint, node is not None and node.node_id) == ("ok", "n-1")
            assert len(redis_sends) == 2
    finally:
        await store.aclose()
