"""Soak harness (SPEC §10 "soak"): a steady, churning load for hours; memory, fds, tasks stay flat.

Usage (from the repository root)::

    .venv/bin/python soak/run.py                      # 24 h (the SPEC's bar)
    .venv/bin/python soak/run.py --duration 15m       # shorter: 90s, 10m, 2h, ...
    .venv/bin/python soak/run.py --quick              # ~10 s smoke run

The fleet is the chaos harness's (:mod:`chaos._fleet`: private Redis, ``rescue token-service``,
``--nodes`` ``rescue relay`` processes). ``--sessions`` slots each run one session after another:
host + guest in this process stream verified bytes both ways at ``--rate``, live a random
``--life`` and close, and a new session takes the slot (churn). Every ``--abort-every`` seconds
on average one peer's socket is dropped (occasional reconnects with resume).

Every ``--interval`` one line is printed and a sample taken: RSS, open fds and threads of every
relay, of the token service and of this load generator (from /proc); each relay's
``/debug/stats`` (sessions, connections, and its task count when it reports one); this process's
live trio task count. At the end: the least-squares slope of each series after its warm-up (from
``WARMUP_S`` or half the run, whichever is later; a run too short for that is "not judged"),
against a tolerance (:mod:`soak._analysis`); each relay's tables must empty once
the load stops; every byte of every session verified. Exit 0 pass, 1 fail, 2 harness error.

Outputs in ``--out`` (default ``soak/out``), under a time-stamped directory: ``report.json``,
``samples.csv``, ``report.md`` and ``soak.png``; ``soak/out/latest`` points at the newest run.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

if __package__ in (None, ""):  # run as a script: make `chaos`/`soak` (and `rescue`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio

from chaos._fleet import Fleet, open_fleet
from chaos._harness import run_and_report
from chaos._procstat import sample as proc_sample
from chaos._report import (
    fmt_duration,
    machine_info,
    parse_duration,
    render_table,
    render_targets,
)
from chaos._report import parse_duration_pair as _pair
from chaos._traffic import Episode, SessionRun, Throughput, TrafficConfig, percentile, trio_task_count
from soak._analysis import Flatness, Tolerance, flatness, flatness_verdict

__all__ = ["SoakConfig", "main", "run_soak"]

ROOT: Final = Path(__file__).resolve().parents[1]
# Fields of a relay's /debug/stats that may carry its live task count (`rescue relay` reports
# `tasks`; a relay that reports none is said so in the report).
TASK_FIELDS: Final = ("tasks", "task_count", "trio_tasks")
# Growth before this (or before the run's midpoint, whichever is later) is warm-up, not judged
# (soak._analysis). Measured (docs/perf/soak.md): the token service's fds climb from ~13 to a
# plateau of ~42 +- 5 within ~25 s of load and stay there for minutes: hypercorn (the server
# until decision 0017) kept each connection a client closed in CLOSE-WAIT until its keep-alive
# timer (15 s) ended, so the plateau was new connections per second x 15 s, plus the Redis pool
# and the worker threads growing to the concurrency seen. rescue._http's own server closes at the
# client's EOF; the pool and threads still grow. 60 s is four keep-alive periods: past every
# warm-up measured here, and nothing against a 24 h run.
WARMUP_S: Final = 60.0
# Tolerances for "flat" (see soak._analysis): fitted growth over the judged window must stay below
# max(absolute, relative x mean). RSS: allocator arenas and caches settle in steps of a few MiB.
RSS_TOLERANCE: Final = Tolerance(absolute=4096.0, relative=0.05)  # KiB
# fds and tasks move with the number of live connections, which churn varies by a few.
FD_TOLERANCE: Final = Tolerance(absolute=4.0, relative=0.05)
TASK_TOLERANCE: Final = Tolerance(absolute=10.0, relative=0.05)
TABLE_TOLERANCE: Final = Tolerance(absolute=2.0, relative=0.05)
# Once the load stops, each relay's session and connection tables must empty within this.
EMPTY_TIMEOUT_S: Final = 30.0
# Failed sessions and episodes kept for the report (counts are exact; details are examples).
MAX_KEPT_FAILURES: Final = 100
# Reconnect durations kept for the percentiles (a bounded sample, so a 24 h run stays flat).
MAX_KEPT_DURATIONS: Final = 5000


@dataclass(frozen=True)
class SoakConfig:
    """One run's settings (from :func:`parse_args`; see ``--help`` for each)."""

    duration: float
    sessions: int
    nodes: int
    rate: float
    interval: float
    life: tuple[float, float]
    abort_every: float
    seed: int
    quick: bool
    out: Path
    log_level: str


