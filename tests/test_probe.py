"""``rescue probe``: the synthetic check, run as an operator (or a CronJob) runs it.

Against a real ``rescue dev`` process: ``--once`` exits 0 with the four step times, and 1 with a
one-line reason when the fleet is paused or the probe's cohort is disabled; the long-running mode's
``/metrics`` is scraped over HTTP (Prometheus text and OpenMetrics) and follows a pause. In process:
a token service that names an unreachable relay fails the ``connect`` step.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from functools import partial
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from rescue.commands.probe import OUTCOMES, STEPS, ProbeConfig, ProbeMetrics, ProbeResult, probe_once
from rescue.guardrails import Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.testing import RESCUE_CLI, DevProcess, run_dev_process
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service

TIMEOUT = 60  # wall clock per test: a few subprocesses on a loaded 2-core box


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESCUE_", "OTEL_"))}
    return {**env, **extra}


async def _probe_once(dev: DevProcess, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [*RESCUE_CLI, "probe", "--once", "--api", dev.api, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=_env(),
    )


async def _admin(dev: DevProcess, *args: str) -> None:
    await trio.run_process(
        [*RESCUE_CLI, "admin", *args, "--api", dev.api],
        capture_stdout=True,
        env=_env(RESCUE_ADMIN_KEY=dev.admin_key()),
    )


def _json_lines(stderr: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.decode().splitlines() if line.startswith("{")]


async def test_probe_once_succeeds_through_a_real_fleet() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_dev_process() as dev:
            quiet = await _probe_once(dev, "--cohort", "dev")
            assert quiet.returncode == 0
            assert quiet.stderr == b""  # --once logs only warnings by default: one line on stdout
            assert quiet.stdout.count(b"\n") == 1
            result = await _probe_once(
                dev, "--cohort", "dev", "--session-prefix", "probe-test-", "--log-level", "INFO"
            )
            out, err = result.stdout.decode(), result.stderr.decode()
            assert result.returncode == 0, err
            line = re.fullmatch(
                r"rescue probe: ok token=(\S+)s connect=(\S+)s pair=(\S+)s round_trip=(\S+)s\n", out
            )
            assert line, out
            assert all(0 <= float(t) < 10 for t in line.groups())
            (run,) = [doc for doc in _json_lines(result.stderr) if doc["event"] == "probe.run"]
            assert run["outcome"] == "ok"
            assert set(run["steps_s"]) == set(STEPS)
            assert re.fullmatch(r"[0-9a-f]{12}", run["session"])
            assert "probe-test-" not in out + err  # session ids only as their tag
            # it really went through the relay: two handshakes accepted, one session paired
            async with httpx.AsyncClient() as http:
                relay_metrics = (await http.get(dev.admin + "/metrics")).text
            families = {f.name: f for f in text_string_to_metric_families(relay_metrics)}
            ok = [
                s.value
                for s in families["beach_rescue_handshakes"].samples
                if s.labels.get("outcome") == "ok"
            ]
            assert sum(ok) >= 2


async def test_probe_once_fails_with_one_line_reason() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_dev_process() as dev:
            # the default cohort ("probe") is not enabled on rescue dev
            disabled = await _probe_once(dev, "--log-level", "INFO")
            await _admin(dev, "pause")
            paused = await _probe_once(dev, "--cohort", "dev", "--log-level", "INFO")
            quiet = await _probe_once(dev, "--cohort", "dev")
    for result, reason in ((disabled, "cohort_disabled"), (paused, "fallback_paused")):
        assert result.returncode == 1
        assert result.stdout == b""
        plain = [line for line in result.stderr.decode().splitlines() if not line.startswith("{")]
        assert len(plain) == 1, plain
        assert plain[0].startswith(f"rescue probe: failed: {reason}: "), plain
        (run,) = [doc for doc in _json_lines(result.stderr) if doc["event"] == "probe.run"]
        assert run["outcome"] == reason
        assert run["steps_s"] == {}
    # what a CronJob's log shows by default: exactly the one line
    assert quiet.returncode == 1
    assert quiet.stderr.decode().count("\n") == 1
    assert quiet.stderr.startswith(b"rescue probe: failed: fallback_paused: ")


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _scrape(http: httpx.AsyncClient, url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http.get(url)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return _samples(response.text)


def _runs(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], outcome: str) -> float:
    return samples[("beach_rescue_probe_runs_total", (("outcome", outcome),))]


async def test_probe_metrics_endpoint_scraped_for_real() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_dev_process() as dev:
            proc = await trio.lowlevel.open_process(
                [
                    *RESCUE_CLI,
                    "probe",
                    "--api",
                    dev.api,
                    "--host",
                    "127.0.0.1",
                    "--metrics-port",
                    "0",
                    "--interval",
                    "0.2",
                ],
                stderr=subprocess.PIPE,
                env=_env(RESCUE_COHORT="dev"),  # flags and RESCUE_* variables alike
            )
            try:
                assert proc.stderr is not None
                text = ""
                while (found := re.search(r'"event":"probe.listening".*?"url":"([^"]+)"', text)) is None:
                    chunk = await proc.stderr.receive_some()
                    assert chunk, text
                    text += chunk.decode()
                url = found.group(1)
                async with httpx.AsyncClient() as http:
                    samples = await _scrape(http, url)
                    while _runs(samples, "ok") < 2:
                        await trio.sleep(0.1)
                        samples = await _scrape(http, url)
                    assert samples[("beach_rescue_probe_success", ())] == 1
                    assert samples[("beach_rescue_probe_last_run_timestamp_seconds", ())] > 1.7e9
                    for step in STEPS:
                        count = samples[("beach_rescue_probe_step_seconds_count", (("step", step),))]
                        total = samples[("beach_rescue_probe_step_seconds_sum", (("step", step),))]
                        assert count >= 2
                        assert 0 < total < 10 * count
                        assert 0 <= samples[("beach_rescue_probe_last_step_seconds", (("step", step),))] < 10
                    outcomes = {
                        dict(labels)["outcome"] for name, labels in samples if name.endswith("runs_total")
                    }
                    assert outcomes == set(OUTCOMES)

                    openmetrics = await http.get(url, headers={"accept": "application/openmetrics-text"})
                    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
                    assert openmetrics.text.endswith("# EOF\n")
                    health = await http.get(url.removesuffix("/metrics") + "/healthz")
                    assert health.json()["status"] == "ok"

                    # pause the fleet: the probe fails with the reason, and says so in its metrics
                    await _admin(dev, "pause")
                    samples = await _scrape(http, url)
                    while _runs(samples, "fallback_paused") < 1:
                        await trio.sleep(0.1)
                        samples = await _scrape(http, url)
                    assert samples[("beach_rescue_probe_success", ())] == 0
                    assert samples[("beach_rescue_probe_last_step_seconds", (("step", "connect"),))] == -1
                proc.send_signal(signal.SIGTERM)
                assert await proc.wait() == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def _probe_against(relay_url: str, timeout_s: float, close_timeout_s: float = 2.0) -> ProbeResult:
    """One probe run against an in-process token service whose tokens name ``relay_url``."""
    service = TokenService(
        TokenServiceConfig(keys=PublishedKeys(SigningKey.generate()), relay_url=relay_url, disable_oidc=True),
        Guardrails(MemoryStore()),
    )
    await service.guardrails.set_cohort_enabled("probe", True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        config = ProbeConfig(
            api_url=f"http://127.0.0.1:{port}", timeout_s=timeout_s, close_timeout_s=close_timeout_s
        )
        result = await probe_once(config)
        nursery.cancel_scope.cancel()
    return result


async def test_connect_step_times_out_on_a_relay_that_never_answers() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # accepts TCP, never answers the upgrade

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            (listener,) = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            started = trio.current_time()
            # the silent relay never answers our close either: bound it at 0.5 s (2 s by default)
            result = await _probe_against(
                f"ws://127.0.0.1:{port}/v1/connect", timeout_s=1, close_timeout_s=0.5
            )
            elapsed = trio.current_time() - started
            nursery.cancel_scope.cancel()
    assert result.outcome == "connect_timeout", result
    assert set(result.steps) == {"token"}
    assert result.line().startswith("connect_timeout: no connect within the 1 s deadline")
    assert elapsed < 10  # the run's deadline, plus the peers' bounded close


async def test_a_malformed_relay_url_fails_the_token_step() -> None:
    with trio.fail_after(TIMEOUT):
        result = await _probe_against("ws://127.0.0.1:99999/v1/connect", timeout_s=5)
    assert result.outcome == "token_unavailable", result
    assert "bad_answer" in result.detail


async def test_connect_step_fails_when_the_named_relay_is_unreachable() -> None:
    with trio.fail_after(TIMEOUT):
        result = await _probe_against("ws://127.0.0.1:1/v1/connect", timeout_s=5)  # nothing listens there
    assert result.outcome == "connect_failed", result
    assert set(result.steps) == {"token"}
    assert result.line().startswith("connect_failed: host: ")
    metrics = ProbeMetrics()
    metrics.record(result, now=1.0)
    samples = _samples(metrics.render("")[0])
    assert _runs(samples, "connect_failed") == 1
    assert samples[("beach_rescue_probe_success", ())] == 0


@pytest.mark.parametrize("prefix", ["has space", "x" * 120, ""])
def test_bad_session_prefix_is_a_config_error(prefix: str) -> None:
    from rescue.errors import ConfigError

    with pytest.raises(ConfigError):
        ProbeConfig(session_prefix=prefix)
