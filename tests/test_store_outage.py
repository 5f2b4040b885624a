"""A stalled Redis must not stall everyone (issue #11): one deadline per request, a breaker, a probe.

With Redis SIGSTOPped, every call used to wait its 2 s socket timeout plus a retry: a lone token
request got 503 after 4 s and a burst of 50 queued behind the 16 worker threads for up to 16 s.
Now all the store work of one request shares one budget (``store_deadline``), and once a call has
failed the store is known down: calls fail at once, except one probe per interval, until the probe
finds Redis back. The breaker itself is pure and checked with Hypothesis.
"""

from __future__ import annotations

import math
import signal

import httpx
import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from rescue.errors import StoreUnavailable
from rescue.guardrails import Breaker, GuardrailConfig, Guardrails, RedisStore, store_deadline
from rescue.guardrails._deadline import Admission, current_store_budget, current_store_deadline
from rescue.guardrails._redis import REDIS_THREADS, TOKEN_SERVICE_REDIS_THREADS
from rescue.protocol import SigningKey
from rescue.relay._control import NodeRegistrar
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service

from .conftest import RedisServer

BODY = {
    "session_id": "outage-1",
    "role": "host",
    "cohort_id": "beta",
    "client_version": "test",
    "telemetry_opt_in": False,
}
BURST = 50
# Bounds on the wall clock, far from the old behaviour (4 s per lone request, 16 s for a burst)
# and far from the new one (0.5 s budget, then instant refusals), so load can't flip them.
LONE_BOUND_S = 1.5
BURST_BOUND_S = 4.0


# --- the breaker, pure ---------------------------------------------------------------------------

events = st.lists(
    st.tuples(st.floats(0, 2), st.sampled_from(["ok", "fail", "cancel"])), min_size=1, max_size=60
)


@given(events)
def test_breaker_lets_one_probe_at_a_time_and_never_refuses_while_closed(
    steps: list[tuple[float, str]],
) -> None:
    breaker = Breaker(probe_interval=0.5)
    now = 0.0
    outstanding: list[Admission] = []
    for gap, outcome in steps:
        now += gap
        was_open = breaker.open
        admission = breaker.admit(now)
        if not was_open:
            assert admission is Admission.GO
        if admission is Admission.PROBE:
            assert Admission.PROBE not in outstanding  # one probe at a time
        if admission is not Admission.REFUSE:
            outstanding.append(admission)
        # finish the oldest outstanding call
        if outstanding:
            done = outstanding.pop(0)
            ok = {"ok": True, "fail": False, "cancel": None}[outcome]
            breaker.done(done, ok=ok, now=now)
            if ok is True:
                assert not breaker.open
            if ok is False:
                assert breaker.open
                assert breaker.admit(now) is Admission.REFUSE  # no probe before the interval


def test_breaker_probes_after_the_interval_and_closes_on_success() -> None:
    breaker = Breaker(probe_interval=0.5)
    breaker.done(breaker.admit(0.0), ok=False, now=0.0)
    assert breaker.admit(0.4) is Admission.REFUSE
    probe = breaker.admit(0.5)
    assert probe is Admission.PROBE
    assert breaker.admit(0.6) is Admission.REFUSE  # the probe is still out
    breaker.done(probe, ok=False, now=0.7)
    assert breaker.admit(1.1) is Admission.REFUSE
    probe = breaker.admit(1.2)
    breaker.done(probe, ok=True, now=1.2)
    assert breaker.admit(1.2) is Admission.GO
    assert breaker.opened == 1


# --- a real, stalled Redis -----------------------------------------------------------------------


async def test_stalled_redis_fails_fast_then_recovers_through_a_probe(
    private_redis: RedisServer, stalled: list[RedisServer]
) -> None:
    store = RedisStore(private_redis.url, probe_interval=0.2)
    with trio.fail_after(10):
        await store.ping()
    private_redis.process.send_signal(signal.SIGSTOP)
    stalled.append(private_redis)
    with (
        trio.fail_after(LONE_BOUND_S),
        pytest.raises(StoreUnavailable, match="deadline"),
        store_deadline(0.3),
    ):
        await store.fleet_state()
    assert store.breaker.open
    # known down: no thread, no wait, no queue
    with trio.fail_after(0.5):
        for _ in range(BURST):
            with pytest.raises(StoreUnavailable, match="known down"):
                await store.cohort_enabled("beta")
    assert store.breaker.refused >= BURST - 1
    assert store.in_flight <= 2  # the stalled call (and at most one probe) hold a thread
    private_redis.process.send_signal(signal.SIGCONT)
    with trio.fail_after(10):
        while True:  # a probe goes every 0.2 s; the first after the restart succeeds
            try:
                with store_deadline(1.0):
                    await store.ping()
                break
            except StoreUnavailable:
                await trio.sleep(0.05)
    assert not store.breaker.open
    with trio.fail_after(10):
        await store.aclose()
    assert store.in_flight == 0


