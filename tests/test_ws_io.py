"""The trio WebSocket shell on real sockets (127.0.0.1, port 0), against independent implementations.

Independent peers: the ``websockets`` library's sync client (run in a worker thread) and
``trio-websocket`` (client and server). Every test is bounded by ``trio.fail_after``; timeouts are
tested with the autojump clock.
"""

from __future__ import annotations

import functools
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosedError as WsConnectionClosedError
from websockets.sync.client import connect as ws_sync_connect

from rescue._codes import CloseCode
from rescue._net import ACCEPT_BATCH
from rescue.errors import ConnectionClosedError, ProtocolError
from rescue.testing import SelfSignedTLS
from rescue.websocket import (
    CLOSE_TIMEOUT,
    CloseFrameReceived,
    ConnectionCap,
    Event,
    FrameParser,
    HandshakeError,
    Opcode,
    Pong,
    Rejection,
    Request,
    WebSocketClosedError,
    WebSocketConnection,
    WebSocketServer,
    build_frame,
    build_request,
    connect_websocket,
    frame_binary,
    frame_close,
    frame_messages,
    new_key,
    serve_websocket,
)
from rescue.websocket._connection import _rest

TIMEOUT = 10  # seconds for any one network test on a loaded 2-core machine
Handler = Callable[[WebSocketConnection], Awaitable[None]]


async def echo(conn: WebSocketConnection) -> None:
    while True:
        await conn.send_messages(await conn.receive_messages())


@asynccontextmanager
async def running(handler: Handler, **kwargs: object) -> AsyncIterator[WebSocketServer]:
    async with trio.open_nursery() as nursery:
        server: WebSocketServer = await nursery.start(
            functools.partial(serve_websocket, handler, "127.0.0.1", 0, **kwargs)
        )
        yield server
        nursery.cancel_scope.cancel()


def url(server: WebSocketServer, path: str = "/v1/connect", scheme: str = "ws") -> str:
    return f"{scheme}://127.0.0.1:{server.port}{path}"


