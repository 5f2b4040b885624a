"""A copy of a live token must not displace its peer (issue 11).

The relay remembers every admitted token's ``cti`` for the token's remaining lifetime plus clock
skew: in memory on one node, and in the fleet's Redis (SET NX PX, naming the node) when it has one.
A used token is admitted again only into an empty role slot of the same node; a fresh token for the
same role still takes over (``REPLACED``): that is how a real peer reconnects.
"""

from __future__ import annotations

import os
import time

import pytest
import trio

from rescue._codes import CloseCode
from rescue.guardrails import MemoryStore, RedisStore
from rescue.protocol import CLOCK_SKEW, verify_token
from rescue.relay import Relay
from rescue.relay._replay import TokenReplayGuard, UsedTokens
from rescue.testing import TestKeys, TestPeer, relay_test_config, start_test_relay

TIMEOUT = 30

# --------------------------------------------------------------------------- sans-I/O table


def test_a_cti_is_used_once_until_its_token_can_no_longer_be_used() -> None:
    used = UsedTokens()
    cti = os.urandom(16)
    assert used.first_use(cti, exp=1000.0, now=900.0)
    assert not used.first_use(cti, exp=1000.0, now=901.0)
    assert not used.first_use(cti, exp=1000.0, now=1000.0 + CLOCK_SKEW - 0.5)  # still within skew
    assert used.first_use(cti, exp=1000.0, now=1000.0 + CLOCK_SKEW + 0.5)  # the relay refuses it anyway


def test_the_table_is_bounded_and_forgets_expired_entries() -> None:
    used = UsedTokens(max_entries=100)
    for i in range(1000):  # none expires: the oldest are forgotten (fail open for those)
        assert used.first_use(i.to_bytes(16, "big"), exp=1e9, now=float(i))
        assert len(used) <= 100
    assert used.evicted == 900
    # time passes: every entry expires and the table drains as it is used
    quiet = UsedTokens(max_entries=1000)
    for i in range(100):
        quiet.first_use(i.to_bytes(16, "big"), exp=10.0, now=0.0)
    for i in range(100):
        quiet.first_use((1000 + i).to_bytes(16, "big"), exp=10_000.0, now=5_000.0)
    assert len(quiet) == 100
    assert quiet.evicted == 0


async def test_a_store_outage_leaves_the_verdict_to_this_node_and_is_counted() -> None:
    keys = TestKeys()
    guard = TokenReplayGuard("node-a")
    store = MemoryStore()
    guard.store = store
    claims = verify_token(keys.mint("s", "host"), keys.ring, now=time.time())
    store.available = False
    assert await guard.check(claims, claims.iat) == "first"
    assert guard.outcomes["store_error"] == 1
    store.available = True
    assert await guard.check(claims, claims.iat) == "reused"  # this node still remembers it
    other = TokenReplayGuard("node-b")
    other.store = store
    assert await other.check(claims, claims.iat) == "elsewhere"


# ------------------------------------------------------------------------------- real relays


async def test_a_copied_token_cannot_displace_the_live_peer(nursery: trio.Nursery) -> None:
    with trio.fail_after(TIMEOUT):
        relay, url, keys = await start_test_relay(nursery)
        token = keys.mint("copy", "host")
        host = await TestPeer.connect(url, token=token, session="copy", role="host")
        guest = await TestPeer.connect(url, keys, session="copy", role="guest")
        assert (await host.receive_peer_event()).event == "joined"

        thief = await TestPeer.connect(url, token=token, session="copy", role="host", expect_welcome=False)
        closed = await thief.wait_closed()
        assert closed.wire_code == CloseCode.TOKEN_EXPIRED  # "fetch a fresh token": a thief cannot
        assert closed.close is not None
        assert closed.close.code == CloseCode.TOKEN_EXPIRED
        assert "token already used" in closed.close.reason
        assert relay.replay.outcomes["refused_live"] == 1

        # the live host was not displaced: data still flows
        frame = b"\x01\x01\x00\x00" + bytes(8) + b"still here"
        await guest.send(frame)
        assert await host.receive() == frame
        text, _ = relay.metrics.render()
        assert b'beach_rescue_token_uses_total{outcome="refused_live"} 1.0' in text

        # a fresh token for the same role still takes over (the reconnect rule)
        again = await TestPeer.connect(url, keys, session="copy", role="host")
        assert (await host.wait_closed()).wire_code == CloseCode.REPLACED
        # ...and once the role's slot is empty, the old token may fill it (a peer reconnecting
        # while its token service is down)
        assert (await guest.receive_peer_event()).event == "rejoined"
        await again.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        back = await TestPeer.connect(url, token=token, session="copy", role="host")
        assert relay.replay.outcomes["reused"] == 1
        for peer in (back, guest):
            await peer.aclose()


@pytest.mark.redis
async def test_a_token_used_on_one_node_is_refused_by_another(redis_url: str) -> None:
    keys = TestKeys()
    stores = [RedisStore(redis_url) for _ in range(2)]  # given to the relays, so closed here
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            urls = []
            relays = []
            for node, store in zip(("node-a", "node-b"), stores, strict=True):
                relay = Relay(relay_test_config(node_id=node), keys=keys.ring, store=store)
                relays.append(relay)
                urls.append((await nursery.start(relay.run)).url)
            token = keys.mint("fleet", "host")  # aud "*": any node would take it
            host = await TestPeer.connect(urls[0], token=token, session="fleet", role="host")
            copy = await TestPeer.connect(
                urls[1], token=token, session="fleet", role="host", expect_welcome=False
            )
            closed = await copy.wait_closed()
            assert closed.wire_code == CloseCode.TOKEN_EXPIRED
            assert relays[1].replay.outcomes["refused_elsewhere"] == 1
            assert relays[0].replay.outcomes["first"] == 1
            await host.aclose()
            for relay in relays:
                relay.shutdown()
            nursery.cancel_scope.cancel()
        for store in stores:
            await store.aclose()
