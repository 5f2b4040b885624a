"""The trio peer: ``open_peer()`` drives a :class:`~rescue.client._core.PeerCore` over real sockets.

One :class:`Peer` per (session, role). Its nursery holds one connection manager task, which loops:
get a fresh token (one per connection attempt; the last one while the token service is down), connect,
HELLO/WELCOME, then run four tasks for that connection (reader, writer, heartbeat/liveness,
ack/resume timer) until it ends, then decide from the close
code (:func:`rescue.protocol.policy_for`) whether and when to reconnect. Application data written
meanwhile waits in the replay buffer and is resumed losslessly on the next connection.
"""

from __future__ import annotations

import collections
import logging
import math
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import trio

from rescue._codes import CloseCode, clip_close_reason, policy_for
from rescue._log import get_logger, log_event, session_tag
from rescue._tracing import NOOP_SPAN, SpanLike, span, trace_headers
from rescue.client._backoff import BackoffPolicy
from rescue.client._core import (
    RESUME_RETRY_S,
    Acked,
    CloseReceived,
    ControlReceived,
    CoreStatistics,
    DataReceived,
    PeerCore,
    PeerJoined,
    PeerLeft,
    Resumed,
    Welcomed,
)
from rescue.client._tokens import (
    DEFAULT_COHORT,
    TokenClient,
    TokenGrant,
    TokenProvider,
    TokenServiceUnavailable,
)
from rescue.errors import ConnectionClosedError, ProtocolError, RescueError, unraised
from rescue.protocol import DEFAULT_REPLAY_BUFFER_BYTES, BufferFull, Role, derive_psk
from rescue.websocket import WebSocketClosedError, WebSocketConnection, connect_websocket

__all__ = [
    "CLOSE_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "LIVENESS_FACTOR",
    "RECEIVE_QUEUE_SIZE",
    "Connected",
    "ConnectionEvent",
    "PartnerEvent",
    "Peer",
    "Reconnecting",
    "SessionClosed",
    "open_peer",
]

_LOG = get_logger("rescue.client")

# Received messages waiting for the application: 64 frames of at most 64 KiB is 4 MiB, the same
# as the replay buffer. When it is full the reader stops reading, so the relay's queue and then TCP
# push back on the partner (and our liveness clock pauses: a slow application is not a dead link).
RECEIVE_QUEUE_SIZE: Final = 64
# Largest batch the writer hands the WebSocket in one write: enough to amortize the syscall, small
# enough that a heartbeat never waits behind more than ~256 KiB.
WRITE_BATCH_BYTES: Final = 256 * 1024
# TCP connect + WebSocket upgrade + HELLO → WELCOME must finish within this (the relay allows 10 s
# for HELLO alone; a peer that waits longer is better off trying again).
CONNECT_TIMEOUT_S: Final = 15.0
# SPEC §2: no inbound message for 3 x heartbeat_s means the connection is dead.
LIVENESS_FACTOR: Final = 3
# A token kept from the previous connection may stand in for a fresh one while the token service
# is unreachable only if it stays valid this long (the relay allows 30 s of clock skew; a token
# about to expire would waste the attempt).
TOKEN_REFRESH_MARGIN_S: Final = 30.0
# The default close_timeout_s of open_peer(): sending CLOSE and the WebSocket close handshake (or
# answering the relay's close frame) get at most this long.
CLOSE_TIMEOUT_S: Final = 3.0
# The largest message we accept from the relay; WELCOME's max_frame is at most 16 MiB.
MAX_INBOUND_MESSAGE: Final = 16 * 1024 * 1024

# ------------------------------------------------------------------------------------------ events


@dataclass(frozen=True, slots=True)
class Connected:
    """A connection got its WELCOME.

    Attributes:
        relay_url: the node connected to.
        partner_present: whether the partner was already there.
        connection: how many connections this peer has made (1 for the first).
    """

    relay_url: str
    partner_present: bool
    connection: int


