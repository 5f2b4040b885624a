"""A relay session's trio shell: one nursery for everything, one timer, and the core's answers applied.

Lifecycle::

    Session(...) in the table ── run() opens the nursery ── attach(ws) starts PeerLink.run in it
          │                                                      │
          └─ one timer task: sleeps until core.next_deadline(), then core.tick(now)
          last link released (ENDED) ──► removed from the table ──► nursery drains ──► run() returns

The links' liveness deadlines are not on the session's timer: the node's :class:`LivenessWheel`
(the table's, run by :meth:`SessionTable.run_liveness`) hands a core whose peer fell silent back
to its session (decision 0025), so a live peer's heartbeat moves no trio deadline.

Every connection of the session (including one waiting for its partner) runs in the session's
nursery, inside the session's cancel scope: :meth:`Session.cancel` tears all of it down by
structure. What happens is decided by :class:`~rescue.sessions._core.SessionCore`; this class
only turns its flags and actions into pumps, wake-ups and closes (:meth:`Session.apply`). The
session's lifecycle (paired, joined, rejoined, replaced, left, closed, ended) arrives as actions
too and is handled in one place, :meth:`Session._lifecycle`: that is where logs, the activation
report and tracing span events hook in.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Awaitable, Callable, Iterator

import trio

from rescue._clock import run_clock
from rescue._codes import clip_close_reason
from rescue._log import get_logger, log_event, scrub, session_tag
from rescue._tracing import RecordedSpan, new_record
from rescue.protocol import NONCE_SIZE, Caps, Role
from rescue.sessions._config import SessionLimits
from rescue.sessions._core import (
    ACTIONS,
    ACTIVE,
    CLOSE,
    CLOSED,
    ECHO_NOW,
    ENDED,
    JOINED,
    LEFT,
    PAIRED,
    PEER_CLOSED,
    QUIET,
    REARM,
    REJOINED,
    REPLACED,
    RESUME,
    WRITE,
    WRITE_NOW,
    WRITE_PARTNER,
    WRITE_SELF,
    Link,
    LivenessWheel,
    SessionCore,
)
from rescue.sessions._link import PeerLink
from rescue.sessions._stats import RelayStats
from rescue.sessions._transport import Transport

__all__ = ["Session", "SessionTable"]

_LOG = get_logger("rescue.sessions")
# The session span's events, by lifecycle action (docs/operations/tracing.md).
_SPAN_EVENTS = {
    JOINED: "joined",
    REJOINED: "rejoined",
    REPLACED: "replaced",
    LEFT: "left",
    PAIRED: "paired",
    CLOSED: "closed",
    PEER_CLOSED: "peer_closed",
}


class SessionTable:
    """The sessions of one node, by session id, and their liveness wheel.

    Args:
        max_sessions: the most sessions at once (the relay answers ``OVERLOADED`` past it).

    Attributes:
        wheel: every session's liveness deadline; :meth:`run_liveness` must run while sessions do.
    """

    __slots__ = ("_sessions", "max_sessions", "wheel")

    def __init__(self, *, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self.wheel = LivenessWheel()

    async def run_liveness(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Time out the sessions' silent peers until cancelled: sleep until the wheel's next slot, take it."""
        wheel = self.wheel
        task_status.started()
        try:
            while True:
                with trio.CancelScope(deadline=wheel.next_at()) as scope:
                    wheel.wake = functools.partial(_sooner, scope)
                    await trio.sleep_forever()
                wheel.wake = None
                now = trio.current_time()
                for core in wheel.due(now):
                    core.shell.liveness_due(now)
        finally:
            wheel.wake = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        """The live session with this id, if any."""
        return self._sessions.get(session_id)

    def full(self) -> bool:
        """Whether a new session would exceed ``max_sessions``."""
        return len(self._sessions) >= self.max_sessions

    def add(self, session: Session) -> None:
        """Register a new session (its id must not be taken)."""
        if session.session_id in self._sessions:
            raise ValueError("session id already in the table")
        self._sessions[session.session_id] = session

    def discard(self, session: Session) -> None:
        """Remove ``session`` if it is the one registered under its id."""
        if self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]

    def liveness_statistics(self) -> dict[str, int | float]:
        """The wheel's counters for ``/debug/stats``: sessions filed, filed again, timed out."""
        wheel = self.wheel
        return {"filed": len(wheel), "refiled": wheel.refiled, "fired": wheel.fired, "tick_s": wheel.tick_s}

    def connections(self) -> int:
        """Connections currently holding a role (for the gauge)."""
        return sum(s.connected for s in self._sessions.values())


def _sooner(scope: trio.CancelScope, deadline: float) -> None:
    if deadline < scope.deadline:
        scope.deadline = deadline


