"""``rescue probe``: the synthetic check, a real session through the whole fallback path.

Like Tailscale's ``derpprobe``, but through the guardrails and the end-to-end encryption too. Each
run, from outside the fleet:

1. **token**: gets two tokens from the token service (host and guest of a fresh probe session, id
   ``<prefix><random>``, for the configured cohort, with the service key when one is set), so the
   kill switch, the cohort flag and node assignment are all exercised;
2. **connect**: connects both peers to the relay the tokens name (HELLO → WELCOME), with the SDK
   (:func:`rescue.client.open_peer`), one attempt each;
3. **pair**: waits until each peer sees the other (the relay's PEER ``joined``);
4. **round_trip**: the host sends 32 random bytes, end-to-end encrypted; the guest echoes them; the
   host checks they came back unchanged;

then ends the session (CLOSE NORMAL). Every step is timed and the run has one overall deadline.

``rescue probe --once`` runs one check and exits 0 (one ``ok`` line on stdout) or 1 with one line
on stderr naming the reason (``fallback_paused``, ``connect_failed``, …): a CronJob's check. Without
``--once`` it probes every ``--interval`` seconds and serves Prometheus metrics (``/metrics``, and
``/healthz``) on ``--host``/``--metrics-port``; see docs/operations/probe.md.
"""

from __future__ import annotations

import argparse
import math
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from rescue._http import Request, Response, Router, json_response, serve_http, text_response
from rescue._log import configure_logging, get_logger, log_event, session_tag
from rescue._tracing import traced_process
from rescue.cli import add_option
from rescue.client import (
    DataReceived,
    Peer,
    TokenClient,
    TokenGrant,
    TokenRequestError,
    TokenServiceUnavailable,
    open_peer,
    prefetched,
)
from rescue.errors import ConfigError, GuardrailError, RescueError
from rescue.protocol import MAX_SESSION_LEN, SESSION_ID_RE

__all__ = [
    "OUTCOMES",
    "STEPS",
    "ProbeConfig",
    "ProbeMetrics",
    "ProbeResult",
    "probe_once",
    "register",
    "run_probe",
]

_LOG = get_logger("rescue.probe")

SERVICE_KEY_ENV: Final = "RESCUE_SERVICE_KEY"  # the same variable `rescue share`/`join` read
DEFAULT_API: Final = "http://127.0.0.1:8080"
DEFAULT_COHORT: Final = "probe"  # its own cohort: its activations stay out of real cohorts' ratios
DEFAULT_PREFIX: Final = "rescue-probe-"
DEFAULT_INTERVAL_S: Final = 30.0
DEFAULT_TIMEOUT_S: Final = 10.0
DEFAULT_METRICS_PORT: Final = 9095
# The echo: enough random bytes that a mix-up cannot pass for the original.
ECHO_BYTES: Final = 32
# The random part of a probe session id (hex characters); the prefix says it is a probe.
SESSION_RANDOM_HEX: Final = 12
# Closing the probe session (our CLOSE and the close handshake) is bounded by this, apart from the
# run's deadline: a slow close is not a failed probe.
CLOSE_TIMEOUT_S: Final = 2.0

STEPS: Final = ("token", "connect", "pair", "round_trip")
# Every outcome label value (bounded): "ok", the token service's guardrail refusals, and what failed.
OUTCOMES: Final = (
    "ok",
    "fallback_paused",
    "cohort_disabled",
    "not_entitled",
    "token_refused",
    "token_unavailable",
    "token_timeout",
    "connect_failed",
    "connect_timeout",
    "pair_failed",
    "pair_timeout",
    "round_trip_failed",
    "round_trip_timeout",
    "echo_mismatch",
)
# Step durations: from a local relay's milliseconds to the run's 10 s deadline.
STEP_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, math.inf)


