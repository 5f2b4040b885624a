"""SIGTERM drains the token service (decision 0023), on a real ``rescue token-service`` and in-process.

Before, SIGTERM stopped the process at once: ``/readyz`` never turned 503 first, so during a rolling
deploy a load balancer kept sending mints to a replica that was exiting. Now the first SIGTERM (or
SIGINT) answers ``/readyz`` 503 ``draining`` at once while every other request is still served (with
``Connection: close``) for ``--drain-s``; then the listener closes, a request in flight is still
answered within the graceful period, and the process exits 0. A second signal exits at once.

The process tests read the process's own log lines (``tokenservice.draining``, ``…stopping``) to
know where it is, and bound every wait; the in-process tests time the window on a ``MockClock``.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from rescue._http import DEFAULT_GRACEFUL_TIMEOUT
from rescue.cli import build_parser, main
from rescue.commands.token_service import (
    DEFAULT_DRAIN_S,
    STORE_CLOSE_TIMEOUT_S,
    build_config,
    run_token_service,
    stop_bound_s,
)
from rescue.guardrails import GuardrailConfig, RedisStore
from rescue.protocol import SigningKey

from .conftest import ADMIN_AUTH, SERVICE_AUTH, RedisServer, token_request, token_service_listening

pytestmark = pytest.mark.redis

START_TIMEOUT_S = 30  # a process start on a loaded 2-core box
# The drain of the process test: long enough for a handful of requests on a loaded box to fall
# inside it (the test checks that they did), short enough to wait out.
DRAIN_S = 4.0


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "signing.jwk"
    path.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    return str(path)


class ProcessLog:
    """The JSON log lines of a process's stderr, read as they come."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()

    async def read(self, stream: trio.abc.ReceiveStream) -> None:
        buffer = b""
        while chunk := await stream.receive_some(65536):
            *lines, buffer = (buffer + chunk).split(b"\n")
            self.events += [json.loads(line) for line in lines if line.startswith(b"{")]
            self._changed.set()
            self._changed = trio.Event()

    def find(self, event: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e.get("event") == event), None)

    async def wait_for(self, event: str) -> dict[str, Any]:
        """The first line with this event (bounded by the caller)."""
        while (found := self.find(event)) is None:
            await self._changed.wait()
        return found


@asynccontextmanager
async def service(
    key_file: str, redis: RedisServer, drain_s: float
) -> AsyncIterator[tuple[trio.Process, int, ProcessLog, int]]:
    """``rescue token-service --drain-s drain_s`` on ``redis`` with cohort ``beta`` enabled, its log
    read in the background; yields (process, port, log, admin port)."""
    redis.initialise()
    async with (
        token_service_listening(key_file, redis.url, "--drain-s", str(drain_s)) as (process, listening),
        trio.open_nursery() as nursery,
    ):
        port = listening["port"]
        assert process.stderr is not None
        log = ProcessLog()
        nursery.start_soon(log.read, process.stderr)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            enabled = await http.put(
                "/v1/admin/cohorts/beta", json={"fallback_ws_enabled": True}, headers=ADMIN_AUTH
            )
            assert enabled.status_code == 200, enabled.text
        yield process, port, log, listening["admin_port"]
        nursery.cancel_scope.cancel()


