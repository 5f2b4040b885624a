"""Liveness and readiness through a Redis outage, on real processes (decision 0021).

The Kubernetes manifests probed the token service's ``/healthz`` for liveness too: it reads the kill
switch, so a Redis outage answered 503 and, after three failed probes, Kubernetes restarted every
replica, which cannot bring Redis back and turned a store outage into a crash loop. Here
``rescue token-service`` and ``rescue relay`` run as the deployment runs them (the relay polling the
token service and registering in the same Redis), the probe paths and timeouts come from
``deploy/k8s``, and a private redis-server is SIGSTOPped: both services go not ready, and their
liveness paths keep answering 200 within the probe's timeout; on SIGCONT both are ready again.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import yaml

from rescue.protocol import SigningKey

from .conftest import RedisServer, start_relay_process, token_service_listening

pytestmark = pytest.mark.redis

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
# Generous for a process start and a recovery on a loaded 2-core box; the outage itself takes
# status_stale_s (1 s here) plus a poll or two to show on the relay.
TIMEOUT_S = 60
STALE_S = 1.0
# Liveness probes checked during the outage, after both services went not ready (one per 0.2 s:
# longer than the relay's staleness limit and the store's 0.5 s probe interval together).
LIVENESS_ROUNDS = 15


def _probes(file: str, kind: str) -> dict[str, dict[str, Any]]:
    """The container's probes in ``deploy/k8s/<file>`` (liveness, readiness, startup if any)."""
    for doc in yaml.safe_load_all((K8S / file).read_text()):
        if doc and doc["kind"] == kind:
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            return {k: v for k, v in container.items() if k.endswith("Probe")}
    raise AssertionError(f"no {kind} in {file}")


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "signing.jwk"
    path.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    return str(path)


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    """Read the token service's log pipe to the end: during the outage it logs every failed status
    poll, and a full pipe would stall the process (and its liveness) for the wrong reason."""
    while await stream.receive_some(65536):
        pass


async def test_a_stalled_redis_makes_both_services_not_ready_but_never_not_alive(
    private_redis: RedisServer, stalled: list[RedisServer], key_file: str, tmp_path: Path
) -> None:
    ts_probes = _probes("token-service.yaml", "Deployment")
    relay_probes = _probes("relay.yaml", "StatefulSet")
    private_redis.initialise()
    with trio.fail_after(TIMEOUT_S):
        async with token_service_listening(key_file, private_redis.url) as (process, ts_listening):
            assert process.stderr is not None
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_drain, process.stderr)
                api = f"http://127.0.0.1:{ts_listening['port']}"
                # the token service's probes ask the port the manifest names (its admin port: 0024)
                ts_ports = {"api": api, "admin": f"http://127.0.0.1:{ts_listening['admin_port']}"}
                jwks = tmp_path / "jwks.json"
                async with httpx.AsyncClient() as http:
                    jwks.write_text((await http.get(f"{api}/v1/fallback/keys")).text)
                relay, listening = await start_relay_process(
                    jwks, tmp_path / "relay.log", "--token-service", api, "--redis-url", private_redis.url,
                    "--node-id", "probe-node", "--status-stale-s", str(STALE_S), "--drain-s", "0.5",
                )  # fmt: skip
                try:
                    admin = f"http://127.0.0.1:{listening['admin_port']}"
                    await _check_outage(private_redis, stalled, api, ts_ports, admin, ts_probes, relay_probes)
                finally:
                    with trio.CancelScope(shield=True):
                        relay.send_signal(signal.SIGTERM)
                        with trio.move_on_after(15):
                            await relay.wait()
                        if relay.returncode is None:
                            relay.kill()
                            await relay.wait()
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
                nursery.cancel_scope.cancel()
    assert relay.returncode == 0, (tmp_path / "relay.log").read_text(errors="replace")[-2000:]


async def _check_outage(
    redis_server: RedisServer,
    stalled: list[RedisServer],
    api: str,
    ts_ports: dict[str, str],
    admin: str,
    ts_probes: dict[str, dict[str, Any]],
    relay_probes: dict[str, dict[str, Any]],
) -> None:
    def url(probe: dict[str, Any], ports: dict[str, str]) -> str:
        """Where ``probe`` asks, on the port it names (``ports``: the service's, by name)."""
        return f"{ports[probe['httpGet']['port']]}{probe['httpGet']['path']}"

    relay_ports = {"admin": admin}
    # (url, the probe's own timeout) of every liveness-kind probe of both services
    alive = [
        (url(probe, ports), float(probe.get("timeoutSeconds", 1)))
        for ports, probes in ((ts_ports, ts_probes), (relay_ports, relay_probes))
        for kind, probe in probes.items()
        if kind in ("livenessProbe", "startupProbe")
    ]
    ts_ready = url(ts_probes["readinessProbe"], ts_ports)
    relay_ready = url(relay_probes["readinessProbe"], relay_ports)
    assert len(alive) == 3  # the token service's liveness, the relay's liveness and startup

    async with httpx.AsyncClient() as http:

        async def status(url: str) -> int:
            return (await http.get(url, timeout=10)).status_code

        async def check_alive() -> None:
            for url, timeout in alive:
                # within the probe's timeout: a slow answer is a failed probe too
                answer = await http.get(url, timeout=timeout)
                assert (answer.status_code, answer.json()["status"]) == (200, "ok"), url

        async def until(want: int, *urls: str) -> None:
            while [await status(u) for u in urls] != [want] * len(urls):
                await check_alive()
                await trio.sleep(0.1)

        # up: everything ready (the relay once its first status poll and registration are done)
        await until(200, ts_ready, relay_ready, f"{api}/healthz")
        await check_alive()

        redis_server.process.send_signal(signal.SIGSTOP)
        stalled.append(redis_server)
        # not ready: the token service at its next probe, the relay once its kill-switch state is
        # older than status_stale_s (the token service answers its polls 503); alive all along
        await until(503, ts_ready, relay_ready)
        health = await http.get(f"{api}/healthz", timeout=10)
        assert (health.status_code, health.json()["status"]) == (503, "store_unavailable")
        assert (await http.get(ts_ready, timeout=10)).json()["reasons"] == ["store_unavailable"]
        assert (await http.get(relay_ready, timeout=10)).json()["control"]["stale"] is True
        # a replica that is not ready is still scraped, and says why (the store alert reads it)
        scraped = ts_ports["admin"]  # where every manifest scrapes it (decision 0024)
        assert "beach_fallback_store_up 0.0" in (await http.get(f"{scraped}/metrics", timeout=10)).text
        for _ in range(LIVENESS_ROUNDS):
            await check_alive()
            assert await status(ts_ready) == 503
            await trio.sleep(0.2)

        redis_server.process.send_signal(signal.SIGCONT)
        # both recover by themselves: nothing was restarted
        await until(200, ts_ready, relay_ready, f"{api}/healthz")
        await check_alive()
