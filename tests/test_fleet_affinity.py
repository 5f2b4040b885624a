"""Both peers of a session end on one node while the fleet changes: real processes, short TTLs.

A private redis-server, ``rescue token-service --token-ttl 2`` and ``rescue relay`` nodes with
``--redis-url --token-service --assignment-ttl-s 2 --register-ttl-s 1.5``, all started through the
CLI (chaos/_fleet.py). Token lifetimes and assignments of seconds make "hours" a few seconds: an
assignment that were not kept alive would expire many times over during each test. The same
mechanism under MockClock for hours: tests/test_session_affinity.py.
"""

from __future__ import annotations

import importlib
import re
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from rescue.client import Connected, Reconnecting, TokenClient, TokenGrant, open_peer, prefetched
from rescue.guardrails import NodeInfo, rendezvous_pick
from rescue.protocol import CloseCode, Kind
from rescue.testing import TestPeer, seq_frame

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
fleet_mod: Any = importlib.import_module("chaos._fleet")

pytestmark = pytest.mark.redis

TTL_S = 2.0  # token lifetime and assignment keep-alive TTL: a few seconds stand for hours
TOKEN_SERVICE_ARGS = ("--token-ttl", "2")
RELAY_ARGS = ("--assignment-ttl-s", "2", "--register-ttl-s", "1.5", "--drain-s", "2")
# Bounds for a loaded shared machine; nothing here asserts timing.
TIMEOUT_S = 120


def short_ttl_fleet(work_dir: Path) -> Any:
    """Three relays of which two are started (the third is the scale-out), TTLs of seconds."""
    return fleet_mod.open_fleet(
        work_dir, nodes=3, start_nodes=2, token_service_args=TOKEN_SERVICE_ARGS, relay_args=RELAY_ARGS
    )


def sessions_moving_to(new: str, before: list[str], count: int, prefix: str) -> list[str]:
    """Session ids that rendezvous hashing would move to ``new`` once it joins ``before``."""
    after = [*before, new]
    out = []
    for i in range(10_000):
        sid = f"{prefix}-{i}"
        now = rendezvous_pick(sid, [NodeInfo(n, "ws://x") for n in after])
        assert now is not None
        if now.node_id == new:
            out.append(sid)
            if len(out) == count:
                return out
    raise AssertionError("no such sessions")


def node_of(fleet: Any, url: str) -> str:
    for node_id, port in fleet.relay_ports.items():
        if url == f"ws://127.0.0.1:{port}/v1/connect":
            return str(node_id)
    raise AssertionError(f"no node at {url}")


async def grant(fleet: Any, session: str, role: str) -> TokenGrant:
    return await TokenClient(fleet.api_url, session_id=session, role=role, cohort="dev")()


async def connect(fleet: Any, session: str, role: str) -> tuple[TestPeer, str]:
    g = await grant(fleet, session, role)
    return await TestPeer.connect(g.relay_url, token=g.token, session=session, role=role), node_of(
        fleet, g.relay_url
    )


async def pair(fleet: Any, session: str) -> tuple[TestPeer, TestPeer, str]:
    """Both peers ask for tokens at once (racing) and connect: they must land together."""
    got: dict[str, tuple[TestPeer, str]] = {}

    async def one(role: str) -> None:
        got[role] = await connect(fleet, session, role)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, "host")
        nursery.start_soon(one, "guest")
    (host, host_node), (guest, guest_node) = got["host"], got["guest"]
    assert host_node == guest_node, (session, host_node, guest_node)
    return host, guest, host_node


async def wait_registered(fleet: Any, expected: set[str]) -> None:
    while set(await fleet.registered_nodes()) != expected:
        await trio.sleep(0.05)


async def moves(fleet: Any) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{fleet.api_url}/metrics")).text
    return sum(
        float(m) for m in re.findall(r"^beach_rescue_assignment_moves_total\{[^}]*\} (\S+)$", text, re.M)
    )


