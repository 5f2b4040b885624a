"""Traces that arrive: real ``rescue`` processes export OTLP/HTTP to a real receiver (SPEC §8).

The suite's receiver is a plain HTTP server on 127.0.0.1 that decodes every
``ExportTraceServiceRequest`` with ``opentelemetry-proto``. A fleet (``rescue token-service`` and one
``rescue relay``, started through their command lines) and this process (the SDK: the fallback
ladder and two peers) get only the standard ``OTEL_*`` variables. Asserted:

* the ladder's spans (three WebRTC attempts, TURN, the token rung) and the decision;
* W3C ``traceparent`` propagation: the token service's span is a child of the SDK's token rung, the
  relay's handshake spans are children of the peers' connection spans, all in one trace;
* a session that did not opt in to telemetry leaves spans with no session tag, role or parent;
* no secret (token, pre-shared key, admin key) and no session id in clear anywhere in the export;
* the token service and the relay, two processes sharing the fleet's ``RESCUE_LOG_TAG_KEY``, name
  the session by the same keyed tag (issue #11), and it is not the unkeyed hash;
* the relay's ``relay.session`` span: a child of the handshake that created the session (so in the
  SDK's trace), linked to the other peer's handshake, with the lifecycle as events (joined, paired,
  peer_closed, closed with code and reason); none for the session that did not opt in.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import json
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from rescue._log import session_tag, set_session_tag_key
from rescue._tracing import ENDPOINT_ENV, configure_tracing, shutdown_tracing, span
from rescue.client import BackoffPolicy, DataReceived, FallbackLadder, TokenClient, open_peer, prefetched
from rescue.protocol import b64url_encode
from rescue.testing import TEST_PSK

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
fleet_mod: Any = importlib.import_module("chaos._fleet")

TIMEOUT_S = 120  # a fleet start on a loaded 2-core box, two sessions, a clean stop
SDK_SERVICE = "beach-rescue-sdk-test"


@dataclass
class Span:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent: str
    attributes: dict[str, Any]
    events: list[str] = field(default_factory=list)
    event_fields: list[dict[str, Any]] = field(default_factory=list)
    links: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (trace, span, attributes)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver:
    """``POST /v1/traces`` (protobuf) on 127.0.0.1; keeps the raw bodies and the decoded spans."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.spans: list[Span] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)  # a malformed export fails the test here
                receiver.add(body, request)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, body: bytes, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.raw.append(body)
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(
                            Span(
                                service=str(resource.get("service.name")),
                                name=s.name,
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent=s.parent_span_id.hex(),
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                events=[e.name for e in s.events],
                                event_fields=[
                                    {a.key: _value(a.value) for a in e.attributes} for e in s.events
                                ],
                                links=[
                                    (
                                        link.trace_id.hex(),
                                        link.span_id.hex(),
                                        {a.key: _value(a.value) for a in link.attributes},
                                    )
                                    for link in s.links
                                ],
                            )
                        )

    def named(self, name: str, **attributes: Any) -> list[Span]:
        with self.lock:
            return [
                s
                for s in self.spans
                if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
            ]


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    r = OtlpReceiver()
    r.thread.start()
    yield r
    r.server.shutdown()
    r.server.server_close()


async def _failing_transport() -> object:
    await trio.lowlevel.checkpoint()
    raise OSError("no route to peer (mocked WebRTC/TURN: a peer we do not own)")


