"""Chaos harness (SPEC §10 "chaos"): a real fleet, streaming sessions, random faults, verdict.

Usage (from the repository root)::

    .venv/bin/python chaos/run.py --quick                     # ~30 s: 2 sessions, 1 node, 5 faults
    .venv/bin/python chaos/run.py --duration 5m --sessions 8 --nodes 2 --seed 7
    nice .venv/bin/python chaos/run.py --scenario fleet       # 1,000 sessions on 3 nodes, 15 min
    .venv/bin/python chaos/run.py --scenario fleet --quick    # its smoke: 12 sessions, 3 faults

What runs (everything on 127.0.0.1): a private redis-server (unix socket, no persistence),
``rescue token-service`` with a throwaway key, ``--nodes`` ``rescue relay`` processes registered in
Redis, and ``--sessions`` sessions (host + guest through the SDK in this process) that stream
predictable bytes both ways at ``--rate`` per direction. A seeded fault injector
(:mod:`chaos._faults`) drops peers' sockets, SIGKILLs/SIGTERMs relays, restarts Redis and the
token service, one fault at a time, and times how long the fleet takes to recover from each.

Targets (SPEC §10): at least 99.5 % of reconnects succeed; zero application bytes lost,
duplicated or reordered (verified by content); plus every fault recovered and no process exited
unasked; and (every run, the point of ``--scenario fleet``) the two peers of a session are never
connected to different nodes, as every node's ``/debug/stats`` says after each fault.

``--scenario fleet`` is the fleet-scale preset: 1,000 sessions on 3 nodes at 16 B/s per direction
(what a shared 2-core machine carries next to the fleet itself), started at 25 sessions/s, relays
registering for 5 s (``--register-ttl-s 5``: a dead node's sessions move within seconds), and a
mix of node SIGKILLs and SIGTERMs, token-service restarts, Redis failovers (a primary, a replica
and a Sentinel: ``--redis sentinel``, the fleet default) and a few peer drops. Per fault kind it
reports P95 of fault -> resumed stream over every interrupted session, how many moved node, and
the token service's latency and busiest second during the reconnect storm.

Outputs in ``--out`` (default ``chaos/out``), under a time-stamped directory: ``report.json``,
``report.md`` (the table printed at the end), ``throughput.png``, ``recovery.png`` and every
process's log under ``logs/``; ``chaos/out/latest`` points at the newest run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make `chaos` (and `rescue`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio

from chaos._faults import FAULT_KINDS, FaultInjector, FaultPlan, FaultRecord, bucket_quantile
from chaos._fleet import Fleet, FleetError, open_fleet
from chaos._harness import run_and_report
from chaos._procstat import sample
from chaos._report import (
    fmt_duration,
    machine_info,
    parse_duration,
    render_table,
    render_targets,
)
from chaos._report import parse_duration_pair as _pair
from chaos._traffic import Episode, SessionGroup, TokenLog, TrafficConfig, percentile, wait_flowing

__all__ = ["ChaosConfig", "main", "run_chaos"]

ROOT: Final = Path(__file__).resolve().parents[1]
# SPEC §10: at least this share of reconnects must succeed.
TARGET_RECONNECT_PCT: Final = 99.5
# Every session must be connected and flowing both ways before the first fault (plus the ramp).
WARMUP_TIMEOUT_S: Final = 60.0
# Warm-up allowance per session on top of WARMUP_TIMEOUT_S (a thousand sessions connect in
# minutes on a loaded, niced 2-core box).
WARMUP_PER_SESSION_S: Final = 0.25
# How often the unexpected-exit watcher looks at the processes.
CRASH_POLL_S: Final = 0.5

DEFAULT_WEIGHTS: Final = {
    "peer_abort": 3,
    "relay_sigkill": 2,
    "relay_sigterm": 1,
    "redis_restart": 1,
    "token_service_restart": 1,
    "redis_failover": 0,
}
# --scenario fleet: node loss and drains dominate; a plain Redis restart (no persistence: every
# assignment gone at once) is not a failover and stays out of the mix (weight it in explicitly).
FLEET_WEIGHTS: Final = {
    "peer_abort": 1,
    "relay_sigkill": 2,
    "relay_sigterm": 2,
    "redis_restart": 0,
    "token_service_restart": 1,
    "redis_failover": 1,
}
# --scenario fleet relays: registrations that lapse 5 s after a node dies (default 15 s); the
# smoke (--quick) lets them lapse in 1.5 s and keeps nodes down 2-3 s, so its SIGKILL moves sessions.
FLEET_RELAY_ARGS: Final = ("--register-ttl-s", "5")
FLEET_SMOKE_RELAY_ARGS: Final = ("--register-ttl-s", "1.5", "--drain-s", "1.5")
# --quick relays drain in 1.5 s (the harness's default is 5 s): a SIGTERM still spreads every
# peer's reconnect_in_ms over the window, the smoke just does not wait as long for it.
QUICK_RELAY_ARGS: Final = ("--drain-s", "1.5")
SCENARIOS: Final = ("basic", "fleet")


@dataclass(frozen=True)
class ChaosConfig:
    """One run's settings (from :func:`parse_args`; see ``--help`` for each)."""

    duration: float
    sessions: int
    nodes: int
    seed: int
    quick: bool
    faults: int | None
    rate: float
    gap: tuple[float, float]
    outage: tuple[float, float]
    recovery_timeout: float
    weights: dict[str, int]
    progress: float
    out: Path
    log_level: str
    scenario: str = "basic"
    write_every: float = 1.0
    redis: str = "single"
    ramp: float | None = None
    relay_args: tuple[str, ...] = ()
    backoff_cap: float = 30.0


