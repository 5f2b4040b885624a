"""The fault injector: seeded, bounded in number and duration, one fault at a time.

Fault kinds:

- ``peer_abort``: drop one connected peer's socket (no close handshake), as a network failure would.
- ``relay_sigkill`` / ``relay_sigterm``: stop one relay node (crash, or graceful drain with
  CLOSE ``SERVER_SHUTDOWN``), leave it down for a random outage, start it again on the same ports.
- ``redis_restart``: SIGKILL redis-server, outage, start an empty one (no persistence: the node
  registry and session assignments are gone and must be rebuilt by the relays' refresh). The
  empty store is not initialised, so the fleet must read as paused (``failed_closed`` in the
  record; a report target) until the operator step of the runbook, ``rescue admin
  init-store``, which the injector then runs.
- ``token_service_restart``: stop the token service (SIGTERM or SIGKILL at random), outage, start.
- ``redis_failover`` (a fleet with ``redis_mode="sentinel"``): SIGKILL the Redis primary; the
  Sentinel promotes the replica (the time that takes is recorded; one peer is dropped at once, so
  it reconnects while minting fails closed for want of a primary); after the outage the old
  primary comes back as a replica of the new one, and the injector waits until the Sentinel sees
  a healthy replica again (so the next failover has somewhere to go).

During Redis and token-service outages (and Redis failovers) one random peer is also dropped, so
a reconnect happens while the control plane is down (relays verify tokens themselves and keep serving with
the last known kill-switch state, SPEC §6).

After each fault the injector waits until the fleet has *recovered*: every live session has
delivered, in both directions, a byte written after the fault ended (so every byte before it went
through too), a token can be minted, every relay is ready and registered. The time from the
fault to that moment is the fault's recovery time.

Per session it also times *fault → resumed stream*: for each session a fault interrupted, from
the fault to the moment both peers were welcomed again and each direction delivered a byte
(``SessionRun.watch_resume``). After recovery it counts the sessions that changed node, asks every
running node's ``/debug/stats`` whether any session has peers on two nodes (SPEC §7: never), and
summarises the token fetches the fault caused (count, failures, latency, busiest second).
"""

from __future__ import annotations

import math
import random
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from chaos._fleet import Fleet, FleetError
from chaos._traffic import SessionRun, TokenLog, percentile

__all__ = ["FAULT_KINDS", "FaultInjector", "FaultPlan", "FaultRecord", "bucket_delta", "bucket_quantile"]

FAULT_KINDS: Final = (
    "peer_abort",
    "relay_sigkill",
    "relay_sigterm",
    "redis_restart",
    "token_service_restart",
    "redis_failover",
)
# A failover is the Sentinel's: it must name a new primary within this.
_FAILOVER_TIMEOUT_S: Final = 60.0
# Recovery is checked this often (its resolution).
_RECOVERY_POLL_S: Final = 0.05
# The token service notices a restarted Redis within its breaker's probe interval (1 s).
_FAIL_CLOSED_WAIT_S: Final = 10.0
# Control-plane probes (a token mint, /readyz, the node list) are slower HTTP round trips.
_PROBE_EVERY_S: Final = 0.25


@dataclass(frozen=True)
class FaultPlan:
    """How faults are drawn.

    Attributes:
        weights: relative frequency of each kind (kinds with weight 0 never happen). Kinds are
            drawn from a shuffled deck holding ``weight`` cards of each, refilled when empty, so
            every kind with a weight appears once per deck.
        gap: (min, max) seconds of calm between one fault's recovery and the next fault.
        outage: (min, max) seconds a stopped process stays down before it is started again.
        max_faults: stop injecting after this many (``None``: until the duration ends).
        recovery_timeout_s: a fault not recovered within this counts as unrecovered (and fails
            the run); the injector then moves on.
        abort_during_outage: drop a peer half-way through control-plane outages.
    """

    weights: dict[str, int]
    gap: tuple[float, float] = (2.0, 6.0)
    outage: tuple[float, float] = (0.5, 4.0)
    max_faults: int | None = None
    recovery_timeout_s: float = 90.0
    abort_during_outage: bool = True


