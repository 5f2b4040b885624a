"""The trio shell around :class:`~rescue.websocket._codec.FrameParser`: one WebSocket connection.

Two I/O paths share one state machine:

* **a socket** (a :class:`trio.SocketStream`, or TLS over one: a
  :class:`~rescue.websocket._tls.TLSSocketStream`): wait for readability first, then one
  non-blocking ``readv`` into a per-thread reused buffer (under TLS: into the ``MemoryBIO``, then
  decrypt every whole record into a second reused buffer), parse every complete frame in it, and
  return the whole batch. Writes (encrypted first under TLS) try the socket at once and only wait
  when it is full. This saves the failed read, the epoll re-registration and the per-call buffer
  allocation that ``receive_some`` costs, and lets the shared read poller serve the connection.
* **any other** :class:`trio.abc.Stream` (TLS via :class:`trio.SSLStream` on the client side,
  memory streams in tests): ``receive_some`` / ``send_all``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Final, TypeGuard, cast

import trio

from rescue._clock import run_clock
from rescue._codes import CloseCode
from rescue._log import get_logger, log_event
from rescue.errors import ConnectionClosedError, ProtocolError, unraised
from rescue.websocket._codec import (
    DEFAULT_MAX_MESSAGE,
    CloseFrameReceived,
    Event,
    FrameBudget,
    FrameFloodError,
    FrameParser,
    Ping,
    frame_close,
    frame_parts,
)
from rescue.websocket._lazy import LazyEvent, LazyParkingLot
from rescue.websocket._poller import QUIET_RCVLOWAT, ReadAhead, ReadPoller
from rescue.websocket._tls import TLSSocketStream, quiet_rcvlowat

__all__ = [
    "CLOSE_TIMEOUT",
    "READ_SIZE",
    "ConnectionStatistics",
    "WebSocketClosedError",
    "WebSocketConnection",
]

_logger = get_logger("rescue.websocket")

# Bytes read per wake-up at most. It bounds the work done per wake-up (64 one-KiB messages) and
# so the size of one batch handed to the relay. The buffer is shared by every connection of a
# thread (the parser copies out what it keeps before the next await), so memory stays O(1).
READ_SIZE: Final = 65536
# The default bound on a close handshake (our frame out, the peer's frame or EOF back) before the
# socket is dropped: the peer may have stopped reading. Owners set their own per connection
# (``close_timeout``): the relay its ``close_timeout_s``, the SDK its ``close_timeout_s``, so each
# side has one configurable value.
CLOSE_TIMEOUT: Final = 2.0
# struct tcp_info (linux/tcp.h): bytes asked for, and where the u32 tcpi_last_data_recv (ms) sits
_TCP_INFO_SIZE: Final = 104
_LAST_DATA_RECV: Final = 52

# Reads the poller's read-ahead makes of one ready socket in one pass while each fills the buffer
# (a bulk flow): the batches are handled inline instead of waking the reader task for the rest
# (0019); past it the reader task reads on, so one socket cannot hold up the others for long.
READ_AHEAD_READS: Final = 4
# The first two bytes of an unmasked binary frame with a 16-bit length.
_HEAD16: Final = b"\x82\x7e"
# Buffers one writev takes (Linux's IOV_MAX); a batch with more parts is joined first.
_IOV_MAX: Final = 1024
# The system calls of the per-message path, bound once: in compiled code ``os.readv`` is a lookup
# in the os module on every call (decision 0022).
_readv: Final = os.readv
_write: Final = os.write
_writev: Final = os.writev

_buffers = threading.local()

Buffer = bytes | bytearray | memoryview


def _write_parts(fd: int, parts: list[Buffer]) -> int:
    """One non-blocking gathering write of ``parts`` (joined first past :data:`_IOV_MAX`)."""
    if len(parts) == 1:
        return _write(fd, parts[0])
    if len(parts) > _IOV_MAX:
        return _write(fd, b"".join(parts))
    return _writev(fd, parts)


def _total(parts: list[Buffer]) -> int:
    """Bytes in ``parts`` (a loop: compiled, ``sum(map(len, ...))`` is two generic calls)."""
    total = 0
    for part in parts:
        total += len(part)
    return total


def _rest(parts: list[Buffer], n: int) -> list[Buffer]:
    """What is left of ``parts`` after a write took its first ``n`` bytes."""
    for i, part in enumerate(parts):
        size = len(part)
        if n < size:
            if n:
                return [memoryview(part)[n:], *parts[i + 1 :]]
            return parts[i:]
        n -= size
    return []


def _read_buffer() -> list[memoryview]:
    """This thread's read buffer, as the one-buffer list ``os.readv`` takes.

    A view of one bytearray, made once: each read slices it (one new view, not two) and passes
    the same list (none built per read).
    """
    iov: list[memoryview] | None = getattr(_buffers, "iov", None)
    if iov is None:
        iov = _buffers.iov = [memoryview(bytearray(READ_SIZE))]
    return iov


def _plain_buffer() -> bytearray:
    """The per-thread buffer TLS connections decrypt into (the ciphertext went to the BIO)."""
    buf: bytearray | None = getattr(_buffers, "plain", None)
    if buf is None:
        buf = _buffers.plain = bytearray(READ_SIZE)
    return buf


class WebSocketClosedError(ConnectionClosedError):
    """A WebSocket connection ended (a :class:`~rescue.errors.ConnectionClosedError`).

    Attributes:
        code: the close code as a :class:`CloseCode`, or ``None`` when there was none or it is not
            one of ours (e.g. 1001 from a browser): :func:`rescue.protocol.policy_for` treats both
            as an abnormal closure.
        wire_code: the close code exactly as received (or sent, when we closed first); ``None`` if
            the transport died without a close frame; 1005 for a close frame without a code.
        reason: the close reason.
    """

    def __init__(self, wire_code: int | None, reason: str = "") -> None:
        try:
            code = CloseCode(wire_code) if wire_code is not None else None
        except ValueError:
            code = None
        super().__init__(code, reason)
        self.wire_code = wire_code


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection's counters.

    Attributes:
        bytes_in: bytes read from the transport (frames, not payloads).
        bytes_out: bytes written to the transport.
        messages_in: binary messages received.
        messages_out: binary messages sent.
        reads: read calls that returned data.
        writes: write system calls (plain TCP) or ``send_all`` calls (other streams).
        buffered: bytes the parser holds for incomplete frames and messages.
    """

    bytes_in: int
    bytes_out: int
    messages_in: int
    messages_out: int
    reads: int
    writes: int
    buffered: int


