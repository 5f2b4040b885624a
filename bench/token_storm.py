"""Token service under a storm: ``rescue token-service`` against a reference, same run, same Redis.

When a node with thousands of sessions dies, every one of its peers asks for a token at once. This
benchmark mints tokens for fresh session ids (every request makes a new assignment, as in a storm)
at several concurrencies and reports requests/s and latency percentiles for:

- ``rescue``: ``rescue token-service`` (one process), started through its CLI;
- ``reference``: ``bench/references/token_reference.py`` (Starlette + uvicorn + ``redis.asyncio``,
  one process) doing the same Redis work and the same Ed25519 CWT.

Both share one private redis-server (unix socket, no persistence) seeded with an enabled cohort
and three registered relay nodes. The load generator is ``wrk`` (Debian package ``wrk``: C, one
thread, HTTP/1.1 keep-alive, ``--latency`` for the percentiles), with a Lua script giving each
request its own session id. Targets are measured in alternating order at each concurrency, so
machine noise hits both; compare the ratios, not the absolute numbers (docs/perf/tokenservice.md).

Run from the repository root::

    .venv/bin/python -m bench.token_storm                       # concurrency 1, 64, 256; 10 s each
    .venv/bin/python -m bench.token_storm --concurrency 64 --duration 5 --targets rescue
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Final

from bench._proc import cpu_seconds, loadavg

ROOT: Final = Path(__file__).resolve().parents[1]
COHORT: Final = "storm"
NODES: Final = ("relay-a", "relay-b", "relay-c")
START_TIMEOUT_S: Final = 60.0
# wrk's Lua: every request a new session id (a storm of distinct sessions), host and guest mixed.
WRK_SCRIPT: Final = """
local counter = 0
local prefix = string.format("%08x", math.random(0, 0x7fffffff))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  counter = counter + 1
  local role = (counter % 2 == 0) and "guest" or "host"
  local body = string.format(
    '{"session_id":"storm-%s-%d","role":"%s","cohort_id":"storm","client_version":"bench/1","telemetry_opt_in":false}',
    prefix, math.floor(counter / 2), role)
  return wrk.format(nil, nil, nil, body)
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the process exited with {proc.returncode}")
        try:
            body = json.dumps(
                {
                    "session_id": "warm",
                    "role": "host",
                    "cohort_id": COHORT,
                    "client_version": "bench/1",
                    "telemetry_opt_in": False,
                }
            ).encode()
            req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer in time")


