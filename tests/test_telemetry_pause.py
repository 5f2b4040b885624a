"""Missing telemetry pauses minting, end to end: a real `rescue token-service` on a real Redis.

Reports arrive over HTTP exactly as relays (activations) and Beach's control plane (sessions
started) send them. While both kinds arrive, minting goes on however long it runs; once tokens
keep being minted for the grace period without one activation report, the next request is refused
with 403 ``fallback_paused`` and the fleet state, the metrics and the log say ``telemetry_missing``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from rescue.protocol import SigningKey

TIMEOUT = 60
GRACE_S = 1.5
MIN_TOKENS = 3
ADMIN = {"authorization": "Bearer adm"}


def _token_body(session: str) -> dict[str, Any]:
    return {
        "session_id": session,
        "role": "host",
        "cohort_id": "beta",
        "client_version": "test/1",
        "telemetry_opt_in": False,
    }


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "key.jwk"
    path.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    return str(path)


async def _start(argv: list[str], env: dict[str, str], log: Path) -> tuple[trio.Process, int]:
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(argv, env=env, stderr=out, stdout=subprocess.DEVNULL)
    while True:  # bounded by the caller's fail_after
        for line in log.read_text(errors="replace").splitlines():
            if "tokenservice.listening" in line:
                return process, int(json.loads(line)["port"])
        assert process.poll() is None, log.read_text(errors="replace")
        await trio.sleep(0.05)


@pytest.mark.redis
async def test_tokens_without_activation_reports_pause_the_fleet(
    key_file: str, redis_url: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESCUE_", "BEACH_", "FALLBACK_WS_"))}
    env.update(
        RESCUE_ADMIN_KEY="adm",
        RESCUE_DRAIN_S="0.2",  # SIGTERM at the end: no load balancer to drain for
        BEACH_RESCUE_DISABLE_OIDC="1",
        BEACH_DEV_ENABLE_FALLBACK_WS="1",
        RESCUE_TELEMETRY_GRACE_S=str(GRACE_S),
        RESCUE_TELEMETRY_MIN_TOKENS=str(MIN_TOKENS),
    )
    argv = [sys.executable, "-P", "-m", "rescue.cli", "token-service", "--signing-key", key_file,
            "--redis-url", redis_url, "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
            "--relay-url", "wss://relay.invalid/v1/connect"]  # fmt: skip
    log = tmp_path / "token-service.log"
    with trio.fail_after(TIMEOUT):
        process, port = await _start(argv, env, log)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:

                async def mint(session: str) -> httpx.Response:
                    return await http.post("/v1/fallback/token", json=_token_body(session))

                async def report() -> None:
                    r = await http.post("/v1/sessions/started", json={"cohort": "beta", "count": 2})
                    assert r.status_code == 200, r.text
                    r = await http.post("/v1/fallback/activations", json={"cohort": "beta"})
                    assert r.status_code == 200, r.text

                # 1. Both reports keep arriving: minting goes on for several grace periods.
                started = trio.current_time()
                n = 0
                while trio.current_time() - started < 3 * GRACE_S:
                    for _ in range(MIN_TOKENS):
                        n += 1
                        assert (await mint(f"ok{n}")).status_code == 200
                    await report()
                    await trio.sleep(GRACE_S / 4)
                status = (await http.get("/v1/fallback/status")).json()
                assert (status["paused"], status["cause"]) == (False, None)

                # 2. Activation reports stop (sessions-started reports go on): within a grace
                # period plus a little, a token request is refused and the fleet is paused.
                refused: httpx.Response | None = None
                while refused is None:  # bounded by fail_after; a stall only delays it
                    n += 1
                    answer = await mint(f"gap{n}")
                    if answer.status_code != 200:
                        refused = answer
                        break
                    await http.post("/v1/sessions/started", json={"cohort": "beta"})
                    await trio.sleep(GRACE_S / 8)
                assert refused.status_code == 403
                assert refused.json()["error"] == "fallback_paused"
                status = (await http.get("/v1/fallback/status")).json()
                assert (status["paused"], status["cause"], status["drain"]) == (
                    True,
                    "telemetry_missing",
                    False,
                )
                assert "without one activation report" in status["reason"]
                metrics = (await http.get("/metrics")).text
                assert 'beach_fallback_pause_cause{cause="telemetry_missing"} 1.0' in metrics
                assert 'beach_fallback_pause_cause{cause="operator"} 0.0' in metrics
                window = (
                    await http.get("/v1/admin/guardrails", params={"cohort": "beta"}, headers=ADMIN)
                ).json()
                assert window["telemetry"]["tokens_since_activation"] >= MIN_TOKENS
                # still refused: the pause is stored, not re-judged per request
                assert (await mint("after")).status_code == 403

                # 3. The operator resumes (after fixing the reports): minting works again.
                assert (
                    await http.post("/v1/fallback/activations", json={"cohort": "beta"})
                ).status_code == 200
                resumed = await http.post("/v1/admin/resume", headers=ADMIN, json={"reason": "relays fixed"})
                assert (resumed.json()["paused"], resumed.json()["cause"]) == (False, None)
                assert (await mint("back")).status_code == 200
                metrics = (await http.get("/metrics")).text
                assert 'beach_fallback_pause_cause{cause="telemetry_missing"} 0.0' in metrics
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with trio.move_on_after(10):
                    await process.wait()
                if process.poll() is None:
                    process.kill()
                    await process.wait()
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    missing = [e for e in events if e.get("event") == "guardrail_telemetry_missing"]
    assert len(missing) == 1, [e.get("event") for e in events]
    assert (missing[0]["missing"], missing[0]["level"].lower()) == ("activations", "error")
    paused = [e for e in events if e.get("event") == "guardrail_paused"]
    assert paused
    assert paused[0]["cause"] == "telemetry_missing"
