"""Alert rules and dashboard: promtool syntax checks and rule unit tests, the dashboard generator
being current, and proof that the rule unit tests fail when a threshold drifts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "beach-rescue.rules.yml"
RULE_TESTS = PROM / "tests" / "beach-rescue.test.yml"
RUNBOOK = ROOT / "docs" / "operations" / "runbook.md"


def promtool() -> str:
    return require_tool("promtool", "apt-get install prometheus")


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd=cwd)


def test_promtool_check_rules_and_config() -> None:
    tool = promtool()
    result = run(tool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    result = run(tool, "check", "config", str(PROM / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    result = run(promtool(), "test", "rules", str(RULE_TESTS.relative_to(PROM)), cwd=PROM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_rule_unit_tests_cover_soft_breach_and_churn() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    tested = {case["alertname"] for test in doc["tests"] for case in test.get("alert_rule_test", [])}
    assert {
        "BeachRescueActivationSoftBreach",
        "BeachRescueActivationRatioHigh",
        "BeachRescueConnectionChurnHigh",
        "BeachRescueRelayCpuHigh",
        "BeachRescueHandshakeFailureSpike",
        "BeachRescueProbeFailing",
        "BeachRescueMintsStoreUnavailable",
    } <= tested


DRIFTS = [
    ("> 0.2\n", "> 0.3\n"),  # churn threshold
    ("beach_rescue:activation_ratio:1h >= 0.005", "beach_rescue:activation_ratio:1h >= 0.05"),
    ('{guardrail="soft_breach"}', '{guardrail="soft-breach"}'),
    ("beach_rescue:sessions_started:1h >= 200", "beach_rescue:sessions_started:1h >= 2"),
    # the probe: its cohort out of the ratio, quiet while paused, stale after 5 min, scrape-down
    ('beach_fallback_activations_total{cohort!="probe"}', "beach_fallback_activations_total"),
    ("unless on () max(beach_rescue_fallback_paused", "or on () max(beach_rescue_fallback_paused"),
    (") > 300\n", ") > 3000\n"),
    ('(up{job="beach-rescue-probe"}) == 0', '(up{job="beach-rescue-probe"}) == 2'),
    # every relay full: the reason matters (draining during a roll must not page)
    ('beach_fallback_no_relay_total{reason="full"}', "beach_fallback_no_relay_total"),
    # mints refused for want of the store: the mint route only (not the relays' polls), the scrape's
    # own read carries an outage the not-ready replica no longer sees mints of, a short window
    # (a failover of seconds must not page)
    ('route="/v1/fallback/token"}[2m]', 'route=~"/v1/fallback/.+"}[2m]'),
    (
        'max by (job, instance) (beach_fallback_store_up{job="beach-rescue-token-service"}) == 0',
        'max by (job, instance) (beach_fallback_store_up{job="beach-rescue-token-service"}) == -1',
    ),
    ('route="/v1/fallback/token"}[2m]', 'route="/v1/fallback/token"}[10m]'),
]


@pytest.fixture(scope="module")
def drifted_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str]]:
    """promtool's rule unit tests against the rules with each of :data:`DRIFTS`; every mutant's
    (exit status, output). The runs are independent one-core processes of about a second each, so
    they go side by side instead of one per test."""
    tool = promtool()
    text = RULES.read_text()
    running: dict[str, subprocess.Popen[str]] = {}
    for original, drifted in DRIFTS:
        assert original in text
        work = tmp_path_factory.mktemp("drift")
        (work / "rules").mkdir()
        (work / "tests").mkdir()
        (work / "rules" / RULES.name).write_text(text.replace(original, drifted))
        shutil.copy(RULE_TESTS, work / "tests" / RULE_TESTS.name)
        running[drifted] = subprocess.Popen(
            [tool, "test", "rules", f"tests/{RULE_TESTS.name}"],
            cwd=work,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
    results = {}
    for drifted, process in running.items():
        output, _ = process.communicate(timeout=120)
        results[drifted] = (process.returncode, output)
    return results


@pytest.mark.parametrize(("original", "drifted"), DRIFTS)
def test_rule_unit_tests_catch_threshold_drift(
    drifted_runs: dict[str, tuple[int, str]], original: str, drifted: str
) -> None:
    assert original in RULES.read_text()
    returncode, output = drifted_runs[drifted]
    assert returncode != 0, f"rule tests still pass with {drifted!r}:\n{output[-2000:]}"


def test_alerts_carry_severity_and_a_runbook_section_that_exists() -> None:
    anchors = set()
    if RUNBOOK.exists():
        for line in RUNBOOK.read_text().splitlines():
            if line.startswith("#"):
                title = line.lstrip("#").strip().lower()
                anchors.add("".join(c for c in title.replace(" ", "-") if c.isalnum() or c in "-_"))
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" not in rule:
                continue
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            url = rule["annotations"]["runbook_url"]
            assert url.startswith(
                "https://github.com/beach/beach-rescue/blob/main/docs/operations/runbook.md#"
            )
            assert url.split("#", 1)[1] in anchors, f"{rule['alert']}: no runbook section {url}"


def test_dashboard_is_generated_and_current() -> None:
    script = ROOT / "deploy" / "grafana" / "build_dashboard.py"
    result = run(sys.executable, str(script), "--check")
    assert result.returncode == 0, result.stderr
    doc = json.loads((ROOT / "deploy" / "grafana" / "beach-rescue.json").read_text())
    assert doc["uid"] == "beach-rescue"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"] for p in doc["panels"]).lower()
    topics = ("kill switch", "activation ratio", "sessions", "connections", "bytes", "latency", "close codes")
    for topic in topics:
        assert topic in titles, topic
    assert "handshakes by outcome" in titles
    assert "token service" in titles
    assert "probe runs by outcome" in titles
    assert "guardrail store up, per token-service replica" in titles  # BeachRescueMintsStoreUnavailable
    assert "relay build per node" in titles  # decision 0022: a pure node takes more CPU
    for panel in doc["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
