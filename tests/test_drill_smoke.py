"""The incident drill (chaos/drill.py): the Prometheus templating keeps every shipped expression,
the drill runs the runbook's own commands, and one whole drill on a real fleet and a real
Prometheus measures every step.

The whole-drill test checks that every step happened and every yes/no outcome held (tokens
refused, every relay refusing, the live session's bytes intact, the alerts firing, the auto-pause's
cause); it does not check the time bounds, which the drill itself enforces (its exit status) and
which a loaded CI machine may miss. Skipped when the Prometheus server is not installed.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import run_harness

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
prom: Any = importlib.import_module("chaos._prometheus")
drill: Any = importlib.import_module("chaos.drill")

# The drill takes ~40 s on an idle 2-core box (most of it `rescue admin` start-ups and process
# restarts); a loaded machine gets a generous bound. Its own step timeouts are 60 s each.
RUN_TIMEOUT_S = 400
RULES = ROOT / "deploy" / "prometheus" / "rules" / "beach-rescue.rules.yml"
CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_drill_rules_change_intervals_and_listed_for_only() -> None:
    shipped = yaml.safe_load(RULES.read_text())
    rules, changes = prom.drill_rules(shipped)
    pairs = list(zip(shipped["groups"], rules["groups"], strict=True))
    for old_group, new_group in pairs:
        for old, new in zip(old_group["rules"], new_group["rules"], strict=True):
            assert new["expr"] == old["expr"]
            assert new.get("labels") == old.get("labels")
            if new.get("alert") in prom.FOR_OVERRIDES:
                assert new["for"] == prom.FOR_OVERRIDES[new["alert"]]
            else:
                assert new.get("for") == old.get("for")
    assert any("for 5m -> " in c for c in changes)
    assert shipped == yaml.safe_load(RULES.read_text())  # the input is not modified


def test_drill_config_points_the_shipped_jobs_at_the_fleet() -> None:
    config, _ = prom.drill_config(
        yaml.safe_load(CONFIG.read_text()), ["/x/rules.yml"], relays=["127.0.0.1:1", "127.0.0.1:2"],
        token_service="127.0.0.1:3",
    )  # fmt: skip
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in config["scrape_configs"]}
    assert jobs == {
        "beach-rescue-relay": ["127.0.0.1:1", "127.0.0.1:2"],
        "beach-rescue-token-service": ["127.0.0.1:3"],
    }
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "1s"
    assert config["rule_files"] == ["/x/rules.yml"]


def test_drill_runs_the_runbooks_own_commands() -> None:
    runbook = (ROOT / "docs" / "operations" / "runbook.md").read_text()
    for command in drill.RUNBOOK_COMMANDS:
        assert command in runbook, f"the drill runs {command!r}, the runbook no longer says it"


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.skipif(
    prom.find_prometheus() is None, reason="no Prometheus server (apt-get install prometheus)"
)
def test_whole_drill_on_a_real_fleet_and_prometheus(tmp_path: Path) -> None:
    result, report, out_dir = run_harness(
        "chaos/drill.py", "--seed", "1", out=tmp_path, runs="drill", timeout=RUN_TIMEOUT_S
    )
    assert result.returncode == (0 if report["pass"] else 1), result.stderr[-3000:]
    steps = {s["name"]: s for s in report["steps"]}
    assert len(steps) == 21, list(steps)
    # every timed step happened (within the drill's 60 s step timeout), whatever its bound
    missing = [name for name, s in steps.items() if s["limit_s"] is not None and s["value_s"] is None]
    assert missing == [], missing
    # every yes/no outcome held
    no = [name for name, s in steps.items() if s["limit_s"] is None and not s["pass"]]
    assert no == [], [steps[n]["detail"] for n in no]
    assert "4003" in steps["drain: the live session is closed"]["detail"]
    assert "activation report" in steps["telemetry: rescue admin status names the cause"]["detail"]
    commands = [c["command"] for c in report["commands"]]
    assert [c.split(" --reason")[0] for c in commands if c.startswith("rescue admin")] == [
        "rescue admin status",
        "rescue admin pause",
        "rescue admin status",
        "rescue admin pause --drain",
        "rescue admin resume",
        "rescue admin status",
        "rescue admin resume",
    ]
    assert all(c["exit_status"] == 0 for c in report["commands"])
    assert report["sessions"]["paired"] > 0
    text = (out_dir / "report.md").read_text()
    assert text.startswith("# Incident drill: ")
    assert "| step" in text
