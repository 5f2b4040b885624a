"""A small trio-native Redis client for one server: RESP2 over trio sockets (decision 0020).

What ``RedisStore`` needs and no more: ``redis://`` and ``unix://`` URLs (AUTH and SELECT from the
URL, parsed by redis-py's own ``parse_url`` so both transports read a URL the same way), a pool of
connections each used by one call at a time, one call's commands pipelined in one write. TLS,
Cluster and Sentinel stay on redis-py in worker threads (``_redis``).

Errors are redis-py's exception classes, so the store maps them the same way whichever transport
ran the call: a socket failure or timeout is a ``redis.ConnectionError``/``TimeoutError``, garbage
on the wire ``redis.InvalidResponse``; an error reply is returned as a :class:`RespError` value
(:func:`response_error` makes the redis-py exception redis-py would have raised for it).

Commands are sent again only when that is safe (decision 0020, "Retry"): a pooled connection that
died while idle is found before anything is written to it and replaced; once the bytes went out,
a lost connection may have lost only the reply, so only a call its caller marked ``idempotent``
is sent again.
"""

from __future__ import annotations

import os
import select
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import redis.exceptions
import trio
from redis._parsers.base import BaseParser
from redis.connection import UnixDomainSocketConnection, parse_url

from rescue.guardrails._resp import NEED_DATA, Reply, RespError, RespParser, RespProtocolError, encode_command

__all__ = ["ConnectionLost", "NativeRedis", "NativeTarget", "native_target", "response_error"]

Arg = str | bytes | int | float
_READ_SIZE: Final = 65536
_CLOSED_BEFORE_REPLY: Final = "Connection closed by server before its reply (the commands may have run)"
# URL parts the native client understands; any other option (a ?socket_timeout=…, TLS) keeps the
# URL on redis-py, which knows them all.
_OPTIONS: Final = frozenset({"host", "port", "db", "username", "password", "path"})


@dataclass(frozen=True, slots=True)
class NativeTarget:
    host: str = "localhost"
    port: int = 6379
    path: str | None = None  # a unix socket
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def native_target(url: str) -> NativeTarget | None:
    """The server a plain ``redis://`` or ``unix://`` URL names; None for anything else.

    Raises:
        ValueError: a bad URL (redis-py's message).
    """
    if not url.lower().startswith(("redis://", "unix://")):
        return None
    options = parse_url(url)  # type: ignore[no-untyped-call]
    connection_class = options.pop("connection_class", None)
    if connection_class not in (None, UnixDomainSocketConnection) or set(options) - _OPTIONS:
        return None
    return NativeTarget(**options)


def response_error(reply: RespError) -> redis.exceptions.ResponseError:
    """The exception redis-py raises for this error reply (``NoScriptError``, ``ReadOnlyError`` …)."""
    error: redis.exceptions.ResponseError = BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return error


class ConnectionLost(redis.exceptions.ConnectionError):
    """The connection failed after a call's commands went out: Redis may have run them."""


class _Connection:
    __slots__ = ("_poll", "parser", "stream")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = RespParser()
        # for dead_while_idle(): registered once, so the check is a single poll(2) call
        self._poll = select.poll()
        self._poll.register(stream.socket.fileno(), select.POLLIN)

    def dead_while_idle(self) -> bool:
        """Whether the connection died, or went wrong, while it sat in the pool (no I/O waits).

        An idle connection has nothing to read: readable means the server closed it (EOF: a
        restart, ``CLIENT KILL``, its ``timeout``), reset it, or sent bytes nobody asked for; any
        of those makes it unusable. One ``poll(2)`` with a zero timeout, ~0.3 us (decision 0020,
        "Retry"), against the ~50-100 us of the round trip it saves from being lost.
        """
        return bool(self._poll.poll(0))

    def close(self) -> None:
        # synchronous, so a cancelled call can discard its connection on the way out
        self.stream.socket.close()

    def __del__(self) -> None:
        # a store dropped without aclose(): close quietly, as redis-py's connections do (no
        # ResourceWarning; detach needs no running trio, close would)
        fd = self.stream.socket.detach()
        if fd >= 0:
            os.close(fd)