def _ms_since_data_received(sock: trio.socket.SocketType) -> int:
    """``tcpi_last_data_recv`` of Linux's ``struct tcp_info``: ms since data last arrived (0 if unknown)."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return 0
    info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, _TCP_INFO_SIZE)
    if len(info) < _LAST_DATA_RECV + 4:
        return 0
    return int.from_bytes(info[_LAST_DATA_RECV : _LAST_DATA_RECV + 4], sys.byteorder)


def _only_messages(events: list[Event]) -> TypeGuard[list[bytes]]:
    """Whether a parse produced nothing but binary messages (no ping, pong or close)."""
    for event in events:  # noqa: SIM110 - a plain loop is cheaper than all() over a generator
        if type(event) is not bytes:
            return False
    return True


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    if isinstance(stream, trio.SocketStream):
        return stream.socket
    if isinstance(stream, TLSSocketStream):
        return stream.socket
    if isinstance(stream, trio.SSLStream) and isinstance(stream.transport_stream, trio.SocketStream):
        return stream.transport_stream.socket
    return None


def _close_now(stream: trio.abc.AsyncResource) -> bool:
    """Close a stream's transport without awaiting (sockets, TLS-over-socket, memory streams).

    Returns:
        Whether it could; other streams need ``await trio.aclose_forcefully(stream)``.
    """
    if isinstance(stream, trio.SocketStream):
        stream.socket.close()
        return True
    if isinstance(stream, trio.SSLStream | TLSSocketStream):
        return _close_now(stream.transport_stream)
    if isinstance(stream, trio.StapledStream):
        return _close_now(stream.send_stream) & _close_now(stream.receive_stream)
    close = getattr(stream, "close", None)
    if callable(close):
        close()
        return True
    return False


class WebSocketConnection(ReadAhead):
    """One open WebSocket connection (server or client side).

    Made by :func:`serve_websocket` and :func:`connect_websocket`; construct one directly only to
    run the protocol over a stream whose handshake is already done (e.g. a memory stream in tests).

    Concurrency: one task may receive while another sends. Two concurrent receivers, or two
    concurrent senders, raise :class:`trio.BusyResourceError`: the owner serializes writes.
    Pongs and the close reply are written by the receiving task; if a send is in progress at that
    moment they are handed to the sender, which writes them right after its batch, so control
    frames never interleave with a data frame.

    Args:
        stream: the transport, after the HTTP upgrade.
        client: ``True`` for the client side (we mask, the peer must not).
        max_message: the largest message accepted (see :class:`FrameParser`).
        path: the request path of the upgrade.
        request_headers: the upgrade request's headers (received on a server, sent on a client).
        initial_data: bytes read past the end of the handshake, parsed before anything else.
        frame_budget: hold the peer to a :class:`~rescue.websocket.FrameBudget` (servers do): a
            flood of tiny frames raises :class:`~rescue.websocket.FrameFloodError` (4010) from a
            receive.
        close_timeout: the bound on a close handshake, ours (:meth:`close`) or the answer to the
            peer's; past it the socket is dropped.

    Attributes:
        close_timeout: as above; the owner may change it at any time.
    """

    __slots__ = (
        "_budget",
        "_buf",
        "_bytes_in",
        "_bytes_out",
        "_client",
        "_clock",
        "_close_sent",
        "_close_started",
        "_control_writing",
        "_detached",
        "_error",
        "_fast_wait",
        "_fd",
        "_frames_seen",
        "_handler_error",
        "_idle",
        "_initial",
        "_iov",
        "_mark",
        "_messages_in",
        "_messages_out",
        "_more",
        "_on_messages",
        "_parser",
        "_peer_done",
        "_pending_control",
        "_poller",
        "_protocol_error",
        "_quiet",
        "_quiet_mark",
        "_read_ahead",
        "_reads",
        "_receiving",
        "_sending",
        "_sock",
        "_stash",
        "_stream",
        "_tls",
        "_transport_closed",
        "_unsent",
        "_writes",
        "close_timeout",
        "on_transport_closed",
        "path",
        "remote_addr",
        "request_headers",
    )

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        client: bool,
        max_message: int = DEFAULT_MAX_MESSAGE,
        path: str = "",
        request_headers: tuple[tuple[str, str], ...] = (),
        initial_data: bytes = b"",
        close_timeout: float = CLOSE_TIMEOUT,
        frame_budget: bool = False,
    ) -> None:
        self._stream = stream
        self.close_timeout = close_timeout
        self._client = client
        self._parser = FrameParser(client=client, max_message=max_message)
        # frames per second beyond what their bytes pay for (servers: a tiny-frame flood is closed)
        self._budget = FrameBudget(trio.current_time()) if frame_budget else None
        # the run's clock, read in compiled code (rescue._clock), once per read (0019, 0022)
        self._clock = run_clock(trio.lowlevel.current_clock()) if frame_budget else None
        self._frames_seen = 0
        self.path = path
        self.request_headers = request_headers
        # TLS whose state we drive ourselves: the socket path, with decrypt/encrypt (decision 0018)
        self._tls = stream if isinstance(stream, TLSSocketStream) else None
        plain = stream if isinstance(stream, trio.SocketStream) else None
        self._sock = plain.socket if plain is not None else None
        if self._tls is not None:
            self._sock = self._tls.socket
        # the socket's descriptor, -1 once closed (_close_transport_now is its only closer):
        # trio's fileno() is a Python call, on every read-ahead and write (0019)
        self._fd = self._sock.fileno() if self._sock is not None else -1
        # this thread's read buffer (a thread-local lookup per read otherwise), as readv's list
        self._iov = _read_buffer()
        self._buf = self._iov[0]
        sock = _socket_of(stream)
        self.remote_addr: tuple[str, int] | None = None
        if sock is not None:
            try:
                peer = sock.getpeername()
                self.remote_addr = (str(peer[0]), int(peer[1]))
            except OSError:
                pass
        self._initial = initial_data
        self._detached = False  # the server's handler handed the connection to another owner
        self._poller: ReadPoller | None = None  # shared read readiness (use_poller)
        # SO_RCVLOWAT as this connection set it (1 is the kernel's default), and whether its
        # session marked it quiet (decision 0015: the mark then holds back a lone heartbeat)
        self._mark = 1
        self._quiet = False
        self._quiet_mark = 0  # the mark a quiet socket gets (0: not worked out yet)
        self._on_messages: Callable[[list[bytes]], bool] | None = None  # the poller's read-ahead taker
        self._fast_wait = False  # the reader waits in receive_messages: read-ahead allowed
        self._read_ahead = False  # the poller's read-ahead consumed input the reader must see
        self._stash: list[Event] = []  # events the read-ahead parsed but did not hand off
        self._handler_error: Exception | None = None  # on_messages raised during a read-ahead
        self._more = False  # the last read filled the buffer: try reading before waiting
        tls = self._tls
        if tls is not None and (tls.ssl_object.pending() or tls.incoming.pending):
            self._more = True  # the upgrade's reads left input in the TLS state: no edge will say so
        self._receiving = False
        self._sending = False
        self._pending_control = b""  # pong/close frames for the active sender to write next
        self._control_writing = False  # the receiving task holds the send side for a pong/close reply
        self._unsent: list[Buffer] = []  # the tail of a partial send_nowait: written before anything else
        # trio objects made on first wait (rescue.websocket._lazy): ~0.7 KB per idle connection otherwise
        self._idle = LazyParkingLot()  # tasks waiting for the active sender to finish
        self._close_started = False
        self._close_sent = False
        self._error: WebSocketClosedError | None = None  # why the connection ended; raised by later calls
        self._protocol_error: ProtocolError | None = None  # the peer broke framing: receiving is over
        self._peer_done = LazyEvent()  # peer's close frame or EOF seen
        self._transport_closed = LazyEvent()
        # called once when the transport closes (the server's connection count: ConnectionCap)
        self.on_transport_closed: Callable[[], None] | None = None
        self._bytes_in = self._bytes_out = 0
        self._messages_in = self._messages_out = 0
        self._reads = self._writes = 0

    # ------------------------------------------------------------------------------ properties

    @property
    def client(self) -> bool:
        """Whether this is the client side."""
        return self._client

    @property
    def closed(self) -> bool:
        """Whether the transport is closed (nothing more can be sent or received)."""
        return self._transport_closed.is_set()

    @property
    def detached(self) -> bool:
        """Whether :meth:`detach` was called (the server no longer closes it)."""
        return self._detached

    def detach(self) -> None:
        """Take the connection away from the server that accepted it.

        By default :func:`serve_websocket` closes a connection when its handler returns, so a
        handler that passes the connection to a task elsewhere must keep waiting for that task.
        After ``detach()`` the handler may return at once (its task ends, saving that task's memory
        for every long-lived connection) and the server never touches the connection again, even if
        the handler raises: whoever took it must close or :meth:`abort` it, on every path.
        Call it only once the new owner is certain to run (e.g. a task started in a nursery that
        aborts the connection when cancelled).
        """
        self._detached = True

    def use_poller(
        self, poller: ReadPoller, on_messages: Callable[[list[bytes]], bool] | None = None
    ) -> bool:
        """Wait for readability through ``poller`` from now on instead of trio's own wait.

        For a server holding many mostly quiet connections (decision 0007): the poller batches
        their wake-ups. Only socket connections can (plain TCP, or TLS over MemoryBIO: a
        :class:`~rescue.websocket._tls.TLSSocketStream`); the registration ends when the transport
        closes.

        Args:
            poller: a running :class:`ReadPoller`.
            on_messages: optional read-ahead taker. While a task waits in
                :meth:`receive_messages`, the poller reads and parses ready input itself and
                offers a batch of binary messages to ``on_messages(batch)`` *synchronously*; if it
                returns True it has handled the whole batch (the waiting task is not woken);
                False means it did nothing and the batch goes to the waiting task as usual. It
                must never handle part of a batch. If it raises, :meth:`receive_messages` raises
                the same exception.

        Returns:
            Whether the connection now uses the poller (False: not a socket, closed, or the
            poller is not running).
        """
        sock = self._sock
        if sock is None or self._transport_closed.is_set() or self._poller is not None:
            return False
        fd = sock.fileno()
        if fd < 0 or not poller.register(fd, self if on_messages is not None else None):
            return False
        self._poller = poller
        self._on_messages = on_messages
        return True

    def set_quiet(self, quiet: bool) -> None:
        """Hint for the poller: only heartbeats arrive lately, or data flows again (decision 0015).

        Quiet raises the socket's ``SO_RCVLOWAT`` to :data:`QUIET_RCVLOWAT`, so a lone heartbeat
        does not wake the poller (its looks collect heartbeats) while any real message still
        does, at once; active puts it back to 1 (the kernel then reports what is pending). Call
        it right after a heartbeat was read. A no-op without a running poller (:meth:`use_poller`).
        """
        poller = self._poller
        sock = self._sock
        if poller is None or sock is None or not poller.running:
            return
        fd = sock.fileno()
        if fd < 0:
            return
        self._quiet = quiet
        heard_s_ago = 0.0
        try:
            self._set_mark(sock)
            if quiet:  # when the heartbeat just read arrived (the poller's looks follow its phase)
                heard_s_ago = _ms_since_data_received(sock) / 1000
        except OSError:
            return  # closing under us: nothing to tune
        poller.set_quiet(fd, quiet, heard_s_ago=heard_s_ago)

    def _set_mark(self, sock: trio.socket.SocketType) -> None:
        """``SO_RCVLOWAT`` as quiet asks, but 1 while part of a frame (or TLS record) is buffered.

        The rest of a frame may be shorter than the quiet mark (a first message after quiet split
        by the network: 1,460 bytes over a 1,448-byte MSS leave 12) and would then wait for the
        socket's next look, up to a heartbeat interval. Raises OSError (the socket is closing).
        """
        mark = 1
        tls = self._tls
        if self._quiet and not self._parser.buffered and (tls is None or not tls.records.partial):
            mark = self._quiet_mark
            if not mark:  # each frame is a record under TLS: the mark moves up by its overhead
                quiet = QUIET_RCVLOWAT if tls is None else quiet_rcvlowat(tls.ssl_object, QUIET_RCVLOWAT)
                mark = self._quiet_mark = quiet or 1  # (1: no fixed overhead, no mark)
        if mark != self._mark:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, mark)
            self._mark = mark

    def _parked(self) -> bool:
        """The read-ahead goes back to waiting (True: the task stays parked); a quiet socket's
        mark first follows what is buffered (:meth:`_set_mark`)."""
        if self._quiet:
            sock = self._sock
            if sock is not None:
                try:
                    self._set_mark(sock)
                except OSError:
                    pass  # closing under us: the waiting task finds out
        return True

    def read_ahead(self) -> bool:
        """The poller's callback while a task waits on this socket: read, parse, offer the batch.

        A read that fills the buffer (a bulk flow: more is likely queued) is handled like any
        other and followed by another read, up to :data:`READ_AHEAD_READS`; then the waiting task
        is woken to read on (edge-triggered: the socket must be drained).

        Returns:
            True to keep the waiting task parked (nothing for it yet), False to wake it.
        """
        on_messages = self._on_messages
        fd = self._fd
        if not self._fast_wait or on_messages is None or fd < 0 or self._more:
            return False
        tls = self._tls
        buf = self._buf
        iov = self._iov
        for _ in range(READ_AHEAD_READS):
            if tls is not None:
                try:
                    view = self._read_tls(fd)
                except BlockingIOError:
                    return self._parked()  # nothing (or no whole record) there after all
                except OSError:
                    return False  # the waiting task reads again and reports it
                if not view:
                    view.release()
                    return False  # EOF stays: the waiting task reads it again
                more = cast("bool", self._more)  # (_read_tls set it; mypy kept the guard's False)
            else:
                try:
                    n = _readv(fd, iov)
                except BlockingIOError:
                    return self._parked()  # nothing (more) there
                except OSError:
                    return False  # the waiting task reads again and reports it
                if not n:
                    return False  # EOF stays: the waiting task reads it again
                self._reads += 1
                self._bytes_in += n
                more = self._more = n == READ_SIZE
                view = buf[:n]
            try:
                events = self._feed(view)
            except ProtocolError as exc:
                self._protocol_error = unraised(exc)
                self._read_ahead = True
                return False
            finally:
                view.release()
            if not events:
                if more:
                    continue  # part of a large frame: read on
                return self._parked()  # part of a frame: wait for the rest
            if not _only_messages(events):
                break
            try:
                handled = on_messages(events)
            except Exception as exc:  # handed to the waiting task, which raises it
                self._handler_error = exc
                self._read_ahead = True
                return False
            if not handled:
                break
            self._messages_in += len(events)
            if not more:
                return self._parked()
        else:
            self._read_ahead = True  # every read handled and the bound reached: the task reads on
            return False
        # a batch the taker held back, or control frames: the waiting task goes on with it
        self._stash = list(events)
        self._read_ahead = True
        return False

    def statistics(self) -> ConnectionStatistics:
        """An immutable snapshot of the connection's counters."""
        return ConnectionStatistics(
            bytes_in=self._bytes_in,
            bytes_out=self._bytes_out,
            messages_in=self._messages_in,
            messages_out=self._messages_out,
            reads=self._reads,
            writes=self._writes,
            buffered=self._parser.buffered,
        )

    # --------------------------------------------------------------------------------- receive

    async def receive_messages(self) -> list[bytes]:
        """Wait for at least one complete binary message; return all that one read completed.

        Pings are answered here. Messages that arrived before a close frame are returned first;
        the close is reported by the next call.

        Returns:
            One or more messages, in order.

        Raises:
            WebSocketClosedError: the peer sent a close frame (already answered and the socket
                closed; ``code``/``reason`` are the peer's), the transport hit EOF or a reset
                (``code`` is ``None``), or the connection was closed locally.
            ProtocolError: the peer broke the framing rules (code 4010). Close the connection
                with ``exc.code`` (sending still works until then, e.g. for a final CLOSE
                message); later receives raise an equal error (a new instance each time).
            trio.BusyResourceError: another task is already receiving.

        Cancellation:
            Safe: cancelling loses no data (bytes already read stay in the parser).
        """
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this WebSocket")
        # (into a local: narrowing the attributes here would type them None for the loop below,
        # which compiled code checks -- docs/decisions/0022-compiled-hot-path.md)
        ended = self._protocol_error or self._error
        if ended is not None:
            await trio.lowlevel.checkpoint()
            raise unraised(ended)
        self._receiving = True
        try:
            while True:
                got: bytes | bytearray | memoryview | None
                if self._initial:
                    got = self._initial
                    self._initial = b""
                    await trio.lowlevel.checkpoint()
                elif self._sock is not None:
                    got = await self._read_socket(read_ahead=True)
                else:
                    got = await self._read_stream()
                if got is None:  # the poller read and parsed for us (use_poller)
                    events = self._take_read_ahead()
                else:
                    if not got:
                        self._peer_done.set()
                        raise self._fail(
                            WebSocketClosedError(None, "connection closed without a close frame")
                        )
                    try:
                        events = self._feed(got)
                    except ProtocolError as exc:
                        self._protocol_error = unraised(exc)
                        raise
                    finally:
                        if isinstance(got, memoryview):
                            got.release()
                if not events:
                    continue
                if _only_messages(events):  # the usual case: the parser's list is the batch
                    self._messages_in += len(events)
                    return events
                messages: list[bytes] = []
                for event in events:
                    if type(event) is bytes:
                        messages.append(event)
                    elif isinstance(event, Ping):
                        pong = self._parser.data_to_send()
                        if pong and not self._close_started:
                            await self._write_control(pong)
                    elif isinstance(event, CloseFrameReceived):
                        await self._on_peer_close(event)
                if messages:
                    self._messages_in += len(messages)
                    return messages
                if self._error is not None:
                    raise self._closed_error()
        finally:
            self._receiving = False

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse input, and charge its frames to the budget (if any)."""
        events = self._parser.feed(data)
        budget = self._budget
        if budget is not None:
            frames = self._parser.frames
            assert self._clock is not None
            if not budget.charge(frames - self._frames_seen, len(data), self._clock.now()):
                raise FrameFloodError(
                    "small_frames",
                    f"more than {budget.rate:g} small frames a second (bursts of {budget.burst:g})",
                )
            self._frames_seen = frames
        return events

    def _take_read_ahead(self) -> list[Event]:
        """What the poller's read-ahead left for the waiting task (raising what it caught)."""
        self._read_ahead = False
        if self._protocol_error is not None:
            raise unraised(self._protocol_error)
        if self._handler_error is not None:
            # The same instance (the taker's own error, with its traceback), raised from the
            # attribute and not from a local: in the pure build this frame is in its traceback,
            # and a local there would hold it -- a cycle that kept the connection (`self`) and
            # the caller's frames until a full pass of the cycle collector. Compiled code has no
            # frame locals (docs/decisions/0022-compiled-hot-path.md); the cycle was pure-only.
            try:
                raise self._handler_error
            finally:
                self._handler_error = None
        events, self._stash = self._stash, []
        return events

    async def _read_socket(self, *, read_ahead: bool = False) -> memoryview | bytes | None:
        """Wait for input and read it; ``None`` when the poller's read-ahead already took it."""
        sock = self._sock
        assert sock is not None
        buf = self._buf
        while True:
            try:
                poller = self._poller
                if self._more:
                    await trio.lowlevel.checkpoint()
                elif poller is not None and poller.running:
                    fd = sock.fileno()
                    if fd < 0:
                        raise trio.ClosedResourceError
                    if self._quiet:
                        self._set_mark(sock)  # (part of a frame may be buffered: its rest wakes us)
                    self._fast_wait = read_ahead
                    try:
                        await poller.wait_readable(fd)
                    finally:
                        self._fast_wait = False
                    if self._read_ahead:
                        return None
                else:
                    await trio.lowlevel.wait_readable(sock)
                fd = sock.fileno()
                if fd < 0:
                    raise trio.ClosedResourceError
                if self._tls is not None:
                    return self._read_tls(fd)
                n = _readv(fd, self._iov)
            except BlockingIOError:
                if self._tls is None:
                    self._more = False  # (a TLS read set it: plaintext may be left in the TLS state)
                continue
            except trio.ClosedResourceError:
                raise self._closed_error() from None
            except OSError as exc:
                self._peer_done.set()
                raise self._fail(WebSocketClosedError(None, f"transport error: {exc}")) from exc
            self._more = n == READ_SIZE
            if n:
                self._reads += 1
                self._bytes_in += n
            return buf[:n]

    def _read_tls(self, fd: int) -> memoryview:
        """Read ciphertext into the TLS state and decrypt every whole record: the plaintext (empty: EOF).

        A partial record, or records without application data (TLS 1.3 session tickets, key
        updates), give no plaintext: :class:`BlockingIOError`, as if nothing had arrived. The
        peer's close_notify and a TCP EOF without one are both EOF (the WebSocket sees a close
        without a close frame, as on plain TCP). The end is sticky: once reported, later reads
        report it again.

        Raises:
            BlockingIOError: no plaintext yet (wait for readability).
            OSError: the socket failed, or the TLS records are bad (:class:`ssl.SSLError`).
        """
        tls = self._tls
        assert tls is not None
        if tls.end is not None:
            if isinstance(tls.end, OSError):
                raise tls.end
            return memoryview(b"")
        incoming = tls.incoming
        # with a buffer it returns the count; typeshed says bytes (a type compiled code checks)
        read: Callable[[int, memoryview], int] = tls.ssl_object.read  # type: ignore[assignment]
        pending = tls.ssl_object.pending
        try:
            n = _readv(fd, self._iov)
        except BlockingIOError:
            n = -1  # (input the upgrade or a full read left in the BIO may still decrypt)
        if n > 0:
            self._reads += 1
            self._bytes_in += n
            with self._buf[:n] as data:
                incoming.write(data)
                tls.records.fed(data)
        elif n == 0:
            incoming.write_eof()
        more = n == READ_SIZE
        plain = _plain_buffer()
        got = 0
        with memoryview(plain) as out:
            try:
                while got < READ_SIZE:
                    k = read(READ_SIZE - got, out[got:])
                    if not k:  # the peer's close_notify (CPython returns 0 for it, no exception)
                        tls.end = EOFError()
                        break
                    got += k
                    if not incoming.pending and not pending() and not incoming.eof:
                        break  # all decrypted (saves the SSLWantReadError a further read raises)
                else:
                    more = True  # plaintext left in the TLS state
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                tls.end = EOFError()  # close_notify, or EOF without one
            except ssl.SSLError as exc:
                tls.end = exc  # garbage or a bad record: the connection is over
        if tls.end is not None:
            more = True  # report the end on the next read, after this plaintext
            if not got:
                self._more = False
                if isinstance(tls.end, OSError):
                    raise tls.end
                return memoryview(b"")
        self._more = more
        if not got:
            raise BlockingIOError
        return memoryview(plain)[:got]

    async def _read_stream(self) -> bytes | bytearray:
        try:
            data = await self._stream.receive_some(READ_SIZE)
        except trio.ClosedResourceError:
            raise self._closed_error() from None
        except (trio.BrokenResourceError, OSError) as exc:
            self._peer_done.set()
            raise self._fail(WebSocketClosedError(None, f"transport error: {exc}")) from exc
        if data:
            self._reads += 1
            self._bytes_in += len(data)
        return data

    async def _on_peer_close(self, event: CloseFrameReceived) -> None:
        self._peer_done.set()
        wire = 1005 if event.code is None else event.code
        error = WebSocketClosedError(wire, event.reason)
        if self._error is None:
            self._error = error
        if not self._close_started:
            # Answer with the same code (RFC 6455 §5.5.1), then drop the socket: after both close
            # frames nothing may be sent, and the server side closes TCP first.
            self._close_started = True
            with trio.move_on_after(self.close_timeout):
                try:
                    await self._write_control(frame_close(event.code, event.reason, mask=self._client))
                    while self._sending and not self._transport_closed.is_set():
                        await self._idle.park()  # the sender writes our reply after its batch
                except ConnectionClosedError:
                    pass
            self._send_close_notify()
            self._close_transport_now()

    # ------------------------------------------------------------------------------------ send

    async def send_message(self, payload: bytes | bytearray | memoryview) -> None:
        """Send one binary message (see :meth:`send_messages`)."""
        await self.send_messages((payload,))

    async def send_messages(self, payloads: Sequence[bytes | bytearray | memoryview]) -> None:
        """Frame every payload and write them all with one write.

        Not safe for concurrent callers: the owner serializes writes.

        Raises:
            WebSocketClosedError: the connection is closing or closed, or the transport failed.
            trio.BusyResourceError: another task is sending.

        Cancellation:
            A cancellation point. If cancelled after part of the batch was written the stream is
            corrupt: close the connection (the relay does, since a cancelled send ends the session).
        """
        await self._take_send_side()
        await self._write(frame_parts(payloads, mask=self._client))
        self._messages_out += len(payloads)

    @property
    def has_unsent(self) -> bool:
        """Whether a :meth:`send_nowait` left bytes that the next send (or :meth:`flush`) writes."""
        return bool(self._unsent)

    def send_nowait(self, payloads: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Write the framed payloads now, without waiting, if the connection is idle.

        For small control traffic (a heartbeat echo) from a task other than the usual sender: it
        saves waking that sender. It writes only when nothing else is being or waiting to be
        written (no send in progress, no pending pong or close reply, no earlier unsent tail),
        on plain TCP, and the socket takes at least one byte. If the socket takes only part of
        it, the rest is kept and written first by the next send; :attr:`has_unsent` tells the
        caller to arrange one (:meth:`flush`).

        Returns:
            True if the messages now belong to the connection (written, or their tail kept);
            False if nothing was written: send them the usual way.
        """
        fd = self._fd
        if (
            fd < 0
            or self._sending
            or self._pending_control
            or self._unsent
            or self._close_started
            or self._error is not None
        ):
            return False
        if len(payloads) == 1 and not self._client:
            # one message, the relay's usual write: its header and the payload object (no call)
            payload = payloads[0]
            size = len(payload)
            if size < 126:
                parts: list[Buffer] = [bytes((0x82, size)), payload]
            elif size < 65536:
                parts = [_HEAD16 + size.to_bytes(2, "big"), payload]
            else:
                parts = frame_parts(payloads, mask=False)
        else:
            parts = frame_parts(payloads, mask=self._client)
        if self._tls is not None:
            # Encrypted, the records are part of the TLS stream: they are ours now, whatever the
            # socket takes (a full socket keeps them all; a broken one fails the next send).
            try:
                data = self._seal(b"".join(parts))
            except ssl.SSLError:
                return False
            parts = [data]
            try:
                n = _write(fd, data)
            except OSError:
                n = 0
        else:
            try:
                n = _write_parts(fd, parts)
            except OSError:
                return False  # full (EAGAIN) or broken: the usual send path waits or reports it
        if n:
            self._writes += 1
        self._bytes_out += n
        self._messages_out += len(payloads)
        if n < _total(parts):
            self._unsent = _rest(parts, n)
        return True

    def _seal(self, data: bytes) -> bytes:
        """What goes on the wire for ``data``: itself, or under TLS its records (and any record the
        TLS state made meanwhile, e.g. a key update's answer). Raises :class:`ssl.SSLError`."""
        tls = self._tls
        if tls is None:
            return data
        if data:
            tls.ssl_object.write(data)
        return tls.outgoing.read()

    async def flush(self) -> None:
        """Write what a partial :meth:`send_nowait` left (a no-op checkpoint when nothing is left).

        Raises:
            WebSocketClosedError: the transport failed.
            trio.BusyResourceError: another task is sending.
        """
        while self._sending and self._control_writing:
            await self._idle.park()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this WebSocket")
        if not self._unsent:
            await trio.lowlevel.checkpoint()
            return
        await self._write([])

    async def _take_send_side(self) -> None:
        """Before a send: wait out the receiving task's pong or close reply, refuse a second sender.

        The receiving task writes control frames itself when nobody is sending; the owner's sender
        then waits for that write (it is not a second sender), so one owner never sees
        ``BusyResourceError`` from the connection's own housekeeping.
        """
        if self._close_started or self._error is not None:
            await trio.lowlevel.checkpoint()
            raise self._closed_error()
        while self._sending and self._control_writing:
            await self._idle.park()
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this WebSocket")
        if self._close_started or self._error is not None:
            raise self._closed_error()  # (the peer's close arrived while we waited)

    async def _write_control(self, frame: bytes) -> None:
        if self._sending:
            # The active sender writes it right after its batch (no interleaving inside a frame).
            self._pending_control += frame
            await trio.lowlevel.checkpoint()
        else:
            self._control_writing = True
            try:
                await self._write([frame])
            finally:
                self._control_writing = False

    async def _write(self, parts: list[Buffer]) -> None:
        self._sending = True
        try:
            if self._tls is not None:
                parts = [self._seal_or_fail(b"".join(parts))]
            if self._unsent:  # (already on the wire's terms: ciphertext under TLS)
                parts, self._unsent = self._unsent + parts, []
            await self._write_all(parts)
            while self._pending_control:
                control, self._pending_control = self._pending_control, b""
                await self._write_all([self._seal_or_fail(control)])
        finally:
            self._sending = False
            if self._idle:
                self._idle.unpark_all()

    def _seal_or_fail(self, data: bytes) -> bytes:
        if self._tls is None:
            return data
        try:
            return self._seal(data)
        except ssl.SSLError as exc:
            self._peer_done.set()
            raise self._fail(WebSocketClosedError(None, f"transport error: {exc}")) from exc

    async def _write_all(self, parts: list[Buffer]) -> None:
        """Write ``parts`` in order, waiting while the socket is full (the one write seam).

        On a socket the parts go out with ``writev`` (:func:`_write_parts`: no joined copy of
        header and payload; under TLS they are one sealed buffer already); any other stream gets
        them joined, with one ``send_all``.
        """
        sock = self._sock
        try:
            if sock is None:
                data = b"".join(parts)
                await self._stream.send_all(data)
                self._writes += 1
                self._bytes_out += len(data)
                return
            await trio.lowlevel.checkpoint_if_cancelled()
            total = _total(parts)
            left = total
            while True:
                fd = self._fd
                if fd < 0:
                    raise trio.ClosedResourceError
                if left:  # (an empty write still checks the socket is open)
                    try:
                        n = _write_parts(fd, parts)
                        self._writes += 1
                        left -= n
                        if left:
                            parts = _rest(parts, n)
                    except BlockingIOError:
                        pass
                if left <= 0:
                    break
                await trio.lowlevel.wait_writable(sock)
            self._bytes_out += total
        except trio.ClosedResourceError:
            raise self._closed_error() from None
        except (trio.BrokenResourceError, OSError) as exc:
            self._peer_done.set()
            raise self._fail(WebSocketClosedError(None, f"transport error: {exc}")) from exc

    # ----------------------------------------------------------------------------------- close

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Close the connection: send a close frame, wait briefly for the peer's, drop the socket.

        Idempotent; a second call waits until the first has closed the transport. The whole close
        handshake is bounded by :attr:`close_timeout` (the peer may not be reading), after which the
        socket is dropped anyway, so this never hangs.

        Args:
            code: the close code (1000-4999, see :func:`frame_close`).
            reason: a short reason, clipped by :func:`rescue._codes.clip_close_reason`.

        Raises:
            ValueError: ``code`` may not be sent on the wire.

        Cancellation:
            If cancelled, the socket is closed at once (no close handshake) and ``Cancelled``
            propagates, like :meth:`trio.abc.AsyncResource.aclose`.
        """
        if self._close_started:
            await self._transport_closed.wait()
            return
        frame = frame_close(code, reason, mask=self._client)  # validates before any state change
        self._close_started = True
        if self._error is None:
            self._error = WebSocketClosedError(code, reason)
        # (no `finally` with an await: compiled, it re-raised the exception its caller was
        # handling -- docs/decisions/0022-compiled-hot-path.md)
        try:
            with trio.move_on_after(self.close_timeout):
                if not self._peer_done.is_set():
                    try:
                        await self._write_control(frame)
                        self._close_sent = True
                        await self._wait_peer_close()
                    except (ConnectionClosedError, ProtocolError):
                        pass
        except BaseException:
            await self._drop_transport()
            raise
        await self._drop_transport()

    async def _drop_transport(self) -> None:
        """The end of :meth:`close`: close_notify if TLS, then the socket now (or the stream, forcefully)."""
        self._send_close_notify()
        if not self._close_transport_now():
            await trio.aclose_forcefully(self._stream)

    async def _wait_peer_close(self) -> None:
        if self._receiving:
            await self._peer_done.wait()
            return
        # Nobody is reading: drain and discard until the peer's close frame or EOF, so the
        # close frame we sent is not destroyed by a reset (closing a socket with unread input
        # sends RST, and the peer may lose our close frame).
        self._receiving = True
        try:
            while not self._peer_done.is_set() and not self._parser.closed:
                if self._sock is not None:
                    data: bytes | bytearray | memoryview | None = await self._read_socket()
                else:
                    data = await self._read_stream()
                if not data:
                    break
                try:
                    self._parser.feed(data)
                finally:
                    if isinstance(data, memoryview):
                        data.release()
                self._parser.data_to_send()  # no pongs while closing
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """:meth:`close` with ``NORMAL`` (1000)."""
        await self.close(CloseCode.NORMAL)

    def abort(self) -> None:
        """Close the transport now, without a close handshake (the peer sees 1006).

        Works for TCP, TLS over TCP and trio's memory streams; a custom stream that has no
        synchronous way to close is only marked closed (use :meth:`close` for those).
        """
        self._close_started = True
        if self._error is None:
            self._error = WebSocketClosedError(None, "aborted locally")
        self._close_transport_now()

    def _send_close_notify(self) -> None:
        """Under TLS, end the TLS stream cleanly before the socket closes: best effort, no wait.

        After both close frames, or when the close handshake timed out; not from :meth:`abort`
        (the peer then sees a TCP end without close_notify, as for any dropped connection), and
        not while a write is under way (its records would be cut).
        """
        tls = self._tls
        sock = self._sock
        if tls is None or sock is None or self._sending or self._transport_closed.is_set():
            return
        try:
            tls.ssl_object.unwrap()
        except ssl.SSLError:
            pass  # (SSLWantReadError: it would wait for the peer's close_notify; we do not)
        data = b"".join(self._unsent) + tls.outgoing.read()
        self._unsent = []
        fd = sock.fileno()
        if data and fd >= 0:
            try:
                os.write(fd, data)
            except OSError:
                pass

    def _close_transport_now(self) -> bool:
        """Close the transport synchronously if possible; ``False`` if it needs an await."""
        if self._transport_closed.is_set():
            return True
        self._transport_closed.set()
        closed_hook = self.on_transport_closed
        if closed_hook is not None:
            self.on_transport_closed = None
            closed_hook()
        self._peer_done.set()
        self._idle.unpark_all()
        poller = self._poller
        if poller is not None and self._sock is not None:
            self._poller = None
            fd = self._sock.fileno()
            if fd >= 0:
                poller.unregister(fd)  # while the number is still ours; wakes a parked reader
        self._fd = -1  # (before the close: the number may be reused at once)
        try:
            return _close_now(self._stream)
        except OSError as exc:  # pragma: no cover - close(2) failing is not actionable
            log_event(_logger, "websocket.close_failed", level=logging.DEBUG, error=str(exc))
            return True

    def _closed_error(self) -> WebSocketClosedError:
        """Why the connection ended, as a new exception to raise (see :func:`rescue.errors.unraised`)."""
        if self._error is None:
            self._error = WebSocketClosedError(None, "connection closed")
        return unraised(self._error)

    def _fail(self, error: WebSocketClosedError) -> WebSocketClosedError:
        """Record ``error`` (unless an earlier one stands), drop the transport; the error to raise."""
        if self._error is None:
            self._error = error
        self._close_transport_now()
        return unraised(self._error)

    async def __aenter__(self) -> WebSocketConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close(CloseCode.NORMAL)