def _weights(text: str) -> dict[str, int]:
    weights = dict.fromkeys(FAULT_KINDS, 0)
    for item in text.split(","):
        kind, _, n = item.partition("=")
        if kind.strip() not in weights:
            raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(FAULT_KINDS)})")
        weights[kind.strip()] = int(n or "1")
    return weights


def parse_args(argv: Sequence[str] | None = None) -> ChaosConfig:
    """Parse the command line; ``--quick`` fills in small defaults for anything not given."""
    p = argparse.ArgumentParser(
        prog="chaos/run.py",
        description="Chaos run against a real local fleet; exits 1 when a SPEC §10 target is missed.",
    )
    p.add_argument("--duration", type=parse_duration, default=None, help="fault phase, e.g. 90s, 5m (3m)")
    p.add_argument("--sessions", type=int, default=None, help="concurrent sessions (8)")
    p.add_argument("--nodes", type=int, default=None, help="relay nodes (2)")
    p.add_argument("--seed", type=int, default=1, help="RNG seed for faults and traffic (1)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="small run: 2 sessions, 1 node, 5 faults (one of each kind), short gaps and outages; "
        "with --scenario fleet: 12 sessions on 3 nodes, 4 faults (a node SIGKILL, a drain, a "
        "token-service restart, a Redis failover)",
    )
    p.add_argument(
        "--scenario",
        choices=SCENARIOS,
        default="basic",
        help="basic (the defaults shown) or fleet: 1,000 sessions on 3 nodes at 16 B/s (a write every "
        "4 s), 15 min, node faults, token-service restarts and Redis failovers, relays with "
        "--register-ttl-s 5",
    )
    p.add_argument(
        "--redis",
        choices=("single", "sentinel"),
        default=None,
        help="one Redis (basic) or a primary + replica + Sentinel (fleet; needed by redis_failover)",
    )
    p.add_argument(
        "--write-every",
        type=parse_duration,
        default=None,
        help="at low rates, one write per direction about this often (1s; fleet: 4s)",
    )
    p.add_argument(
        "--ramp", type=float, default=None, help="sessions started per second (all at once; fleet: 25)"
    )
    p.add_argument("--faults", type=int, default=None, help="stop after this many faults (no limit)")
    p.add_argument(
        "--rate", type=float, default=None, help="bytes/s per direction per session (16384; fleet: 16)"
    )
    p.add_argument("--gap", type=_pair, default=None, help="calm between faults, MIN,MAX (2s,6s)")
    p.add_argument("--outage", type=_pair, default=None, help="time a stopped process stays down (0.5s,4s)")
    p.add_argument(
        "--recovery-timeout",
        type=parse_duration,
        default=None,
        help="a fault must recover within (90s; fleet: 300s, a thousand sessions on a shared box)",
    )
    p.add_argument(
        "--weights",
        type=_weights,
        default=None,
        help="fault mix, e.g. peer_abort=3,relay_sigkill=2,relay_sigterm=1,redis_restart=1,"
        "token_service_restart=1 (that is the default; --quick uses 1 each)",
    )
    p.add_argument(
        "--backoff-cap",
        type=parse_duration,
        default=None,
        help="the peers' largest reconnect window (30s, the SDK's; --quick: 2s, so a peer retries "
        "soon after its node is back instead of up to a doubled window later)",
    )
    p.add_argument("--progress", type=parse_duration, default=None, help="progress line interval (5s)")
    p.add_argument("--out", type=Path, default=ROOT / "chaos" / "out", help="output directory")
    p.add_argument("--log-level", default="INFO", help="log level of the fleet processes (INFO)")
    ns = p.parse_args(argv)
    quick: bool = ns.quick
    if (ns.sessions is not None and ns.sessions < 1) or (ns.nodes is not None and ns.nodes < 1):
        p.error("--sessions and --nodes must be >= 1")

    fleet = ns.scenario == "fleet"

    def pick(given: Any, small: Any, full: Any, fleet_small: Any = None, fleet_full: Any = None) -> Any:
        if given is not None:
            return given
        if fleet:
            return fleet_small if quick else fleet_full
        return small if quick else full

    smoke_weights = dict.fromkeys(FAULT_KINDS, 0) | {
        "relay_sigkill": 1,
        "relay_sigterm": 1,
        "token_service_restart": 1,
        "redis_failover": 1,
    }
    one_each = dict.fromkeys(FAULT_KINDS, 1) | {"redis_failover": 0}
    return ChaosConfig(
        duration=pick(ns.duration, 30.0, 180.0, 60.0, 900.0),
        sessions=pick(ns.sessions, 2, 8, 12, 1000),
        nodes=pick(ns.nodes, 1, 2, 3, 3),
        seed=ns.seed,
        quick=quick,
        faults=pick(ns.faults, 5, None, 4, None),
        rate=pick(ns.rate, 16 * 1024, 16 * 1024, 512.0, 16.0),
        write_every=pick(ns.write_every, 1.0, 1.0, 1.0, 4.0),
        gap=pick(ns.gap, (0.3, 1.0), (2.0, 6.0), (0.3, 1.0), (5.0, 15.0)),
        # fleet: outages around the 5 s registration TTL, so some dead nodes' sessions move
        outage=pick(ns.outage, (0.2, 1.0), (0.5, 4.0), (2.0, 3.0), (1.0, 10.0)),
        recovery_timeout=pick(ns.recovery_timeout, 90.0, 90.0, 120.0, 300.0),
        weights=pick(
            ns.weights,
            one_each,
            dict(DEFAULT_WEIGHTS),
            smoke_weights,
            dict(FLEET_WEIGHTS),
        ),
        progress=pick(ns.progress, 2.0, 5.0, 2.0, 10.0),
        out=ns.out,
        log_level=ns.log_level,
        scenario=ns.scenario,
        redis=pick(ns.redis, "single", "single", "sentinel", "sentinel"),
        ramp=pick(ns.ramp, None, None, None, 25.0),
        relay_args=(FLEET_SMOKE_RELAY_ARGS if quick else FLEET_RELAY_ARGS)
        if fleet
        else QUICK_RELAY_ARGS
        if quick
        else (),
        backoff_cap=pick(ns.backoff_cap, 2.0, 30.0, 2.0, 30.0),
    )