class NativeRedis:
    """Pooled RESP2 connections to one Redis server.

    Args:
        target: the server (:func:`native_target`).
        max_idle: connections kept open between calls; the caller bounds concurrent calls.
        socket_timeout: seconds for a whole round trip; connect_timeout: for connecting.

    Cancellation:
        A call cancelled while its round trip is under way closes its connection (its reply
        might still arrive and would answer the next call): it is never reused.
    """

    def __init__(
        self, target: NativeTarget, *, max_idle: int, socket_timeout: float, connect_timeout: float
    ) -> None:
        self.target = target
        self._max_idle = max_idle
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._closed = False

    async def execute(self, commands: Sequence[Sequence[Arg]], *, idempotent: bool = False) -> list[Reply]:
        """Send ``commands`` in one write and return their replies (error replies as values).

        Args:
            commands: the round trip's commands, pipelined.
            idempotent: running the commands twice does no harm (reads): a connection lost after
                they went out is then replaced and they are sent again, once.

        Raises:
            ConnectionLost: the connection failed after the commands went out and they are not
                ``idempotent``: Redis may have run them, so they are not sent again.
            redis.exceptions.RedisError: any other socket failure or timeout (``ConnectionError``,
                ``TimeoutError``), garbage on the wire (``InvalidResponse``).

        Retry (decision 0020): a pooled connection is checked before anything is written to it
        (:meth:`_Connection.dead_while_idle`); one the server closed while it sat idle (a Redis
        restart) is dropped and another taken, so the commands still go out exactly once.
        """
        payload = b"".join(encode_command(c) for c in commands)
        conn = await self._checkout()
        try:
            try:
                replies = await self._round_trip(conn, payload, len(commands))
            except ConnectionLost:
                if not idempotent:
                    raise
                self._discard(conn)
                conn = await self._checkout()
                replies = await self._round_trip(conn, payload, len(commands))
        except BaseException:
            self._discard(conn)
            raise
        if self._closed or len(self._idle) >= self._max_idle:
            self._discard(conn)
        else:
            self._idle.append(conn)
        return replies

    async def _checkout(self) -> _Connection:
        """A pooled connection still alive (the dead ones met on the way are closed), else a new one."""
        while self._idle:
            conn = self._idle.pop()
            if not conn.dead_while_idle():
                return conn
            self._discard(conn)
        return await self._connect()

    async def _round_trip(self, conn: _Connection, payload: bytes, count: int) -> list[Reply]:
        replies: list[Reply] = []
        with trio.move_on_after(self._socket_timeout):
            try:
                await conn.stream.send_all(payload)
                while len(replies) < count:
                    reply = conn.parser.next_reply()
                    if reply is NEED_DATA:
                        data = await conn.stream.receive_some(_READ_SIZE)
                        if not data:
                            raise ConnectionLost(_CLOSED_BEFORE_REPLY)
                        conn.parser.feed(data)
                    else:
                        replies.append(reply)  # type: ignore[arg-type]  # not NEED_DATA here
            except RespProtocolError as exc:
                raise redis.exceptions.InvalidResponse(f"Protocol error: {exc}") from exc
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # from send_all too: a failed write may still have delivered some of the commands
                raise ConnectionLost(f"Error while talking to Redis: {exc!r}") from exc
            return replies
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    async def _connect(self) -> _Connection:
        if self._closed:
            raise redis.exceptions.ConnectionError("the store is closed")
        target = self.target
        where = target.path or f"{target.host}:{target.port}"
        stream: trio.SocketStream | None = None
        with trio.move_on_after(self._connect_timeout):
            try:
                if target.path is not None:
                    stream = await trio.open_unix_socket(target.path)
                else:
                    stream = await trio.open_tcp_stream(target.host, target.port)
            except OSError as exc:
                raise redis.exceptions.ConnectionError(f"Error connecting to {where}: {exc}") from exc
        if stream is None:
            raise redis.exceptions.TimeoutError(f"Timeout connecting to {where}")
        conn = _Connection(stream)
        self._open.add(conn)
        handshake: list[list[Arg]] = []
        if target.password is not None:
            auth: list[Arg] = ["AUTH", target.password]
            if target.username is not None:
                auth.insert(1, target.username)
            handshake.append(auth)
        if target.db:
            handshake.append(["SELECT", target.db])
        if handshake:
            try:
                payload = b"".join(map(encode_command, handshake))
                replies = await self._round_trip(conn, payload, len(handshake))
                for reply in replies:
                    if isinstance(reply, RespError):
                        raise response_error(reply)
            except BaseException:
                self._discard(conn)
                raise
        return conn

    def _discard(self, conn: _Connection) -> None:
        self._open.discard(conn)
        conn.close()

    def close(self) -> None:
        """Close every connection, those of running calls too (they fail); no new ones open."""
        self._closed = True
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()
