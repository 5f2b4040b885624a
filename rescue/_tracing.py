"""OpenTelemetry tracing when it is configured, and a no-op otherwise (SPEC §8).

Tracing is optional twice over: it is on only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set **and** the ``otel`` extra is installed
(``opentelemetry-sdk`` plus ``opentelemetry-exporter-otlp-proto-http``; the container image has it).
The other standard variables work as the SDK defines them: ``OTEL_SERVICE_NAME`` (overrides the
process's default name), ``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` /
``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_TIMEOUT``,
``OTEL_BSP_*``; ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off. Otherwise
:func:`span` costs one attribute check and yields a do-nothing span, so callers never branch on
whether tracing is on::

    from rescue._tracing import configure_tracing, span

    configure_tracing("beach-rescue-relay")            # once, at process start
    with span("relay.handshake", node=node_id, session=session_tag(sid)) as s:
        ...
        s.set_attribute("outcome", "ok")

Attributes go through :func:`rescue._log.redact` first, so a field named ``token``, ``key``,
``passphrase`` … never leaves the process, in traces as in logs; session ids belong in
:func:`rescue._log.session_tag` form here too.

Two shapes of span (the trace model is in ``docs/operations/tracing.md``):

* :func:`span`: a current span around a block; spans opened inside it are its children. The SDK's
  ladder uses it, and :func:`trace_headers` gives the W3C ``traceparent`` of the current span to
  put on an outgoing request (token request, relay upgrade).
* :func:`record_span`: a server-side span *recorded when the work ends*, so what it may say is
  decided once the request is understood: the caller's ``traceparent`` (from ``carrier``) becomes
  its parent only if :attr:`RecordedSpan.follow_caller` is still true at the end. The token service
  and the relay handshake clear it for sessions that did not opt in to telemetry, so such a span
  carries nothing that ties it to a session. It also returns the trace id for a histogram exemplar.
* :func:`new_record` + :meth:`RecordedSpan.end`: the same kind of span for something that is not a
  ``with`` block, such as a relay session (it lives from its first handshake to its last close). Its
  parent may be another recorded span (:attr:`RecordedSpan.parent`, e.g. the handshake that created
  the session) and it may link to more (:meth:`RecordedSpan.link`, the handshakes that joined it).

The tracer provider is kept by this module rather than installed as OpenTelemetry's global one, so a
process (or a test) can configure, shut down and configure again.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from rescue._log import get_logger, log_event, redact

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "ENDPOINT_ENV",
    "NOOP_SPAN",
    "RecordedSpan",
    "SpanLike",
    "configure_tracing",
    "current_record",
    "new_record",
    "outside_record",
    "record_span",
    "shutdown_tracing",
    "span",
    "trace_headers",
    "traced_process",
    "tracing_enabled",
]

# The standard OTLP variables: the presence of either is what "tracing is configured" means.
ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
TRACES_ENDPOINT_ENV: Final = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
# A span recorded by record_span keeps at most this many events (a session span's lifecycle):
# a peer flapping for hours must not grow one span without bound.
MAX_EVENTS: Final = 64
# ...and at most this many links (a session span's handshakes: two peers, a few rejoins each).
MAX_LINKS: Final = 16
_OTLP_HTTP_EXPORTER: Final = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
_TRACER_NAME: Final = "rescue"
# Span attribute values OpenTelemetry accepts as they are; anything else is sent as str().
_PLAIN_TYPES: Final = (str, bool, int, float)

_logger = get_logger("rescue.tracing")


class SpanLike(Protocol):
    """What :func:`span` yields: the part of an OpenTelemetry span callers may use."""

    def set_attribute(self, key: str, value: Any) -> None: ...

    def record_exception(self, exception: BaseException) -> None: ...

    def add_event(self, name: str, **attributes: Any) -> None: ...


class _NoopSpan:
    """The span yielded while tracing is off."""

    def set_attribute(self, key: str, value: Any) -> None:
        """Ignore the attribute."""

    def record_exception(self, exception: BaseException) -> None:
        """Ignore the exception (it still propagates from the ``with`` block)."""

    def add_event(self, name: str, **attributes: Any) -> None:
        """Ignore the event."""


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

    def add_event(self, name: str, **attributes: Any) -> None:
        self._inner.add_event(name, _attributes(attributes))


class RecordedSpan:
    """A span's name, attributes and events, collected while the work runs (see :func:`record_span`).

    Attributes:
        follow_caller: whether the caller's ``traceparent`` becomes the parent (cleared for sessions
            that did not opt in to telemetry).
        parent: another recorded span to be the child of (it must be recorded first); it wins over
            the caller's ``traceparent``.
        trace_id: the trace id (32 hex digits) once the span is recorded and sampled, else ``None``;
            the exemplar of a latency histogram.
    """

    __slots__ = (
        "_attributes",
        "_carrier",
        "_context",
        "_ended",
        "_events",
        "_links",
        "_name",
        "_start_ns",
        "follow_caller",
        "parent",
        "trace_id",
    )

    def __init__(self, name: str, carrier: Mapping[str, str] | None, follow_caller: bool) -> None:
        self._name = name
        self._carrier = carrier
        self._start_ns = time.time_ns()  # OpenTelemetry timestamps are wall clock
        self._attributes: dict[str, Any] = {}
        self._events: list[tuple[str, dict[str, Any], int]] = []
        self._links: list[tuple[RecordedSpan, dict[str, Any]]] = []
        self._context: Any = None  # its SpanContext once recorded (for children and links)
        self._ended = False
        self.follow_caller = follow_caller
        self.parent: RecordedSpan | None = None
        self.trace_id: str | None = None

    def set_attribute(self, key: str, value: Any) -> None:
        self._attributes[key] = value

    def record_exception(self, exception: BaseException) -> None:
        self._attributes["exception.type"] = type(exception).__qualname__
        if isinstance(exception, Exception):
            self._attributes["error"] = True

    def add_event(self, name: str, **attributes: Any) -> None:
        if len(self._events) < MAX_EVENTS:
            self._events.append((name, attributes, time.time_ns()))
        else:
            self._attributes["events_dropped"] = self._attributes.get("events_dropped", 0) + 1

    def link(self, other: RecordedSpan, **attributes: Any) -> None:
        """Link to ``other`` (recorded by the time this one ends), with attributes; at most ``MAX_LINKS``."""
        if len(self._links) < MAX_LINKS:
            self._links.append((other, attributes))
        else:
            self._attributes["links_dropped"] = self._attributes.get("links_dropped", 0) + 1

    def end(self) -> None:
        """Record the span now (once; later calls do nothing); nothing is exported while tracing is off."""
        if self._ended:
            return
        self._ended = True
        provider = _provider
        if provider is not None:
            self._record(provider)

    def exemplar(self) -> dict[str, str] | None:
        """``{"trace_id": …}`` for ``Histogram.observe(…, exemplar=…)``, or ``None``."""
        return None if self.trace_id is None else {"trace_id": self.trace_id}

    def _record(self, provider: TracerProvider) -> None:
        from opentelemetry.trace import (
            Link,
            NonRecordingSpan,
            SpanKind,
            Status,
            StatusCode,
            set_span_in_context,
        )

        context: Any = None
        if self.parent is not None and self.parent._context is not None:
            context = set_span_in_context(NonRecordingSpan(self.parent._context))
        else:
            context = _extract(self._carrier) if self._carrier and self.follow_caller else None
        attributes = _attributes(self._attributes)
        error = attributes.pop("error", False)
        links = [
            Link(other._context, _attributes(fields))
            for other, fields in self._links
            if other._context is not None
        ]
        inner = provider.get_tracer(_TRACER_NAME).start_span(
            self._name,
            context=context,
            kind=SpanKind.SERVER,
            attributes=attributes,
            links=links,
            start_time=self._start_ns,
        )
        for name, fields, at in self._events:
            inner.add_event(name, _attributes(fields), timestamp=at)
        if error:
            inner.set_status(Status(StatusCode.ERROR, str(attributes.get("exception.type", "error"))))
        inner.end()
        ctx = inner.get_span_context()
        self._context = ctx
        if ctx.trace_flags.sampled:
            self.trace_id = format(ctx.trace_id, "032x")


_NOOP: Final = _NoopSpan()
NOOP_SPAN: Final[SpanLike] = _NOOP  # a span that records nothing: a default for "no span here"
_provider: TracerProvider | None = None
_current_record: contextvars.ContextVar[RecordedSpan | None] = contextvars.ContextVar(
    "rescue_current_record", default=None
)


def _attributes(fields: Mapping[str, Any]) -> dict[str, Any]:
    return {
        name: value if isinstance(value, _PLAIN_TYPES) else str(value)
        for name, value in redact(dict(fields)).items()
        if value is not None
    }


def _extract(carrier: Mapping[str, str]) -> Any:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    # header names are lower case on both of our servers; the propagator validates the value
    return TraceContextTextMapPropagator().extract(carrier={k.lower(): v for k, v in carrier.items()})


def _configured(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(env.get(ENDPOINT_ENV, "").strip() or env.get(TRACES_ENDPOINT_ENV, "").strip())


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
        service_name: the ``service.name`` resource attribute (``beach-rescue-relay``, …) unless
            ``OTEL_SERVICE_NAME`` says otherwise.
        environ: where to look for the ``OTEL_*`` switches (default ``os.environ``); the SDK and
            the OTLP exporter read the rest of the standard variables from ``os.environ`` themselves.
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
    if exporter is None and not _configured(env):
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
    # Resource.create() reads OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME; our default name goes
    # in only when the operator did not name the service; the sampler comes from OTEL_TRACES_SAMPLER.
    named = bool(env.get("OTEL_SERVICE_NAME", "").strip())
    provider = TracerProvider(resource=Resource.create({} if named else {"service.name": service_name}))
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
def traced_process(service_name: str) -> Iterator[bool]:
    """:func:`configure_tracing` from the environment for a command's lifetime, flushed at exit.

    Yields:
        Whether tracing is on. Leaving the block (normally or not) exports what is still batched.
    """
    try:
        yield configure_tracing(service_name)
    finally:
        shutdown_tracing()


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


@contextlib.contextmanager
def record_span(
    name: str, *, carrier: Mapping[str, str] | None = None, follow_caller: bool = True, **attributes: Any
) -> Iterator[RecordedSpan]:
    """A server span recorded when the ``with`` block ends, with what the block decided it may say.

    Args:
        name: the span name (``tokenservice.request``, ``relay.handshake``).
        carrier: the request's headers; a valid W3C ``traceparent`` in them becomes the parent if
            ``follow_caller`` is still true when the block ends.
        follow_caller: the starting value of :attr:`RecordedSpan.follow_caller`.
        **attributes: initial attributes (redacted like :func:`span`'s).

    Yields:
        The :class:`RecordedSpan` to add attributes and events to; :func:`current_record` returns it
        inside the block (so a request handler can annotate its router's span). While tracing is
        off it is still a real collector, only never exported (``trace_id`` stays ``None``).
        An ``Exception`` leaving the block marks the span as an error (type only) and propagates.
    """
    recorded = RecordedSpan(name, carrier, follow_caller)
    for key, value in attributes.items():
        recorded.set_attribute(key, value)
    token = _current_record.set(recorded)
    try:
        yield recorded
    except BaseException as exc:
        recorded.record_exception(exc)
        raise
    finally:
        _current_record.reset(token)
        recorded.end()


def new_record(name: str, **attributes: Any) -> RecordedSpan | None:
    """A :class:`RecordedSpan` started now and recorded by :meth:`RecordedSpan.end`; ``None`` while
    tracing is off (so a caller keeps nothing and pays one check)."""
    if _provider is None:
        return None
    recorded = RecordedSpan(name, None, False)
    for key, value in attributes.items():
        recorded.set_attribute(key, value)
    return recorded


def current_record() -> RecordedSpan | None:
    """The innermost :func:`record_span` of this task, if any."""
    return _current_record.get()


@contextlib.contextmanager
def outside_record() -> Iterator[None]:
    """No current record inside the block: start tasks that outlive a :func:`record_span` here.

    A trio task starts with a copy of its spawner's context, so a task started inside
    ``record_span`` keeps that record (its attributes, carrier and events) alive for as long as it
    runs, and :func:`current_record` there would name a span that has long ended. The relay starts
    each session's and connection's tasks from the handshake's record: ~0.7 KB per connection.
    """
    token = _current_record.set(None)
    try:
        yield
    finally:
        _current_record.reset(token)


def trace_headers() -> dict[str, str]:
    """``{"traceparent": …}`` (W3C) for the current span, to send on an outgoing request; ``{}`` when off."""
    if _provider is None:
        return {}
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return carrier