def parse_args(argv: Sequence[str] | None = None) -> SoakConfig:
    """Parse the command line; ``--quick`` fills in small defaults for anything not given."""
    p = argparse.ArgumentParser(
        prog="soak/run.py",
        description="Soak run against a real local fleet; exits 1 when memory, fds or tasks grow.",
    )
    p.add_argument("--duration", type=parse_duration, default=None, help="run time: 90s, 10m, 2h (24h)")
    p.add_argument("--sessions", type=int, default=None, help="steady session population (20)")
    p.add_argument("--nodes", type=int, default=None, help="relay nodes (2)")
    p.add_argument("--rate", type=float, default=None, help="bytes/s per direction per session (4096)")
    p.add_argument(
        "--interval", type=parse_duration, default=None, help="sample interval (duration/300, 5s-60s)"
    )
    p.add_argument("--life", type=_pair, default=None, help="session lifetime MIN,MAX (30s,300s)")
    p.add_argument(
        "--abort-every", type=parse_duration, default=None, help="mean time between dropped sockets (30s)"
    )
    p.add_argument("--seed", type=int, default=1, help="RNG seed (1)")
    p.add_argument("--quick", action="store_true", help="~10 s smoke run: 3 sessions, 1 node, 1 s samples")
    p.add_argument("--out", type=Path, default=ROOT / "soak" / "out", help="output directory")
    p.add_argument("--log-level", default="WARNING", help="log level of the fleet processes (WARNING)")
    ns = p.parse_args(argv)
    quick: bool = ns.quick
    if (ns.sessions is not None and ns.sessions < 1) or (ns.nodes is not None and ns.nodes < 1):
        p.error("--sessions and --nodes must be >= 1")

    def pick(given: Any, small: Any, full: Any) -> Any:
        if given is not None:
            return given
        return small if quick else full

    duration: float = pick(ns.duration, 10.0, 86400.0)
    return SoakConfig(
        duration=duration,
        sessions=pick(ns.sessions, 3, 20),
        nodes=pick(ns.nodes, 1, 2),
        rate=pick(ns.rate, 8192.0, 4096.0),
        interval=pick(ns.interval, 1.0, min(60.0, max(5.0, duration / 300))),
        life=pick(ns.life, (1.5, 4.0), (30.0, 300.0)),
        abort_every=pick(ns.abort_every, 2.0, 30.0),
        seed=ns.seed,
        quick=quick,
        out=ns.out,
        log_level=ns.log_level,
    )


# ------------------------------------------------------------------------------------------- run