class Session:
    """One relay session (SPEC §2 "Relay behaviour"): a :class:`SessionCore` and its trio mechanics.

    Args:
        session_id: the session id from the token and HELLO.
        table: the node's table; the session adds itself and removes itself when it ends.
        limits: the node's session limits.
        stats: the node's counters.
        cohort: the guardrail cohort of the token that created the session.
        on_paired: called once, synchronously, when both roles are connected for the first time
            (the relay reports an activation).
    """

    __slots__ = (
        "_nursery",
        "_opted_out",
        "_pending",
        "_scope",
        "_table",
        "_timer",
        "clock",
        "cohort",
        "core",
        "limits",
        "on_paired",
        "run_clock",
        "session_id",
        "span",
        "stats",
        "tag",
    )

    def __init__(
        self,
        session_id: str,
        *,
        table: SessionTable,
        limits: SessionLimits,
        stats: RelayStats,
        cohort: str = "",
        on_paired: Callable[[Session], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self.tag = session_tag(session_id)
        self.limits = limits
        self.stats = stats
        self.cohort = cohort
        self.on_paired = on_paired
        # the run's clock, asked directly on the per-message path (trio.current_time() costs twice as much)
        self.clock = trio.lowlevel.current_clock()
        self.run_clock = run_clock(self.clock)  # the same time, read in compiled code (rescue._clock)
        self.core: SessionCore[PeerLink] = SessionCore(
            limits, stats, now=self.clock.current_time(), wheel=table.wheel
        )
        self.core.shell = self
        self._table = table
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._pending: list[PeerLink] = []
        self._timer: trio.CancelScope | None = None
        # The session's span (``relay.session``): from the first handshake to the end, with the
        # lifecycle as events; None while tracing is off or once a peer's token forbids analytics.
        self.span: RecordedSpan | None = None
        self._opted_out = False
        table.add(self)

    # ------------------------------------------------------------------------------------------
    # queries

    @property
    def ended(self) -> bool:
        """True once the session left the table (it takes no new connections)."""
        return self.core.ended

    @property
    def paired(self) -> bool:
        """True once both roles have been connected at the same time."""
        return self.core.paired

    @property
    def connected(self) -> int:
        """How many roles currently hold a connection (0-2)."""
        return self.core.connected

    def peer(self, role: Role) -> PeerLink | None:
        """The connection holding ``role``, if any."""
        link = self.core.peer(role)
        return None if link is None else link.handle

    def statistics(self) -> dict[str, object]:
        """A snapshot for ``/debug/stats`` (session id only as a tag)."""
        deadline = self.core.timer_deadline()
        return {
            "session": self.tag,
            "paired": self.core.paired,
            "peers": {
                role.value: None if link is None else link.statistics()
                for role, link in zip((Role.HOST, Role.GUEST), self.core.slots, strict=True)
            },
            "deadline_in_s": None if math.isinf(deadline) else round(deadline - trio.current_time(), 3),
        }

    # ------------------------------------------------------------------------------------------
    # running

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the session's nursery until the last connection is gone.

        Resource handling:
            Every connection attached to the session runs in this nursery; when this returns, all
            their tasks have ended and their sockets are closed or aborted.

        Cancellation:
            Cancelling the task (or :meth:`cancel`) aborts every connection of the session.
        """
        try:
            with self._scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    pending, self._pending = self._pending, []
                    for conn in pending:
                        nursery.start_soon(conn.run)
                    task_status.started()
                    await self._run_timer()
        finally:
            self._nursery = None
            self._end()

    async def _run_timer(self) -> None:
        """Sleep until the core's next deadline, then let it fire what is due; until the session ends."""
        core = self.core
        while not core.ended:
            with trio.CancelScope(deadline=core.next_deadline()) as timer:
                self._timer = timer
                await trio.sleep_forever()
            self._timer = None
            now = trio.current_time()
            if now >= timer.deadline:
                core.tick(now)
                self._run_actions()

    def start_task(self, fn: Callable[[trio.Event], Awaitable[object]], arg: trio.Event) -> bool:
        """Start ``fn(arg)`` in the session's nursery (a link's writer); False before :meth:`run` began."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, arg)
        return True

    def cancel(self) -> None:
        """Tear the session down now: every connection is aborted, no closing handshake."""
        self._end()
        self._scope.cancel()

    def _end(self) -> None:
        self.core.end()
        self._table.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        recorded, self.span = self.span, None
        if recorded is not None:
            recorded.set_attribute("paired", self.core.paired)
            recorded.end()

    # ------------------------------------------------------------------------------------------
    # tracing

    def trace_handshake(
        self,
        handshake: RecordedSpan,
        role: Role,
        *,
        created: bool,
        analytics_allowed: bool,
        **attributes: object,
    ) -> None:
        """Tie the session span to a handshake that is about to attach ``role`` (call before :meth:`attach`).

        The first handshake starts the span (when tracing is on) and becomes its parent; later ones
        are links. A token without the analytics bit (``fb`` bit 0) drops the span for good:
        nothing per session is exported for a session any of whose peers opted out.

        Args:
            created: this handshake created the session (it starts the span).
            attributes: the span's attributes when it starts (node, cohort).
        """
        if self._opted_out:
            return
        if not analytics_allowed:
            self._opted_out = True
            self.span = None
            return
        if self.span is None:
            if not created:
                return  # tracing was off when the session started: no half span
            self.span = new_record("relay.session", session=self.tag, **attributes)
            if self.span is None:
                return
            self.span.parent = handshake
        else:
            self.span.link(handshake, role=role.value)

    def _span_event(self, kind: int, link: Link[PeerLink] | None) -> None:
        span = self.span
        if span is None:
            return
        fields: dict[str, object] = {}
        if link is not None:
            fields["role"] = link.role.value
            if kind == CLOSED:
                if link.close_code is None:
                    fields["transport_lost"] = True
                else:
                    fields["code"] = int(link.close_code)
                    # a peer's own CLOSE reason is its text: clipped and scrubbed like a log line
                    fields["reason"] = scrub(clip_close_reason(link.close_reason or ""))
                span.set_attribute("close_code", fields.get("code"))
            elif kind == PEER_CLOSED and link.close_code is not None:
                fields["code"] = int(link.close_code)  # the code of the peer's CLOSE
        span.add_event(_SPAN_EVENTS[kind], **fields)

    # ------------------------------------------------------------------------------------------
    # the core's answers

    def apply(self, conn: PeerLink, flags: int, batch: list[bytes], now: float) -> None:
        """Carry out the core's flags for a ``receive(conn, batch, now)`` or ``sent(conn, now)``."""
        if flags & ACTIONS:
            self._run_actions()
        if flags & (WRITE_NOW | WRITE_PARTNER):
            partner = self.core.slots[conn.link.other]
            if partner is not None:  # (one that closed during the call got a CLOSE action)
                if flags & WRITE_NOW:
                    partner.handle.write_now(batch, now)
                else:
                    partner.handle.pump(now)
        if flags & ECHO_NOW:
            conn.write_now(batch, now)
        elif flags & WRITE_SELF:
            conn.pump(now)

    def liveness_due(self, now: float) -> None:
        """The wheel says a link's liveness deadline passed: the core times it out (or files it again)."""
        if not self.core.ended:
            self.core.tick(now)
            self._run_actions()

    def rearm(self) -> None:
        """Move the session's timer to the core's next deadline."""
        if self._timer is not None:
            self._timer.deadline = self.core.next_deadline()

    def _run_actions(self) -> None:
        core = self.core
        now = trio.current_time()
        while True:
            actions = core.take_actions()
            if not actions:
                return
            for kind, link in actions:
                if link is None:
                    if kind == REARM:
                        self.rearm()
                    else:
                        self._lifecycle(kind, None)
                elif kind == WRITE:
                    link.handle.pump(now)
                elif kind == CLOSE:
                    link.handle.begin_close()
                elif kind == RESUME:
                    link.handle.resume()
                elif kind in (QUIET, ACTIVE):
                    link.handle.transport.set_quiet(kind == QUIET)
                else:
                    self._lifecycle(kind, link)

    def _lifecycle(self, kind: int, link: Link[PeerLink] | None) -> None:
        """The session's lifecycle events (the one place for logs, reports and span events)."""
        if kind in _SPAN_EVENTS:
            self._span_event(kind, link)
        if kind == PAIRED:
            if self.on_paired is not None:
                self.on_paired(self)
        elif kind == PEER_CLOSED:
            assert link is not None
            log_event(_LOG, "relay.session_closed_by_peer", session=self.tag, code=link.ws_code)
        elif kind == ENDED:
            self._end()

    # ------------------------------------------------------------------------------------------
    # connections

    def attach(
        self,
        transport: Transport,
        role: Role,
        nonce: bytes,
        caps: Caps,
        *,
        initial: list[bytes] | None = None,
    ) -> PeerLink:
        """A verified connection takes ``role``: WELCOME to it, PEER ``joined``/``rejoined`` to its partner.

        An existing connection of the same role is replaced (closed with ``REPLACED``).

        Raises:
            ProtocolError: the HELLO nonce was already used in this session (a replayed HELLO).
            RuntimeError: the session has ended (the caller must make a new one).
        """
        conn = PeerLink(transport, session=self, initial=initial)
        conn.link = self.core.attach(
            role, nonce, caps, now=trio.current_time(), server_nonce=os.urandom(NONCE_SIZE), handle=conn
        )
        if self._nursery is not None:
            self._nursery.start_soon(conn.run)
        else:
            self._pending.append(conn)
        self._run_actions()
        return conn

    def close(
        self,
        conn: PeerLink,
        code: int,
        reason: str,
        *,
        reconnect_in_ms: int | None = None,
        deadline: float | None = None,
    ) -> None:
        """Close one connection with ``code`` (a framing error, the node shutting down)."""
        self.core.close(
            conn.link, code, reason, trio.current_time(), reconnect_in_ms=reconnect_in_ms, deadline=deadline
        )
        self._run_actions()

    def lost(self, conn: PeerLink) -> None:
        """``conn``'s transport died or its task ended (idempotent)."""
        self.core.connection_lost(conn.link, trio.current_time())
        self._run_actions()

    def close_all(
        self, code: int, reason: str, *, reconnect_in_ms: int | None = None, deadline: float | None = None
    ) -> None:
        """Close every connection of the session with ``code`` (CLOSE message + close frame)."""
        self.core.close_all(
            code, reason, trio.current_time(), reconnect_in_ms=reconnect_in_ms, deadline=deadline
        )
        self._run_actions()