@dataclass(frozen=True, slots=True)
class PartnerEvent:
    """The partner joined, left or came back (``event`` is the PEER event name)."""

    event: str


@dataclass(frozen=True, slots=True)
class Reconnecting:
    """The connection ended (or could not be made) and the peer will try again.

    Attributes:
        reason: why, in words (for a status line on stderr).
        code: the close code, if there was one.
        delay: seconds until the next attempt.
        fresh_token: whether a new token is fetched first (always asked for: every connection
            attempt takes a fresh token, or the last one while the token service is unreachable).
    """

    reason: str
    code: int | None
    delay: float
    fresh_token: bool


@dataclass(frozen=True, slots=True)
class SessionClosed:
    """The peer stopped for good.

    Attributes:
        code: the close code (``NORMAL`` after a graceful close by either side), or ``None`` when it
            stopped because of an error without one (see ``error``).
        reason: the reason text.
        local: we closed it (``Peer.aclose``), rather than the partner or the relay.
        error: the error that stopped it, if any (e.g. a ``GuardrailError`` from the token service),
            as a copy without the traceback of where it was raised (:func:`rescue.errors.unraised`).
    """

    code: int | None
    reason: str
    local: bool
    error: RescueError | None = None


ConnectionEvent: TypeAlias = Connected | PartnerEvent | Reconnecting | SessionClosed
Received: TypeAlias = DataReceived | ControlReceived


# -------------------------------------------------------------------------------------- internals


@dataclass(slots=True)
class _Outcome:
    """How one connection ended."""

    code: int | None
    reason: str
    reconnect_in_ms: int | None = None
    local: bool = False  # we closed it on purpose (aclose)


class _Link:
    """One connection's shared state between its four tasks."""

    def __init__(self, ws: WebSocketConnection, url: str, close_timeout_s: float) -> None:
        self.ws = ws
        self.url = url
        self.close_timeout_s = close_timeout_s
        self.outcome: _Outcome | None = None
        self.scope: trio.CancelScope | None = None
        self.welcomed = trio.Event()
        self.heartbeat_s = 15.0
        self.last_inbound = trio.current_time()
        self.delivering = False
        self.heartbeat_due = False
        self.close_request: _Outcome | None = None
        self.writer_lot = trio.lowlevel.ParkingLot()
        self.span: SpanLike = NOOP_SPAN  # the connection's span: lifecycle events only, never per frame

    def finish(self, outcome: _Outcome) -> None:
        """End the connection now (first outcome wins): cancel its tasks, the socket is dropped."""
        if self.outcome is None:
            self.outcome = outcome
        if self.scope is not None:
            self.scope.cancel()

    def request_close(self, outcome: _Outcome) -> None:
        """End it politely: the writer sends what is queued, then CLOSE and a close frame.

        The writer owns the socket's send side, so this never interleaves with a data write; the
        connection is dropped if that takes longer than the peer's ``close_timeout_s``.
        """
        if self.close_request is not None or self.outcome is not None:
            return
        self.close_request = outcome
        self.writer_lot.unpark_all()
        if self.scope is not None:
            # the bound, as a deadline on the connection's scope (ending it like finish(): the
            # outcome is the close request) rather than a guard task: the connection's nursery
            # may already be closed to new tasks while its owner has not resumed yet
            self.scope.deadline = min(self.scope.deadline, trio.current_time() + self.close_timeout_s)