class _Soak:
    """State of one soak run, shared by its tasks."""

    def __init__(self, config: SoakConfig, fleet: Fleet) -> None:
        self.config = config
        self.fleet = fleet
        self.origin = trio.current_time()
        self.throughput = Throughput(per_second=False)
        self.rng = random.Random(f"soak:{config.seed}")
        self.stopping = trio.Event()
        self.live: list[SessionRun] = []
        self.url_to_node = {f"ws://127.0.0.1:{p}/v1/connect": n for n, p in fleet.relay_ports.items()}
        self.traffic = TrafficConfig(rate=config.rate)
        self.run_tag = f"{config.seed}-{os.getpid()}"
        self.next_id = 0
        # aggregates (bounded: a 24 h run must not grow this process)
        self.completed = 0
        self.failed: list[dict[str, Any]] = []
        self.failed_count = 0
        self.sent = self.delivered = self.missing = self.extra = self.mismatched = 0
        self.episodes_ok = 0
        self.episodes_failed = 0
        self.failed_episodes: list[dict[str, Any]] = []
        self.durations: collections.deque[float] = collections.deque(maxlen=MAX_KEPT_DURATIONS)
        self.aborts = 0
        self.interrupted = 0  # reconnects cut short by the session's own normal end
        self.peer_totals: collections.Counter[str] = collections.Counter()
        # Samples as tuples in `columns` order: a 24 h run keeps ~1,500 of them, and dicts would
        # make this process's own memory grow more than the tolerance it is judged by.
        self.samples: list[tuple[float | None, ...]] = []
        self.columns: list[str] = []
        self.relay_task_field: str | None = None
        self.after_load: dict[str, Any] = {}

    def clock(self) -> float:
        return trio.current_time() - self.origin

    def log(self, line: str) -> None:
        print(f"[{fmt_duration(self.clock()):>7}] {line}", flush=True)

    # ------------------------------------------------------------------------------ load

    def _on_episode(self, episode: Episode) -> None:
        if episode.ok:
            self.episodes_ok += 1
            if episode.duration is not None:
                self.durations.append(episode.duration)
        else:
            self.episodes_failed += 1
            if len(self.failed_episodes) < MAX_KEPT_FAILURES:
                self.failed_episodes.append(episode.to_json())

    async def slot(self, index: int) -> None:
        """One place in the population: sessions one after another until the run stops."""
        rng = random.Random(f"soak-slot:{self.config.seed}:{index}")
        lo, hi = self.config.life
        with trio.move_on_after(rng.uniform(0, lo)):  # stagger, so churn is steady from the start
            await self.stopping.wait()
        while not self.stopping.is_set():
            self.next_id += 1
            session = SessionRun(
                f"soak-{self.run_tag}-{self.next_id}",
                seed=self.config.seed,
                config=self.traffic,
                clock=self.clock,
                throughput=self.throughput,
                on_episode=self._on_episode,
                url_to_node=self.url_to_node,
            )
            self.live.append(session)
            try:
                async with trio.open_nursery() as nursery:
                    await nursery.start(session.run, self.fleet.api_url)
                    with trio.move_on_after(rng.uniform(lo, hi)):
                        # polls two conditions set by different tasks (no single event for both)
                        while not session.failed and not self.stopping.is_set():  # noqa: ASYNC110
                            await trio.sleep(0.25)
                    session.stop.set()
            finally:
                self.live.remove(session)
            self._account(session)

    def _account(self, session: SessionRun) -> None:
        for tracker in session.trackers.values():
            tracker.finish(ended_normally=not session.failed)
            self.interrupted += tracker.interrupted
        self.completed += 1
        for check in session.checks.values():
            self.sent += check.sent
            self.delivered += check.delivered
            self.missing += max(0, check.sent - check.delivered)
            self.extra += max(0, check.delivered - check.sent)
            self.mismatched += check.mismatched_chunks
        for stats in session.peer_stats.values():
            self.peer_totals.update({k: v for k, v in stats.items() if k != "peak_buffered_bytes"})
        if session.failed:
            self.failed_count += 1
            if len(self.failed) < MAX_KEPT_FAILURES:
                self.failed.append({"session": session.session_id, "error": session.error})
            self.log(f"!! session {session.session_id} failed: {session.error}")

    async def aborter(self) -> None:
        """Drop a random connected peer's socket every ``--abort-every`` on average."""
        rng = random.Random(f"soak-aborts:{self.config.seed}")
        while True:
            await trio.sleep(rng.expovariate(1.0 / self.config.abort_every))
            candidates = [
                (s, role)
                for s in self.live
                if s.peers and not s.stop.is_set()
                for role, t in s.trackers.items()
                if t.connected
            ]
            if candidates:
                session, role = rng.choice(candidates)
                if session.abort(role):
                    self.aborts += 1

    # ------------------------------------------------------------------------------ samples

    async def take_sample(self) -> dict[str, float | None]:
        row: dict[str, float | None] = {"t": round(self.clock(), 3), "load1": os.getloadavg()[0]}
        procs: list[tuple[str, int | None]] = [(r.name, r.pid) for r in self.fleet.relays]
        assert self.fleet.token_service is not None
        procs += [("token-service", self.fleet.token_service.pid), ("loadgen", os.getpid())]
        for name, pid in procs:
            s = proc_sample(pid) if pid is not None else None
            row[f"{name}.rss_kb"] = s.rss_kb if s else None
            row[f"{name}.fds"] = s.fds if s else None
            row[f"{name}.threads"] = s.threads if s else None
            row[f"{name}.cpu_s"] = round(s.cpu_s, 2) if s else None
        for relay in self.fleet.relays:
            stats = await self.fleet.relay_stats(relay.name)
            row[f"{relay.name}.sessions"] = _num(stats, "sessions")
            row[f"{relay.name}.connections"] = _num(stats, "connections")
            tasks = None
            for field in TASK_FIELDS:
                tasks = _num(stats, field)
                if tasks is not None:
                    self.relay_task_field = field
                    break
            row[f"{relay.name}.tasks"] = tasks
        # Rendezvous hashing moves the population between nodes at random as sessions churn, so a
        # node's fds and table sizes follow its share of the load. What must stay flat is the
        # fleet's total and each node's descriptors beyond one per live connection.
        row["relays.sessions"] = _total(row, [f"{r.name}.sessions" for r in self.fleet.relays])
        row["relays.connections"] = _total(row, [f"{r.name}.connections" for r in self.fleet.relays])
        # Likewise its tasks beyond one per session (its timer) and one per connection (its reader,
        # decision 0016): writers come and go with output, the rest is the node's own few.
        for relay in self.fleet.relays:
            fds, conns = row[f"{relay.name}.fds"], row[f"{relay.name}.connections"]
            row[f"{relay.name}.fds_beyond_conns"] = None if fds is None or conns is None else fds - conns
            tasks, sessions = row[f"{relay.name}.tasks"], row[f"{relay.name}.sessions"]
            row[f"{relay.name}.tasks_beyond_load"] = (
                None if tasks is None or sessions is None or conns is None else tasks - sessions - conns
            )
        row["loadgen.tasks"] = trio_task_count()
        row["live_sessions"] = len(self.live)
        row["completed_sessions"] = self.completed
        row["failed_sessions"] = self.failed_count
        row["delivered_bytes"] = self.throughput.total
        row["reconnects_ok"] = self.episodes_ok
        row["reconnects_failed"] = self.episodes_failed
        return row

    def _line(self, row: dict[str, float | None], previous: dict[str, float | None] | None) -> str:
        parts = []
        for relay in self.fleet.relays:
            n = relay.name
            tasks = row.get(f"{n}.tasks")
            parts.append(
                f"{n} rss={_mib(row[f'{n}.rss_kb'])} fds={_i(row[f'{n}.fds'])} "
                f"sess={_i(row[f'{n}.sessions'])} conn={_i(row[f'{n}.connections'])}"
                + (f" tasks={_i(tasks)}" if tasks is not None else "")
            )
        parts.append(f"ts rss={_mib(row['token-service.rss_kb'])} fds={_i(row['token-service.fds'])}")
        parts.append(
            f"gen rss={_mib(row['loadgen.rss_kb'])} fds={_i(row['loadgen.fds'])} "
            f"tasks={_i(row['loadgen.tasks'])}"
        )
        rate = 0.0
        if previous is not None:
            dt = float(row["t"] or 0) - float(previous["t"] or 0)
            if dt > 0:
                rate = (float(row["delivered_bytes"] or 0) - float(previous["delivered_bytes"] or 0)) / dt
        parts.append(
            f"sessions live={len(self.live)} done={self.completed} failed={self.failed_count} "
            f"reconnects={self.episodes_ok}/{self.episodes_ok + self.episodes_failed} "
            f"{rate / 1024:.0f}KiB/s load={row['load1']:.1f}"
        )
        return " | ".join(parts)

    def keep(self, row: dict[str, float | None]) -> None:
        """Store a sample (the first one fixes the columns)."""
        if not self.columns:
            self.columns = list(row)
        self.samples.append(tuple(row.get(c) for c in self.columns))

    def column(self, key: str) -> tuple[list[float], list[float]]:
        """(times, values) of one column, skipping gaps and the after-load sample."""
        if key not in self.columns:
            return [], []
        ti, vi = self.columns.index("t"), self.columns.index(key)
        ts, ys = [], []
        for row in self.samples[:-1]:  # the last sample is after the load stopped
            t, value = row[ti], row[vi]
            if value is not None and t is not None:
                ts.append(t)
                ys.append(value)
        return ts, ys

    async def sampler(self) -> None:
        previous = None
        next_at = trio.current_time()
        while True:
            row = await self.take_sample()
            self.keep(row)
            self.log(self._line(row, previous))
            previous = row
            next_at += self.config.interval
            await trio.sleep_until(max(next_at, trio.current_time()))

    async def wait_tables_empty(self) -> None:
        """After the load: every relay's sessions and connections must drop to 0."""
        started = trio.current_time()
        result: dict[str, Any] = {}
        with trio.move_on_after(EMPTY_TIMEOUT_S):
            while True:
                result = {}
                for relay in self.fleet.relays:
                    stats = await self.fleet.relay_stats(relay.name)
                    result[relay.name] = {
                        "sessions": _num(stats, "sessions"),
                        "connections": _num(stats, "connections"),
                    }
                if all(v["sessions"] == 0 and v["connections"] == 0 for v in result.values()):
                    break
                await trio.sleep(0.2)
        self.after_load = {"tables": result, "waited_s": round(trio.current_time() - started, 3)}

    async def run(self) -> None:
        config = self.config
        self.log(
            f"soak for {fmt_duration(config.duration)}: {config.sessions} sessions at "
            f"{config.rate / 1024:g} KiB/s each way, lifetime {config.life[0]:g}-{config.life[1]:g} s, "
            f"a dropped socket every ~{config.abort_every:g} s, samples every {config.interval:g} s"
        )
        async with trio.open_nursery() as background:
            background.start_soon(self.sampler)
            background.start_soon(self.aborter)
            async with trio.open_nursery() as slots:
                for index in range(config.sessions):
                    slots.start_soon(self.slot, index)
                await trio.sleep(config.duration)
                self.stopping.set()
                self.log("duration reached; closing every session (drain and verify)")
            background.cancel_scope.cancel()
        self.keep(await self.take_sample())
        await self.wait_tables_empty()


