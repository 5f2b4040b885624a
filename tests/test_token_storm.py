"""bench/token_storm.py: its wrk output parser (the benchmark itself needs wrk and is run by hand)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
storm: Any = importlib.import_module("bench.token_storm")

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:40000/v1/fallback/token
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   120.50ms   20.10ms 400.00ms   80.00%
    Req/Sec   530.00     40.00   600.00     70.00%
  Latency Distribution
     50%  110.25ms
     75%  130.00ms
     90%  150.00ms
     99%    1.20s
  2650 requests in 5.00s, 1.20MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 7
Requests/sec:    529.87
Transfer/sec:    245.00KB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    row = storm.parse_wrk(WRK_OUTPUT)
    assert row["rps"] == 529.87
    assert row["requests"] == 2650
    assert (row["p50_ms"], row["p99_ms"]) == (110.25, 1200.0)
    assert (row["non_2xx"], row["socket_errors"]) == (7, 3)


def test_parse_wrk_of_garbage_reports_nothing_measured() -> None:
    row = storm.parse_wrk("wrk: connection refused\n")
    assert (row["rps"], row["requests"], row["p99_ms"]) == (0.0, 0, None)


def test_report_puts_both_targets_and_their_ratio_in_one_row() -> None:
    base = {"non_2xx": 0, "socket_errors": 0, "p99_ms": 5.0, "cpu_ms_per_request": 1.0, "concurrency": 64}
    rows = [{**base, "target": "rescue", "rps": 300.0}, {**base, "target": "reference", "rps": 600.0}]
    text = storm.markdown({"rows": rows, "loadavg_start": (1.0, 1.0, 1.0), "duration_s": 5, "cpus": 2})
    assert "| 64 | 300 | 600 | 0.50x |" in text
