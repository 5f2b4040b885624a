"""The guardrail store's share of a mint on one Redis server vs a Redis Cluster (decision 0013).

Runs ``Guardrails.decide`` (the token service's two store round trips per mint: the read pipeline
and the pipeline of scripts; no HTTP, no signature) against each ``--redis-url`` given, for fresh
session ids (a storm: every mint records a new assignment): sequentially (latency percentiles) and
with 16 concurrent callers (the store's worker threads; mints/s). Each URL's store is initialised,
gets an enabled cohort and three relay nodes, and keeps its data afterwards: give it a throwaway
server. Results: docs/perf/tokenservice.md ("One server vs a cluster").

Run from the repository root, against private servers on loopback (no persistence)::

    redis-server --port 7100 --save '' --appendonly no --daemonize yes
    for p in 7101 7102 7103; do mkdir -p /tmp/rc/$p; redis-server --port $p --cluster-enabled yes \\
        --dir /tmp/rc/$p --save '' --appendonly no --daemonize yes; done
    redis-cli --cluster create 127.0.0.1:7101 127.0.0.1:7102 127.0.0.1:7103 --cluster-yes
    .venv/bin/python -m bench.store_topology --redis-url redis://127.0.0.1:7100 \\
        --redis-url redis+cluster://127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Final

import trio

from rescue.guardrails import Guardrails, NodeInfo, RedisStore

COHORT: Final = "topology"
CONCURRENCY: Final = 16  # the store's worker threads (REDIS_THREADS)


async def measure(url: str, mints: int, seconds: float) -> dict[str, Any]:
    store = RedisStore(url)
    guardrails = Guardrails(store)
    prefix = os.urandom(4).hex()
    try:
        await store.initialise(now=time.time())
        await store.set_cohort_enabled(COHORT, True)
        for node in ("relay-a", "relay-b", "relay-c"):
            await store.register_node(NodeInfo(node, f"wss://{node}/v1/connect"), ttl=3600)

        async def one(session: str) -> None:
            await guardrails.decide(COHORT, session, now=time.time(), ttl=300, require_node=True)

        for i in range(100):  # warm-up: scripts loaded, pools and slot map filled
            await one(f"warm-{prefix}-{i}")
        latencies = []
        for i in range(mints):
            start = time.perf_counter()
            await one(f"seq-{prefix}-{i}")
            latencies.append((time.perf_counter() - start) * 1000)
        latencies.sort()
        done = 0
        deadline = trio.current_time() + seconds

        async def worker(w: int) -> None:
            nonlocal done
            i = 0
            while trio.current_time() < deadline:
                await one(f"par-{prefix}-{w}-{i}")
                i += 1
                done += 1

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for w in range(CONCURRENCY):
                nursery.start_soon(worker, w)
        elapsed = time.perf_counter() - started
        return {
            "url": url.split("://")[0] + "://…",
            "sequential_mints": mints,
            "p50_ms": round(statistics.median(latencies), 3),
            "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 3),
            "concurrent_mints_per_s": round(done / elapsed),
            "loadavg_1m": os.getloadavg()[0],
        }
    finally:
        await store.aclose()


async def amain(args: argparse.Namespace) -> None:
    rows = []
    for url in args.redis_url:
        with trio.fail_after(600):
            rows.append(await measure(url, args.mints, args.seconds))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| store | sequential p50 ms | p99 ms | mints/s at 16 |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| `{row['url']}` | {row['p50_ms']} | {row['p99_ms']} | {row['concurrent_mints_per_s']} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--redis-url", action="append", required=True, help="a store to measure (repeat)")
    p.add_argument("--mints", type=int, default=2000, help="sequential mints per store")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds of concurrent mints per store")
    trio.run(amain, p.parse_args(argv))


if __name__ == "__main__":
    main()