def _token_service(store: RedisStore) -> TokenService:
    """A token service on ``store`` with a throwaway key (no OIDC)."""
    return TokenService(
        TokenServiceConfig(
            keys=PublishedKeys(SigningKey.generate()), disable_oidc=True, relay_url="ws://r/v1/connect"
        ),
        Guardrails(store, GuardrailConfig()),
    )


async def test_token_requests_against_a_stalled_redis_get_fast_503s(
    private_redis: RedisServer, stalled: list[RedisServer]
) -> None:
    store = RedisStore(private_redis.url)
    service = _token_service(store)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}/v1/fallback/token"
        async with httpx.AsyncClient(timeout=30) as http:
            with trio.fail_after(10):
                await store.set_cohort_enabled("beta", True)
                assert (await http.post(url, json=BODY)).status_code == 200
            private_redis.process.send_signal(signal.SIGSTOP)
            stalled.append(private_redis)
            with trio.fail_after(LONE_BOUND_S):
                lone = await http.post(url, json=BODY)
            assert lone.status_code == 503
            assert lone.json()["error"] == "guardrail_store_unavailable"
            answers: list[httpx.Response] = []

            async def one() -> None:
                answers.append(await http.post(url, json=BODY))

            with trio.fail_after(BURST_BOUND_S):
                async with trio.open_nursery() as burst:
                    for _ in range(BURST):
                        burst.start_soon(one)
            assert [a.status_code for a in answers] == [503] * BURST
            assert {a.json()["error"] for a in answers} == {"guardrail_store_unavailable"}
            private_redis.process.send_signal(signal.SIGCONT)
            with trio.fail_after(10):
                while (await http.post(url, json=BODY)).status_code != 200:
                    await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    with trio.fail_after(10):
        await store.aclose()


async def test_scrapes_and_health_probes_during_an_outage_are_not_counted_as_store_errors(
    private_redis: RedisServer, stalled: list[RedisServer]
) -> None:
    """``beach_fallback_store_errors_total`` counts the requests the store failed, by route: a
    mint and a relay's status poll, not the operator's scrapes or the orchestrator's probes
    (before, every /metrics scrape and /healthz probe during an outage counted one: the error
    rate an operator read was the scrape and probe rate)."""
    store = RedisStore(private_redis.url)
    service = _token_service(store)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with trio.fail_after(10):
                await store.set_cohort_enabled("beta", True)
                assert (await http.post("/v1/fallback/token", json=BODY)).status_code == 200
            private_redis.process.send_signal(signal.SIGSTOP)
            stalled.append(private_redis)
            with trio.fail_after(30):
                for _ in range(10):  # Prometheus and a readiness probe, while Redis is stalled
                    assert (await http.get("/metrics")).status_code == 200
                    health = await http.get("/healthz")
                    assert (health.status_code, health.json()["status"]) == (503, "store_unavailable")
                for _ in range(2):
                    mint = await http.post("/v1/fallback/token", json=BODY)
                    assert (mint.status_code, mint.json()["error"]) == (503, "guardrail_store_unavailable")
                assert (await http.get("/v1/fallback/status")).status_code == 503
                scrape = (await http.get("/metrics")).text
            private_redis.process.send_signal(signal.SIGCONT)
        nursery.cancel_scope.cancel()
    with trio.fail_after(10):
        await store.aclose()
    (family,) = (f for f in text_string_to_metric_families(scrape) if f.name == "beach_fallback_store_errors")
    errors = {s.labels.get("route", ""): s.value for s in family.samples if s.name.endswith("_total")}
    assert sum(errors.values()) == 3  # the old code: 24 (3 + 10 scrapes + 10 probes + this scrape)
    assert {route: n for route, n in errors.items() if n} == {
        "/v1/fallback/token": 2,
        "/v1/fallback/status": 1,
    }
    assert errors["/v1/fallback/activations"] == 0  # every route that uses the store, from the start
    assert "/metrics" not in errors
    assert "/healthz" not in errors
    # what the scrape itself says (scrapes reach a replica that is not ready: decision 0021)
    (up,) = (f for f in text_string_to_metric_families(scrape) if f.name == "beach_fallback_store_up")
    assert [s.value for s in up.samples] == [0]


# --- a saturated process is not a store outage (issue #13) ----------------------------------------
#
# Under a CPU-bound token storm requests waited for one of the store's worker threads longer than
# their store budget, and the breaker then refused everyone although Redis was healthy. The budget
# now counts store time only: waiting for a thread is given back (StoreBudget.pause).


