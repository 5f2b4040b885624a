"""A full relay node (max_sessions, or its connection cap turning newcomers away) says so in its
registry record, and the token service sends new sessions elsewhere while its own stay.

The registrar's timing under ``MockClock`` over a ``MemoryStore`` (whose expiry follows trio's
clock); then real processes: a private redis-server, ``rescue token-service`` and two ``rescue
relay`` nodes started through the CLI (chaos/_fleet.py), real sockets, real capacity limits.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from rescue.client import TokenClient, TokenServiceUnavailable
from rescue.guardrails import MemoryStore, NodeInfo, rendezvous_pick
from rescue.relay._control import FULL_CHECK_S, FULL_WRITE_INTERVAL_S, NodeRegistrar
from rescue.testing import TestPeer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
fleet_mod: Any = importlib.import_module("chaos._fleet")

REGISTER_TTL = 15.0  # refreshed every 5 s


class CountingStore(MemoryStore):
    """A MemoryStore that counts registry writes (ours: the point is how many reach the store)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[NodeInfo] = []

    async def register_node(self, node: NodeInfo, *, ttl: float) -> None:
        self.writes.append(node)
        await super().register_node(node, ttl=ttl)


async def recorded_full(store: MemoryStore) -> bool:
    [node] = await store.live_nodes()
    return node.full


async def wait_recorded(store: MemoryStore, full: bool) -> float:
    """Mock seconds until the record says ``full`` (bounded)."""
    started = trio.current_time()
    with trio.fail_after(10):
        while await recorded_full(store) != full:
            await trio.sleep(0.01)
    return trio.current_time() - started