@dataclass(frozen=True, slots=True)
class ProbeConfig:
    """What one probe run needs.

    Attributes:
        api_url: the token service's base URL.
        cohort: the cohort the probe's tokens are requested for (enable it for the probe).
        service_key: the bearer key of a trusted caller, when the token service wants one.
        session_prefix: the start of every probe session id (recognisable in logs and traces).
        timeout_s: the deadline of one whole run (all four steps).
        close_timeout_s: the bound on closing the probe session (each peer), apart from the
            deadline (:data:`CLOSE_TIMEOUT_S`).
    """

    api_url: str = DEFAULT_API
    cohort: str = DEFAULT_COHORT
    service_key: str | None = field(default=None, repr=False)
    session_prefix: str = DEFAULT_PREFIX
    timeout_s: float = DEFAULT_TIMEOUT_S
    close_timeout_s: float = CLOSE_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.api_url.startswith(("http://", "https://")):
            raise ConfigError(f"--api must be an http(s):// URL, not {self.api_url!r}")
        prefix = self.session_prefix
        if (
            not prefix
            or len(prefix) + SESSION_RANDOM_HEX > MAX_SESSION_LEN
            or not SESSION_ID_RE.fullmatch(prefix)
        ):
            raise ConfigError(
                f"--session-prefix must be 1-{MAX_SESSION_LEN - SESSION_RANDOM_HEX} chars "
                f"of [A-Za-z0-9._:-], not {self.session_prefix!r}"
            )
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout must be positive, not {self.timeout_s}")

    def new_session_id(self) -> str:
        return self.session_prefix + secrets.token_hex(SESSION_RANDOM_HEX // 2)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """How one run went.

    Attributes:
        outcome: ``"ok"`` or one of :data:`OUTCOMES`' failure reasons.
        detail: one line saying what happened (no secrets: never a token or key).
        steps: seconds each completed step took, in :data:`STEPS` order.
        session: the probe session's tag (:func:`rescue._log.session_tag`).
    """

    outcome: str
    detail: str
    steps: dict[str, float]
    session: str

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    def line(self) -> str:
        """The one line ``--once`` prints."""
        timings = " ".join(f"{step}={seconds:.3f}s" for step, seconds in self.steps.items())
        if self.ok:
            return f"ok {timings}".strip()
        return f"{self.outcome}: {self.detail}" + (f" (after {timings})" if timings else "")


class _Failed(Exception):
    """A step failed: its outcome label and what happened."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


async def probe_once(config: ProbeConfig, *, clock: Callable[[], float] = trio.current_time) -> ProbeResult:
    """One probe run: tokens, connect, pair, encrypted echo; never raises for a failed step.

    Cancellation:
        Cancelling the call abandons the run; the peers are closed on the way out.
    """
    session_id = config.new_session_id()
    tag = session_tag(session_id)
    steps: dict[str, float] = {}
    current = ["token"]
    try:
        with trio.fail_after(config.timeout_s):
            await _run_steps(config, session_id, steps, current, clock)
    except _Failed as failed:
        result = ProbeResult(failed.outcome, failed.detail, steps, tag)
    except trio.TooSlowError:
        step = current[0]
        result = ProbeResult(
            f"{step}_timeout", f"no {step} within the {config.timeout_s:g} s deadline", steps, tag
        )
    else:
        result = ProbeResult("ok", "echo came back", steps, tag)
    log_event(
        _LOG,
        "probe.run",
        session=tag,
        cohort=config.cohort,
        outcome=result.outcome,
        detail=result.detail,
        steps_s={step: round(seconds, 6) for step, seconds in steps.items()},
    )
    return result


async def _run_steps(
    config: ProbeConfig,
    session_id: str,
    steps: dict[str, float],
    current: list[str],
    clock: Callable[[], float],
) -> None:
    def client(role: str) -> TokenClient:
        return TokenClient(
            config.api_url,
            session_id=session_id,
            role=role,
            cohort=config.cohort,
            service_key=config.service_key,
        )

    tokens = {role: client(role) for role in ("host", "guest")}
    started = clock()
    grants: dict[str, TokenGrant] = {}
    try:
        for role, provider in tokens.items():
            grants[role] = await provider()
    except GuardrailError as exc:
        outcome = exc.error if exc.error in OUTCOMES else "token_refused"
        raise _Failed(outcome, str(exc)) from None
    except TokenRequestError as exc:
        raise _Failed("token_refused", str(exc)) from None
    except TokenServiceUnavailable as exc:
        raise _Failed("token_unavailable", str(exc)) from None
    steps["token"] = clock() - started

    current[0] = "connect"
    started = clock()
    psk = secrets.token_bytes(32)  # a fresh key per run: the echo is end-to-end encrypted
    # one attempt each (give_up_after=0): a probe reports a failure, it does not ride it out
    peers = {
        role: open_peer(
            prefetched(grants[role], tokens[role]),
            session_id,
            role,
            psk=psk,
            give_up_after=0.0,
            close_timeout_s=config.close_timeout_s,
        )
        for role in tokens
    }
    async with peers["host"] as host, peers["guest"] as guest:
        for peer in (host, guest):
            await peer.wait_connected()
            _check_alive(peer, "connect_failed")
        steps["connect"] = clock() - started

        current[0] = "pair"
        started = clock()
        for peer in (host, guest):
            await peer.wait_partner()
            _check_alive(peer, "pair_failed")
        steps["pair"] = clock() - started

        current[0] = "round_trip"
        started = clock()
        nonce = secrets.token_bytes(ECHO_BYTES)
        try:
            await host.send(0, nonce)
            got = await _receive_data(guest, len(nonce))
            await guest.send(0, got)
            back = await _receive_data(host, len(nonce))
        except RescueError as exc:
            raise _Failed("round_trip_failed", f"{type(exc).__name__}: {exc}") from None
        if back != nonce:
            raise _Failed(
                "echo_mismatch", f"sent {len(nonce)} random bytes, {len(back)} different ones came back"
            )
        steps["round_trip"] = clock() - started


def _check_alive(peer: Peer, outcome: str) -> None:
    closed = peer.closed
    if closed is not None:
        code = f" ({closed.code})" if closed.code is not None else ""
        raise _Failed(outcome, f"{peer.role.value}: {closed.reason or 'closed'}{code}")


async def _receive_data(peer: Peer, size: int) -> bytes:
    """``size`` bytes of channel 0 (CONTROL messages are skipped)."""
    got = b""
    while len(got) < size:
        message = await peer.receive()
        if isinstance(message, DataReceived) and message.channel == 0:
            got += message.data
    return got


# --------------------------------------------------------------------------------------------- metrics


class ProbeMetrics:
    """The probe's Prometheus metrics, in a registry of their own.

    - ``beach_rescue_probe_runs_total{outcome}``: runs by outcome (:data:`OUTCOMES`).
    - ``beach_rescue_probe_success``: 1 when the last run was ``ok``, else 0.
    - ``beach_rescue_probe_last_run_timestamp_seconds``: when the last run ended (epoch seconds).
    - ``beach_rescue_probe_step_seconds{step}``: how long each completed step took (:data:`STEPS`).
    - ``beach_rescue_probe_last_step_seconds{step}``: the last run's step times (-1: not reached).
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.runs = Counter(
            "beach_rescue_probe_runs", "Probe runs by outcome", ["outcome"], registry=self.registry
        )
        self.success = Gauge(
            "beach_rescue_probe_success", "1 if the last probe run succeeded, else 0", registry=self.registry
        )
        self.last_run = Gauge(
            "beach_rescue_probe_last_run_timestamp_seconds",
            "When the last probe run ended (epoch seconds)",
            registry=self.registry,
        )
        self.step_seconds = Histogram(
            "beach_rescue_probe_step_seconds",
            "Duration of each completed probe step",
            ["step"],
            buckets=STEP_BUCKETS,
            registry=self.registry,
        )
        self.last_step = Gauge(
            "beach_rescue_probe_last_step_seconds",
            "The last probe run's step durations (-1: the step was not reached)",
            ["step"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.runs.labels(outcome=outcome)
        for step in STEPS:
            self.step_seconds.labels(step=step)
            self.last_step.labels(step=step).set(-1)

    def record(self, result: ProbeResult, *, now: float) -> None:
        self.runs.labels(outcome=result.outcome).inc()
        self.success.set(1 if result.ok else 0)
        self.last_run.set(now)
        for step in STEPS:
            seconds = result.steps.get(step)
            if seconds is not None:
                self.step_seconds.labels(step=step).observe(seconds)
            self.last_step.labels(step=step).set(-1 if seconds is None else seconds)

    def render(self, accept: str) -> tuple[str, str]:
        """The exposition (Prometheus text, or OpenMetrics when ``accept`` asks) and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry).decode(), content_type