def _num(doc: dict[str, Any] | None, key: str) -> float | None:
    if doc is None:
        return None
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _total(row: dict[str, float | None], keys: list[str]) -> float | None:
    values = [row.get(k) for k in keys]
    if any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def _mib(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}MiB"


def _i(x: float | None) -> str:
    return "-" if x is None else str(int(x))


# ---------------------------------------------------------------------------------------- report


def _series(soak: _Soak, key: str) -> tuple[list[float], list[float]]:
    return soak.column(key)


def build_report(soak: _Soak) -> dict[str, Any]:
    """Slopes, tables, integrity, verdict."""
    config = soak.config
    checks: list[dict[str, Any]] = []

    def judge(process: str, metric: str, key: str, tolerance: Tolerance, unit: str) -> Flatness | None:
        ts, ys = _series(soak, key)
        if not ys:
            return None
        result = flatness(ts, ys, tolerance, warmup_s=WARMUP_S)
        checks.append({"process": process, "metric": metric, "unit": unit, **result.to_json()})
        return result

    for relay in soak.fleet.relays:
        judge(relay.name, "rss", f"{relay.name}.rss_kb", RSS_TOLERANCE, "KiB")
        judge(relay.name, "fds beyond connections", f"{relay.name}.fds_beyond_conns", FD_TOLERANCE, "fds")
        if soak.relay_task_field is not None:
            judge(relay.name, "tasks beyond sessions and connections", f"{relay.name}.tasks_beyond_load",
                  TASK_TOLERANCE, "tasks")  # fmt: skip
    judge("all relays", "sessions", "relays.sessions", TABLE_TOLERANCE, "sessions")
    judge("all relays", "connections", "relays.connections", TABLE_TOLERANCE, "connections")
    for name in ("token-service", "loadgen"):
        judge(name, "rss", f"{name}.rss_kb", RSS_TOLERANCE, "KiB")
        judge(name, "fds", f"{name}.fds", FD_TOLERANCE, "fds")
    judge("loadgen", "tasks", "loadgen.tasks", TASK_TOLERANCE, "tasks")

    tables = soak.after_load.get("tables", {})
    emptied = bool(tables) and all(v["sessions"] == 0 and v["connections"] == 0 for v in tables.values())
    flat_ok, flat_text = flatness_verdict(
        [c["flat"] for c in checks], run_s=config.duration, warmup_s=WARMUP_S, interval_s=config.interval
    )
    total_eps = soak.episodes_ok + soak.episodes_failed
    durations = list(soak.durations)
    reconnect_text = (
        f"{100.0 * soak.episodes_ok / total_eps:.2f} % ({soak.episodes_ok}/{total_eps})"
        if total_eps
        else "n/a"
    )
    targets = [
        _target(
            "memory, fds, tasks flat (after warm-up)",
            f"fitted growth <= tolerance for every series, from max({WARMUP_S:g} s, half the run)",
            flat_text,
            flat_ok,
        ),
        _target(
            "relay tables empty after the load",
            f"0 sessions, 0 connections within {EMPTY_TIMEOUT_S:g} s",
            ", ".join(f"{k}: {v['sessions']}/{v['connections']}" for k, v in tables.items()) or "no answer",
            emptied,
        ),
        _target(
            "bytes lost/duplicated/reordered",
            "0",
            f"{soak.missing} missing, {soak.extra} extra, {soak.mismatched} bad chunks of {soak.delivered} B",
            soak.missing == 0 and soak.extra == 0 and soak.mismatched == 0 and soak.delivered > 0,
        ),
        _target(
            "sessions failed",
            "0",
            f"{soak.failed_count} of {soak.completed}",
            soak.failed_count == 0 and soak.completed > 0,
        ),
        _target(
            "reconnects succeed",
            ">= 99.5 %",
            reconnect_text,
            not total_eps or soak.episodes_ok / total_eps >= 0.995,
        ),
        _target(
            "unasked process exits",
            "0",
            str(sum(len(s.unexpected_exits) for s in soak.fleet.services())),
            not any(s.unexpected_exits for s in soak.fleet.services()),
        ),
    ]  # fmt: skip
    return {
        "kind": "soak",
        "pass": all(t["pass"] for t in targets),
        "targets": targets,
        "config": {
            "duration_s": config.duration,
            "sessions": config.sessions,
            "nodes": config.nodes,
            "rate_bytes_per_s": config.rate,
            "interval_s": config.interval,
            "life_s": list(config.life),
            "abort_every_s": config.abort_every,
            "seed": config.seed,
            "quick": config.quick,
            "relay_tuning": soak.fleet.relay_tuning,
        },
        "machine": machine_info(),
        "elapsed_s": round(soak.clock(), 3),
        "samples": len(soak.samples),
        "relay_task_count": soak.relay_task_field or "not reported by /debug/stats",
        "flatness": checks,
        "after_load": soak.after_load,
        "sessions": {
            "completed": soak.completed,
            "failed": soak.failed_count,
            "failures": soak.failed,
            "peer_totals": dict(soak.peer_totals),
        },
        "bytes": {
            "sent": soak.sent,
            "delivered": soak.delivered,
            "missing": soak.missing,
            "extra": soak.extra,
            "mismatched_chunks": soak.mismatched,
        },
        "reconnects": {
            "sockets_dropped": soak.aborts,
            "episodes": total_eps,
            "ok": soak.episodes_ok,
            "failed": soak.episodes_failed,
            "interrupted_by_session_end": soak.interrupted,
            "duration_p50_s": _r(percentile(durations, 0.5)),
            "duration_p95_s": _r(percentile(durations, 0.95)),
            "failed_episodes": soak.failed_episodes,
        },
        "services": {
            s.name: {"starts": s.starts, "unexpected_exits": s.unexpected_exits}
            for s in soak.fleet.services()
        },
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _target(name: str, target: str, value: str, ok: bool) -> dict[str, Any]:
    return {"name": name, "target": target, "value": value, "pass": ok}


def render_report(report: dict[str, Any]) -> str:
    """The human-readable summary (Markdown)."""
    c = report["config"]
    m = report["machine"]
    rows = []
    for f in report["flatness"]:
        unit = f["unit"]
        scale, shown = (1024.0, "MiB") if unit == "KiB" else (1.0, unit)
        rows.append(
            [
                f["process"],
                f["metric"],
                f"{f['mean'] / scale:.1f} {shown}",
                f"{f['slope_per_h'] / scale:+.2f} {shown}/h",
                f"{f['growth_in_window'] / scale:+.2f}",
                f"{f['allowed_growth'] / scale:.2f}",
                {True: "flat", False: "GROWS", None: "too short"}[f["flat"]],
            ]
        )
    s = report["sessions"]
    b = report["bytes"]
    r = report["reconnects"]
    lines = [
        f"# Soak run: {'PASS' if report['pass'] else 'FAIL'}",
        "",
        f"{fmt_duration(report['elapsed_s'])} with {c['sessions']} sessions (lifetime {c['life_s'][0]:g}-"
        f"{c['life_s'][1]:g} s, {c['rate_bytes_per_s'] / 1024:g} KiB/s each way) on {c['nodes']} relay "
        f"node(s); {report['samples']} samples every {c['interval_s']:g} s. Machine: {m['cpus']} CPUs, "
        f"loadavg at the end {m['loadavg']}.",
        "",
        "## Second-half trends",
        "",
        render_table(["process", "metric", "mean", "slope", "growth", "allowed", "verdict"], rows),
        "",
        f"Relay task count: {report['relay_task_count']} (judged beyond sessions and connections).",
        "",
        f"Sessions: {s['completed']} completed, {s['failed']} failed. "
        f"Bytes: {b['delivered']:,} delivered and verified, {b['missing']} missing, "
        f"{b['extra']} extra, {b['mismatched_chunks']} bad chunks. "
        f"Reconnects: {r['sockets_dropped']} sockets dropped, {r['ok']}/{r['episodes']} reconnects succeeded "
        f"(P50 {r['duration_p50_s']} s, P95 {r['duration_p95_s']} s).",
        "",
        "## Targets",
        "",
        render_targets(report["targets"]),
    ]
    if s["failures"]:
        lines += ["", "Failed sessions (first ones):"] + [
            f"- {x['session']}: {x['error']}" for x in s["failures"]
        ]
    return "\n".join(lines) + "\n"


def write_samples_csv(soak: _Soak, path: Path) -> None:
    """Every sample as one CSV row."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(soak.columns)
        writer.writerows(["" if v is None else v for v in row] for row in soak.samples)


def write_plot(soak: _Soak, report: dict[str, Any], path: Path) -> None:
    """soak.png: RSS, fds, tasks and table sizes over time, with the fits over the judged windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from soak._analysis import MIN_POINTS, judged_window, least_squares

    names = [r.name for r in soak.fleet.relays] + ["token-service", "loadgen"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    relays = [r.name for r in soak.fleet.relays]
    panels = [
        (axes[0][0], "rss_kb", "RSS (MiB)", 1 / 1024, names),
        (axes[0][1], "fds", "open fds", 1.0, names),
        (axes[1][0], "tasks", "trio tasks", 1.0, names),
        (axes[1][1], "connections", "relay connections (dashed: sessions)", 1.0, relays),
    ]
    for ax, metric, title, scale, procs in panels:
        for name in procs:
            ts, ys = _series(soak, f"{name}.{metric}")
            if not ys:
                continue
            line = ax.plot([t / 60 for t in ts], [y * scale for y in ys], label=name, linewidth=1)[0]
            _, window = judged_window(ts, ys, warmup_s=WARMUP_S)
            if len(window) >= MIN_POINTS and window[-1][0] > window[0][0]:
                slope, icpt = least_squares([t for t, _ in window], [y for _, y in window])
                xs = [window[0][0], window[-1][0]]
                ax.plot([x / 60 for x in xs], [(slope * x + icpt) * scale for x in xs], linestyle=":",
                        color=line.get_color(), linewidth=2)  # fmt: skip
            if metric == "connections":
                ts2, ys2 = _series(soak, f"{name}.sessions")
                ax.plot([t / 60 for t in ts2], ys2, linestyle="--", color=line.get_color(), linewidth=1)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("minutes")
    fig.suptitle(
        f"Soak {fmt_duration(report['elapsed_s'])}: {'PASS' if report['pass'] else 'FAIL'} "
        f"(dotted: least-squares fit after the warm-up, from max({WARMUP_S:g} s, half the run))"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


async def run_soak(config: SoakConfig) -> tuple[dict[str, Any], Path]:
    """One soak run; (the report, its output directory).

    Raises:
        FleetError: the fleet could not be started.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = config.out / f"soak-{stamp}-seed{config.seed}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"soak: output in {out_dir}", flush=True)
    async with open_fleet(out_dir, nodes=config.nodes, log_level=config.log_level) as fleet:
        soak = _Soak(config, fleet)
        await soak.run()
        report = build_report(soak)
        write_samples_csv(soak, out_dir / "samples.csv")
        try:
            write_plot(soak, report, out_dir / "soak.png")
        except Exception as exc:  # plots are a convenience; the verdict is in report.json
            print(f"soak: plot not written: {exc}", file=sys.stderr)
    return report, out_dir


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the report, print the table; 0 pass, 1 fail, 2 harness error."""
    return run_and_report("soak", run_soak, parse_args(argv), render_report)


if __name__ == "__main__":
    sys.exit(main())