async def receive_n(conn: WebSocketConnection, n: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        got += await conn.receive_messages()
    return got


async def raw_upgrade(port: int, path: str = "/v1/connect") -> tuple[trio.SocketStream, bytes]:
    """A plain TCP client that performs the upgrade by hand; returns the stream and extra bytes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(build_request(f"127.0.0.1:{port}", path, new_key()))
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(4096)
        assert chunk, "server closed during the handshake"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    return stream, rest


async def read_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    out = b""
    while chunk := await stream.receive_some(65536):
        out += chunk
    return out


async def events_until_eof(stream: trio.abc.Stream) -> list[Event]:
    """Parse what the server sends; answer its close frame like a client must; stop at EOF."""
    parser = FrameParser(client=True)
    events: list[Event] = []
    while chunk := await stream.receive_some(65536):
        for event in parser.feed(chunk):
            events.append(event)
            if isinstance(event, CloseFrameReceived):
                await stream.send_all(frame_close(event.code, event.reason, mask=True))
    return events


# ------------------------------------------------------------------- the websockets library


async def test_websockets_client_round_trip_ping_and_close() -> None:
    seen: list[BaseException] = []

    async def handler(conn: WebSocketConnection) -> None:
        try:
            await echo(conn)
        except ConnectionClosedError as exc:
            seen.append(exc)
            raise

    def client(uri: str) -> tuple[list[bytes], object, float]:
        with ws_sync_connect(uri, max_size=None, compression="deflate") as ws:
            ws.send(b"\x01" * 10)
            ws.send(b"\x02" * 70)
            ws.send(b"\x03" * 60_000)
            got = [ws.recv(), ws.recv(), ws.recv()]
            latency = ws.ping(b"hi").wait(5)
            extensions = ws.protocol.extensions
        assert isinstance(latency, bool)
        return got, extensions, ws.close_code or 0  # type: ignore[return-value]

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            got, extensions, close_code = await trio.to_thread.run_sync(client, url(server))
            assert got == [b"\x01" * 10, b"\x02" * 70, b"\x03" * 60_000]
            assert extensions == []  # permessage-deflate was offered and refused
            assert close_code == 1000
            with trio.fail_after(2):
                while not seen:
                    await trio.sleep(0.01)
    [error] = seen
    assert isinstance(error, WebSocketClosedError)
    assert (error.code, error.wire_code) == (CloseCode.NORMAL, 1000)


def _ws_client_expecting_close(uri: str, message: str | bytes) -> tuple[int | None, str | None]:
    with ws_sync_connect(uri) as ws:
        ws.send(message)
        try:
            ws.recv(timeout=5)
        except WsConnectionClosedError as exc:
            rcvd = exc.rcvd
        else:
            rcvd = None
    return (rcvd.code, rcvd.reason) if rcvd is not None else (None, None)


async def test_text_message_closes_with_protocol_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(echo) as server:
            code, reason = await trio.to_thread.run_sync(_ws_client_expecting_close, url(server), "text!")
    assert code == CloseCode.PROTOCOL_ERROR == 4010
    assert reason is not None
    assert "text" in reason


async def test_oversize_message_closes_with_protocol_error() -> None:
    with trio.fail_after(TIMEOUT):
        async with running(echo, max_message=1000) as server:
            code, _ = await trio.to_thread.run_sync(_ws_client_expecting_close, url(server), b"x" * 1001)
    assert code == 4010


async def test_peer_close_code_outside_our_table_is_kept_raw() -> None:
    seen: list[WebSocketClosedError] = []

    async def handler(conn: WebSocketConnection) -> None:
        try:
            await conn.receive_messages()
        except WebSocketClosedError as exc:
            seen.append(exc)

    def client(uri: str) -> None:
        with ws_sync_connect(uri) as ws:
            ws.close(1001, "going away")

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            await trio.to_thread.run_sync(client, url(server))
            with trio.fail_after(2):
                while not seen:
                    await trio.sleep(0.01)
    assert (seen[0].code, seen[0].wire_code, seen[0].reason) == (None, 1001, "going away")


# ------------------------------------------------------------------------------ trio-websocket


async def test_our_client_against_trio_websocket_server() -> None:
    closed: list[int | None] = []

    async def handler(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        assert request.headers  # our handshake parsed by wsproto/h11
        try:
            while True:
                await ws.send_message(await ws.get_message())
        except trio_websocket.ConnectionClosed as exc:
            closed.append(exc.reason.code if exc.reason else None)

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(trio_websocket.serve_websocket, handler, "127.0.0.1", 0, None)
            port = server.port
            async with await connect_websocket(f"ws://127.0.0.1:{port}/anything") as conn:
                batch = [bytes([i]) * (i * 500) for i in range(1, 8)]
                await conn.send_messages(batch)
                assert await receive_n(conn, len(batch)) == batch
                stats = conn.statistics()
                assert stats.messages_out == len(batch)
                assert stats.messages_in == len(batch)
            assert conn.closed
            with trio.fail_after(2):
                while not closed:
                    await trio.sleep(0.01)
            assert closed == [1000]
            nursery.cancel_scope.cancel()


async def test_trio_websocket_client_ping_is_answered() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await echo(conn)

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server, trio_websocket.open_websocket_url(url(server)) as ws:
            await ws.send_message(b"hello")
            assert await ws.get_message() == b"hello"
            with trio.fail_after(2):
                await ws.ping(b"are you there")  # returns once the matching pong arrived


async def test_server_close_code_and_reason_reach_the_websockets_client() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await conn.receive_messages()
        await conn.close(CloseCode.REPLACED, "replaced by a newer connection")

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            code, reason = await trio.to_thread.run_sync(_ws_client_expecting_close, url(server), b"hi")
    assert (code, reason) == (4011, "replaced by a newer connection")


# --------------------------------------------------------------------------------- behaviours


async def test_batching_returns_every_message_of_one_read() -> None:
    batches: list[list[bytes]] = []

    async def handler(conn: WebSocketConnection) -> None:
        batches.append(await conn.receive_messages())

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            stream, _ = await raw_upgrade(server.port)
            async with stream:
                payloads = [b"m%d" % i for i in range(50)]
                await stream.send_all(frame_messages(payloads, mask=True))
                assert await events_until_eof(stream) == [
                    CloseFrameReceived(1000, "")
                ]  # the handler returned: the server closed the socket
            assert batches == [payloads]


async def test_frames_sent_with_the_upgrade_request_are_not_lost() -> None:
    got: list[bytes] = []

    async def handler(conn: WebSocketConnection) -> None:
        got.extend(await conn.receive_messages())

    with trio.fail_after(TIMEOUT):
        async with (
            running(handler) as server,
            await trio.open_tcp_stream("127.0.0.1", server.port) as stream,
        ):
            request = build_request("x", "/v1/connect", new_key())
            await stream.send_all(request + frame_binary(b"early", True))
            assert (await stream.receive_some(4096)).startswith(b"HTTP/1.1 101 ")
            assert await events_until_eof(stream) == [CloseFrameReceived(1000, "")]
    assert got == [b"early"]


async def test_messages_before_a_close_frame_are_delivered_then_close_is_reported() -> None:
    results: list[object] = []

    async def handler(conn: WebSocketConnection) -> None:
        results.append(await conn.receive_messages())
        try:
            await conn.receive_messages()
        except WebSocketClosedError as exc:
            results.append(exc.code)

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            stream, _ = await raw_upgrade(server.port)
            async with stream:
                close = build_frame(Opcode.CLOSE, (4013).to_bytes(2, "big") + b"gone", mask=True)
                await stream.send_all(frame_binary(b"last words", True) + close)
                reply = await read_until_eof(stream)
    assert results == [[b"last words"], CloseCode.PEER_GONE]
    # The server echoed the close code, then closed TCP.
    assert FrameParser(client=True).feed(reply) == [CloseFrameReceived(4013, "gone")]


async def test_ping_gets_a_pong_with_the_same_payload() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        await conn.receive_messages()

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            stream, _ = await raw_upgrade(server.port)
            async with stream:
                await stream.send_all(build_frame(Opcode.PING, b"p1", mask=True) + frame_binary(b"x", True))
                events = await events_until_eof(stream)
    assert events == [Pong(b"p1"), CloseFrameReceived(1000, "")]


async def test_eof_without_close_frame_is_an_abnormal_closure() -> None:
    seen: list[WebSocketClosedError] = []

    async def handler(conn: WebSocketConnection) -> None:
        try:
            await conn.receive_messages()
        except WebSocketClosedError as exc:
            seen.append(exc)

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            stream, _ = await raw_upgrade(server.port)
            await stream.aclose()
            with trio.fail_after(2):
                while not seen:
                    await trio.sleep(0.01)
    assert seen[0].code is None
    assert seen[0].wire_code is None


async def test_handler_exception_does_not_kill_the_server() -> None:
    calls = 0

    async def handler(conn: WebSocketConnection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo(conn)

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            with pytest.raises(WebSocketClosedError) as info:
                async with await connect_websocket(url(server)) as conn:
                    await conn.receive_messages()
            assert info.value.wire_code == 1011
            async with await connect_websocket(url(server)) as conn:
                await conn.send_message(b"still alive")
                assert await conn.receive_messages() == [b"still alive"]


async def test_handler_protocol_error_closes_with_its_code() -> None:
    async def handler(conn: WebSocketConnection) -> None:
        raise ProtocolError("bad HELLO", CloseCode.INTEGRITY_ERROR)

    with trio.fail_after(TIMEOUT):
        async with running(handler) as server:
            conn = await connect_websocket(url(server))
            with pytest.raises(WebSocketClosedError) as info:
                await conn.receive_messages()
            assert info.value.code == CloseCode.INTEGRITY_ERROR
            assert conn.closed


async def test_http_level_refusals() -> None:
    async def check(request: Request, remote: tuple[str, int] | None) -> Rejection | None:
        assert remote is not None
        assert remote[0] == "127.0.0.1"
        if request.header("x-drain"):
            return Rejection(503, "draining", "this node is shutting down")
        return None

    with trio.fail_after(TIMEOUT):
        async with running(echo, accept_check=check) as server:
            with pytest.raises(HandshakeError) as info:
                await connect_websocket(url(server), headers=[("X-Drain", "1")])
            assert (info.value.status, info.value.error) == (503, "draining")
            with pytest.raises(HandshakeError) as info:
                await connect_websocket(url(server, "/elsewhere"))
            assert info.value.status == 404
            async with await connect_websocket(url(server)) as conn:  # still serving
                await conn.send_message(b"ok")
                assert await conn.receive_messages() == [b"ok"]


async def test_server_metadata_and_statistics() -> None:
    seen: list[WebSocketConnection] = []

    async def handler(conn: WebSocketConnection) -> None:
        seen.append(conn)
        await echo(conn)

    with trio.fail_after(TIMEOUT):
        async with (
            running(handler) as server,
            await connect_websocket(url(server) + "?a=1", headers=[("X-Test", "yes")]) as conn,
        ):
            await conn.send_messages([b"a" * 100, b"b" * 200])
            await receive_n(conn, 2)
            server_conn = seen[0]
            assert server_conn.path == "/v1/connect"
            assert ("x-test", "yes") in server_conn.request_headers
            assert server_conn.remote_addr is not None
            assert server_conn.remote_addr[0] == "127.0.0.1"
            stats = server_conn.statistics()
            assert stats.messages_in == stats.messages_out == 2
            assert stats.bytes_in == (2 + 4 + 100) + (4 + 4 + 200)  # masked: 4-byte key per frame
            assert stats.bytes_out == (2 + 100) + (4 + 200)
            assert stats.buffered == 0


async def test_concurrent_senders_are_refused() -> None:
    left, right = trio.testing.lockstep_stream_pair()
    conn = WebSocketConnection(left, client=False)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.send_message, b"first")  # blocks: nobody reads the lockstep stream
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BusyResourceError):
                await conn.send_message(b"second")
            assert await right.receive_some(100) == frame_binary(b"first", False)


async def test_pong_waits_behind_an_active_send_and_never_splits_a_frame() -> None:
    """Generic-stream path: a ping arriving mid-send is answered right after the batch."""
    # A full-duplex connection out of two lockstep pipes (send_all blocks until the peer reads).
    a_send, b_recv = trio.testing.lockstep_stream_pair()
    b_send, a_recv = trio.testing.lockstep_stream_pair()
    conn = WebSocketConnection(trio.StapledStream(a_send, a_recv), client=False)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            big = b"d" * 30_000
            nursery.start_soon(conn.send_message, big)
            nursery.start_soon(conn.receive_messages)
            await trio.testing.wait_all_tasks_blocked()
            await b_send.send_all(build_frame(Opcode.PING, b"ping!", mask=True))
            await trio.testing.wait_all_tasks_blocked()
            parser = FrameParser(client=True)
            events: list[object] = []
            while len(events) < 2:
                events += parser.feed(await b_recv.receive_some(65536))
            assert events == [big, Pong(b"ping!")]
            nursery.cancel_scope.cancel()


async def test_a_send_waits_for_the_receiving_tasks_pong_instead_of_raising_busy() -> None:
    """The receiving task writes a pong itself when nobody sends; the owner's send that comes
    meanwhile waits for it (one owner never sees BusyResourceError from housekeeping)."""
    a_send, b_recv = trio.testing.lockstep_stream_pair()
    b_send, a_recv = trio.testing.lockstep_stream_pair()
    conn = WebSocketConnection(trio.StapledStream(a_send, a_recv), client=False)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.receive_messages)
            await trio.testing.wait_all_tasks_blocked()
            await b_send.send_all(build_frame(Opcode.PING, b"ping!", mask=True))
            await trio.testing.wait_all_tasks_blocked()  # the pong's send_all blocks: nobody reads
            nursery.start_soon(conn.send_message, b"data")  # must wait, not raise
            await trio.testing.wait_all_tasks_blocked()
            parser = FrameParser(client=True)
            events: list[object] = []
            while len(events) < 2:
                events += parser.feed(await b_recv.receive_some(65536))
            assert events == [Pong(b"ping!"), b"data"]
            nursery.cancel_scope.cancel()


async def test_memory_stream_round_trip_on_the_generic_path() -> None:
    a, b = trio.testing.memory_stream_pair()
    server = WebSocketConnection(a, client=False)
    client = WebSocketConnection(b, client=True)
    with trio.fail_after(TIMEOUT):
        await client.send_messages([b"one", b"two"])
        assert await receive_n(server, 2) == [b"one", b"two"]
        await server.send_message(b"back")
        assert await client.receive_messages() == [b"back"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.close, CloseCode.PAIR_TIMEOUT, "alone")
            with pytest.raises(WebSocketClosedError) as info:
                await client.receive_messages()
        assert info.value.code == CloseCode.PAIR_TIMEOUT
        assert server.closed
        assert client.closed
        with pytest.raises(ConnectionClosedError):
            await server.send_message(b"late")
        await server.close()  # idempotent


# ----------------------------------------------------------------------------- timeouts (mock)


async def test_handshake_timeout(autojump_clock: trio.testing.MockClock) -> None:
    started: list[int] = []

    async def handler(conn: WebSocketConnection) -> None:
        started.append(1)

    with trio.fail_after(60):
        async with (
            running(handler, handshake_timeout=3.0) as server,
            await trio.open_tcp_stream("127.0.0.1", server.port) as stream,
        ):
            await stream.send_all(b"GET /v1/connect HTTP/1.1\r\nHost: x\r\n")  # never finished
            t0 = trio.current_time()
            assert await read_until_eof(stream) == b""
            assert trio.current_time() - t0 == pytest.approx(3.0, abs=0.1)
    assert started == []


@pytest.mark.parametrize(
    "opening",
    [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00" * 8, b"GET /v1/connect HTTP/1.1\nHost: x\n"],
    ids=["tls-client-hello", "nul", "bare-lf"],
)
async def test_a_head_that_cannot_become_an_upgrade_is_refused_at_once(
    autojump_clock: trio.testing.MockClock, opening: bytes
) -> None:
    # before: no answer, the connection held to the handshake timeout (a TLS client on ws://)
    async def handler(conn: WebSocketConnection) -> None:
        raise AssertionError("not an upgrade")

    with trio.fail_after(60):
        async with (
            running(handler, handshake_timeout=3.0) as server,
            await trio.open_tcp_stream("127.0.0.1", server.port) as stream,
        ):
            await stream.send_all(opening)
            t0 = trio.current_time()
            answer = await read_until_eof(stream)
            assert trio.current_time() - t0 < 1.0
            assert answer.startswith(b"HTTP/1.1 400 ")
            assert b'"error":"bad_request"' in answer


async def test_out_of_fds_accept_is_retried_and_logged_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # a connection flood that holds every fd: accept() fails with EMFILE at each 0.1 s retry, which
    # was one ERROR line each (10 a second); now one per 10 s with the count
    import logging
    import os
    import resource

    caplog.set_level(logging.ERROR, logger="rescue")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(120):
        async with running(echo) as server:
            socks = [trio.socket.socket() for _ in range(2)]  # their fds exist before the limit drops
            lowest_free = os.dup(0)  # a new fd takes the lowest free number: below it none is free
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
            try:
                for sock in socks:
                    await sock.connect(("127.0.0.1", server.port))  # queued, not accepted
                await trio.sleep(25)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in socks:
                sock.close()
    lines = [r for r in caplog.records if getattr(r, "event", "") == "websocket.accept_failed"]
    assert 2 <= len(lines) <= 4, len(lines)
    assert lines[1].__dict__["failures"] >= 90


async def test_a_listener_that_starts_out_of_fds_retries_then_serves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The accept loop takes connections off a second descriptor of the listening socket
    (rescue._net.accept_in_bursts); a node that starts with no fd for it waits and retries as for
    a failed accept (counted, logged), then serves what queued meanwhile."""
    import logging
    import os
    import resource

    caplog.set_level(logging.ERROR, logger="rescue")
    cap = ConnectionCap(4)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(30):
        client = trio.socket.socket()  # its fd exists before the limit drops
        lowest_free = os.dup(0)  # a new fd takes the lowest free number: below it none is free
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free + 1, hard))  # the listener's, no more
        try:
            async with running(echo, cap=cap) as server:
                await client.connect(("127.0.0.1", server.port))  # queued: nothing takes it yet
                while cap.stats.accept_errors < 3:
                    await trio.sleep(0.01)
                assert cap.stats.open == 0
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
                stream = trio.SocketStream(client)
                await stream.send_all(build_request(f"127.0.0.1:{server.port}", "/v1/connect", new_key()))
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = await stream.receive_some(4096)
                    assert chunk, head
                    head += chunk
                assert head.startswith(b"HTTP/1.1 101 "), head
                await stream.aclose()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lines = [r for r in caplog.records if getattr(r, "event", "") == "websocket.accept_failed"]
    assert len(lines) == 1, len(lines)  # once per interval
    assert "Too many open files" in lines[0].__dict__["error"]