# ------------------------------------------------------------------------------------------- run


class _Run:
    """State of one chaos run, shared by its tasks."""

    def __init__(self, config: ChaosConfig, fleet: Fleet, out_dir: Path) -> None:
        self.config = config
        self.fleet = fleet
        self.out_dir = out_dir
        self.origin = trio.current_time()
        self.crashes: list[dict[str, Any]] = []
        url_to_node = {f"ws://127.0.0.1:{port}/v1/connect": node for node, port in fleet.relay_ports.items()}
        self.group = SessionGroup(
            f"chaos-{config.seed}-{os.getpid()}",
            config.sessions,
            seed=config.seed,
            config=TrafficConfig.for_rate(
                config.rate, every_s=config.write_every, backoff_cap=config.backoff_cap
            ),
            clock=self.clock,
            url_to_node=url_to_node,
        )
        self.sessions = self.group.sessions
        self.episodes: list[Episode] = self.group.episodes
        self.throughput = self.group.throughput
        self.injector = FaultInjector(
            fleet,
            lambda: self.sessions,
            _plan(config),
            seed=config.seed,
            clock=self.clock,
            log=self.log,
            token_log=self.group.token_log,
            check_placement=True,
        )
        self.phase = "starting"
        self.cpu_samples: list[dict[str, float]] = []  # per progress line of the fault phase
        self._cpu: dict[str, float] = {}
        self._cpu_at = trio.current_time()

    def clock(self) -> float:
        return trio.current_time() - self.origin

    def log(self, line: str) -> None:
        print(f"[{self.clock():7.1f}s] {line}", flush=True)

    def cpu_shares(self) -> dict[str, float]:
        """Each process's share of one core since the last call (the harness is ``harness``)."""
        now = trio.current_time()
        seen: dict[str, float] = {"harness": sum(os.times()[:2])}
        for service in self.fleet.services():
            if service.pid is not None:
                seen[service.name] = sample(service.pid).cpu_s
        shares: dict[str, float] = {}
        elapsed = now - self._cpu_at
        for name, cpu in seen.items():
            before = self._cpu.get(name)
            if before is not None and cpu >= before and elapsed > 0:
                shares[name] = (cpu - before) / elapsed
        self._cpu, self._cpu_at = seen, now
        return shares

    async def progress(self) -> None:
        while True:
            await trio.sleep(self.config.progress)
            shares = self.cpu_shares()
            if self.phase == "faults":
                self.cpu_samples.append(shares)
            cpu = " ".join(
                f"{name.replace('relay-', 'r').replace('token-service', 'ts')}={100 * share:.0f}%"
                for name, share in shares.items()
                if name == "harness" or name.startswith(("relay-", "token-service"))
            )
            kinds = Counter(r.kind for r in self.injector.records)
            ok = sum(1 for e in self.episodes if e.ok)
            open_now = sum(1 for s in self.sessions for t in s.trackers.values() if t.episode is not None)
            delivered = sum(c.delivered for s in self.sessions for c in s.checks.values())
            bad = sum(c.mismatched_chunks for s in self.sessions for c in s.checks.values())
            live = sum(1 for s in self.sessions if s.both_connected)
            failed = sum(1 for s in self.sessions if s.failed)
            mix = " ".join(f"{k}={n}" for k, n in sorted(kinds.items())) or "-"
            per_node = " ".join(f"{n}:{len(v)}" for n, v in sorted(self.group.by_node().items()))
            splits = sum(len(c["split"]) for c in self.injector.placement_checks)
            self.log(
                f"{self.phase:<8} faults={len(self.injector.records)} ({mix}) "
                f"reconnects ok={ok}/{len(self.episodes)} open={open_now} "
                f"sessions connected={live}/{len(self.sessions)} failed={failed} [{per_node}] "
                f"split={splits} tokens={len(self.group.token_log.fetches)} "
                f"delivered={delivered / 2**20:.1f}MiB bad_chunks={bad} "
                f"tput={self.throughput.recent(self.clock()) / 1024:.0f}KiB/s load={os.getloadavg()[0]:.1f} "
                f"cpu {cpu}"
            )

    async def watch_crashes(self) -> None:
        """A process that exits unasked is a failure; it is recorded and started again."""
        while True:
            await trio.sleep(CRASH_POLL_S)
            for service in self.fleet.services():
                if service.check_crash():
                    status = service.unexpected_exits[-1]
                    self.crashes.append(
                        {"service": service.name, "status": status, "at": round(self.clock(), 3)}
                    )
                    self.log(f"!! {service.name} exited unasked with status {status}; starting it again")
                    with contextlib.suppress(FleetError):
                        await service.start()

    async def warm_up(self) -> None:
        if not await wait_flowing(
            self.sessions, WARMUP_TIMEOUT_S + WARMUP_PER_SESSION_S * len(self.sessions)
        ):
            raise FleetError("sessions did not all connect and start flowing within the warm-up")

    async def run(self) -> None:
        config = self.config
        async with trio.open_nursery() as background:
            background.start_soon(self.progress)
            background.start_soon(self.watch_crashes)
            async with trio.open_nursery() as sessions:
                await self.group.start(sessions, self.fleet.api_url, per_second=config.ramp)
                await self.warm_up()
                await self.injector.placement_check("after warm-up")
                self.phase = "faults"
                self.log(
                    f"all {len(self.sessions)} sessions flowing; injecting faults for "
                    f"{fmt_duration(config.duration)}"
                    + (f" (at most {config.faults})" if config.faults is not None else "")
                )
                await self.injector.run(until=self.clock() + config.duration)
                await self.injector.placement_check("end of the fault phase")
                self.phase = "draining"
                self.log("fault phase over; stopping writers and verifying every byte")
                for session in self.sessions:
                    session.stop.set()
            background.cancel_scope.cancel()
        for session in self.sessions:
            for tracker in session.trackers.values():
                tracker.finish(ended_normally=not session.failed)


