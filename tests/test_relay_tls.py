"""A real relay serving ``wss://`` on the fast path (decision 0018), on 127.0.0.1 (port 0).

The relay terminates TLS itself over ``ssl.MemoryBIO`` (``rescue/websocket/_tls.py``), so its TLS
connections use the shared read poller, read-ahead and quiet sockets like plain ones. The clients
are the SDK's ``connect_websocket`` over :class:`trio.SSLStream` (an independent TLS stack on the
other end), with a self-signed certificate made here. Every test is bounded by ``trio.fail_after``
and waits for conditions (counters), never for time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from rescue._codes import CloseCode
from rescue.protocol import Kind, Role, encode_frame
from rescue.relay import Relay
from rescue.sessions import Link, PeerLink
from rescue.testing import SelfSignedTLS, TestKeys, TestPeer, peer_conn, relay_test_config, seq_frame
from rescue.websocket import POLLER_AVAILABLE, WebSocketConnection
from rescue.websocket._poller import QUIET_RCVLOWAT
from rescue.websocket._tls import TLSSocketStream

from .conftest import start_relay_process

pytestmark = pytest.mark.skipif(not POLLER_AVAILABLE, reason="the read poller needs select.epoll (Linux)")

TEST_TIMEOUT = 30


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost: (cert.pem, key.pem)."""
    tls = SelfSignedTLS.create(directory)
    return tls.cert_file, tls.key_file


async def wait_until(predicate: Callable[[], bool]) -> None:
    while not predicate():
        await trio.sleep(0.001)


@pytest.fixture
async def peers() -> AsyncIterator[list[TestPeer]]:
    made: list[TestPeer] = []
    yield made
    for peer in made:
        peer.abort()


class TLSRelay:
    def __init__(self, relay: Relay, url: str, keys: TestKeys, client: ssl.SSLContext) -> None:
        self.relay, self.url, self.keys, self.client = relay, url, keys, client

    async def connect(self, peers: list[TestPeer], session: str, role: str) -> TestPeer:
        peer = await TestPeer.connect(
            self.url, self.keys, session=session, role=role, ssl_context=self.client
        )
        peers.append(peer)
        return peer

    async def pair(self, peers: list[TestPeer], session: str = "t") -> tuple[TestPeer, TestPeer]:
        host = await self.connect(peers, session, "host")
        guest = await self.connect(peers, session, "guest")
        assert (await host.receive_peer_event()).event == "joined"
        return host, guest

    def stat(self, name: str) -> int | float:
        stats = self.relay.statistics()["read_poller"]
        assert stats is not None
        return stats[name]  # type: ignore[no-any-return]

    def both_parked(self) -> bool:
        return self.stat("registered") == 2 and self.stat("waiting") == 2


async def start_tls_relay(nursery: trio.Nursery, tmp_path: Path, **overrides: object) -> TLSRelay:
    cert, key = make_cert(tmp_path)
    keys = TestKeys()
    relay = Relay(relay_test_config(tls_cert=str(cert), tls_key=str(key), **overrides), keys=keys.ring)
    addresses = await nursery.start(relay.run)
    assert addresses.url.startswith("wss://")
    return TLSRelay(relay, addresses.url, keys, ssl.create_default_context(cafile=str(cert)))


def server_side(relay: Relay, session: str, role: Role) -> WebSocketConnection:
    transport = peer_conn(relay, session, role).link.handle.transport
    assert isinstance(transport, WebSocketConnection)
    return transport


def raw_socket(peer: TestPeer) -> trio.socket.SocketType:
    stream = peer.ws._stream  # the client's trio.SSLStream over TCP
    assert isinstance(stream, trio.SSLStream)
    assert isinstance(stream.transport_stream, trio.SocketStream)
    return stream.transport_stream.socket


# ------------------------------------------------------------------------------- data path


