"""The chaos harness (chaos/): its byte checker catches every kind of corruption, and a tiny real
run (2 sessions, 1 relay node, one fault of each kind) injects its faults and loses nothing.

Nothing here checks timing: the run's recovery bound is far above anything a healthy fleet needs,
and the assertions are about what was injected and what arrived.
"""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_harness

# chaos/ is a directory of scripts next to the package, not part of the installed wheel.
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
stream: Any = importlib.import_module("chaos._stream")
report_mod: Any = importlib.import_module("chaos._report")
traffic: Any = importlib.import_module("chaos._traffic")

# The whole quick run (fleet start, 5 faults with restarts, drain) takes ~30 s on an idle
# 2-core box; a loaded CI machine gets a generous bound, the test asserts no timing.
RUN_TIMEOUT_S = 300
# The harness runs `rescue relay` processes; until that command is registered there is no fleet.
needs_relay_cli = pytest.mark.skipif(
    importlib.util.find_spec("rescue.commands.relay") is None, reason="`rescue relay` is not registered yet"
)


def _deliver(chunks: list[bytes]) -> Any:
    check = stream.StreamCheck(stream.Pattern("test"))
    for chunk in chunks:
        check.receive(chunk, 0.0)
    return check


def _chunks(pattern: Any, sizes: list[int]) -> list[bytes]:
    out, offset = [], 0
    for size in sizes:
        out.append(pattern.slice(offset, size))
        offset += size
    return out


def test_pattern_slices_agree_across_block_boundaries() -> None:
    pattern = stream.Pattern("test")
    length = stream.PATTERN_LEN
    whole = pattern.slice(0, 3 * length + 17)
    for offset, size in [(0, 1), (length - 3, 10), (2 * length - 1, length + 2), (5, 0)]:
        assert pattern.slice(offset, size) == whole[offset : offset + size]
    # the block counter makes a whole-period shift visible
    assert pattern.slice(0, 64) != pattern.slice(length, 64)
    assert stream.Pattern("a").slice(0, 64) != stream.Pattern("b").slice(0, 64)


def test_check_accepts_the_stream_in_any_chunking() -> None:
    pattern = stream.Pattern("test")
    chunks = _chunks(pattern, [1, 4096, 65_521, 3, 70_000, 12])
    check = _deliver(chunks)
    assert check.intact
    assert check.delivered == sum(map(len, chunks))


@pytest.mark.parametrize("fault", ["lost", "duplicated", "reordered", "corrupted", "lost_period"])
def test_check_catches_every_kind_of_damage(fault: str) -> None:
    pattern = stream.Pattern("test")
    sizes = [100, 200, 300, 400] if fault != "lost_period" else [10, stream.PATTERN_LEN, 10]
    chunks = _chunks(pattern, sizes)
    if fault in ("lost", "lost_period"):
        del chunks[1]
    elif fault == "duplicated":
        chunks.insert(2, chunks[1])
    elif fault == "reordered":
        chunks[1], chunks[2] = chunks[2], chunks[1]
    else:
        chunks[2] = chunks[2][:7] + bytes([chunks[2][7] ^ 1]) + chunks[2][8:]
    check = _deliver(chunks)
    assert not check.intact
    assert check.first_mismatch is not None