async def _echo_session(api: str, session: str, *, opt_in: bool, ladder: bool) -> bytes:
    """Host (through the ladder, or straight) and guest pair through the relay; one E2E echo."""
    host_tokens = TokenClient(api, session_id=session, role="host", telemetry_opt_in=opt_in)
    guest_tokens = TokenClient(api, session_id=session, role="guest", telemetry_opt_in=opt_in)
    grant = await host_tokens()
    if ladder:
        result = await FallbackLadder(
            session_id=session,
            tokens=host_tokens,
            webrtc=_failing_transport,
            turn=_failing_transport,
            backoff=BackoffPolicy(base=0.01, cap=0.02),
            telemetry=opt_in,
        ).run()
        assert result.rung == "relay"
        assert result.grant is not None
        grant = result.grant
    async with (
        open_peer(prefetched(grant, host_tokens), session, "host", psk=TEST_PSK) as host,
        open_peer(guest_tokens, session, "guest", psk=TEST_PSK) as guest,
    ):
        await host.send(0, b"ping " + session.encode())
        got = await guest.receive()
        assert isinstance(got, DataReceived)
        await guest.send(0, got.data)
        echoed = await host.receive()
        assert isinstance(echoed, DataReceived)
        assert echoed.data == b"ping " + session.encode()
        await host.drain()
        await guest.drain()
    return grant.token