async def test_store_budget_gives_back_the_time_spent_waiting(mock_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    assert current_store_budget() is None
    with store_deadline(0.5):
        outer = current_store_budget()
        assert outer is not None
        with store_deadline(0.2):  # a shorter inner block: its own budget
            inner = current_store_budget()
            assert inner is not None
            assert inner is not outer
            mock_clock.jump(3.0)
            inner.pause(3.0)  # three seconds queued for a thread: not the store's
            assert current_store_deadline() == start + 3.2
        assert current_store_deadline() == start + 3.5  # the outer block was paused too
        with store_deadline(9.0):  # a longer inner block keeps the earlier deadline
            assert current_store_budget() is outer
        outer.pause(-1.0)  # nothing to give back
        assert current_store_deadline() == start + 3.5
    assert current_store_deadline() == math.inf


async def test_a_saturated_thread_pool_with_a_healthy_redis_queues_and_keeps_the_breaker_closed(
    private_redis: RedisServer, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.rate = 1.0  # real time passes (the calls are real), plus the jump below
    store = RedisStore(private_redis.url)
    with trio.fail_after(10):
        await store.set_cohort_enabled("beta", True)
    # every worker thread busy (as at 100 % CPU under a storm): the call waits for one
    holders = [object() for _ in range(REDIS_THREADS)]
    for holder in holders:
        await store._limiter.acquire_on_behalf_of(holder)
    answers: list[bool] = []

    async def request() -> None:
        with store_deadline(2.0):
            answers.append(await store.cohort_enabled("beta"))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()
            mock_clock.jump(10.0)  # five budgets spent waiting for a thread
            for holder in holders:
                store._limiter.release_on_behalf_of(holder)
    assert answers == [True]
    assert not store.breaker.open
    assert store.breaker.opened == 0
    with trio.fail_after(10):
        await store.aclose()


@pytest.mark.parametrize("threads", [REDIS_THREADS, TOKEN_SERVICE_REDIS_THREADS])
async def test_a_stalled_redis_refuses_the_calls_queued_for_a_thread_at_once(
    private_redis: RedisServer, stalled: list[RedisServer], threads: int
) -> None:
    """Waiting for a thread is not store time, so the calls queued behind calls stuck on a stalled
    Redis must not wait for those threads (2 s socket timeouts): the first overrun opens the
    breaker and refuses them. Exactly ``threads`` calls reach Redis (the relay's 16, the token
    service's 4)."""
    store = RedisStore(private_redis.url, probe_interval=5.0, threads=threads)
    with trio.fail_after(10):
        await store.ping()
    private_redis.process.send_signal(signal.SIGSTOP)
    stalled.append(private_redis)
    errors: list[str] = []

    async def request() -> None:
        with store_deadline(0.3), pytest.raises(StoreUnavailable) as caught:
            await store.cohort_enabled("beta")
        errors.append(str(caught.value))

    with trio.fail_after(LONE_BOUND_S):
        async with trio.open_nursery() as nursery:
            for _ in range(3 * threads):
                nursery.start_soon(request)
    assert store.breaker.open
    assert store.breaker.opened == 1
    assert len(errors) == 3 * threads
    assert sum("deadline" in e for e in errors) == threads  # the calls that reached Redis
    assert sum("known down" in e for e in errors) == 2 * threads  # the queued ones
    private_redis.process.send_signal(signal.SIGCONT)
    with trio.fail_after(10):
        await store.aclose()


async def test_a_registration_write_in_flight_at_shutdown_lands_before_the_removal(
    private_redis: RedisServer, stalled: list[RedisServer]
) -> None:
    """SIGTERM makes the registrar write a draining record; on a node with nothing to drain its
    services are cancelled a moment later. That write used to be abandoned to its worker thread
    and could land after the removal, leaving a dead node listed until its TTL (seen in CI: the
    supervisor test found ``edge-1`` still registered after both nodes exited 0)."""
    store = RedisStore(private_redis.url)
    registrar = NodeRegistrar(store, node_id="edge-1", public_url="ws://127.0.0.1:1/v1/connect", ttl=30)
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            async with trio.open_nursery() as services:
                await services.start(registrar.run)
                private_redis.process.send_signal(signal.SIGSTOP)
                stalled.append(private_redis)
                registrar.set_draining()
                while store.in_flight == 0:  # the draining write has reached its worker thread
                    await trio.sleep(0.001)

                async def resume() -> None:
                    await trio.sleep(0.05)
                    private_redis.process.send_signal(signal.SIGCONT)

                outer.start_soon(resume)
                services.cancel_scope.cancel()
            # cancelling waited for the write instead of abandoning it mid-round-trip
            assert store.in_flight == 0
            assert [n.draining for n in await store.live_nodes()] == [True]
            assert await registrar.remove()
    assert await store.live_nodes() == []
    await store.aclose()
