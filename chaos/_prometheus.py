"""A real Prometheus server next to a local fleet, loading the shipped configuration and rules.

``deploy/prometheus/prometheus.yml`` and ``deploy/prometheus/rules/*.yml`` are read and written back
with only what a drill must change: the scrape targets (the fleet's ports on 127.0.0.1), the scrape
and evaluation intervals (1 s instead of 15 s / 30 s), the rule file path, and the ``for:`` of the
alerts listed in :data:`FOR_OVERRIDES`. Every ``expr`` stays byte for byte the shipped one
(:func:`drill_rules` checks it and lists every change it made, for the report).

The server is Debian's ``prometheus`` package (``/usr/bin/prometheus``), run as a
:class:`chaos._fleet.Service` with its own data directory and log.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any, Final

import httpx
import yaml

from chaos._fleet import HTTP_TIMEOUT_S, FleetError, Service, child_env, free_port

__all__ = [
    "DEFAULT_BINARY",
    "FOR_OVERRIDES",
    "Prometheus",
    "drill_config",
    "drill_rules",
    "find_prometheus",
]

ROOT: Final = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG: Final = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DEFAULT_BINARY: Final = "/usr/bin/prometheus"
INTERVAL: Final = "1s"
# Alerts whose `for:` is too long for a drill that should take a minute. Only this changes; the
# expression (a 1 h recording rule over the token service's counters) is the shipped one.
FOR_OVERRIDES: Final = {"BeachRescueActivationRatioHigh": "2s"}
RELAY_JOB: Final = "beach-rescue-relay"
TOKEN_SERVICE_JOB: Final = "beach-rescue-token-service"


def find_prometheus(binary: str | None = None) -> str | None:
    """The Prometheus server binary: ``binary`` if given (None when it is not a file), else
    /usr/bin/prometheus, else ``prometheus`` on PATH."""
    if binary is not None:
        return binary if Path(binary).is_file() else None
    for candidate in (DEFAULT_BINARY, shutil.which("prometheus")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def drill_rules(shipped: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The shipped rule file with drill intervals; (the rules, the changes made, in words).

    Raises:
        FleetError: a rule named in :data:`FOR_OVERRIDES` is not in the shipped rules.
    """
    rules = copy.deepcopy(shipped)
    changes: list[str] = []
    seen: set[str] = set()
    for group in rules["groups"]:
        if "interval" in group:
            changes.append(f"group {group['name']}: interval {group['interval']} -> {INTERVAL}")
            group["interval"] = INTERVAL
        for rule in group["rules"]:
            name = rule.get("alert")
            if name in FOR_OVERRIDES:
                seen.add(name)
                changes.append(f"alert {name}: for {rule.get('for', '0s')} -> {FOR_OVERRIDES[name]}")
                rule["for"] = FOR_OVERRIDES[name]
    missing = set(FOR_OVERRIDES) - seen
    if missing:
        raise FleetError(f"the shipped rules lost the alerts the drill waits for: {sorted(missing)}")
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs == [r["expr"] for g in shipped["groups"] for r in g["rules"]]
    return rules, changes


def drill_config(
    shipped: dict[str, Any], rule_files: list[str], *, relays: list[str], token_service: str
) -> tuple[dict[str, Any], list[str]]:
    """The shipped ``prometheus.yml`` pointed at a local fleet; (the config, the changes made).

    Raises:
        FleetError: a scrape job the drill needs is missing (other jobs are left out, and said so).
    """
    config = copy.deepcopy(shipped)
    glob = config.setdefault("global", {})
    changes = [
        f"scrape_interval {glob.get('scrape_interval')} -> {INTERVAL}",
        f"evaluation_interval {glob.get('evaluation_interval')} -> {INTERVAL}",
        "targets -> the drill fleet on 127.0.0.1",
    ]
    glob.update(scrape_interval=INTERVAL, scrape_timeout=INTERVAL, evaluation_interval=INTERVAL)
    config["rule_files"] = rule_files
    targets = {RELAY_JOB: relays, TOKEN_SERVICE_JOB: [token_service]}
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    if not set(targets) <= jobs:
        raise FleetError(f"prometheus.yml lost a scrape job the drill needs: {sorted(set(targets) - jobs)}")
    for extra in sorted(jobs - set(targets)):
        changes.append(f"job {extra} left out (the drill's fleet does not run it)")
    config["scrape_configs"] = [j for j in config["scrape_configs"] if j["job_name"] in targets]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": targets[job["job_name"]]}]
    return config, changes


