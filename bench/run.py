"""The benchmark matrix: targets x modes x sizes x sessions, ratios to the references of the same run.

Usage (from the repository root)::

    .venv/bin/python -m bench.run --quick                 # 1-2 minutes, references + rescue if present
    .venv/bin/python -m bench.run                         # the full matrix (~15-20 minutes)
    .venv/bin/python -m bench.run --targets rescue,websockets,tcp --modes throughput
    .venv/bin/python -m bench.run --tls                   # the same matrix over TLS (wss://)

Each step starts a fresh target process, starts the load generator worker(s) as separate processes,
waits until every session is connected and paired, then: ``start`` (offer load), warm-up, ``mark``
(begin the measured window: relay CPU and memory are read from /proc at the same moment), ``stop``,
drain, result. Everything binds 127.0.0.1; every wait is bounded; the run stops by itself.

Outputs (``--out``, default ``bench/out``): ``results-<stamp>.json``, ``results-<stamp>.md`` and
PNG plots, plus ``latest.*`` copies.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import trio

from bench import _native, _proc
from bench.loadgen import DRAIN_TIMEOUT_S, Scenario, Target, raise_nofile, summarize
from bench.targets import (
    BASELINE,
    BEST_PEER,
    CEILING,
    ROOT,
    TARGETS,
    KeyMaterial,
    TargetDef,
    create_tls,
    start_target,
)

if TYPE_CHECKING:
    from rescue.testing import SelfSignedTLS as TLSMaterial

# SPEC §10 targets.
TARGET_X_WS_1K: Final = 3.0
TARGET_X_WS_16K: Final = 1.0
TARGET_FRAC_TCP: Final = 0.40
TARGET_ACTIVE_SESSIONS: Final = 1250
TARGET_ACTIVE_P95_MS: Final = 40.0
TARGET_IDLE_CPU_PCT: Final = 3.0
TARGET_IDLE_KB_PER_CONN: Final = 24.0
# Issue 15: idle CPU at 10,000 connections and the first message after a quiet spell, one row.
TARGET_IDLE_CPU_PCT_15: Final = 2.5
TARGET_FIRST_MSG_ADDED_P99_MS: Final = 10.0
# Idle first-message probes: a one-byte keystroke as the SDK sends it (12-byte header, 1 byte of
# plaintext, 16-byte AEAD tag): 29 bytes, a 35-byte masked frame, the smallest DATA that carries input.
PROBE_SIZE: Final = 29
# An active level passes when at least this share of the offered messages arrived in the window.
ACTIVE_DELIVERED_MIN: Final = 0.97
# An active level delivering less than this share of the offered load ends that target's sweep.
ACTIVE_COLLAPSED_BELOW: Final = 0.5
# A worker above this share of one core may be what limits the run (flagged in the results).
GEN_BOUND_PCT: Final = 85.0
# Longest wait for a worker to connect all its sessions (10,000 connections take a while).
CONNECT_WAIT_S: Final = 300.0
# Relay memory/CPU sampling period during a window.
SAMPLE_S: Final = 0.5
# Worker stdout lines are small JSON objects; a result with histograms is a few tens of KiB.
MAX_LINE: Final = 1 << 22


@dataclass
class Step:
    """One cell of the matrix (run once per target)."""

    kind: str  # throughput | active | idle
    scenario: Scenario
    warmup_s: float
    duration_s: float
    workers: int = 1
    settle_s: float = 0.0  # idle: wait after connecting before the window (RSS settles)

    @property
    def label(self) -> str:
        sc = self.scenario
        if self.kind == "idle":
            return f"idle {sc.sessions * 2} conns"
        size = f"{sc.size // 1024} KiB"
        if self.kind == "active":
            return f"active {size} @{sc.rate / 1024:.0f} KiB/s x{sc.sessions}"
        return f"throughput {size} x{sc.sessions}"


class _Lines:
    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buf = b""

    async def next(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            data = await self.stream.receive_some(65536)
            if not data:
                raise RuntimeError("worker exited early (see its log in the output directory)")
            self.buf += data
            if len(self.buf) > MAX_LINE:
                raise RuntimeError("worker printed an over-long line")
        line, self.buf = self.buf.split(b"\n", 1)
        obj: dict[str, Any] = json.loads(line)
        return obj


@dataclass
class _Worker:
    process: trio.Process
    lines: _Lines

    async def send(self, cmd: str) -> None:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(cmd.encode() + b"\n")

    async def reap(self) -> None:
        """Wait up to 10 s for the worker to exit, then kill it."""
        with trio.move_on_after(10):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


async def start_worker(
    defn: TargetDef,
    port: int,
    keys: KeyMaterial | None,
    scenario: Scenario,
    log: Path,
    tag: str,
    tls: TLSMaterial | None = None,
) -> _Worker:
    """Start one load-generator worker process against ``defn`` on ``port`` (stderr to ``log``)."""
    config = {
        "target": asdict(
            Target(
                name=defn.name,
                transport=defn.transport,
                port=port,
                path=defn.path,
                key_file=str(keys.key_file) if keys and defn.needs_keys else None,
                tls_ca=str(tls.cert_file) if tls else None,
            )
        ),
        "scenario": asdict(scenario),
        "tag": tag,
    }
    with log.open("ab") as err:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-m", "bench.loadgen", "--worker", json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            cwd=str(ROOT),
        )
    assert proc.stdout is not None
    return _Worker(proc, _Lines(proc.stdout))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_step(
    defn: TargetDef,
    step: Step,
    *,
    keys: KeyMaterial | None,
    log_dir: Path,
    stamp: str,
    tls: TLSMaterial | None = None,
) -> dict[str, Any]:
    """Run one step against one target (over TLS with ``tls``); returns the result row."""
    row: dict[str, Any] = {
        "target": defn.name,
        "role": defn.role,
        "kind": step.kind,
        "label": step.label + (" TLS" if tls else ""),
        "tls": tls is not None,
        "size": step.scenario.size,
        "sessions": step.scenario.sessions,
        "generator": step.scenario.generator,
        "loadavg_start": _proc.loadavg(),
    }
    relay = await start_target(
        defn, log_dir=log_dir, keys=keys, tls=tls, heartbeat_s=step.scenario.heartbeat_s
    )
    workers: list[_Worker] = []
    try:
        rss_empty = _proc.rss_kb(relay.pid)
        counts = [n for n in _split(step.scenario.sessions, step.workers) if n]
        for i, n in enumerate(counts):
            scenario = replace(step.scenario, sessions=n)
            log = log_dir / f"loadgen-{defn.name}-{i}.log"
            workers.append(await start_worker(defn, relay.port, keys, scenario, log, f"{stamp}-{i}", tls))
        with trio.fail_after(CONNECT_WAIT_S):
            connected = [await wk.lines.next() for wk in workers]
        row["connect_s"] = max(c["connect_s"] for c in connected)
        await trio.sleep(step.settle_s)
        for wk in workers:
            await wk.send("start")
        await trio.sleep(step.warmup_s)
        cpu0 = _proc.cpu_seconds(relay.pid)
        machine0 = _proc.MachineCpu.read()
        rss_mark = _proc.rss_kb(relay.pid)
        t0 = time.monotonic()
        for wk in workers:
            await wk.send("mark")
        peak = rss_mark
        deadline = t0 + step.duration_s
        timeline: list[tuple[float, float, int]] = []  # (s since mark, relay CPU s, RSS KiB)
        while (left := deadline - time.monotonic()) > 0:
            await trio.sleep(min(SAMPLE_S, left))
            rss = _proc.rss_kb(relay.pid)
            peak = max(peak, rss)
            timeline.append(
                (round(time.monotonic() - t0, 2), round(_proc.cpu_seconds(relay.pid) - cpu0, 2), rss)
            )
        for wk in workers:
            await wk.send("stop")
        window = time.monotonic() - t0
        cpu1 = _proc.cpu_seconds(relay.pid)
        machine1 = _proc.MachineCpu.read()
        with trio.fail_after(DRAIN_TIMEOUT_S + 30):
            results = [await wk.lines.next() for wk in workers]
        summary = summarize(results)
        relay_cpu = 100.0 * (cpu1 - cpu0) / window
        busy = machine1.busy_cores_since(machine0)
        gen_cpu = sum(summary["gen_cpu_pct"])
        row.update(summary)
        row.update(
            relay_cpu_pct=round(relay_cpu, 1),
            # Messages the relay forwards per second of its own CPU: what one core would carry at
            # 100 %. Robust to other load on a shared machine, unlike msgs/s.
            msgs_per_cpu_s=summary["msgs_per_s"] / (relay_cpu / 100) if relay_cpu >= 1.0 else None,
            relay_rss_mb=round(peak / 1024, 1),
            rss_empty_mb=round(rss_empty / 1024, 1),
            kb_per_conn=round((rss_mark - rss_empty) / summary["connections"], 2)
            if summary["connections"]
            else None,
            machine_busy_cores=round(busy, 2),
            other_load_cores=round(max(0.0, busy - relay_cpu / 100 - gen_cpu / 100), 2),
            gen_bound=any(p > GEN_BOUND_PCT for p in summary["gen_cpu_pct"]),
            workers=len(workers),
            timeline=timeline,
            loadavg_end=_proc.loadavg(),
        )
        if step.kind == "active":
            offered = step.scenario.sessions * step.scenario.rate / step.scenario.size
            if step.scenario.direction == "both":
                offered *= 2
            row["offered_msgs_per_s"] = round(offered, 1)
            row["delivered_frac"] = round(summary["msgs_per_s"] / offered, 3) if offered else None
            # Sessions one core could carry at this per-session cost (ignores latency).
            row["sessions_per_core"] = (
                round(step.scenario.sessions / (relay_cpu / 100)) if relay_cpu >= 1.0 else None
            )
        row["delivery_ok"] = _delivery_ok(row)
        row["passed"] = _passed(row)
    finally:
        for wk in workers:
            await wk.reap()
        await relay.stop()
    return row


def _delivery_ok(row: dict[str, Any]) -> bool:
    """Every message sent arrived once, in order, intact; nothing closed under us."""
    return bool(
        row["connect_failures"] == 0
        and row["lost"] == 0
        and row["seq_errors"] == 0
        and row["corrupt"] == 0
        and row["relay_closed"] == 0
        and row["conn_errors"] == 0
        and row["wire_errors"] == 0
        and row["sent_total"] == row["recv_total"]
    )


def _passed(row: dict[str, Any]) -> bool | None:
    if row["kind"] == "active":
        p95 = row["p95_ms"]
        return bool(
            row["delivery_ok"]
            and row["gen_dropped"] == 0
            and p95 is not None
            and p95 < TARGET_ACTIVE_P95_MS
            and (row["delivered_frac"] or 0) >= ACTIVE_DELIVERED_MIN
        )
    if row["kind"] == "idle":
        return bool(
            row["delivery_ok"]
            and row["relay_cpu_pct"] < TARGET_IDLE_CPU_PCT
            and (row["kb_per_conn"] or 0) <= TARGET_IDLE_KB_PER_CONN
        )
    return None


# -- the matrix ---------------------------------------------------------------------------------------
def build_steps(args: argparse.Namespace) -> list[Step]:
    steps: list[Step] = []
    modes = args.modes.split(",")
    w = args.workers
    if "throughput" in modes:
        for size in (1024, 16384):
            sc = Scenario(
                mode="throughput", sessions=args.sessions, size=size, window=args.window, verify_every=16
            )
            steps.append(Step("throughput", sc, args.warmup, args.duration, workers=w))
    if "active" in modes:
        for n in args.active_sessions:
            sc = Scenario(
                mode="rate",
                sessions=n,
                size=4096,
                rate=65536.0,
                direction="host",
                verify_every=16,
                generator="python" if args.tls else args.generator,
            )
            steps.append(Step("active", sc, args.warmup, args.duration, workers=w))
    if "idle" in modes:
        n = max(1, args.idle_connections // 2)
        sc = Scenario(
            mode="idle",
            sessions=n,
            size=PROBE_SIZE,
            heartbeat_s=args.heartbeat,
            connect_concurrency=128,
            probe_rate=args.probe_rate,
        )
        steps.append(
            Step("idle", sc, args.idle_warmup, args.idle_window, workers=1, settle_s=args.idle_settle)
        )
    return steps


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _gen(row: dict[str, Any]) -> str:
    return "+".join(f"{p:.0f}" for p in row["gen_cpu_pct"])


def progress_line(i: int, n: int, row: dict[str, Any]) -> str:
    base = f"[{i:>2}/{n}] {row['label']:<32} {row['target']:<15}"
    if "error" in row:
        return f"{base} ERROR {row['error']}"
    if row["kind"] == "idle":
        core = (
            f"{row['connections']:,} conns  relay cpu {row['relay_cpu_pct']:.2f}%  "
            f"{_fmt(row['kb_per_conn'], 2)} KB/conn  hb p95 {_fmt(row['hb_p95_ms'], 2)} ms  "
            f"first msg p50 {_fmt(row['p50_ms'], 2)} p99 {_fmt(row['p99_ms'], 2)} ms (n={row['msgs']})  "
            f"connect {row['connect_s']:.1f}s"
        )
    else:
        core = (
            f"{row['msgs_per_s']:>9,.0f} msg/s {row['mb_per_s']:>7.1f} MB/s  "
            f"p50 {_fmt(row['p50_ms'], 2)} p95 {_fmt(row['p95_ms'], 2)} p99 {_fmt(row['p99_ms'], 2)} ms  "
            f"relay cpu {row['relay_cpu_pct']:.0f}% ({_fmt(row['msgs_per_cpu_s'], 0)} msg/CPU-s)  "
            f"gen cpu {_gen(row)}%"
        )
    flags = []
    if not row["delivery_ok"]:
        flags.append("DELIVERY-FAIL")
    if row["gen_bound"]:
        flags.append("GEN-BOUND")
    if row.get("passed") is not None:
        flags.append("pass" if row["passed"] else "FAIL")
    return f"{base} {core}  {' '.join(flags) or 'ok'}"


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per throughput cell: each target against the baseline and the ceiling of the same run."""
    out = []
    for r in rows:
        if r["kind"] != "throughput" or "error" in r:
            continue
        same = {x["target"]: x for x in rows if x["label"] == r["label"] and "error" not in x}
        base = same.get(BASELINE)
        ceil = same.get(CEILING)
        peer = same.get(BEST_PEER)
        out.append(
            {
                "label": r["label"],
                "size": r["size"],
                "target": r["target"],
                "msgs_per_s": r["msgs_per_s"],
                "msgs_per_cpu_s": r["msgs_per_cpu_s"],
                "x_websockets": _ratio(r, base, "msgs_per_s"),
                "frac_tcp": _ratio(r, ceil, "msgs_per_s"),
                "x_websockets_cpu": _ratio(r, base, "msgs_per_cpu_s"),
                "frac_tcp_cpu": _ratio(r, ceil, "msgs_per_cpu_s"),
                "x_picows": _ratio(r, peer, "msgs_per_s"),
                "x_picows_cpu": _ratio(r, peer, "msgs_per_cpu_s"),
            }
        )
    return out


