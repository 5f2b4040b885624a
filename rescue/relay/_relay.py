"""The relay node: WebSocket listener, handshake, admin port, control-plane links, shutdown.

Task tree of a running node::

    Relay.run
    ├── services nursery ─ admin HTTP port, token-service poller, key refresher, node registrar,
    │                      read poller, the sessions' liveness wheel (SessionTable.run_liveness)
    └── handlers nursery (drain deadline on shutdown)
        ├── handler per WebSocket ─ rate limit, HELLO, token, attach; then hands the socket to
        │                           its session (WebSocketConnection.detach) and ends
        ├── Session.run per session ─ the session's nursery + its timer (SessionCore decides)
        │   └── PeerLink.run per connection ─ writer pump + reader pump
        └── listeners nursery (cancelled first on shutdown) ─ serve_websocket

Shutdown (:meth:`Relay.shutdown`, SIGTERM in the CLI): ``/readyz`` turns 503, the node registers as
draining, the listener closes, every peer gets CLOSE ``SERVER_SHUTDOWN`` with ``reconnect_in_ms``
drawn uniformly from the drain window, the handlers nursery gets ``drain_s`` to empty, and whatever
is left is cancelled (sockets aborted by structure). Then the services stop, and only after all of
them the registration is removed, once, with a deadline, and the node's own store is closed.
"""

from __future__ import annotations

import contextlib
import functools
import random
import resource
import ssl
import time
from dataclasses import dataclass
from typing import Any, Final

import httpx
import trio

from rescue import _build as build
from rescue._codes import CloseCode, clip_close_reason
from rescue._http import HttpLimits, HttpStats, serve_http
from rescue._log import get_logger, log_event, session_tag
from rescue._tracing import RecordedSpan, outside_record, record_span
from rescue.errors import ConfigError, ProtocolError, TokenError
from rescue.guardrails import GuardrailStore
from rescue.protocol import (
    HEADER_SIZE,
    MAX_RECONNECT_IN_MS,
    MAX_TTL,
    Claims,
    Close,
    Hello,
    KeyRing,
    Kind,
    Role,
    decode_header,
    verify_token,
)
from rescue.relay._admin import admin_app
from rescue.relay._config import RelayConfig
from rescue.relay._control import REGISTER_DEADLINE_S, AssignmentKeeper, ControlLink, KeySource, NodeRegistrar
from rescue.relay._gc import GcPauses
from rescue.relay._metrics import RelayMetrics
from rescue.relay._replay import TokenReplayGuard
from rescue.sessions import (
    TRANSPORT_ERRORS,
    HandshakeLimiter,
    RelayStats,
    Session,
    SessionTable,
    websocket_close_code,
)
from rescue.websocket import (
    POLLER_AVAILABLE,
    ConnectionCap,
    ConnectionStats,
    ReadPoller,
    WebSocketConnection,
    serve_websocket,
)

__all__ = ["Relay", "RelayAddresses"]

_LOG = get_logger("rescue.relay")
_HELLO: Final = int(Kind.HELLO)
# Connections a new session needs: its host's and its guest's. The registry marks the node full once
# the connection cap has room for fewer (Relay.full).
SESSION_PEERS: Final = 2


@dataclass(frozen=True, slots=True)
class RelayAddresses:
    """Where a started relay listens.

    Attributes:
        host: the WebSocket listener's bound address.
        port: its port.
        admin_port: the admin HTTP port, or ``None`` when disabled.
        url: ``ws://host:port/v1/connect`` (``wss://`` with TLS).
    """

    host: str
    port: int
    admin_port: int | None
    url: str