def _plan(config: ChaosConfig) -> FaultPlan:
    return FaultPlan(
        weights=config.weights,
        gap=config.gap,
        outage=config.outage,
        max_faults=config.faults,
        recovery_timeout_s=config.recovery_timeout,
    )


# ---------------------------------------------------------------------------------------- report


def _episode_fault(episode: Episode, faults: list[FaultRecord]) -> str:
    for fault in faults:
        end = fault.recovered if fault.recovered is not None else fault.start + 1e9
        if fault.start - 0.5 <= episode.start <= end:
            return fault.kind
    return "(none)"


def build_report(run: _Run) -> dict[str, Any]:
    """Everything measured, the targets and the verdict, as a JSON-ready dict."""
    config = run.config
    faults = run.injector.records
    episodes = run.episodes

    token_log = run.group.token_log
    by_kind: dict[str, Any] = {}
    for kind in FAULT_KINDS:
        records = [f for f in faults if f.kind == kind]
        times = [f.recovery_s for f in records if f.recovery_s is not None]
        eps = [e for e in episodes if _episode_fault(e, faults) == kind]
        resume = [t for f in records for t in f.resume_s]
        fetches = [
            t
            for f in records
            for t in token_log.between(
                f.start, f.recovered if f.recovered is not None else f.start + config.recovery_timeout
            )
        ]
        tokens = TokenLog.summary(fetches)
        served: Counter[float] = Counter()
        for f in records:
            served.update({float(le): n for le, n in f.detail.get("token_service_buckets", {}).items()})
        delays = [e.delay for e in eps if e.delay is not None]
        welcomes = Counter(int(e.end) for e in eps if e.ok and e.end is not None)
        by_kind[kind] = {
            "injected": len(records),
            "recovered": len(times),
            "recovery_p50_s": _r(percentile(times, 0.5)),
            "recovery_p95_s": _r(percentile(times, 0.95)),
            "recovery_max_s": _r(max(times, default=None)),
            "reconnects": len(eps),
            "reconnects_ok": sum(1 for e in eps if e.ok),
            "sessions_interrupted": sum(len(f.resume_s) + f.detail.get("not_resumed", 0) for f in records),
            "sessions_not_resumed": sum(f.detail.get("not_resumed", 0) for f in records),
            "sessions_moved": sum(f.detail.get("sessions_moved", 0) for f in records),
            "resume_p50_s": _r(percentile(resume, 0.5)),
            "resume_p95_s": _r(percentile(resume, 0.95)),
            "resume_max_s": _r(max(resume, default=None)),
            "tokens": tokens,
            "token_service": {
                "requests": int(served.get(math.inf, 0)),
                "p50_at_most_s": bucket_quantile(served, 0.5),
                "p95_at_most_s": bucket_quantile(served, 0.95),
            },
            "reconnect_delay_p50_s": _r(percentile(delays, 0.5)),
            "reconnect_delay_max_s": _r(max(delays, default=None)),
            "reconnects_peak_per_s": max(welcomes.values(), default=0),
        }

    ok_eps = [e for e in episodes if e.ok]
    trackers = [t for s in run.sessions for t in s.trackers.values()]
    attempts = sum(t.reconnect_events for t in trackers)
    welcomes = sum(t.reconnect_welcomes for t in trackers)
    causes: Counter[str] = Counter()
    for t in trackers:
        causes.update(t.causes)
    reconnect_pct = 100.0 * len(ok_eps) / len(episodes) if episodes else None
    durations = [e.duration for e in ok_eps if e.duration is not None]

    directions: list[dict[str, Any]] = []
    for s in run.sessions:
        for name, c in s.checks.items():
            directions.append(
                {
                    "session": s.session_id,
                    "direction": name,
                    "sent": c.sent,
                    "delivered": c.delivered,
                    "chunks": c.chunks,
                    "mismatched_chunks": c.mismatched_chunks,
                    "first_mismatch": c.first_mismatch,
                }
            )
    sent = sum(d["sent"] for d in directions)
    delivered = sum(d["delivered"] for d in directions)
    missing = sum(max(0, d["sent"] - d["delivered"]) for d in directions)
    extra = sum(max(0, d["delivered"] - d["sent"]) for d in directions)
    mismatched = sum(d["mismatched_chunks"] for d in directions)
    failed_sessions = {s.session_id: s.error for s in run.sessions if s.failed}
    peer_totals: Counter[str] = Counter()
    for s in run.sessions:
        for stats in s.peer_stats.values():
            peer_totals.update({k: v for k, v in stats.items() if k != "peak_buffered_bytes"})

    unrecovered = [f.index for f in faults if f.recovered is None]
    checks = run.injector.placement_checks
    split_total = sum(len(c["split"]) for c in checks)
    silent_total = sum(len(c["silent"]) for c in checks)
    targets = [
        _target(
            "reconnects succeed",
            f">= {TARGET_RECONNECT_PCT} % (and at least one)",
            "n/a" if reconnect_pct is None else f"{reconnect_pct:.2f} % ({len(ok_eps)}/{len(episodes)})",
            reconnect_pct is not None and reconnect_pct >= TARGET_RECONNECT_PCT,
        ),
        _target(
            "bytes lost/duplicated/reordered",
            "0",
            f"{missing} missing, {extra} extra, {mismatched} bad chunks of {delivered} B verified",
            missing == 0 and extra == 0 and mismatched == 0 and delivered > 0,
        ),
        _target(
            "sessions survived",
            "all",
            f"{len(run.sessions) - len(failed_sessions)}/{len(run.sessions)}",
            not failed_sessions,
        ),
        _target(
            "faults recovered",
            f"all, each within {config.recovery_timeout:g} s (and at least one fault)",
            f"{len(faults) - len(unrecovered)}/{len(faults)}",
            bool(faults) and not unrecovered,
        ),
        _target("unasked process exits", "0", str(len(run.crashes)), not run.crashes),
        _target(
            "sessions with peers on two nodes",
            "0 (every node's /debug/stats, after warm-up and after each fault)",
            f"{split_total} in {len(checks)} checks"
            + (f"; {silent_total} node answers missing" if silent_total else ""),
            bool(checks) and split_total == 0 and silent_total == 0,
        ),
    ]
    empty_redis = [f for f in faults if f.kind == "redis_restart" and f.restored is not None]
    if empty_redis:
        closed = [f for f in empty_redis if f.detail.get("failed_closed") is True]
        targets.append(
            _target(
                "fail closed when Redis comes back empty",
                "all (status paused until `rescue admin init-store`)",
                f"{len(closed)}/{len(empty_redis)}",
                len(closed) == len(empty_redis),
            )
        )
    return {
        "kind": "chaos",
        "pass": all(t["pass"] for t in targets),
        "targets": targets,
        "config": {
            "duration_s": config.duration,
            "sessions": config.sessions,
            "nodes": config.nodes,
            "seed": config.seed,
            "quick": config.quick,
            "scenario": config.scenario,
            "redis": config.redis,
            "ramp_sessions_per_s": config.ramp,
            "relay_args": list(config.relay_args),
            "max_faults": config.faults,
            "rate_bytes_per_s": config.rate,
            "write_every_s": config.write_every,
            "gap_s": list(config.gap),
            "outage_s": list(config.outage),
            "recovery_timeout_s": config.recovery_timeout,
            "weights": config.weights,
            "relay_tuning": run.fleet.relay_tuning,
            "relay_flags_missing": run.fleet.relay_flags_missing,
        },
        "machine": machine_info(),
        "elapsed_s": round(run.clock(), 3),
        "cpu_share_mean": _mean_shares(run.cpu_samples),
        "faults": {"total": len(faults), "by_kind": by_kind, "records": [f.to_json() for f in faults]},
        "reconnects": {
            "episodes": len(episodes),
            "ok": len(ok_eps),
            "failed": len(episodes) - len(ok_eps),
            "success_pct": _r(reconnect_pct),
            "duration_p50_s": _r(percentile(durations, 0.5)),
            "duration_p95_s": _r(percentile(durations, 0.95)),
            "interrupted_by_session_end": sum(t.interrupted for t in trackers),
            "attempts": attempts,
            "attempts_welcomed": welcomes,
            "attempt_success_pct": _r(100.0 * welcomes / attempts if attempts else None),
            "causes": dict(causes.most_common()),
            "failed_episodes": [e.to_json() for e in episodes if not e.ok],
        },
        "bytes": {
            "sent": sent,
            "delivered": delivered,
            "missing": missing,
            "extra": extra,
            "mismatched_chunks": mismatched,
            "directions": directions,
        },
        "sessions": {"total": len(run.sessions), "failed": failed_sessions, "peer_totals": dict(peer_totals)},
        "crashes": run.crashes,
        "tokens": TokenLog.summary(token_log.fetches),
        "placement": {
            "checks": len(checks),
            "split": split_total,
            "silent": silent_total,
            "sessions_seen": [c["sessions_seen"] for c in checks],
            "bad_checks": [c for c in checks if c["split"] or c["silent"]],
        },
        "services": {
            s.name: {"starts": s.starts, "expected_exits": s.expected_exits, "unexpected": s.unexpected_exits}
            for s in run.fleet.services()
        },
        "throughput_bytes_per_s": run.throughput.bins,
        "reconnects_per_s": _bins(e.end for e in episodes if e.ok and e.end is not None),
        "token_fetches_per_s": _bins(f.at for f in token_log.fetches),
    }