def metrics_app(metrics: ProbeMetrics, last: Callable[[], ProbeResult | None]) -> Router:
    """``GET /metrics`` and ``GET /healthz`` (200 while the process runs; the last outcome)."""
    router = Router()

    @router.get("/metrics")
    async def get_metrics(request: Request) -> Response:
        body, content_type = metrics.render(request.headers.get("accept", ""))
        return text_response(body, content_type=content_type)

    @router.get("/healthz")
    async def healthz(request: Request) -> Response:
        result = last()
        return json_response(
            {"status": "ok", "last_outcome": None if result is None else result.outcome},
        )

    return router


async def run_probe(
    config: ProbeConfig,
    *,
    interval_s: float,
    host: str,
    port: int,
    metrics: ProbeMetrics | None = None,
    runs: int | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Probe every ``interval_s`` seconds and serve the metrics on ``host:port`` until cancelled.

    Args:
        runs: stop after this many runs (``None``: until cancelled); for tests.
        task_status: receives the bound metrics port once it listens.
    """
    metrics = metrics or ProbeMetrics()
    last: list[ProbeResult] = []
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(
            serve_http, metrics_app(metrics, lambda: last[-1] if last else None), host, port
        )
        log_event(_LOG, "probe.listening", url=f"http://{host}:{bound}/metrics", api=config.api_url)
        task_status.started(bound)
        done = 0
        while runs is None or done < runs:
            next_run = trio.current_time() + interval_s
            result = await probe_once(config)
            metrics.record(result, now=time.time())  # wall clock: a timestamp gauge
            last[:] = [result]
            done += 1
            if runs is None or done < runs:
                await trio.sleep_until(next_run)
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``probe`` sub-command."""
    p = subparsers.add_parser(
        "probe",
        help="synthetic check: tokens, connect, pair and an encrypted echo through the fleet",
        description="From outside the fleet, get a host and a guest token for a fresh probe session, "
        "connect both through the relay, pair, and send an end-to-end encrypted echo; time each step. "
        "With --once: one run, exit 0, or 1 with the reason on stderr. Otherwise: a run every "
        f"--interval seconds, Prometheus metrics on --host:--metrics-port. The service key comes from "
        f"${SERVICE_KEY_ENV}.",
    )
    add_option(p, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")
    add_option(p, "--cohort", default=DEFAULT_COHORT, help="cohort the probe's tokens are for")
    add_option(
        p, "--session-prefix", default=DEFAULT_PREFIX, metavar="P", help="start of every probe session id"
    )
    add_option(
        p,
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="deadline of one run, seconds",
    )
    add_option(
        p, "--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S", help="seconds between runs"
    )
    add_option(p, "--once", action="store_true", help="one run; exit 0, or 1 with the reason")
    add_option(p, "--host", default="0.0.0.0", metavar="H", help="address the metrics port binds")
    add_option(
        p,
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        metavar="M",
        help="port of /metrics and /healthz (0: any)",
    )
    add_option(
        p,
        "--log-level",
        default=None,
        metavar="LEVEL",
        help="logging level, JSON on stderr (default INFO; WARNING with --once: just the one line)",
    )
    p.set_defaults(func=_run)


def _config(args: argparse.Namespace) -> ProbeConfig:
    if not args.interval > 0:
        raise ConfigError(f"--interval must be positive, not {args.interval}")
    return ProbeConfig(
        api_url=args.api,
        cohort=args.cohort,
        service_key=os.environ.get(SERVICE_KEY_ENV, "").strip() or None,
        session_prefix=args.session_prefix,
        timeout_s=args.timeout,
    )


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level or ("WARNING" if args.once else "INFO"))
    config = _config(args)
    with traced_process("beach-rescue-probe"):
        if args.once:
            result = trio.run(probe_once, config)
            if result.ok:
                print(f"rescue probe: {result.line()}", flush=True)
                return 0
            print(f"rescue probe: failed: {result.line()}", file=sys.stderr, flush=True)
            return 1
        trio.run(_serve, config, args.interval, args.host, args.metrics_port)
    return 0


async def _serve(config: ProbeConfig, interval_s: float, host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_probe, config, interval_s=interval_s, host=host, port=port))
            async for signum in signals:
                log_event(_LOG, "probe.stopping", signal=signal.Signals(signum).name)
                break
            nursery.cancel_scope.cancel()