async def test_a_burst_of_connections_queued_at_once_is_served_whole() -> None:
    """The accept loop takes a burst off the listening socket in batches of ACCEPT_BATCH without a
    checkpoint between them: every connection queued before it looks (over two batches) gets its
    upgrade and its echo, none is lost between one batch and the next."""
    import socket

    n = 2 * ACCEPT_BATCH + 5
    with trio.fail_after(30):
        async with running(echo) as server:
            # connected synchronously: the kernel queues them all before the server's loop runs
            plain = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
            streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in plain]
            for i, stream in enumerate(streams):
                await stream.send_all(build_request(f"127.0.0.1:{server.port}", "/v1/connect", new_key()))
                await stream.send_all(frame_messages([b"burst %d" % i], mask=True))
            for i, stream in enumerate(streams):
                parser = FrameParser(client=True)
                buf = b""
                while b"\r\n\r\n" not in buf:
                    chunk = await stream.receive_some(4096)
                    assert chunk, f"connection {i} closed during the handshake"
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 101 "), head
                events = list(parser.feed(rest))
                while not events:
                    events += parser.feed(await stream.receive_some(4096))
                assert events == [b"burst %d" % i]
                await stream.aclose()


@pytest.mark.parametrize("close_timeout", [None, 7.5], ids=["default", "configured"])
async def test_close_does_not_hang_when_the_peer_stops_reading(
    autojump_clock: trio.testing.MockClock, close_timeout: float | None
) -> None:
    """close() gives up after the connection's close_timeout (the server's setting, or the default)."""
    durations: list[float] = []
    settings = {} if close_timeout is None else {"close_timeout": close_timeout}

    async def handler(conn: WebSocketConnection) -> None:
        chunk = b"z" * 65536
        with trio.move_on_after(5):  # fill the socket buffers until a send blocks
            while True:
                await conn.send_messages([chunk[:-8]])
        t0 = trio.current_time()
        await conn.close(CloseCode.SERVER_SHUTDOWN)
        durations.append(trio.current_time() - t0)
        assert conn.closed

    with trio.fail_after(60):
        async with running(handler, **settings) as server:
            stream, _ = await raw_upgrade(server.port)  # ... and never reads again
            while not durations:
                await trio.sleep(1)
            await stream.aclose()
    assert durations[0] == pytest.approx(close_timeout or CLOSE_TIMEOUT, abs=0.1)


