"""RedisStore on a real three-master Redis Cluster (``redis+cluster://``, decision 0013).

The store contract itself runs on the cluster in tests/test_guardrails_contract.py; this file checks
what only a cluster shows: where the keys land, a script cache lost by one master only, a real
``rescue token-service`` process minting through the cluster, and a seed node that never answers
(the client is built off the event loop, decision 0013 item 6).
"""

from __future__ import annotations

import gc
import json
import signal
import time
import traceback
import weakref
from collections import Counter
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio
from redis.exceptions import ClusterDownError, ResponseError

from rescue.errors import GuardrailError, StoreUnavailable
from rescue.guardrails import CounterField, Guardrails, NodeInfo, RedisStore, counter_key, hour_bucket
from rescue.guardrails._redis import _ThreadCall
from rescue.guardrails._store import NODES_KEY, assignment_key, node_key
from rescue.protocol import KeyRing, b64url_decode, verify_token
from rescue.testing import TestKeys

from .conftest import (
    ADMIN_AUTH,
    SERVICE_AUTH,
    RedisClusterServers,
    relay_process,
    start_redis_cluster,
    start_relay_process,
    token_request,
    token_service_process,
)

pytestmark = pytest.mark.redis

TIMEOUT = 20  # a subprocess start on a loaded 2-core box
NOW = 1_700_000_000.0


def _master_of(cluster: RedisClusterServers, key: str) -> int:
    """Index (in ``cluster.ports``) of the master serving ``key``."""
    with cluster.client() as client:
        node = client.get_node_from_key(key)
        return cluster.ports.index(int(node.port))


async def test_registry_shares_one_slot_and_the_rest_spreads(
    redis_cluster_url: str, redis_cluster_session: RedisClusterServers
) -> None:
    cluster = redis_cluster_session
    store = RedisStore(redis_cluster_url)
    try:
        with trio.fail_after(TIMEOUT):
            ids = [f"node-{i}" for i in range(20)]
            for node_id in ids:
                await store.register_node(NodeInfo(node_id, f"wss://{node_id}/v1/connect"), ttl=30)
            assert [n.node_id for n in await store.live_nodes()] == sorted(ids)
            with cluster.client() as client:
                slots = {client.keyslot(k) for k in [NODES_KEY, *(node_key(i) for i in ids)]}
            assert len(slots) == 1  # one slot: the registry script may read every record
            sessions = [f"s-{i}" for i in range(30)]
            await store.keep_assignments("node-1", sessions, ttl=60)
            cohorts = [f"c{i}" for i in range(30)]
            for cohort in cohorts:
                await store.increment(cohort, CounterField.SESSIONS, now=NOW)
            # counters keep SPEC §5's exact name and, like assignments, spread over the masters
            assert {_master_of(cluster, counter_key(c, hour_bucket(NOW))) for c in cohorts} == {0, 1, 2}
            assert {_master_of(cluster, assignment_key(s)) for s in sessions} == {0, 1, 2}
            with cluster.client() as client:
                assert client.hgetall("fallback:cohort:c7:2023-11-14-22") == {"sessions": "1"}
    finally:
        await store.aclose()


async def test_a_master_that_lost_its_scripts_never_counts_a_token_twice(
    redis_cluster_url: str, redis_cluster_session: RedisClusterServers
) -> None:
    """``record_mint`` on a cluster: counter and assignment on different masters, one of which lost
    its script cache (restarted, or a replica promoted): only the failed script is run again."""
    cluster = redis_cluster_session
    now = time.time()
    counter = counter_key("beta", hour_bucket(now))
    # a session whose assignment lives on another master than the counter
    session = next(
        f"s{i}"
        for i in range(100)
        if _master_of(cluster, assignment_key(f"s{i}")) != _master_of(cluster, counter)
    )
    store = RedisStore(redis_cluster_url)
    try:
        with trio.fail_after(TIMEOUT):
            assert (
                await store.record_mint("beta", now=now, session_id=session, node_id="n-1", ttl=60) == "n-1"
            )
            for lost in (counter, assignment_key(session)):
                with cluster.node(_master_of(cluster, lost)) as node:
                    node.script_flush()
                assert (
                    await store.record_mint("beta", now=now, session_id=session, node_id="n-2", ttl=60)
                    == "n-1"
                )
                assert await store.keep_assignments("n-1", [session, "other"], ttl=60) == {
                    session: "n-1",
                    "other": "n-1",
                }
            assert (await store.hour_counts("beta", [hour_bucket(now)]))[0].tokens == 3
    finally:
        await store.aclose()


