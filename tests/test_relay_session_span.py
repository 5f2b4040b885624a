"""The relay's ``relay.session`` span: one per session, its lifecycle as events, tied to its handshakes.

A real relay on 127.0.0.1 with tracing on (an in-memory exporter); peers speak HELLO with tokens
whose ``fb`` bit 0 (analytics) is set or not. The span is recorded when the session ends; it is the
child of the handshake that created the session and links to the later ones; nothing of it exists
for a session any of whose peers opted out; and a peer's CLOSE reason is scrubbed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import trio
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from rescue._log import session_tag
from rescue._tracing import configure_tracing, shutdown_tracing
from rescue.protocol import Close, CloseCode
from rescue.testing import TestKeys, TestPeer, start_test_relay

TIMEOUT = 20
ANALYTICS = 1  # token feature bit 0


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exp = InMemorySpanExporter()
    assert configure_tracing("beach-rescue-relay-test", exporter=exp)
    yield exp
    shutdown_tracing()


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _events(span: ReadableSpan) -> list[tuple[str, dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events]


async def _connect(url: str, keys: TestKeys, session: str, role: str, fb: int) -> TestPeer:
    return await TestPeer.connect(url, session=session, role=role, token=keys.mint(session, role, fb=fb))


async def _wait_for(exporter: InMemorySpanExporter, name: str, count: int) -> list[ReadableSpan]:
    while len(found := _named(exporter, name)) < count:
        await trio.sleep(0.01)
    return found


async def test_session_span_carries_the_lifecycle_and_ties_to_its_handshakes(
    exporter: InMemorySpanExporter,
) -> None:
    secret = secrets.token_urlsafe(32)  # token-shaped: must not survive in the close reason
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            _, url, keys = await start_test_relay(nursery)
            host = await _connect(url, keys, "span-1", "host", ANALYTICS)
            guest = await _connect(url, keys, "span-1", "guest", ANALYTICS)
            assert (await host.receive_peer_event()).event == "joined"
            guest.abort()  # the guest's transport dies: PEER left, the resume grace runs
            assert (await host.receive_peer_event()).event == "left"
            guest = await _connect(url, keys, "span-1", "guest", ANALYTICS)
            assert (await host.receive_peer_event()).event == "rejoined"
            await host.send(Close(CloseCode.NORMAL, f"bye {secret}").to_message())
            await host.wait_closed()
            await guest.wait_closed()
            (session,) = await _wait_for(exporter, "relay.session", 1)
            nursery.cancel_scope.cancel()

    handshakes = {s.context.span_id: s for s in _named(exporter, "relay.handshake")}
    assert len(handshakes) == 3
    assert session.attributes is not None
    assert session.attributes["session"] == session_tag("span-1")
    assert session.attributes["node"] == "test-node"
    assert session.attributes["cohort"] == "test"
    assert session.attributes["paired"] is True
    assert session.attributes["close_code"] == 1000
    # child of the host's handshake (it created the session); links to the guest's two
    assert session.parent is not None
    creator = handshakes[session.parent.span_id]
    assert creator.attributes is not None
    assert creator.attributes["role"] == "host"
    assert session.context.trace_id == creator.context.trace_id
    linked = {(link.context.span_id, (link.attributes or {})["role"]) for link in session.links}
    assert linked == {(span_id, "guest") for span_id in handshakes if span_id != creator.context.span_id}

    events = _events(session)
    names = [name for name, _ in events]
    assert names[:3] == ["joined", "joined", "paired"]
    assert [f["role"] for name, f in events if name == "joined"] == ["host", "guest"]
    assert ("closed", {"role": "guest", "transport_lost": True}) in events
    assert ("left", {"role": "guest"}) in events
    assert ("rejoined", {"role": "guest"}) in events
    assert ("peer_closed", {"role": "host", "code": 1000}) in events
    closed = [f for name, f in events if name == "closed" and "code" in f]
    assert {f["role"] for f in closed} == {"host", "guest"}
    for fields in closed:
        assert fields["code"] == 1000
        assert fields["reason"].startswith("bye ")
        assert secret not in fields["reason"]
    # nothing per frame: a handful of events, not one per message
    assert len(events) <= 10
    assert "span-1" not in repr(session.to_json())


@pytest.mark.parametrize(("host_fb", "guest_fb"), [(0, 0), (ANALYTICS, 0), (0, ANALYTICS)])
async def test_no_session_span_when_any_peer_opted_out(
    exporter: InMemorySpanExporter, host_fb: int, guest_fb: int
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay, url, keys = await start_test_relay(nursery)
            host = await _connect(url, keys, "private-1", "host", host_fb)
            guest = await _connect(url, keys, "private-1", "guest", guest_fb)
            assert (await host.receive_peer_event()).event == "joined"
            await host.send(Close(CloseCode.NORMAL, "done").to_message())
            await host.wait_closed()
            await guest.wait_closed()
            while relay.table.get("private-1") is not None:
                await trio.sleep(0.01)
            await _wait_for(exporter, "relay.handshake", 2)
            nursery.cancel_scope.cancel()
    assert _named(exporter, "relay.session") == []
    # each handshake span follows its own token (as before): only the opted-in peer's names the session
    tagged = [s for s in _named(exporter, "relay.handshake") if "session" in (s.attributes or {})]
    assert len(tagged) == (host_fb + guest_fb)


async def test_no_session_span_while_tracing_is_off() -> None:
    shutdown_tracing()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            relay, url, keys = await start_test_relay(nursery)
            host = await _connect(url, keys, "off-1", "host", ANALYTICS)
            session = relay.table.get("off-1")
            assert session is not None
            assert session.span is None
            await host.aclose()
            nursery.cancel_scope.cancel()
