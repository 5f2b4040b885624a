"""``serve_websocket``'s connection cap (:class:`ConnectionCap`) over real sockets.

Past the cap the longest-*pending* connection (upgrade or first message not done) is closed for the
newcomer; established connections never are; with nothing pending the newcomer gets 503
``server_busy`` at once (a plain close on TLS). The open count must come back to zero on every way a
connection ends, or the cap would shrink for good. The relay under a real fd limit:
tests/test_relay_fd_cap.py.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable

import pytest
import trio

from rescue._net import ACCEPT_BATCH
from rescue.errors import ConnectionClosedError, ProtocolError
from rescue.websocket import ConnectionCap, WebSocketConnection, build_request, connect_websocket, new_key

from .test_ws_io import _self_signed, running, url

TIMEOUT = 10


async def _until(condition: Callable[[], bool]) -> None:
    """The server handles accepts and closes in its own tasks: wait (bounded) until it has."""
    with trio.fail_after(TIMEOUT):
        while not condition():
            await trio.sleep(0.005)


def _handler(cap: ConnectionCap, owners: trio.Nursery | None = None) -> Callable[..., object]:
    async def handler(conn: WebSocketConnection) -> None:
        first = await conn.receive_messages()
        cap.established(conn)
        if first == [b"raise"]:
            raise RuntimeError("a handler bug")
        if first == [b"return"]:
            return
        if first == [b"detach"] and owners is not None:
            conn.detach()
            owners.start_soon(_owner, conn)
            return
        await conn.send_messages(first)
        while True:
            await conn.send_messages(await conn.receive_messages())

    return handler


async def _owner(conn: WebSocketConnection) -> None:
    try:
        await conn.send_messages([b"detached"])
        await conn.receive_messages()
    except ConnectionClosedError:
        pass
    finally:
        conn.abort()


async def _established(address: str, message: bytes = b"hello") -> WebSocketConnection:
    conn = await connect_websocket(address)
    await conn.send_message(message)
    assert await conn.receive_messages() == [message]
    return conn


async def test_the_longest_pending_connection_is_shed_never_an_established_one() -> None:
    cap = ConnectionCap(3)
    with trio.fail_after(TIMEOUT):
        async with running(_handler(cap), cap=cap) as server:
            live = await _established(url(server))
            bare = await trio.open_tcp_stream("127.0.0.1", server.port)  # no upgrade
            await _until(lambda: cap.stats.open == 2)
            silent = await connect_websocket(url(server))  # upgraded, no first message
            await _until(lambda: cap.stats.open == 3)
            assert cap.pending == 2
            assert (cap.room, cap.full) == (2, False)  # no slot free, but two to displace
            newcomers = []
            for shed in (1, 2, 3):
                newcomers.append(await trio.open_tcp_stream("127.0.0.1", server.port))
                await _until(functools.partial(lambda n: cap.stats.shed == n, shed))
            assert await bare.receive_some() == b""  # the oldest pending went first
            with pytest.raises(ConnectionClosedError):
                await silent.receive_messages()
            assert await newcomers[0].receive_some() == b""  # then the oldest newcomer
            await live.send_message(b"still forwarding")
            assert await live.receive_messages() == [b"still forwarding"]
            await _until(lambda: cap.stats.open == 3)
            assert (cap.stats.refused, cap.pending) == (0, 2)
            for stream in (bare, *newcomers):
                await stream.aclose()
            live.abort()
            silent.abort()
            await _until(lambda: cap.stats.open == 0)


async def test_with_nothing_pending_a_newcomer_gets_503_at_once() -> None:
    cap = ConnectionCap(2)
    with trio.fail_after(TIMEOUT):
        async with running(_handler(cap), cap=cap, handshake_timeout=60) as server:
            assert (cap.room, cap.full) == (2, False)
            held = [await _established(url(server))]
            assert (cap.room, cap.full) == (1, False)
            held.append(await _established(url(server)))
            assert (cap.room, cap.full) == (0, True)
            newcomer = await trio.open_tcp_stream("127.0.0.1", server.port)
            answer = b""
            while chunk := await newcomer.receive_some():
                answer += chunk
            await newcomer.aclose()
            assert answer.startswith(b"HTTP/1.1 503 ")
            assert answer.endswith(b'{"error":"server_busy","detail":"too many connections; retry shortly"}')
            assert b"\r\nRetry-After: 1\r\n" in answer
            with pytest.raises(ProtocolError) as refused:  # the SDK's HandshakeError, or the reset
                await connect_websocket(url(server))
            assert getattr(refused.value, "status", 503) == 503
            assert cap.stats.refused == 2
            assert cap.stats.open == 2
            for conn in held:
                assert not conn.closed
                conn.abort()
            await _until(lambda: cap.stats.open == 0)
            (await _established(url(server))).abort()  # room again


async def test_a_refused_newcomer_that_already_sent_its_upgrade_reads_the_503_then_eof() -> None:
    """The refusal reads what already arrived before it closes (rescue._net.refuse_at_once, the
    HTTP server's too): closing over an unread request sends a reset, not a FIN."""
    cap = ConnectionCap(1)
    with trio.fail_after(TIMEOUT):
        async with running(_handler(cap), cap=cap, handshake_timeout=60) as server:
            held = await _established(url(server))
            # the request is in the server's socket before the accept loop takes the connection
            sock = socket.create_connection(("127.0.0.1", server.port))
            sock.sendall(build_request(f"127.0.0.1:{server.port}", "/v1/connect", new_key()))
            newcomer = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            answer = b""
            while chunk := await newcomer.receive_some():  # a reset: BrokenResourceError
                answer += chunk
            await newcomer.aclose()
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert answer.endswith(b'{"error":"server_busy","detail":"too many connections; retry shortly"}')
            assert cap.stats.refused == 1
            held.abort()
            await _until(lambda: cap.stats.open == 0)


async def test_a_tls_newcomer_over_the_cap_is_closed_without_a_plaintext_answer() -> None:
    server_ctx, client_ctx = _self_signed()
    cap = ConnectionCap(1)
    with trio.fail_after(TIMEOUT):
        async with running(_handler(cap), cap=cap, ssl_context=server_ctx) as server:
            held = await connect_websocket(url(server, scheme="wss"), ssl_context=client_ctx)
            await held.send_message(b"hi")
            assert await held.receive_messages() == [b"hi"]
            raw = await trio.open_tcp_stream("127.0.0.1", server.port)
            assert await raw.receive_some() == b""  # no 503 in clear text on a TLS port
            await raw.aclose()
            assert cap.stats.refused == 1
            held.abort()
            await _until(lambda: cap.stats.open == 0)


async def test_the_open_count_returns_to_zero_however_connections_end() -> None:
    cap = ConnectionCap(100)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as owners:
            async with running(_handler(cap, owners), cap=cap) as server:
                address = url(server)
                # the upgrade refused (404), a client that leaves before its upgrade or its first message
                with pytest.raises(ProtocolError):
                    await connect_websocket(address.replace("/v1/connect", "/elsewhere"))
                bare = await trio.open_tcp_stream("127.0.0.1", server.port)
                await bare.aclose()
                silent = await connect_websocket(address)
                silent.abort()
                # the handler returns, raises, or hands the connection to another owner
                for message in (b"return", b"raise"):
                    conn = await connect_websocket(address)
                    await conn.send_message(message)
                    with pytest.raises(ConnectionClosedError):
                        await conn.receive_messages()
                detached = await connect_websocket(address)
                await detached.send_message(b"detach")
                assert await detached.receive_messages() == [b"detached"]
                assert cap.stats.open >= 1
                await detached.aclose()
                # a normal close by either side
                echo = await _established(address)
                await echo.aclose()
                await _until(lambda: cap.stats.open == 0)
                assert cap.pending == 0
                assert not cap._scope_of
                assert (cap.stats.shed, cap.stats.refused) == (0, 0)
            owners.cancel_scope.cancel()


async def test_a_burst_past_the_cap_never_holds_more_sockets_than_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shed connection's socket is closed when it is shed, not when its task next runs.

    The accept loop admits a whole burst (up to ACCEPT_BATCH) before any task runs, and may take the
    next burst before the tasks of those it shed: their sockets stayed open meanwhile, so a flood
    held the cap plus one or two bursts of sockets. The relay under a 132-fd limit (cap 32, reserve
    100) then ran out of fds in accept() when the machine was busy (tests/test_relay_fd_cap.py under
    pytest-xdist). Here: a cap of 4 and three bursts queued before the loop runs; at every admission
    the process holds at most the cap and the newcomer.
    """
    import os
    import socket

    cap = ConnectionCap(4)
    held: list[int] = []

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    with trio.fail_after(30):
        async with running(_handler(cap), cap=cap) as server:
            admit = cap.admit

            def counting_admit(*args: object) -> trio.CancelScope | None:
                scope = admit(*args)  # type: ignore[arg-type]
                held.append(fds() - base)
                return scope

            monkeypatch.setattr(cap, "admit", counting_admit)
            n = 3 * ACCEPT_BATCH
            # connected synchronously: the kernel queues them all before the server's loop runs
            clients = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n)]
            base = fds()
            await _until(lambda: cap.stats.shed == n - 4)
            assert len(held) == n
            assert max(held) <= 4 + 1, max(held)  # the cap's sockets and the one just accepted
            await _until(lambda: cap.stats.open == 4)
            for client in clients:
                client.close()
            await _until(lambda: cap.stats.open == 0)
