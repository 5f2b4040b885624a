"""rescue._tracing: a no-op unless configured; real, redacted spans when it is (in-memory exporter)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from rescue import _tracing
from rescue._tracing import ENDPOINT_ENV, configure_tracing, shutdown_tracing, span, tracing_enabled


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