def test_recovery_mark_needs_a_byte_written_after_it() -> None:
    pattern = stream.Pattern("test")
    check = stream.StreamCheck(pattern)
    check.sent = 300
    check.receive(pattern.slice(0, 100), 1.0)
    check.mark()
    assert not check.recovered
    check.receive(pattern.slice(100, 200), 2.0)  # backlog up to the mark: not yet
    assert not check.recovered
    check.receive(pattern.slice(300, 1), 3.0)
    assert check.recovered
    assert check.recovered_at == 3.0


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("10m", 600.0), ("2h", 7200.0), ("1.5", 1.5), ("1d", 86400.0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert report_mod.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10x", "-5s", "0s", "h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        report_mod.parse_duration(text)


@pytest.mark.parametrize("rate", [16, 64, 512, 4096, 16 * 1024, 10**6])
def test_traffic_for_a_rate_writes_about_once_a_second_and_never_above_a_frame(rate: int) -> None:
    config = traffic.TrafficConfig.for_rate(rate)
    assert 1 <= config.chunk_min <= config.chunk_max <= 8 * 1024
    writes_per_s = rate / ((config.chunk_min + config.chunk_max) / 2)
    assert writes_per_s >= 0.5  # a slow session still shows progress every couple of seconds
    if rate >= 16 * 1024:
        assert (config.chunk_min, config.chunk_max) == (64, 8 * 1024)  # the default traffic
    else:
        assert writes_per_s <= 2  # a thousand slow sessions: ~a thousand writes/s per direction


def test_token_log_records_each_fetch_and_summarises_a_storm() -> None:
    log = traffic.TokenLog(lambda: 0.0, {})
    log.fetches += [
        traffic.TokenFetch("s/host", 1.2, 0.010, "relay-1"),
        traffic.TokenFetch("s/guest", 1.7, 0.030, "relay-1"),
        traffic.TokenFetch("t/host", 2.1, 0.020, "relay-2"),
        traffic.TokenFetch("t/guest", 2.2, 5.0, None, "TokenServiceUnavailable"),
    ]
    assert [f.peer for f in log.between(1.5, 2.15)] == ["s/guest", "t/host"]
    summary = traffic.TokenLog.summary(log.fetches)
    assert summary["fetches"] == 4
    assert summary["failed"] == 1
    assert summary["errors"] == {"TokenServiceUnavailable": 1}
    assert summary["latency_p50_ms"] == 20.0  # failures are not latencies
    assert summary["latency_max_ms"] == 30.0
    assert summary["peak_per_s"] == 2


def test_token_service_histogram_between_two_scrapes() -> None:
    faults: Any = importlib.import_module("chaos._faults")
    inf = float("inf")
    before = {0.01: 10.0, 0.1: 20.0, 1.0: 20.0, inf: 20.0}
    after = {0.01: 12.0, 0.1: 40.0, 1.0: 119.0, inf: 120.0}
    delta = faults.bucket_delta(before, after)
    assert delta == {0.01: 2.0, 0.1: 20.0, 1.0: 99.0, inf: 100.0}
    assert faults.bucket_quantile(delta, 0.5) == 1.0
    assert faults.bucket_quantile(delta, 0.2) == 0.1
    assert faults.bucket_quantile(delta, 1.0) == inf
    # the service restarted in between: its counters began again, all of `after` is new
    assert faults.bucket_delta({inf: 500.0}, after) == after
    assert faults.bucket_quantile({inf: 0.0}, 0.95) is None


def _run_chaos(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    return run_harness("chaos/run.py", *args, out=tmp_path, runs="chaos", timeout=RUN_TIMEOUT_S)


@pytest.mark.slow
@pytest.mark.redis
@needs_relay_cli
def test_fleet_scenario_smoke_keeps_every_session_whole_on_one_node(tmp_path: Path) -> None:
    result, report, out_dir = _run_chaos(tmp_path, "--scenario", "fleet", "--quick", "--seed", "3")
    assert report["config"]["scenario"] == "fleet"
    assert report["config"]["nodes"] == 3
    by_kind = report["faults"]["by_kind"]
    assert {kind: k["injected"] for kind, k in by_kind.items() if k["injected"]} == {
        "relay_sigkill": 1,
        "relay_sigterm": 1,
        "token_service_restart": 1,
        "redis_failover": 1,
    }
    failover = next(r for r in report["faults"]["records"] if r["kind"] == "redis_failover")
    assert failover["detail"]["promoted"] != failover["target"]  # the Sentinel promoted the replica
    assert failover["detail"]["replica_back"] is True
    assert failover["recovered"] is not None
    for kind in ("relay_sigkill", "relay_sigterm"):
        k = by_kind[kind]
        assert k["sessions_interrupted"] > 0, k  # the node held sessions: both peers of each reconnected
        assert k["sessions_not_resumed"] == 0, k
        assert k["resume_p95_s"] is not None
        assert k["tokens"]["fetches"] >= 2 * k["sessions_interrupted"]  # a fresh token per peer at least
        assert k["tokens"]["failed"] == 0, k  # the token service answered the storm
        assert k["token_service"]["requests"] >= k["tokens"]["fetches"]  # its own histogram saw them
    placement = report["placement"]
    assert placement["checks"] == 6  # after warm-up, after each fault, at the end
    assert placement["split"] == 0, placement["bad_checks"]
    assert placement["sessions_seen"][0] == 12
    data = report["bytes"]
    assert data["delivered"] == data["sent"] > 0
    assert data["missing"] == data["extra"] == data["mismatched_chunks"] == 0
    assert report["pass"] is True, report["targets"]
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out_dir / "report.md").read_text()
    assert "sessions with peers on two nodes" in text
    assert "resume P50" in text
    assert (out_dir / "reconnects.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
@pytest.mark.redis
@needs_relay_cli
def test_quick_chaos_run_injects_every_fault_and_loses_nothing(tmp_path: Path) -> None:
    result, report, out_dir = _run_chaos(tmp_path, "--quick", "--seed", "1", "--recovery-timeout", "120s")

    # every kind of fault was really injected (weights 1 each: one deck of five)
    faults = report["faults"]
    assert faults["total"] == 5
    assert {kind: k["injected"] for kind, k in faults["by_kind"].items() if k["injected"]} == dict.fromkeys(
        ["peer_abort", "relay_sigkill", "relay_sigterm", "redis_restart", "token_service_restart"], 1
    )
    records = {r["kind"]: r for r in faults["records"]}
    assert records["relay_sigkill"]["detail"]["exit_status"] == -9
    assert records["relay_sigterm"]["detail"]["signal"] == "SIGTERM"
    assert records["redis_restart"]["detail"]["aborted_during_outage"] is not None
    # the empty Redis read as paused until the injector ran `rescue admin init-store` (#11)
    assert records["redis_restart"]["detail"]["failed_closed"] is True
    assert "fail closed when Redis comes back empty" in {t["name"] for t in report["targets"]}
    assert all(r["recovered"] is not None for r in faults["records"]), faults["records"]

    # reconnects happened, and every one of them came back
    reconnects = report["reconnects"]
    assert reconnects["episodes"] >= 5  # a peer abort, plus both peers of each session on relay faults
    assert reconnects["failed"] == 0, reconnects["failed_episodes"]

    # every byte, both ways, arrived once and in order
    data = report["bytes"]
    assert data["delivered"] > 0
    assert data["delivered"] == data["sent"]
    assert data["missing"] == data["extra"] == data["mismatched_chunks"] == 0
    assert len(data["directions"]) == 4
    assert all(d["delivered"] == d["sent"] > 0 for d in data["directions"])
    assert report["sessions"]["failed"] == {}
    assert report["crashes"] == []
    assert report["services"]["relay-1"]["starts"] == 3  # first start + two relay faults

    assert report["pass"] is True
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out_dir / "report.md").read_text().startswith("# Chaos run: PASS")
    for png in ("throughput.png", "recovery.png"):
        assert (out_dir / png).read_bytes().startswith(b"\x89PNG")
    assert (out_dir / "logs" / "relay-1.log").exists()


@pytest.mark.slow
@pytest.mark.redis
@needs_relay_cli
def test_quick_hostile_battery_answers_every_attack_and_spares_the_session(tmp_path: Path) -> None:
    """chaos/hostile.py --quick: each attack once against a real `rescue relay` beside a session."""
    result, report, _ = run_harness(
        "chaos/hostile.py", "--quick", out=tmp_path, runs="hostile", timeout=RUN_TIMEOUT_S
    )
    attacks = {a["attack"]: a for a in report["attacks"]}
    assert len(attacks) == 16 + 39  # the relay's, then the HTTP ones (token service and upgrade head)
    assert all(a["pass"] for a in attacks.values()), [a for a in attacks.values() if not a["pass"]]
    assert attacks["fragment_flood"]["observed"] == {"4010": 1}
    assert attacks["replayed_token"]["observed"] == {"4002": 1}
    assert attacks["many_connections"]["observed"] == {"4008": 20}
    assert report["relay"]["protocol_errors"]["fragments"] == 1
    assert report["relay"]["protocol_errors"]["small_frames"] == 3
    session = report["session"]
    assert session["error"] is None
    assert session["reconnects"] == 0
    assert all(d["intact"] and d["delivered"] == d["sent"] > 0 for d in session["bytes"].values())
    assert report["relay"]["unexpected_exits"] == []
    assert attacks["tls_on_plain_port"]["observed"] == {"http 400": 1}
    assert attacks["slowloris_head"]["observed"] == {"http 408": 1}
    assert attacks["pipeline_no_read"]["observed"] == {"dropped": 1}
    targets = {t["name"]: t for t in report["targets"]}
    assert targets["legitimate token requests beside the attacks"]["pass"], targets
    assert targets["token service errors / tracebacks logged while attacked"]["pass"], targets
    assert result.returncode == (0 if report["pass"] else 1)
    assert "[" in result.stdout  # progress lines
    assert "# Hostile-input run:" in result.stdout