class Relay:
    """One relay node (SPEC §2 "Relay behaviour", §6-§8).

    Args:
        config: every number and address the node uses.
        keys: verification keys to use instead of loading ``config.keys`` (tests, ``rescue dev``).
        store: the guardrail store for node registration; by default a ``RedisStore`` on
            ``config.redis_url`` when that is set, else no registration.
        http_transport: an httpx transport for the token-service link (tests); default real HTTP.
        ssl_context: serve ``wss://`` with this context instead of loading ``tls_cert``/``tls_key``.
        report_key: bearer key for activation reports (``$RESCUE_REPORT_KEY`` in ``rescue relay``);
            kept out of :class:`RelayConfig` so a logged config never shows it.

    Resource handling:
        Everything (listeners, connections, sessions, HTTP clients, registration) lives inside
        :meth:`run` and is gone when it returns.
    """

    def __init__(
        self,
        config: RelayConfig,
        *,
        keys: KeyRing | None = None,
        store: GuardrailStore | None = None,
        http_transport: httpx.AsyncBaseTransport | None = None,
        ssl_context: ssl.SSLContext | None = None,
        report_key: str | None = None,
    ) -> None:
        self.config = config
        self.limits = config.session_limits()
        self.stats = RelayStats()
        self.table = SessionTable(max_sessions=config.max_sessions)
        self.limiter = HandshakeLimiter(
            config.handshakes_per_ip_per_min, max_sources=config.rate_limit_sources
        )
        self.keys = KeySource(config.keys_source, ring=keys)
        self._keys_given = keys is not None
        self.control = ControlLink(
            config.token_service,
            poll_s=config.status_poll_s,
            stale_s=config.status_stale_s,
            paused=config.paused,
            on_drain=self._on_fleet_drain,
            report_key=report_key,
        )
        self._store = store
        self._owned_store: GuardrailStore | None = None
        # one connection per token (cti), on this node and, with a store, fleet-wide
        self.replay = TokenReplayGuard(config.node_id)
        # every collector pause of this process while the node runs (docs/perf/README.md)
        self.gc_pauses = GcPauses()
        self.registrar: NodeRegistrar | None = None
        self.keeper: AssignmentKeeper | None = None
        self._http_transport = http_transport
        self._ssl_context = ssl_context
        # the WebSocket listener's connection cap (made in run(), from the fd limit then) and the
        # admin port's connection counts: both on /metrics
        self.connection_stats = ConnectionStats()
        self.cap: ConnectionCap | None = None
        self.admin_http_stats = HttpStats()
        self.metrics = RelayMetrics(
            self.stats,
            self.table,
            self.control,
            self.keys,
            draining=lambda: self._draining,
            registrar=lambda: self.registrar,
            poller=lambda: self.poller,
            keeper=lambda: self.keeper,
            token_uses=lambda: self.replay.outcomes,
            gc_pauses=self.gc_pauses,
            connections=self.connection_stats,
            max_connections=lambda: self.cap.max_connections if self.cap is not None else 0,
            admin_http=self.admin_http_stats,
        )
        self.addresses: RelayAddresses | None = None
        self._draining = False
        self._shutdown = trio.Event()
        self._stopped = trio.Event()
        self._handlers: trio.Nursery | None = None
        self._client: httpx.AsyncClient | None = None
        # batched read readiness for attached connections (decision 0007)
        self.poller = (
            ReadPoller(
                coalesce_s=config.read_coalesce_s,
                quiet_tick_s=config.quiet_tick_s,
                heartbeat_s=config.heartbeat_s,
            )
            if config.read_poller and POLLER_AVAILABLE
            else None
        )

    # ------------------------------------------------------------------------------------------
    # state

    @property
    def draining(self) -> bool:
        """True once shutdown has begun."""
        return self._draining

    def _is_draining(self) -> bool:
        return self._draining

    def readiness(self) -> dict[str, Any]:
        """``/readyz``: whether the node takes new sessions, and why not."""
        reasons: list[str] = []
        if self._draining:
            reasons.append("draining")
        refusal = self.control.refusal()
        if refusal is not None:
            reasons.append(refusal.reason)
        reasons += self._capacity_reasons()
        cap = self.cap
        return {
            "ready": not reasons and self.addresses is not None,
            "reasons": reasons,
            "draining": self._draining,
            "control": self.control.detail(),
            "sessions": len(self.table),
            "websocket_connections": {
                "open": self.connection_stats.open,
                "pending": cap.pending if cap is not None else 0,
                "max": cap.max_connections if cap is not None else None,
            },
        }

    def _capacity_reasons(self) -> list[str]:
        """Why a newcomer would be refused for want of room (the registry record then says
        ``full`` too: :meth:`full`)."""
        reasons = []
        if self.table.full():  # sessions in their resume grace count: their peers come back
            reasons.append("at max_sessions")
        cap = self.cap
        if cap is not None and cap.full:
            # every WebSocket slot holds a session or a handshake past its HELLO: a newcomer gets
            # 503 server_busy, so the load balancer had better send it elsewhere. Not while any
            # slot is pending (a newcomer displaces it: a HELLO-less flood leaves the node ready).
            reasons.append("at max_connections")
        return reasons

    def full(self) -> bool:
        """Whether a new session cannot be placed here for want of room: ``max_sessions``
        reached, or the connection cap has room for fewer than the session's two peers (one slot
        left would let its first peer in and turn its partner away with ``server_busy``). What
        the registry record says, so the token service assigns new sessions elsewhere."""
        if self.table.full():
            return True
        cap = self.cap
        return cap is not None and cap.room < SESSION_PEERS

    def statistics(self, *, detail: bool = False) -> dict[str, Any]:
        """A JSON-ready snapshot (``/debug/stats``): counts, and per session with ``detail``."""
        s = self.stats
        out: dict[str, Any] = {
            "node_id": self.config.node_id,
            "hot_path": build.describe(),
            "draining": self._draining,
            "sessions": len(self.table),
            "connections": self.table.connections(),
            "websocket_connections": {
                "open": self.connection_stats.open,
                "pending": self.cap.pending if self.cap is not None else 0,
                "max": self.cap.max_connections if self.cap is not None else None,
                "shed": self.connection_stats.shed,
                "refused": self.connection_stats.refused,
                "accept_errors": self.connection_stats.accept_errors,
            },
            "messages_forwarded": s.messages_forwarded,
            "bytes_forwarded": s.bytes_forwarded,
            "frames_discarded": s.frames_discarded,
            "backpressure_stalls": s.backpressure_stalls,
            "rate_limiter_sources": len(self.limiter),
            "closes": {str(k): v for k, v in sorted(s.closes.items())},
            "protocol_errors": dict(sorted(s.protocol_errors.items())),
            "token_uses": dict(self.replay.outcomes),
            "gc": self.gc_pauses.snapshot(),
            "control": self.control.detail(),
            "read_poller": self.poller.statistics() if self.poller is not None else None,
            "liveness_wheel": self.table.liveness_statistics(),
            "tasks": trio.lowlevel.current_statistics().tasks_living,
        }
        if detail:
            out["session_detail"] = [session.statistics() for session in self.table]
        return out

    # ------------------------------------------------------------------------------------------
    # running

    async def run(self, *, task_status: trio.TaskStatus[RelayAddresses] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the node until :meth:`shutdown`, then drain and return.

        Reports :class:`RelayAddresses` through ``task_status`` once the keys are loaded and both
        ports listen.

        Raises:
            ConfigError: the keys or the TLS files cannot be loaded.
            OSError: a port cannot be bound.

        Cancellation:
            Cancelling skips the drain: every connection is aborted.
        """
        config = self.config
        ssl_context = self._ssl_context or _load_tls(config)
        try:
            cap = config.connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self.cap = ConnectionCap(cap, self.connection_stats)
        # httpx only when something is fetched over HTTP: creating a client loads the CA bundle
        # (~50 ms), which a standalone node with a key file never needs.
        needs_http = not self.control.standalone or (self.keys.is_url and not self._keys_given)
        self.gc_pauses.install()
        try:
            async with (
                httpx.AsyncClient(timeout=config.http_timeout_s, transport=self._http_transport)
                if needs_http
                else contextlib.nullcontext(None)
            ) as client:
                self._client = client
                if not self._keys_given:
                    await self.keys.load(client)
                async with trio.open_nursery() as services:
                    if self.poller is not None:
                        # started first, so it outlives the handlers nursery (drained connections
                        # still read their peers' close frames through it)
                        await services.start(self.poller.run)
                    # the sessions' liveness deadlines (decision 0025): outlives the handlers too
                    await services.start(self.table.run_liveness)
                    if client is not None:
                        await services.start(self.control.run, client)
                    if not self._keys_given:
                        services.start_soon(self.keys.run, client, config.keys_refresh_s)
                    admin_port: int | None = None
                    if config.admin_port is not None:
                        admin_host = config.admin_host or config.host
                        admin_port = await services.start(
                            functools.partial(
                                serve_http,
                                admin_app(self),
                                admin_host,
                                config.admin_port,
                                # inside fd_reserve, so a WebSocket flood leaves /healthz its fds
                                limits=HttpLimits(max_connections=config.admin_connections()),
                                stats=self.admin_http_stats,
                            )
                        )
                    await self._serve(ssl_context, admin_port, services, task_status)
                    services.cancel_scope.cancel()
        finally:
            self._client = None
            self.gc_pauses.remove()
            try:
                await self._end_registration()
            finally:
                self._stopped.set()

    async def _end_registration(self) -> None:
        """Every other task has stopped: remove the registration once, then close an owned store.

        Shielded and bounded by :data:`~rescue.relay._control.REGISTER_DEADLINE_S` twice over (the
        removal, then the store's wait for worker threads), so a stalled Redis delays the exit by
        at most that much and the record simply expires.
        """
        registrar, store = self.registrar, self._owned_store
        self.registrar, self._owned_store = None, None
        with trio.CancelScope(shield=True):
            if registrar is not None:
                await registrar.remove()
            if store is not None:
                with trio.move_on_after(REGISTER_DEADLINE_S):
                    await store.aclose()

    async def _serve(
        self,
        ssl_context: ssl.SSLContext | None,
        admin_port: int | None,
        services: trio.Nursery,
        task_status: trio.TaskStatus[RelayAddresses],
    ) -> None:
        config = self.config
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            async with trio.open_nursery() as listeners:
                server = await listeners.start(
                    functools.partial(
                        serve_websocket,
                        self._handle,
                        config.host,
                        config.port,
                        path=config.path,
                        ssl_context=ssl_context,
                        max_message=config.max_frame,
                        handshake_timeout=config.upgrade_timeout_s,
                        handler_nursery=handlers,
                        close_timeout=config.close_timeout_s,
                        cap=self.cap,
                    )
                )
                host, port = server.addresses[0]
                scheme = "wss" if ssl_context is not None else "ws"
                shown = f"[{host}]" if ":" in host else host
                self.addresses = RelayAddresses(
                    host, port, admin_port, f"{scheme}://{shown}:{port}{config.path}"
                )
                await self._start_registration(services)
                log_event(
                    _LOG,
                    "relay.listening",
                    node_id=config.node_id,
                    url=self.addresses.url,
                    admin_port=admin_port,
                )
                task_status.started(self.addresses)
                await self._shutdown.wait()
                listeners.cancel_scope.cancel()  # stop accepting first
            self._begin_drain(handlers)
        self._handlers = None
        log_event(_LOG, "relay.stopped", node_id=config.node_id)

    async def _start_registration(self, services: trio.Nursery) -> None:
        config = self.config
        store = self._store
        if store is None and config.redis_url:
            from rescue.guardrails import RedisStore

            store = self._owned_store = RedisStore(config.redis_url)  # closed by _end_registration
        if store is None:
            return
        self.replay.store = store
        assert self.addresses is not None
        public = config.public_url or self.addresses.url
        self.registrar = NodeRegistrar(
            store, node_id=config.node_id, public_url=public, ttl=config.register_ttl_s, full=self.full
        )
        if self._draining:  # SIGTERM during start-up
            self.registrar.set_draining()
        await services.start(self.registrar.run)
        self.keeper = AssignmentKeeper(
            store,
            node_id=config.node_id,
            ttl=config.assignment_ttl_s,
            sessions=lambda: [session.session_id for session in self.table],
            on_lost=self._on_assignment_lost,
        )
        services.start_soon(self.keeper.run)

    def shutdown(self) -> None:
        """Begin a graceful shutdown (idempotent; SIGTERM in the CLI calls this)."""
        if not self._draining:
            self._draining = True
            log_event(_LOG, "relay.draining", node_id=self.config.node_id, drain_s=self.config.drain_s)
            if self.registrar is not None:
                self.registrar.set_draining()
        self._shutdown.set()

    async def drain(self) -> None:
        """:meth:`shutdown`, then wait until :meth:`run` has returned."""
        self.shutdown()
        await self._stopped.wait()

    async def wait_stopped(self) -> None:
        """Wait until :meth:`run` has returned (registration removed, store closed)."""
        await self._stopped.wait()

    def _begin_drain(self, handlers: trio.Nursery) -> None:
        """Listeners are closed: tell every peer to go, and bound how long they may take."""
        now = trio.current_time()
        deadline = now + self.config.drain_s
        window_ms = min(int(self.config.drain_s * 1000), MAX_RECONNECT_IN_MS)
        for session in self.table:
            for role in (Role.HOST, Role.GUEST):
                conn = session.peer(role)
                if conn is not None:
                    session.close(
                        conn,
                        CloseCode.SERVER_SHUTDOWN,
                        "relay node shutting down",
                        reconnect_in_ms=random.randint(0, window_ms),
                        deadline=deadline,
                    )
        handlers.cancel_scope.deadline = deadline

    def _on_fleet_drain(self) -> None:
        """The operator paused with drain: close every session with GUARDRAIL_TRIPPED."""
        for session in self.table:
            session.close_all(CloseCode.GUARDRAIL_TRIPPED, "fallback paused by the operator (drain)")

    # ------------------------------------------------------------------------------------------
    # handshake

    async def _handle(self, ws: WebSocketConnection) -> None:
        """One WebSocket's handshake, recorded as one ``relay.handshake`` span when tracing is on.

        The span (``rescue._tracing.record_span``, decided when the handshake ends) has the outcome,
        the close code of a refusal, and -- only for sessions whose token allows analytics -- the
        role, the session's short hash and the caller's ``traceparent`` (the upgrade request's
        header) as parent. Nothing of it runs per frame: the session owns the socket afterwards.
        """
        started = trio.current_time()
        with record_span(
            "relay.handshake",
            carrier=dict(ws.request_headers),
            follow_caller=False,  # until the token says the session opted in
            node=self.config.node_id,
        ) as recorded:
            outcome, code = await self._handshake(ws, started, recorded)
            elapsed = trio.current_time() - started
            recorded.set_attribute("outcome", outcome)
            recorded.set_attribute("close_code", code)
        if outcome == "ok":
            self.metrics.handshakes.labels("ok").inc()
            # after the span is recorded, so its trace id can be the exemplar
            self.metrics.handshake_seconds.observe(elapsed, exemplar=recorded.exemplar())

    async def _handshake(
        self, ws: WebSocketConnection, started: float, recorded: RecordedSpan
    ) -> tuple[str, int | None]:
        """Admission, HELLO, token, attach, hand-off to the session; (outcome, close code)."""
        source = ws.remote_addr[0] if ws.remote_addr else "unknown"
        if not self.limiter.allow(source, started):
            return await self._refuse(ws, CloseCode.RATE_LIMITED, "too many handshakes from this address")
        if self._draining:
            return await self._refuse_shutdown(ws)
        refusal = self.control.refusal()
        if refusal is not None:
            return await self._refuse(ws, refusal.code, refusal.reason)
        try:
            with trio.fail_after(self.config.hello_timeout_s):
                batch = await ws.receive_messages()
        except trio.TooSlowError:
            return await self._refuse(
                ws, CloseCode.HEARTBEAT_TIMEOUT, f"no HELLO within {self.config.hello_timeout_s:g} s"
            )
        except ProtocolError as exc:
            self.stats.count_protocol_error(exc.kind)
            return await self._refuse(ws, exc.code, str(exc))
        except TRANSPORT_ERRORS:
            self.metrics.handshakes.labels("disconnected").inc()
            ws.abort()
            return "disconnected", None
        if self.cap is not None:
            # it said something: finishing its handshake is bounded work, never shed it now
            self.cap.established(ws)
        try:
            hello, claims = await self._check_hello(batch[0])
        except (ProtocolError, TokenError) as exc:
            if isinstance(exc, ProtocolError):
                self.stats.count_protocol_error(exc.kind)
            return await self._refuse(ws, exc.code, str(exc))
        token_use = await self.replay.check(claims, time.time())
        if token_use == "elsewhere":
            return await self._refuse(
                ws, CloseCode.TOKEN_EXPIRED, "token already used on another node: fetch a fresh token"
            )
        recorded.set_attribute("cohort", claims.cohort)
        if claims.analytics_allowed:
            recorded.follow_caller = True
            recorded.set_attribute("session", session_tag(hello.session))
            recorded.set_attribute("role", hello.role.value)
        if self.keeper is not None and self.table.get(hello.session) is None:
            holder = await self.keeper.claim(hello.session)
            if holder is not None:
                return await self._refuse(ws, CloseCode.WRONG_NODE, f"the session is live on node {holder}")
        if self._is_draining():  # the checks above were before a possibly long wait
            return await self._refuse_shutdown(ws)
        refusal = self.control.refusal()
        if refusal is not None:
            return await self._refuse(ws, refusal.code, refusal.reason)
        # From here to attach() there is no checkpoint: the table cannot change under us.
        session = self.table.get(hello.session)
        if token_use == "reused":
            # A token used before may only fill an empty role slot (its peer reconnecting while
            # no fresh token can be had); a copy must never displace a live connection.
            if session is not None and session.peer(hello.role) is not None:
                self.replay.count("refused_live")
                return await self._refuse(
                    ws,
                    CloseCode.TOKEN_EXPIRED,
                    "token already used and the role is connected: fetch a fresh token",
                )
            self.replay.count("reused")
        else:
            self.replay.count("first")
        created = session is None
        if session is None:
            if self.table.full():
                return await self._refuse(ws, CloseCode.OVERLOADED, "this node is at its session limit")
            session = Session(
                hello.session,
                table=self.table,
                limits=self.limits,
                stats=self.stats,
                cohort=claims.cohort,
                on_paired=self._on_paired,
            )
            assert self._handlers is not None
            with outside_record():  # the session outlives this handshake's span
                self._handlers.start_soon(session.run)
        # the session span (relay.session): this handshake is its parent, or a link; before attach,
        # so the attach's own lifecycle events (joined, paired) are on it
        session.trace_handshake(
            recorded,
            hello.role,
            created=created,
            analytics_allowed=claims.analytics_allowed,
            node=self.config.node_id,
            cohort=claims.cohort,
        )
        try:
            with outside_record():  # the connection's task outlives this handshake's span
                conn = session.attach(ws, hello.role, hello.nonce, hello.caps, initial=batch[1:] or None)
        except ProtocolError as exc:
            if created:
                session.cancel()
            return await self._refuse(ws, exc.code, str(exc))
        # The session's nursery owns the connection now (conn.run closes or aborts the socket on
        # every path, cancellation included), so this handler task can end instead of waiting:
        # one task less per connection (~2.5 KB each at 10,000 idle connections).
        ws.detach()
        ws.request_headers = ()  # read by the handshake only; ~1 KB per connection kept otherwise
        if self.poller is not None:
            ws.use_poller(self.poller, conn.offer)
        recorded.set_attribute("created", created)
        recorded.set_attribute("paired", all(session.peer(role) is not None for role in Role))
        if claims.analytics_allowed:
            log_event(_LOG, "relay.peer_connected", session=session_tag(hello.session), role=hello.role.value)
        return "ok", None

    async def _check_hello(self, first: bytes) -> tuple[Hello, Claims]:
        """Validate the first message: a HELLO with a token for this node, session and role.

        Raises:
            ProtocolError: not a HELLO, a malformed one, or token/HELLO session or role mismatch
                (``SESSION_MISMATCH``).
            TokenError: the token failed verification (its ``code`` says how to close).
        """
        if len(first) < HEADER_SIZE or first[1] != _HELLO:
            decode_header(first)  # a ProtocolError for garbage, else the message below
            raise ProtocolError("the first message must be HELLO")
        decode_header(first)
        hello = Hello.decode(first[HEADER_SIZE:])
        claims = await self._verify(hello.token)
        if claims.lifetime > MAX_TTL:  # verify_token checks it too; the relay's own rule (SPEC §3)
            raise TokenError("lifetime_too_long", "token lifetime exceeds 300 s")
        if claims.sid != hello.session or claims.role != hello.role.value:
            raise ProtocolError("the token's session or role differ from HELLO", CloseCode.SESSION_MISMATCH)
        return hello, claims

    async def _verify(self, token: bytes) -> Claims:
        try:
            return verify_token(token, self.keys.ring, now=time.time(), audience=self.config.node_id)
        except TokenError as exc:
            if exc.reason != "unknown_kid" or self._keys_given:
                raise
            if not await self.keys.refresh_for_unknown_kid(self._client):
                raise
        return verify_token(token, self.keys.ring, now=time.time(), audience=self.config.node_id)

    async def _refuse(
        self, ws: WebSocketConnection, code: int, reason: str, *, reconnect_in_ms: int | None = None
    ) -> tuple[str, int]:
        """Close a connection that never got a role: CLOSE message, close frame, bounded.

        Returns:
            The handshake outcome (the close code's name in lower case) and the code.
        """
        outcome = _outcome(code)
        self.metrics.handshakes.labels(outcome).inc()
        self.stats.count_close(code)
        reason = clip_close_reason(reason)
        with trio.move_on_after(self.config.close_timeout_s):
            try:
                await ws.send_messages([Close(code, reason, reconnect_in_ms).to_message()])
            except (ProtocolError, *TRANSPORT_ERRORS):
                pass  # after a framing error the WebSocket takes no more messages; the code still goes
            try:
                await ws.close(websocket_close_code(code), reason)
            except TRANSPORT_ERRORS:
                pass
        ws.abort()
        return outcome, int(code)

    async def _refuse_shutdown(self, ws: WebSocketConnection) -> tuple[str, int]:
        window_ms = min(int(self.config.drain_s * 1000), MAX_RECONNECT_IN_MS)
        return await self._refuse(
            ws,
            CloseCode.SERVER_SHUTDOWN,
            "relay node shutting down",
            reconnect_in_ms=random.randint(0, window_ms),
        )

    def _on_assignment_lost(self, session_id: str, holder: str) -> None:
        """The token service moved a session live here to ``holder``: send both peers there."""
        session = self.table.get(session_id)
        if session is not None:
            log_event(_LOG, "relay.session_moved_away", session=session_tag(session_id), to_node=holder)
            session.close_all(CloseCode.WRONG_NODE, "the session was moved to another node")

    def _on_paired(self, session: Session) -> None:
        self.control.report_activation(session.cohort)
        log_event(_LOG, "transport.fallback.activated", cohort=session.cohort)


def _outcome(code: int) -> str:
    try:
        return CloseCode(code).name.lower()
    except ValueError:
        return str(code)


def _load_tls(config: RelayConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    # No TLS 1.2 renegotiation: a client could make the node redo handshakes at will (CPU), and
    # the MemoryBIO data path (decision 0018) sends handshake records only with the next write.
    context.options |= ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load TLS certificate/key: {exc}") from exc
    return context
