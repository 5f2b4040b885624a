"""``WebSocketConnection`` over :class:`TLSSocketStream` (decision 0018) on real 127.0.0.1 sockets.

The client side is a bare ``ssl.SSLObject`` driven by the test, so it controls the ciphertext
exactly: records cut at any byte (hypothesis), several records per write, a close_notify, or a
socket that stops reading (back-pressure on the server's encrypted writes).
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rescue.testing import SelfSignedTLS
from rescue.websocket import WebSocketClosedError, WebSocketConnection
from rescue.websocket._codec import FrameParser, TLSRecords, frame_messages
from rescue.websocket._poller import AVAILABLE, ReadPoller
from rescue.websocket._tls import TLSSocketStream, quiet_rcvlowat

TIMEOUT = 20


def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext, str]:
    tls = SelfSignedTLS.create(Path(tempfile.mkdtemp(prefix="rescue-tls-")))
    return tls.server_context(), tls.client_context(), tls.pem


SERVER_CTX, CLIENT_CTX, CLIENT_PEM = _contexts()


@dataclass
class RawClient:
    """The client end: a socket and an SSLObject whose ciphertext the test moves by hand."""

    sock: trio.socket.SocketType
    tls: ssl.SSLObject
    incoming: ssl.MemoryBIO
    outgoing: ssl.MemoryBIO

    async def send_raw(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            sent = await self.sock.send(view)
            view = view[sent:]

    def seal(self, *frames: bytes) -> bytes:
        for frame in frames:  # one record per frame (and more for frames over 16 KiB)
            self.tls.write(frame)
        return self.outgoing.read()

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.send_raw(self.outgoing.read())
                data = await self.sock.recv(65536)
                assert data, "server closed during the handshake"
                self.incoming.write(data)
        await self.send_raw(self.outgoing.read())

    async def receive_some(self) -> bytes:
        """Some plaintext (reading and decrypting as needed)."""
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                pass
            data = await self.sock.recv(65536)
            assert data, "server closed"
            self.incoming.write(data)


@asynccontextmanager
async def tls_connection(
    poller: ReadPoller | None = None,
    client_ctx: ssl.SSLContext = CLIENT_CTX,
    on_messages: Callable[[list[bytes]], bool] | None = None,
) -> AsyncIterator[tuple[WebSocketConnection, RawClient]]:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    client_sock = trio.socket.socket()
    await client_sock.connect(listener.getsockname())
    server_sock, _ = await listener.accept()
    listener.close()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = RawClient(
        client_sock, client_ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1"), incoming, outgoing
    )
    stream = TLSSocketStream(trio.SocketStream(server_sock), SERVER_CTX)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.do_handshake)
        nursery.start_soon(client.handshake)
    conn = WebSocketConnection(stream, client=False)
    if poller is not None:
        assert conn.use_poller(poller, on_messages)
    try:
        yield conn, client
    finally:
        conn.abort()
        client_sock.close()


async def collect(conn: WebSocketConnection, n: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        got += await conn.receive_messages()
    return got


# -------------------------------------------------------------------------------------- reads


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.integers(0, 40_000), min_size=1, max_size=8),
    cuts=st.lists(st.integers(1, 70_000), max_size=12),
    path=st.sampled_from(["trio", "poller", "read-ahead"] if AVAILABLE else ["trio"]),
)
def test_records_cut_anywhere_give_the_same_messages(sizes: list[int], cuts: list[int], path: str) -> None:
    """Ciphertext arriving in arbitrary pieces (partial records, many records per read) decrypts to
    the same messages in order: through trio's waits, the poller's waits, and the poller's
    read-ahead (which decrypts in the poller's task and may take a batch without waking anyone)."""
    payloads = [os.urandom(size) for size in sizes]
    stream: list[bytes] = []  # every message as it reached someone, read-ahead and reader alike
    offers = 0

    def take_all_but_the_first(batch: list[bytes]) -> bool:
        nonlocal offers
        offers += 1
        if offers == 1:
            return False  # the first left to the waiting reader (it is woken with this batch)
        stream.extend(batch)  # handled in the poller's task: the reader stays parked
        if len(stream) >= len(payloads):
            done.set()
        return True

    done = trio.Event()

    async def read_all(conn: WebSocketConnection) -> None:
        while len(stream) < len(payloads):
            stream.extend(await conn.receive_messages())
        done.set()

    async def main() -> None:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                poller = None
                if path != "trio":
                    poller = ReadPoller()
                    await nursery.start(poller.run)
                read_ahead = take_all_but_the_first if path == "read-ahead" else None
                async with tls_connection(poller, on_messages=read_ahead) as (conn, client):
                    wire = client.seal(*(frame_messages([p], mask=True) for p in payloads))
                    points = sorted({c % len(wire) for c in cuts} - {0})
                    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]

                    async def send() -> None:
                        for piece in pieces:
                            # the reader parked again (in the poller: read-ahead is offered this piece)
                            await trio.testing.wait_all_tasks_blocked()
                            await client.send_raw(piece)

                    nursery.start_soon(send)
                    nursery.start_soon(read_all, conn)
                    await done.wait()
                    assert stream == payloads
                    nursery.cancel_scope.cancel()  # (the reader may still wait: read-ahead took the end)

    trio.run(main)


