"""``/metrics`` for alerts: the read poller's counters, OpenMetrics on request, exemplars with tracing.

A real token service and a real relay (with its admin port and the read poller) on 127.0.0.1; two
SDK peers pair through them so there is something to count. Scraped over HTTP like Prometheus does.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import trio
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from rescue._tracing import configure_tracing, shutdown_tracing
from rescue.client import DataReceived, open_peer
from rescue.testing import TEST_PSK, DevStack, run_dev_stack
from rescue.websocket import POLLER_AVAILABLE

OPENMETRICS = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
POLLER_COUNTERS = (
    "beach_rescue_read_poller_wakeups",
    "beach_rescue_read_poller_events",
    "beach_rescue_read_poller_handled_inline",
    "beach_rescue_read_poller_task_wakeups",
    "beach_rescue_read_poller_moves",
)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert configure_tracing("beach-rescue-test", exporter=exporter)
    yield exporter
    shutdown_tracing()


async def _paired_echo(api_url: str, session: str) -> None:
    async with (
        open_peer(api_url, session, "host", psk=TEST_PSK) as host,
        open_peer(api_url, session, "guest", psk=TEST_PSK) as guest,
    ):
        await host.send(0, b"hello")
        got = await guest.receive()
        assert isinstance(got, DataReceived)
        assert got.data == b"hello"


def _relay_metrics_url(stack: DevStack) -> str:
    relay = stack.relay.relay
    assert relay is not None
    assert relay.addresses is not None
    return f"http://127.0.0.1:{relay.addresses.admin_port}/metrics"


async def _scrape(http: httpx.AsyncClient, url: str, accept: str | None) -> httpx.Response:
    headers = {"accept": accept} if accept else {}
    response = await http.get(url, headers=headers)
    assert response.status_code == 200
    return response


@pytest.mark.skipif(not POLLER_AVAILABLE, reason="the read poller needs epoll (Linux)")
async def test_poller_counters_and_text_by_default() -> None:
    with trio.fail_after(30):
        async with run_dev_stack(admin_port=0, read_poller=True) as stack, httpx.AsyncClient() as http:
            await _paired_echo(stack.api_url, "metrics-1")
            response = await _scrape(http, _relay_metrics_url(stack), None)
    assert response.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for f in parse_text(response.text) for s in f.samples}
    for name in POLLER_COUNTERS:
        assert f"{name}_total" in samples, name
    assert samples["beach_rescue_read_poller_events_total"] > 0  # the echo went through it
    assert (
        samples["beach_rescue_read_poller_handled_inline_total"]
        + samples["beach_rescue_read_poller_task_wakeups_total"]
        == samples["beach_rescue_read_poller_events_total"]
    )
    assert "beach_rescue_read_poller_quiet" in samples
    assert "beach_rescue_read_poller_looks_total" in samples
    assert "beach_rescue_read_poller_registered" in samples


async def test_openmetrics_with_trace_id_exemplars(spans: InMemorySpanExporter) -> None:
    with trio.fail_after(30):
        async with run_dev_stack(admin_port=0) as stack, httpx.AsyncClient() as http:
            await _paired_echo(stack.api_url, "metrics-2")
            relay = await _scrape(http, _relay_metrics_url(stack), OPENMETRICS)
            token = await _scrape(http, f"{stack.api_url}/metrics", OPENMETRICS)
            plain = await _scrape(http, f"{stack.api_url}/metrics", None)
    trace_ids = {format(s.context.trace_id, "032x") for s in spans.get_finished_spans() if s.context}
    for response, histogram in (
        (relay, "beach_rescue_handshake_duration_seconds"),
        (token, "beach_fallback_request_duration_seconds"),
    ):
        assert response.headers["content-type"].startswith("application/openmetrics-text")
        assert response.text.endswith("# EOF\n")
        exemplars = [
            s.exemplar
            for f in parse_openmetrics(response.text)
            if f.name == histogram
            for s in f.samples
            if s.exemplar is not None
        ]
        assert exemplars, histogram
        assert {e.labels["trace_id"] for e in exemplars} <= trace_ids
    assert plain.headers["content-type"].startswith("text/plain")
    assert "trace_id" not in plain.text  # the text format has no exemplars
