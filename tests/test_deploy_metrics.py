"""Every metric the alert rules and the dashboard query is one the code really exports.

Starts a real token service and a real relay (pointed at it) on 127.0.0.1 port 0, scrapes both
``/metrics`` over HTTP (and the probe's, after one real probe run against them), and checks each
metric name used in deploy/prometheus/rules/*.yml and deploy/grafana/beach-rescue.json against
what they expose — no hard-coded list. Recording rules
(``level:metric:window`` names defined in the rules) are resolved to the metrics they use;
``up`` and ``ALERTS`` are Prometheus's own. Label names used in matchers and ``by (...)`` must
exist on the metric too, where the scrape shows a sample (for ``by (...)``: on a metric inside the
aggregation).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rescue._http import serve_http
from rescue.commands.probe import ProbeConfig, ProbeMetrics, metrics_app, probe_once
from rescue.guardrails import Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.relay import Relay, RelayConfig
from rescue.tokenservice import (
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
    serve_token_service,
    serve_token_service_admin,
)

ROOT = Path(__file__).resolve().parent.parent
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "beach-rescue.json"
PROMETHEUS_OWN = {"up", "ALERTS"}

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "sum", "avg", "min", "max", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "rate", "irate", "increase", "delta", "idelta", "histogram_quantile", "clamp_min",
    "clamp_max", "round", "abs", "avg_over_time", "max_over_time", "min_over_time", "sum_over_time",
    "absent", "vector", "scalar", "time", "le", "inf", "nan",
}  # fmt: skip
NAME = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def strip_promql(expr: str) -> str:
    """Drop string literals, label matchers, range/offset durations and Grafana variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\$__\w+|\$\{\w+\}|\$\w+", "", expr)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, keywords, labels or numbers)."""
    text = strip_promql(expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for m in NAME.finditer(text):
        word = m.group()
        after = text[m.end() :].lstrip()
        if word.lower() in PROMQL_WORDS or after.startswith("("):
            continue
        if re.fullmatch(r"\d.*|e\d+", word):
            continue
        names.add(word)
    return names


def label_uses(expr: str) -> dict[str, set[str]]:
    """``{metric: {label names in its matchers}}`` for the selectors in ``expr``."""
    uses: dict[str, set[str]] = {}
    for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", re.sub(r"\$\{\w+\}", "", expr)):
        labels = set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", m.group(2)))
        uses.setdefault(m.group(1), set()).update(labels)
    return uses


def grouping_uses(expr: str) -> list[tuple[set[str], set[str]]]:
    """``(label names, metric names)`` for each ``by (labels) (body)`` aggregation in ``expr``: the
    labels it groups by and the metrics in the body they must come from."""
    uses = []
    text = strip_promql(expr)
    for m in re.finditer(r"\bby\s*\(([^)]*)\)\s*\(", text):
        depth, end = 1, m.end()
        while depth and end < len(text):
            depth += {"(": 1, ")": -1}.get(text[end], 0)
            end += 1
        labels = {label.strip() for label in m.group(1).split(",") if label.strip()}
        uses.append((labels, metric_names(text[m.end() : end - 1])))
    return uses


def rule_exprs() -> tuple[dict[str, str], list[str]]:
    """(recording rule name → expr, every expr)."""
    records: dict[str, str] = {}
    exprs: list[str] = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                exprs.append(rule["expr"])
                if "record" in rule:
                    records[rule["record"]] = rule["expr"]
    return records, exprs


def alert_exprs() -> dict[str, str]:
    """Alert name → its expression."""
    return {
        rule["alert"]: rule["expr"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }


def resolved(names: set[str], records: dict[str, str]) -> set[str]:
    """``names`` and, for each recording rule among them, the metrics it reads (recursively)."""
    out = set(names)
    for name in names & set(records):
        out |= resolved(metric_names(records[name]), records)
    return out


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = [a["expr"] for a in doc["annotations"]["list"] if "expr" in a]
    for panel in doc["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    assert len(out) > 20
    return out


def used_metrics() -> set[str]:
    records, exprs = rule_exprs()
    used: set[str] = set()
    for expr in [*exprs, *dashboard_exprs()]:
        used |= metric_names(expr)
    unresolved = {n for n in used if ":" in n}
    assert unresolved <= set(records), f"recording rules used but not defined: {unresolved - set(records)}"
    return {n for n in used if ":" not in n} - PROMETHEUS_OWN


def test_extractor_finds_names_and_ignores_syntax() -> None:
    expr = (
        'sum by (code, name) (rate(beach_rescue_closes_total{job="beach-rescue-relay",code!="1012"}[5m]))'
        " / clamp_min(beach_rescue:x:5m, 1) > 0.2 and histogram_quantile(0.95, sum by (le) "
        '(rate(foo_seconds_bucket{job="x"}[$__rate_interval]))) or on (job, instance) up == 0'
    )
    assert metric_names(expr) == {
        "beach_rescue_closes_total",
        "beach_rescue:x:5m",
        "foo_seconds_bucket",
        "up",
    }
    assert label_uses(expr)["beach_rescue_closes_total"] == {"job", "code"}
    assert metric_names("sum(rate(x_total[5m])) / clamp_min(y, 1e-9) > 0.5e3") == {"x_total", "y"}
    assert grouping_uses(expr) == [
        ({"code", "name"}, {"beach_rescue_closes_total"}),
        ({"le"}, {"foo_seconds_bucket"}),
    ]
    assert grouping_uses('max by (instance, hot_path) (b_info{job="x"}) or vector(0)') == [
        ({"instance", "hot_path"}, {"b_info"})
    ]


async def scrape_both() -> tuple[str, str, str]:
    """Run a token service and a relay wired to it, and one probe run against them; the three /metrics."""
    key = SigningKey.generate()
    service = TokenService(
        TokenServiceConfig(
            keys=PublishedKeys(key), relay_url="ws://127.0.0.1:1/v1/connect", disable_oidc=True
        ),
        Guardrails(MemoryStore()),
    )
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            ts_port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
            ts_admin = await nursery.start(serve_token_service_admin, service, "127.0.0.1", 0)
            base = f"http://127.0.0.1:{ts_port}"
            relay = Relay(
                RelayConfig(
                    token_service=base, host="127.0.0.1", port=0, admin_port=0, node_id="relay-metrics"
                ),
                store=service.guardrails.store,  # registered, as in a fleet: the registry's metrics too
            )
            addresses = await nursery.start(relay.run)
            async with httpx.AsyncClient(timeout=5) as client:
                # One poll of the token service's status must have happened, so the control metrics
                # carry samples (the relay polls every status_poll_s).
                while relay.control.polls["ok"] == 0:
                    await trio.sleep(0.05)
                relay_text = (await client.get(f"http://127.0.0.1:{addresses.admin_port}/metrics")).text
                # where the manifests scrape it: the admin port (decision 0024)
                ts_text = (await client.get(f"http://127.0.0.1:{ts_admin}/metrics")).text
                # one probe run (it fails: no cohort is enabled here; any outcome will do) and its /metrics
                probe = ProbeMetrics()
                probe.record(await probe_once(ProbeConfig(api_url=base, cohort="dev", timeout_s=5)), now=1.0)
                probe_port = await nursery.start(serve_http, metrics_app(probe, lambda: None), "127.0.0.1", 0)
                probe_text = (await client.get(f"http://127.0.0.1:{probe_port}/metrics")).text
            await relay.drain()
            nursery.cancel_scope.cancel()
    return relay_text, ts_text, probe_text


def exposed(texts: Iterable[str]) -> tuple[set[str], dict[str, set[str]]]:
    """Every sample name a scrape can contain, and the label names seen per sample name."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            if family.type == "counter":
                names |= {family.name + "_total", family.name + "_created"}
            elif family.type == "histogram":
                names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
            else:
                names.add(family.name)
            for sample in family.samples:
                labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


@pytest.fixture(scope="module")
def scraped() -> tuple[set[str], dict[str, set[str]]]:
    relay_text, ts_text, probe_text = trio.run(scrape_both)
    assert "beach_rescue_connections_active" in relay_text
    assert "beach_fallback_token_requests_total" in ts_text
    assert "beach_rescue_probe_runs_total" in probe_text
    return exposed([relay_text, ts_text, probe_text])


def test_spec_metric_names_are_all_used() -> None:
    """SPEC §8's named metrics all appear on the dashboard or in the rules."""
    used = used_metrics()
    spec = {
        "beach_rescue_connections_active",
        "beach_rescue_sessions_active",
        "beach_rescue_messages_forwarded_total",
        "beach_rescue_bytes_forwarded_total",
        "beach_rescue_message_size_bytes_bucket",
        "beach_rescue_idle_pruned_total",
        "beach_rescue_sessions_emptied_total",
        "beach_fallback_token_requests_total",
    }
    assert spec <= used, spec - used


@pytest.mark.parametrize("name", sorted(used_metrics()))
def test_metric_is_exported_by_the_code(name: str, scraped: tuple[set[str], dict[str, set[str]]]) -> None:
    names, _ = scraped
    assert name in names, f"{name} is used in deploy/ but no relay, token service or probe exports it"


def test_label_names_used_exist_on_the_metric(scraped: tuple[set[str], dict[str, set[str]]]) -> None:
    _, labels = scraped
    _, exprs = rule_exprs()
    problems = []
    for expr in [*exprs, *dashboard_exprs()]:
        for metric, used in label_uses(expr).items():
            if metric in labels:  # only metrics the scrape showed samples for
                missing = used - labels[metric] - {"job", "instance"}
                if missing:
                    problems.append(f"{metric}: {sorted(missing)}")
        # a label grouped by must come from some metric inside the aggregation (e.g. route on the
        # store-error panel, hot_path on the build table): a misspelt one groups everything into one
        # series with the label empty, and the panel shows a plausible total instead of failing
        for grouped, metrics in grouping_uses(expr):
            seen = [labels[metric] for metric in metrics if metric in labels]
            if seen:  # recording rules and sample-less metrics: nothing to compare with
                missing = grouped - set().union(*seen) - {"job", "instance"}
                if missing:
                    problems.append(f"by {sorted(grouped)} over {sorted(metrics)}: {sorted(missing)}")
    assert not problems, problems


def test_dashboard_shows_the_guardrail_store_and_the_relay_build() -> None:
    """The panels an operator reads for BeachRescueMintsStoreUnavailable (store up per replica,
    requests refused per route) and for one node's CPU (which build each relay runs, decision 0022)."""
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= metric_names(expr)
    assert {"beach_fallback_store_up", "beach_fallback_store_errors_total", "beach_rescue_build_info"} <= used


def test_every_alert_reads_only_metrics_a_panel_shows() -> None:
    """An alert on a metric that no panel plots pages someone with nothing to look at: every metric
    an alert reads (through the recording rules it uses) is on the dashboard, itself or through a
    recording rule of it. BeachRescueRelaysFull (``beach_fallback_no_relay_total``) and
    BeachRescueProbeFailing (``beach_rescue_probe_last_run_timestamp_seconds``) had no panel."""
    records, _ = rule_exprs()
    shown: set[str] = set()
    for expr in dashboard_exprs():
        shown |= resolved(metric_names(expr), records)
    alerts = alert_exprs()
    assert len(alerts) > 10
    unshown = {
        alert: sorted(missing)
        for alert, expr in alerts.items()
        if (missing := resolved(metric_names(expr), records) - set(records) - shown - PROMETHEUS_OWN)
    }
    assert not unshown, unshown
