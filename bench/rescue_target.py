"""The real relay (``rescue.relay.Relay``) as a benchmark target process.

Starts one relay node in-process with the production defaults, except what a benchmark from one
source address needs: no per-IP handshake rate limit (every connection comes from 127.0.0.1), room
for every session of the idle run, no admin port, and a short drain on SIGTERM. Logs go to stderr
(the harness sends them to a log file) at WARNING, so per-connection INFO lines do not cost CPU in
the measured windows -- pass ``--log-level INFO`` to see them.

Like ``rescue relay``, it tunes the garbage collector once the node is up
(:func:`rescue.relay.tune_gc`), and at exit it writes one ``gc: ...`` line to stderr (the log
file): collections per generation, the time they took, and the last full collections.

With ``--census DIR`` (``bench/memory_census.py``) it traces allocations once the node is up
(:mod:`tracemalloc`) and, on each ``SIGUSR1``, collects garbage and writes ``DIR/census-<n>.pickle``
(the tracemalloc snapshot) and ``DIR/census-<n>.json`` (live GC-tracked objects by type, RSS), then
``DIR/census-<n>.done``.

Usage: ``python bench/rescue_target.py --keys JWKS --port 0`` prints ``READY port=<n>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

# Sessions the node accepts: the idle run uses 5,000 (10,000 connections) by default; headroom.
MAX_SESSIONS = 20_000
# Seconds peers get to leave on SIGTERM; the harness has closed them all by then.
DRAIN_S = 2.0


def relay_api_available() -> bool:
    """True when ``rescue.relay`` provides the class API this script drives."""
    try:
        from rescue.relay import Relay, RelayConfig  # noqa: F401
    except ImportError:
        return False
    return True


def gc_probe() -> Callable[[], str]:
    """Time every garbage collection of this process; returns a function that summarises them.

    One callback per collection (not per object): negligible next to the collections themselves.
    The summary (one line on stderr at exit, i.e. in the harness's log file) says how much CPU the
    collector took per generation and lists the full (generation 2) collections.
    """
    started: list[float] = [0.0]
    total = [0.0, 0.0, 0.0]
    count = [0, 0, 0]
    full: list[tuple[float, float]] = []
    t0 = time.monotonic()

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
            return
        gen = info["generation"]
        took = time.perf_counter() - started[0]
        total[gen] += took
        count[gen] += 1
        if gen == 2:
            full.append((time.monotonic() - t0, took))

    gc.callbacks.append(callback)

    def summary() -> str:
        gens = " ".join(f"gen{g}={count[g]}x/{total[g]:.2f}s" for g in range(3))
        fulls = " ".join(f"{at:.0f}s:{took * 1000:.0f}ms" for at, took in full[-20:])
        return f"gc: {gens} frozen={gc.get_freeze_count()} thresholds={gc.get_threshold()} full: {fulls}"

    return summary


# Frames kept per traced allocation: enough to see which relay line made a trio task or a dict.
CENSUS_FRAMES = 12


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def write_census(directory: Path, n: int) -> None:
    """One census: the tracemalloc snapshot and live GC-tracked objects by type (``--census``)."""
    import tracemalloc

    gc.collect()
    rss = _rss_kb()
    by_type: dict[str, list[int]] = {}
    for obj in gc.get_objects():
        t = type(obj)
        name = f"{t.__module__}.{t.__qualname__}"
        entry = by_type.setdefault(name, [0, 0])
        entry[0] += 1
        entry[1] += sys.getsizeof(obj)
    snapshot = tracemalloc.take_snapshot()
    snapshot.dump(str(directory / f"census-{n}.pickle"))
    traced, _peak = tracemalloc.get_traced_memory()
    (directory / f"census-{n}.json").write_text(
        json.dumps({"rss_kb": rss, "traced": traced, "types": by_type})
    )
    (directory / f"census-{n}.done").touch()


async def _census_on_signal(
    directory: Path, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    with scope, trio.open_signal_receiver(signal.SIGUSR1) as signals:
        task_status.started()  # before READY: a SIGUSR1 before this would kill the process
        n = 0
        async for _ in signals:
            write_census(directory, n)
            n += 1


async def _stats_loop(relay: Any, every: float) -> None:
    """One ``stats: {...}`` line (the read poller's counters) on stderr every ``every`` seconds.

    How many readiness events, looks and wake-ups a window took (``RESCUE_BENCH_STATS_S``): the
    difference of two lines divided by the seconds between them.
    """
    while True:
        await trio.sleep(every)
        poller = relay.poller.statistics() if relay.poller is not None else None
        print(f"stats: t={trio.current_time():.1f} poller={json.dumps(poller)}", file=sys.stderr, flush=True)


async def main(
    keys: str,
    port: int,
    log_level: str,
    read_coalesce: str,
    heartbeat: int,
    quiet_after: float | None,
    quiet_tick: float,
    census: Path | None = None,
    tls: tuple[str, str] | None = None,
    stats_every: float = 0.0,
) -> None:
    from rescue._log import configure_logging
    from rescue.relay import Relay, RelayConfig, tune_gc

    configure_logging(log_level)
    config = RelayConfig(
        keys=keys,
        host="127.0.0.1",
        port=port,
        admin_port=None,
        handshakes_per_ip_per_min=0,
        max_sessions=MAX_SESSIONS,
        drain_s=DRAIN_S,
        read_poller=read_coalesce != "off",
        read_coalesce_s=0.0 if read_coalesce == "off" else float(read_coalesce),
        heartbeat_s=heartbeat,
        quiet_tick_s=quiet_tick,
        tls_cert=tls[0] if tls else None,
        tls_key=tls[1] if tls else None,
    )
    if quiet_after is not None:  # (else the relay's own default)
        config = dataclasses.replace(config, quiet_after_s=quiet_after)
    relay = Relay(config)
    report = gc_probe()
    census_scope = trio.CancelScope()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(relay.run)
            tune_gc()  # what `rescue relay` does once the node is up
            if census is not None:
                import tracemalloc

                # from here on: what the node allocates for connections (start-up is not traced:
                # tracing every import made the start take minutes on a loaded machine)
                tracemalloc.start(CENSUS_FRAMES)
                await nursery.start(_census_on_signal, census, census_scope)
            if stats_every:
                nursery.start_soon(_stats_loop, relay, stats_every)
            print(f"READY port={addresses.port}", flush=True)
            async for _ in signals:
                relay.shutdown()
                census_scope.cancel()
                break
    print(report(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    # RESCUE_TARGET_TREE: run another checkout's relay (before/after runs, bench/memory_census.py)
    sys.path.insert(0, os.environ.get("RESCUE_TARGET_TREE") or str(Path(__file__).resolve().parent.parent))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", required=True, help="JWK set file")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--tls-cert", help="serve wss:// with this certificate (bench.run --tls)")
    parser.add_argument("--tls-key", help="the certificate's private key")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument(
        "--read-coalesce",
        default="0",
        help="seconds the shared read poller lets readiness accumulate, or 'off' for trio's own waits",
    )
    parser.add_argument(
        "--heartbeat",
        type=int,
        default=15,
        help="the heartbeat_s the relay announces (bench.run passes its --heartbeat: peers and relay agree)",
    )
    parser.add_argument(
        "--quiet-after",
        type=float,
        help="heartbeat-only seconds before quiet (default: the relay's own default)",
    )
    parser.add_argument(
        "--quiet-tick", type=float, default=0.1, help="seconds between looks at quiet sockets"
    )
    parser.add_argument(
        "--census", type=Path, help="trace allocations; write a census to this directory on SIGUSR1"
    )
    args = parser.parse_args()
    trio.run(
        main,
        args.keys,
        args.port,
        args.log_level,
        args.read_coalesce,
        args.heartbeat,
        args.quiet_after,
        args.quiet_tick,
        args.census,
        (args.tls_cert, args.tls_key) if args.tls_cert and args.tls_key else None,
        float(os.environ.get("RESCUE_BENCH_STATS_S") or 0),
    )