async def test_token_service_process_mints_through_the_cluster(
    tmp_path: Path, redis_cluster_url: str, redis_cluster_session: RedisClusterServers
) -> None:
    keys = TestKeys()
    key_file = tmp_path / "signing.jwk"
    key_file.write_text(json.dumps(keys.signing.to_jwk(private=True)))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    store = RedisStore(redis_cluster_url)  # plays two more relay nodes' registrations
    svc, adm = SERVICE_AUTH, ADMIN_AUTH
    try:
        with trio.fail_after(TIMEOUT):
            for node_id in ("n-a", "n-b"):
                await store.register_node(NodeInfo(node_id, f"wss://{node_id}/v1/connect"), ttl=60)
            async with (
                relay_process(jwks, redis_cluster_url, "n-c", tmp_path / "relay.log") as relay,
                token_service_process(str(key_file), redis_cluster_url) as (_, port),
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
            ):
                assert (await client.get("/healthz")).json() == {"status": "ok", "fallback_paused": False}
                r = await client.put(
                    "/v1/admin/cohorts/beta", json={"fallback_ws_enabled": True}, headers=adm
                )
                assert r.status_code == 200
                # a real `rescue relay --redis-url redis+cluster://…` registers itself through it
                while "n-c" not in [
                    n["id"] for n in (await client.get("/v1/admin/nodes", headers=adm)).json()["nodes"]
                ]:
                    await trio.sleep(0.1)
                ring = KeyRing.from_jwks((await client.get("/v1/fallback/keys")).json())
                auds = {}
                for i in range(10):
                    for role in ("host", "guest"):
                        r = await client.post(
                            "/v1/fallback/token", json=token_request(f"sess-{i}", role), headers=svc
                        )
                        assert r.status_code == 200, r.text
                        claims = verify_token(b64url_decode(r.json()["token"]), ring, now=time.time())
                        auds.setdefault(i, set()).add(claims.aud)
                assert all(len(a) == 1 for a in auds.values())  # both peers on one node
                assert set().union(*auds.values()) <= {"n-a", "n-b", "n-c"}
                assert (await client.post("/v1/admin/pause", headers=adm)).json()["paused"] is True
                r = await client.post("/v1/fallback/token", json=token_request("sess-x"), headers=svc)
                assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
                await client.post("/v1/admin/resume", headers=adm)
                r = await client.post("/v1/fallback/token", json=token_request("sess-y"), headers=svc)
                assert r.status_code == 200
                assert relay.returncode is None
            now = time.time()  # both hours: the hour may have turned during the test
            counts = await store.hour_counts("beta", [hour_bucket(now), hour_bucket(now - 3600)])
            assert sum(c.tokens for c in counts) == 21
    finally:
        await store.aclose()