@dataclass
class FaultRecord:
    """One injected fault and how the fleet came back.

    Attributes:
        index: 1-based.
        kind: one of :data:`FAULT_KINDS`.
        target: what was hit (``session/role``, node id, ``redis``, ``token-service``).
        start: run clock time of the fault.
        restored: when the process was running and ready again (= ``start`` for ``peer_abort``).
        recovered: when the fleet had recovered, or ``None`` if it did not in time.
        detail: what else happened (signal, exit status, time to exit, restart time, extra abort).
    """

    index: int
    kind: str
    target: str
    start: float
    restored: float | None = None
    recovered: float | None = None
    streams_recovered: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)
    resume_s: list[float] = field(default_factory=list)

    @property
    def recovery_s(self) -> float | None:
        """Seconds from the fault to recovery."""
        return None if self.recovered is None else self.recovered - self.start

    def to_json(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None else round(x, 3)

        return {
            "index": self.index,
            "kind": self.kind,
            "target": self.target,
            "start": r(self.start),
            "restored": r(self.restored),
            "recovered": r(self.recovered),
            "recovery_s": r(self.recovery_s),
            "streams_recovered_s": None
            if self.streams_recovered is None
            else r(self.streams_recovered - self.start),
            "sessions_interrupted": len(self.resume_s) + self.detail.get("not_resumed", 0),
            "resume_p50_s": r(percentile(self.resume_s, 0.5)),
            "resume_p95_s": r(percentile(self.resume_s, 0.95)),
            "resume_max_s": r(max(self.resume_s, default=None)),
            "detail": self.detail,
        }


class FaultInjector:
    """Injects faults into ``fleet`` and ``sessions`` per ``plan`` with a seeded RNG.

    Args:
        fleet: the running fleet.
        sessions: the live sessions (read each time; the list may change under churn).
        plan: kinds, timings, bounds.
        seed: the RNG seed (same seed, same sequence of choices).
        clock: the run clock.
        log: progress line sink.
        token_log: the sessions' token fetches (summarised per fault), when recorded.
        check_placement: after each fault, ask every node which sessions it holds and count
            sessions whose peers are on two nodes.
    """

    def __init__(
        self,
        fleet: Fleet,
        sessions: Callable[[], Sequence[SessionRun]],
        plan: FaultPlan,
        *,
        seed: int,
        clock: Callable[[], float],
        log: Callable[[str], None],
        token_log: TokenLog | None = None,
        check_placement: bool = False,
    ) -> None:
        self.token_log = token_log
        self.check_placement = check_placement
        self.placement_checks: list[dict[str, Any]] = []
        self.fleet = fleet
        self.sessions = sessions
        self.plan = plan
        self.rng = random.Random(f"chaos-faults:{seed}")
        self.clock = clock
        self.log = log
        self.records: list[FaultRecord] = []
        self.current: FaultRecord | None = None
        self._deck: list[str] = []
        self._probes = 0

    def _draw_kind(self) -> str:
        if not self._deck:
            for kind in FAULT_KINDS:
                self._deck += [kind] * self.plan.weights.get(kind, 0)
            if not self._deck:
                raise ValueError("every fault weight is 0")
            self.rng.shuffle(self._deck)
        kind = self._deck.pop()
        if kind.startswith("relay_") and not self.fleet.relays:
            return "peer_abort"
        if kind == "redis_failover" and self.fleet.redis_mode != "sentinel":
            raise ValueError("redis_failover needs a fleet with a Sentinel (redis_mode='sentinel')")
        return kind

    async def run(self, until: float) -> None:
        """Inject faults until the run clock reaches ``until`` or ``max_faults`` are done."""
        plan = self.plan
        while plan.max_faults is None or len(self.records) < plan.max_faults:
            await trio.sleep(self.rng.uniform(*plan.gap))
            if self.clock() >= until:
                return
            await self.inject(self._draw_kind())

    # ----------------------------------------------------------------------------- injecting

    async def inject(self, kind: str) -> FaultRecord:
        """Inject one fault of ``kind`` and wait for recovery (bounded); its record."""
        record = FaultRecord(len(self.records) + 1, kind, "", self.clock())
        self.records.append(record)
        self.current = record
        before = {s.session_id: s.nodes() for s in self.sessions() if not s.failed}
        buckets = await self.fleet.token_latency_buckets() if self.token_log is not None else None
        for session in self.sessions():
            session.watch_resume(record.start)
        try:
            if kind == "peer_abort":
                record.target = self._abort_random_peer() or "(no connected peer)"
                record.restored = record.start
            elif kind in ("relay_sigkill", "relay_sigterm"):
                await self._restart_relay(
                    record, signal.SIGKILL if kind == "relay_sigkill" else signal.SIGTERM
                )
            elif kind == "redis_restart":
                assert self.fleet.redis is not None
                await self._restart_control(record, self.fleet.redis, signal.SIGKILL)
                record.detail["failed_closed"] = await self._failed_closed()
                await self.fleet.init_store("chaos: Redis came back empty")  # the runbook's step
            elif kind == "redis_failover":
                await self._failover(record)
            elif kind == "token_service_restart":
                assert self.fleet.token_service is not None
                sig = self.rng.choice([signal.SIGTERM, signal.SIGKILL])
                await self._restart_control(record, self.fleet.token_service, sig)
            else:
                raise ValueError(f"unknown fault kind {kind!r}")
        except FleetError as exc:
            record.detail["error"] = str(exc)[:500]
            self.log(f"fault #{record.index} {kind}: could not restore: {str(exc).splitlines()[0]}")
        if record.restored is not None:
            await self._wait_recovered(record)
        await self._after(record, before, buckets)
        outcome = (
            f"recovered in {record.recovery_s:.2f} s" if record.recovery_s is not None else "NOT RECOVERED"
        )
        self.log(f"fault #{record.index} {kind} -> {record.target}: {outcome}")
        self.current = None
        return record

    def _abort_random_peer(self) -> str | None:
        candidates = [
            (s, role)
            for s in self.sessions()
            if not s.failed and s.peers
            for role, tracker in s.trackers.items()
            if tracker.connected
        ]
        self.rng.shuffle(candidates)
        for session, role in candidates:
            if session.abort(role):
                return f"{session.session_id}/{role}"
        return None

    async def _restart_relay(self, record: FaultRecord, sig: signal.Signals) -> None:
        fleet = self.fleet
        # a node holding sessions: a restarted node stays empty until new sessions start (they do
        # not move back, decision 0008), and stopping an empty node tests nothing about sessions
        held = {node for s in self.sessions() if not s.failed for node in s.nodes()}
        candidates = [r for r in fleet.relays if r.name in held] or fleet.relays
        relay = self.rng.choice(candidates)
        record.target = relay.name
        on_node = sum(1 for s in self.sessions() if relay.name in s.nodes())
        stop_started = trio.current_time()
        drain_s = float(fleet.relay_tuning.get("--drain-s", "30"))
        status = await relay.stop(sig, wait_s=drain_s + 15.0)
        record.detail.update(
            signal=sig.name,
            exit_status=status,
            exit_s=round(trio.current_time() - stop_started, 3),
            sessions_on_node=on_node,
        )
        await self._outage(record)
        record.detail["start_s"] = round(await relay.start(), 3)
        record.restored = self.clock()

    async def _restart_control(self, record: FaultRecord, service: Any, sig: signal.Signals) -> None:
        record.target = service.name
        stop_started = trio.current_time()
        status = await service.stop(sig)
        record.detail.update(
            signal=sig.name, exit_status=status, exit_s=round(trio.current_time() - stop_started, 3)
        )
        outage = self.rng.uniform(*self.plan.outage)
        record.detail["outage_s"] = round(outage, 3)
        if self.plan.abort_during_outage:
            await trio.sleep(outage / 2)
            record.detail["aborted_during_outage"] = self._abort_random_peer()
            await trio.sleep(outage / 2)
        else:
            await trio.sleep(outage)
        record.detail["start_s"] = round(await service.start(), 3)
        record.restored = self.clock()

    async def _failover(self, record: FaultRecord) -> None:
        fleet = self.fleet
        primary = await fleet.redis_primary()
        if primary is None:
            raise FleetError("the Sentinel names no primary")
        record.target = primary.name
        await primary.stop(signal.SIGKILL)
        killed = trio.current_time()
        if self.plan.abort_during_outage:  # a reconnect while minting fails closed (no primary)
            record.detail["aborted_during_outage"] = self._abort_random_peer()
        new: Any = None
        with trio.move_on_after(_FAILOVER_TIMEOUT_S):
            while new is None or new is primary:
                await trio.sleep(0.1)
                new = await fleet.redis_primary()
        if new is None or new is primary:
            raise FleetError(f"the Sentinel promoted no replica within {_FAILOVER_TIMEOUT_S:g} s")
        record.detail.update(
            signal="SIGKILL", promoted=new.name, failover_s=round(trio.current_time() - killed, 3)
        )
        await self._outage(record)
        # back as a replica of the new primary (as the Sentinel would reconfigure it anyway)
        base = (
            primary.argv[: primary.argv.index("--replicaof")]
            if "--replicaof" in primary.argv
            else primary.argv
        )
        primary.argv = [*base, "--replicaof", "127.0.0.1", str(fleet.redis_ports[new.name])]
        record.detail["start_s"] = round(await primary.start(), 3)
        with trio.move_on_after(_FAILOVER_TIMEOUT_S):
            while not await fleet.sentinel_settled():  # noqa: ASYNC110 -- asks another process
                await trio.sleep(0.1)
        record.detail["replica_back"] = await fleet.sentinel_settled()
        record.restored = self.clock()

    async def _failed_closed(self) -> bool:
        """After Redis came back empty: the status relays poll says paused, as not initialised
        (the token service may first answer 503 while its breaker probes the new Redis)."""
        with trio.move_on_after(_FAIL_CLOSED_WAIT_S):
            while True:
                status = await self.fleet.fleet_status()
                if status is not None:
                    return status.get("paused") is True and "not initialised" in str(status.get("reason"))
                await trio.sleep(_RECOVERY_POLL_S)
        return False

    async def _outage(self, record: FaultRecord) -> None:
        outage = self.rng.uniform(*self.plan.outage)
        record.detail["outage_s"] = round(outage, 3)
        await trio.sleep(outage)

    # ----------------------------------------------------------------------------- recovery

    async def _wait_recovered(self, record: FaultRecord) -> None:
        sessions = [s for s in self.sessions() if not s.failed and s.peers]
        for session in sessions:
            session.mark()
        control_ok = False
        next_probe = trio.current_time()
        with trio.move_on_after(self.plan.recovery_timeout_s):
            while True:
                if record.streams_recovered is None and all(s.recovered or s.failed for s in sessions):
                    times = [t for s in sessions if (t := s.recovered_at()) is not None]
                    record.streams_recovered = max(times, default=self.clock())
                if not control_ok and trio.current_time() >= next_probe:
                    control_ok = await self._control_plane_ok()
                    next_probe = trio.current_time() + _PROBE_EVERY_S
                    if control_ok:
                        record.detail["control_ok_s"] = round(self.clock() - record.start, 3)
                if control_ok and record.streams_recovered is not None:
                    record.recovered = max(
                        record.streams_recovered, record.start + record.detail["control_ok_s"]
                    )
                    failed = [s.session_id for s in sessions if s.failed]
                    if failed:
                        record.detail["sessions_failed"] = failed
                    return
                await trio.sleep(_RECOVERY_POLL_S)
        record.detail["unrecovered_sessions"] = [s.session_id for s in sessions if not s.recovered]
        record.detail["control_ok"] = control_ok

    async def _after(
        self, record: FaultRecord, before: dict[str, set[str]], buckets: dict[float, float] | None
    ) -> None:
        """Per-session resume times, moves, split sessions and the token storm of one fault."""
        interrupted = [s for s in self.sessions() if s.lost_since_watch]
        record.resume_s = [t for s in interrupted if (t := s.resume_s()) is not None]
        record.detail["not_resumed"] = len(interrupted) - len(record.resume_s)
        record.detail["sessions_moved"] = sum(
            1 for s in self.sessions() if s.session_id in before and before[s.session_id] - s.nodes()
        )
        if self.token_log is not None:
            end = record.recovered if record.recovered is not None else self.clock()
            record.detail["tokens"] = TokenLog.summary(self.token_log.between(record.start, end))
            after = await self.fleet.token_latency_buckets()
            if after is not None:
                delta = bucket_delta(buckets, after)
                record.detail["token_service_buckets"] = {str(k): v for k, v in delta.items()}
        if self.check_placement:
            record.detail["split_sessions"] = await self.placement_check(f"after fault #{record.index}")

    async def placement_check(self, when: str) -> int:
        """Ask every running node for its sessions; the number whose peers are on two nodes."""
        split, seen, silent = await self.fleet.split_sessions()
        live = sum(1 for s in self.sessions() if not s.failed)
        if seen > live:  # more sessions than exist: one counted on two nodes under two tags
            split = {**split, f"({seen - live} more sessions seen than live)": []}
        self.placement_checks.append(
            {
                "when": when,
                "at": round(self.clock(), 3),
                "sessions_seen": seen,
                "split": split,
                "silent": silent,
            }
        )
        if split or silent:
            self.log(f"placement {when}: {len(split)} split session(s) {split}, nodes not answering {silent}")
        return len(split)

    async def _control_plane_ok(self) -> bool:
        """A token can be minted, every relay is ready, and every relay is registered."""
        fleet = self.fleet
        self._probes += 1
        if not await fleet.control_plane_ok(f"chaos-probe-{self._probes}"):
            return False
        for relay in fleet.relays:
            if not await fleet.relay_ready(relay.name):
                return False
        return set(await fleet.registered_nodes()) == {r.name for r in fleet.relays}


def bucket_delta(before: dict[float, float] | None, after: dict[float, float]) -> dict[float, float]:
    """Requests per histogram bucket between two scrapes (all of ``after`` if the service restarted)."""
    if before is None or after.get(math.inf, 0.0) < before.get(math.inf, 0.0):
        return dict(after)
    return {le: n - before.get(le, 0.0) for le, n in after.items()}


def bucket_quantile(buckets: dict[float, float], q: float) -> float | None:
    """The smallest bucket bound holding at least ``q`` of the requests (``None``: no requests)."""
    total = buckets.get(math.inf, 0.0)
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return math.inf
