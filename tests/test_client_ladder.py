"""The fallback ladder: mocked WebRTC/TURN attempts (peers we do not own), the REAL token service and
relay behind them, JSON log events, backoff under MockClock, and the guardrails stopping it cold."""

from __future__ import annotations

import functools
import itertools
import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
import trio
import trio.testing

from rescue.client import (
    BackoffPolicy,
    DataReceived,
    FallbackLadder,
    LadderResult,
    TokenClient,
    TokenGrant,
    TokenRequestError,
    TokenServiceUnavailable,
    open_peer,
    prefetched,
)
from rescue.errors import GuardrailError
from rescue.guardrails import FleetState, GuardrailConfig, Guardrails, MemoryStore
from rescue.protocol import SigningKey, b64url_encode
from rescue.testing import TEST_PSK, run_relay
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, serve_token_service


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.events: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "event", None)
        if isinstance(event, str) and event.startswith("transport."):
            self.events.append({k: v for k, v in record.__dict__.items() if not k.startswith("_")})


@pytest.fixture
def capture() -> AsyncIterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("rescue.client.ladder")
    old = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    yield handler  # type: ignore[misc]
    logger.removeHandler(handler)
    logger.setLevel(old)


@dataclass
class Flaky:
    """A mocked transport attempt: fails ``failures`` times, then returns ``name``."""

    name: str
    failures: int
    calls: int = 0
    hang: bool = False
    takes: float = 0.5  # an attempt takes time (the real-clock tests below: 0.1 s)

    async def __call__(self) -> str:
        self.calls += 1
        if self.hang:
            await trio.sleep_forever()
        await trio.sleep(self.takes)
        if self.calls <= self.failures:
            raise ConnectionError(f"{self.name} attempt {self.calls} failed")
        return self.name


class CountingTokens:
    def __init__(self, grant: TokenGrant | None = None, error: Exception | None = None) -> None:
        self.calls = 0
        self.grant = grant or TokenGrant(b"tok", "ws://127.0.0.1:1/v1/connect", 2e9, "dev", "ok")
        self.error = error

    async def __call__(self) -> TokenGrant:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        return self.grant


def _reasons(capture: Capture, event: str) -> list[object]:
    return [e.get("reason") for e in capture.events if e["event"] == event]


# ------------------------------------------------------------------------------ pure ladder logic


async def test_webrtc_success_never_asks_for_a_token(autojump_clock: trio.testing.MockClock) -> None:
    tokens = CountingTokens()
    webrtc = Flaky("webrtc", failures=1)
    result = await FallbackLadder(session_id="s", tokens=tokens, webrtc=webrtc).run()
    assert result == LadderResult("webrtc", "webrtc", webrtc_attempts=2)
    assert tokens.calls == 0


async def test_turn_used_after_webrtc_fails(autojump_clock: trio.testing.MockClock, capture: Capture) -> None:
    tokens = CountingTokens()
    webrtc, turn = Flaky("webrtc", failures=99), Flaky("turn", failures=0)
    result = await FallbackLadder(session_id="s", tokens=tokens, webrtc=webrtc, turn=turn).run()
    assert result.rung == "turn"
    assert result.transport == "turn"
    assert result.reasons == ("webrtc_failed",)
    assert webrtc.calls == 3
    assert tokens.calls == 0
    assert _reasons(capture, "transport.fallback.considered") == ["webrtc_failed"]
    assert not _reasons(capture, "transport.fallback.activated")


async def test_backoff_between_webrtc_attempts(autojump_clock: trio.testing.MockClock) -> None:
    starts: list[float] = []

    async def attempt() -> None:
        starts.append(trio.current_time())
        raise OSError("ice failed")

    ladder = FallbackLadder(
        session_id="s",
        tokens=CountingTokens(),
        webrtc=attempt,
        webrtc_attempts=5,
        backoff=BackoffPolicy(base=1.0, cap=4.0),
    )
    result = await ladder.run()
    assert result.rung == "relay"
    assert result.webrtc_attempts == 5
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    windows = [1.0, 2.0, 4.0, 4.0]  # exponential, capped; full jitter inside each window
    assert all(0 <= g <= w for g, w in zip(gaps, windows, strict=True))
    assert sum(gaps) > 0  # jitter is not always zero