async def test_what_a_mint_costs_on_a_cluster(redis_cluster_url: str, redis_sends: list[str]) -> None:
    """Still two waves (decision 0010): the read pipeline, then the scripts; each wave sends at most
    one request to each master (all written before any answer is read). redis-py 8's cluster
    pipeline used to add a ``COMMAND GETKEYS`` round trip per script call before the wave."""
    store = RedisStore(redis_cluster_url)
    guardrails = Guardrails(store)
    try:
        with trio.fail_after(TIMEOUT):
            await store.set_cohort_enabled("beta", True)
            await store.register_node(NodeInfo("n-1", "wss://n1/v1/connect"), ttl=60)
            await guardrails.decide("beta", "warm-up", now=time.time(), ttl=60, require_node=True)
            now = time.time()
            redis_sends.clear()
            await store.mint_snapshot("beta", now=now)
            reads = list(redis_sends)
            redis_sends.clear()
            await store.record_mint("beta", now=now, session_id="s-1", node_id="n-1", ttl=60)
            writes = list(redis_sends)
            # fleet, cohorts, two counters, the registry: five keys on at most three masters
            assert 1 <= len(reads) == len(set(reads)) <= 3
            # counter, assignment, telemetry gap: three keys on at most three masters
            assert 1 <= len(writes) == len(set(writes)) <= 3
            # a lone script is one request too (no key lookup on the side), a pipeline one per master
            redis_sends.clear()
            await store.assign_session("s-2", "n-1", ttl=60)
            assert len(redis_sends) == 1
            redis_sends.clear()
            await store.increment("beta", CounterField.TOKENS, now=now)
            assert len(redis_sends) == 1
            redis_sends.clear()
            await store.increment("beta", CounterField.SESSIONS, now=now)  # + its telemetry gap
            assert len(redis_sends) == len(set(redis_sends)) <= 2
            redis_sends.clear()
            await store.keep_assignments("n-1", [f"s-{i}" for i in range(50)], ttl=60)
            assert len(redis_sends) == len(set(redis_sends)) <= 3
    finally:
        await store.aclose()


async def test_an_error_from_a_worker_thread_is_freed_by_reference_counting(
    redis_cluster_url: str, redis_cluster_session: RedisClusterServers
) -> None:
    """A cluster store's round trip runs in a worker thread, which keeps the error it caught for
    the caller. It kept the error itself and raised it: the error's traceback held the thread's
    frame and then the caller's (the request's whole stack), and the first of them held the call
    that held the error -- a cycle, so every error (an outage's, or an answer like this
    ``WRONGTYPE``) pinned the request's frames until a full pass of the cycle collector. Now the
    thread keeps a copy and the caller gets a fresh copy of it: the same error, in no cycle."""
    key = counter_key("wrongtype", "2024010100")
    with redis_cluster_session.client() as client:
        client.set(key, "a string, not a hash")
    store = RedisStore(redis_cluster_url)
    calls = 4
    try:
        with trio.fail_after(TIMEOUT):
            raised: list[BaseException] = []
            depths: list[int] = []
            alive: list[weakref.ref[BaseException]] = []
            gc.collect()
            gc.disable()
            try:
                for _ in range(calls):
                    try:
                        await store.hour_counts("wrongtype", ["2024010100"])
                    except ResponseError as exc:  # an answer (a type error), not an outage
                        raised.append(exc)
                        depths.append(len(list(traceback.walk_tb(exc.__traceback__))))
                        alive.append(weakref.ref(exc))
                assert len(raised) == calls
                assert len({id(e) for e in raised}) == calls
                assert len(set(depths)) == 1, depths
                for error in raised:
                    assert type(error) is ResponseError
                    assert str(error).startswith("WRONGTYPE")
                    assert error.args == raised[0].args
                del raised, error
                pinned = [ref() for ref in alive if ref() is not None]
                # The last call may still be referenced by its worker thread, which drops its
                # job only after handing the outcome over; so not "no call alive" but "no call
                # left to the cycle collector": what a collection finds unreachable is kept here.
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                cyclic = [o for o in gc.garbage if isinstance(o, _ThreadCall)]
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            assert pinned == [], "pinned by a reference cycle"
            assert cyclic == [], "the worker threads' calls, in cycles with their errors"
            assert not store.breaker.open  # an answer: the breaker stays closed
    finally:
        await store.aclose()


