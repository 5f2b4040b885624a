"""rescue._http.serve_http over raw TCP on 127.0.0.1: the bytes a client library would never send.

Keep-alive, pipelining, HTTP/1.0, framing errors, limits, slow clients and shutdown. Timeouts are
exercised with trio's autojump clock (virtual time), never by waiting.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from rescue._http import (
    HttpLimits,
    HttpStats,
    Request,
    Response,
    Router,
    _Server,
    json_response,
    serve_http,
)
from rescue._http1 import HEAD_END, parse_head
from rescue._net import ACCEPT_BATCH

TIMEOUT = 10  # real seconds on a loaded 2-core box; virtual seconds in autojump tests
LIMITS = HttpLimits(keep_alive_timeout=15.0, request_timeout=10.0, max_head=1024, max_headers=20)


def make_router() -> Router:
    router = Router(max_body=100)

    @router.get("/n/{n}")
    async def number(request: Request) -> Response:
        return json_response({"n": request.path_params["n"]})

    @router.post("/echo")
    async def echo(request: Request) -> Response:
        return json_response({"len": len(request.body), "body": request.body.decode("latin-1")})

    return router


@asynccontextmanager
async def server(
    router: Router | None = None, limits: HttpLimits = LIMITS, stats: HttpStats | None = None
) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(
            lambda task_status: serve_http(
                router or make_router(), "127.0.0.1", 0, limits=limits, stats=stats, task_status=task_status
            )
        )
        yield port
        nursery.cancel_scope.cancel()


class Reader:
    """Reads HTTP responses off a raw stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def _more(self) -> bool:
        data = await self.stream.receive_some(65536)
        self.buf += data
        return bool(data)

    async def response(self, *, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while HEAD_END not in self.buf:
            assert await self._more(), f"connection closed mid-response: {self.buf!r}"
        end = self.buf.index(HEAD_END) + 4
        start, fields = parse_head(self.buf[:end])
        self.buf = self.buf[end:]
        headers = dict(fields)
        length = 0 if head_only else int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            assert await self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return int(start.split(" ")[1]), headers, body

    async def closed(self) -> bool:
        """Whether the server closes the connection (EOF or reset) with nothing more to say."""
        try:
            while await self._more():
                pass
        except trio.BrokenResourceError:
            pass
        await self.stream.aclose()
        return self.buf == b""


async def connect(port: int) -> tuple[trio.SocketStream, Reader]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    return stream, Reader(stream)


def get(path: str, extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


async def test_keep_alive_and_pipelined_requests_answered_in_order() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(get("/n/1") + get("/n/2") + get("/n/3"))
            for n in ("1", "2", "3"):
                status, headers, body = await reader.response()
                assert (status, json.loads(body)) == (200, {"n": n})
                assert "connection" not in headers
            await stream.send_all(get("/n/4"))  # the same connection again
            assert json.loads((await reader.response())[2]) == {"n": "4"}
            await stream.aclose()


async def test_a_burst_of_connections_queued_at_once_is_served_whole() -> None:
    """The accept loop takes up to ACCEPT_BATCH waiting connections per wake-up: every connection
    queued before it looks (over two batches, as a reconnect storm opens them) is answered."""
    import socket

    n = 2 * ACCEPT_BATCH + 5
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            # connected synchronously: the kernel queues them all before the server's loop runs
            plain = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            streams = [trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in plain]
            for i, stream in enumerate(streams):
                await stream.send_all(get(f"/n/{i}"))
            for i, stream in enumerate(streams):
                status, _, body = await Reader(stream).response()
                assert (status, json.loads(body)) == (200, {"n": str(i)})
                await stream.aclose()


async def test_connection_close_and_http10() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(get("/n/1", "Connection: close\r\n") + get("/n/2"))
            status, headers, _ = await reader.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await reader.closed()  # the pipelined second request is not answered

            stream, reader = await connect(port)
            await stream.send_all(b"GET /n/1 HTTP/1.0\r\n\r\n")
            status, headers, _ = await reader.response()
            assert (status, headers["connection"]) == (200, "close")
            assert await reader.closed()

            stream, reader = await connect(port)
            await stream.send_all(b"GET /n/1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert (await reader.response())[1]["connection"] == "keep-alive"
            await stream.send_all(b"GET /n/2 HTTP/1.0\r\n\r\n")
            assert json.loads((await reader.response())[2]) == {"n": "2"}
            assert await reader.closed()


async def test_bodies_by_length_and_chunked_and_head() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello")
            assert json.loads((await reader.response())[2]) == {"len": 5, "body": "hello"}
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n"
            )
            assert json.loads((await reader.response())[2]) == {"len": 5, "body": "hello"}
            await stream.send_all(b"HEAD /n/7 HTTP/1.1\r\nHost: t\r\n\r\n" + get("/n/8"))
            status, headers, body = await reader.response(head_only=True)
            assert (status, body) == (200, b"")
            assert headers["content-length"] == str(len(b'{"n":"7"}'))
            assert json.loads((await reader.response())[2]) == {"n": "8"}  # no stray HEAD body
            await stream.aclose()


async def test_expect_100_continue() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            assert (await reader.response(head_only=True))[0] == 100
            await stream.send_all(b"ok")
            assert json.loads((await reader.response())[2]) == {"len": 2, "body": "ok"}
            await stream.aclose()


async def assert_refused(port: int, wire: bytes, status: int, error: str) -> None:
    stream, reader = await connect(port)
    await stream.send_all(wire)
    got, headers, body = await reader.response()
    assert (got, json.loads(body)["error"]) == (status, error)
    assert headers["content-type"] == "application/json"
    assert headers["connection"] == "close"
    assert await reader.closed()


async def test_malformed_requests_get_400_json_and_the_connection_closes() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            for wire in (
                b"GARBAGE\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
                b"GET / HTTP/1.1\r\n\r\n",  # no Host
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS to a plain port
            ):
                await assert_refused(port, wire, 400, "bad_request")
            await assert_refused(port, get("/", "X: " + "v" * 2000 + "\r\n"), 431, "headers_too_large")
            many = "".join(f"X-{i}: v\r\n" for i in range(30))
            await assert_refused(port, get("/", many), 431, "headers_too_large")
            await assert_refused(
                port, b"GET / HTTP/3.0\r\nHost: t\r\n\r\n", 505, "http_version_not_supported"
            )


async def test_bodies_over_the_limit_get_413_and_the_connection_closes() -> None:
    with trio.fail_after(TIMEOUT):
        async with server() as port:
            # declared: refused before a byte of the body is read (the server lingers to drain it)
            head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 500\r\n\r\n"
            await assert_refused(port, head + b"x" * 500, 413, "payload_too_large")
            chunk = b"20\r\n" + b"x" * 32 + b"\r\n"
            chunked = b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk * 4
            await assert_refused(port, chunked, 413, "payload_too_large")
            # exactly at the limit is fine
            stream, reader = await connect(port)
            await stream.send_all(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n" + b"y" * 100
            )
            assert (await reader.response())[0] == 200
            await stream.aclose()


async def test_slow_head_and_trickled_body_get_408(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(120):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(b"GET /n/1 HTTP/1.1\r\nHost: t\r\n")  # and never the blank line
            status, headers, body = await reader.response()
            assert (status, json.loads(body)["error"], headers["connection"]) == (
                408,
                "request_timeout",
                "close",
            )
            assert await reader.closed()
            assert trio.current_time() >= LIMITS.request_timeout

            # a body trickled one byte a second: each byte is in time, the request is not
            stream, reader = await connect(port)
            await stream.send_all(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 50\r\n\r\n")
            sent = 0
            while sent < 50 and not reader.buf:
                await stream.send_all(b"x")
                sent += 1
                with trio.move_on_after(1):
                    await reader._more()  # the server's answer, if it has one by now
            assert sent < 50  # the server hung up before the body was complete
            assert (await reader.response())[0] == 408
            assert await reader.closed()


async def test_idle_keep_alive_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    with trio.fail_after(120):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(get("/n/1"))
            assert (await reader.response())[0] == 200
            answered = trio.current_time()
            assert await reader.closed()
            assert trio.current_time() - answered >= LIMITS.keep_alive_timeout


async def test_blank_lines_do_not_keep_an_idle_connection_open(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # a CRLF every 4 s renewed the keep-alive timeout: one idle connection held for ever
    with trio.fail_after(120):
        async with server() as port:
            stream, reader = await connect(port)
            with trio.move_on_after(60):
                while True:
                    await stream.send_all(b"\r\n")
                    with trio.move_on_after(4):  # never at the server's deadline (15 s)
                        if not await reader._more():
                            break
            assert reader.buf == b""
            assert trio.current_time() < LIMITS.keep_alive_timeout + 5
            await stream.aclose()


async def test_shutdown_closes_idle_connections_and_finishes_in_flight_ones() -> None:
    release = trio.Event()
    started = trio.Event()
    router = make_router()

    @router.get("/wait")
    async def wait(request: Request) -> Response:
        started.set()
        await release.wait()
        return json_response({"done": True})

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as outer:
            scope = trio.CancelScope()
            ports: list[int] = []
            up = trio.Event()

            async def run() -> None:
                with scope:
                    async with trio.open_nursery() as nursery:
                        ports.append(await nursery.start(serve_http, router, "127.0.0.1", 0))
                        up.set()

            outer.start_soon(run)
            await up.wait()
            idle, idle_reader = await connect(ports[0])
            await idle.send_all(get("/n/1"))
            assert (await idle_reader.response())[0] == 200
            busy, busy_reader = await connect(ports[0])
            await busy.send_all(get("/wait"))
            await started.wait()
            scope.cancel()
            assert await idle_reader.closed()  # at once, while /wait is still in flight
            assert not release.is_set()
            release.set()
            status, headers, body = await busy_reader.response()
            assert (status, json.loads(body), headers["connection"]) == (200, {"done": True}, "close")
            assert await busy_reader.closed()


async def test_a_handler_that_never_answers_is_cut_off_after_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    router = make_router()

    @router.get("/forever")
    async def forever(request: Request) -> Response:
        await trio.sleep_forever()
        raise AssertionError

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, router, "127.0.0.1", 0)
            stream, reader = await connect(port)
            await stream.send_all(get("/forever"))
            await trio.sleep(1)
            stopped = trio.current_time()
            nursery.cancel_scope.cancel()
        assert 2.0 <= trio.current_time() - stopped < 5.0  # the 2 s grace period, then cut
        assert await reader.closed()


async def test_a_connection_the_client_closed_is_closed_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # no socket left in CLOSE-WAIT for a keep-alive period (hypercorn kept it 15 s: docs/perf/soak.md)
    with trio.fail_after(120):
        async with server() as port:
            stream, reader = await connect(port)
            await stream.send_all(get("/n/1"))
            assert (await reader.response())[0] == 200
            await stream.send_eof()
            eof_sent = trio.current_time()
            assert await reader.closed()
            assert trio.current_time() - eof_sent < LIMITS.keep_alive_timeout


async def test_a_client_that_stops_reading_is_dropped(autojump_clock: trio.testing.MockClock) -> None:
    big = b"x" * (8 * 1024 * 1024)  # far more than the socket buffers between the two ends hold
    router = make_router()

    @router.get("/big")
    async def big_answer(request: Request) -> Response:
        return Response(200, big, "application/octet-stream")

    with trio.fail_after(120):
        async with server(router) as port:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            await stream.send_all(get("/big"))
            await trio.sleep(LIMITS.send_timeout + 1)  # not reading; the server's send times out
            reader = Reader(stream)
            assert not await reader.closed()  # EOF after what the buffers held ...
            assert len(reader.buf) < len(big)  # ... not the whole answer


async def test_a_slow_reader_of_a_large_answer_gets_all_of_it(autojump_clock: trio.testing.MockClock) -> None:
    # the send timeout bounded the whole answer: the 944 KB join.js was cut off after 10 s for any
    # client slower than ~95 KB/s; it bounds progress now (a client that stops reading is still dropped)
    big = bytes(range(256)) * (4 * 1024)  # 1 MiB
    router = make_router()

    @router.get("/big")
    async def big_answer(request: Request) -> Response:
        return Response(200, big, "application/octet-stream")

    with trio.fail_after(300):
        async with server(router) as port:
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await sock.connect(("127.0.0.1", port))
            stream = trio.SocketStream(sock)
            await stream.send_all(get("/big"))
            received = b""
            while len(received) < len(big) + 100:
                data = await stream.receive_some(16 * 1024)
                if not data:
                    break
                received += data
                await trio.sleep(0.25)  # a few KB a read: 1 MiB takes over a minute
            assert trio.current_time() > 3 * LIMITS.send_timeout
            assert received.endswith(big)
            await stream.aclose()


async def test_a_header_with_a_line_break_is_never_sent() -> None:
    router = make_router()

    @router.get("/split")
    async def split(request: Request) -> Response:
        return json_response({}, headers={"x-echo": "a\r\nset-cookie: evil=1"})

    with trio.fail_after(TIMEOUT):
        async with server(router) as port:
            stream, reader = await connect(port)
            await stream.send_all(get("/split") + get("/n/1"))
            status, headers, body = await reader.response()
            assert (status, json.loads(body)["error"]) == (500, "internal_error")
            assert "set-cookie" not in headers
            assert (await reader.response())[0] == 200  # the connection stays usable
            await stream.aclose()


async def test_over_the_connection_cap_the_longest_idle_makes_room_else_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a flood of idle sockets ran the process out of fds (accept: EMFILE, /healthz unanswered)
    caplog.set_level(logging.WARNING, logger="rescue.http")
    stats = HttpStats()
    with trio.fail_after(TIMEOUT):
        async with server(limits=dataclasses.replace(LIMITS, max_connections=3), stats=stats) as port:
            conns = [await connect(port) for _ in range(3)]
            for stream, reader in conns:  # answered: each is now idle, waiting for a next request
                await stream.send_all(get("/n/1"))
                assert (await reader.response())[0] == 200
            # a fourth is served: the longest-idle one is closed in its favour
            stream, reader = await connect(port)
            await stream.send_all(get("/n/4"))
            assert (await reader.response())[0] == 200
            assert await conns[0][1].closed()
            # three connections mid-request (the 100 Continue says the server read their heads)
            busy = [*conns[1:], (stream, reader)]
            for stream, reader in busy:
                await stream.send_all(
                    b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
                )
                assert (await reader.response(head_only=True))[0] == 100
            # none idle: a new connection is answered 503 and closed; the busy ones are untouched
            stream, reader = await connect(port)
            status, headers, body = await reader.response()
            assert (status, json.loads(body)["error"], headers["connection"]) == (503, "server_busy", "close")
            assert await reader.closed()
            assert (stats.open, stats.shed_idle, stats.refused) == (3, 1, 1)
            for stream, reader in busy:
                await stream.send_all(b"ok")
                assert json.loads((await reader.response())[2]) == {"len": 2, "body": "ok"}
                await stream.aclose()
    lines = [r for r in caplog.records if getattr(r, "event", "") == "http.server.over_capacity"]
    assert len(lines) == 1  # one line per interval, however many were shed or refused


async def test_a_flood_past_the_cap_never_holds_more_sockets_than_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection shed or refused over the cap has its socket closed in the accept loop, not by a
    task that runs later.

    The accept loop takes a burst of up to ACCEPT_BATCH before any connection's task runs, and may
    take the next burst first: a shed idle connection's socket stayed open until its cancelled task
    ran, a refused one's until its task had written the 503, so a flood held the cap plus whole
    bursts of sockets (134 here, for a cap of 4; the relay's admin port has a cap of a quarter of
    its fd reserve). Here: 4 idle keep-alive connections fill the cap, then three bursts of idle
    sockets are queued before the loop runs; at every admission the server holds at most the cap
    and the newcomer.
    """
    cap, n = 4, 3 * ACCEPT_BATCH
    stats = HttpStats()
    held: list[int] = []
    base = 0
    admit = _Server.admit

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def counting_admit(self: _Server) -> bool:
        admitted = admit(self)
        held.append(fds() - base)  # the server's connection sockets, the newcomer's included
        return admitted

    monkeypatch.setattr(_Server, "admit", counting_admit)
    with trio.fail_after(TIMEOUT):
        async with server(limits=dataclasses.replace(LIMITS, max_connections=cap), stats=stats) as port:
            first = [await connect(port) for _ in range(cap)]
            for stream, reader in first:
                await stream.send_all(get("/n/1"))
                assert (await reader.response())[0] == 200
            await trio.testing.wait_all_tasks_blocked()  # their tasks wait for a next request: idle
            # connected synchronously: the kernel queues them all before the server's loop runs
            flood = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
            base = fds() - stats.open  # all but the server's connection sockets
            held.clear()
            while stats.shed_idle + stats.refused < n:  # bounded by fail_after
                await trio.sleep(0.005)
            assert len(held) == n
            assert max(held) <= cap + 1, f"{max(held)} sockets held at once for a cap of {cap}"
            assert stats.open == cap
            # the first burst: the idle ones shed for its first newcomers, the rest of it refused
            assert stats.shed_idle >= cap, stats
            assert stats.refused >= ACCEPT_BATCH - cap, stats
            for _, reader in first:
                assert await reader.closed()
        # stopped: the flood's last admitted (idle) connections are closed too
        assert stats.open == 0
        refused = 0
        for sock in flood:
            reader = Reader(trio.SocketStream(trio.socket.from_stdlib_socket(sock)))
            if await reader.closed():
                continue  # shed (or closed at the stop) with nothing said
            refused += 1
            status, headers, body = await reader.response()
            assert (status, json.loads(body)["error"]) == (503, "server_busy")
            assert (headers["connection"], headers["retry-after"], reader.buf) == ("close", "1", b"")
        assert refused == stats.refused


async def test_a_refused_newcomer_that_already_sent_its_request_reads_the_503_then_eof() -> None:
    """The refusal reads what already arrived before it closes: closing over unread input sends a
    reset (the client saw ECONNRESET after the 503, and a reset can destroy the answer unread)."""
    stats = HttpStats()
    with trio.fail_after(TIMEOUT):
        async with server(limits=dataclasses.replace(LIMITS, max_connections=1), stats=stats) as port:
            busy, busy_reader = await connect(port)  # mid-request: not idle, never shed
            await busy.send_all(
                b"POST /echo HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
            )
            assert (await busy_reader.response(head_only=True))[0] == 100
            # the request is in the server's socket before the accept loop takes the connection
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(get("/n/1"))
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            reader = Reader(stream)
            status, headers, body = await reader.response()
            assert (status, json.loads(body)["error"], headers["connection"]) == (503, "server_busy", "close")
            assert await stream.receive_some(65536) == b""  # a FIN, not a reset (BrokenResourceError)
            await stream.aclose()
            assert stats.refused == 1
            await busy.send_all(b"ok")
            assert json.loads((await busy_reader.response())[2]) == {"len": 2, "body": "ok"}
            await busy.aclose()


async def test_a_large_answer_the_client_does_not_read_is_not_copied_per_connection() -> None:
    # GET /join/join.js (944 KB) on connections that never read: each held a joined head+body copy
    # for the send timeout (300 connections: +274 MB)
    import tracemalloc

    big = b"x" * (16 * 1024 * 1024)  # more than the socket buffers between the two ends hold
    router = make_router()

    @router.get("/big")
    async def big_answer(request: Request) -> Response:
        return Response(200, big, "application/octet-stream")

    streams: list[trio.SocketStream] = []
    with trio.fail_after(TIMEOUT):
        async with server(router) as port:
            tracemalloc.start()
            try:
                for _ in range(3):
                    sock = trio.socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    await sock.connect(("127.0.0.1", port))
                    stream = trio.SocketStream(sock)
                    streams.append(stream)
                    await stream.send_all(get("/big"))
                    assert (await stream.receive_some(12)).startswith(b"HTTP/1.1 200")  # rendered
                held, _ = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            for stream in streams:
                await stream.aclose()
    assert held < len(big), held  # not one copy of the answer, let alone one per connection


async def test_out_of_fds_accept_is_retried_and_logged_once_per_interval(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # accept() failing with EMFILE was logged every 0.1 s retry: 10 lines a second for a flood
    import os
    import resource

    caplog.set_level(logging.WARNING, logger="rescue.http")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with trio.fail_after(120):
        async with server() as port:
            socks = [trio.socket.socket() for _ in range(3)]  # their fds exist before the limit drops
            lowest_free = os.dup(0)  # a new fd takes the lowest free number: below it none is free
            os.close(lowest_free)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no new fd from here
            try:
                for sock in socks:
                    await sock.connect(("127.0.0.1", port))  # queued; the server cannot accept it
                await trio.sleep(25)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            stream = trio.SocketStream(socks[0])  # served once fds are back
            await stream.send_all(get("/n/1"))
            assert (await Reader(stream).response())[0] == 200
            for sock in socks:
                sock.close()
    lines = [r for r in caplog.records if getattr(r, "event", "") == "http.server.over_capacity"]
    assert 2 <= len(lines) <= 4, len(lines)  # 25 s of EMFILE: one line per 10 s, with the count
    assert "Too many open files" in lines[0].__dict__["detail"]
    assert lines[1].__dict__["accept_errors"] >= 90
