"""The incident drill (issue 12): a fallback spike on a real fleet, detected by a real Prometheus,
answered with the runbook's own commands, every step timed against its bound.

Usage (from the repository root)::

    just drill                                   # or: .venv/bin/python chaos/drill.py
    .venv/bin/python chaos/drill.py --nodes 3 --out /tmp/drills

What runs (everything on 127.0.0.1): the chaos fleet (:mod:`chaos._fleet`: a private redis-server,
``rescue token-service``, ``--nodes`` ``rescue relay`` processes with ``--redis-url`` and
``--token-service``; relays report activations with a report key the token service requires) and
Debian's Prometheus server loading the shipped ``deploy/prometheus`` configuration and alert rules
(:mod:`chaos._prometheus`: targets, 1 s intervals, and one ``for:`` shortened; every expression is
the shipped one). The drill, step by step:

1. **Spike.** Beach's control plane reports 400 sessions started (``POST /v1/sessions/started``,
   the SPEC §5 minimum sample is 200) and keeps reporting a few per second; then real sessions pair
   through the relays (host and guest through the SDK), each one an activation the relay reports:
   activations pass 0.5 % of sessions.
2. **Detect.** Times the first ``soft_breach`` token, the ``guardrail_soft_breach`` log event, the
   ``guardrail="soft_breach"`` metric label, and the alerts firing in Prometheus
   (``BeachRescueActivationSoftBreach``, ``BeachRescueActivationRatioHigh``).
3. **Respond** with the runbook's commands as subprocesses (docs/operations/runbook.md, "Triage a
   fallback spike", "Pause and resume"): ``rescue admin status``, the guardrail window with curl,
   ``rescue admin pause --reason``, ``rescue admin status``, ``rescue admin pause --drain``,
   ``rescue admin resume --reason``. Times: tokens refused (403 ``fallback_paused``), every relay
   refusing new handshakes with ``GUARDRAIL_TRIPPED`` (≤ 2 s, SPEC §5), a live session streaming
   checksummed bytes through the pause untouched, closed by the drain, and everything back after
   the resume (tokens, every relay welcoming a handshake, a new session pairing).
4. **Missing telemetry** (decision 0012). The token service's report keys are "rotated" without the
   relays' key (a restart with ``RESCUE_REPORT_KEYS`` changed): activation reports now fail while
   sessions keep pairing. Times the auto-pause (cause ``telemetry_missing``) and its alert, then the
   runbook's fix: list both keys, ``rescue admin status``, ``rescue admin resume``, back to normal.

It prints progress lines, ends with a table (step, bound, measured, verdict) and exits 0 when every
step met its bound, 1 when one missed it, 2 when the fleet or Prometheus could not start. Outputs in
``--out`` (default ``chaos/out``): ``drill-<time>/report.json``, ``report.md`` and every process's log.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

if __package__ in (None, ""):  # run as a script: make `chaos` (and `rescue`) importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx
import trio

from chaos._fleet import Fleet, FleetError, child_env, open_fleet, rescue_argv
from chaos._harness import run_and_report
from chaos._prometheus import Prometheus, find_prometheus
from chaos._report import machine_info, render_table
from chaos._traffic import SessionRun, Throughput, TrafficConfig
from rescue.client import DataReceived, open_peer
from rescue.errors import ConnectionClosedError, RescueError
from rescue.protocol import CloseCode, Kind, b64url_decode
from rescue.testing import TestPeer

__all__ = ["RUNBOOK_COMMANDS", "DrillConfig", "main", "run_drill"]

ROOT: Final = Path(__file__).resolve().parents[1]
COHORT: Final = "dev"  # the SDK's default cohort, enabled in the chaos fleet
BASELINE_SESSIONS: Final = 400  # sessions reported before the spike (SPEC §5 minimum sample: 200)
REPORT_EVERY_S: Final = 0.5  # the control plane's sessions-started reports during the drill...
REPORT_COUNT: Final = 2  # ...this many each time
SPIKE_PARALLEL: Final = 2  # sessions pairing at once during the spike
POLL_S: Final = 0.02  # how finely the drill watches for a change
# The runbook commands the drill runs (argv after `rescue`, or a shell line); the smoke test checks
# each one is still in docs/operations/runbook.md, so the drill rehearses what the runbook says.
RUNBOOK_COMMANDS: Final = (
    "rescue admin status",
    'curl -fsS -H "Authorization: Bearer $RESCUE_ADMIN_KEY" "$RESCUE_API/v1/admin/guardrails?cohort=',
    "rescue admin pause --reason",
    "rescue admin pause --drain",
    "rescue admin resume --reason",
)


@dataclass(frozen=True)
class DrillConfig:
    """Drill settings (see :func:`parse_args`).

    Attributes:
        nodes: relay nodes (at least 2).
        out: output directory.
        prometheus: the Prometheus server binary.
        log_level: the fleet's log level.
        telemetry_grace_s: ``RESCUE_TELEMETRY_GRACE_S`` of the token service.
        telemetry_min_tokens: ``RESCUE_TELEMETRY_MIN_TOKENS``.
        step_timeout_s: how long the drill waits for any one thing before calling it missed.
        seed: for the live session's bytes and the peers' backoff.
    """

    nodes: int = 2
    out: Path = ROOT / "chaos" / "out"
    prometheus: str | None = None
    log_level: str = "INFO"
    telemetry_grace_s: float = 4.0
    telemetry_min_tokens: int = 6
    step_timeout_s: float = 60.0
    seed: int = 1


@dataclass
class Step:
    """One measured step of the drill.

    Attributes:
        name: what is measured.
        bound: the bound in words (``None``: informational).
        limit: the bound in seconds for timed steps (``None`` for yes/no steps).
        value: seconds measured (timed), or None when it never happened within the step timeout.
        ok: whether the step met its bound.
        detail: what was seen.
    """

    name: str
    bound: str | None
    limit: float | None = None
    value: float | None = None
    ok: bool = False
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "bound": self.bound,
            "limit_s": self.limit,
            "value_s": None if self.value is None else round(self.value, 3),
            "pass": self.ok,
            "detail": self.detail,
        }


@dataclass
class _Drill:
    config: DrillConfig
    fleet: Fleet
    prometheus: Prometheus
    http: httpx.AsyncClient
    out_dir: Path
    report_key: str
    started: float = field(default_factory=trio.current_time)
    # wall clock minus trio clock: turns the token service's `since` stamps into trio times
    wall_offset: float = field(default_factory=lambda: time.time() - trio.current_time())
    steps: list[Step] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    pairs: dict[str, int] = field(default_factory=lambda: {"ok": 0, "failed": 0})
    reports_sent: int = 0
    session_seq: int = 0

    # ------------------------------------------------------------------------------ plumbing

    def clock(self) -> float:
        return trio.current_time() - self.started

    def log(self, line: str) -> None:
        print(f"[{self.clock():6.1f}s] {line}", flush=True)

    def step(
        self,
        name: str,
        bound: str | None,
        *,
        limit: float | None = None,
        value: float | None = None,
        ok: bool | None = None,
        detail: str = "",
    ) -> Step:
        """Record a step; a timed step passes when ``value`` is within ``limit``."""
        if ok is None:
            ok = value is not None and (limit is None or value <= limit)
        entry = Step(name, bound, limit, value, ok, detail)
        self.steps.append(entry)
        shown = (
            "never" if value is None and limit is not None else ("" if value is None else f"{value:.2f} s")
        )
        self.log(f"{'PASS' if ok else 'FAIL'} {name}: {shown} {detail}".rstrip())
        return entry

    def next_session(self, prefix: str) -> str:
        self.session_seq += 1
        return f"drill-{prefix}-{self.session_seq}"

    async def wait_for(
        self, check: Callable[[], Awaitable[bool]], *, within: float | None = None
    ) -> float | None:
        """Poll ``check`` until True; the trio time it became True, or None after ``within`` s.

        Polling, not an event: what it waits for happens in other processes.
        """
        with trio.move_on_after(within if within is not None else self.config.step_timeout_s):
            while not await check():  # noqa: ASYNC110
                await trio.sleep(POLL_S)
            return trio.current_time()
        return None

    async def acted(self, line: str) -> float:
        """Run a pause/resume command; the trio time the token service stored it (its ``since``).

        The command's own run time is mostly Python start-up; the relays may act on the new
        state before the process has even exited, so steps are timed from the stored change.
        """
        _, end, doc = await self.command(line)
        since = (doc or {}).get("since")
        if not isinstance(since, (int, float)):
            return end
        return min(end, since - self.wall_offset)

    async def command(self, line: str) -> tuple[float, float, dict[str, Any] | None]:
        """Run one runbook command as the operator would; (start, end, its JSON output or None).

        ``rescue …`` lines run the console script with ``RESCUE_API`` and ``RESCUE_ADMIN_KEY`` set;
        other lines run under ``sh -c`` with the same variables.

        Raises:
            FleetError: the command failed (its output is in the message).
        """
        env = child_env({"RESCUE_API": self.fleet.api_url, "RESCUE_ADMIN_KEY": self.fleet.admin_key})
        argv = (
            rescue_argv(*shlex.split(line[len("rescue ") :]))
            if line.startswith("rescue ")
            else ["sh", "-c", line]
        )
        start = trio.current_time()
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False, env=env)
        end = trio.current_time()
        out = result.stdout.decode(errors="replace")
        self.commands.append(
            {
                "command": line,
                "exit_status": result.returncode,
                "seconds": round(end - start, 3),
                "at_s": round(start - self.started, 3),
                "output": out[-2000:],
            }
        )
        self.log(f"$ {line}  -> exit {result.returncode} in {end - start:.2f} s")
        if result.returncode != 0:
            raise FleetError(f"runbook command failed: {line}\n{out}{result.stderr.decode(errors='replace')}")
        try:
            doc = json.loads(out)
        except ValueError:
            return start, end, None
        return start, end, doc if isinstance(doc, dict) else None

    # ------------------------------------------------------------------------------ the API

    async def mint(self, session: str, role: str = "host") -> httpx.Response:
        return await self.http.post(
            f"{self.fleet.api_url}/v1/fallback/token",
            json={
                "session_id": session,
                "role": role,
                "cohort_id": COHORT,
                "client_version": "drill/1",
                "telemetry_opt_in": False,
            },
        )

    async def fleet_status(self) -> dict[str, Any]:
        response = await self.http.get(f"{self.fleet.api_url}/v1/fallback/status")
        doc = response.json() if response.status_code == 200 else {}
        return doc if isinstance(doc, dict) else {}

    async def report_sessions(self, count: int) -> None:
        response = await self.http.post(
            f"{self.fleet.api_url}/v1/sessions/started", json={"cohort": COHORT, "count": count}
        )
        if response.status_code == 200:
            self.reports_sent += count

    async def activations_total(self) -> float:
        """``beach_fallback_activations_total`` over every cohort (reports the service accepted)."""
        response = await self.http.get(f"{self.fleet.api_url}/metrics")
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in response.text.splitlines()
            if line.startswith("beach_fallback_activations_total{")
        )

    async def token_metric(self, guardrail: str) -> float:
        response = await self.http.get(f"{self.fleet.api_url}/metrics")
        total = 0.0
        for line in response.text.splitlines():
            if line.startswith("beach_fallback_token_requests_total{") and f'guardrail="{guardrail}"' in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def token_service_events(self, name: str) -> list[dict[str, Any]]:
        """The token service's JSON log lines with ``event == name`` (across restarts)."""
        out = []
        path = self.fleet.log_dir / "token-service.log"
        for line in path.read_text(errors="replace").splitlines():
            if f'"{name}"' not in line:
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict) and doc.get("event") == name:
                out.append(doc)
        return out

    def node_of(self, relay_url: str) -> str:
        port = urlsplit(relay_url).port
        for node, p in self.fleet.relay_ports.items():
            if p == port:
                return node
        raise FleetError(f"a token named a relay the fleet does not have: {relay_url}")

    async def token_per_node(self, prefix: str) -> dict[str, tuple[str, bytes, str]]:
        """A host token for every relay node (minting fresh sessions until each node is named)."""
        out: dict[str, tuple[str, bytes, str]] = {}
        for _ in range(50 * self.config.nodes):
            session = self.next_session(prefix)
            answer = await self.mint(session)
            if answer.status_code != 200:
                raise FleetError(f"token refused while preparing probes: {answer.text}")
            doc = answer.json()
            out.setdefault(
                self.node_of(doc["relay_url"]), (session, b64url_decode(doc["token"]), doc["relay_url"])
            )
            if len(out) == self.config.nodes:
                return out
        raise FleetError("rendezvous hashing never named every relay node")

    async def handshake(self, url: str, token: bytes, session: str) -> str:
        """One HELLO with ``token``: ``welcome``, or the close code's name."""
        try:
            peer = await TestPeer.connect(url, token=token, session=session, expect_welcome=False)
        except (OSError, ConnectionClosedError, RescueError) as exc:
            return f"error: {type(exc).__name__}"
        try:
            first = await peer.receive()
            if first[1] == Kind.WELCOME:
                return "welcome"
            closed = await peer.wait_closed(first_message=first)
            return _code_name(closed.wire_code)
        except (ConnectionClosedError, RescueError) as exc:
            return _code_name(getattr(exc, "code", None))
        finally:
            peer.abort()

    # ------------------------------------------------------------------------------ traffic

    async def pair_once(self, prefix: str) -> bool:
        """A real session: host and guest through the SDK pair and exchange one message."""
        session = self.next_session(prefix)
        psk = secrets.token_bytes(32)
        try:
            with trio.fail_after(15):
                async with (
                    open_peer(self.fleet.api_url, session, "host", psk=psk, give_up_after=5) as host,
                    open_peer(self.fleet.api_url, session, "guest", psk=psk, give_up_after=5) as guest,
                ):
                    await host.send(0, b"drill")
                    message = await guest.receive()
                    ok = isinstance(message, DataReceived) and message.data == b"drill"
        except (RescueError, trio.TooSlowError, OSError):
            ok = False
        self.pairs["ok" if ok else "failed"] += 1
        return ok

    async def spike(self, stop: trio.Event) -> None:
        """Sessions keep pairing, ``SPIKE_PARALLEL`` at a time, until ``stop``."""

        async def worker() -> None:
            while not stop.is_set():
                if not await self.pair_once("spike"):
                    await trio.sleep(0.2)  # paused or broken: don't spin

        async with trio.open_nursery() as nursery:
            for _ in range(SPIKE_PARALLEL):
                nursery.start_soon(worker)

    async def control_plane(self) -> None:
        """Beach's control plane: a few sessions started every half second, forever."""
        while True:
            try:
                await self.report_sessions(REPORT_COUNT)
            except httpx.HTTPError:
                pass  # the token service restarting: the next report goes through
            await trio.sleep(REPORT_EVERY_S)

    # ------------------------------------------------------------------------------ phases

    async def baseline(self) -> None:
        jobs = {f"beach-rescue-relay/127.0.0.1:{p}" for p in self.fleet.relay_admin_ports.values()}
        jobs.add(f"beach-rescue-token-service/127.0.0.1:{self.fleet.api_port}")

        async def all_up() -> bool:
            return await self.prometheus.targets_up() == dict.fromkeys(jobs, True)

        if await self.wait_for(all_up) is None:
            raise FleetError(f"Prometheus never scraped every target: {await self.prometheus.targets_up()}")
        # one session first, so the counter exists in Prometheus before the bulk (increase() counts
        # from a series' first sample)
        await self.report_sessions(1)

        async def scraped() -> bool:
            return bool(await self.prometheus.query("beach_fallback_sessions_started_total"))

        if await self.wait_for(scraped) is None:
            raise FleetError("Prometheus never scraped the sessions-started counter")
        await self.report_sessions(BASELINE_SESSIONS - 1)
        answer = await self.mint(self.next_session("baseline"))
        hint = answer.json().get("guardrail_hint") if answer.status_code == 200 else answer.text
        self.log(f"baseline: {BASELINE_SESSIONS} sessions started, a token answers hint={hint}")
        if hint != "ok":
            raise FleetError(f"the fleet is not in a normal state before the spike: {hint}")

    async def detect(self, spike_started: float) -> None:
        """Phase 2: how long until each detection signal shows the spike."""
        seen: dict[str, float | None] = {}

        async def hint() -> bool:
            answer = await self.mint(self.next_session("probe"))
            return answer.status_code == 200 and answer.json().get("guardrail_hint") == "soft_breach"

        async def log_event() -> bool:
            return bool(self.token_service_events("guardrail_soft_breach"))

        async def metric() -> bool:
            return await self.token_metric("soft_breach") > 0

        def alert(name: str) -> Callable[[], Awaitable[bool]]:
            async def firing() -> bool:
                return (await self.prometheus.alert_states()).get(name) == "firing"

            return firing

        async def watch(name: str, check: Callable[[], Awaitable[bool]]) -> None:
            seen[name] = await self.wait_for(check)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, "hint", hint)
            nursery.start_soon(watch, "log", log_event)
            nursery.start_soon(watch, "metric", metric)
            nursery.start_soon(watch, "soft_alert", alert("BeachRescueActivationSoftBreach"))
            nursery.start_soon(watch, "ratio_alert", alert("BeachRescueActivationRatioHigh"))

        def since(key: str) -> float | None:
            at = seen.get(key)
            return None if at is None else at - spike_started

        event = (self.token_service_events("guardrail_soft_breach") or [{}])[0]
        self.step(
            "detect: first token tagged soft_breach",
            "≤ 15 s after the spike starts",
            limit=15,
            value=since("hint"),
            detail=f"{self.pairs['ok']} sessions paired so far",
        )
        self.step(
            "detect: log event guardrail_soft_breach",
            "≤ 15 s",
            limit=15,
            value=since("log"),
            detail=f"ratio {event.get('ratio')}, sessions {event.get('sessions')}",
        )
        self.step('detect: metric guardrail="soft_breach"', "≤ 15 s", limit=15, value=since("metric"))
        self.step(
            "detect: alert BeachRescueActivationSoftBreach firing in Prometheus",
            "≤ 30 s",
            limit=30,
            value=since("soft_alert"),
            detail="shipped rule, 1 s scrape/evaluation",
        )
        self.step(
            "detect: alert BeachRescueActivationRatioHigh firing in Prometheus",
            "≤ 30 s",
            limit=30,
            value=since("ratio_alert"),
            detail="shipped expr; for: 5m shortened to 2s",
        )

    async def watched(
        self, line: str, checks: dict[str, Callable[[], Awaitable[bool]]], *, every: float = 0.1
    ) -> tuple[float, dict[str, float | None]]:
        """Run a pause/resume command while polling ``checks`` (every ``every`` s) from before it.

        Returns the trio time the change was stored (:meth:`acted`) and, per check, the seconds
        from then until the check first held (None: not within the step timeout). Watching from
        before the command measures the fleet, not the command's own start-up and exit.
        """
        seen: dict[str, float] = {}

        async def watch(name: str, check: Callable[[], Awaitable[bool]]) -> None:
            with trio.move_on_after(self.config.step_timeout_s):
                while not await check():  # noqa: ASYNC110 (other processes change it)
                    await trio.sleep(every)
                seen[name] = trio.current_time()

        async with trio.open_nursery() as nursery:
            for name, check in checks.items():
                nursery.start_soon(watch, name, check)
            at = await self.acted(line)
        return at, {n: None if n not in seen else max(0.0, seen[n] - at) for n in checks}

    def relay_step(self, name: str, bound: str, times: dict[str, float | None], prefix: str) -> None:
        per_node = {k[len(prefix) :]: v for k, v in times.items() if k.startswith(prefix)}
        worst = (
            None
            if any(v is None for v in per_node.values())
            else max(v for v in per_node.values() if v is not None)
        )
        detail = ", ".join(
            f"{n} {'never' if v is None else f'{v:.2f} s'}" for n, v in sorted(per_node.items())
        )
        self.step(name, bound, limit=2.0, value=worst, detail=detail)

    def handshake_is(self, probe: tuple[str, bytes, str], wanted: str) -> Callable[[], Awaitable[bool]]:
        session, token, url = probe

        async def check() -> bool:
            return await self.handshake(url, token, session) == wanted

        return check

    def alert_firing(self, name: str, *, firing: bool = True) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return ((await self.prometheus.alert_states()).get(name) == "firing") is firing

        return check

    async def respond(self, live: SessionRun) -> None:
        """Phase 3: the runbook's pause, check, drain, resume, each timed from the stored change."""
        await self.command("rescue admin status")
        await self.command(
            'curl -fsS -H "Authorization: Bearer $RESCUE_ADMIN_KEY" '
            f'"$RESCUE_API/v1/admin/guardrails?cohort={COHORT}"'
        )
        # tokens fetched before the pause, as clients hold them; each names its relay node
        probes = await self.token_per_node("handshake")
        live_before = {d: c.delivered for d, c in live.checks.items()}
        connections_before = {r: t.connections for r, t in live.trackers.items()}

        granted: list[float] = []  # when each token request that got a token was sent

        async def refused() -> bool:
            sent = trio.current_time()
            answer = await self.mint(self.next_session("paused"))
            if answer.status_code == 200:
                granted.append(sent)
            return answer.status_code == 403 and answer.json().get("error") == "fallback_paused"

        checks: dict[str, Callable[[], Awaitable[bool]]] = {"tokens": refused}
        for node, probe in probes.items():
            checks[f"relay:{node}"] = self.handshake_is(probe, "GUARDRAIL_TRIPPED")
        checks["alert"] = self.alert_firing("BeachRescueFallbackPaused")
        _, times = await self.watched('rescue admin pause --reason "drill: fallback spike"', checks)
        answered = self.commands[-1]["at_s"] + self.commands[-1]["seconds"] + self.started
        late = [t for t in granted if t > answered]
        self.step(
            "pause: tokens refused (403 fallback_paused)",
            "every request sent after `rescue admin pause` returned (SPEC §5)",
            limit=2.0,
            value=times["tokens"],
            ok=times["tokens"] is not None and not late,
            detail=f"{len(late)} granted after it returned; measured: the first refusal's answer",
        )
        self.relay_step(
            "pause: every relay refuses new handshakes (GUARDRAIL_TRIPPED)",
            "≤ 2 s (SPEC §5)",
            times,
            "relay:",
        )
        self.step("pause: alert BeachRescueFallbackPaused firing", "≤ 30 s", limit=30, value=times["alert"])

        _, _, status = await self.command("rescue admin status")
        fleet = (status or {}).get("fleet", {})
        self.step(
            "pause: rescue admin status says paused, cause operator",
            "yes",
            ok=fleet.get("paused") is True and fleet.get("cause") == "operator",
            detail=f"paused={fleet.get('paused')} cause={fleet.get('cause')}",
        )

        # the live session streams through the pause: more bytes after it, verified, no reconnect
        mark = {d: c.delivered for d, c in live.checks.items()}

        async def flowed() -> bool:
            return all(live.checks[d].delivered >= mark[d] + 16 * 1024 for d in mark)

        flowed_at = await self.wait_for(flowed, within=15)
        intact = all(c.intact for c in live.checks.values()) and live.error is None
        same = {r: t.connections for r, t in live.trackers.items()} == connections_before
        during = sum(live.checks[d].delivered - live_before[d] for d in mark)
        self.step(
            "pause: a live session keeps streaming, bytes verified",
            "unaffected",
            ok=flowed_at is not None and intact and same,
            detail=f"{during} bytes both ways since the pause, intact={intact}, no reconnect={same}",
        )

        # drain: the live session is closed by its relay
        async def closed() -> bool:
            return all(t.closed is not None or not t.connected for t in live.trackers.values())

        _, times = await self.watched(
            'rescue admin pause --drain --reason "drill: drain"', {"closed": closed}, every=POLL_S
        )
        codes = sorted({str(t.closed.code) for t in live.trackers.values() if t.closed is not None})
        self.step(
            "drain: the live session is closed",
            "≤ 2 s (relay status poll)",
            limit=2.0,
            value=times["closed"],
            detail=f"close codes {codes} (4003 = GUARDRAIL_TRIPPED)",
        )

        # resume: back to normal (the tokens held since before the pause are welcome again)
        async def mints() -> bool:
            return (await self.mint(self.next_session("resumed"))).status_code == 200

        checks = {"tokens": mints}
        for node, probe in probes.items():
            checks[f"relay:{node}"] = self.handshake_is(probe, "welcome")
        checks["alert"] = self.alert_firing("BeachRescueFallbackPaused", firing=False)
        resumed_at, times = await self.watched('rescue admin resume --reason "drill: over"', checks)
        self.step("resume: tokens minted again", "≤ 1 s", limit=1.0, value=times["tokens"])
        self.relay_step("resume: every relay welcomes new handshakes", "≤ 2 s", times, "relay:")
        self.step(
            "resume: alert BeachRescueFallbackPaused resolved", "≤ 30 s", limit=30, value=times["alert"]
        )
        paired_at = await self.wait_for(lambda: self.pair_once("after-resume"), within=20)
        self.step(
            "resume: a new session pairs end to end",
            "≤ 10 s",
            limit=10.0,
            value=None if paired_at is None else paired_at - resumed_at,
        )

    async def telemetry(self) -> None:
        """Phase 4: activation reports stop arriving; the token service pauses itself."""
        service = self.fleet.token_service
        assert service is not None
        rotated = secrets.token_urlsafe(16)
        self.log("telemetry: restarting the token service with report keys rotated without the relays' key")
        service.env["RESCUE_REPORT_KEYS"] = rotated
        broken_at = trio.current_time()  # reports fail from here on (first: while it restarts)
        await service.stop()
        await service.start()
        up_at = trio.current_time()

        async def auto_paused() -> bool:
            status = await self.fleet_status()
            return status.get("paused") is True and status.get("cause") == "telemetry_missing"

        paused_at = await self.wait_for(auto_paused)
        grace = self.config.telemetry_grace_s
        events = self.token_service_events("guardrail_telemetry_missing")
        self.step(
            "telemetry: minting auto-paused, cause telemetry_missing",
            f"≤ grace ({grace:g} s) + 5 s after the restarted service is up",
            limit=grace + 5,
            value=None if paused_at is None else max(0.0, paused_at - up_at),
            detail=f"reports broken {up_at - broken_at:.1f} s before (the restart); "
            f"log event guardrail_telemetry_missing x{len(events)}, "
            f"{(events or [{}])[-1].get('tokens')} tokens without a report",
        )

        async def alert() -> bool:
            return (await self.prometheus.alert_states()).get("BeachRescueTelemetryMissing") == "firing"

        alert_at = await self.wait_for(alert)
        self.step(
            "telemetry: alert BeachRescueTelemetryMissing firing",
            "≤ 30 s after the pause",
            limit=30,
            value=None if alert_at is None or paused_at is None else alert_at - paused_at,
        )

        # the runbook: status names the cause; list old and new report keys together; resume
        _, _, status = await self.command("rescue admin status")
        fleet = (status or {}).get("fleet", {})
        self.step(
            "telemetry: rescue admin status names the cause",
            "yes",
            ok=fleet.get("cause") == "telemetry_missing",
            detail=str(fleet.get("reason")),
        )
        self.log("telemetry: fixing the rotation (old and new report keys listed together)")
        service.env["RESCUE_REPORT_KEYS"] = f"{self.report_key},{rotated}"
        await service.stop()
        await service.start()
        resumed_at = await self.acted('rescue admin resume --reason "drill: reports flowing again"')
        before = await self.activations_total()
        paired_at = await self.wait_for(lambda: self.pair_once("after-fix"), within=20)

        async def reported() -> bool:
            return await self.activations_total() > before

        reported_at = await self.wait_for(reported, within=10)
        self.step(
            "telemetry: after the fix and resume, a session pairs and its report arrives",
            "≤ 10 s",
            limit=10.0,
            value=None
            if paired_at is None or reported_at is None
            else max(paired_at, reported_at) - resumed_at,
            detail=f"paired={paired_at is not None}, activation accepted={reported_at is not None}",
        )

    async def run(self) -> None:
        self.log(
            f"fleet up: token service {self.fleet.api_url}, relays {sorted(self.fleet.relay_ports)}; "
            f"Prometheus {self.prometheus.url}"
        )
        for change in self.prometheus.changes:
            self.log(f"prometheus config: {change}")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.control_plane)
            await self.baseline()
            live = SessionRun(
                "drill-live",
                self.config.seed,
                TrafficConfig(rate=32 * 1024, drain_timeout_s=5),
                self.clock,
                Throughput(per_second=False),
                lambda _episode: None,
            )
            live_scope = trio.CancelScope()

            async def run_live(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                with live_scope:
                    await live.run(self.fleet.api_url, task_status=task_status)

            await nursery.start(run_live)
            if live.failed:
                raise FleetError(f"the live session did not start: {live.error}")
            self.log("live session streaming; the spike starts")
            stop_spike = trio.Event()
            spike_done = trio.Event()

            async def spike() -> None:
                try:
                    await self.spike(stop_spike)
                finally:
                    spike_done.set()

            nursery.start_soon(spike)
            spike_started = trio.current_time()
            await self.detect(spike_started)
            self.log(f"spike: {self.pairs['ok']} sessions paired, {self.reports_sent} sessions reported")
            await self.respond(live)
            live_scope.cancel()
            await self.telemetry()
            stop_spike.set()  # the spike's sessions finish (a cancel would wait out their closes)
            with trio.move_on_after(20):
                await spike_done.wait()
            nursery.cancel_scope.cancel()


def _code_name(code: int | None) -> str:
    if code is None:
        return "no close code"
    try:
        return CloseCode(code).name
    except ValueError:
        return str(code)


def build_report(drill: _Drill) -> dict[str, Any]:
    return {
        "pass": all(s.ok for s in drill.steps) and bool(drill.steps),
        "steps": [s.to_json() for s in drill.steps],
        "commands": drill.commands,
        "sessions": {
            "paired": drill.pairs["ok"],
            "failed_pairings": drill.pairs["failed"],
            "reported_started": drill.reports_sent,
        },
        "prometheus_changes": drill.prometheus.changes,
        "config": {
            "nodes": drill.config.nodes,
            "telemetry_grace_s": drill.config.telemetry_grace_s,
            "telemetry_min_tokens": drill.config.telemetry_min_tokens,
            "seed": drill.config.seed,
        },
        "services": {
            s.name: {"starts": s.starts, "unexpected_exits": s.unexpected_exits}
            for s in drill.fleet.services()
        },
        "duration_s": round(drill.clock(), 1),
        "machine": machine_info(),
    }


def render_report(report: dict[str, Any]) -> str:
    rows = []
    for s in report["steps"]:
        value = s["value_s"]
        measured = (
            ("never" if s["limit_s"] is not None else "no")
            if value is None and not s["pass"]
            else (f"{value:.2f} s" if value is not None else "yes")
        )
        rows.append([s["name"], s["bound"] or "", measured, "PASS" if s["pass"] else "FAIL"])
    sessions = report["sessions"]
    lines = [
        f"# Incident drill: {'PASS' if report['pass'] else 'FAIL'}",
        "",
        render_table(["step", "bound", "measured", "verdict"], rows),
        "",
        f"{report['config']['nodes']} relays; {sessions['paired']} sessions paired "
        f"({sessions['failed_pairings']} attempts refused or failed, most while paused), "
        f"{sessions['reported_started']} sessions reported started; {report['duration_s']} s in all "
        f"on {report['machine']['cpus']} CPUs, load {report['machine']['loadavg']}.",
        "",
        "Prometheus ran the shipped configuration and rules with these changes only:",
        "",
        *[f"- {c}" for c in report["prometheus_changes"]],
        "",
        "Runbook commands run:",
        "",
        *[f"- `{c['command']}` (exit {c['exit_status']}, {c['seconds']} s)" for c in report["commands"]],
    ]
    return "\n".join(lines) + "\n"


async def run_drill(config: DrillConfig) -> tuple[dict[str, Any], Path]:
    """One drill; (the report, its output directory).

    Raises:
        FleetError: the fleet or Prometheus could not start, or a runbook command failed.
    """
    binary = find_prometheus(config.prometheus)
    if binary is None:
        where = config.prometheus or "/usr/bin/prometheus or on PATH"
        raise FleetError(f"no Prometheus server ({where}; Debian: apt-get install prometheus)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_dir = config.out / f"drill-{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"drill: output in {out_dir}", flush=True)
    report_key = secrets.token_urlsafe(16)
    env = {
        "RESCUE_TELEMETRY_GRACE_S": str(config.telemetry_grace_s),
        "RESCUE_TELEMETRY_MIN_TOKENS": str(config.telemetry_min_tokens),
        "RESCUE_REPORT_KEYS": report_key,  # the token service requires it...
        "RESCUE_REPORT_KEY": report_key,  # ...and the relays send it
    }
    async with (
        open_fleet(out_dir, nodes=config.nodes, log_level=config.log_level, env=env) as fleet,
        httpx.AsyncClient(timeout=10) as http,
    ):
        prometheus = Prometheus(
            out_dir,
            binary,
            client=http,
            relays=[f"127.0.0.1:{p}" for p in fleet.relay_admin_ports.values()],
            token_service=f"127.0.0.1:{fleet.api_port}",
        )
        await prometheus.service.start()
        try:
            drill = _Drill(config, fleet, prometheus, http, out_dir, report_key)
            await drill.run()
            unhealthy = {k: v for k, v in (await prometheus.rule_health()).items() if v == "err"}
            drill.step(
                "prometheus: every shipped rule evaluates without error",
                "yes",
                ok=not unhealthy,
                detail=str(unhealthy or ""),
            )
            crashed = [s.name for s in fleet.services() if s.check_crash() or s.unexpected_exits]
            drill.step("no process exited unasked", "yes", ok=not crashed, detail=str(crashed or ""))
        finally:
            await prometheus.service.stop()
            prometheus.service.close_log()
        report = build_report(drill)
    return report, out_dir


def parse_args(argv: Sequence[str] | None) -> DrillConfig:
    p = argparse.ArgumentParser(prog="drill", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=2, help="relay nodes (>= 2; default 2)")
    p.add_argument("--out", type=Path, default=ROOT / "chaos" / "out", help="output directory")
    p.add_argument("--prometheus", default=None, help="Prometheus server binary (/usr/bin/prometheus)")
    p.add_argument("--telemetry-grace", type=float, default=4.0, help="RESCUE_TELEMETRY_GRACE_S (4)")
    p.add_argument("--telemetry-min-tokens", type=int, default=6, help="RESCUE_TELEMETRY_MIN_TOKENS (6)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--seed", type=int, default=random.SystemRandom().randrange(1 << 16))
    ns = p.parse_args(argv)
    if ns.nodes < 2:
        p.error("--nodes must be at least 2 (every relay must be seen refusing)")
    return DrillConfig(
        nodes=ns.nodes,
        out=ns.out,
        prometheus=ns.prometheus,
        log_level=ns.log_level,
        telemetry_grace_s=ns.telemetry_grace,
        telemetry_min_tokens=ns.telemetry_min_tokens,
        seed=ns.seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the drill, write the report, print the table; 0 pass, 1 a step missed, 2 harness error."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run_and_report("drill", run_drill, parse_args(argv), render_report)


if __name__ == "__main__":
    sys.exit(main())
