"""Fragment and tiny-frame floods against a real relay over real sockets (issue 11).

Each flood comes from a :class:`~rescue.testing.RawClient` that writes raw frames while reading the
relay's answer: the relay must close that one connection with PROTOCOL_ERROR (4010), count it by
kind, and keep serving the session streaming beside it.
"""

from __future__ import annotations

import os
import struct

import trio

from rescue._codes import CloseCode
from rescue.protocol import NONCE_SIZE, Caps, Hello, Kind, Role, encode_frame
from rescue.relay import Relay
from rescue.testing import RawClient, TestKeys, TestPeer, seq_frame, start_test_relay
from rescue.websocket import MAX_FRAGMENTS, Opcode, build_frame

TEST_TIMEOUT = 60
# Far more than any budget allows: a relay that never closes the flood fails the test by the
# flood running out (the relay answered nothing) rather than by a hang.
FLOOD_LIMIT = 64 << 20


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", 1)[0])


def _hello(keys: TestKeys, session: str, role: str) -> bytes:
    hello = Hello(
        token=keys.mint(session, role),
        session=session,
        role=Role(role),
        nonce=os.urandom(NONCE_SIZE),
        caps=Caps(("zlib",)),
    )
    return build_frame(Opcode.BINARY, hello.to_message(), mask=True)


async def _flood(
    url: str, chunk: bytes, *, hello: bytes = b"", first: bytes = b"", repeat: int = 2000
) -> RawClient:
    """Connect, optionally HELLO and wait for the WELCOME, then flood ``chunk``."""
    client = await RawClient.connect("127.0.0.1", _port(url))
    if hello:
        assert await client.send(hello)
        welcome = await client.expect_message()
        assert welcome[1] == Kind.WELCOME
    await client.flood(chunk * repeat, limit=FLOOD_LIMIT, first=first)
    await client.aclose()
    return client


def _assert_closed_for(client: RawClient, relay: Relay, kind: str) -> None:
    outcome = client.outcome
    assert outcome.wire_code == CloseCode.PROTOCOL_ERROR, outcome
    assert outcome.close is not None
    assert outcome.close.code == CloseCode.PROTOCOL_ERROR
    assert relay.stats.protocol_errors.get(kind, 0) >= 1, relay.stats.protocol_errors
    assert outcome.sent < FLOOD_LIMIT


async def test_unauthenticated_fragment_flood_is_closed(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, _keys = await start_test_relay(nursery)
        first = build_frame(Opcode.BINARY, b"\x01", mask=True, fin=False)
        empty = build_frame(Opcode.CONTINUATION, b"", mask=True, fin=False)
        client = await _flood(url, empty, first=first)
        _assert_closed_for(client, relay, "fragments")
        assert "fragments" in client.outcome.close.reason if client.outcome.close else False
        text, _ = relay.metrics.render()
        assert b'beach_rescue_protocol_errors_total{reason="fragments"} 1.0' in text


async def test_a_message_in_max_fragments_still_reaches_the_partner(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery)
        guest = await TestPeer.connect(url, keys, session="frag", role="guest")
        host = await RawClient.connect("127.0.0.1", _port(url))
        message = seq_frame(1, 4 * MAX_FRAGMENTS - 12)
        pieces = [message[i : i + 4] for i in range(0, len(message), 4)]
        assert len(pieces) == MAX_FRAGMENTS
        last = len(pieces) - 1
        wire = _hello(keys, "frag", "host") + b"".join(
            build_frame(Opcode.BINARY if i == 0 else Opcode.CONTINUATION, p, mask=True, fin=i == last)
            for i, p in enumerate(pieces)
        )
        assert await host.send(wire)
        assert (await guest.receive_peer_event()).event == "joined"
        assert await guest.receive() == message
        assert relay.stats.protocol_errors == {}
        await host.aclose()
        await guest.aclose()


async def test_ping_flood_is_closed_before_the_hello(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, _keys = await start_test_relay(nursery)
        client = await _flood(url, build_frame(Opcode.PING, b"", mask=True))
        _assert_closed_for(client, relay, "small_frames")


async def test_a_2_to_the_63_length_header_is_a_protocol_error(nursery: trio.Nursery) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, _keys = await start_test_relay(nursery)
        client = await RawClient.connect("127.0.0.1", _port(url))
        assert await client.send(b"\x82\xff" + struct.pack(">Q", 1 << 63) + os.urandom(4))
        outcome = await client.finish()
        await client.aclose()
        assert outcome.wire_code == CloseCode.PROTOCOL_ERROR
        assert relay.stats.protocol_errors == {"protocol": 1}


async def test_heartbeat_and_empty_message_floods_in_a_session_spare_the_session_beside_them(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        relay, url, keys = await start_test_relay(nursery)
        host = await TestPeer.connect(url, keys, session="calm", role="host")
        guest = await TestPeer.connect(url, keys, session="calm", role="guest")
        assert (await host.receive_peer_event()).event == "joined"
        total = 400
        received: list[bytes] = []

        async def stream() -> None:
            for seq in range(1, total + 1):
                await host.send(seq_frame(seq, 2000))
                await trio.sleep(0.002)

        async def collect() -> None:
            while len(received) < total:
                received.append(await guest.receive())

        async with trio.open_nursery() as io:
            io.start_soon(stream)
            io.start_soon(collect)
            heartbeat = build_frame(Opcode.BINARY, encode_frame(Kind.HEARTBEAT, seq=7), mask=True)
            beats = await _flood(url, heartbeat, hello=_hello(keys, "loud", "host"))
            _assert_closed_for(beats, relay, "small_frames")
            # in the session (WELCOME came), then closed: one 64 KiB read of them is over budget
            empty = build_frame(Opcode.BINARY, b"", mask=True)
            empties = await _flood(url, empty, hello=_hello(keys, "e", "host"))
            assert empties.outcome.wire_code == CloseCode.PROTOCOL_ERROR
        assert received == [seq_frame(seq, 2000) for seq in range(1, total + 1)]
        assert relay.stats.internal_errors == 0
        await host.aclose()
        await guest.aclose()
