"""A real Sentinel failover under a real token service and a real relay (``redis+sentinel://``).

A primary, a replica and three sentinels (tests/conftest.py). ``rescue token-service`` and
``rescue relay`` both get the sentinel URL, as an operator would pass it. The primary is SIGKILLed;
while no primary answers the token service must fail closed (503 ``guardrail_store_unavailable``,
never a token, also not for an admin trying to resume); then the sentinels promote the replica
(``SENTINEL FAILOVER``) and minting, the kill switch (set before the failover, so it must still
hold) and the counters carry on, with the relay's registration back on the new primary.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
import trio

from rescue.errors import StoreUnavailable
from rescue.guardrails import FleetState, RedisStore, counter_key, hour_bucket
from rescue.protocol import b64url_decode, verify_token
from rescue.testing import TestKeys

from .conftest import (
    ADMIN_AUTH,
    SENTINEL_MASTER,
    SERVICE_AUTH,
    SentinelServers,
    relay_process,
    token_request,
    token_service_process,
)

pytestmark = pytest.mark.redis

TIMEOUT = 90  # three processes, a failover and gossip between sentinels on a loaded 2-core box
NODE_ID = "sentinel-node"
SVC, ADMIN = SERVICE_AUTH, ADMIN_AUTH


def _counted(servers: SentinelServers, index: int, field: str) -> int:
    """``field`` of the beta counters (this and the previous hour) on data server ``index``."""
    now = time.time()
    with servers.data_client(index) as client:
        return sum(
            int(client.hget(counter_key("beta", hour_bucket(t)), field) or 0) for t in (now, now - 3600)
        )


async def test_failover_keeps_minting_the_kill_switch_and_counters_and_fails_closed_in_between(
    tmp_path: Path, redis_sentinel: SentinelServers
) -> None:
    servers = redis_sentinel
    keys = TestKeys()
    key_file = tmp_path / "signing.jwk"
    key_file.write_text(json.dumps(keys.signing.to_jwk(private=True)))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    issued = 0

    async def mint(client: httpx.AsyncClient, session: str) -> httpx.Response:
        nonlocal issued
        r = await client.post("/v1/fallback/token", json=token_request(session), headers=SVC)
        if r.status_code == 200:
            issued += 1
        return r

    async def aud(client: httpx.AsyncClient, session: str) -> str | None:
        r = await mint(client, session)
        if r.status_code != 200:
            return None
        return verify_token(b64url_decode(r.json()["token"]), keys.ring, now=time.time()).aud

    with trio.fail_after(TIMEOUT):
        async with (
            relay_process(jwks, servers.url, NODE_ID, tmp_path / "relay.log") as relay,
            token_service_process(str(key_file), servers.url) as (_, port),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client,
        ):
            r = await client.put("/v1/admin/cohorts/beta", json={"fallback_ws_enabled": True}, headers=ADMIN)
            assert r.status_code == 200
            # the relay registered through the sentinels: the token service assigns sessions to it
            while await aud(client, "s-before") != NODE_ID:
                await trio.sleep(0.1)
            r = await client.post("/v1/sessions/started", json={"cohort": "beta", "count": 5}, headers=SVC)
            assert r.status_code == 200
            for i in range(3):
                assert (await mint(client, f"s{i}")).status_code == 200
            r = await client.post("/v1/admin/pause", json={"reason": "drill"}, headers=ADMIN)
            assert r.json()["paused"] is True
            with servers.data_client(0) as primary:  # the replica has the pause before the crash
                assert primary.execute_command("WAIT", 1, 5000) == 1

            servers.data[0].kill()
            servers.data[0].wait()
            # no primary: fail closed, whatever is asked, for as long as it lasts
            for i in range(5):
                r = await mint(client, f"gap-{i}")
                assert (r.status_code, r.json()["error"]) == (503, "guardrail_store_unavailable")
                await trio.sleep(0.2)
            r = await client.post("/v1/admin/resume", headers=ADMIN)
            assert r.status_code == 503
            r = await client.get("/healthz")
            assert (r.status_code, r.json()["fallback_paused"]) == (503, True)

            with servers.sentinel_client(0) as sentinel:
                assert sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
            new_primary = servers.data_ports[1]
            for i in range(len(servers.sentinel_ports)):  # every sentinel names the new primary
                while servers.master_port(i) != new_primary:
                    await trio.sleep(0.1)
            # the kill switch set before the failover still holds on the promoted replica
            while (r := await mint(client, "after")).status_code == 503:
                await trio.sleep(0.1)
            assert (r.status_code, r.json()["error"]) == (403, "fallback_paused")
            r = await client.post("/v1/admin/resume", headers=ADMIN)
            assert (r.status_code, r.json()["paused"]) == (200, False)
            # minting again, on the relay, whose registration is back on the new primary
            while await aud(client, "s-after") != NODE_ID:
                await trio.sleep(0.1)
            r = await client.post("/v1/sessions/started", json={"cohort": "beta", "count": 5}, headers=SVC)
            assert r.status_code == 200
            # counters: every token issued and every session reported, before and after
            assert _counted(servers, 1, "tokens") == issued
            assert _counted(servers, 1, "sessions") == 10
            assert relay.returncode is None  # the relay rode the outage out


async def test_a_graceful_failover_moves_writes_to_the_new_primary(redis_sentinel: SentinelServers) -> None:
    """``SENTINEL FAILOVER`` with the primary alive: it is demoted to a replica, so the store's pooled
    connections to it answer writes with READONLY; the store must end up writing on the new primary."""
    servers = redis_sentinel
    store = RedisStore(servers.url)
    now = time.time()
    try:
        with trio.fail_after(TIMEOUT):
            # the sentinels want their password: the URL's sentinel_password option is what gets in
            unauthenticated = RedisStore(servers.url.partition("?")[0])
            with pytest.raises(StoreUnavailable):
                await unauthenticated.ping()
            await unauthenticated.aclose()
            await store.set_cohort_enabled("beta", True)
            assert await store.record_mint("beta", now=now, session_id="s", node_id="n-1", ttl=60) == "n-1"
            with servers.sentinel_client(0) as sentinel:
                assert sentinel.execute_command("SENTINEL", "FAILOVER", SENTINEL_MASTER)
            for i in range(len(servers.sentinel_ports)):
                while servers.master_port(i) != servers.data_ports[1]:
                    await trio.sleep(0.1)
            with servers.data_client(0) as old:
                while old.info("replication")["role"] != "slave":
                    await trio.sleep(0.1)
            written = 0
            while written < 3:  # StoreUnavailable (fail closed) at most while the switch-over lasts
                try:
                    await store.set_fleet_state(FleetState(paused=True, reason="after", since=now))
                    await store.record_mint("beta", now=now, session_id="s", node_id="n-2", ttl=60)
                    written += 1
                except StoreUnavailable:
                    await trio.sleep(0.1)
            with servers.data_client(1) as new:
                assert new.hget("fallback:fleet", "reason") == "after"
                assert new.hget(counter_key("beta", hour_bucket(now)), "tokens") == "4"
            snapshot = await store.mint_snapshot("beta", now=now)
            assert snapshot.fleet.paused
            assert snapshot.cohort_enabled
    finally:
        await store.aclose()
