"""Sessions stay on one node for hours while the fleet changes (decision 0008), as pure logic.

The token service's assignment policy (``Guardrails.assign_node``), the relay's
``AssignmentKeeper`` and ``NodeRegistrar`` run over a ``MemoryStore`` whose expiry follows trio's
clock, so ``MockClock`` drives hours of TTLs, refreshes and fleet changes in milliseconds. The
same mechanism with real processes and a real Redis is in tests/test_fleet_affinity.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from rescue.guardrails import Guardrails, MemoryStore, NodeInfo, rendezvous_pick
from rescue.relay._control import AssignmentKeeper, NodeRegistrar

TOKEN_TTL = 300.0  # the token service's default: the assignment of a session nobody holds
KEEP_TTL = 300.0  # the relay's default assignment_ttl_s
REGISTER_TTL = 15.0
HOUR = 3600.0


def url(node_id: str) -> str:
    return f"wss://{node_id}.example/v1/connect"


class Node:
    """One relay node's control-plane side: its registration and its keeper, as a relay runs them."""

    def __init__(self, store: MemoryStore, node_id: str) -> None:
        self.node_id = node_id
        self.live: set[str] = set()  # sessions with a peer connected here
        self.lost: list[tuple[str, str]] = []
        self.registrar = NodeRegistrar(store, node_id=node_id, public_url=url(node_id), ttl=REGISTER_TTL)
        self.keeper = AssignmentKeeper(
            store,
            node_id=node_id,
            ttl=KEEP_TTL,
            sessions=lambda: sorted(self.live),
            on_lost=self._lost,
        )
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    def _lost(self, session_id: str, holder: str) -> None:
        self.lost.append((session_id, holder))
        self.live.discard(session_id)  # the relay closes it with WRONG_NODE

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(self.registrar.run)
                    nursery.start_soon(self.keeper.run)
                    task_status.started()
        finally:
            self.stopped.set()


class Fleet:
    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.store = MemoryStore()
        self.moves: list[str] = []
        self.guardrails = Guardrails(self.store, on_move=self.moves.append)
        self.nodes: dict[str, Node] = {}

    async def add(self, node_id: str) -> Node:
        node = Node(self.store, node_id)
        await self.nursery.start(node.run)
        self.nodes[node_id] = node
        return node

    async def remove(self, node_id: str) -> None:
        """A clean exit (SIGTERM after the drain): the registration is removed on the way out."""
        node = self.nodes.pop(node_id)
        node.scope.cancel()
        await node.stopped.wait()

    async def kill(self, node_id: str) -> None:
        """SIGKILL: the tasks stop with no clean removal; the record lives until its TTL ends
        (re-registered once here, as if the last refresh landed just before the kill)."""
        await self.remove(node_id)
        await self.store.register_node(NodeInfo(node_id, url(node_id)), ttl=REGISTER_TTL)

    async def connect(self, session_id: str) -> str | None:
        """A peer asks for a token and connects where it says: the session is live there.

        None when that node is dead (connection refused: the SDK retries later)."""
        node = await self.guardrails.assign_node(session_id, ttl=TOKEN_TTL)
        assert node is not None
        if node.node_id not in self.nodes:
            return None
        assert await self.nodes[node.node_id].keeper.claim(session_id) is None
        self.nodes[node.node_id].live.add(session_id)
        return node.node_id

    async def token_node(self, session_id: str) -> str:
        node = await self.guardrails.assign_node(session_id, ttl=TOKEN_TTL)
        assert node is not None
        return node.node_id

    def holder(self, session_id: str) -> str | None:
        held = [n.node_id for n in self.nodes.values() if session_id in n.live]
        assert len(held) <= 1, f"{session_id} live on {held}"
        return held[0] if held else None


async def fleet_with(nursery: trio.Nursery, *node_ids: str) -> Fleet:
    fleet = Fleet(nursery)
    for node_id in node_ids:
        await fleet.add(node_id)
    return fleet


def sessions(n: int) -> Iterator[str]:
    return (f"session-{i}" for i in range(n))


async def test_live_sessions_keep_their_node_for_hours_of_scale_out_and_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a", "b")
        placed = {sid: await fleet.connect(sid) for sid in sessions(40)}
        # assigned once, then left alone (nobody holds it live): the control that shows the
        # test would notice a mechanism that did not keep assignments alive
        unkept = "session-unkept"
        await fleet.token_node(unkept)
        extra = 0
        for step in range(36):  # six hours, a fleet change every ten minutes
            if step % 3 == 2 and len(fleet.nodes) > 2:
                await fleet.remove(sorted(set(fleet.nodes) - {"a", "b"})[0])  # scale-in of an idle node
            else:
                extra += 1
                await fleet.add(f"x{extra}")  # scale-out: a node HRW would now prefer for some
            await trio.sleep(600)  # twice the token and assignment lifetimes
            for sid, node_id in placed.items():
                # the one peer that reconnects now is sent where its partner still is
                assert await fleet.token_node(sid) == node_id, (step, sid)
                assert fleet.holder(sid) == node_id
        assert trio.current_time() >= 6 * HOUR
        assert fleet.moves == []
        # scale-out really would have moved sessions without the keepers
        pool = [NodeInfo(n, url(n)) for n in fleet.nodes]
        assert any(rendezvous_pick(sid, pool).node_id not in {"a", "b"} for sid in placed)  # type: ignore[union-attr]
        assert await fleet.store.assign_session(unkept, "sentinel", ttl=1) == "sentinel"  # it expired
        nursery.cancel_scope.cancel()


