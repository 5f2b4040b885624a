"""One peer's connection inside a session: a reader pump, a writer pump and a bounded outbound queue.

Data path (see ``docs/decisions/0004-relay-flow-control.md``)::

    peer A socket ──► A.reader ──(whole batch)──► B.fifo ──► B.writer ──► peer B socket
                         │                          ▲
                         └─ HEARTBEAT echo ──► A.prio ──► A.writer ──► peer A socket

- The reader parses headers only. CONTROL/DATA messages go to the partner's FIFO as the very list
  the transport returned (no copy when a batch is all relayed frames). HEARTBEAT is echoed into the
  connection's own priority list, so echoes never wait behind data.
- Shortcut (decision 0006): when the target connection's writer is idle (no write in progress,
  nothing queued), the reader writes the batch or the echo itself with one non-blocking
  ``send_nowait`` instead of waking the writer. It never waits: a full socket means "queue as
  usual", and a partial write counts as queued until the writer has flushed its tail, so the
  FIFO bounds and the single-writer order hold.
- Read-ahead (decision 0007): while the reader waits, the node's read poller reads and parses
  ready input itself and offers it to :meth:`PeerConn.handle_now`, which does the two common
  cases above synchronously when nothing has to wait (a partner with room, no rate limit) and
  otherwise returns False untouched, so the reader is woken with the batch. A connection that
  sent only heartbeats for ``quiet_after_s`` is marked quiet (its transport looks at it less
  often); its next CONTROL/DATA marks it, and its partner, active again.
- The FIFO is bounded in frames and bytes. When it is full the sender's reader stops reading (TCP
  pushes back on the sender); while it waits, its liveness deadline is suspended (the stall is the
  partner's fault) and the relay sends it a HEARTBEAT with seq 0 every ``heartbeat_s`` so the sender
  still sees the relay alive.
- Liveness is a cancel-scope deadline around the reader, pushed forward by each inbound batch: a
  quiet socket costs nothing until the deadline fires.
- Closing is a request (:meth:`PeerConn.request_close`): the reader stops at once, the writer finishes
  (or flushes, for a forwarded peer CLOSE) under the close deadline, then the CLOSE message and the
  WebSocket close go out under the same deadline; anything left when it passes is aborted.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Final

import trio

from rescue._codes import CloseCode
from rescue._log import get_logger
from rescue.errors import ProtocolError
from rescue.protocol import HEADER_SIZE, Kind, decode_header, encode_frame
from rescue.protocol._messages import MAX_CLOSE_REASON_BYTES, Caps, Close, PeerInfo, Role
from rescue.sessions._config import LIVENESS_SLACK_S, MAX_PRIORITY_FRAMES, SessionLimits
from rescue.sessions._limits import TokenBucket
from rescue.sessions._stats import RelayStats
from rescue.sessions._transport import TRANSPORT_ERRORS, Transport

if TYPE_CHECKING:
    from rescue.sessions._session import Session

__all__ = ["RELAY_HEARTBEAT", "PeerConn", "websocket_close_code"]

_LOG = get_logger("rescue.sessions")

# What the relay sends a sender it is holding back: a HEARTBEAT whose seq 0 no peer ever uses.
RELAY_HEARTBEAT: Final = encode_frame(Kind.HEARTBEAT, seq=0)
_HEARTBEAT: Final = int(Kind.HEARTBEAT)
_CLOSE: Final = int(Kind.CLOSE)
_HELLO: Final = int(Kind.HELLO)
# Fast-path test on the raw header bytes: version 1, kind CONTROL (0) or DATA (1), no reserved
# flag bits. The rest of the header is authenticated end to end (it is the AEAD's AAD).
_VERSION: Final = 1
_MAX_RELAYED_KIND: Final = 1
_RESERVED_FLAGS: Final = 0xFC
# Close codes a WebSocket close frame may carry (RFC 6455 §7.4): a peer's CLOSE body may name others.
_SENDABLE_WS_CODES: Final = frozenset({1000, 1001, 1002, 1003, *range(1007, 1015)})


def websocket_close_code(code: int) -> int:
    """``code`` if a close frame may carry it, else 1000."""
    return code if code in _SENDABLE_WS_CODES or 3000 <= code <= 4999 else 1000


def _all_relayed(batch: list[bytes]) -> bool:
    """Whether every message is CONTROL/DATA with a well-formed fixed header (forwarded as is)."""
    for message in batch:
        if (
            len(message) < HEADER_SIZE
            or message[1] > _MAX_RELAYED_KIND
            or message[0] != _VERSION
            or message[2] & _RESERVED_FLAGS
        ):
            return False
    return True


def _is_lone_heartbeat(message: bytes) -> bool:
    """A HEARTBEAT as peers send it: version 1, no flags, channel 0, empty body (echoed as is)."""
    return (
        len(message) == HEADER_SIZE
        and message[1] == _HEARTBEAT
        and message[0] == _VERSION
        and not message[2]
        and not message[3]
    )


def _clip_reason(reason: str) -> str:
    data = reason.encode()[:MAX_CLOSE_REASON_BYTES]
    return data.decode("utf-8", "ignore")


class PeerConn:
    """One peer connection of a session, run by the session's nursery.

    Created by the relay after a valid HELLO and handed to :meth:`Session.attach`, which starts
    :meth:`run` in the session's nursery. Everything the connection owns (both pumps, its queues,
    its socket) ends with that task.

    Args:
        transport: the connection (a WebSocket after the upgrade).
        session: the session it belongs to.
        role: the peer's role.
        nonce: the peer's HELLO nonce.
        caps: the peer's capabilities.
        limits: the node's session limits.
        stats: the node's counters.
        initial: messages that arrived in the same read as HELLO, handled before reading more.
    """

    __slots__ = (
        "_bucket",
        "_clean",
        "_close_body",
        "_close_code",
        "_close_deadline",
        "_close_reason",
        "_dead",
        "_done",
        "_fifo",
        "_fifo_t0",
        "_flush",
        "_flush_needed",
        "_initial",
        "_last_data",
        "_last_in",
        "_limits",
        "_live",
        "_prio",
        "_q_bytes",
        "_q_frames",
        "_q_peak_bytes",
        "_q_peak_frames",
        "_quiet",
        "_reader_scope",
        "_space",
        "_stats",
        "_wake",
        "_writer_scope",
        "caps",
        "closing",
        "info",
        "nonce",
        "role",
        "session",
        "transport",
    )

    def __init__(
        self,
        transport: Transport,
        *,
        session: Session,
        role: Role,
        nonce: bytes,
        caps: Caps,
        limits: SessionLimits,
        stats: RelayStats,
        initial: list[bytes] | None = None,
    ) -> None:
        self.transport = transport
        self.session = session
        self.role = role
        self.nonce = nonce
        self.caps = caps
        self.info = PeerInfo(role=role, nonce=nonce, caps=caps)
        self.closing = False
        self._limits = limits
        self._stats = stats
        self._initial = initial
        # outbound: priority list (heartbeat echoes) and the bounded FIFO of batches
        self._prio: list[bytes] = []
        self._fifo: deque[list[bytes]] = deque()
        self._fifo_t0 = 0.0
        self._q_frames = 0
        self._q_bytes = 0
        self._q_peak_frames = 0
        self._q_peak_bytes = 0
        self._flush_needed = False  # an inline write left a tail in the transport: writer flushes
        self._wake = trio.lowlevel.ParkingLot()  # the writer waits here for work
        self._space = trio.lowlevel.ParkingLot()  # partners' readers wait here for room
        self._reader_scope = trio.CancelScope()
        self._writer_scope = trio.CancelScope()
        self._live: trio.CancelScope | None = None
        self._bucket: TokenBucket | None = None
        self._last_data = trio.current_time()  # last inbound CONTROL/DATA
        self._last_in = self._last_data  # last inbound message of any kind (liveness)
        self._quiet = False  # told the transport that only heartbeats arrive
        # closing state
        self._flush = False
        self._close_code: int | None = None
        self._close_reason = ""
        self._close_body: bytes | None = None
        self._close_deadline = math.inf
        self._dead = False
        self._clean = False
        self._done = trio.Event()

    # ------------------------------------------------------------------------------------------
    # queue API (sync; called by the partner's reader and by the session)

    def has_room(self) -> bool:
        """Whether the outbound FIFO is below both of its bounds."""
        return self._q_frames < self._limits.queue_max_frames and self._q_bytes < self._limits.queue_max_bytes

    def push_batch(self, messages: list[bytes], size: int) -> None:
        """Append a batch (ownership passes to this connection) to the FIFO and wake the writer."""
        if not self._fifo:
            self._fifo_t0 = trio.current_time()
        self._fifo.append(messages)
        self._q_frames += len(messages)
        self._q_bytes += size
        if self._q_bytes > self._q_peak_bytes:
            self._q_peak_bytes = self._q_bytes
        if self._q_frames > self._q_peak_frames:
            self._q_peak_frames = self._q_frames
        if self._wake:
            self._wake.unpark_all()

    def send_batch_now(self, messages: list[bytes], size: int) -> bool:
        """Write a relayed batch at once if this connection's writer is idle and its queue empty.

        The partner's reader calls it instead of :meth:`push_batch` at light load: one write from
        the reader instead of a hand-off to the writer task (a task switch and a wake-up per batch).
        It never waits: if a write is in progress or anything is queued, it returns False and the
        caller queues as usual. If the socket took only part of the batch, the whole batch counts
        as queued (the FIFO bounds still hold) until the writer has flushed the tail.
        """
        if self._prio or self._fifo or self._flush_needed or self.closing:
            return False
        transport = self.transport
        if not transport.send_nowait(messages):
            return False
        if transport.has_unsent:
            self._hold_tail(len(messages), size)
        else:
            self._stats.forward_latency.observe_first()  # written at once: latency ~0
        return True

    def send_priority(self, message: bytes) -> bool:
        """Send ahead of data (a heartbeat echo): written at once when idle, else the priority lane.

        Returns:
            False if dropped (the priority lane is full).
        """
        if not self._prio and not self._fifo and not self._flush_needed and not self.closing:
            transport = self.transport
            if transport.send_nowait([message]):
                if transport.has_unsent:
                    self._hold_tail(0, 0)
                return True
        return self.push_priority(message)

    def _hold_tail(self, frames: int, size: int) -> None:
        """A write at once was partial: count it as queued and have the writer flush the tail."""
        if not self._q_frames:
            self._fifo_t0 = trio.current_time()
        self._q_frames += frames
        self._q_bytes += size
        if self._q_bytes > self._q_peak_bytes:
            self._q_peak_bytes = self._q_bytes
        if self._q_frames > self._q_peak_frames:
            self._q_peak_frames = self._q_frames
        self._flush_needed = True
        if self._wake:
            self._wake.unpark_all()

    def push_ordered(self, message: bytes) -> None:
        """Queue a relay message that must stay in order with data (WELCOME, PEER, a peer's CLOSE)."""
        self.push_batch([message], len(message))

    def push_priority(self, message: bytes) -> bool:
        """Queue a message ahead of data (heartbeat echoes); False if dropped (queue full)."""
        if len(self._prio) >= MAX_PRIORITY_FRAMES:
            return False
        self._prio.append(message)
        if self._wake:
            self._wake.unpark_all()
        return True

    @property
    def queued_frames(self) -> int:
        """Messages in the outbound FIFO (including the batch being written)."""
        return self._q_frames

    @property
    def queued_bytes(self) -> int:
        """Bytes in the outbound FIFO (including the batch being written)."""
        return self._q_bytes

    def statistics(self) -> dict[str, int | bool]:
        """A snapshot of the outbound queue (for ``/debug/stats``)."""
        return {
            "queued_frames": self._q_frames,
            "queued_bytes": self._q_bytes,
            "peak_queued_frames": self._q_peak_frames,
            "peak_queued_bytes": self._q_peak_bytes,
            "priority_frames": len(self._prio),
            "closing": self.closing,
        }

    # ------------------------------------------------------------------------------------------
    # closing

    def request_close(
        self,
        code: int,
        reason: str,
        *,
        send_body: bool = True,
        reconnect_in_ms: int | None = None,
        flush: bool = False,
        deadline: float | None = None,
    ) -> None:
        """Ask this connection to close with ``code`` (idempotent; the first request wins).

        Args:
            code: the close code (CLOSE body and WebSocket close frame).
            reason: human-readable text (clipped to 123 UTF-8 bytes).
            send_body: send a CLOSE message before the WebSocket close frame.
            reconnect_in_ms: for ``SERVER_SHUTDOWN``: when the client should reconnect.
            flush: deliver everything already queued first (a forwarded peer CLOSE).
            deadline: absolute ``trio.current_time()`` by which the close must be done; default
                now + ``close_timeout_s``. Past it the socket is aborted.
        """
        if self.closing:
            return
        reason = _clip_reason(reason)
        body = Close(code, reason, reconnect_in_ms).to_message() if send_body else None
        self._begin_close(code, reason, body, flush=flush, deadline=deadline)

    def _lost(self) -> None:
        """The transport died under us: no close handshake, just release everything."""
        self._dead = True
        self._begin_close(None, "", None, flush=False, deadline=None)

    def _begin_close(
        self, code: int | None, reason: str, body: bytes | None, *, flush: bool, deadline: float | None
    ) -> None:
        if self.closing:
            return
        self.closing = True
        self._close_code = code
        self._close_reason = reason
        self._close_body = body
        self._flush = flush
        if deadline is None:
            deadline = trio.current_time() + self._limits.close_timeout_s
        self._close_deadline = deadline
        if code is None:
            self._stats.transport_lost += 1
        else:
            self._stats.count_close(code)
            if code == CloseCode.HEARTBEAT_TIMEOUT:
                self._stats.idle_pruned += 1
        self._reader_scope.cancel()
        self._writer_scope.deadline = deadline
        if not flush:
            self._drop_queue()
        self._wake.unpark_all()
        self._space.unpark_all()
        self.session._release(self)

    def _drop_queue(self) -> None:
        if self._q_frames:
            self._stats.frames_discarded += self._q_frames
        self._fifo.clear()
        self._prio.clear()
        self._q_frames = self._q_bytes = 0

    async def wait_done(self) -> None:
        """Wait until the connection's task has finished and its socket is closed or aborted."""
        await self._done.wait()

    # ------------------------------------------------------------------------------------------
    # the connection task

    async def run(self) -> None:
        """Run both pumps, then close the socket; started by the session in its nursery.

        Resource handling:
            The transport is closed (bounded by the close deadline) or aborted before this
            returns, whatever happens.

        Cancellation:
            Cancelling (the session or the node tearing down) skips the closing handshake and aborts
            the socket.
        """
        try:
            if self._limits.max_bytes_per_s:
                burst = self._limits.burst_bytes or self._limits.max_bytes_per_s
                self._bucket = TokenBucket(self._limits.max_bytes_per_s, burst, now=trio.current_time())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reader)
                await self._writer()
                nursery.cancel_scope.cancel()
            await self._finish_close()
        except* Exception as group:
            # A bug in one connection must not take the node down: log it and drop the socket.
            self._stats.internal_errors += 1
            _LOG.error("relay.connection_error", exc_info=group, extra={"event": "relay.connection_error"})
        finally:
            if not self.closing:
                self._lost()
            if not self._clean:
                self.transport.abort()
            self._done.set()

    async def _finish_close(self) -> None:
        if self._dead or self._close_code is None:
            return
        with trio.move_on_at(self._close_deadline):
            if self._close_body is not None:
                try:
                    await self.transport.send_messages([self._close_body])
                except ProtocolError:
                    pass  # after a framing error the WebSocket takes no more messages; the code still goes
                except TRANSPORT_ERRORS:
                    return
            try:
                await self.transport.close(websocket_close_code(self._close_code), self._close_reason)
            except TRANSPORT_ERRORS:
                return
            self._clean = True

    async def _writer(self) -> None:
        transport = self.transport
        stats = self._stats
        with self._writer_scope:
            try:
                while True:
                    if not self._prio and not self._fifo and not self._flush_needed:
                        if self.closing:
                            return
                        await self._wake.park()
                        continue
                    if self.closing and not self._flush:
                        return
                    # (an unsent tail goes out first, whatever this write carries; [] flushes it)
                    self._flush_needed = False
                    prio = self._prio
                    fifo = self._fifo
                    frames = self._q_frames
                    size = self._q_bytes
                    t0 = self._fifo_t0
                    if prio:
                        self._prio = []
                        messages = prio
                        for batch in fifo:
                            messages += batch
                    elif len(fifo) == 1:
                        messages = fifo[0]
                    else:
                        messages = []
                        for batch in fifo:
                            messages += batch
                    fifo.clear()
                    await transport.send_messages(messages)
                    if frames:
                        # queued bytes count until written: memory stays within the bound
                        self._q_frames -= frames
                        self._q_bytes -= size
                        stats.forward_latency.observe(trio.current_time() - t0)
                        if self._space:
                            self._space.unpark_all()
            except ProtocolError:
                return  # the reader hit a framing error and is closing the connection with its code
            except TRANSPORT_ERRORS:
                self._lost()
                return
        if self._writer_scope.cancelled_caught:
            # the close deadline passed mid-write: the stream is in an unknown state
            self._dead = True

    async def _reader(self) -> None:
        transport = self.transport
        timeout = self._limits.liveness_timeout_s
        batch = self._initial
        self._initial = None
        self._last_in = trio.current_time()
        with self._reader_scope:
            try:
                while True:
                    # Liveness: a deadline that fires when no message came for `timeout`. It is
                    # pushed lazily (see _touch), so it may fire early: then it is re-armed from
                    # the last message, and only a real silence closes the connection.
                    live = self._live = trio.CancelScope(deadline=self._last_in + timeout + LIVENESS_SLACK_S)
                    with live:
                        while True:
                            if batch:
                                handled, batch = batch, None
                                if not await self._handle(handled):
                                    return
                            batch = await transport.receive_messages()
                            self._touch(trio.current_time())
                    if trio.current_time() - self._last_in >= timeout:
                        break
            except ProtocolError as exc:
                self.request_close(exc.code, str(exc))
                return
            except TRANSPORT_ERRORS:
                self._lost()
                return
        if self._reader_scope.cancelled_caught:
            return
        self.request_close(CloseCode.HEARTBEAT_TIMEOUT, f"no message for {timeout:g} s (3 x heartbeat_s)")

    def _touch(self, now: float) -> None:
        """A message arrived: note it for liveness, and push the deadline if it is close.

        The deadline moves only once less than one heartbeat interval is left on it (every
        third heartbeat of a quiet peer, not every one: moving a trio deadline is the dearest
        thing an idle connection does). If the peer then goes silent the deadline fires early,
        and the reader re-arms it from ``_last_in``: the timeout stays exact to the slack.
        """
        self._last_in = now
        live = self._live
        limits = self._limits
        if live is not None and live.deadline < now + limits.heartbeat_s:
            live.deadline = now + limits.liveness_timeout_s + LIVENESS_SLACK_S

    def handle_now(self, batch: list[bytes]) -> bool:
        """Handle a batch without waiting if it is one of the common cases; else do nothing.

        The shared read poller's read-ahead (decision 0007) offers every batch it reads while the
        reader waits: CONTROL/DATA for a partner with room (and no rate limit), or a lone
        HEARTBEAT, are handled right there and the reader task is not woken. Anything else
        (backpressure, throttling, CLOSE, bad input) returns False untouched and goes to the
        reader, which handles it exactly as before.
        """
        if self.closing:
            return False
        now = trio.current_time()
        if _all_relayed(batch):
            partner = self.session.partner_of(self)
            if self._bucket is not None or (partner is not None and not partner.has_room()):
                return False
            self._deliver(partner, batch, sum(map(len, batch)), now)
        elif len(batch) == 1 and _is_lone_heartbeat(batch[0]):
            self._echo(batch[0], now)
        else:
            return False
        self._touch(now)
        return True

    def _echo(self, heartbeat: bytes, now: float) -> None:
        if self.send_priority(heartbeat):  # the echo is the very same bytes
            self._stats.heartbeats_echoed += 1
        else:
            self._stats.heartbeats_dropped += 1
        quiet_after = self._limits.quiet_after_s
        if quiet_after and not self._quiet and now - self._last_data >= quiet_after:
            self._quiet = True
            self.transport.set_quiet(True)

    def _set_active(self) -> None:
        """Data flows (or is about to): have the transport look at this socket at once again."""
        if self._quiet:
            self._quiet = False
            self.transport.set_quiet(False)

    async def _handle(self, batch: list[bytes]) -> bool:
        """Handle one read's messages; False once the connection is closing."""
        if _all_relayed(batch):
            # the common case: every message is CONTROL/DATA, forward the list as it is
            await self._forward(batch)
            return not self.closing
        if len(batch) == 1 and _is_lone_heartbeat(batch[0]):
            # the next most common: a lone HEARTBEAT (version 1, no flags, channel 0, empty body)
            self._echo(batch[0], trio.current_time())
            return not self.closing
        run: list[bytes] = []
        for message in batch:
            if (
                len(message) >= HEADER_SIZE
                and message[1] <= _MAX_RELAYED_KIND
                and message[0] == _VERSION
                and not message[2] & _RESERVED_FLAGS
            ):
                run.append(message)
                continue
            kind = message[1] if len(message) > 1 else -1
            if kind == _HEARTBEAT and len(message) == HEADER_SIZE:
                decode_header(message)  # validates the rest of the header
                self._echo(message, trio.current_time())
                continue
            if run:
                await self._forward(run)
                run = []
                if self.closing:
                    return False
            if kind == _CLOSE:
                self._peer_close(message)
                return False
            header = decode_header(message)  # raises ProtocolError for garbage and unknown kinds
            if header.kind is Kind.HEARTBEAT:
                raise ProtocolError("HEARTBEAT has an empty body")
            if kind == _HELLO:
                raise ProtocolError("second HELLO on a live connection")
            raise ProtocolError(f"{header.kind.name} is sent by the relay, never by a peer")
        if run:
            await self._forward(run)
        return not self.closing

    def _peer_close(self, message: bytes) -> None:
        header = decode_header(message)
        close = Close.decode(message[HEADER_SIZE:]) if header.kind is Kind.CLOSE else None
        if close is None:  # pragma: no cover - kind byte already checked
            raise ProtocolError("not a CLOSE")
        self.session._peer_closed(self, message, int(close.code), close.reason)

    async def _forward(self, messages: list[bytes]) -> None:
        size = sum(map(len, messages))
        partner = self.session.partner_of(self)
        if partner is not None and not partner.has_room():
            partner = await self._wait_for_room()
        now = trio.current_time()
        self._deliver(partner, messages, size, now)
        if self._bucket is not None:
            delay = self._bucket.consume(size, now)
            if delay > 0:
                self._stats.throttle_waits += 1
                await self._throttle(delay)

    def _deliver(self, partner: PeerConn | None, messages: list[bytes], size: int, now: float) -> None:
        """Hand a batch to the partner (written at once or queued), or count it discarded."""
        stats = self._stats
        self._last_data = now
        if self._quiet:
            # The first message after a quiet spell (it waited up to quiet_tick_s): the partner's
            # answer is likely next, so the partner is looked at at once again too.
            self._set_active()
            if partner is not None:
                partner._set_active()
        if partner is None:
            stats.frames_discarded += len(messages)
            return
        if not partner.send_batch_now(messages, size):
            partner.push_batch(messages, size)
        count = len(messages)
        stats.messages_forwarded += count
        stats.bytes_forwarded += size
        stats.message_sizes.observe(size / count, count)

    async def _throttle(self, delay: float) -> None:
        """Stop reading for ``delay`` seconds, with the liveness deadline suspended (our doing)."""
        live = self._live
        assert live is not None
        live.deadline = math.inf
        try:
            await trio.sleep(delay)
        finally:
            self._resume_liveness(live)

    def _resume_liveness(self, live: trio.CancelScope) -> None:
        """After a stall of our making: the peer gets a full timeout from now."""
        now = self._last_in = trio.current_time()
        live.deadline = now + self._limits.liveness_timeout_s + LIVENESS_SLACK_S

    async def _wait_for_room(self) -> PeerConn | None:
        """Backpressure: wait until the partner's FIFO has room (or the partner is gone).

        While waiting, this connection's liveness deadline is suspended and the relay sends it a
        HEARTBEAT (seq 0) every ``heartbeat_s`` so the peer does not take the relay for dead.
        """
        self._stats.backpressure_stalls += 1
        live = self._live
        assert live is not None
        live.deadline = math.inf
        heartbeat_s = self._limits.heartbeat_s
        try:
            while True:
                partner = self.session.partner_of(self)
                if partner is None or partner.has_room():
                    return partner
                with trio.move_on_after(heartbeat_s) as idle:
                    await partner._space.park()
                if idle.cancelled_caught and self.push_priority(RELAY_HEARTBEAT):
                    self._stats.relay_heartbeats += 1
        finally:
            self._resume_liveness(live)
