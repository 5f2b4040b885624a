"""OpenTelemetry tracing when it is configured, and a no-op otherwise (SPEC §8).

Tracing is optional twice over: it is on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set **and** the
``opentelemetry-sdk`` package (plus ``opentelemetry-exporter-otlp-proto-http`` for the exporter) is
installed. Otherwise :func:`span` costs one attribute check and yields a do-nothing span, so callers
never branch on whether tracing is on::

    from rescue._tracing import configure_tracing, span

    configure_tracing("beach-rescue-relay")            # once, at process start
    with span("relay.handshake", node=node_id, session=session_tag(sid)) as s:
        ...
        s.set_attribute("outcome", "ok")

Attributes go through :func:`rescue._log.redact` first, so a field named ``token``, ``key``,
``passphrase`` … never leaves the process, in traces as in logs; session ids belong in
:func:`rescue._log.session_tag` form here too.

The tracer provider is kept by this module rather than installed as OpenTelemetry's global one, so a
process (or a test) can configure, shut down and configure again.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from rescue._log import get_logger, log_event, redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = ["ENDPOINT_ENV", "SpanLike", "configure_tracing", "shutdown_tracing", "span", "tracing_enabled"]

# The standard OTLP variable: its presence is what "tracing is configured" means.
ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
_OTLP_HTTP_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_TRACER_NAME: Final = "rescue"
# Span attribute values OpenTelemetry accepts as they are; anything else is sent as str().
_PLAIN_TYPES: Final = (str, bool, int, float)

_logger = get_logger("rescue.tracing")


class SpanLike(Protocol):
    """What :func:`span` yields: the part of an OpenTelemetry span callers may use."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def record_exception(self, exception: BaseException) -> None: ...


class _NoopSpan:
    """The span yielded while tracing is off."""

    def set_attribute(self, key: str, value: Any) -> None:
        """Ignore the attribute."""

    def record_exception(self, exception: BaseException) -> None:
        """Ignore the exception (it still propagates from the ``with`` block)."""


class _RedactingSpan:
    """An OpenTelemetry span whose attributes are redacted like log fields."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def set_attribute(self, key: str, value: Any) -> None:
        for name, clean in _attributes({key: value}).items():
            self._inner.set_attribute(name, clean)

    def record_exception(self, exception: BaseException) -> None:
        # Only the type: exception messages may quote input (a token, a header) verbatim.
        kind = type(exception).__qualname__
        self._inner.set_attribute("exception.type", kind)
        if isinstance(exception, Exception):  # not trio.Cancelled / KeyboardInterrupt: those are not faults
            from opentelemetry.trace import Status, StatusCode

            self._inner.set_status(Status(StatusCode.ERROR, kind))


_NOOP: Final = _NoopSpan()
_provider: TracerProvider | None = None


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: value if isinstance(value, _PLAIN_TYPES) else str(value)
        for name, value in redact(dict(fields)).items()
        if value is not None
    }


def tracing_enabled() -> bool:
    """True while :func:`configure_tracing` has a live tracer provider."""
    return _provider is not None


def configure_tracing(
    service_name: str,
    *,
    environ: Mapping[str, str] | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Turn tracing on if it is configured and available; say which in one log event.

    Args:
        service_name: the ``service.name`` resource attribute (``beach-rescue-relay``, …).
        environ: where to look for ``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``os.environ``); the
            OTLP exporter itself reads the standard ``OTEL_*`` variables.
        exporter: export to this instead of OTLP (tests, or an embedding application); tracing is
            then on whatever the environment says.

    Returns:
        Whether tracing is now on. A previous configuration is shut down first.

    Raises:
        Nothing for a missing package or variable: tracing just stays off (logged as
        ``tracing.disabled`` with the reason).
    """
    global _provider
    shutdown_tracing()
    env = os.environ if environ is None else environ
    endpoint = env.get(ENDPOINT_ENV, "").strip()
    if exporter is None and not endpoint:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log_event(
            _logger, "tracing.disabled", reason="opentelemetry-sdk not installed", level=logging.WARNING
        )
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        # Synchronous export: a test (or embedder) sees each span as soon as it ends.
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        try:
            otlp = importlib.import_module(_OTLP_HTTP_EXPORTER)
        except ImportError:
            log_event(
                _logger,
                "tracing.disabled",
                reason="opentelemetry-exporter-otlp-proto-http not installed",
                level=logging.WARNING,
            )
            return False
        # Batching keeps export off the request path; the exporter reads OTEL_EXPORTER_OTLP_* itself.
        provider.add_span_processor(BatchSpanProcessor(otlp.OTLPSpanExporter()))
    _provider = provider
    log_event(_logger, "tracing.enabled", service=service_name, exporter="custom" if exporter else "otlp")
    return True


def shutdown_tracing() -> None:
    """Flush and stop the tracer provider, if any; tracing is off afterwards."""
    global _provider
    provider, _provider = _provider, None
    if provider is not None:
        provider.shutdown()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[SpanLike]:
    """A span around the ``with`` block, current for the task (contextvars), or a no-op.

    Args:
        name: the span name, dotted like log events (``relay.handshake``).
        **attributes: initial attributes; redacted, ``None`` dropped, non-primitive values as ``str``.

    Yields:
        The span, to add attributes. An ``Exception`` leaving the block marks the span as an error
        (its type only, never its message, which may quote input) and propagates unchanged.
    """
    provider = _provider
    if provider is None:
        yield _NOOP
        return
    tracer = provider.get_tracer(_TRACER_NAME)
    with tracer.start_as_current_span(
        name, attributes=_attributes(attributes), record_exception=False, set_status_on_exception=False
    ) as inner:
        wrapped = _RedactingSpan(inner)
        try:
            yield wrapped
        except BaseException as exc:
            wrapped.record_exception(exc)
            raise