async def test_draining_node_hands_its_sessions_on_and_both_peers_follow(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a", "b", "c")
        placed = {sid: await fleet.connect(sid) for sid in sessions(30)}
        on_a = sorted(sid for sid, n in placed.items() if n == "a")
        assert on_a
        await trio.sleep(2 * HOUR)
        a = fleet.nodes["a"]
        a.registrar.set_draining()  # SIGTERM: registered as draining at once
        await trio.sleep(0)
        await trio.sleep(1)
        # both peers of each session ask, in either order: one move, one new node for both
        for sid in on_a:
            first, second = await fleet.token_node(sid), await fleet.token_node(sid)
            assert first == second != "a"
        assert fleet.moves == ["draining"] * len(on_a)
        # the keeper on the draining node learns at its next round that they moved
        await a.keeper.keep_once()
        assert sorted(sid for sid, _ in a.lost) == on_a
        # the moved sessions are claimed by their new node; the others never moved
        for sid in on_a:
            assert await fleet.connect(sid) not in {"a", None}
        for sid, node_id in placed.items():
            if node_id != "a":
                assert await fleet.token_node(sid) == node_id
        nursery.cancel_scope.cancel()


async def test_killed_node_sessions_move_once_its_registration_expires(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a", "b", "c")
        placed = {sid: await fleet.connect(sid) for sid in sessions(30)}
        on_b = [sid for sid, n in placed.items() if n == "b"]
        await fleet.kill("b")
        assert all([await fleet.token_node(sid) == "b" for sid in on_b])  # not known dead yet
        await trio.sleep(REGISTER_TTL + 1)
        new = {sid: await fleet.token_node(sid) for sid in on_b}
        assert all(node in {"a", "c"} for node in new.values())
        assert fleet.moves == ["gone"] * len(on_b)
        assert {sid: await fleet.token_node(sid) for sid in on_b} == new  # the partner gets the same
        nursery.cancel_scope.cancel()


async def test_hello_for_a_session_held_elsewhere_is_wrong_node_unless_that_node_is_leaving(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a", "b")
        held = await fleet.connect("s")
        other = fleet.nodes["b" if held == "a" else "a"]
        # a peer with a stale token for the other node: refused there, pointing at the holder
        assert await other.keeper.claim("s") == held
        assert other.keeper.outcomes["wrong_node"] == 1
        # the holder drains: the other node may take the session over (and records it as a move)
        fleet.nodes[held].registrar.set_draining()
        await trio.sleep(1)
        assert await other.keeper.claim("s") is None
        assert other.keeper.outcomes["moved_here"] == 1
        assert await fleet.token_node("s") == other.node_id
        nursery.cancel_scope.cancel()


async def test_store_outage_admits_at_hello_and_the_next_round_recovers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a")
        a = fleet.nodes["a"]
        await fleet.connect("s")
        fleet.store.available = False
        assert await a.keeper.claim("t") is None  # the token named this node: admit
        await trio.sleep(KEEP_TTL / 2)  # one keep-alive round fails
        assert a.keeper.outcomes["error"] >= 2
        fleet.store.available = True
        await trio.sleep(KEEP_TTL / 3)
        assert a.keeper.outcomes["kept"] >= 1
        assert await fleet.token_node("s") == "a"
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("order", ["host first", "guest first"])
async def test_racing_peers_of_a_new_session_land_together(
    autojump_clock: trio.testing.MockClock, order: str
) -> None:
    async with trio.open_nursery() as nursery:
        fleet = await fleet_with(nursery, "a", "b", "c")
        answers: dict[str, str] = {}

        async def ask(role: str) -> None:
            answers[role] = await fleet.token_node("race")

        async with trio.open_nursery() as both:
            for role in ("host", "guest") if order == "host first" else ("guest", "host"):
                both.start_soon(ask, role)
        assert answers["host"] == answers["guest"]
        nursery.cancel_scope.cancel()


# A sequence of fleet operations; after each, every live session's assignment names its holder.
OPS = st.lists(
    st.tuples(st.sampled_from(["add", "remove", "drain", "kill", "connect", "wait"]), st.integers(0, 30)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(OPS)
def test_property_a_live_session_is_only_ever_assigned_to_its_holder(ops: list[tuple[str, int]]) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            fleet = await fleet_with(nursery, "n0", "n1")
            counter = 2
            for op, arg in ops:
                usable = [n for n in fleet.nodes.values() if not n.registrar.draining]
                if op == "add":
                    await fleet.add(f"n{counter}")
                    counter += 1
                elif op in ("remove", "drain", "kill") and len(usable) > 1:
                    node = usable[arg % len(usable)]
                    if op == "drain":
                        node.registrar.set_draining()
                        await trio.sleep(0.1)
                        for sid in sorted(node.live):  # SERVER_SHUTDOWN: both peers go elsewhere
                            node.live.discard(sid)
                            await fleet.connect(sid)
                    elif op == "kill":
                        await fleet.kill(node.node_id)  # its sessions are gone with it
                    else:
                        await fleet.remove(node.node_id)
                elif op == "connect":
                    sid = f"s{arg}"
                    if fleet.holder(sid) is None:
                        await fleet.connect(sid)
                elif op == "wait":
                    await trio.sleep(arg * 60)
                for node in fleet.nodes.values():
                    for sid in node.live:
                        assert await fleet.token_node(sid) == node.node_id
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