@pytest.mark.slow
@pytest.mark.redis
async def test_spans_from_real_processes_link_up_and_carry_no_secrets(
    receiver: OtlpReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only the standard variables, for this process (the SDK) and the fleet's children alike.
    monkeypatch.setenv(ENDPOINT_ENV, receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    assert configure_tracing(SDK_SERVICE)
    tokens: list[bytes] = []
    try:
        with trio.fail_after(TIMEOUT_S):
            async with fleet_mod.open_fleet(tmp_path, nodes=1) as fleet:
                admin_key = fleet.admin_key
                # this process (the test, and here also the SDK) shares the fleet's tag key, so
                # the tags below are the ones the token service and the relay computed
                set_session_tag_key(fleet.log_tag_key)
                with span("app.connect"):
                    tokens.append(await _echo_session(fleet.api_url, "traced-1", opt_in=True, ladder=True))
                tokens.append(await _echo_session(fleet.api_url, "private-2", opt_in=False, ladder=False))
                shutdown_tracing()  # flush this process's batch
                await fleet.kill_all()  # SIGTERM: each process flushes its spans on the way out
    finally:
        shutdown_tracing()

    services = {s.service for s in receiver.spans}
    assert {SDK_SERVICE, "beach-rescue-token-service", "beach-rescue-relay"} <= services

    # --- the ladder: WebRTC failed 3x, TURN failed, token granted, relay paired -----------------
    (ladder,) = receiver.named("client.fallback.ladder")
    assert ladder.attributes["rung"] == "relay"
    assert ladder.attributes["reasons"] == "webrtc_failed,turn_failed"
    assert ladder.attributes["webrtc_attempts"] == 3
    assert ladder.attributes["session"] == session_tag("traced-1")
    (app,) = receiver.named("app.connect")
    assert ladder.parent == app.span_id
    trace = app.trace_id
    webrtc = receiver.named("client.fallback.webrtc")
    assert sorted(s.attributes["attempt"] for s in webrtc) == [1, 2, 3]
    assert {(s.parent, s.attributes["outcome"], s.attributes["error"]) for s in webrtc} == {
        (ladder.span_id, "failed", "OSError")
    }
    (turn,) = receiver.named("client.fallback.turn")
    assert (turn.parent, turn.attributes["outcome"]) == (ladder.span_id, "failed")
    (token_rung,) = receiver.named("client.fallback.token")
    assert token_rung.parent == ladder.span_id
    assert token_rung.attributes["outcome"] == "granted"

    # --- the token service: a child of the SDK's token rung (traceparent accepted) -------------
    minted = receiver.named("POST /v1/fallback/token", session=session_tag("traced-1"))
    linked = [s for s in minted if s.parent == token_rung.span_id]
    assert len(linked) == 1, minted
    assert linked[0].trace_id == trace
    assert linked[0].service == "beach-rescue-token-service"
    assert linked[0].attributes["outcome"] == "issued"
    assert linked[0].attributes["guardrail"] == "ok"
    assert linked[0].attributes["cohort"] == "dev"
    assert linked[0].attributes["http.response.status_code"] == 200

    # --- the relay: handshakes are children of the peers' connection spans --------------------
    connections = {
        s.span_id: s
        for s in receiver.named("client.relay.connection", session=session_tag("traced-1"))
        if s.trace_id == trace
    }
    assert {c.attributes["role"] for c in connections.values()} == {"host", "guest"}
    assert all("welcomed" in c.events for c in connections.values())
    handshakes = receiver.named("relay.handshake", session=session_tag("traced-1"))
    assert {h.attributes["role"] for h in handshakes} == {"host", "guest"}
    for h in handshakes:
        assert h.service == "beach-rescue-relay"
        assert h.trace_id == trace
        assert h.parent in connections
        assert h.attributes["outcome"] == "ok"
        assert h.attributes["node"] == "relay-1"
    assert any(h.attributes["paired"] for h in handshakes)

    # --- the relay's session span: child of the creating handshake, linked to the other ----------
    (session_span,) = receiver.named("relay.session")  # one: private-2 did not opt in
    assert session_span.service == "beach-rescue-relay"
    assert session_span.attributes["session"] == session_tag("traced-1")
    assert session_span.attributes["node"] == "relay-1"
    assert session_span.attributes["cohort"] == "dev"
    assert session_span.attributes["paired"] is True
    assert session_span.attributes["close_code"] == 1000
    by_id = {h.span_id: h for h in handshakes}
    creator = by_id[session_span.parent]
    assert session_span.trace_id == trace
    (other,) = [h for h in handshakes if h is not creator]
    assert session_span.links == [(other.trace_id, other.span_id, {"role": other.attributes["role"]})]
    lifecycle = list(zip(session_span.events, session_span.event_fields, strict=True))
    assert lifecycle[:3] == [
        ("joined", {"role": creator.attributes["role"]}),
        ("joined", {"role": other.attributes["role"]}),
        ("paired", {"role": other.attributes["role"]}),  # the peer that completed the pair
    ]
    (peer_closed,) = [fields for name, fields in lifecycle if name == "peer_closed"]  # CLOSE NORMAL
    assert peer_closed["code"] == 1000
    closes = [fields for name, fields in lifecycle if name == "closed"]
    assert sorted(f["role"] for f in closes) == ["guest", "host"]
    assert all(f["code"] == 1000 and isinstance(f["reason"], str) for f in closes)
    assert len(lifecycle) <= 8  # lifecycle only: nothing per frame

    # --- telemetry opt-out: spans exist (counts), but nothing per session and no parent ---------
    private_mints = [
        s for s in receiver.named("POST /v1/fallback/token") if s.attributes.get("session") is None
    ]
    assert private_mints
    for s in private_mints:
        assert s.parent == ""
        assert "role" not in s.attributes
        assert "client_version" not in s.attributes
    private_handshakes = [s for s in receiver.named("relay.handshake") if "session" not in s.attributes]
    assert len(private_handshakes) == 2
    assert all(s.parent == "" and "role" not in s.attributes for s in private_handshakes)

    # --- no secrets, no session ids in clear, anywhere in what left the processes -------------
    everything = b"".join(receiver.raw)
    for token in tokens:
        assert token not in everything
        assert b64url_encode(token).encode() not in everything
    for secret in (TEST_PSK, TEST_PSK.hex().encode(), admin_key.encode(), b"traced-1", b"private-2"):
        assert secret not in everything
    # the tags are keyed: the unkeyed hash of the id (what a log reader could compute) is nowhere
    unkeyed = hashlib.blake2b(b"traced-1", digest_size=6).hexdigest()
    assert unkeyed.encode() not in everything
    assert session_tag("traced-1").encode() in everything

    # --- the logs of the two processes name the session by the same tag ------------------------
    def events(log: str) -> list[dict[str, Any]]:
        lines = (tmp_path / "logs" / log).read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    considered = {
        e["session"] for e in events("token-service.log") if e["event"] == "transport.fallback.considered"
    }
    connected = {e["session"] for e in events("relay-1.log") if e["event"] == "relay.peer_connected"}
    assert considered == {session_tag("traced-1")}  # private-2 did not opt in: not logged
    assert session_tag("traced-1") in connected
    assert unkeyed not in (tmp_path / "logs" / "relay-1.log").read_text()
