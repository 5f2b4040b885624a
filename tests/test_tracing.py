"""rescue._tracing: a no-op unless configured; real, redacted spans when it is (in-memory exporter)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rescue import _tracing
from rescue._tracing import (
    ENDPOINT_ENV,
    TRACES_ENDPOINT_ENV,
    configure_tracing,
    current_record,
    record_span,
    shutdown_tracing,
    span,
    trace_headers,
    tracing_enabled,
)


@pytest.fixture(autouse=True)
def _tracing_off() -> Iterator[None]:
    shutdown_tracing()
    yield
    shutdown_tracing()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exp = InMemorySpanExporter()
    assert configure_tracing("beach-rescue-test", exporter=exp)
    return exp


def test_noop_without_endpoint() -> None:
    assert configure_tracing("beach-rescue-relay", environ={}) is False
    assert not tracing_enabled()
    with span("relay.handshake", node="relay-1", token="x") as s:
        s.set_attribute("outcome", "ok")
        s.record_exception(ValueError("ignored"))
    with pytest.raises(RuntimeError, match="boom"), span("relay.handshake"):
        raise RuntimeError("boom")


def test_endpoint_without_otlp_exporter_package_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK is a dev dependency but the OTLP exporter is not: configured-but-unavailable is a no-op."""
    real_import = _tracing.importlib.import_module

    def fake_import(name: str, package: str | None = None) -> object:
        if name == _tracing._OTLP_HTTP_EXPORTER:
            raise ImportError(name)
        return real_import(name, package)

    monkeypatch.setattr(_tracing.importlib, "import_module", fake_import)
    assert configure_tracing("beach-rescue-relay", environ={ENDPOINT_ENV: "http://127.0.0.1:4318"}) is False
    assert not tracing_enabled()


def test_spans_are_exported_with_redacted_attributes(exporter: InMemorySpanExporter) -> None:
    secret = secrets.token_urlsafe(32)
    with span("relay.handshake", node="relay-1", token=secret, size=12, ratio=0.5, skipped=None) as s:
        s.set_attribute("outcome", "ok")
        s.set_attribute("service_key", secret)
        s.set_attribute("peer", {"role": "host", "psk": secret})
    (finished,) = exporter.get_finished_spans()
    assert finished.name == "relay.handshake"
    attrs = dict(finished.attributes or {})
    assert attrs["node"] == "relay-1"
    assert attrs["size"] == 12
    assert attrs["ratio"] == 0.5
    assert attrs["outcome"] == "ok"
    assert attrs["token"] == attrs["service_key"] == "[redacted]"
    assert "skipped" not in attrs
    assert secret not in repr(attrs)
    assert finished.resource.attributes["service.name"] == "beach-rescue-test"


def test_nested_spans_share_a_trace_and_parent(exporter: InMemorySpanExporter) -> None:
    with span("outer"), span("inner"):
        pass
    inner, outer = exporter.get_finished_spans()
    assert inner.parent is not None
    assert outer.context is not None
    assert inner.parent.span_id == outer.context.span_id
    assert inner.context is not None
    assert inner.context.trace_id == outer.context.trace_id


def test_exception_marks_error_with_type_only(exporter: InMemorySpanExporter) -> None:
    secret = secrets.token_urlsafe(32)
    with pytest.raises(ValueError, match="bad token"), span("token.verify"):
        raise ValueError(f"bad token {secret}")
    (finished,) = exporter.get_finished_spans()
    assert finished.status.status_code is StatusCode.ERROR
    assert finished.status.description == "ValueError"
    assert finished.attributes is not None
    assert finished.attributes["exception.type"] == "ValueError"
    assert not finished.events  # no exception event: its message could quote input
    assert secret not in repr(finished.to_json())