def redis_cmd(sock: Path, *args: str) -> None:
    subprocess.run(["redis-cli", "-s", str(sock), *args], check=True, capture_output=True)


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests/s, latency percentiles (ms) and error counts from ``wrk --latency`` output."""

    def ms(value: str, unit: str) -> float:
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    out: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    out["rps"] = float(match.group(1)) if match else 0.0
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        out[f"p{pct}_ms"] = ms(m.group(1), m.group(2)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if m:
        out["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out["socket_errors"] = sum(int(g) for g in m.groups())
    m = re.search(r"(\d+) requests in", text)
    out["requests"] = int(m.group(1)) if m else 0
    return out


def run_wrk(url: str, script: Path, concurrency: int, duration: float, timeout_s: float) -> dict[str, Any]:
    argv = [
        "wrk",
        "-t1",
        f"-c{concurrency}",
        f"-d{duration:g}s",
        f"--timeout={timeout_s:g}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return parse_wrk(result.stdout)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,64,256", help="comma-separated connection counts")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before each measurement")
    p.add_argument("--rounds", type=int, default=1, help="measurements per target and concurrency")
    p.add_argument("--targets", default="rescue,reference")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (apt-get install wrk)")
    targets = args.targets.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="storm-"))
    procs: list[subprocess.Popen[bytes]] = []
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESCUE_", "BEACH_", "FALLBACK_"))}
    env["BEACH_RESCUE_DISABLE_OIDC"] = "1"
    try:
        sock = work / "redis.sock"
        procs.append(
            subprocess.Popen(
                [
                    "redis-server",
                    "--port",
                    "0",
                    "--unixsocket",
                    str(sock),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(work),
                ],
                stdout=subprocess.DEVNULL,
            )
        )
        while not sock.exists():
            time.sleep(0.02)
        time.sleep(0.1)
        redis_url = f"unix://{sock}?db=0"
        redis_cmd(sock, "HSET", "fallback:cohorts", COHORT, "1")
        for node in NODES:
            record = json.dumps({"id": node, "url": f"ws://127.0.0.1:1/{node}", "draining": False})
            redis_cmd(sock, "SET", f"fallback:{{nodes}}:{node}", record, "EX", "86400")
            redis_cmd(sock, "SADD", "fallback:{nodes}", node)
        key = work / "key.jwk"
        subprocess.run(
            [sys.executable, "-P", "-m", "rescue.cli", "keygen", "--out", str(key)],
            check=True,
            capture_output=True,
            env=env,
        )
        ports = {t: free_port() for t in targets}
        commands = {
            "rescue": [
                sys.executable,
                "-m",
                "rescue.cli",
                "token-service",
                "--signing-key",
                str(key),
                "--redis-url",
                redis_url,
                "--host",
                "127.0.0.1",
                "--port",
                str(ports.get("rescue", 0)),
                "--admin-port",  # no probes here (and two benches must not meet on its default)
                "-1",
                "--drain-s",  # nobody to drain for: stop at SIGTERM (the default 10 s met the kill)
                "0",
                "--log-level",
                "WARNING",
                "--init-store",  # a fresh private Redis: a new deployment
            ],
            "reference": [
                sys.executable,
                str(ROOT / "bench" / "references" / "token_reference.py"),
                "--port",
                str(ports.get("reference", 0)),
                "--redis-url",
                redis_url,
                "--key",
                str(key),
            ],
        }
        pids: dict[str, int] = {}
        for target in targets:
            proc = subprocess.Popen(commands[target], env=env, stdout=subprocess.DEVNULL, cwd=ROOT)
            procs.append(proc)
            pids[target] = proc.pid
            wait_http(f"http://127.0.0.1:{ports[target]}/v1/fallback/token", proc)
        script = work / "storm.lua"
        script.write_text(WRK_SCRIPT)
        rows: list[dict[str, Any]] = []
        started_load = loadavg()
        for level in levels:
            for round_ in range(args.rounds):
                order = targets if (round_ + levels.index(level)) % 2 == 0 else list(reversed(targets))
                for target in order:
                    url = f"http://127.0.0.1:{ports[target]}/v1/fallback/token"
                    if args.warmup > 0:
                        run_wrk(url, script, level, args.warmup, 10)
                    cpu0 = cpu_seconds(pids[target])
                    row = run_wrk(url, script, level, args.duration, 10)
                    cpu = cpu_seconds(pids[target]) - cpu0
                    row.update(
                        target=target,
                        concurrency=level,
                        round=round_,
                        cpu_ms_per_request=1000 * cpu / row["requests"] if row["requests"] else None,
                        server_cpu_share=cpu / args.duration,
                        loadavg=loadavg()[0],
                    )
                    rows.append(row)
                    print(
                        f"c={level:<4} {target:<10} {row['rps']:8.0f} req/s  P50 {row['p50_ms']:.2f} ms  "
                        f"P99 {row['p99_ms']:.2f} ms  cpu {row['cpu_ms_per_request'] or 0:.2f} ms/req  "
                        f"errors {row['non_2xx'] + row['socket_errors']}  load {row['loadavg']:.2f}",
                        flush=True,
                    )
        report = {
            "rows": rows,
            "loadavg_start": started_load,
            "duration_s": args.duration,
            "cpus": os.cpu_count(),
            "argv": sys.argv[1:],
        }
        print()
        print(markdown(report))
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"storm-{stamp}.json").write_text(json.dumps(report, indent=1))
        (args.out / f"storm-{stamp}.md").write_text(markdown(report))
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)


def _best(rows: list[dict[str, Any]], target: str, level: int) -> dict[str, Any] | None:
    mine = [r for r in rows if r["target"] == target and r["concurrency"] == level]
    return max(mine, key=lambda r: r["rps"]) if mine else None


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [
        "| concurrency | rescue req/s | reference req/s | ratio | rescue P99 ms | reference P99 ms | "
        "rescue CPU ms/req | reference CPU ms/req | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for level in sorted({r["concurrency"] for r in rows}):
        a, b = _best(rows, "rescue", level), _best(rows, "reference", level)

        def f(row: dict[str, Any] | None, key: str, digits: int = 0) -> str:
            return "—" if row is None or row.get(key) is None else f"{row[key]:.{digits}f}"

        ratio = f"{a['rps'] / b['rps']:.2f}x" if a and b and b["rps"] else "—"
        errors = sum(r["non_2xx"] + r["socket_errors"] for r in rows if r["concurrency"] == level)
        lines.append(
            f"| {level} | {f(a, 'rps')} | {f(b, 'rps')} | {ratio} | {f(a, 'p99_ms', 1)} | "
            f"{f(b, 'p99_ms', 1)} | {f(a, 'cpu_ms_per_request', 2)} | {f(b, 'cpu_ms_per_request', 2)} | "
            f"{errors} |"
        )
    load = report["loadavg_start"]
    lines.append("")
    lines.append(
        f"{report['cpus']} CPUs, load average at start {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}; "
        f"{report['duration_s']:g} s per cell, best of the rounds."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