async def left_to_the_cycle_collector(
    store: RedisStore, cohort: str, buckets: list[str], calls: int
) -> dict[str, int]:
    """Call ``store.hour_counts(cohort, buckets)`` ``calls`` times, each failing with the store's
    answer ``WRONGTYPE`` for one of them; return the type names of the worker threads' calls and
    the errors that only a pass of the cycle collector would free (with the collector off, as in a
    large process between its rare full passes)."""
    gc.collect()
    gc.disable()
    try:
        for _ in range(calls):
            with pytest.raises(ResponseError, match=r"^WRONGTYPE"):  # an answer, not an outage
                await store.hour_counts(cohort, buckets)
        # DEBUG_SAVEALL keeps what a collection finds unreachable (the last call may still be held,
        # in no cycle, by its worker thread, which drops its job after handing the outcome over)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        return dict(
            Counter(type(o).__name__ for o in gc.garbage if isinstance(o, _ThreadCall | ResponseError))
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_an_error_among_a_round_trips_answers_is_freed_by_reference_counting(
    redis_cluster_url: str, redis_cluster_session: RedisClusterServers
) -> None:
    """Several steps go out as one round trip whose answers come back as values, an error reply as
    a ResponseError among them (caught where it was read, so its traceback holds that frame, which
    holds the list of answers: a cycle), and the round trip raised that instance from a frame that
    held it. Through the frames' callers (``f_back``) both cycles held the worker thread's stack and
    its call until a full pass of the cycle collector, for every such answer. Now the answers'
    errors lose the read's traceback and the caller gets a copy: freed by reference counting."""
    with redis_cluster_session.client() as client:
        client.set(counter_key("wrongtype-2", "2024010100"), "a string, not a hash")
    store = RedisStore(redis_cluster_url)
    try:
        with trio.fail_after(TIMEOUT):
            # two hours: two steps (on the cluster's one-wave round trip), the first answered WRONGTYPE
            left = await left_to_the_cycle_collector(store, "wrongtype-2", ["2024010100", "2024010101"], 4)
            assert left == {}, "pinned by reference cycles until a full collection"
            assert not store.breaker.open  # an answer: the breaker stays closed
    finally:
        await store.aclose()


async def test_a_lost_master_fails_closed() -> None:
    """A master dies (no replica to promote): calls for its keys fail, and once the cluster says
    CLUSTERDOWN, calls for keys on the surviving masters fail too, as StoreUnavailable (an outage:
    503 and the breaker), never as a Redis "response error" that would look like a bug."""
    cluster = await trio.to_thread.run_sync(start_redis_cluster)  # its own: this test kills a master
    cluster.flush()  # and initialised, like every Redis the fixtures hand out
    store = RedisStore(cluster.url)
    fresh = None
    try:
        with trio.fail_after(TIMEOUT):
            guardrails = Guardrails(store)
            await store.set_cohort_enabled("beta", True)
            await store.register_node(NodeInfo("n-1", "wss://n1/v1/connect"), ttl=60)
            await guardrails.decide("beta", "s", now=time.time(), ttl=60, require_node=True)
            dead = _master_of(cluster, "fallback:fleet")
            cluster.processes[dead].kill()
            cluster.processes[dead].wait()
            with pytest.raises(StoreUnavailable):  # fail closed: the kill switch can't be read
                await guardrails.decide("beta", "s", now=time.time(), ttl=60, require_node=True)
            alive = next(i for i in range(len(cluster.ports)) if i != dead)
            with cluster.node(alive) as node:
                while node.execute_command("CLUSTER INFO").get("cluster_state") != "fail":
                    await trio.sleep(0.1)
            # a key on a master that is still up: CLUSTERDOWN, an outage too (a fresh store, so
            # the answer comes from the cluster, not from the first store's open breaker)
            key = next(f"c{i}" for i in range(100) if _master_of(cluster, counter_key(f"c{i}", "x")) == alive)
            fresh = RedisStore(cluster.url)
            with pytest.raises(StoreUnavailable) as info:
                await fresh.hour_counts(key, ["x"])
            assert isinstance(info.value.__cause__, ClusterDownError)
    finally:
        await store.aclose()
        if fresh is not None:
            await fresh.aclose()
        cluster.stop()


