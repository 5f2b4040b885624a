"""Generate the beach-rescue Grafana dashboard (deploy/grafana/beach-rescue.json).

    python deploy/grafana/build_dashboard.py            # rewrite beach-rescue.json
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the committed JSON is stale

The JSON is committed (Grafana provisioning and import read it as is); this script is its source, so
panels stay consistent (one datasource variable, units, legends) and reviewable as code. Every metric
the panels query is checked against the code's real /metrics by tests/test_deploy_metrics.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("beach-rescue.json")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RELAY = 'job="beach-rescue-relay"'
TOKEN = 'job="beach-rescue-token-service"'
PROBE = 'job="beach-rescue-probe"'
SOFT_BREACH_RATIO = 0.005  # SPEC §5: activations / sessions over the rolling hour
RUNBOOK = "https://github.com/beach/beach-rescue/blob/main/docs/operations/runbook.md"
WIDTH = 24
# A relay's kill-switch state is fresh while its last good poll is 0-5 s old (-1: never polled yet).
FRESH_EXPR = f"(beach_rescue_control_state_age_seconds{{{RELAY}}} >= 0) <= 5"
# Taking new sessions: not draining, and not registered full (max_sessions or the connection cap).
READY_EXPR = (
    f"beach_rescue_draining{{{RELAY}}} == 0 unless on (instance) beach_rescue_node_full{{{RELAY}}} == 1"
)


def target(expr: str, legend: str = "", ref: str = "A", *, exemplar: bool = False) -> dict[str, Any]:
    doc = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": ref}
    if exemplar:  # trace ids on the histogram buckets (OpenMetrics scrape, tracing on)
        doc["exemplar"] = True
    return doc


def targets(*pairs: tuple[str, str], exemplar: bool = False) -> list[dict[str, Any]]:
    return [
        target(expr, legend, chr(ord("A") + i), exemplar=exemplar) for i, (expr, legend) in enumerate(pairs)
    ]


class Layout:
    """Hands out gridPos rows left to right, 24 columns wide."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def place(self, w: int, h: int) -> dict[str, int]:
        if self.x + w > WIDTH:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> dict[str, Any]:
        if self.x:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": 0, "y": self.y, "w": WIDTH, "h": 1}
        self.y += 1
        return {
            "type": "row",
            "id": self.new_id(),
            "title": title,
            "gridPos": pos,
            "collapsed": False,
            "panels": [],
        }


def stat(
    lay: Layout,
    title: str,
    expr: str,
    *,
    unit: str = "none",
    thresholds: list[tuple[float | None, str]] | None = None,
    mappings: list[dict[str, Any]] | None = None,
    description: str = "",
    w: int = 4,
    h: int = 4,
    legend: str = "",
) -> dict[str, Any]:
    """One value, or one tile per series when ``legend`` names them (e.g. ``{{instance}}``)."""
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(w, h),
        "targets": [target(expr, legend or title)],
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "thresholds": {"mode": "absolute", "steps": steps},
                "mappings": mappings or [],
                "color": {"mode": "thresholds"},
            },
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "background",
            "graphMode": "none",
            "textMode": "auto",
            "justifyMode": "auto",
            "orientation": "auto",
        },
    }