async def test_trio_tasks_get_their_own_parent_span(exporter: InMemorySpanExporter) -> None:
    """Context follows trio tasks (contextvars): children started inside a span are its children."""

    async def child(name: str) -> None:
        with span(name):
            await trio.sleep(0)

    with trio.fail_after(5):
        with span("session"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(child, "pump.a")
                nursery.start_soon(child, "pump.b")
    by_name = {s.name: s for s in exporter.get_finished_spans()}
    session_ctx = by_name["session"].context
    assert session_ctx is not None
    for name in ("pump.a", "pump.b"):
        parent = by_name[name].parent
        assert parent is not None
        assert parent.span_id == session_ctx.span_id


def test_shutdown_turns_tracing_off(exporter: InMemorySpanExporter) -> None:
    assert tracing_enabled()
    shutdown_tracing()
    assert not tracing_enabled()
    with span("after"):
        pass
    assert exporter.get_finished_spans() == ()


# --- the standard OTEL_* switches -------------------------------------------------------------


@pytest.mark.parametrize(
    "environ",
    [
        {},
        {ENDPOINT_ENV: "  "},
        {ENDPOINT_ENV: "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
        {ENDPOINT_ENV: "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
    ],
)
def test_off_unless_an_endpoint_is_set_and_not_disabled(environ: dict[str, str]) -> None:
    assert configure_tracing("beach-rescue-relay", environ=environ) is False
    assert not tracing_enabled()
    assert trace_headers() == {}


@pytest.mark.parametrize("variable", [ENDPOINT_ENV, TRACES_ENDPOINT_ENV])
def test_either_endpoint_variable_turns_it_on(variable: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(variable, "http://127.0.0.1:9")  # nothing listens: spans are just dropped
    assert configure_tracing("beach-rescue-relay", environ={variable: "http://127.0.0.1:9"})
    assert tracing_enabled()


def test_otel_service_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-eu-1")
    exp = InMemorySpanExporter()
    assert configure_tracing("beach-rescue-relay", environ={"OTEL_SERVICE_NAME": "relay-eu-1"}, exporter=exp)
    with span("x"):
        pass
    (finished,) = exp.get_finished_spans()
    assert finished.resource.attributes["service.name"] == "relay-eu-1"


def test_sampler_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    exp = InMemorySpanExporter()
    assert configure_tracing("beach-rescue-relay", exporter=exp)
    with span("dropped"), record_span("dropped.too") as recorded:
        pass
    assert exp.get_finished_spans() == ()
    assert recorded.trace_id is None  # no exemplar pointing at a trace that was never kept


# --- propagation and recorded (server) spans ---------------------------------------------------

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


def test_trace_headers_carry_the_current_span(exporter: InMemorySpanExporter) -> None:
    with span("client.fallback.token"):
        headers = trace_headers()
    (finished,) = exporter.get_finished_spans()
    assert finished.context is not None
    version, trace_id, span_id, flags = headers["traceparent"].split("-")
    assert version == "00"
    assert int(flags, 16) & 1  # sampled
    assert int(trace_id, 16) == finished.context.trace_id
    assert int(span_id, 16) == finished.context.span_id


def test_recorded_span_follows_the_caller_when_allowed(exporter: InMemorySpanExporter) -> None:
    with record_span("POST /v1/fallback/token", carrier={"Traceparent": TRACEPARENT}, route="t") as rec:
        assert current_record() is rec
        rec.set_attribute("outcome", "issued")
        rec.add_event("paired", code=None, token="secret")
    assert current_record() is None
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is not None
    assert format(finished.parent.span_id, "016x") == CALLER_SPAN
    assert rec.trace_id == CALLER_TRACE
    assert rec.exemplar() == {"trace_id": CALLER_TRACE}
    assert dict(finished.attributes or {}) == {"route": "t", "outcome": "issued"}
    (event,) = finished.events
    assert event.name == "paired"
    assert dict(event.attributes or {}) == {"token": "[redacted]"}


def test_recorded_span_drops_the_caller_when_told(exporter: InMemorySpanExporter) -> None:
    with record_span("relay.handshake", carrier={"traceparent": TRACEPARENT}, follow_caller=False):
        pass
    with record_span("relay.handshake", carrier={"traceparent": TRACEPARENT}) as rec:
        rec.follow_caller = False  # e.g. the session did not opt in to telemetry
    for finished in exporter.get_finished_spans():
        assert finished.parent is None
        assert finished.context is not None
        assert format(finished.context.trace_id, "032x") != CALLER_TRACE


@pytest.mark.parametrize("header", ["garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", ""])
def test_bad_traceparent_starts_a_new_trace(exporter: InMemorySpanExporter, header: str) -> None:
    with record_span("GET /v1/fallback/keys", carrier={"traceparent": header}):
        pass
    (finished,) = exporter.get_finished_spans()
    assert finished.parent is None


def test_recorded_span_marks_errors_and_bounds_events(exporter: InMemorySpanExporter) -> None:
    def lifecycle() -> None:
        with record_span("relay.session") as rec:
            for i in range(_tracing.MAX_EVENTS + 5):
                rec.add_event("rejoined", n=i)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        lifecycle()
    (finished,) = exporter.get_finished_spans()
    assert len(finished.events) == _tracing.MAX_EVENTS
    assert finished.attributes is not None
    assert finished.attributes["events_dropped"] == 5
    assert finished.attributes["exception.type"] == "RuntimeError"
    assert finished.status.status_code is StatusCode.ERROR


def test_recorded_span_is_a_cheap_collector_while_off() -> None:
    with record_span("relay.handshake", carrier={"traceparent": TRACEPARENT}) as rec:
        rec.set_attribute("outcome", "ok")
        rec.add_event("x")
    assert rec.trace_id is None
    assert rec.exemplar() is None