async def test_close_notify_and_a_tcp_end_are_a_close_without_a_close_frame() -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_connection() as (conn, client):
            await client.send_raw(client.seal(frame_messages([b"last"], mask=True)))
            with pytest.raises(ssl.SSLWantReadError):
                client.tls.unwrap()  # our close_notify (it would wait for the server's)
            await client.send_raw(client.outgoing.read())
            assert await conn.receive_messages() == [b"last"]
            with pytest.raises(WebSocketClosedError) as info:
                await conn.receive_messages()
            assert info.value.wire_code is None
            with pytest.raises(WebSocketClosedError):  # the end is sticky
                await conn.receive_messages()
        async with tls_connection() as (conn, client):
            client.sock.close()  # no close_notify at all
            with pytest.raises(WebSocketClosedError) as info:
                await conn.receive_messages()
            assert info.value.wire_code is None


async def test_a_record_that_does_not_decrypt_is_a_transport_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with tls_connection() as (conn, client):
            await client.send_raw(b"\x17\x03\x03\x00\x20" + os.urandom(32))
            with pytest.raises(WebSocketClosedError) as info:
                await conn.receive_messages()
            assert info.value.wire_code is None
            assert "transport error" in info.value.reason
            assert conn.closed


# ------------------------------------------------------------------------------------- writes


async def test_encrypted_writes_under_back_pressure_arrive_whole_and_in_order() -> None:
    """send_nowait on a full socket keeps the records it made (has_unsent); flush writes them once
    the client reads; a close then ends with the close frame and close_notify."""
    with trio.fail_after(TIMEOUT):
        async with tls_connection() as (conn, client):
            payloads: list[bytes] = []
            while not conn.has_unsent:  # the client reads nothing: the socket fills
                payload = os.urandom(30_000)
                assert conn.send_nowait([payload])  # under TLS: always ours once encrypted
                payloads.append(payload)
            assert conn.send_nowait([b"x"]) is False  # the tail must go first
            payloads.append(b"after")
            async with trio.open_nursery() as nursery:

                async def write_rest() -> None:
                    await conn.flush()
                    await conn.send_message(b"after")

                nursery.start_soon(write_rest)
                parser = FrameParser(client=True, max_message=1 << 20)
                got: list[bytes] = []
                while len(got) < len(payloads):
                    got += [e for e in parser.feed(await client.receive_some()) if isinstance(e, bytes)]
            assert got == payloads
            assert not conn.has_unsent


@pytest.mark.parametrize(
    ("version", "ciphers", "mark"),
    [
        ("TLSv1.3", None, 56),  # 5-byte header + content type + 16-byte tag
        ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256", 63),  # + 8-byte explicit nonce
        ("TLSv1.2", "ECDHE-ECDSA-CHACHA20-POLY1305", 55),
        ("TLSv1.2", "ECDHE-ECDSA-AES128-SHA256", None),  # CBC: padded, no fixed overhead
    ],
)
async def test_the_quiet_mark_follows_the_negotiated_record_overhead(
    version: str, ciphers: str | None, mark: int | None
) -> None:
    client_ctx = ssl.create_default_context(cadata=CLIENT_PEM)
    if version == "TLSv1.2":
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if ciphers:
        client_ctx.set_ciphers(ciphers + ":@SECLEVEL=0")
    with trio.fail_after(TIMEOUT):
        async with tls_connection(client_ctx=client_ctx) as (conn, client):
            stream = conn._stream
            assert isinstance(stream, TLSSocketStream)
            assert stream.ssl_object.version() == version
            assert quiet_rcvlowat(stream.ssl_object, 34) == mark
            if mark is not None:  # the arithmetic, checked on real records: 18 below, 34 at it
                assert len(client.seal(b"h" * 18)) == mark - 16
                assert len(client.seal(b"d" * 34)) == mark


@given(
    lengths=st.lists(st.integers(0, 20_000), max_size=12),
    cuts=st.lists(st.integers(0, 250_000), max_size=20),
)
def test_tls_records_knows_at_every_cut_whether_a_record_is_partly_in(
    lengths: list[int], cuts: list[int]
) -> None:
    """The record tracker of decision 0015's quiet mark: records of any length (headers included)
    fed in pieces cut at any byte; after each piece ``partial`` says whether the bytes so far end
    inside a record (a header's first bytes count)."""
    stream = b"".join(bytes([0x17, 3, 3]) + n.to_bytes(2, "big") + os.urandom(n) for n in lengths)
    ends = set()
    at = 0
    for n in lengths:
        at += 5 + n
        ends.add(at)
    records = TLSRecords()
    assert not records.partial
    done = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        if cut < done:
            continue
        records.fed(memoryview(stream)[done:cut])
        done = cut
        assert records.partial == (done not in ends and done != 0)


@given(lengths=st.lists(st.integers(0, 40), max_size=8))
def test_tls_records_fed_byte_by_byte_is_exact_at_every_byte(lengths: list[int]) -> None:
    """Small records one byte at a time: every position of every header and body is a cut."""
    records = TLSRecords()
    for n in lengths:
        record = bytes([0x16, 3, 1]) + n.to_bytes(2, "big") + bytes(n)
        for i in range(len(record)):
            records.fed(record[i : i + 1])
            assert records.partial == (i < len(record) - 1)