async def test_a_tls_session_pairs_and_forwards_byte_exact_through_the_poller(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        node = await start_tls_relay(nursery, tmp_path)
        relay = node.relay
        host, guest = await node.pair(peers)
        await wait_until(node.both_parked)  # TLS connections are registered with the poller
        for role in Role:
            tls = server_side(relay, "t", role)._stream
            assert isinstance(tls, TLSSocketStream)
        handled = node.stat("handled")
        seq = 0
        for size in (0, 1, 100, 1000, 16_000, 20_000, 60_000):  # (one record, several records)
            for sender, receiver in ((host, guest), (guest, host)):
                seq += 1
                await wait_until(node.both_parked)
                await sender.send(seq_frame(seq, size))
                assert await receiver.receive() == seq_frame(seq, size)
        for peer, beat_seq in ((host, 7), (guest, 8)):
            await wait_until(node.both_parked)
            beat = encode_frame(Kind.HEARTBEAT, seq=beat_seq)
            await peer.send(beat)
            assert await peer.receive() == beat
        # read-ahead decrypted and handled the one-at-a-time messages without waking readers
        assert node.stat("handled") >= handled + 14 + 2
        # a burst in a few writes: many records per read, full reads, byte-exact and in order
        burst = [seq_frame(1000 + i, (i * 7919) % 60_000) for i in range(120)]

        async def send_burst() -> None:
            for i in range(0, len(burst), 40):
                await host.send(*burst[i : i + 40])

        async with trio.open_nursery() as io:
            io.start_soon(send_burst)
            for message in burst:
                assert await guest.receive() == message
        assert relay.stats.messages_forwarded == 14 + len(burst)
        assert relay.stats.heartbeats_echoed == 2
        # a normal close: the partner hears PEER left, registrations end
        await host.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        await guest.aclose()
        await wait_until(lambda: node.stat("registered") == 0)
        assert relay.stats.internal_errors == 0


# ------------------------------------------------------------------------------- quiet mode


async def test_quiet_tls_connections_echo_heartbeats_and_wake_at_once_for_data(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        node = await start_tls_relay(nursery, tmp_path, heartbeat_s=1, quiet_after_s=0.5, quiet_tick_s=0.05)
        relay = node.relay
        host, guest = await node.pair(peers)
        await wait_until(node.both_parked)
        seq = 0

        async def heartbeat_round() -> None:
            nonlocal seq
            seq += 1
            beat = encode_frame(Kind.HEARTBEAT, seq=seq)
            for peer in (host, guest):
                await peer.send(beat)
            for peer in (host, guest):
                assert await peer.receive() == beat

        while node.stat("quiet") < 2:
            await heartbeat_round()
            await trio.sleep(0.05)
        # the mark holds back a lone heartbeat's record (18 + 22 bytes under TLS 1.3) and passes
        # the smallest real message's (34 + 22)
        for role in Role:
            conn = server_side(relay, "t", role)
            tls = conn._stream
            assert isinstance(tls, TLSSocketStream)
            assert tls.ssl_object.version() == "TLSv1.3"
            sock = tls.socket
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == QUIET_RCVLOWAT + 22
        # heartbeats from quiet peers are still echoed (collected by the looks)
        echoed = relay.stats.heartbeats_echoed
        looks = node.stat("looks")
        for _ in range(2):
            await heartbeat_round()
        assert relay.stats.heartbeats_echoed == echoed + 4
        assert node.stat("looks") > looks
        assert node.stat("quiet") == 2
        # closing quiet connections takes them out of the quiet set
        await host.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        await wait_until(lambda: node.stat("quiet") == 0)
        assert relay.stats.internal_errors == 0


async def quiet_tls_pair(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer], *, heartbeat_s: int
) -> tuple[TLSRelay, TestPeer, TestPeer, dict[TestPeer, Link[PeerLink]], int]:
    """A TLS session whose two connections are quiet: (node, host, guest, their links, the last
    heartbeat seq). The next look at either socket is ~``heartbeat_s`` away."""
    node = await start_tls_relay(
        nursery, tmp_path, heartbeat_s=heartbeat_s, quiet_after_s=0.3, quiet_tick_s=0.05
    )
    host, guest = await node.pair(peers)
    await wait_until(node.both_parked)
    relay = node.relay
    links = {host: peer_conn(relay, "t", Role.HOST).link, guest: peer_conn(relay, "t", Role.GUEST).link}
    seq = 0
    while node.stat("quiet") < 2:
        seq += 1
        beat = encode_frame(Kind.HEARTBEAT, seq=seq)
        # only peers not quiet yet: a quiet one's lone heartbeat would wait for its look
        for peer in [p for p, link in links.items() if not link.quiet]:
            await peer.send(beat)
            assert await peer.receive() == beat
        await trio.sleep(0.05)
    return node, host, guest, links, seq


async def test_the_first_tls_message_after_quiet_wakes_the_relay_at_once(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    """heartbeat_s=15: once quiet, the next look at either socket is ~15 s away, so a message that
    arrives now is delivered by a readiness event (past the raised mark), never by a look."""
    with trio.fail_after(TEST_TIMEOUT):
        node, host, guest, _, seq = await quiet_tls_pair(nursery, tmp_path, peers, heartbeat_s=15)
        relay = node.relay
        await wait_until(node.both_parked)
        events = node.stat("events")
        # one keystroke (a 1-byte plaintext + the 16-byte AEAD tag: 35 bytes framed, 57 as a TLS
        # 1.3 record) and the smallest real DATA (the tag alone: 34 and 56, the quiet mark)
        for size in (17, 16):
            seq += 1
            await host.send(seq_frame(seq, size))
            assert await guest.receive() == seq_frame(seq, size)
            seq += 1
            await guest.send(seq_frame(seq, size))
            assert await host.receive() == seq_frame(seq, size)
        assert node.stat("looks") == 0
        assert node.stat("events") > events
        assert node.stat("quiet") == 0
        assert relay.stats.messages_forwarded == 4
        assert relay.stats.internal_errors == 0


class SplitNextWrite:
    """The client's TCP stream under its TLS: the next write goes out as two segments, the second
    ``tail`` bytes long, with ``between()`` awaited in between (everything else passes through)."""

    def __init__(self, inner: trio.SocketStream, tail: int, between: Callable[[], Awaitable[None]]) -> None:
        self.inner, self.tail, self.between = inner, tail, between

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        tail, self.tail = self.tail, 0
        if tail:
            await self.inner.send_all(data[:-tail])
            await self.between()
            data = data[-tail:]
        await self.inner.send_all(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_the_tail_of_a_first_tls_record_split_below_the_quiet_mark_is_not_held_for_a_look(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    """As on plain TCP (test_relay_poller): a first record after quiet whose last segment is
    shorter than the quiet mark (56 bytes under TLS 1.3) wakes the relay at once, not at the
    socket's look ~30 s away; the first part holds no whole record, so nothing made it active."""
    with trio.fail_after(TEST_TIMEOUT):
        node, host, guest, links, seq = await quiet_tls_pair(nursery, tmp_path, peers, heartbeat_s=30)
        relay = node.relay
        server = server_side(relay, "t", Role.HOST)
        reads = server.statistics().reads
        stream = host.ws._stream
        assert isinstance(stream, trio.SSLStream)
        assert isinstance(stream.transport_stream, trio.SocketStream)

        async def first_part_read() -> None:
            await wait_until(lambda: server.statistics().reads > reads)

        tcp = stream.transport_stream
        stream.transport_stream = SplitNextWrite(tcp, 20, first_part_read)  # type: ignore[assignment]
        seq += 1
        await host.send(seq_frame(seq, 500))
        stream.transport_stream = tcp  # (the peers fixture closes it)
        with trio.fail_after(5):
            assert await guest.receive() == seq_frame(seq, 500)
        assert not links[host].quiet
        assert relay.stats.internal_errors == 0


# ------------------------------------------------------------------------------- failures


async def test_an_abrupt_tls_end_and_garbage_records_drop_only_that_peer(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    with trio.fail_after(TEST_TIMEOUT):
        node = await start_tls_relay(nursery, tmp_path)
        relay = node.relay
        # a peer whose TCP connection ends without close_notify
        host, guest = await node.pair(peers, "abrupt")
        await wait_until(node.both_parked)
        raw_socket(host).close()
        assert (await guest.receive_peer_event()).event == "left"
        assert relay.stats.transport_lost == 1
        # a peer that sends a TLS application-data record that does not decrypt
        host2, guest2 = await node.pair(peers, "garbage")
        await wait_until(lambda: node.stat("waiting") == 3)
        sock = raw_socket(guest2)
        await sock.send(b"\x17\x03\x03\x00\x20" + os.urandom(32))
        assert (await host2.receive_peer_event()).event == "left"
        assert relay.stats.transport_lost == 2
        # a client that speaks no TLS at all: dropped in the handshake
        with trio.socket.socket() as plain:
            await plain.connect(("127.0.0.1", relay_port(node)))
            await plain.send(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n\r\n")
            try:  # the relay ends the connection (perhaps after a TLS alert): EOF or a reset
                while await plain.recv(4096):
                    pass
            except ConnectionResetError:
                pass
        # the node is fine: the survivors still work, a new session pairs
        seq = 1
        await guest.send(seq_frame(seq, 10))  # guest's partner is gone: discarded, no error
        host3, guest3 = await node.pair(peers, "after")
        await host3.send(seq_frame(2, 500))
        assert await guest3.receive() == seq_frame(2, 500)
        assert relay.stats.internal_errors == 0


def relay_port(node: TLSRelay) -> int:
    return int(node.url.rsplit(":", 1)[1].split("/", 1)[0])


# ------------------------------------------------------------------------------- SIGTERM


async def test_a_tls_relay_process_drains_on_sigterm(tmp_path: Path) -> None:
    cert, key = make_cert(tmp_path)
    keys = TestKeys()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(keys.jwks()))
    proc, listening = await start_relay_process(
        jwks, tmp_path / "relay.log", "--drain-s", "3", "--node-id", "tls-node",
        "--tls-cert", str(cert), "--tls-key", str(key),
    )  # fmt: skip
    made: list[TestPeer] = []
    terminated = False
    try:
        url = str(listening["url"])
        assert url.startswith("wss://")
        client = ssl.create_default_context(cafile=str(cert))
        with trio.fail_after(20):
            host = await TestPeer.connect(
                url, keys, session="s", role="host", audience="tls-node", ssl_context=client
            )
            made.append(host)
            guest = await TestPeer.connect(url, keys, session="s", role="guest", ssl_context=client)
            made.append(guest)
            assert (await host.receive_peer_event()).event == "joined"
            frame = encode_frame(Kind.DATA, b"through TLS", seq=1)
            await host.send(frame)
            assert await guest.receive() == frame
            proc.send_signal(signal.SIGTERM)
            terminated = True
            closed = await guest.wait_closed()
        assert closed.wire_code == CloseCode.SERVER_SHUTDOWN
        assert closed.close is not None
        assert closed.close.reconnect_in_ms is not None
    finally:
        for peer in made:
            peer.abort()
        if not terminated:
            proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            code = await proc.wait()
    assert code == 0


async def test_without_the_poller_tls_still_takes_the_socket_path(
    nursery: trio.Nursery, tmp_path: Path, peers: list[TestPeer]
) -> None:
    """``--no-read-poller``: trio's waits per connection, the same MemoryBIO data path."""
    with trio.fail_after(TEST_TIMEOUT):
        node = await start_tls_relay(nursery, tmp_path, read_poller=False)
        relay = node.relay
        assert relay.poller is None
        host, guest = await node.pair(peers)
        assert isinstance(server_side(relay, "t", Role.HOST)._stream, TLSSocketStream)
        seq = 0
        for size in (0, 100, 20_000, 60_000):
            for sender, receiver in ((host, guest), (guest, host)):
                seq += 1
                await sender.send(seq_frame(seq, size))
                assert await receiver.receive() == seq_frame(seq, size)
        beat = encode_frame(Kind.HEARTBEAT, seq=99)
        await host.send(beat)
        assert await host.receive() == beat
        await host.aclose()
        assert (await guest.receive_peer_event()).event == "left"
        assert relay.stats.messages_forwarded == 8
        assert relay.stats.internal_errors == 0


def test_the_relays_tls_context_refuses_renegotiation(tmp_path: Path) -> None:
    from rescue.relay._relay import _load_tls

    cert, key = make_cert(tmp_path)
    context = _load_tls(relay_test_config(tls_cert=str(cert), tls_key=str(key)))
    assert context is not None
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert _load_tls(relay_test_config()) is None