async def test_sessions_stay_through_expiry_scale_out_and_one_peer_back_then_follow_a_drain(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with short_ttl_fleet(tmp_path) as fleet:
            # sessions that relay-3 would take over if assignments were not kept alive
            ids = sessions_moving_to("relay-3", ["relay-1", "relay-2"], 6, "stay")
            placed = {sid: await pair(fleet, sid) for sid in ids}
            await fleet.relay("relay-3").start()  # scale-out
            await wait_registered(fleet, {"relay-1", "relay-2", "relay-3"})
            await trio.sleep(3 * TTL_S)  # every assignment has outlived its TTL 3 times over
            for sid, (host, guest, node) in placed.items():
                # only the guest reconnects: it is sent where its host still is
                guest.abort()
                new_guest, new_node = await connect(fleet, sid, "guest")
                assert new_node == node, sid
                assert new_guest.welcome is not None
                assert new_guest.welcome.peer is not None  # the host is there, live
                placed[sid] = (host, new_guest, node)
            assert await moves(fleet) == 0

            # scale-in: the busiest node drains (SIGTERM); its peers race for fresh tokens
            counts: dict[str, int] = {}
            for _, _, node in placed.values():
                counts[node] = counts.get(node, 0) + 1
            leaving = max(counts, key=lambda n: counts[n])
            stopping = trio.Event()

            async def stop() -> None:
                assert await fleet.relay(leaving).stop(signal.SIGTERM) == 0
                stopping.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop)
                for sid, (host, guest, node) in placed.items():
                    if node != leaving:
                        continue
                    for peer in (host, guest):
                        closed = await peer.wait_closed()
                        assert closed.close is not None
                        assert closed.close.code == CloseCode.SERVER_SHUTDOWN
                        peer.abort()
                    host, guest, new_node = await pair(fleet, sid)
                    assert new_node != leaving
                    placed[sid] = (host, guest, new_node)
            assert await moves(fleet) == counts[leaving]
            for host, guest, _ in placed.values():
                await host.send(seq_frame(1, 16))
                while (await guest.receive())[1] != Kind.DATA:  # PEER events may come first
                    pass
                host.abort()
                guest.abort()


async def test_a_peer_with_a_stale_token_gets_wrong_node_and_the_sdk_follows_to_its_partner(
    tmp_path: Path,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with short_ttl_fleet(tmp_path) as fleet:
            sid = sessions_moving_to("relay-3", ["relay-1", "relay-2"], 1, "stale")[0]
            stale = await grant(fleet, sid, "guest")  # names relay-1 or relay-2; never used at once
            # a second one for the SDK: a relay admits each token once (issue 11)
            stale_too = await grant(fleet, sid, "guest")
            old_node = node_of(fleet, stale.relay_url)
            assert node_of(fleet, stale_too.relay_url) == old_node
            await fleet.relay("relay-3").start()
            await wait_registered(fleet, {"relay-1", "relay-2", "relay-3"})
            await trio.sleep(1.5 * TTL_S)  # the unused assignment expired: the host gets relay-3
            guest_events: list[Any] = []
            async with open_peer(fleet.api_url, sid, "host", psk=b"k" * 32, cohort="dev") as host:
                await host.wait_connected()
                # the raw protocol: HELLO with the stale (still valid) token is refused there
                refused = await TestPeer.connect(
                    stale.relay_url, token=stale.token, session=sid, role="guest", expect_welcome=False
                )
                closed = await refused.wait_closed()
                assert closed.close is not None
                assert closed.close.code == CloseCode.WRONG_NODE
                refused.abort()
                # the SDK, handed a stale token first, follows WRONG_NODE to the host's node
                tokens = prefetched(
                    stale_too, TokenClient(fleet.api_url, session_id=sid, role="guest", cohort="dev")
                )
                async with open_peer(
                    tokens, sid, "guest", psk=b"k" * 32, on_event=guest_events.append
                ) as guest:
                    await guest.wait_partner()
                    await host.send(0, b"over the right node")
                    received = await guest.receive()
                    assert getattr(received, "data", None) == b"over the right node"
            connected = [e for e in guest_events if isinstance(e, Connected)]
            assert [node_of(fleet, e.relay_url) for e in connected][-1:] == ["relay-3"]
            assert old_node != "relay-3"
            assert any(isinstance(e, Reconnecting) and e.code == CloseCode.WRONG_NODE for e in guest_events)