async def _silent_seed() -> trio.socket.SocketType:
    """A listening socket on 127.0.0.1 that the test never answers from: a seed node whose kernel
    completes every connection and whose Redis never replies (a wedged server, a blackhole)."""
    seed = trio.socket.socket()
    await seed.bind(("127.0.0.1", 0))
    seed.listen(16)
    return seed


async def test_a_seed_that_never_answers_leaves_the_event_loop_running() -> None:
    """redis-py's ``RedisCluster(...)`` reads the slot map from its seeds in its constructor; built
    in ``RedisStore()`` on the event loop, a seed that accepts and never answers froze trio for the
    socket timeout per seed (2 s each), then ``RedisStore()`` raised. The store builds it in a
    worker thread on its first call: this task accepts the store's connection (trio runs) while
    that call still waits for the seed, and the call then fails as an outage."""
    with await _silent_seed() as seed, trio.fail_after(TIMEOUT):
        store = RedisStore(f"redis+cluster://127.0.0.1:{seed.getsockname()[1]}", socket_timeout=0.5)
        try:
            failed = trio.Event()

            async def ping() -> None:
                with pytest.raises(StoreUnavailable):
                    await store.ping()
                failed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ping)
                connection, _ = await seed.accept()  # on the loop, while the store connects
                with connection:
                    assert not failed.is_set()  # the store call still waits for its answer
                    await failed.wait()  # its socket timeout, then an outage
        finally:
            await store.aclose()


async def test_a_relay_on_a_silent_cluster_starts_and_stays_alive(tmp_path: Path) -> None:
    """``rescue relay --redis-url redis+cluster://…`` whose one seed never answers: the relay
    starts (registration fails as a store outage, as with an unreachable single server) and its
    ``/livez`` answers within the probe's 1 s while its store connects to the seed again. It used
    to stop answering anything for 2 s, then exit 1 with RedisClusterException."""
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(TestKeys().jwks()))
    log = tmp_path / "relay.log"
    with await _silent_seed() as seed, trio.fail_after(TIMEOUT):
        url = f"redis+cluster://127.0.0.1:{seed.getsockname()[1]}"
        relay, listening = await start_relay_process(
            jwks, log, "--node-id", "n-silent", "--redis-url", url, "--register-ttl-s", "3",
            "--drain-s", "0.5",
        )  # fmt: skip
        held: list[trio.socket.SocketType] = []
        try:
            admin = f"http://127.0.0.1:{listening['admin_port']}"
            held.append((await seed.accept())[0])  # the first attempt's connection (it gave up: 1 s deadline)
            async with httpx.AsyncClient() as http:
                for _ in range(2):  # the next registrations connect to the seed again
                    held.append((await seed.accept())[0])
                    answer = await http.get(f"{admin}/livez", timeout=1.0)
                    assert (answer.status_code, answer.json()["status"]) == (200, "ok")
                    assert relay.poll() is None
            relay.send_signal(signal.SIGTERM)
            assert await relay.wait() == 0, log.read_text(errors="replace")[-2000:]
        finally:
            for connection in held:
                connection.close()
            with trio.CancelScope(shield=True):
                if relay.returncode is None:
                    relay.kill()
                    await relay.wait()
    events = [json.loads(line).get("event") for line in log.read_text().splitlines() if line.startswith("{")]
    assert "relay.register_failed" in events