def _ratio(row: dict[str, Any], ref: dict[str, Any] | None, key: str) -> float | None:
    if ref is None or not ref.get(key) or row.get(key) is None:
        return None
    return float(row[key] / ref[key])


def verdicts(rows: list[dict[str, Any]], target: str = "rescue") -> list[dict[str, Any]]:
    """The SPEC §10 checks for ``target`` (rows of other targets shown for context)."""
    out: list[dict[str, Any]] = []
    rat = [r for r in ratios(rows) if r["target"] == target]
    for r in rat:
        need = TARGET_X_WS_1K if r["size"] == 1024 else TARGET_X_WS_16K
        for key, how in (("x_websockets", "msgs/s"), ("x_websockets_cpu", "msgs per relay CPU-s")):
            if r[key] is not None:
                out.append(
                    {
                        "check": f"{how} vs websockets, {r['label']}",
                        "need": f">= {need:g}x",
                        "got": f"{r[key]:.2f}x",
                        "ok": r[key] >= need,
                    }
                )
        for key, how in (("frac_tcp", "msgs/s"), ("frac_tcp_cpu", "msgs per relay CPU-s")):
            if r[key] is not None:
                out.append(
                    {
                        "check": f"{how} vs raw TCP, {r['label']}",
                        "need": f">= {TARGET_FRAC_TCP:.0%}",
                        "got": f"{r[key]:.0%}",
                        "ok": r[key] >= TARGET_FRAC_TCP,
                    }
                )
    active = [r for r in rows if r["target"] == target and r["kind"] == "active" and "error" not in r]
    if active:
        best = max((r["sessions"] for r in active if r["passed"]), default=0)
        top = max(r["sessions"] for r in active)
        reached = top >= TARGET_ACTIVE_SESSIONS
        # Not decided when the run stopped below the target level (--quick) and passed it all.
        ok: bool | None = best >= TARGET_ACTIVE_SESSIONS if reached or best < top else None
        got = f"{best:,} (highest level that passed; levels run up to {top:,})"
        ceiling = [r for r in rows if r["target"] == CEILING and r["kind"] == "active" and "error" not in r]
        ceiling_best = max((r["sessions"] for r in ceiling if r["passed"]), default=0)
        if ok is False and ceiling and ceiling_best <= best:
            # The raw-TCP ceiling failed the same levels: the machine, not the relay, set the limit.
            ok = None
            got += f"; inconclusive: the raw-TCP ceiling passed only {ceiling_best:,} (machine-bound)"
        out.append(
            {
                "check": f"active sessions at 64 KiB/s with P95 < {TARGET_ACTIVE_P95_MS:g} ms",
                "need": f">= {TARGET_ACTIVE_SESSIONS:,}",
                "got": got,
                "ok": ok,
            }
        )
        # The lowest level: one message per wakeup, no backlog to batch over, so the most
        # conservative per-session cost (under a backlog each message costs less).
        low = min(active, key=lambda r: r["sessions"])
        est = low.get("sessions_per_core")
        if est:
            level = [
                x for x in rows if x["kind"] == "active" and x["label"] == low["label"] and "error" not in x
            ]
            refs = {x["target"]: x.get("sessions_per_core") for x in level}
            ceiling_est = refs.get(CEILING)
            context = ", ".join(f"{n} {v:,}" for n, v in refs.items() if n != target and v)
            est_ok: bool | None = est >= TARGET_ACTIVE_SESSIONS
            if not est_ok and ceiling_est is not None and ceiling_est < TARGET_ACTIVE_SESSIONS:
                est_ok = None  # even raw TCP cannot, on this machine: inconclusive
            out.append(
                {
                    "check": "active sessions one core carries, estimated from relay CPU per session "
                    f"at {low['sessions']:,} sessions (ignores latency)",
                    "need": f">= {TARGET_ACTIVE_SESSIONS:,}",
                    "got": f"{est:,}" + (f" (same level: {context})" if context else ""),
                    "ok": est_ok,
                }
            )
    ceiling_idle = {r["label"]: r for r in rows if r["target"] == CEILING and r["kind"] == "idle"}
    for r in rows:
        if r["target"] == target and r["kind"] == "idle" and "error" not in r:
            ref = ceiling_idle.get(r["label"])
            if ref is not None and "error" not in ref and ref["relay_cpu_pct"] > 0:
                out.append(
                    {
                        "check": f"idle CPU relative to the raw-TCP ceiling ({ref['relay_cpu_pct']:.2f}%), "
                        "same connections (context, no SPEC bar)",
                        "need": "-",
                        "got": f"{r['relay_cpu_pct'] / ref['relay_cpu_pct']:.2f}x",
                        "ok": None,
                    }
                )
            out.append(
                {
                    "check": f"idle CPU, {r['connections']:,} connections",
                    "need": f"< {TARGET_IDLE_CPU_PCT:g}% of one core",
                    "got": f"{r['relay_cpu_pct']:.2f}%"
                    + (
                        f" (raw TCP relay: {ref['relay_cpu_pct']:.2f}%)" if ref and "error" not in ref else ""
                    ),
                    "ok": r["relay_cpu_pct"] < TARGET_IDLE_CPU_PCT,
                }
            )
            first = r.get("p99_ms")
            if first is not None:
                base = ref.get("p99_ms") if ref is not None and "error" not in ref else None
                added = first - base if base is not None else None
                out.append(
                    {
                        "check": "idle (issue 15): CPU and added P99 delay of the first message after quiet, "
                        f"{r['connections']:,} connections, one row",
                        "need": f"<= {TARGET_IDLE_CPU_PCT_15:g}% and <= {TARGET_FIRST_MSG_ADDED_P99_MS:g} ms "
                        "over raw TCP",
                        "got": f"{r['relay_cpu_pct']:.2f}%, P99 {first:.2f} ms"
                        + (f" (raw TCP {base:.2f} ms: +{added:.2f} ms)" if added is not None else ""),
                        "ok": None
                        if added is None
                        else r["relay_cpu_pct"] <= TARGET_IDLE_CPU_PCT_15
                        and added <= TARGET_FIRST_MSG_ADDED_P99_MS,
                    }
                )
            out.append(
                {
                    "check": f"idle memory, {r['connections']:,} connections",
                    "need": f"<= {TARGET_IDLE_KB_PER_CONN:g} KB/conn",
                    "got": f"{_fmt(r['kb_per_conn'], 2)} KB/conn",
                    "ok": (r["kb_per_conn"] or 1e9) <= TARGET_IDLE_KB_PER_CONN,
                }
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    rows: list[dict[str, Any]] = report["rows"]
    meta = report["meta"]
    lines = [
        f"# Benchmark results {meta['stamp']}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpus']} CPUs, {meta['python']}; load average at start {meta['loadavg_start']}, "
        f"at end {meta['loadavg_end']} (shared machine: compare ratios within this run).  ",
        f"Targets: {', '.join(meta['targets'])}.",
        "",
    ]
    if meta.get("tls"):
        lines[-1:-1] = [
            "Transport: **TLS** (`--tls`): every target serves TLS 1.3 with a self-signed ECDSA P-256 "
            "certificate (raw TCP: the same copy loop over trio's SSLStream); the load generator "
            "runs TLS over MemoryBIO.",
        ]
    tput = [r for r in rows if r["kind"] == "throughput"]
    if tput:
        lines += [
            f"## Throughput (both directions, window of {meta['window']} messages in flight per flow)",
            "",
            "| cell | target | msgs/s | MB/s | P50 ms | P95 ms | P99 ms | relay CPU % | gen CPU % "
            "| other load (cores) | delivery |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in tput:
            lines.append(
                _md_row(r, ("msgs_per_s", 0), ("mb_per_s", 1), ("p50_ms", 2), ("p95_ms", 2), ("p99_ms", 2))
            )
        lines += [
            "",
            "Ratios to the references of this run. *Per CPU-s* divides each relay's msgs/s by the CPU it "
            "used (msgs it forwards per second of one core): robust to other load on a shared machine.",
            "",
            "| cell | target | msgs/s | x websockets | x picows | % of raw TCP | msgs per relay CPU-s "
            "| x websockets (per CPU-s) | x picows (per CPU-s) | % of raw TCP (per CPU-s) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for q in ratios(rows):
            lines.append(
                f"| {q['label']} | {q['target']} | {q['msgs_per_s']:,.0f} | {_x(q['x_websockets'])} | "
                f"{_x(q.get('x_picows'))} | {_pct(q['frac_tcp'])} | {_fmt(q['msgs_per_cpu_s'], 0)} | "
                f"{_x(q['x_websockets_cpu'])} | {_x(q.get('x_picows_cpu'))} | {_pct(q['frac_tcp_cpu'])} |"
            )
        lines.append("")
    active = [r for r in rows if r["kind"] == "active"]
    if active:
        lines += [
            "## Active (4 KiB messages, 64 KiB/s per session host -> guest)",
            "",
            "Load generator: "
            + ", ".join(sorted({r.get("generator", "python") for r in active}))
            + " (native: connect in Python, then the steady state in bench/native/pump.c).",
            "",
            "| sessions | target | offered msgs/s | delivered | P50 ms | P95 ms | P99 ms | relay CPU % "
            "| sessions/core (est.) | relay RSS MB | gen CPU % | gen lag P95 ms | other load | pass |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in active:
            if "error" in r:
                lines.append(f"| {r['sessions']:,} | {r['target']} | error: {r['error']} |")
                continue
            lines.append(
                f"| {r['sessions']:,} | {r['target']} | {r['offered_msgs_per_s']:,.0f} | "
                f"{r['delivered_frac']:.1%} | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p95_ms'], 2)} | "
                f"{_fmt(r['p99_ms'], 2)} | {r['relay_cpu_pct']:.0f} | {_fmt(r['sessions_per_core'])} | "
                f"{r['relay_rss_mb']:.0f} | "
                f"{'+'.join(f'{p:.0f}' for p in r['gen_cpu_pct'])} | {_fmt(r['gen_lag_p95_ms'], 1)} | "
                f"{r['other_load_cores']:.2f} | {_fmt(r['passed'])} |"
            )
        lines.append("")
    idle = [r for r in rows if r["kind"] == "idle"]
    if idle:
        lines += [
            f"## Idle (heartbeat every {meta['heartbeat_s']:g} s per connection, "
            f"window {meta['idle_window_s']:g} s)",
            "",
            "First message after quiet: one DATA message (a keystroke, "
            f"{PROBE_SIZE} bytes) from one peer of a session that sent only heartbeats since it "
            "connected, timed to its arrival at the partner; *n* samples (each session once).",
            "",
            "| connections | target | relay CPU % of one core | KB/conn | RSS empty MB | RSS loaded MB "
            "| heartbeat P95 ms | heartbeat max ms | first msg P50 ms | first msg P99 ms | n "
            "| connect s | pass |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in idle:
            if "error" in r:
                lines.append(f"| - | {r['target']} | error: {r['error']} |")
                continue
            lines.append(
                f"| {r['connections']:,} | {r['target']} | {r['relay_cpu_pct']:.2f} | "
                f"{_fmt(r['kb_per_conn'], 2)} | {r['rss_empty_mb']:.0f} | {r['relay_rss_mb']:.0f} | "
                f"{_fmt(r['hb_p95_ms'], 2)} | {_fmt(r.get('hb_max_ms'), 0)} | {_fmt(r.get('p50_ms'), 2)} | "
                f"{_fmt(r.get('p99_ms'), 2)} | {_fmt(r.get('msgs'))} | {r['connect_s']:.1f} | "
                f"{_fmt(r['passed'])} |"
            )
        lines.append("")
    checks = report["verdicts"]
    if checks:
        lines += ["## SPEC §10 checks (rescue)", "", "| check | need | got | ok |", "|---|---|---|---|"]
        for c in checks:
            ok = "-" if c["ok"] is None else "yes" if c["ok"] else "NO"
            lines.append(f"| {c['check']} | {c['need']} | {c['got']} | {ok} |")
        lines.append("")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["## Errors", ""] + [f"- {r['label']} / {r['target']}: {r['error']}" for r in errors] + [""]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.0%}"


def _md_row(r: dict[str, Any], *cols: tuple[str, int]) -> str:
    if "error" in r:
        return f"| {r['label']} | {r['target']} | error: {r['error']} |"
    vals = " | ".join(_fmt(r[k], d) for k, d in cols)
    gen = "+".join(f"{p:.0f}" for p in r["gen_cpu_pct"])
    flag = "ok" if r["delivery_ok"] else "FAIL"
    if r["gen_bound"]:
        flag += " (gen-bound)"
    return (
        f"| {r['label']} | {r['target']} | {vals} | {r['relay_cpu_pct']:.0f} | {gen} | "
        f"{r['other_load_cores']:.2f} | {flag} |"
    )


def plots(report: dict[str, Any], out: Path, stamp: str) -> list[Path]:
    """PNG plots: active P95 latency and relay CPU vs sessions; throughput msgs/s per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if "error" not in r]
    made: list[Path] = []
    active = [r for r in rows if r["kind"] == "active"]
    if active:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in dict.fromkeys(r["target"] for r in active):
            pts = sorted(
                (r["sessions"], r["p95_ms"], r["relay_cpu_pct"]) for r in active if r["target"] == name
            )
            ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
        ax1.axhline(TARGET_ACTIVE_P95_MS, color="red", linestyle="--", linewidth=1, label="target 40 ms")
        ax1.axvline(TARGET_ACTIVE_SESSIONS, color="grey", linestyle=":", linewidth=1)
        ax1.set_yscale("log")
        ax1.set_xlabel("sessions (64 KiB/s each, 4 KiB messages)")
        ax1.set_ylabel("P95 forwarding latency (ms)")
        ax1.legend(fontsize=8)
        ax1.set_title("Active: P95 latency vs sessions")
        ax2.axhline(100, color="grey", linestyle=":", linewidth=1)
        ax2.set_xlabel("sessions")
        ax2.set_ylabel("relay CPU (% of one core)")
        ax2.set_title("Active: relay CPU vs sessions")
        fig.tight_layout()
        path = out / f"active-{stamp}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    idle = [r for r in rows if r["kind"] == "idle" and r.get("timeline")]
    if idle:
        fig, ax = plt.subplots(figsize=(8, 4.2))
        for r in idle:
            tl = r["timeline"]
            xs = [tl[i][0] for i in range(1, len(tl))]
            ys = [
                100 * (tl[i][1] - tl[i - 1][1]) / max(1e-9, tl[i][0] - tl[i - 1][0])
                for i in range(1, len(tl))
            ]
            ax.plot(xs, ys, label=f"{r['target']} ({r['relay_cpu_pct']:.1f}% avg)", linewidth=1)
        ax.axhline(TARGET_IDLE_CPU_PCT, color="red", linestyle="--", linewidth=1, label="target 3%")
        ax.set_xlabel("seconds into the window")
        ax.set_ylabel("relay CPU (% of one core)")
        ax.set_title(f"Idle: {idle[0]['connections']:,} connections, heartbeats only")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"idle-{stamp}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    tput = [r for r in rows if r["kind"] == "throughput"]
    if tput:
        labels = list(dict.fromkeys(r["label"] for r in tput))
        names = list(dict.fromkeys(r["target"] for r in tput))
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        width = 0.8 / max(1, len(names))
        panels = (
            ("msgs_per_s", "messages forwarded per second", "Throughput (same run)"),
            ("msgs_per_cpu_s", "messages per relay CPU-second", "Cost: msgs per second of one relay core"),
        )
        for ax, (key, ylabel, title) in zip(axes, panels, strict=True):
            for j, name in enumerate(names):
                vals = [
                    next((r[key] or 0.0 for r in tput if r["label"] == lab and r["target"] == name), 0.0)
                    for lab in labels
                ]
                bars = ax.bar([i + j * width for i in range(len(labels))], vals, width, label=name)
                ax.bar_label(bars, labels=[f"{v:,.0f}" for v in vals], fontsize=7)
            ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(labels))], labels)
            ax.set_ylabel(ylabel)
            ax.set_title(title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"throughput-{stamp}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


async def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    log_dir = out / f"logs-{stamp}"
    names = [n for n in args.targets.split(",") if n]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; known: {sorted(TARGETS)}")
    keys = KeyMaterial.create(log_dir) if any(TARGETS[n].needs_keys for n in names) else None
    tls = create_tls(log_dir) if args.tls else None
    if tls is not None:
        plain_only = [n for n in names if TARGETS[n].tls_argv is None]
        if plain_only:
            raise SystemExit(f"--tls: {plain_only} cannot serve TLS; leave them out of --targets")
    steps = build_steps(args)
    total = len(steps) * len(names)
    meta = {
        "stamp": stamp,
        "command": " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "loadavg_start": _proc.loadavg(),
        "targets": names,
        "window": args.window,
        "heartbeat_s": args.heartbeat,
        "tls": args.tls,
        "idle_window_s": args.idle_window,
    }
    print(
        f"bench: {len(steps)} steps x {len(names)} targets, load average {meta['loadavg_start']}", flush=True
    )
    rows: list[dict[str, Any]] = []
    failed_active: set[str] = set()
    i = 0
    for step in steps:
        for name in names:
            i += 1
            defn = TARGETS[name]
            if step.kind == "active" and name in failed_active:
                print(
                    f"[{i:>2}/{total}] {step.label:<32} {name:<15} skipped (failed a lower level)", flush=True
                )
                continue
            try:
                row = await run_step(defn, step, keys=keys, log_dir=log_dir, stamp=f"{stamp}-{i}", tls=tls)
            except (RuntimeError, OSError, trio.TooSlowError, KeyError, ValueError) as exc:
                row = {
                    "target": name,
                    "role": defn.role,
                    "kind": step.kind,
                    "label": step.label,
                    "size": step.scenario.size,
                    "sessions": step.scenario.sessions,
                    "error": f"{type(exc).__name__}: {exc}",
                }
            rows.append(row)
            print(progress_line(i, total, row), flush=True)
            # Only a collapse stops a target's sweep: on a shared machine latency alone is too noisy.
            collapsed = "error" in row or (row.get("delivered_frac") or 0) < ACTIVE_COLLAPSED_BELOW
            if step.kind == "active" and collapsed and not args.no_early_stop:
                failed_active.add(name)
    meta["loadavg_end"] = _proc.loadavg()
    report = {"meta": meta, "rows": rows, "ratios": ratios(rows), "verdicts": verdicts(rows)}
    return report


def write_outputs(report: dict[str, Any], out: Path) -> list[Path]:
    stamp = report["meta"]["stamp"]
    paths = [out / f"results-{stamp}.json", out / f"results-{stamp}.md"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    paths[1].write_text(markdown(report))
    paths += plots(report, out, stamp)
    for p in list(paths):
        latest = out / p.name.replace(stamp, "latest")
        shutil.copyfile(p, latest)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="beach-rescue benchmark matrix (see docs/perf/README.md).")
    p.add_argument("--targets", default=None, help="comma list; default: all (rescue if importable)")
    p.add_argument("--modes", default="throughput,active,idle")
    p.add_argument("--quick", action="store_true", help="small and short: about 1-2 minutes")
    p.add_argument("--sessions", type=int, default=100, help="throughput sessions")
    p.add_argument("--window", type=int, default=8, help="throughput: messages in flight per flow")
    p.add_argument("--active-sessions", default="250,500,1000,1250,1500")
    p.add_argument("--idle-connections", type=int, default=10000)
    p.add_argument("--idle-window", type=float, default=60.0, help="seconds of the idle CPU window")
    p.add_argument(
        "--idle-warmup",
        type=float,
        default=35.0,
        help="seconds of heartbeats before the window (the relay moves heartbeat-only connections "
        "to its quiet set 5-20 s after their last data: the window measures the steady state)",
    )
    p.add_argument("--idle-settle", type=float, default=2.0, help="seconds after connecting, before start")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=15.0,
        help="idle: seconds between a peer's heartbeats; rescue relays announce it too (whole seconds)",
    )
    p.add_argument(
        "--probe-rate",
        type=float,
        default=20.0,
        help="idle: sessions a second that send their first DATA message in the window (0: none)",
    )
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--workers", type=int, default=1, help="load generator processes (throughput, active)")
    p.add_argument(
        "--generator",
        choices=("native", "python"),
        default="native",
        help="active mode's steady state: native (bench/native/pump.c, built with cc on first use; "
        "about half the CPU of python at 2,000 sessions) or python; TLS steps always use python",
    )
    p.add_argument(
        "--no-early-stop", action="store_true", help="run every active level even after a collapse"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="every target serves TLS (wss://; raw TCP over TLS) and the generator connects with TLS",
    )
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    p.add_argument("--render", type=Path, help="only re-render the markdown and plots of a results JSON")
    args = p.parse_args(argv)
    if args.quick:
        defaults = p.parse_args([])
        for name, value in (
            ("sessions", 50),
            ("active_sessions", "100,250"),
            ("idle_connections", 1000),
            ("idle_window", 8.0),
            ("idle_warmup", 1.0),
            ("warmup", 1.0),
            ("duration", 3.0),
        ):
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
    args.active_sessions = [int(x) for x in str(args.active_sessions).split(",") if x]
    if args.generator == "native" and "active" in args.modes.split(",") and not args.tls:
        try:
            _native.load()
        except _native.NativeUnavailable as exc:
            print(f"bench: {exc}; the active steps use the Python generator", file=sys.stderr)
            args.generator = "python"
    if args.targets is None:
        names = ["tcp", "websockets", "picows"] + ([] if args.quick or args.tls else ["trio-websocket"])
        if rescue_available():
            names.append("rescue")
        args.targets = ",".join(names)
    return args


def rescue_available() -> bool:
    """True once the real relay can be started by ``bench/rescue_target.py``."""
    with contextlib.suppress(ImportError):
        from bench.rescue_target import relay_api_available

        return relay_api_available()
    return False


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        report["ratios"] = ratios(report["rows"])
        report["verdicts"] = verdicts(report["rows"])
        args.out.mkdir(parents=True, exist_ok=True)
        paths = write_outputs(report, args.out)
        print(markdown(report))
        print("wrote: " + ", ".join(str(p) for p in paths))
        return
    raise_nofile()
    report = trio.run(run_matrix, args)
    paths = write_outputs(report, args.out)
    print()
    print(markdown(report))
    print("wrote: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