async def test_close_is_immediate_when_cancelled() -> None:
    a, b = trio.testing.lockstep_stream_pair()
    conn = WebSocketConnection(trio.StapledStream(a, trio.testing.lockstep_stream_pair()[1]), client=False)
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as scope:
            scope.cancel()
            await conn.close()
        assert scope.cancelled_caught
        assert conn.closed
    del b


# ------------------------------------------------------------------------------------------ TLS


def _self_signed() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    tls = SelfSignedTLS.create(Path(tempfile.mkdtemp(prefix="rescue-tls-")))
    return tls.server_context(), tls.client_context()


async def test_tls_round_trip() -> None:
    server_ctx, client_ctx = _self_signed()
    with trio.fail_after(TIMEOUT):
        async with (
            running(echo, ssl_context=server_ctx) as server,
            await connect_websocket(url(server, scheme="wss"), ssl_context=client_ctx) as conn,
        ):
            payloads = [b"secret" * 100, b"x" * 50_000]
            await conn.send_messages(payloads)
            assert await receive_n(conn, 2) == payloads


async def test_sending_still_works_after_the_peer_broke_framing() -> None:
    """The relay answers a protocol error with a final message and a 4010 close."""
    a, b = trio.testing.memory_stream_pair()
    server = WebSocketConnection(a, client=False)
    with trio.fail_after(TIMEOUT):
        await b.send_all(build_frame(Opcode.TEXT, b"text", mask=True))
        with pytest.raises(ProtocolError) as info:
            await server.receive_messages()
        assert info.value.code == CloseCode.PROTOCOL_ERROR
        with pytest.raises(ProtocolError):
            await server.receive_messages()  # receiving is over
        await server.send_message(b"final CLOSE message")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.close, info.value.code, "text message")
            events = await events_until_eof(b)
        assert events == [b"final CLOSE message", CloseFrameReceived(4010, "text message")]


