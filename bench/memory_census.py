"""Where the relay's memory per idle connection goes: RSS per connection and a tracemalloc census.

Usage (from the repository root)::

    .venv/bin/python -m bench.memory_census                      # 10,000 connections, both passes
    .venv/bin/python -m bench.memory_census --connections 2000 --settle 5

Two passes against fresh relay processes (``bench/rescue_target.py``, the ``rescue`` target of
``bench.run``), each loaded by one ``bench.loadgen`` worker in idle mode (``N/2`` sessions, a
heartbeat per connection every ``--heartbeat`` seconds, started before the settle so connections
reach the quiet set):

1. **RSS** (no tracing): ``VmRSS`` of the relay after ``READY`` and again after every connection is
   connected, paired and has settled; ``(loaded - empty) / connections`` is the figure
   ``bench.run --modes idle`` reports as KB/conn. It includes what tracing cannot see: allocator
   overhead and fragmentation, and pages freed by Python but not returned to the system.
2. **Census** (``--census``: the relay runs under :mod:`tracemalloc` once it is up): a
   snapshot before the first connection and one after the settle, each after a ``gc.collect()``.
   The difference, divided by the connections, is what Python allocated and still holds per
   connection, attributed three ways: by **allocation site** (file:line), by the **relay line**
   that caused it (the most recent frame in ``rescue/``: e.g. the ``start_soon`` that made a
   task), and live **GC-tracked objects by type** (``sys.getsizeof``, shallow: a coroutine's size
   includes its frame; a dict's its table). Tracing costs memory of its own, so the census pass's
   RSS is not the figure to quote; its traced bytes are.

Kernel socket buffers are not in either figure (they are the kernel's memory, not the process's).
Writes ``memory-<stamp>.md`` and ``memory-<stamp>.json`` to ``--out`` (default ``bench/out``).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path
from typing import Any, Final

import trio

from bench import _proc
from bench.loadgen import Scenario, raise_nofile
from bench.run import CONNECT_WAIT_S, _Worker, start_worker
from bench.targets import ROOT, TARGETS, KeyMaterial, Running, start_target

# Longest wait for the relay to write one census (gc + snapshot of ~a million traces).
CENSUS_WAIT_S: Final = 300.0
# Rows per table in the report.
TOP: Final = 25
PACKAGE_MARK: Final = f"{os.sep}rescue{os.sep}"


async def _census(relay: Running, directory: Path, n: int) -> dict[str, Any]:
    os.kill(relay.pid, signal.SIGUSR1)
    done = directory / f"census-{n}.done"
    with trio.fail_after(CENSUS_WAIT_S):
        while not done.exists():
            if relay.process.returncode is not None:
                raise RuntimeError(f"the relay exited during census {n} (see {relay.log})")
            await trio.sleep(0.2)
    data: dict[str, Any] = json.loads((directory / f"census-{n}.json").read_text())
    return data


async def one_pass(
    args: argparse.Namespace, keys: KeyMaterial, log_dir: Path, census_dir: Path | None, tree: Path | None
) -> dict[str, Any]:
    """Start a relay, connect ``args.connections`` idle connections, settle; RSS (and census) around it."""
    base = TARGETS["rescue"]
    argv = base.argv if census_dir is None else (*base.argv, "--census", str(census_dir))
    if tree is not None:  # this bench's target script, that checkout's rescue package
        argv = ("env", f"RESCUE_TARGET_TREE={tree}", *argv)
    defn = replace(base, argv=argv)
    relay = await start_target(defn, log_dir=log_dir, keys=keys)
    worker: _Worker | None = None
    out: dict[str, Any] = {}
    try:
        out["rss_empty_kb"] = _proc.rss_kb(relay.pid)
        if census_dir is not None:
            out["census0"] = await _census(relay, census_dir, 0)
        scenario = Scenario(
            mode="idle", sessions=args.connections // 2, heartbeat_s=args.heartbeat, connect_concurrency=128
        )
        tag = "traced" if census_dir is not None else "rss"
        log = log_dir / f"loadgen-census-{tag}.log"
        worker = await start_worker(defn, relay.port, keys, scenario, log, tag)
        with trio.fail_after(CONNECT_WAIT_S * (3 if census_dir is not None else 1)):
            connected = await worker.lines.next()
        out["connections"] = connected["connections"]
        out["connect_failures"] = connected["connect_failures"]
        out["connect_s"] = connected["connect_s"]
        await worker.send("start")  # heartbeats from now on
        await trio.sleep(args.settle)
        out["rss_loaded_kb"] = _proc.rss_kb(relay.pid)
        if census_dir is not None:
            out["census1"] = await _census(relay, census_dir, 1)
        await worker.send("stop")
        with trio.fail_after(120):
            result = await worker.lines.next()
        out["relay_closed"] = result.get("relay_closed", 0)
        out["conn_errors"] = result.get("conn_errors", 0)
    finally:
        if worker is not None:
            await worker.reap()
        await relay.stop()
    return out


def _relay_frame(tb: tracemalloc.Traceback) -> str:
    """The most recent frame in the rescue package (the relay line that caused an allocation)."""
    for frame in reversed(tb):  # oldest first, so reversed = most recent first
        if PACKAGE_MARK in frame.filename:
            return _short(frame)
    return "(outside rescue/)"


def _short(frame: tracemalloc.Frame) -> str:
    name = frame.filename
    for mark in (PACKAGE_MARK, f"{os.sep}site-packages{os.sep}", f"{os.sep}lib{os.sep}python"):
        if mark in name:
            name = name.rsplit(mark, 1)[1]
            if mark == PACKAGE_MARK:
                name = "rescue/" + name
            break
    return f"{name}:{frame.lineno}"


def analyse(census_dir: Path, conns: int) -> dict[str, Any]:
    """Differences between the two snapshots, per connection."""
    filters = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, pickle.__file__),
    ]
    snap0 = tracemalloc.Snapshot.load(str(census_dir / "census-0.pickle")).filter_traces(filters)
    snap1 = tracemalloc.Snapshot.load(str(census_dir / "census-1.pickle")).filter_traces(filters)
    by_line = snap1.compare_to(snap0, "lineno")
    by_tb = snap1.compare_to(snap0, "traceback")
    total = sum(d.size_diff for d in by_line)
    sites = [
        {
            "site": _short(d.traceback[-1]) if len(d.traceback) else "?",
            "bytes_per_conn": d.size_diff / conns,
            "blocks_per_conn": d.count_diff / conns,
        }
        for d in by_line
        if d.size_diff > 0
    ][:TOP]
    relay_lines: dict[str, list[float]] = {}
    for d in by_tb:
        key = _relay_frame(d.traceback)
        entry = relay_lines.setdefault(key, [0.0, 0.0])
        entry[0] += d.size_diff
        entry[1] += d.count_diff
    callers = sorted(
        (
            {"relay_line": k, "bytes_per_conn": v[0] / conns, "blocks_per_conn": v[1] / conns}
            for k, v in relay_lines.items()
        ),
        key=lambda r: -r["bytes_per_conn"],
    )[:TOP]
    return {"traced_bytes_per_conn": total / conns, "sites": sites, "relay_lines": callers}


def type_diff(c0: dict[str, Any], c1: dict[str, Any], conns: int) -> list[dict[str, Any]]:
    rows = []
    for name, (n1, b1) in c1["types"].items():
        n0, b0 = c0["types"].get(name, (0, 0))
        if b1 - b0 > 0:
            per_conn = {"objects_per_conn": (n1 - n0) / conns, "bytes_per_conn": (b1 - b0) / conns}
            rows.append({"type": name, **per_conn})
    rows.sort(key=lambda r: -r["bytes_per_conn"])
    return rows


def _variant_md(v: dict[str, Any]) -> list[str]:
    rss = v.get("rss")
    traced = v.get("traced")
    lines = [f"## {v['name']}", ""]
    if rss:
        kb = (rss["rss_loaded_kb"] - rss["rss_empty_kb"]) / rss["connections"]
        lines.append(
            f"- **RSS** (untraced pass): {rss['rss_empty_kb'] / 1024:.1f} → "
            f"{rss['rss_loaded_kb'] / 1024:.1f} MiB "
            f"for {rss['connections']:,} connections: **{kb:.2f} KB per connection** "
            f"(KiB of VmRSS; relay closes {rss['relay_closed']}, connection errors {rss['conn_errors']})"
        )
    if traced:
        a = traced["analysis"]
        lines.append(
            f"- **tracemalloc** (census pass): "
            f"**{a['traced_bytes_per_conn'] / 1024:.2f} KiB per connection** "
            f"held by Python allocations ({traced['connections']:,} connections)"
        )
        lines += ["", "By the relay line that caused it (most recent frame in rescue/):", ""]
        lines += ["| relay line | bytes/conn | blocks/conn |", "|---|---:|---:|"]
        lines += [
            f"| `{r['relay_line']}` | {r['bytes_per_conn']:.0f} | {r['blocks_per_conn']:.1f} |"
            for r in a["relay_lines"]
        ]
        lines += ["", "By allocation site:", ""]
        lines += ["| site | bytes/conn | blocks/conn |", "|---|---:|---:|"]
        lines += [
            f"| `{r['site']}` | {r['bytes_per_conn']:.0f} | {r['blocks_per_conn']:.1f} |" for r in a["sites"]
        ]
        lines += ["", "Live GC-tracked objects by type (sys.getsizeof, shallow):", ""]
        lines += ["| type | objects/conn | bytes/conn |", "|---|---:|---:|"]
        lines += [
            f"| `{r['type']}` | {r['objects_per_conn']:.2f} | {r['bytes_per_conn']:.0f} |"
            for r in traced["types"][:TOP]
        ]
    return [*lines, ""]


def _summary(v: dict[str, Any]) -> tuple[str, str]:
    rss, traced = v.get("rss"), v.get("traced")
    kb = f"{(rss['rss_loaded_kb'] - rss['rss_empty_kb']) / rss['connections']:.2f}" if rss else "-"
    kib = f"{traced['analysis']['traced_bytes_per_conn'] / 1024:.2f}" if traced else "-"
    return kb, kib


def markdown(report: dict[str, Any]) -> str:
    title = f"# Relay memory census, {report['stamp']} ({report['connections_asked']:,} idle connections)"
    lines = [title, ""]
    lines.append(f"`{report['command']}`, commit {report['commit']}, settle {report['settle_s']:g} s.")
    lines += ["", "| relay | RSS KB/conn | traced KiB/conn |", "|---|---:|---:|"]
    for v in report["variants"]:
        kb, kib = _summary(v)
        lines.append(f"| {v['name']} | {kb} | {kib} |")
    lines.append("")
    for v in report["variants"]:
        lines += _variant_md(v)
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / f"logs-memory-{stamp}"
    log_dir.mkdir(parents=True, exist_ok=True)
    keys = KeyMaterial.create(log_dir / "keys")
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=False
    ).stdout.strip()
    report: dict[str, Any] = {
        "stamp": stamp,
        "commit": commit,
        "command": "python -m bench.memory_census " + " ".join(sys.argv[1:]),
        "connections_asked": args.connections,
        "settle_s": args.settle,
        "variants": [],
    }
    trees: list[tuple[str, Path | None]] = []
    if args.baseline is not None:
        trees.append((f"before ({args.baseline})", args.baseline.resolve()))
    trees.append((f"this tree ({commit})", None))
    for name, tree in trees:
        variant: dict[str, Any] = {"name": name, "tree": str(tree) if tree else None}
        if not args.no_rss:
            variant["rss"] = rss = await one_pass(args, keys, log_dir, None, tree)
            print(f"{name}: RSS {rss['rss_empty_kb']} -> {rss['rss_loaded_kb']} KiB", flush=True)
        if not args.no_census:
            with tempfile.TemporaryDirectory(prefix="census-") as tmp:
                census_dir = Path(tmp)
                traced = await one_pass(args, keys, log_dir, census_dir, tree)
                conns = traced["connections"] or 1
                traced["analysis"] = analyse(census_dir, conns)
                traced["types"] = type_diff(traced.pop("census0"), traced.pop("census1"), conns)
                variant["traced"] = traced
            print(f"{name}: traced {traced['analysis']['traced_bytes_per_conn']:.0f} B/conn", flush=True)
        report["variants"].append(variant)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connections", type=int, default=10_000, help="idle connections (half as many sessions)")
    p.add_argument("--heartbeat", type=float, default=15.0)
    p.add_argument(
        "--settle", type=float, default=20.0, help="seconds of heartbeats after connecting (quiet set: 15 s)"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        help="also measure another checkout's relay first (e.g. a `git archive` of main), same run",
    )
    p.add_argument("--no-rss", action="store_true", help="skip the untraced RSS pass")
    p.add_argument("--no-census", action="store_true", help="skip the tracemalloc pass")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args(argv)
    raise_nofile()
    report = trio.run(run, args)
    text = markdown(report)
    (args.out / f"memory-{report['stamp']}.md").write_text(text)
    (args.out / f"memory-{report['stamp']}.json").write_text(json.dumps(report, indent=1))
    print(text)


if __name__ == "__main__":
    main()
