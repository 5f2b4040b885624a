"""An in-process guardrail store for ``rescue dev`` and tests: same contract as RedisStore."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Final, TypeVar

import trio

from rescue.errors import StoreUnavailable
from rescue.guardrails._store import (
    COUNTER_TTL_S,
    CounterField,
    FleetState,
    HourCounts,
    MintSnapshot,
    NodeInfo,
    TelemetryGap,
    assignment_key,
    check_cohort_id,
    check_node_id,
    counter_key,
    hour_bucket,
    token_use_key,
)

__all__ = ["MemoryStore"]

_V = TypeVar("_V")

# Bounds that keep a long-running `rescue dev` from growing without limit. Expired entries are
# swept on writes; past these sizes a write fails like an unavailable store would (fail closed).
MAX_COHORTS: Final = 10_000  # cohort flags: an operator sets these by hand
MAX_COUNTERS: Final = 100_000  # live counter hashes: ~2 per active cohort
MAX_NODES: Final = 1_000  # relay nodes in one dev process: a handful at most
MAX_ASSIGNMENTS: Final = 200_000  # live session assignments (each lives ≤ token lifetime)
MAX_TOKEN_USES: Final = 200_000  # tokens that opened a connection (each ≤ token lifetime + skew)


class MemoryStore:
    """A :class:`~rescue.guardrails.GuardrailStore` in a few dicts, with real TTL semantics.

    Args:
        clock: monotonic seconds used for expiry; defaults to ``trio.current_time`` (so
            ``MockClock`` drives it in tests).
        initialised: a memory store lives and dies with its process (``rescue dev``, tests), so
            it starts initialised; False makes one that reads like a Redis that lost its data.

    Fault injection: set :attr:`available` to False and every call raises
    :class:`~rescue.errors.StoreUnavailable`, like a Redis outage (used to test failing closed).
    """

    def __init__(self, *, clock: Callable[[], float] = trio.current_time, initialised: bool = True) -> None:
        self._clock = clock
        self.available = True
        self._fleet = FleetState(initialised=initialised)
        self._cohorts: dict[str, bool] = {}
        self._counters: dict[str, tuple[float, dict[str, int]]] = {}  # key -> (expires_at, fields)
        self._nodes: dict[str, tuple[float, NodeInfo]] = {}
        self._assignments: dict[str, tuple[float, str]] = {}
        self._token_uses: dict[str, tuple[float, str]] = {}
        self._gap: tuple[float, TelemetryGap] = (0.0, TelemetryGap())  # (expires_at, gap)
        self._closed = False

    async def _enter(self) -> float:
        await trio.lowlevel.checkpoint()
        if self._closed:
            raise StoreUnavailable("memory store is closed")
        if not self.available:
            raise StoreUnavailable("memory store marked unavailable")
        return self._clock()

    @staticmethod
    def _sweep(table: dict[str, tuple[float, _V]], now: float, limit: int, what: str) -> None:
        if len(table) < limit:
            return
        for key in [k for k, (exp, _) in table.items() if exp <= now]:
            del table[key]
        if len(table) >= limit:
            raise StoreUnavailable(f"memory store is full ({what})")

    async def ping(self) -> None:
        await self._enter()

    async def fleet_state(self) -> FleetState:
        await self._enter()
        return self._fleet

    async def set_fleet_state(self, state: FleetState) -> None:
        await self._enter()
        self._fleet = replace(state, initialised=self._fleet.initialised)

    async def initialise(self, *, now: float) -> None:
        await self._enter()
        self._fleet = replace(self._fleet, initialised=True)

    async def cohort_enabled(self, cohort_id: str) -> bool:
        check_cohort_id(cohort_id)
        await self._enter()
        return self._cohorts.get(cohort_id, False)

    async def set_cohort_enabled(self, cohort_id: str, enabled: bool) -> None:
        check_cohort_id(cohort_id)
        await self._enter()
        if cohort_id not in self._cohorts and len(self._cohorts) >= MAX_COHORTS:
            raise StoreUnavailable("memory store is full (cohorts)")
        self._cohorts[cohort_id] = bool(enabled)

    async def increment(self, cohort_id: str, field: CounterField, *, now: float, amount: int = 1) -> None:
        key = counter_key(cohort_id, hour_bucket(now))
        field = CounterField(field)
        t = await self._enter()
        entry = self._counters.get(key)
        if entry is None or entry[0] <= t:
            self._sweep(self._counters, t, MAX_COUNTERS, "counters")
            entry = (t + COUNTER_TTL_S, {})  # TTL set on the first increment only, like EXPIRE NX
            self._counters[key] = entry
        entry[1][field.value] = entry[1].get(field.value, 0) + amount
        expires, gap = self._gap
        if field is CounterField.ACTIVATIONS:
            self._gap = (expires, replace(gap, tokens_since_activation=0, since_activation=None))
        elif field is CounterField.SESSIONS:
            self._gap = (expires, replace(gap, tokens_since_sessions=0, since_sessions=None))

    async def hour_counts(self, cohort_id: str, buckets: list[str]) -> list[HourCounts]:
        keys = [counter_key(cohort_id, b) for b in buckets]
        t = await self._enter()
        out = []
        for key in keys:
            entry = self._counters.get(key)
            out.append(HourCounts.from_mapping(entry[1]) if entry and entry[0] > t else HourCounts())
        return out

    async def register_node(self, node: NodeInfo, *, ttl: float) -> None:
        t = await self._enter()
        if node.node_id not in self._nodes:
            self._sweep(self._nodes, t, MAX_NODES, "nodes")
        self._nodes[node.node_id] = (t + ttl, node)

    async def remove_node(self, node_id: str) -> None:
        check_node_id(node_id)
        await self._enter()
        self._nodes.pop(node_id, None)

    async def live_nodes(self) -> list[NodeInfo]:
        t = await self._enter()
        for node_id in [k for k, (exp, _) in self._nodes.items() if exp <= t]:
            del self._nodes[node_id]
        return [node for _, (_, node) in sorted(self._nodes.items())]

    async def assign_session(self, session_id: str, node_id: str, *, ttl: float) -> str:
        check_node_id(node_id)
        key = assignment_key(session_id)
        t = await self._enter()
        entry = self._assignments.get(key)
        if entry is not None and entry[0] > t:
            self._assignments[key] = (t + ttl, entry[1])
            return entry[1]
        self._sweep(self._assignments, t, MAX_ASSIGNMENTS, "assignments")
        self._assignments[key] = (t + ttl, node_id)
        return node_id

    async def claim_token_use(self, cti: bytes, node_id: str, *, ttl: float) -> str:
        check_node_id(node_id)
        key = token_use_key(cti)
        t = await self._enter()
        entry = self._token_uses.get(key)
        if entry is not None and entry[0] > t:
            return entry[1]
        self._sweep(self._token_uses, t, MAX_TOKEN_USES, "token uses")
        self._token_uses[key] = (t + ttl, node_id)
        return node_id

    async def session_node(self, session_id: str) -> str | None:
        t = await self._enter()
        entry = self._assignments.get(assignment_key(session_id))
        return entry[1] if entry is not None and entry[0] > t else None

    async def reassign_session(
        self, session_id: str, *, expected: str, node_id: str, ttl: float
    ) -> tuple[str, bool]:
        check_node_id(node_id)
        key = assignment_key(session_id)
        t = await self._enter()
        entry = self._assignments.get(key)
        if entry is None or entry[0] <= t or entry[1] == expected:
            self._assignments[key] = (t + ttl, node_id)
            return node_id, True
        return entry[1], False

    async def mint_snapshot(self, cohort_id: str, *, now: float) -> MintSnapshot:
        check_cohort_id(cohort_id)
        current, previous = await self.hour_counts(cohort_id, [hour_bucket(now), hour_bucket(now - 3600)])
        return MintSnapshot(
            fleet=await self.fleet_state(),
            cohort_enabled=await self.cohort_enabled(cohort_id),
            current=current,
            previous=previous,
            nodes=tuple(await self.live_nodes()),
            telemetry=await self.telemetry_gap(),
        )

    async def telemetry_gap(self) -> TelemetryGap:
        t = await self._enter()
        expires, gap = self._gap
        return gap if expires > t else TelemetryGap()

    async def record_mint(
        self,
        cohort_id: str,
        *,
        now: float,
        session_id: str,
        node_id: str | None,
        ttl: float,
        telemetry_ttl: float = 3600.0,
        sessions_reported: bool = True,
    ) -> str | None:
        await self.increment(cohort_id, CounterField.TOKENS, now=now)
        gap = await self.telemetry_gap()
        self._gap = (
            self._clock() + telemetry_ttl,
            TelemetryGap(
                gap.tokens_since_activation + 1,
                now if gap.since_activation is None else gap.since_activation,
                gap.tokens_since_sessions + (1 if sessions_reported else 0),
                now if gap.since_sessions is None and sessions_reported else gap.since_sessions,
            ),
        )
        if node_id is None:
            return None
        return await self.assign_session(session_id, node_id, ttl=ttl)

    async def keep_assignments(
        self, node_id: str, session_ids: Sequence[str], *, ttl: float
    ) -> dict[str, str]:
        check_node_id(node_id)
        keys = [(sid, assignment_key(sid)) for sid in session_ids]
        t = await self._enter()
        out: dict[str, str] = {}
        for sid, key in keys:
            entry = self._assignments.get(key)
            if entry is not None and entry[0] > t and entry[1] != node_id:
                out[sid] = entry[1]
                continue
            if entry is None:
                self._sweep(self._assignments, t, MAX_ASSIGNMENTS, "assignments")
            self._assignments[key] = (t + ttl, node_id)
            out[sid] = node_id
        return out

    async def aclose(self) -> None:
        self._closed = True
        await trio.lowlevel.checkpoint()