async def test_detached_connection_outlives_its_handler_and_is_closed_by_its_new_owner() -> None:
    """A handler that detaches returns at once; the server never closes the connection itself."""
    owned: list[WebSocketConnection] = []

    async def owner_task(conn: WebSocketConnection) -> None:
        try:
            await echo(conn)
        except ConnectionClosedError:
            pass
        finally:
            await conn.close(CloseCode.PEER_GONE, "owner done")

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as owner:

            async def handler(conn: WebSocketConnection) -> None:
                owner.start_soon(owner_task, conn)
                conn.detach()
                owned.append(conn)
                raise RuntimeError("a bug after the hand-off must not close the detached connection")

            async with running(handler) as server, await connect_websocket(url(server)) as conn:
                await conn.send_message(b"after the handler returned")
                assert await conn.receive_messages() == [b"after the handler returned"]
                assert owned[0].detached
                assert not owned[0].closed
                owned[0].abort()  # the owner's socket goes away: the owner closes, the server is not involved
                with pytest.raises(WebSocketClosedError):
                    await conn.receive_messages()


async def test_send_nowait_writes_at_once_when_idle_and_keeps_a_partial_tail_in_order() -> None:
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = WebSocketConnection(await trio.open_tcp_stream("127.0.0.1", port), client=True)
        server = WebSocketConnection(await listeners[0].accept(), client=False)
        await listeners[0].aclose()
        assert server.send_nowait([b"one", b"two"])
        assert not server.has_unsent
        assert await receive_n(client, 2) == [b"one", b"two"]
        # fill the socket until a write no longer goes through at all
        big = b"x" * 60_000
        sent = 0
        while server.send_nowait([big]):
            sent += 1
            if server.has_unsent:
                break
        assert server.has_unsent  # the last write was partial (the first refused one writes nothing)
        assert not server.send_nowait([b"after"])  # never jumps ahead of the kept tail
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.send_messages, [b"queued after the tail"])
            got = await receive_n(client, sent + 1)
        assert got == [big] * sent + [b"queued after the tail"]
        assert not server.has_unsent
        # while a send is in progress, send_nowait refuses (the single-writer rule)
        server._sending = True
        assert not server.send_nowait([b"x"])
        server._sending = False
        await server.flush()  # nothing left: a checkpoint
    server.abort()
    client.abort()