def _mint_bytes(session: str) -> tuple[bytes, bytes]:
    """A token request on the wire, as (head, body)."""
    body = json.dumps(token_request(session)).encode()
    head = (
        "POST /v1/fallback/token HTTP/1.1\r\nhost: test\r\n"
        f"authorization: {SERVICE_AUTH['authorization']}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    return head, body


async def _start_in_flight(port: int, session: str) -> tuple[trio.SocketStream, bytes]:
    """A connection with a token request on it whose body is half sent: in flight, not idle. Returns
    the stream and the rest of the body."""
    head, body = _mint_bytes(session)
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(head + body[: len(body) // 2])
    return stream, body[len(body) // 2 :]


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    received = b""
    try:
        while chunk := await stream.receive_some(65536):
            received += chunk
    except trio.BrokenResourceError:  # a reset: what a cut request looks like
        received += b"<reset>"
    return received


def _parse(raw: bytes) -> tuple[int, dict[str, str], Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), headers, json.loads(body)


async def _refused(port: int) -> bool:
    try:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
    except OSError:
        return True
    await stream.aclose()
    return False


# --- a real `rescue token-service` -----------------------------------------------------------------


async def _draining_gauge(http: httpx.AsyncClient) -> float:
    """``beach_fallback_draining`` in the service's /metrics."""
    scrape = await http.get("/metrics")
    for family in text_string_to_metric_families(scrape.text):
        if family.name == "beach_fallback_draining":
            (sample,) = family.samples
            return sample.value
    raise AssertionError("no beach_fallback_draining in /metrics")


async def test_sigterm_turns_readyz_503_serves_the_drain_then_answers_in_flight_and_exits_0(
    key_file: str, private_redis: RedisServer
) -> None:
    with trio.fail_after(START_TIMEOUT_S + DRAIN_S + stop_bound_s(0) + 10):
        async with (
            service(key_file, private_redis, DRAIN_S) as (process, port, log, admin_port),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as admin,
        ):
            ready = await http.get("/readyz")  # also opens the keep-alive connection used below
            assert (ready.status_code, ready.json()["reasons"]) == (200, [])
            assert ready.headers.get("connection") != "close"
            assert await _draining_gauge(http) == 0

            process.send_signal(signal.SIGTERM)
            draining = await log.wait_for("tokenservice.draining")
            assert (draining["signal"], draining["drain_s"]) == ("SIGTERM", DRAIN_S)

            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {"ready": False, "reasons": ["draining"], "fallback_paused": False}
            # everything else is served as before; answers close their connection, so a keep-alive
            # client (this one) reconnects through the load balancer for its next request
            assert ready.headers["connection"] == "close"
            assert await _draining_gauge(http) == 1  # what a dashboard sees of it
            alive = await http.get("/livez")
            assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
            minted = await http.post(
                "/v1/fallback/token", json=token_request("during-drain"), headers=SERVICE_AUTH
            )
            assert minted.status_code == 200, minted.text
            assert minted.json()["token"]
            assert minted.headers["connection"] == "close"
            assert (await http.get("/healthz")).json() == {"status": "ok", "fallback_paused": False}
            # the admin port, where the probes ask (decision 0024), says the same through the drain
            ready = await admin.get("/readyz")
            assert (ready.status_code, ready.json()["reasons"]) == (503, ["draining"])
            assert (await admin.get("/livez")).status_code == 200
            assert await _draining_gauge(admin) == 1
            in_flight, rest = await _start_in_flight(port, "in-flight")
            assert log.find("tokenservice.stopping") is None, "the checks above missed the drain window"

            stopping = await log.wait_for("tokenservice.stopping")
            assert stopping["ts"] - draining["ts"] >= DRAIN_S - 0.01  # served for the whole drain
            # no new connection is accepted, though the process still runs (the request in flight
            # holds it up to the graceful period)
            with trio.fail_after(DEFAULT_GRACEFUL_TIMEOUT / 2):
                while not (await _refused(port) and await _refused(admin_port)):  # both stop
                    await trio.sleep(0.01)
            assert process.poll() is None
            # the request in flight when the drain ended is answered, not reset
            await in_flight.send_all(rest)
            status, headers, doc = _parse(await _read_to_eof(in_flight))
            assert (status, headers["connection"]) == (200, "close"), doc
            assert doc["token"]
            await in_flight.aclose()

            with trio.fail_after(DEFAULT_GRACEFUL_TIMEOUT + STORE_CLOSE_TIMEOUT_S):
                assert await process.wait() == 0
            stopped = await log.wait_for("tokenservice.stopped")
            assert stopped["status"] == 0
            assert log.find("http.shutdown_forced") is None  # nothing was cut


async def test_a_second_signal_exits_at_once(key_file: str, private_redis: RedisServer) -> None:
    long_drain = 120.0
    with trio.fail_after(START_TIMEOUT_S + 20):
        async with service(key_file, private_redis, long_drain) as (process, port, log, _):
            process.send_signal(signal.SIGTERM)
            await log.wait_for("tokenservice.draining")
            in_flight, _ = await _start_in_flight(port, "cut")
            process.send_signal(signal.SIGINT)
            # at once: not after the drain, nor after the in-flight request's graceful period
            with trio.fail_after(10):
                status = await process.wait()
            assert status == 128 + signal.SIGINT
            assert (await log.wait_for("tokenservice.stopped"))["status"] == 128 + signal.SIGINT
            stopping = await log.wait_for("tokenservice.stopping")
            assert stopping["signal"] == "SIGINT"
            answer = await _read_to_eof(in_flight)
            assert not answer.startswith(b"HTTP/"), answer  # cut, never answered
            await in_flight.aclose()


# --- configuration ---------------------------------------------------------------------------------


def _parse_args(*argv: str, key_file: str = "k.jwk") -> argparse.Namespace:
    return build_parser().parse_args(
        ["token-service", "--signing-key", key_file, "--redis-url", "redis://x", *argv]
    )


def test_drain_option_default_environment_and_bounds(
    monkeypatch: pytest.MonkeyPatch, key_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RESCUE_DRAIN_S", raising=False)
    assert _parse_args().drain_s == DEFAULT_DRAIN_S
    assert _parse_args("--drain-s", "2.5").drain_s == 2.5
    monkeypatch.setenv("RESCUE_DRAIN_S", "3")  # named like the relay's own --drain-s
    assert _parse_args().drain_s == 3.0
    assert _parse_args("--drain-s", "0").drain_s == 0.0  # the flag wins
    monkeypatch.setenv("RESCUE_SERVICE_KEYS", "svc")
    for bad in ("-1", "nan", "inf"):
        argv = ["token-service", "--signing-key", key_file, "--redis-url", "redis://x", "--drain-s", bad]
        assert main(argv) == 1  # refused before anything starts
        assert "--drain-s" in capsys.readouterr().err
    assert stop_bound_s(DEFAULT_DRAIN_S) == DEFAULT_DRAIN_S + DEFAULT_GRACEFUL_TIMEOUT + STORE_CLOSE_TIMEOUT_S
    assert math.isfinite(stop_bound_s())


# --- in-process, on a MockClock ---------------------------------------------------------------------


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """The in-process tests raise SIGTERM/SIGINT at themselves: only inside run_token_service's
    receiver. Should one arrive after it, it must not end the test run."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


async def _in_process(
    nursery: trio.Nursery, redis: RedisServer, key_file: str, drain_s: float
) -> tuple[int, list[int]]:
    """run_token_service in this process (port, and the list its exit status is appended to)."""
    redis.initialise()
    config = build_config(
        _parse_args(key_file=key_file), {"RESCUE_SERVICE_KEYS": "svc", "RESCUE_ADMIN_KEY": "adm"}
    )
    result: list[int] = []

    async def run(task_status: trio.TaskStatus[int]) -> None:
        store = RedisStore(redis.url)
        result.append(
            await run_token_service(
                config, store, GuardrailConfig(), "127.0.0.1", 0, drain_s=drain_s, task_status=task_status
            )
        )

    port: int = await nursery.start(run)
    return port, result


async def _until_draining(http: httpx.AsyncClient) -> httpx.Response:
    """/readyz until the signal raised at ourselves was taken (bounded: a few hundred requests)."""
    for _ in range(500):
        ready = await http.get("/readyz")
        if ready.status_code == 503:
            return ready
    raise AssertionError("/readyz never turned 503 after SIGTERM")


async def test_the_drain_lasts_exactly_drain_s(
    mock_clock: trio.testing.MockClock, private_redis: RedisServer, key_file: str, restore_signals: None
) -> None:
    drain_s = 30.0
    async with trio.open_nursery() as nursery:
        port, result = await _in_process(nursery, private_redis, key_file, drain_s)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            assert (await http.get("/readyz")).status_code == 200
            signal.raise_signal(signal.SIGTERM)
            ready = await _until_draining(http)
            assert ready.json()["reasons"] == ["draining"]
            mock_clock.jump(drain_s - 0.1)
            await trio.testing.wait_all_tasks_blocked()
            # still serving at the very end of the window
            assert (await http.get("/livez")).status_code == 200
            assert (await http.get("/readyz")).status_code == 503
            assert not result
            mock_clock.jump(0.2)
            await trio.testing.wait_all_tasks_blocked()
            assert await _refused(port)
            assert result == [0]


async def test_a_second_signal_cuts_in_flight_requests_without_waiting(
    mock_clock: trio.testing.MockClock, private_redis: RedisServer, key_file: str, restore_signals: None
) -> None:
    async with trio.open_nursery() as nursery:
        port, result = await _in_process(nursery, private_redis, key_file, 30.0)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            signal.raise_signal(signal.SIGTERM)
            await _until_draining(http)
        in_flight, _ = await _start_in_flight(port, "cut")
        await trio.testing.wait_all_tasks_blocked()
        signal.raise_signal(signal.SIGINT)
        # the clock never moves: neither the drain nor the in-flight request's graceful period is
        # waited for (with either, run_token_service would still be running here)
        for _ in range(100):
            await trio.testing.wait_all_tasks_blocked()
            if result:
                break
        assert result == [128 + signal.SIGINT]
        assert not (await _read_to_eof(in_flight)).startswith(b"HTTP/")
        await in_flight.aclose()
