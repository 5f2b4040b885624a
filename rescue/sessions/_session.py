"""A relay session: two roles, their connections, pairing timers, and one nursery that owns it all.

Lifecycle::

    Session(...) in the table ── run() opens the nursery ── attach(conn) starts conn.run() in it
          │                                                        │
          └─ timers: pair_timeout_s while alone and never paired,  │
                     resume_grace_s after the partner left          │
          last connection released ──► removed from the table ──► nursery drains ──► run() returns

Every connection of the session (including one waiting for its partner) runs in the session's
nursery, inside the session's cancel scope: :meth:`Session.cancel` tears all of it down by structure.
Bookkeeping (the two role slots) only decides *who* gets PEER events and timeouts.

Invariant: a role slot holds only a connection that is not closing. A connection releases its slot
synchronously when it starts closing, so the partner learns ``left`` at once and a reconnecting peer
takes the role without waiting for the old socket's closing handshake.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Final

import trio

from rescue._codes import CloseCode
from rescue._log import get_logger, log_event, session_tag
from rescue.errors import ProtocolError
from rescue.protocol._messages import NONCE_SIZE, PeerEvent, PeerEventKind, Role, Welcome
from rescue.sessions._config import MAX_RECENT_NONCES, SessionLimits
from rescue.sessions._conn import PeerConn, websocket_close_code
from rescue.sessions._stats import RelayStats

__all__ = ["Session", "SessionTable"]

_LOG = get_logger("rescue.sessions")
_OTHER: Final = {Role.HOST: Role.GUEST, Role.GUEST: Role.HOST}


class SessionTable:
    """The sessions of one node, by session id.

    Args:
        max_sessions: the most sessions at once (the relay answers ``OVERLOADED`` past it).
    """

    __slots__ = ("_sessions", "max_sessions")

    def __init__(self, *, max_sessions: int) -> None:
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

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

    def connections(self) -> int:
        """Connections currently holding a role (for the gauge)."""
        return sum(s.connected for s in self._sessions.values())


class Session:
    """One relay session (SPEC §2 "Relay behaviour").

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
        "_ended",
        "_ending",
        "_nonces",
        "_nursery",
        "_paired",
        "_peers",
        "_pending",
        "_scope",
        "_seen",
        "_table",
        "_timer",
        "_timer_deadline",
        "cohort",
        "limits",
        "on_paired",
        "session_id",
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
        self._table = table
        self._peers: dict[Role, PeerConn | None] = {Role.HOST: None, Role.GUEST: None}
        self._seen: set[Role] = set()
        self._nonces: deque[bytes] = deque(maxlen=MAX_RECENT_NONCES)
        self._paired = False
        self._ending = False  # a peer sent CLOSE: no PEER left, no grace
        self._ended = False  # out of the table; no new connections
        self._scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._pending: list[PeerConn] = []
        self._timer: trio.CancelScope | None = None
        self._timer_deadline = trio.current_time() + limits.pair_timeout_s
        table.add(self)

    # ------------------------------------------------------------------------------------------
    # queries

    @property
    def ended(self) -> bool:
        """True once the session left the table (it takes no new connections)."""
        return self._ended

    @property
    def paired(self) -> bool:
        """True once both roles have been connected at the same time."""
        return self._paired

    @property
    def connected(self) -> int:
        """How many roles currently hold a connection (0-2)."""
        return (self._peers[Role.HOST] is not None) + (self._peers[Role.GUEST] is not None)

    def peer(self, role: Role) -> PeerConn | None:
        """The connection holding ``role``, if any."""
        return self._peers[role]

    def partner_of(self, conn: PeerConn) -> PeerConn | None:
        """The connection holding the other role, if any."""
        return self._peers[_OTHER[conn.role]]

    def statistics(self) -> dict[str, object]:
        """A snapshot for ``/debug/stats`` (session id only as a tag)."""
        return {
            "session": self.tag,
            "paired": self._paired,
            "peers": {
                role.value: None if conn is None else conn.statistics() for role, conn in self._peers.items()
            },
            "deadline_in_s": None
            if math.isinf(self._timer_deadline)
            else round(self._timer_deadline - trio.current_time(), 3),
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
                    await self._supervise()
        finally:
            self._nursery = None
            self._end(emptied=False)

    async def _supervise(self) -> None:
        """Fire PAIR_TIMEOUT / PEER_GONE when the session's single deadline passes."""
        while not self._ended:
            with trio.CancelScope(deadline=self._timer_deadline) as timer:
                self._timer = timer
                await trio.sleep_forever()
            self._timer = None
            if self._ended or trio.current_time() < self._timer_deadline:
                continue
            self._timer_deadline = math.inf
            for conn in list(self._peers.values()):
                if conn is None:
                    continue
                if self._paired:
                    conn.request_close(
                        CloseCode.PEER_GONE, f"partner did not return within {self.limits.resume_grace_s} s"
                    )
                else:
                    conn.request_close(
                        CloseCode.PAIR_TIMEOUT, f"no partner within {self.limits.pair_timeout_s:g} s"
                    )

    def _set_deadline(self, deadline: float) -> None:
        self._timer_deadline = deadline
        if self._timer is not None:
            self._timer.deadline = deadline

    def cancel(self) -> None:
        """Tear the session down now: every connection is aborted, no closing handshake."""
        self._end(emptied=False)
        self._scope.cancel()

    def close_all(
        self, code: int, reason: str, *, reconnect_in_ms: int | None = None, deadline: float | None = None
    ) -> None:
        """Close every connection of the session with ``code`` (CLOSE message + close frame)."""
        self._ending = True
        for conn in list(self._peers.values()):
            if conn is not None:
                conn.request_close(code, reason, reconnect_in_ms=reconnect_in_ms, deadline=deadline)

    def _end(self, *, emptied: bool) -> None:
        if self._ended:
            return
        self._ended = True
        self._table.discard(self)
        if emptied:
            self.stats.sessions_emptied += 1
        if self._timer is not None:
            self._timer.cancel()

    # ------------------------------------------------------------------------------------------
    # connections

    def attach(self, conn: PeerConn) -> None:
        """Give ``conn`` its role: WELCOME to it, PEER ``joined``/``rejoined`` to its partner.

        An existing connection of the same role is replaced (closed with ``REPLACED``).

        Raises:
            ProtocolError: the HELLO nonce was already used in this session (a replayed HELLO).
            RuntimeError: the session has ended (the caller must make a new one).
        """
        if self._ended:
            raise RuntimeError("session has ended")
        if conn.nonce in self._nonces:
            raise ProtocolError("HELLO replay: this nonce was already used in this session")
        self._nonces.append(conn.nonce)
        role = conn.role
        old = self._peers[role]
        returning = role in self._seen
        self._peers[role] = conn
        self._seen.add(role)
        if old is not None:
            self.stats.rejoins["replaced"] += 1
            old.request_close(CloseCode.REPLACED, "a newer connection took this role")
        elif returning:
            self.stats.rejoins["returned"] += 1
        partner = self._peers[_OTHER[role]]
        conn.push_ordered(
            Welcome(
                ack_nonce=conn.nonce,
                server_nonce=os.urandom(NONCE_SIZE),
                heartbeat_s=self.limits.heartbeat_s,
                max_frame=self.limits.max_frame,
                resume_grace_s=self.limits.resume_grace_s,
                peer=None if partner is None else partner.info,
            ).to_message()
        )
        if partner is not None:
            event: PeerEventKind = "rejoined" if returning else "joined"
            partner.push_ordered(PeerEvent(event, role, conn.nonce, conn.caps).to_message())
            self._set_deadline(math.inf)
            if not self._paired:
                self._paired = True
                self.stats.pairings += 1
                if self.on_paired is not None:
                    self.on_paired(self)
        elif not self._paired:
            self._set_deadline(trio.current_time() + self.limits.pair_timeout_s)
        if self._nursery is not None:
            self._nursery.start_soon(conn.run)
        else:
            self._pending.append(conn)

    def _release(self, conn: PeerConn) -> None:
        """``conn`` started closing: free its role, tell the partner, start the grace timer."""
        role = conn.role
        if self._peers[role] is not conn:
            return  # replaced, or never attached
        self._peers[role] = None
        partner = self._peers[_OTHER[role]]
        if partner is None:
            self._end(emptied=True)
            return
        if self._ending:
            return
        partner.push_ordered(PeerEvent("left", role, conn.nonce, conn.caps).to_message())
        self._set_deadline(trio.current_time() + self.limits.resume_grace_s)

    def _peer_closed(self, conn: PeerConn, message: bytes, code: int, reason: str) -> None:
        """A peer sent CLOSE: it ends the session for both (SPEC §2)."""
        self._ending = True
        if conn.session is self and self._peers[conn.role] is conn:
            partner = self.partner_of(conn)
            if partner is not None:
                partner.push_ordered(message)  # byte for byte, after everything queued before it
                partner.request_close(code, reason, send_body=False, flush=True)
            log_event(_LOG, "relay.session_closed_by_peer", session=self.tag, code=websocket_close_code(code))
        conn.request_close(code, reason, send_body=False)