def _mean_shares(samples: list[dict[str, float]]) -> dict[str, float]:
    """Each process's mean share of one core over the fault phase's progress intervals."""
    names = {name for s in samples for name in s}
    return {
        name: round(sum(s[name] for s in samples if name in s) / sum(1 for s in samples if name in s), 3)
        for name in sorted(names)
    }


def _bins(times: Iterable[float]) -> list[int]:
    """How many of ``times`` fall in each whole second of the run clock."""
    counts = Counter(max(0, int(t)) for t in times)
    return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]


def _r(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def _target(name: str, target: str, value: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "target": target, "value": value, "pass": ok}


def render_report(report: dict[str, Any]) -> str:
    """The human-readable summary (Markdown)."""
    c = report["config"]
    m = report["machine"]
    lines = [
        f"# Chaos run: {'PASS' if report['pass'] else 'FAIL'}",
        "",
        f"{c['sessions']} sessions x 2 directions at {c['rate_bytes_per_s'] / 1024:g} KiB/s, "
        f"{c['nodes']} relay node(s), fault phase {fmt_duration(c['duration_s'])}, seed {c['seed']}; "
        f"run took {fmt_duration(report['elapsed_s'])}. Machine: {m['cpus']} CPUs, "
        f"loadavg at the end {m['loadavg']}."
        + (
            " Mean CPU over the fault phase, share of one core: "
            + ", ".join(f"{k} {100 * v:.0f} %" for k, v in report["cpu_share_mean"].items())
            + "."
            if report.get("cpu_share_mean")
            else ""
        ),
        "",
        "## Faults and recovery",
        "",
    ]
    rows = []
    for kind, k in report["faults"]["by_kind"].items():
        if k["injected"] == 0:
            continue
        rows.append(
            [
                kind,
                k["injected"],
                k["recovered"],
                k["reconnects"],
                k["reconnects_ok"],
                _s(k["recovery_p50_s"]),
                _s(k["recovery_p95_s"]),
                _s(k["recovery_max_s"]),
            ]
        )
    lines.append(
        render_table(
            ["fault", "injected", "recovered", "reconnects", "ok", "recovery P50", "P95", "max"], rows
        )
    )
    lines += [
        "",
        "Per fault kind, over every session the faults interrupted: sessions that moved node, fault ->"
        " resumed stream (both peers welcomed again and a byte delivered each way), the token fetches"
        " made until recovery (failures, latency as the harness saw it, busiest second; 'service P95' is"
        " the token service's own histogram for the same requests: at most that bucket bound), and how the"
        " reconnects spread (the SDK's first wait: its backoff jitter, or reconnect_in_ms after a drain;"
        " the busiest second of WELCOMEs).",
        "",
    ]
    rows = []
    for kind, k in report["faults"]["by_kind"].items():
        if k["injected"] == 0:
            continue
        t = k["tokens"]
        rows.append(
            [
                kind,
                k["sessions_interrupted"],
                k["sessions_moved"],
                _s(k["resume_p50_s"]),
                _s(k["resume_p95_s"]),
                _s(k["resume_max_s"]),
                f"{t['fetches']} ({t['failed']} failed)",
                _ms(t["latency_p50_ms"]),
                _ms(t["latency_p95_ms"]),
                _le(k["token_service"]["p95_at_most_s"]),
                t["peak_per_s"],
                _s(k["reconnect_delay_max_s"]),
                k["reconnects_peak_per_s"],
            ]
        )
    lines.append(
        render_table(
            _FLEET_HEADERS,
            rows,
        )
    )
    r = report["reconnects"]
    b = report["bytes"]
    lines += [
        "",
        f"Reconnects (a welcomed connection lost → the next WELCOME): {r['ok']}/{r['episodes']} succeeded "
        f"({_pct(r['success_pct'])}), duration P50 {_s(r['duration_p50_s'])}, P95 {_s(r['duration_p95_s'])}. "
        f"Individual connection attempts: {r['attempts_welcomed']}/{r['attempts']} got a WELCOME "
        f"({_pct(r['attempt_success_pct'])}; the rest hit a node or control plane that was down, "
        "as intended).",
        "",
        f"Bytes: {b['sent']:,} written, {b['delivered']:,} delivered and verified by content; "
        f"{b['missing']} missing, {b['extra']} extra, {b['mismatched_chunks']} chunks out of place.",
        "",
        "## Targets",
        "",
        render_targets(report["targets"]),
    ]
    if r["causes"]:
        lines += ["", "Why connections were lost or attempts failed: "
                  + ", ".join(f"{k} x{v}" for k, v in r["causes"].items())]  # fmt: skip
    if report["sessions"]["failed"]:
        lines += ["", "Failed sessions:"] + [f"- {k}: {v}" for k, v in report["sessions"]["failed"].items()]
    if report["crashes"]:
        lines += ["", "Unasked exits:"] + [f"- {c}" for c in report["crashes"]]
    missing = c["relay_flags_missing"]
    if missing:
        lines += ["", f"Note: the relay CLI does not offer {', '.join(missing)}; relay defaults were used."]
    return "\n".join(lines) + "\n"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


_FLEET_HEADERS: Final = [
    "fault", "interrupted", "moved", "resume P50", "P95", "max", "token fetches",
    "token P50", "P95", "service P95", "tokens/s peak", "first wait max", "WELCOMEs/s peak",
]  # fmt: skip


def _le(x: float | None) -> str:
    if x is None:
        return "-"
    return "> 10 s" if math.isinf(x) else f"<= {x * 1000:g} ms"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f} ms"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} %"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """throughput.png (with fault markers) and recovery.png (histogram by fault kind)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = dict(
        zip(
            FAULT_KINDS,
            ["tab:blue", "tab:red", "tab:orange", "tab:purple", "tab:green", "tab:brown"],
            strict=True,
        )
    )
    written = []
    bins = report["throughput_bytes_per_s"]
    fig, ax = plt.subplots(figsize=(12, 4.5))
    ax.plot(range(len(bins)), [b / 1024 for b in bins], color="black", linewidth=1, label="delivered")
    seen: set[str] = set()
    for f in report["faults"]["records"]:
        kind = f["kind"]
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.axvline(f["start"], color=colors[kind], linewidth=1.2, label=label)
        end = f["recovered"] if f["recovered"] is not None else f["start"] + 1
        ax.axvspan(f["start"], end, color=colors[kind], alpha=0.12)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("KiB/s delivered (all sessions, both directions)")
    ax.set_title("Chaos: throughput with faults (line: fault; band: until recovered)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    data, labels, cols = [], [], []
    for kind in FAULT_KINDS:
        times = [
            f["recovery_s"] for f in report["faults"]["records"] if f["kind"] == kind and f["recovery_s"]
        ]
        if times:
            data.append(times)
            labels.append(kind)
            cols.append(colors[kind])
    if data:
        ax.hist(data, bins=20, stacked=True, label=labels, color=cols)
        ax.legend(fontsize=8)
    ax.set_xlabel("seconds from fault to recovery")
    ax.set_ylabel("faults")
    ax.set_title("Chaos: recovery time by fault kind")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "recovery.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(12, 4.5))
    tokens = report.get("token_fetches_per_s", [])
    welcomes = report.get("reconnects_per_s", [])
    ax.plot(range(len(tokens)), tokens, color="tab:gray", linewidth=1, label="token fetches/s")
    ax.plot(range(len(welcomes)), welcomes, color="black", linewidth=1.2, label="reconnect WELCOMEs/s")
    seen.clear()
    for f in report["faults"]["records"]:
        kind = f["kind"]
        ax.axvline(f["start"], color=colors[kind], linewidth=1.2, label=kind if kind not in seen else None)
        seen.add(kind)
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("per second")
    ax.set_title("Chaos: reconnects and token fetches per second (line: fault)")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "reconnects.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# ------------------------------------------------------------------------------------------ main


async def run_chaos(config: ChaosConfig) -> tuple[dict[str, Any], Path]:
    """One chaos run; (the report, its output directory).

    Raises:
        FleetError: the fleet could not be started, or the sessions never started flowing.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = config.out / f"chaos-{stamp}-seed{config.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"chaos: output in {out_dir}", flush=True)
    async with open_fleet(
        out_dir,
        nodes=config.nodes,
        log_level=config.log_level,
        relay_args=config.relay_args,
        redis_mode=config.redis,
    ) as fleet:
        run = _Run(config, fleet, out_dir)
        run.log(
            f"fleet up: redis, token service {fleet.api_url}, {len(fleet.relays)} relay(s); "
            f"relay tuning {fleet.relay_tuning or 'none'}"
            + (f", not offered: {fleet.relay_flags_missing}" if fleet.relay_flags_missing else "")
        )
        await run.run()
        report = build_report(run)
    return report, out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the report, print the table; 0 pass, 1 a target missed, 2 harness error."""
    return run_and_report("chaos", run_chaos, parse_args(argv), render_report, plots=write_plots)


if __name__ == "__main__":
    sys.exit(main())