async def test_concurrent_mints_through_one_cluster_store(redis_cluster_url: str) -> None:
    """The store's worker threads share one RedisCluster client: 200 concurrent token decisions (100
    sessions, both peers each) all succeed, both peers of a session get one node, and every token
    is counted exactly once."""
    store = RedisStore(redis_cluster_url)
    guardrails = Guardrails(store)
    now = time.time()
    try:
        with trio.fail_after(TIMEOUT):
            await store.set_cohort_enabled("beta", True)
            for node_id in ("n-a", "n-b", "n-c"):
                await store.register_node(NodeInfo(node_id, f"wss://{node_id}/v1/connect"), ttl=60)
            nodes: dict[str, set[str]] = {}

            async def mint(session: str) -> None:
                _, node = await guardrails.decide("beta", session, now=now, ttl=60, require_node=True)
                assert node is not None
                nodes.setdefault(session, set()).add(node.node_id)

            async with trio.open_nursery() as nursery:
                for i in range(100):
                    for _ in ("host", "guest"):
                        nursery.start_soon(mint, f"c-{i}")
            assert len(nodes) == 100
            assert all(len(n) == 1 for n in nodes.values())
            assert len(set().union(*nodes.values())) == 3  # rendezvous spread them over the nodes
            assert (await store.hour_counts("beta", [hour_bucket(now)]))[0].tokens == 200
    finally:
        await store.aclose()


async def test_a_cluster_failover_keeps_the_kill_switch_and_minting() -> None:
    """Three masters with a replica each. The master holding the kill switch is SIGKILLed: while
    its slots have no master, token decisions fail closed (StoreUnavailable); once the cluster
    promoted its replica, the pause set before the crash still holds, and after a resume the
    mints go on and are counted."""
    cluster = await trio.to_thread.run_sync(partial(start_redis_cluster, replicas=1))
    cluster.flush()  # and initialised
    store = RedisStore(cluster.url, probe_interval=0.1)
    guardrails = Guardrails(store)
    now = time.time()
    try:
        with trio.fail_after(TIMEOUT * 3):  # failure detection (node timeout 2 s) and an election
            await store.set_cohort_enabled("beta", True)
            await store.register_node(NodeInfo("n-1", "wss://n1/v1/connect"), ttl=600)
            await guardrails.decide("beta", "before", now=now, ttl=60, require_node=True)
            await guardrails.pause(reason="before the crash")
            dead = _master_of(cluster, "fallback:fleet")
            with cluster.node(dead) as master:  # its replica has the pause before the crash
                assert master.execute_command("WAIT", 1, 5000) == 1
            cluster.processes[dead].kill()
            cluster.processes[dead].wait()
            with pytest.raises(StoreUnavailable):
                await guardrails.decide("beta", "during", now=now, ttl=60, require_node=True)
            # the replica takes over; until then (and until every master has heard, CLUSTERDOWN)
            # every decision fails closed
            refusal = None
            while refusal is None:
                try:
                    await guardrails.decide("beta", "after", now=now, ttl=60, require_node=True)
                except StoreUnavailable:
                    await trio.sleep(0.2)
                except GuardrailError as exc:
                    refusal = exc
                else:
                    raise AssertionError("minted while paused")
            assert refusal.error == "fallback_paused"  # the kill switch survived the failover
            assert _master_of(cluster, "fallback:fleet") != dead
            await guardrails.resume()
            minted = failed = 0
            while minted < 3:
                try:
                    await guardrails.decide("beta", f"after-{minted}", now=now, ttl=60, require_node=True)
                    minted += 1
                except StoreUnavailable:  # a master still gossiping CLUSTERDOWN: fail closed, retry
                    failed += 1
                    await trio.sleep(0.2)
            # every token issued is counted; a refused attempt may have counted before it failed
            # (its counter's master answered, its assignment's did not): over, never under
            tokens = (await store.hour_counts("beta", [hour_bucket(now)]))[0].tokens
            assert 4 <= tokens <= 4 + failed
    finally:
        await store.aclose()
        cluster.stop()