@given(
    parts=st.lists(st.binary(max_size=40), max_size=8),
    cut=st.integers(min_value=0, max_value=400),
)
def test_rest_of_a_partial_gathering_write_is_the_unsent_suffix(parts: list[bytes], cut: int) -> None:
    whole = b"".join(parts)
    n = cut % (len(whole) + 1)
    assert b"".join(_rest(list(parts), n)) == whole[n:]


async def test_partial_gathering_writes_of_large_frames_under_backpressure_stay_byte_exact() -> None:
    """send_nowait and send_messages write header and payload as separate buffers (writev, 0019).

    A small send buffer makes writes stop in the middle of headers and payloads; whatever the
    socket took, the peer gets every frame byte for byte and in order, the kept tail first.
    """
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = WebSocketConnection(await trio.open_tcp_stream("127.0.0.1", port), client=True)
        stream = await listeners[0].accept()
        await listeners[0].aclose()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        server = WebSocketConnection(stream, client=False)
        sizes = [16_384, 17_000, 125, 126, 65_535, 65_536, 0, 20_001]
        batches = [
            [bytes([i % 251]) * size, bytes([(i + 1) % 251]) * (i * 37 % 300)] for i, size in enumerate(sizes)
        ]
        expected = [m for batch in batches for m in batch]
        got: list[bytes] = []

        async def read_all() -> None:
            while len(got) < len(expected):
                got.extend(await client.receive_messages())
                await trio.sleep(0)  # a slow reader: the server's socket fills

        partial = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            for batch in batches:
                if server.send_nowait(batch):
                    partial += server.has_unsent
                    if server.has_unsent:
                        await server.flush()
                else:
                    await server.send_messages(batch)
        assert got == expected
        assert partial  # at least one write stopped part-way and its tail went first
        assert not server.has_unsent
    server.abort()
    client.abort()