class Peer:
    """One peer of a session, alive across reconnects. Made by :func:`open_peer`.

    Concurrency: any number of tasks may :meth:`send` (each call's bytes stay contiguous, calls
    are served in order); one task should :meth:`receive`.
    """

    def __init__(
        self,
        core: PeerCore,
        tokens: TokenProvider,
        *,
        on_event: Callable[[ConnectionEvent], None] | None,
        backoff: BackoffPolicy,
        receive_queue: int,
        give_up_after: float | None,
        ssl_context: ssl.SSLContext | None,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
    ) -> None:
        self.core = core
        self.close_timeout_s = close_timeout_s
        self._tokens = tokens
        self._on_event = on_event
        self._backoff = backoff
        self._give_up_after = give_up_after
        self._ssl = ssl_context
        self._deliver, self._received = trio.open_memory_channel[Received](receive_queue)
        # What the core accepted (and may already have acked) but the application was not handed
        # yet: a connection that ends while its reader waits for room in the receive queue leaves
        # its event here, and the next connection's reader hands it over first. (Holding it in the
        # reader alone lost it: the partner had its ack and never sent it again.) At most one
        # message's events: the reader hands each over before taking the next message.
        self._undelivered: collections.deque[Received] = collections.deque()
        self._send_lock = trio.Lock()
        self._space = trio.lowlevel.ParkingLot()  # senders waiting for room in the replay buffer
        self._timer_lot = trio.lowlevel.ParkingLot()
        self._acked_lot = trio.lowlevel.ParkingLot()  # drain() waiters
        self._link: _Link | None = None
        self._connected = trio.Event()
        self._partner = trio.Event()
        self._verified = trio.Event()
        self._closed: SessionClosed | None = None
        self._done = trio.Event()
        self._local_close: tuple[int, str] | None = None
        self._manager_scope: trio.CancelScope | None = None
        self._tag = session_tag(core.session_id)

    # ----------------------------------------------------------------------------- public API

    @property
    def role(self) -> Role:
        """Our role."""
        return self.core.role

    @property
    def closed(self) -> SessionClosed | None:
        """How the session ended, or ``None`` while it is alive."""
        return self._closed

    @property
    def partner_present(self) -> bool:
        """Whether the partner is connected right now."""
        return self.core.partner_present

    def statistics(self) -> CoreStatistics:
        """A snapshot of the stream state (sequence numbers, buffers, integrity counters)."""
        return self.core.statistics()

    async def send(self, channel: int, data: bytes | bytearray | memoryview) -> None:
        """Send application bytes on ``channel`` (0-255), split into frames as needed.

        Returns once every byte is in the replay buffer (not when it is delivered: see
        :meth:`drain`). Blocks while the buffer is full (backpressure).

        Raises:
            ConnectionClosedError: the session has ended (or ends while waiting).
            RescueError: the error that ended the session (e.g. ``GuardrailError``).
            ValueError: ``channel`` outside 0-255.

        Cancellation:
            Safe between frames: the frames already queued are sent, the rest are not.
        """
        if not 0 <= channel <= 0xFF:
            raise ValueError(f"channel must be 0-255, not {channel}")
        async with self._send_lock:
            view = memoryview(bytes(data))
            pos = 0
            while True:
                self._raise_if_closed()
                size = min(len(view) - pos, self.core.max_payload)
                if not self.core.can_send(size):
                    await self._space.park()
                    continue
                self.core.send_data(channel, bytes(view[pos : pos + size]))
                self._wake_writer()
                pos += size
                if pos >= len(view):
                    break
                await trio.lowlevel.checkpoint()

    async def send_control(self, data: Mapping[Any, Any]) -> None:
        """Send an application CONTROL map, in order with the data.

        Raises:
            ValueError: the map uses the reserved top-level keys ``ack``/``resume``.
            ConnectionClosedError: the session has ended.
        """
        async with self._send_lock:
            while True:
                self._raise_if_closed()
                try:
                    self.core.send_control(data)
                except BufferFull:
                    await self._space.park()
                    continue
                self._wake_writer()
                await trio.lowlevel.checkpoint()
                return

    async def receive(self) -> DataReceived | ControlReceived:
        """The partner's next DATA or application CONTROL, in order.

        Raises:
            trio.EndOfChannel: the session ended normally (``NORMAL``) and everything was read.
            ConnectionClosedError: it ended otherwise (``code`` and ``reason`` say how).
            RescueError: the error that ended it (e.g. ``GuardrailError``).
        """
        try:
            return await self._received.receive()
        except trio.EndOfChannel:
            closed = self._closed
            if closed is None or closed.code == CloseCode.NORMAL:
                raise
            if closed.error is not None:  # a copy each time: see _raise_if_closed
                raise unraised(closed.error) from None
            raise ConnectionClosedError(_close_code(closed.code), closed.reason) from None

    async def wait_connected(self) -> None:
        """Wait until the first WELCOME (returns at once if the session already ended)."""
        await self._connected.wait()

    async def wait_partner(self) -> None:
        """Wait until the partner has connected at least once (or the session ended)."""
        await self._partner.wait()

    async def wait_partner_verified(self) -> None:
        """Wait until a frame from the partner has authenticated (or the session ended).

        That is the proof the partner holds the same passphrase: a host should not start anything
        for its guest before it. A partner with the wrong passphrase never gets here; the session
        ends with ``INTEGRITY_ERROR`` instead (check :attr:`closed`).
        """
        await self._verified.wait()

    async def wait_closed(self) -> SessionClosed:
        """Wait until the session has ended; how it ended."""
        await self._done.wait()
        assert self._closed is not None
        return self._closed

    async def drain(self) -> None:
        """Wait until the partner has acknowledged every frame sent so far.

        Raises:
            ConnectionClosedError: the session ended first.
        """
        while not self.core.all_acked:
            self._raise_if_closed()
            if self.core.partner_present:
                self.core.flush_ack()  # and nudge our own acks along
                self._wake_writer()
            await self._acked_lot.park()
        await trio.lowlevel.checkpoint()

    async def aclose(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """End the session for both peers: send CLOSE ``code`` (when connected) and stop.

        Idempotent. Call :meth:`drain` first to be sure everything sent was delivered.

        Cancellation:
            The CLOSE and the close handshake are bounded by ``close_timeout_s`` (see :func:`open_peer`).
        """
        if self._closed is not None:
            await self._done.wait()
            return
        if self._local_close is None:
            self._local_close = (int(code), reason)
            link = self._link
            if link is not None:
                self.core.flush_ack()
                link.request_close(_Outcome(int(code), reason, local=True))
            elif self._manager_scope is not None:
                self._manager_scope.cancel()
        await self._done.wait()

    # ----------------------------------------------------------------------------- internals

    def _wake_writer(self) -> None:
        link = self._link
        if link is not None:
            link.writer_lot.unpark_all()

    def _raise_if_closed(self) -> None:
        closed = self._closed
        if closed is None:
            return
        if closed.error is not None:
            # A copy each time (rescue.errors.unraised): raising the kept instance gave it a
            # traceback that grew by the raising frames with every call after the end, and those
            # frames hold this peer, which holds the error: a cycle that pinned the peer, the
            # callers' frames and what they hold until a full pass of the cycle collector.
            raise unraised(closed.error)
        raise ConnectionClosedError(_close_code(closed.code), closed.reason or "session closed")

    def _emit(self, event: ConnectionEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)

    def _finish(self, closed: SessionClosed) -> None:
        if self._closed is None:
            self._closed = closed
            log_event(
                _LOG,
                "client.session_closed",
                session=self._tag,
                role=self.role.value,
                code=closed.code,
                reason=closed.reason,
                local=closed.local,
            )
            self._emit(closed)
        self._deliver.close()
        self._connected.set()  # wake wait_connected()/wait_partner(): they check `closed`
        self._partner.set()
        self._verified.set()
        for lot in (self._space, self._acked_lot, self._timer_lot):
            lot.unpark_all()
        self._done.set()

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The connection manager: connect, run, decide, back off, repeat.

        Cancellation:
            Shielded: only its own scope (``_manager_scope``) ends it, which :meth:`aclose` and
            :func:`open_peer` always cancel. A block cancelled from outside must still be able
            to send its CLOSE through this task's writer; unshielded, the outer cancel stopped the
            writer first, so the CLOSE never left and the close waited out its whole bound.
        """
        with trio.CancelScope(shield=True) as scope:
            self._manager_scope = scope
            task_status.started()
            try:
                await self._manage()
            except RescueError as exc:
                # a copy: the caught one's traceback holds this frame, whose `self` holds it
                self._finish(SessionClosed(None, str(exc), local=False, error=unraised(exc)))
        if self._closed is None:
            local = self._local_close or (int(CloseCode.NORMAL), "closed")
            self._finish(SessionClosed(local[0], local[1], local=True))

    async def _manage(self) -> None:
        attempt = 0
        failing_since: float | None = None
        grant: TokenGrant | None = None
        while self._local_close is None:
            # A fresh token for every attempt: a relay admits a used token only into an empty role
            # slot, so a copy of a live token cannot displace this peer (docs/protocol.md). While
            # the token service is unreachable the last token stands in (reconnects survive a
            # control-plane outage, SPEC §6).
            grant = await self._fetch_token(grant)
            outcome, welcomed = await self._connect_once(grant)
            if outcome.local:
                self._finish(SessionClosed(outcome.code, outcome.reason, local=True))
                return
            policy = policy_for(outcome.code)
            if not policy.reconnect:
                self._finish(SessionClosed(outcome.code, outcome.reason, local=False))
                return
            now = trio.current_time()
            if welcomed:
                attempt = 0
                failing_since = None
            elif failing_since is None:
                failing_since = now
            if (
                self._give_up_after is not None
                and failing_since is not None
                and now - failing_since >= self._give_up_after
            ):
                error = ConnectionClosedError(_close_code(outcome.code), f"gave up: {outcome.reason}")
                self._finish(SessionClosed(outcome.code, outcome.reason, local=False, error=error))
                return
            delay = self._backoff.delay(policy.backoff, attempt, reconnect_in_ms=outcome.reconnect_in_ms)
            attempt += 1
            log_event(
                _LOG,
                "client.reconnecting",
                session=self._tag,
                role=self.role.value,
                code=outcome.code,
                reason=outcome.reason,
                delay_s=round(delay, 3),
            )
            self._emit(Reconnecting(outcome.reason, outcome.code, delay, True))
            await trio.sleep(delay)

    async def _fetch_token(self, previous: TokenGrant | None = None) -> TokenGrant:
        attempt = 0
        while True:
            try:
                return await self._tokens()
            except TokenServiceUnavailable as exc:
                if previous is not None and not previous.expires_within(TOKEN_REFRESH_MARGIN_S):
                    log_event(
                        _LOG,
                        "client.token_reused",
                        session=self._tag,
                        role=self.role.value,
                        error=str(exc)[:200],
                    )
                    return previous
                delay = self._backoff.full_jitter(attempt)
                attempt += 1
                self._emit(Reconnecting(str(exc), None, delay, True))
                await trio.sleep(delay)

    async def _connect_once(self, grant: TokenGrant) -> tuple[_Outcome, bool]:
        """One connection from TCP connect to its end; (how it ended, whether it got a WELCOME).

        One ``client.relay.connection`` span (when tracing is on) covers it, with lifecycle events
        (``welcomed``, ``partner_joined``, ``partner_left``, ``resumed``) and how it ended; its
        ``traceparent`` goes on the upgrade request, so the relay's handshake span is its child.
        """
        with span("client.relay.connection", session=self._tag, role=self.role.value) as s:
            outcome, welcomed = await self._connection(grant, s)
            s.set_attribute("welcomed", welcomed)
            s.set_attribute("close_code", outcome.code)
            s.set_attribute("close_reason", outcome.reason[:100])
            s.set_attribute("local", outcome.local)
            return outcome, welcomed

    async def _connection(self, grant: TokenGrant, connection_span: SpanLike) -> tuple[_Outcome, bool]:
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                ws = await connect_websocket(
                    grant.relay_url,
                    ssl_context=self._ssl,
                    max_message=MAX_INBOUND_MESSAGE,
                    headers=tuple(trace_headers().items()),
                    close_timeout=self.close_timeout_s,
                )
        except trio.TooSlowError:
            return _Outcome(None, f"connect to {grant.relay_url} timed out"), False
        except ConnectionClosedError as exc:
            return _Outcome(None, exc.reason or str(exc)), False
        except ProtocolError as exc:  # HandshakeError: refused upgrade (e.g. 503 draining)
            return _Outcome(None, str(exc)), False
        link = _Link(ws, grant.relay_url, self.close_timeout_s)
        link.span = connection_span
        hello = self.core.connect(grant.token)
        self._link = link
        try:
            async with trio.open_nursery() as nursery:
                link.scope = nursery.cancel_scope
                nursery.start_soon(self._reader, link)
                nursery.start_soon(self._writer, link, hello)
                nursery.start_soon(self._keepalive, link)
                nursery.start_soon(self._timer, link)
        finally:
            self._link = None
            self.core.connection_lost()
            link.ws.abort()  # no-op after a close handshake; otherwise the socket just goes
        outcome = link.outcome or link.close_request or _Outcome(None, "connection ended")
        if self._local_close is not None and not outcome.local:  # the relay answered our CLOSE first
            outcome = _Outcome(*self._local_close, local=True)
        return outcome, link.welcomed.is_set()

    # -------------------------------------------------------------------- per-connection tasks

    async def _hand_over(self, link: _Link) -> None:
        """Give the application every accepted event, in order; cancellable without loss."""
        undelivered = self._undelivered
        while undelivered:
            link.delivering = True
            await self._deliver.send(undelivered[0])
            undelivered.popleft()
            link.delivering = False
            link.last_inbound = trio.current_time()

    async def _reader(self, link: _Link) -> None:
        await self._hand_over(link)  # what an earlier connection could not hand over
        while True:
            try:
                messages = await link.ws.receive_messages()
            except WebSocketClosedError as exc:
                code = exc.wire_code if exc.wire_code not in (None, 1005, 1006) else None
                link.finish(_Outcome(code, exc.reason or "connection closed by the relay"))
                return
            except ProtocolError as exc:  # the relay broke WebSocket framing
                link.request_close(_Outcome(int(exc.code), clip_close_reason(str(exc))))
                return
            link.last_inbound = trio.current_time()
            for message in messages:
                try:
                    events = self.core.receive(message, trio.current_time())
                except ProtocolError as exc:
                    log_event(_LOG, "client.protocol_error", level=logging.WARNING, error=str(exc)[:200])
                    link.request_close(_Outcome(int(exc.code), clip_close_reason(str(exc))))
                    return
                for event in events:
                    if isinstance(event, DataReceived | ControlReceived):
                        self._undelivered.append(event)
                        await self._hand_over(link)
                    elif isinstance(event, CloseReceived):
                        link.finish(_Outcome(event.code, event.reason, event.reconnect_in_ms))
                        return
                    else:
                        self._on_event_from_core(link, event)
            if self.core.partner_verified and not self._verified.is_set():
                link.span.add_event("partner_verified")
                self._verified.set()
            self._wake_writer()
            self._timer_lot.unpark_all()

    def _on_event_from_core(self, link: _Link, event: object) -> None:
        if isinstance(event, Welcomed):
            link.heartbeat_s = float(event.welcome.heartbeat_s)
            link.welcomed.set()
            self._connected.set()
            partner = event.welcome.peer is not None
            link.span.add_event("welcomed", partner=partner)
            if partner:
                self._partner.set()
            log_event(_LOG, "client.connected", session=self._tag, role=self.role.value, partner=partner)
            self._emit(Connected(link.url, partner, self.core.statistics().connections))
        elif isinstance(event, PeerJoined):
            self._partner.set()
            link.span.add_event("partner_joined", rejoined=event.rejoined)
            self._emit(PartnerEvent("rejoined" if event.rejoined else "joined"))
        elif isinstance(event, PeerLeft):
            link.span.add_event("partner_left")
            self._emit(PartnerEvent("left"))
        elif isinstance(event, Acked):
            self._space.unpark_all()
            self._acked_lot.unpark_all()
        elif isinstance(event, Resumed):
            link.span.add_event("resumed", after=event.seq, retransmitted=event.retransmitted)
            log_event(
                _LOG,
                "client.resumed",
                session=self._tag,
                role=self.role.value,
                after=event.seq,
                retransmitted=event.retransmitted,
            )

    async def _writer(self, link: _Link, hello: bytes) -> None:
        try:
            await link.ws.send_message(hello)
            while True:
                if link.close_request is not None:
                    await self._send_close(link, link.close_request)
                    return
                batch: list[bytes] = []
                if link.heartbeat_due:
                    link.heartbeat_due = False
                    batch.append(self.core.heartbeat())
                batch += self.core.data_to_send(WRITE_BATCH_BYTES)
                if not batch:
                    await link.writer_lot.park()
                    continue
                await link.ws.send_messages(batch)
        except WebSocketClosedError as exc:
            code = exc.wire_code if exc.wire_code not in (None, 1005, 1006) else None
            link.finish(_Outcome(code, exc.reason or "connection lost while sending"))

    async def _send_close(self, link: _Link, outcome: _Outcome) -> None:
        """What is queued (for a local close: the last acks, so the partner's drain() ends), then
        CLOSE and the WebSocket close handshake."""
        assert outcome.code is not None
        final = self.core.data_to_send() if outcome.local else []
        final.append(self.core.close_message(outcome.code, outcome.reason))
        try:
            await link.ws.send_messages(final)
            await link.ws.close(outcome.code, outcome.reason)
        except (ConnectionClosedError, ProtocolError):
            pass
        link.finish(outcome)

    async def _keepalive(self, link: _Link) -> None:
        """No WELCOME within the connect timeout, or no message for 3 x heartbeat: give up on it."""
        with trio.move_on_after(CONNECT_TIMEOUT_S):
            await link.welcomed.wait()
        if not link.welcomed.is_set():
            link.finish(_Outcome(None, "no WELCOME from the relay"))
            return
        link.last_inbound = trio.current_time()
        while True:
            await trio.sleep(link.heartbeat_s)
            link.heartbeat_due = True
            self._wake_writer()
            silent = trio.current_time() - link.last_inbound
            if not link.delivering and silent >= LIVENESS_FACTOR * link.heartbeat_s:
                link.finish(_Outcome(None, f"no message from the relay for {silent:.0f} s"))
                return

    async def _timer(self, link: _Link) -> None:
        """Acks and resume retries when their deadlines pass."""
        while True:
            deadline = self.core.next_deadline()
            with trio.move_on_at(math.inf if deadline is None else deadline):
                await self._timer_lot.park()
            self.core.poll(trio.current_time())
            if self.core.has_data_to_send:
                self._wake_writer()


def _close_code(code: int | None) -> CloseCode | None:
    if code is None:
        return None
    try:
        return CloseCode(code)
    except ValueError:
        return None


# --------------------------------------------------------------------------------------- open_peer


@asynccontextmanager
async def open_peer(
    tokens: str | TokenProvider,
    session_id: str,
    role: Role | str,
    passphrase: str | bytes | None = None,
    *,
    psk: bytes | None = None,
    cohort: str = DEFAULT_COHORT,
    service_key: str | None = None,
    on_event: Callable[[ConnectionEvent], None] | None = None,
    max_buffer_bytes: int = DEFAULT_REPLAY_BUFFER_BYTES,
    receive_queue: int = RECEIVE_QUEUE_SIZE,
    backoff: BackoffPolicy | None = None,
    give_up_after: float | None = None,
    ssl_context: ssl.SSLContext | None = None,
    close_timeout_s: float = CLOSE_TIMEOUT_S,
    resume_retry_s: float = RESUME_RETRY_S,
) -> AsyncIterator[Peer]:
    """Join a session as ``role`` through the relay; the peer reconnects and resumes by itself.

    ::

        async with open_peer("http://127.0.0.1:8080", "demo-1", "host", "correct horse") as peer:
            await peer.send(0, b"hello")
            message = await peer.receive()          # DataReceived(channel, data) / ControlReceived

    Args:
        tokens: the token service's base URL (a :class:`TokenClient` is made for it), or any
            ``async () -> TokenGrant`` provider.
        session_id: the session id (1-128 chars of ``[A-Za-z0-9._:-]``).
        role: ``"host"`` or ``"guest"``.
        passphrase: the shared secret; the pre-shared key is derived from it off the event loop
            (Argon2id, ~0.1 s). Give ``psk`` instead to skip the derivation.
        psk: a 32-byte key from :func:`rescue.protocol.derive_psk`.
        cohort: the cohort for :class:`TokenClient`.
        service_key: the bearer key for :class:`TokenClient`.
        on_event: called (synchronously, keep it quick) with every :data:`ConnectionEvent`:
            connected, partner joined/left, reconnecting (with the reason), session closed.
        max_buffer_bytes: bound of the replay buffer (:meth:`Peer.send` blocks when it is full).
        receive_queue: received messages buffered for :meth:`Peer.receive`.
        backoff: reconnect delays (base 250 ms, cap 30 s, full jitter by default).
        give_up_after: stop (``ConnectionClosedError``) after this many seconds of failed attempts
            in a row; ``None`` retries as long as the close codes allow.
        ssl_context: TLS settings for ``wss://`` relays.
        close_timeout_s: the one bound on a close (our CLOSE and the close handshake, or the
            answer to the relay's close frame) before the socket is dropped.
        resume_retry_s: how often our resume is sent again while the partner's has not arrived
            (2 s); with a wrong passphrase the session ends after the third unreadable frame, so
            about twice this.

    Yields:
        The :class:`Peer`. Leaving the block closes the session for both peers (CLOSE ``NORMAL``)
        if it is still open; call :meth:`Peer.drain` first to wait for delivery.

    Raises:
        ValueError: neither or both of ``passphrase`` and ``psk``, or a bad role/session id.

    Resource handling:
        All tasks live in a nursery inside this context manager; nothing outlives the block.
        Exceptions from the block propagate unchanged (not wrapped in an ExceptionGroup).

    Cancellation:
        Cancelling the block closes the connection (the CLOSE is sent under a shielded,
        ``close_timeout_s``-bounded scope).
    """
    if (passphrase is None) == (psk is None):
        raise ValueError("give exactly one of passphrase and psk")
    role = Role(role)
    if psk is None:
        assert passphrase is not None
        secret = passphrase
        psk = await trio.to_thread.run_sync(lambda: derive_psk(secret, session_id))
    core = PeerCore(
        psk=psk,
        session_id=session_id,
        role=role,
        max_buffer_bytes=max_buffer_bytes,
        resume_retry=resume_retry_s,
    )
    provider: TokenProvider
    if isinstance(tokens, str):
        provider = TokenClient(
            tokens, session_id=session_id, role=role, cohort=cohort, service_key=service_key
        )
    else:
        provider = tokens
    peer = Peer(
        core,
        provider,
        on_event=on_event,
        backoff=backoff or BackoffPolicy(),
        receive_queue=receive_queue,
        give_up_after=give_up_after,
        ssl_context=ssl_context,
        close_timeout_s=close_timeout_s,
    )
    error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(peer._run)
        try:
            yield peer
        except BaseException as exc:  # re-raised below, outside the nursery (no ExceptionGroup)
            error = exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(close_timeout_s + 1):
                await peer.aclose()
            if peer._manager_scope is not None:  # shielded from the nursery's cancel (Peer._run)
                peer._manager_scope.cancel()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