async def test_hanging_attempts_time_out(autojump_clock: trio.testing.MockClock, capture: Capture) -> None:
    webrtc, turn = Flaky("webrtc", 0, hang=True), Flaky("turn", 0, hang=True)
    start = trio.current_time()
    result = await FallbackLadder(
        session_id="s", tokens=CountingTokens(), webrtc=webrtc, turn=turn, attempt_timeout=5.0
    ).run()
    assert result.rung == "relay"
    assert result.reasons == ("webrtc_failed", "turn_failed")
    assert trio.current_time() - start >= 4 * 5.0
    considered = [e for e in capture.events if e["event"] == "transport.fallback.considered"]
    assert considered[0]["error"] == "timeout"
    assert _reasons(capture, "transport.fallback.activated") == [None]


async def test_token_errors_stop_the_ladder(autojump_clock: trio.testing.MockClock, capture: Capture) -> None:
    for error, reason in (
        (GuardrailError("cohort_disabled", "no"), "guardrail_refused"),
        (TokenServiceUnavailable("unreachable", "down"), "token_unavailable"),
        (TokenRequestError(401, "unauthenticated", "key"), "token_unavailable"),
    ):
        capture.events.clear()
        ladder = FallbackLadder(session_id="s", tokens=CountingTokens(error=error), webrtc=Flaky("w", 9))
        with pytest.raises(type(error)):
            await ladder.run()
        assert _reasons(capture, "transport.fallback.considered") == [
            "webrtc_failed",
            "turn_unavailable",
            reason,
        ]
        assert not _reasons(capture, "transport.fallback.activated")


async def test_telemetry_off_logs_no_session(
    autojump_clock: trio.testing.MockClock, capture: Capture
) -> None:
    await FallbackLadder(session_id="secret-session", tokens=CountingTokens(), telemetry=False).run()
    assert capture.events
    assert all("session" not in e for e in capture.events)


# ------------------------------------------------------- real token service + relay behind the ladder


@dataclass
class ControlPlane:
    store: MemoryStore
    api_url: str
    relay_connections: list[int]


@asynccontextmanager
async def control_plane(*, relay_url: str | None = None) -> AsyncIterator[tuple[ControlPlane, str]]:
    """The real token service (memory store, dev cohort enabled) in front of a real relay."""
    key = SigningKey.generate()
    store = MemoryStore()
    await store.set_cohort_enabled("dev", True)
    async with run_relay(key) as relay, trio.open_nursery() as nursery:
        config = TokenServiceConfig(
            keys=PublishedKeys(key), relay_url=relay_url or relay.url, disable_oidc=True
        )
        service = TokenService(config, Guardrails(store, GuardrailConfig()))
        port = await nursery.start(serve_token_service, service, "127.0.0.1", 0)
        yield ControlPlane(store, f"http://127.0.0.1:{port}", []), relay.url
        nursery.cancel_scope.cancel()


async def _climb_and_talk(
    api_url: str, session: str, role: str, failing: Flaky
) -> tuple[LadderResult, bytes]:
    """The whole client flow: ladder, then (on the relay rung) a peer that says hello and listens."""
    tokens = TokenClient(api_url, session_id=session, role=role)
    ladder = FallbackLadder(
        session_id=session,
        tokens=tokens,
        webrtc=failing,
        backoff=BackoffPolicy(base=0.01, cap=0.02),
        attempt_timeout=2.0,
    )
    result = await ladder.run()
    assert result.grant is not None
    async with open_peer(prefetched(result.grant, tokens), session, role, psk=TEST_PSK) as peer:
        await peer.send(0, f"hello from {role}".encode())
        message = await peer.receive()
        assert isinstance(message, DataReceived)
        await peer.drain()
        return result, message.data


