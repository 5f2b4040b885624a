"""The token service's admin port (decision 0024): probes and scrapes apart from the API's connection cap.

The token service served its API, its probes and ``/metrics`` on one port behind one connection cap
(decision 0017): over the cap with no idle connection, a newcomer is answered 503 ``server_busy``.
So anyone who reached the API port could fail the kubelet's liveness probe (Kubernetes then
restarts every replica, over and over) and Prometheus's scrape, by holding the cap's worth of
connections mid-request: a few dozen half-sent request heads, renewed every ``REQUEST_TIMEOUT``.
Now ``rescue token-service`` also listens on ``--admin-port`` (``/livez``, ``/readyz``, ``/healthz``,
``/metrics`` only) with a cap of its own, and every manifest probes and scrapes there.

On a real process with a tiny API cap (``--max-connections``), flooded with half-open requests: the
API port answers 503 ``server_busy`` (the old failure: the manifests' probes asked it) while the
admin port answers all four paths.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from rescue._http import REQUEST_TIMEOUT
from rescue.cli import build_parser
from rescue.guardrails import Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.tokenservice import (
    ADMIN_PATHS,
    DEFAULT_ADMIN_PORT,
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
)

from .conftest import token_service_listening

pytestmark = pytest.mark.redis

START_TIMEOUT_S = 30  # a process start on a loaded 2-core box
# The API port's cap in the flood test: tiny, so the flood is a handful of sockets.
CAP = 4
# A half-sent request holds its connection for REQUEST_TIMEOUT from its first byte, then gets 408
# (an attacker sends the next one): every check of the flooded state must fit well inside it.
FLOODED_CHECKS_S = REQUEST_TIMEOUT / 2
# A request head cut before its blank line: the connection is mid-request, never idle, so the
# server cannot close it to make room for a newcomer.
HALF_HEAD = b"GET /v1/fallback/status HTTP/1.1\r\nhost: flood\r\n"


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "signing.jwk"
    path.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    return str(path)


@asynccontextmanager
async def flood(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` connections to ``port``, each with half a request head sent and held open."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            streams.append(stream)
            await stream.send_all(HALF_HEAD)
        yield streams
    finally:
        for stream in streams:
            stream.socket.close()  # no graceful close: the test may be failing already


async def _answer(url: str) -> tuple[int, str]:
    """(status, body) of a GET on a fresh connection (the flood test's newcomer)."""
    async with httpx.AsyncClient(timeout=5) as http:
        response = await http.get(url)
    return response.status_code, response.text


async def test_a_flood_of_the_api_port_leaves_the_admin_port_answering(key_file: str, redis_url: str) -> None:
    with trio.fail_after(START_TIMEOUT_S):
        async with token_service_listening(key_file, redis_url, "--max-connections", str(CAP)) as (
            process,
            listening,
        ):
            assert process.stderr is not None
            api = f"http://127.0.0.1:{listening['port']}"
            admin = f"http://127.0.0.1:{listening['admin_port']}"
            for path in ADMIN_PATHS:  # unflooded: both ports answer the probes and the scrape
                assert (await _answer(f"{api}{path}"))[0] == 200, path
                assert (await _answer(f"{admin}{path}"))[0] == 200, path
            async with flood(listening["port"], CAP):
                with trio.fail_after(FLOODED_CHECKS_S):
                    # the cap's worth of connections mid-request: a newcomer is turned away, and
                    # that was the liveness probe and the scrape of every manifest
                    status, body = await _answer(f"{api}/livez")
                    assert (status, json.loads(body)["error"]) == (503, "server_busy")
                    for path in ADMIN_PATHS:
                        status, body = await _answer(f"{admin}{path}")
                        assert status == 200, (path, body)
                    live = json.loads((await _answer(f"{admin}/livez"))[1])
                    assert live == {"status": "ok"}
                    ready = json.loads((await _answer(f"{admin}/readyz"))[1])
                    assert (ready["ready"], ready["reasons"]) == (True, [])
                    # the scrape sees the flood it is asked about: the API port's connections
                    metrics = (await _answer(f"{admin}/metrics"))[1]
                    assert f"beach_rescue_http_open_connections {CAP}.0" in metrics
                    assert 'beach_rescue_http_connections_turned_away_total{reason="refused"}' in metrics
                    # still flooded after all that: the admin answers came during the flood
                    status, body = await _answer(f"{api}/metrics")
                    assert (status, json.loads(body)["error"]) == (503, "server_busy")
            # the flood gone, the API port answers again
            assert (await _answer(f"{api}/livez"))[0] == 200


def test_admin_port_flags() -> None:
    def parse(*argv: str) -> tuple[int, str | None]:
        args = build_parser().parse_args(
            ["token-service", "--signing-key", "k", "--redis-url", "redis://x", *argv]
        )
        return args.admin_port, args.admin_host

    assert parse() == (DEFAULT_ADMIN_PORT, None) == (9080, None)  # the relay's is 9090
    assert parse("--admin-port", "-1", "--admin-host", "10.0.0.1") == (-1, "10.0.0.1")


def test_the_admin_port_serves_the_probes_and_the_scrape_only() -> None:
    """No API route, no admin route, no join page: it has no authentication and no CORS, and what
    it serves is only what orchestrators and Prometheus ask."""
    service = TokenService(
        TokenServiceConfig(keys=PublishedKeys(SigningKey.generate()), disable_oidc=True),
        Guardrails(MemoryStore()),
    )
    assert sorted(service.admin_router.routes) == sorted(("GET", path) for path in ADMIN_PATHS)
    assert set(service.admin_router.routes) <= set(service.router.routes)  # the API port keeps them