def timeseries(
    lay: Layout,
    title: str,
    pairs: list[tuple[str, str]],
    *,
    unit: str = "short",
    description: str = "",
    w: int = 12,
    threshold: float | None = None,
    stack: bool = False,
    exemplar: bool = False,
) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"value": None, "color": "green"}]
    if threshold is not None:
        steps.append({"value": threshold, "color": "red"})
    return {
        "type": "timeseries",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(w, 8),
        "targets": targets(*pairs, exemplar=exemplar),
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {
                    "drawStyle": "line",
                    "lineWidth": 1,
                    "fillOpacity": 10,
                    "showPoints": "never",
                    "stacking": {"mode": "normal" if stack else "none", "group": "A"},
                    "thresholdsStyle": {"mode": "line+area" if threshold is not None else "off"},
                },
                "thresholds": {"mode": "absolute", "steps": steps},
                "color": {"mode": "palette-classic"},
            },
            "overrides": [],
        },
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def label_table(
    lay: Layout,
    title: str,
    expr: str,
    columns: list[str],
    *,
    colors: dict[str, dict[str, str]],
    description: str = "",
    w: int = 8,
    h: int = 8,
) -> dict[str, Any]:
    """One row per series of an instant query, its labels ``columns`` as columns (value and time
    hidden); ``colors`` gives a column's cell background per text value, the table sorted on the
    first coloured column, descending."""
    doc = target(expr, "")
    doc.update({"instant": True, "range": False, "format": "table"})
    sort = next(iter(colors))
    return {
        "type": "table",
        "id": lay.new_id(),
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": lay.place(w, h),
        "targets": [doc],
        "transformations": [
            {
                "id": "organize",
                "options": {
                    "excludeByName": {"Time": True, "Value": True},
                    "indexByName": {name: i for i, name in enumerate(columns)},
                    "renameByName": {},
                },
            }
        ],
        "fieldConfig": {
            "defaults": {"custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
            "overrides": [
                {
                    "matcher": {"id": "byName", "options": column},
                    "properties": [
                        {"id": "custom.cellOptions", "value": {"type": "color-background"}},
                        {
                            "id": "mappings",
                            "value": [
                                {
                                    "type": "value",
                                    "options": {
                                        text: {"color": color, "index": i}
                                        for i, (text, color) in enumerate(by_value.items())
                                    },
                                }
                            ],
                        },
                    ],
                }
                for column, by_value in colors.items()
            ],
        },
        "options": {"showHeader": True, "sortBy": [{"displayName": sort, "desc": True}]},
    }


def rate(metric: str, *, by: str = "", selector: str = RELAY) -> str:
    """``sum [by (...)] (rate(metric{selector}[$__rate_interval]))``."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{selector}}}[$__rate_interval]))"


def quantiles(metric: str, selector: str) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{p}",
        )
        for q, p in ((0.5, "50"), (0.95, "95"), (0.99, "99"))
    ]


def build() -> dict[str, Any]:
    lay = Layout()
    panels: list[dict[str, Any]] = []

    panels.append(lay.row("Guardrails"))
    panels.append(
        stat(
            lay,
            "Kill switch",
            f"max(beach_rescue_fallback_paused{{{RELAY}}})",
            thresholds=[(None, "green"), (1, "red")],
            mappings=[{"type": "value", "options": {"0": {"text": "running"}, "1": {"text": "PAUSED"}}}],
            description="1: relays refuse new handshakes (kill switch on, or stale state).",
        )
    )
    panels.append(
        stat(
            lay,
            "Activation ratio (1 h)",
            "beach_rescue:activation_ratio:1h",
            unit="percentunit",
            thresholds=[(None, "green"), (SOFT_BREACH_RATIO * 0.8, "orange"), (SOFT_BREACH_RATIO, "red")],
            description="Fallback activations / sessions started, rolling hour; soft guardrail at 0.5 %.",
        )
    )
    panels.append(
        stat(
            lay,
            "Soft-breach tokens (1 h)",
            f'sum(increase(beach_fallback_token_requests_total{{{TOKEN},guardrail="soft_breach"}}[1h]))',
            thresholds=[(None, "green"), (1, "red")],
            description="Tokens issued with guardrail_hint=soft_breach in the last hour.",
        )
    )
    panels.append(
        stat(
            lay,
            "Relays accepting",
            f"count({READY_EXPR})",
            thresholds=[(None, "red"), (1, "orange"), (2, "green")],
            description="Relay nodes the token service assigns new sessions to: neither draining nor "
            "registered full (at max_sessions or with the connection cap full; a full node keeps its own "
            "sessions). Their /readyz also turns 503 while paused or on a stale kill-switch state.",
        )
    )
    panels.append(
        stat(
            lay,
            "Relays reaching token service",
            f"count({FRESH_EXPR}) / count(beach_rescue_control_state_age_seconds{{{RELAY}}})",
            unit="percentunit",
            thresholds=[(None, "red"), (0.99, "green")],
            description="Share of relays whose last good token-service status is at most 5 s old (SPEC §6).",
        )
    )
    panels.append(
        stat(
            lay,
            "Token service up",
            f"min(up{{{TOKEN}}})",
            thresholds=[(None, "red"), (1, "green")],
            mappings=[{"type": "value", "options": {"0": {"text": "DOWN"}, "1": {"text": "up"}}}],
        )
    )
    panels.append(
        timeseries(
            lay,
            "Activation ratio vs 0.5 % soft guardrail",
            [("beach_rescue:activation_ratio:1h", "activations / sessions (1 h)")],
            unit="percentunit",
            threshold=SOFT_BREACH_RATIO,
            description="The red band starts at the soft guardrail (SPEC §5).",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Token requests by outcome and guardrail",
            [
                (
                    rate("beach_fallback_token_requests_total", by="outcome, guardrail", selector=TOKEN),
                    "{{outcome}} / {{guardrail}}",
                )
            ],
            unit="reqps",
            stack=True,
        )
    )

    panels.append(
        timeseries(
            lay,
            "Token-service state age per relay (fails closed after 10 s)",
            [(f"beach_rescue_control_state_age_seconds{{{RELAY}}}", "{{instance}}")],
            unit="s",
            threshold=5,
            description="-1: never reached. Relays serve on the last known state, then refuse handshakes.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Token-service status polls and activation reports",
            [
                (rate("beach_rescue_control_polls_total", by="outcome"), "poll {{outcome}}"),
                (
                    rate("beach_rescue_activation_reports_total", by="outcome"),
                    "activation report {{outcome}}",
                ),
            ],
            unit="ops",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Kill switch cause (token service)",
            [(f"max by (cause) (beach_fallback_pause_cause{{{TOKEN}}})", "{{cause}}")],
            description="1 for why the fleet is paused: operator, env (FALLBACK_WS_PAUSED), hard_breach, "
            "telemetry_missing (no activation or sessions-started reports while minting, decision 0012).",
        )
    )
    panels.append(lay.row("Guardrail store (Redis; runbook: Minting fails: guardrail store unavailable)"))
    panels.append(
        stat(
            lay,
            "Guardrail store up, per token-service replica",
            f"max by (instance) (beach_fallback_store_up{{{TOKEN}}})",
            legend="{{instance}}",
            thresholds=[(None, "red"), (1, "green")],
            mappings=[{"type": "value", "options": {"0": {"text": "DOWN"}, "1": {"text": "up"}}}],
            w=8,
            h=8,
            description="Whether the replica's last /metrics scrape could read the kill switch in Redis. "
            "DOWN: every mint it gets fails closed (503 guardrail_store_unavailable) and its /readyz is "
            "503, so the Service stops sending it requests while it stays alive: do not restart it. "
            "A replica missing here is not scraped at all (Token service up). Alert "
            "BeachRescueMintsStoreUnavailable after 3 min.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Requests refused for want of the guardrail store, by route",
            [
                (
                    rate("beach_fallback_store_errors_total", by="route", selector=TOKEN),
                    "{{route}}",
                )
            ],
            unit="reqps",
            w=16,
            stack=True,
            description="Requests answered 503 guardrail_store_unavailable, by route: "
            "/v1/fallback/token is mints refused (what pages), /v1/fallback/status the relays' "
            "kill-switch polls (about one per relay per second whatever users do), then reports and "
            "admin calls. Scrapes and probes are not counted. In a whole outage it stops within ~15 s "
            "(replicas not ready get no more requests): the store-up tiles keep showing it.",
        )
    )

    panels.append(lay.row("Token service (runbook: Roll the token service)"))
    panels.append(
        timeseries(
            lay,
            "Token-service replicas draining",
            [(f"max by (instance) (beach_fallback_draining{{{TOKEN}}})", "{{instance}}")],
            w=8,
            description="1 from the SIGTERM that began a replica's drain (decision 0023): /readyz 503 "
            "draining while it still serves every request, for --drain-s (10 s), then it stops and exits "
            "within 7 s more. In a rolling update each old replica shows 1 for about the drain; a replica "
            "at 1 much longer is not stopping.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Token requests refused: no relay available, by why",
            [(rate("beach_fallback_no_relay_total", by="reason", selector=TOKEN), "{{reason}}")],
            unit="reqps",
            w=16,
            stack=True,
            description="503 no_relay_available, by why: full (every relay registered full or draining: "
            "alert BeachRescueRelaysFull after 5 min; runbook: Every relay full), draining (every relay "
            "is), none (no relay registered). The request counter shows them all as refused / no_relay.",
        )
    )

    panels.append(lay.row("Load"))
    panels.append(
        timeseries(
            lay,
            "Sessions active",
            [
                (f"sum by (instance) (beach_rescue_sessions_active{{{RELAY}}})", "{{instance}}"),
                (f"sum(beach_rescue_sessions_active{{{RELAY}}})", "fleet"),
            ],
        )
    )
    panels.append(
        timeseries(
            lay,
            "Connections active",
            [
                (f"sum by (instance) (beach_rescue_connections_active{{{RELAY}}})", "{{instance}}"),
                (f"sum(beach_rescue_connections_active{{{RELAY}}})", "fleet"),
            ],
        )
    )
    panels.append(
        timeseries(
            lay,
            "Messages forwarded",
            [
                (
                    rate("beach_rescue_messages_forwarded_total", by="instance"),
                    "{{instance}}",
                )
            ],
            unit="ops",
            stack=True,
        )
    )
    panels.append(
        timeseries(
            lay,
            "Bytes forwarded",
            [
                (
                    rate("beach_rescue_bytes_forwarded_total", by="instance"),
                    "{{instance}}",
                )
            ],
            unit="Bps",
            stack=True,
        )
    )
    panels.append(
        timeseries(
            lay,
            "Relay CPU (share of one core; alert at 70 %)",
            [(f"rate(process_cpu_seconds_total{{{RELAY}}}[$__rate_interval])", "{{instance}}")],
            unit="percentunit",
            threshold=0.7,
            description="Same sessions, more CPU than its peers: check the node's build first (the two "
            "panels on the right; runbook: One node uses more CPU than its peers).",
        )
    )
    panels.append(
        stat(
            lay,
            "Relays not on the compiled build",
            f'count(beach_rescue_build_info{{{RELAY},hot_path!="compiled"}}) or vector(0)',
            thresholds=[(None, "green"), (1, "red")],
            w=4,
            h=8,
            description="Relay nodes whose hot path runs as pure Python (or partly compiled: a broken "
            "install) instead of compiled with mypyc as the image and the wheel ship it (decision 0022): "
            "correct, but about a fifth more CPU per forwarded message.",
        )
    )
    panels.append(
        label_table(
            lay,
            "Relay build per node",
            f"max by (instance, version, hot_path) (beach_rescue_build_info{{{RELAY}}})",
            ["instance", "hot_path", "version"],
            colors={"hot_path": {"pure": "red", "partly": "orange", "compiled": "green"}},
            description="beach_rescue_build_info: the package version and the hot path's build of every "
            "relay node, pure and partly first. /debug/stats hot_path and the relay.starting log line "
            "say the same.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Message size",
            quantiles("beach_rescue_message_size_bytes", RELAY),
            unit="bytes",
        )
    )

    panels.append(lay.row("Latency and errors"))
    panels.append(
        timeseries(
            lay,
            "Relay forwarding latency (target P95 < 40 ms)",
            quantiles("beach_rescue_forward_latency_seconds", RELAY),
            unit="s",
            threshold=0.04,
        )
    )
    panels.append(
        timeseries(
            lay,
            "Handshake latency",
            quantiles("beach_rescue_handshake_duration_seconds", RELAY),
            unit="s",
            exemplar=True,
            description="Exemplars (when tracing is on) link a slow handshake to its trace.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Token service latency",
            quantiles("beach_fallback_request_duration_seconds", TOKEN),
            unit="s",
            exemplar=True,
            description="All traced routes; exemplars link a slow request to its trace.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Handshakes by outcome",
            [
                (
                    rate("beach_rescue_handshakes_total", by="outcome"),
                    "{{outcome}}",
                )
            ],
            unit="ops",
            stack=True,
            description="Anything but ok is a failure; guardrail_tripped is expected while paused.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Close codes",
            [
                (
                    rate("beach_rescue_closes_total", by="code, name"),
                    "{{code}} {{name}}",
                )
            ],
            unit="ops",
            stack=True,
            description="SPEC §2 close codes: 1012 during rolls, 4008 network trouble, 4029 capacity.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Backpressure stalls, idle prunes, emptied sessions",
            [
                (
                    rate("beach_rescue_backpressure_stalls_total"),
                    "backpressure stalls",
                ),
                (rate("beach_rescue_idle_pruned_total"), "idle pruned"),
                (
                    rate("beach_rescue_sessions_emptied_total"),
                    "sessions emptied",
                ),
            ],
            unit="ops",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Resumes (a role came back)",
            [(rate("beach_rescue_rejoins_total", by="kind"), "{{kind}}")],
            unit="ops",
        )
    )

    panels.append(lay.row("Connection cap (fds; docs/relay.md)"))
    panels.append(
        timeseries(
            lay,
            "WebSocket connections open vs the cap",
            [
                (f"sum by (instance) (beach_rescue_ws_open_connections{{{RELAY}}})", "open {{instance}}"),
                (f"max by (instance) (beach_rescue_ws_max_connections{{{RELAY}}})", "cap {{instance}}"),
            ],
            description="Every socket on the WebSocket port (handshaking, before HELLO, in a session) "
            "against the cap (fd limit less --fd-reserve). At the cap, pending ones are shed for newcomers.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "WebSocket connections turned away",
            [(rate("beach_rescue_ws_connections_turned_away_total", by="reason"), "{{reason}}")],
            unit="ops",
            description="shed_pending: a connection without HELLO closed for a newcomer (a flood being "
            "absorbed); refused: 503 server_busy, nothing left to shed; accept_error: out of fds. "
            "Runbook: Connection flood on a relay.",
        )
    )

    panels.append(lay.row("Read poller (decision 0007)"))
    panels.append(
        timeseries(
            lay,
            "Readiness events: handled inline vs woke a task",
            [
                (rate("beach_rescue_read_poller_handled_inline_total"), "handled inline"),
                (rate("beach_rescue_read_poller_task_wakeups_total"), "woke a task"),
                (rate("beach_rescue_read_poller_wakeups_total"), "poller passes"),
            ],
            unit="ops",
            description="Inline handling is the cheap path; a rising share of task wake-ups costs CPU.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Quiet set (heartbeat-only connections)",
            [
                (f"sum by (instance) (beach_rescue_read_poller_quiet{{{RELAY}}})", "quiet {{instance}}"),
                (
                    f"sum by (instance) (beach_rescue_read_poller_registered{{{RELAY}}})",
                    "registered {{instance}}",
                ),
            ],
            description="Quiet sockets are read every quiet_tick_s: a first message may wait that long.",
        )
    )

    panels.append(lay.row("Synthetic probe (rescue probe)"))
    panels.append(
        stat(
            lay,
            "Probe: last run",
            f"min(beach_rescue_probe_success{{{PROBE}}})",
            thresholds=[(None, "red"), (1, "green")],
            mappings=[{"type": "value", "options": {"0": {"text": "FAILED"}, "1": {"text": "ok"}}}],
            description="Two tokens, both peers connected and paired, an encrypted echo: the last run of "
            "every probe (docs/operations/probe.md).",
        )
    )
    panels.append(
        stat(
            lay,
            "Probe: since its last run",
            f"time() - max by (instance) (beach_rescue_probe_last_run_timestamp_seconds{{{PROBE}}} > 0)",
            unit="s",
            legend="{{instance}}",
            thresholds=[(None, "green"), (60, "orange"), (300, "red")],
            description="Seconds since each probe's last run ended, whatever its outcome (one every 30 s). "
            "Over 300 s the probe is stuck: alert BeachRescueProbeFailing, like a failing run. Nothing "
            "shown: the probe has not finished a run yet, or is not scraped.",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Probe runs by outcome",
            [(f"sum by (outcome) (increase(beach_rescue_probe_runs_total{{{PROBE}}}[5m]))", "{{outcome}}")],
            w=8,
            stack=True,
            description="ok, or the step that failed: token_*, cohort_disabled, fallback_paused (token "
            "service), connect_* (relays, edge), pair_*, round_trip_*, echo_mismatch (forwarding).",
        )
    )
    panels.append(
        timeseries(
            lay,
            "Probe step duration (p95)",
            [
                (
                    "histogram_quantile(0.95, sum by (step, le) "
                    f"(rate(beach_rescue_probe_step_seconds_bucket{{{PROBE}}}[$__rate_interval])))",
                    "{{step}}",
                )
            ],
            unit="s",
            w=8,
            description="Token (both), connect (both WELCOMEs), pair (both see the other), round trip "
            "(32 bytes there and back, end-to-end encrypted).",
        )
    )

    return {
        "uid": "beach-rescue",
        "title": "beach-rescue",
        "description": "WebSocket fallback relay fleet and token service. Runbook: " + RUNBOOK,
        "tags": ["beach", "beach-rescue"],
        "timezone": "utc",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "links": [{"title": "Runbook", "type": "link", "url": RUNBOOK, "targetBlank": True}],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "options": [],
                }
            ]
        },
        "annotations": {
            "list": [
                {
                    "name": "Alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "expr": 'ALERTS{service="beach-rescue", alertstate="firing"}',
                    "titleFormat": "{{alertname}}",
                    "textFormat": "{{instance}}",
                }
            ]
        },
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed JSON differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