async def test_relay_engaged_only_after_forced_failures(capture: Capture) -> None:
    with trio.fail_after(30):
        async with control_plane() as (plane, _):
            host_rtc, guest_rtc = Flaky("webrtc", 99, takes=0.1), Flaky("webrtc", 99, takes=0.1)
            results: dict[str, tuple[LadderResult, bytes]] = {}

            async def side(role: str, failing: Flaky) -> None:
                results[role] = await _climb_and_talk(plane.api_url, "ladder-1", role, failing)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, "host", host_rtc)
                nursery.start_soon(side, "guest", guest_rtc)
    assert results["host"][1] == b"hello from guest"
    assert results["guest"][1] == b"hello from host"
    assert results["host"][0].rung == "relay"
    assert results["host"][0].reasons == ("webrtc_failed", "turn_unavailable")
    assert host_rtc.calls == guest_rtc.calls == 3
    activated = [e for e in capture.events if e["event"] == "transport.fallback.activated"]
    assert len(activated) == 2
    assert all(e["cohort"] == "dev" for e in activated)


async def test_never_touches_the_relay_when_paused(capture: Capture) -> None:
    accepted: list[trio.SocketStream] = []

    async def count(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await stream.aclose()

    with trio.fail_after(20):
        async with trio.open_nursery() as outer:
            (listener,) = await outer.start(functools.partial(trio.serve_tcp, count, 0, host="127.0.0.1"))
            port = listener.socket.getsockname()[1]
            decoy = f"ws://127.0.0.1:{port}/v1/connect"
            async with control_plane(relay_url=decoy) as (plane, _):
                await plane.store.set_fleet_state(FleetState(paused=True, reason="test"))
                with pytest.raises(GuardrailError) as info:
                    await _climb_and_talk(plane.api_url, "ladder-2", "host", Flaky("webrtc", 99, takes=0.1))
                assert info.value.error == "fallback_paused"
                await plane.store.set_fleet_state(FleetState(paused=False))
                await plane.store.set_cohort_enabled("dev", False)
                with pytest.raises(GuardrailError) as info:
                    await _climb_and_talk(plane.api_url, "ladder-2", "host", Flaky("webrtc", 99, takes=0.1))
                assert info.value.error == "cohort_disabled"
            outer.cancel_scope.cancel()
    assert accepted == []  # the relay URL was never even dialled
    refused = [e for e in capture.events if e.get("reason") == "guardrail_refused"]
    assert [e["guardrail"] for e in refused] == ["fallback_paused", "cohort_disabled"]
    assert not [e for e in capture.events if e["event"] == "transport.fallback.activated"]


async def test_token_client_maps_answers() -> None:
    with trio.fail_after(20):
        async with control_plane() as (plane, relay_url):
            client = TokenClient(plane.api_url, session_id="tc-1", role="guest")
            grant = await client()
            assert grant.relay_url == relay_url
            assert grant.cohort == "dev"
            assert not grant.expires_within(60)
            assert "redacted" in repr(grant)
            bad = TokenClient(plane.api_url, session_id="tc-1", role="guest", cohort="no such cohort!")
            with pytest.raises(TokenRequestError) as info:
                await bad()
            assert info.value.status == 400
    # Nothing listens there any more.
    with pytest.raises(TokenServiceUnavailable):
        await TokenClient(plane.api_url, session_id="tc-1", role="guest")()


async def test_token_fetches_share_one_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client per token request loaded the CA bundle into a new TLS context every time (even for
    http://): ~25 ms of CPU and a megabyte of short-lived allocations per fetch, which fragmented
    the heap of a process that reconnects many peers (docs/perf/soak.md)."""
    made: list[ssl.SSLContext] = []
    create = ssl.create_default_context

    def counted(*args: Any, **kwargs: Any) -> ssl.SSLContext:
        made.append(create(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ssl, "create_default_context", counted)
    with trio.fail_after(20):
        async with control_plane() as (plane, _):
            for i in range(5):
                await TokenClient(plane.api_url, session_id=f"tls-{i}", role="host")()
    assert len(made) <= 1  # none when an earlier test in this process made the shared one


@pytest.mark.parametrize(
    "url",
    ["ws://[bad/v1/connect", "ws://127.0.0.1:99999/v1/connect", "ws:///v1/connect", "wss://h:0/v1/connect"],
)
def test_a_malformed_relay_url_is_a_bad_answer(url: str) -> None:
    """It used to pass (it starts with ws://) and crash the peer's connect with a bare ValueError."""
    answer = {"token": b64url_encode(b"token"), "relay_url": url, "expires_at": 1}
    with pytest.raises(TokenServiceUnavailable) as info:
        TokenGrant.from_json(answer)
    assert info.value.error == "bad_answer"
