"""bench/store_topology.py at tiny scale, on the private server and the private cluster (the
benchmark itself is run by hand; this keeps it working)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
topology: Any = importlib.import_module("bench.store_topology")

pytestmark = pytest.mark.redis


@pytest.mark.parametrize("fixture", ["redis_url", "redis_cluster_url"])
async def test_measure_mints_through_the_store(fixture: str, request: pytest.FixtureRequest) -> None:
    url = request.getfixturevalue(fixture)
    with trio.fail_after(60):
        row = await topology.measure(url, 20, 0.2)
    assert row["url"] == url.split("://")[0] + "://…"  # never the address or a password
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    assert row["concurrent_mints_per_s"] > 0