async def test_a_batch_of_more_buffers_than_one_writev_takes_arrives_whole() -> None:
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = WebSocketConnection(await trio.open_tcp_stream("127.0.0.1", port), client=True)
        server = WebSocketConnection(await listeners[0].accept(), client=False)
        await listeners[0].aclose()
        batch = [i.to_bytes(2, "big") for i in range(1500)]  # 3,000 buffers: over IOV_MAX
        assert server.send_nowait(batch)
        await server.flush()
        await server.send_messages(batch)
        assert await receive_n(client, 3000) == batch + batch
    server.abort()
    client.abort()


async def test_send_nowait_of_one_message_frames_every_length_encoding() -> None:
    # the one-message path builds its header inline: 7-bit, 16-bit and 64-bit lengths
    with trio.fail_after(TIMEOUT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        client = WebSocketConnection(
            await trio.open_tcp_stream("127.0.0.1", port), client=True, max_message=100_000
        )
        server = WebSocketConnection(await listeners[0].accept(), client=False)
        await listeners[0].aclose()
        sizes = [0, 125, 126, 65_535, 65_536, 70_000]
        got: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                while len(got) < len(sizes):
                    got.extend(await client.receive_messages())

            nursery.start_soon(read_all)
            for size in sizes:
                message = bytes([size % 256]) * size
                if not server.send_nowait([message]):
                    await server.send_messages([message])
                elif server.has_unsent:
                    await server.flush()
        assert got == [bytes([size % 256]) * size for size in sizes]
    server.abort()
    client.abort()