class Prometheus:
    """A Prometheus server scraping a fleet, with the drill's copy of the shipped config and rules.

    Args:
        work_dir: where the config, rules, data and log go.
        binary: the server binary.
        relays: ``host:port`` of every relay's admin port.
        token_service: ``host:port`` of the token service.
        client: the HTTP client for its API.
    """

    def __init__(
        self, work_dir: Path, binary: str, *, relays: list[str], token_service: str, client: httpx.AsyncClient
    ) -> None:
        self.dir = work_dir / "prometheus"
        (self.dir / "rules").mkdir(parents=True, exist_ok=True)
        self.http = client
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.changes: list[str] = []
        rule_files = []
        for path in sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml")):
            rules, changes = drill_rules(yaml.safe_load(path.read_text()))
            target = self.dir / "rules" / path.name
            target.write_text(yaml.safe_dump(rules, sort_keys=False, allow_unicode=True, width=1000))
            rule_files.append(str(target))
            self.changes += [f"{path.name}: {c}" for c in changes]
        config, changes = drill_config(
            yaml.safe_load(SHIPPED_CONFIG.read_text()), rule_files, relays=relays, token_service=token_service
        )
        self.changes += [f"prometheus.yml: {c}" for c in changes]
        self.config_path = self.dir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.service = Service(
            "prometheus",
            [binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            child_env(),
            work_dir / "logs" / "prometheus.log",
            self._ready,
        )  # fmt: skip

    async def _ready(self) -> bool:
        try:
            response = await self.http.get(f"{self.url}/-/ready", timeout=HTTP_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _api(self, path: str, **params: str) -> Any:
        try:
            response = await self.http.get(f"{self.url}{path}", params=params, timeout=HTTP_TIMEOUT_S)
            doc = response.json()
        except (httpx.HTTPError, ValueError):
            return None
        return doc.get("data") if isinstance(doc, dict) and doc.get("status") == "success" else None

    async def query(self, expr: str) -> list[Any]:
        """An instant query's result vector ([] when empty or on error)."""
        data = await self._api("/api/v1/query", query=expr)
        result = (data or {}).get("result", [])
        return result if isinstance(result, list) else []

    async def targets_up(self) -> dict[str, bool]:
        """Each active target's ``job/instance`` and whether its last scrape succeeded."""
        data = await self._api("/api/v1/targets")
        if not data:
            return {}
        return {
            f"{t['labels'].get('job')}/{t['labels'].get('instance')}": t.get("health") == "up"
            for t in data.get("activeTargets", [])
        }

    async def alert_states(self) -> dict[str, str]:
        """Alert name → ``firing`` or ``pending`` for every active alert (firing wins)."""
        data = await self._api("/api/v1/alerts")
        states: dict[str, str] = {}
        for alert in (data or {}).get("alerts", []):
            name = alert.get("labels", {}).get("alertname", "?")
            if states.get(name) != "firing":
                states[name] = alert.get("state", "?")
        return states

    async def rule_health(self) -> dict[str, str]:
        """Rule name → health (``ok``/``err``/``unknown``) as the server evaluates it."""
        data = await self._api("/api/v1/rules")
        out: dict[str, str] = {}
        for group in (data or {}).get("groups", []):
            for rule in group.get("rules", []):
                out[rule.get("name", "?")] = rule.get("health", "?")
        return out