async def test_registrar_writes_a_change_of_full_promptly_and_once(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CountingStore()
    state = {"full": False}
    registrar = NodeRegistrar(
        store, node_id="n1", public_url="ws://n1/v1/connect", ttl=REGISTER_TTL, full=lambda: state["full"]
    )
    await nursery.start(registrar.run)
    assert len(store.writes) == 1
    assert not await recorded_full(store)
    await trio.sleep(1.0)
    assert len(store.writes) == 1  # nothing changed, no refresh due: no write

    state["full"] = True
    assert await wait_recorded(store, True) <= FULL_CHECK_S + 0.02
    assert len(store.writes) == 2
    assert registrar.full
    assert registrar.full_changes == {"full": 1, "not_full": 0}
    # a place frees and is taken again within the interval after that write: no write at all
    state["full"] = False
    await trio.sleep(FULL_WRITE_INTERVAL_S / 2)
    state["full"] = True
    await trio.sleep(2.0)
    assert len(store.writes) == 2  # still full: nothing to write until the refresh
    # a place frees for good: one write, within a check period
    state["full"] = False
    assert await wait_recorded(store, False) <= FULL_CHECK_S + 0.02
    assert len(store.writes) == 3
    # the periodic refresh goes on, carrying the state
    await trio.sleep(REGISTER_TTL / 3 + 0.1)
    assert len(store.writes) == 4
    assert not store.writes[-1].full


async def test_a_node_flapping_at_its_limit_costs_at_most_one_write_per_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CountingStore()
    state = {"full": False}
    registrar = NodeRegistrar(
        store, node_id="n1", public_url="ws://n1/v1/connect", ttl=REGISTER_TTL, full=lambda: state["full"]
    )
    await nursery.start(registrar.run)
    flap_s = 60.0
    started = trio.current_time()
    while trio.current_time() - started < flap_s:  # a session comes and goes every 10 ms
        state["full"] = not state["full"]
        await trio.sleep(0.01 + 0.003 * (int(trio.current_time() * 1000) % 7))
    writes = len(store.writes) - 1
    periodic = flap_s / (REGISTER_TTL / 3)
    assert writes <= flap_s / FULL_WRITE_INTERVAL_S + periodic + 1, writes
    assert registrar.full_changes["full"] + registrar.full_changes["not_full"] <= writes
    # it settles: the record follows within one interval
    state["full"] = True
    assert await wait_recorded(store, True) <= FULL_WRITE_INTERVAL_S + FULL_CHECK_S
    state["full"] = False
    assert await wait_recorded(store, False) <= FULL_WRITE_INTERVAL_S + FULL_CHECK_S


async def test_a_failed_change_write_is_retried_within_an_interval(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CountingStore()
    state = {"full": False}
    registrar = NodeRegistrar(
        store, node_id="n1", public_url="ws://n1/v1/connect", ttl=REGISTER_TTL, full=lambda: state["full"]
    )
    await nursery.start(registrar.run)
    failing = {"on": True}
    real = store.register_node

    async def flaky(node: NodeInfo, *, ttl: float) -> None:
        if failing["on"]:
            from rescue.errors import StoreUnavailable

            store.writes.append(node)
            raise StoreUnavailable("down")
        await real(node, ttl=ttl)

    store.register_node = flaky  # type: ignore[method-assign]
    state["full"] = True
    await trio.sleep(FULL_WRITE_INTERVAL_S * 3 + FULL_CHECK_S)
    assert registrar.outcomes["error"] in (3, 4)  # once per interval, not once per check
    assert not registrar.full
    failing["on"] = False
    assert await wait_recorded(store, True) <= FULL_WRITE_INTERVAL_S + FULL_CHECK_S
    assert registrar.full


async def test_without_a_capacity_check_the_node_is_never_full(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    store = CountingStore()
    registrar = NodeRegistrar(store, node_id="n1", public_url="ws://n1/v1/connect", ttl=REGISTER_TTL)
    await nursery.start(registrar.run)
    await trio.sleep(REGISTER_TTL - 1)  # the refreshes at 0, 5 and 10 s (clear of the one at 15)
    assert [w.full for w in store.writes] == [False] * 3


# --- real processes ---------------------------------------------------------------------------------

TIMEOUT_S = 120  # the whole test on a loaded shared machine; a few seconds when it passes
PROMPT_S = 10.0  # one condition (registry rewritten: within a second or so)


def sessions_for(node_id: str, ids: list[str], count: int, prefix: str) -> list[str]:
    """Session ids whose rendezvous pick among ``ids`` is ``node_id``."""
    out = []
    for i in range(10_000):
        sid = f"{prefix}-{i}"
        pick = rendezvous_pick(sid, [NodeInfo(n, "ws://x") for n in ids])
        assert pick is not None
        if pick.node_id == node_id:
            out.append(sid)
            if len(out) == count:
                return out
    raise AssertionError("no such sessions")


async def eventually(condition: Callable[[], Any], what: str) -> Any:
    """Poll an async condition until it returns something truthy (bounded); its value."""
    last: Any = None
    try:
        with trio.fail_after(PROMPT_S):
            while not (last := await condition()):
                await trio.sleep(0.05)
    except trio.TooSlowError:
        raise AssertionError(f"never: {what} (last: {last!r})") from None
    return last


async def registry(fleet: Any) -> dict[str, dict[str, Any]]:
    async with httpx.AsyncClient() as http:
        answer = await http.get(
            f"{fleet.api_url}/v1/admin/nodes", headers={"authorization": f"Bearer {fleet.admin_key}"}
        )
    return {n["id"]: n for n in answer.json()["nodes"]}


async def registered_full(fleet: Any, node_id: str, full: bool) -> None:
    async def check() -> bool:
        return bool((await registry(fleet)).get(node_id, {}).get("full") is full)

    await eventually(check, f"{node_id} registered with full={full}")


def node_of(fleet: Any, url: str) -> str:
    for node_id, port in fleet.relay_ports.items():
        if url == f"ws://127.0.0.1:{port}/v1/connect":
            return str(node_id)
    raise AssertionError(f"no node at {url}")


async def token_node(fleet: Any, session: str, role: str = "host") -> str:
    grant = await TokenClient(fleet.api_url, session_id=session, role=role, cohort="dev")()
    return node_of(fleet, grant.relay_url)


async def connect(fleet: Any, session: str, role: str) -> tuple[TestPeer, str]:
    grant = await TokenClient(fleet.api_url, session_id=session, role=role, cohort="dev")()
    peer = await TestPeer.connect(grant.relay_url, token=grant.token, session=session, role=role)
    return peer, node_of(fleet, grant.relay_url)


async def relay_ready(fleet: Any, node_id: str) -> bool:
    async with httpx.AsyncClient() as http:
        port = fleet.relay_admin_ports[node_id]
        return (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200


async def relay_metric(fleet: Any, node_id: str, sample: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{fleet.relay_admin_ports[node_id]}/metrics")).text
    return float(next(x for x in text.splitlines() if x.startswith(sample + " ")).rsplit(" ", 1)[1])


async def no_relay_total(fleet: Any, reason: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{fleet.api_url}/metrics")).text
    line = f'beach_fallback_no_relay_total{{reason="{reason}"}} '
    return float(next(x for x in text.splitlines() if x.startswith(line)).rsplit(" ", 1)[1])


@pytest.mark.redis
async def test_a_node_at_its_connection_cap_gets_no_new_sessions_until_a_slot_frees(tmp_path: Path) -> None:
    """Two relays of two connections each: a paired session fills one, the token service names
    the other for sessions that would hash to it; with both full a new session is 503
    no_relay_available; one free slot is not room for a new session (two peers) but lets the
    session's own peer back; two free slots and the node is assigned again."""
    with trio.fail_after(TIMEOUT_S):
        # records rewritten every 0.5 s, so "no write changed it" is a short wait
        relay_args = ("--max-connections", "2", "--register-ttl-s", "1.5")
        async with fleet_mod.open_fleet(tmp_path, nodes=2, relay_args=relay_args) as fleet:
            ids = ["relay-1", "relay-2"]
            to_1 = sessions_for("relay-1", ids, 4, "one")
            to_2 = sessions_for("relay-2", ids, 2, "two")
            peers: list[TestPeer] = []
            try:
                host, node = await connect(fleet, to_1[0], "host")
                guest, guest_node = await connect(fleet, to_1[0], "guest")
                peers += [host, guest]
                assert node == guest_node == "relay-1"
                await registered_full(fleet, "relay-1", True)
                assert (await registry(fleet))["relay-2"]["full"] is False
                # a session that would be relay-1's goes to relay-2
                assert await token_node(fleet, to_1[1]) == "relay-2"
                assert await token_node(fleet, to_1[1], "guest") == "relay-2"  # both peers alike

                # relay-2 fills up too: a new session has nowhere to go
                other, node = await connect(fleet, to_2[0], "host")
                peers.append(other)
                assert node == "relay-2"
                other_guest, node = await connect(fleet, to_2[0], "guest")
                peers.append(other_guest)
                assert node == "relay-2"
                await registered_full(fleet, "relay-2", True)
                with pytest.raises(TokenServiceUnavailable, match="no_relay_available"):
                    await token_node(fleet, to_1[2])
                assert await no_relay_total(fleet, "full") >= 1

                # relay-1's guest drops: one slot is room for a newcomer (/readyz 200) but not for a
                # new session's two peers, so the record stays full; the guest gets its node back
                guest.abort()
                await eventually(lambda: relay_ready(fleet, "relay-1"), "relay-1 ready with a slot free")
                written = await relay_metric(
                    fleet, "relay-1", 'beach_rescue_node_registrations_total{outcome="ok"}'
                )

                async def rewritten() -> bool:  # a write begun after the slot freed has landed
                    ok = 'beach_rescue_node_registrations_total{outcome="ok"}'
                    return await relay_metric(fleet, "relay-1", ok) >= written + 2

                await eventually(rewritten, "relay-1 rewrote its record")
                assert (await registry(fleet))["relay-1"]["full"] is True
                with pytest.raises(TokenServiceUnavailable, match="no_relay_available"):
                    await token_node(fleet, to_1[2])
                back, node = await connect(fleet, to_1[0], "guest")
                peers.append(back)
                assert node == "relay-1"
                assert back.welcome is not None
                assert back.welcome.peer is not None  # its host is there

                # the session ends: room for a new one, and relay-1 takes new sessions again
                host.abort()
                back.abort()
                await registered_full(fleet, "relay-1", False)
                assert await token_node(fleet, to_1[3]) == "relay-1"
            finally:
                for peer in peers:
                    peer.abort()


@pytest.mark.redis
async def test_a_node_at_max_sessions_keeps_its_sessions_peers_through_a_blip(tmp_path: Path) -> None:
    """A node at max_sessions (the session in its resume grace counts) is full: new sessions go to
    the other node, and the peer that dropped off gets a token for its own node and resumes there."""
    with trio.fail_after(TIMEOUT_S):
        async with fleet_mod.open_fleet(tmp_path, nodes=2, relay_args=("--max-sessions", "1")) as fleet:
            ids = ["relay-1", "relay-2"]
            to_1 = sessions_for("relay-1", ids, 3, "one")
            peers: list[TestPeer] = []
            try:
                host, node = await connect(fleet, to_1[0], "host")
                guest, _ = await connect(fleet, to_1[0], "guest")
                peers += [host, guest]
                assert node == "relay-1"
                assert (await host.receive_peer_event()).event == "joined"
                await registered_full(fleet, "relay-1", True)
                assert await token_node(fleet, to_1[1]) == "relay-2"
                guest.abort()  # a network blip: the session waits in its resume grace, still full
                assert (await host.receive_peer_event()).event == "left"
                assert (await registry(fleet))["relay-1"]["full"] is True
                back, node = await connect(fleet, to_1[0], "guest")
                peers.append(back)
                assert node == "relay-1"
                assert back.welcome is not None
                assert back.welcome.peer is not None  # its host is there
            finally:
                for peer in peers:
                    peer.abort()
