"""The relay's Prometheus metrics: one registry per :class:`~rescue.relay.Relay` (SPEC §8).

Hot-path numbers live as plain integers in :class:`~rescue.sessions.RelayStats` (and the read
poller's own counters) and become metric families only at scrape time (:class:`_StatsCollector`);
handshake outcomes, which happen once per connection, use ordinary ``prometheus_client`` counters.

``/metrics`` is Prometheus text, or OpenMetrics when the scraper's ``Accept`` asks for it; only
OpenMetrics carries the exemplars (trace ids) of ``beach_rescue_handshake_duration_seconds``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Final

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from rescue import __version__
from rescue import _build as build
from rescue._codes import CloseCode
from rescue.protocol import Role
from rescue.relay._gc import GcPauses
from rescue.sessions import FastHistogram, RelayStats, SessionTable
from rescue.websocket import ConnectionStats

if TYPE_CHECKING:
    from rescue._http import HttpStats
    from rescue.relay._control import AssignmentKeeper, ControlLink, KeySource, NodeRegistrar
    from rescue.websocket import ReadPoller

__all__ = ["HANDSHAKE_BUCKETS", "RelayMetrics"]

# Handshake duration (upgrade done → WELCOME queued): mostly the client's own HELLO latency plus
# one Ed25519 verification; the 10 s HELLO timeout is the top.
HANDSHAKE_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


def _histogram(name: str, doc: str, hist: FastHistogram) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, doc)
    family.add_metric([], hist.cumulative(), hist.total)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class _StatsCollector(Collector):
    def __init__(
        self,
        stats: RelayStats,
        table: SessionTable,
        control: ControlLink,
        keys: KeySource,
        draining: Callable[[], bool],
        registrar: Callable[[], NodeRegistrar | None],
        poller: Callable[[], ReadPoller | None],
        keeper: Callable[[], AssignmentKeeper | None],
        token_uses: Callable[[], dict[str, int]],
        gc_pauses: GcPauses | None,
        connections: ConnectionStats | None,
        max_connections: Callable[[], int],
        admin_http: HttpStats | None,
    ) -> None:
        self.connections = connections
        self.max_connections = max_connections
        self.admin_http = admin_http
        self.stats = stats
        self.token_uses = token_uses
        self.gc_pauses = gc_pauses
        self.table = table
        self.control = control
        self.keys = keys
        self.draining = draining
        self.registrar = registrar
        self.poller = poller
        self.keeper = keeper

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        table = self.table
        yield GaugeMetricFamily(
            "beach_rescue_connections_active", "Peer connections holding a role", value=table.connections()
        )
        yield GaugeMetricFamily("beach_rescue_sessions_active", "Sessions on this node", value=len(table))
        queued_frames = queued_bytes = 0
        for session in table:
            for conn in (session.peer(Role.HOST), session.peer(Role.GUEST)):
                if conn is not None:
                    queued_frames += conn.link.q_frames
                    queued_bytes += conn.link.q_bytes
        yield GaugeMetricFamily(
            "beach_rescue_queued_frames", "Messages waiting in per-direction queues", value=queued_frames
        )
        yield GaugeMetricFamily(
            "beach_rescue_queued_bytes", "Bytes waiting in per-direction queues", value=queued_bytes
        )
        yield _counter(
            "beach_rescue_messages_forwarded",
            "CONTROL/DATA messages forwarded to a partner",
            s.messages_forwarded,
        )
        yield _counter("beach_rescue_bytes_forwarded", "Bytes of forwarded messages", s.bytes_forwarded)
        yield _counter(
            "beach_rescue_frames_discarded",
            "CONTROL/DATA messages dropped because the partner was absent or leaving",
            s.frames_discarded,
        )
        yield _histogram(
            "beach_rescue_message_size_bytes",
            "Forwarded message sizes (each read batch counted at its mean size)",
            s.message_sizes,
        )
        yield _histogram(
            "beach_rescue_forward_latency_seconds",
            "Time from reading a batch to finishing the write that delivered it",
            s.forward_latency,
        )
        yield _counter(
            "beach_rescue_backpressure_stalls",
            "Times a sender was held back because its partner's queue was full",
            s.backpressure_stalls,
        )
        yield _counter(
            "beach_rescue_throttle_waits", "Times a sender was paused by max_bytes_per_s", s.throttle_waits
        )
        yield _counter(
            "beach_rescue_relay_heartbeats",
            "HEARTBEAT seq 0 sent to senders held back by backpressure",
            s.relay_heartbeats,
        )
        yield _counter("beach_rescue_heartbeats_echoed", "HEARTBEAT echoes queued", s.heartbeats_echoed)
        yield _counter(
            "beach_rescue_heartbeats_dropped",
            "HEARTBEAT echoes dropped (peer not reading its socket)",
            s.heartbeats_dropped,
        )
        yield _counter(
            "beach_rescue_idle_pruned", "Connections closed for silence (HEARTBEAT_TIMEOUT)", s.idle_pruned
        )
        yield _counter(
            "beach_rescue_sessions_emptied",
            "Sessions that ended because their last peer left",
            s.sessions_emptied,
        )
        yield _counter(
            "beach_rescue_sessions_paired", "Sessions that got both peers (activations)", s.pairings
        )
        yield _labelled(
            "beach_rescue_rejoins",
            "A role came back on a new connection (replaced a live one, or returned after leaving)",
            "kind",
            s.rejoins,
        )
        gc_pauses = self.gc_pauses
        if gc_pauses is not None:
            pauses = HistogramMetricFamily(
                "beach_rescue_gc_pause_seconds",
                "Garbage-collector pauses of the relay process (no socket is served meanwhile)",
                labels=["generation"],
            )
            for generation, hist in enumerate(gc_pauses.by_generation):
                pauses.add_metric([str(generation)], hist.cumulative(), hist.total)
            yield pauses
            yield GaugeMetricFamily(
                "beach_rescue_gc_pause_max_seconds",
                "The longest garbage-collector pause since the node started",
                value=gc_pauses.max_pause,
            )
        yield _labelled(
            "beach_rescue_token_uses",
            "Tokens presented in HELLO: first use, replayed (refused AUTH_FAILED, seen here or by the"
            " fleet), or admitted because the fleet store could not be asked",
            "outcome",
            self.token_uses(),
        )
        yield _labelled(
            "beach_rescue_protocol_errors",
            "Connections closed because the peer broke the protocol, by kind (fragments and"
            " small_frames are floods)",
            "reason",
            s.protocol_errors,
        )
        closes = CounterMetricFamily(
            "beach_rescue_closes", "Connections ended with a close code", labels=["code", "name"]
        )
        for code, n in sorted(s.closes.items()):
            closes.add_metric([str(code), _code_name(code)], n)
        yield closes
        yield _counter(
            "beach_rescue_transport_lost", "Connections that ended without a close code", s.transport_lost
        )
        yield _counter(
            "beach_rescue_internal_errors",
            "Unexpected errors caught at a connection boundary",
            s.internal_errors,
        )
        yield GaugeMetricFamily(
            "beach_rescue_draining", "1 while the node is shutting down", value=self.draining()
        )
        control = self.control
        yield GaugeMetricFamily(
            "beach_rescue_fallback_paused",
            "1 when new handshakes are refused by the kill switch (or stale state)",
            value=control.refusal() is not None,
        )
        age = control.state_age()
        yield GaugeMetricFamily(
            "beach_rescue_control_state_age_seconds",
            "Age of the last good kill-switch state from the token service (-1: never)",
            value=-1.0 if age == float("inf") else age,
        )
        yield _labelled("beach_rescue_control_polls", "Token-service status polls", "outcome", control.polls)
        yield _labelled(
            "beach_rescue_activation_reports",
            "Activation reports to the token service",
            "outcome",
            control.activations,
        )
        yield _labelled(
            "beach_rescue_keys_refreshes",
            "JWK set loads",
            "outcome",
            {"ok": self.keys.refreshes_ok, "error": self.keys.refreshes_failed},
        )
        yield GaugeMetricFamily(
            "beach_rescue_keys_loaded", "Verification keys in use", value=len(self.keys.ring)
        )
        registrar = self.registrar()
        if registrar is not None:
            yield _labelled(
                "beach_rescue_node_registrations", "Node registry writes", "outcome", registrar.outcomes
            )
            yield GaugeMetricFamily(
                "beach_rescue_node_full",
                "1 while the node's registry record says full (max_sessions or the connection cap "
                "reached): the token service assigns it no new sessions, only its own sessions' peers",
                value=registrar.full,
            )
            yield _labelled(
                "beach_rescue_node_full_changes",
                "Changes of the registry record's full flag, by the state written",
                "to",
                registrar.full_changes,
            )
        keeper = self.keeper()
        if keeper is not None:
            yield _labelled(
                "beach_rescue_assignments",
                "Session assignments: kept alive, lost to another node, claimed or refused at HELLO",
                "outcome",
                keeper.outcomes,
            )
        poller = self.poller()
        if poller is not None:
            yield from _poller_metrics(poller)
        if self.connections is not None:
            yield from _connection_metrics(self.connections, self.max_connections(), self.admin_http)


def _connection_metrics(ws: ConnectionStats, cap: int, admin: HttpStats | None) -> Iterator[Metric]:
    """The WebSocket listener's connection cap (and the admin port's), read at scrape time."""
    yield GaugeMetricFamily(
        "beach_rescue_ws_open_connections",
        "Open WebSocket sockets: in their upgrade, waiting for HELLO, or in a session",
        value=ws.open,
    )
    yield GaugeMetricFamily(
        "beach_rescue_ws_max_connections",
        "The WebSocket listener's connection cap (fd limit less --fd-reserve, or --max-connections)",
        value=cap,
    )
    away = CounterMetricFamily(
        "beach_rescue_ws_connections_turned_away",
        "WebSocket connections over the cap (shed_pending: one still in its upgrade or before HELLO "
        "closed for a newcomer; refused: a newcomer answered 503 server_busy) and accept() failures "
        "for lack of fds (accept_error)",
        labels=["reason"],
    )
    away.add_metric(["shed_pending"], ws.shed)
    away.add_metric(["refused"], ws.refused)
    away.add_metric(["accept_error"], ws.accept_errors)
    yield away
    if admin is not None:
        yield from admin.metrics(
            subject="Admin port HTTP connections", cap="its cap (a quarter of --fd-reserve)"
        )


def _poller_metrics(poller: ReadPoller) -> Iterator[Metric]:
    """The shared read poller's counters (decision 0007), read at scrape time."""
    yield _counter(
        "beach_rescue_read_poller_wakeups",
        "Read poller dispatch passes (each one wake-up of the poller task)",
        poller.wakeups,
    )
    yield _counter(
        "beach_rescue_read_poller_events", "Read readiness events the poller dispatched", poller.events
    )
    yield _counter(
        "beach_rescue_read_poller_handled_inline",
        "Readiness events handled by the read-ahead callback without waking a task",
        poller.handled,
    )
    yield _counter(
        "beach_rescue_read_poller_task_wakeups",
        "Readiness events that woke the connection's reader task",
        poller.events - poller.handled,
    )
    yield _counter("beach_rescue_read_poller_moves", "Sockets marked quiet or active again", poller.moves)
    yield _counter(
        "beach_rescue_read_poller_looks",
        "Scheduled looks at quiet sockets (one per expected heartbeat; not readiness events)",
        poller.looks,
    )
    stats = poller.statistics()
    yield GaugeMetricFamily(
        "beach_rescue_read_poller_registered", "Sockets registered with the poller", value=stats["registered"]
    )
    yield GaugeMetricFamily(
        "beach_rescue_read_poller_quiet",
        "Quiet sockets (only heartbeats lately; their heartbeats collected once per heartbeat_s)",
        value=stats["quiet"],
    )


def _code_name(code: int) -> str:
    try:
        return CloseCode(code).name
    except ValueError:
        return "OTHER"


class RelayMetrics:
    """All metrics of one relay node, in their own :class:`CollectorRegistry`.

    Attributes:
        registry: the registry ``/metrics`` renders.
        handshakes: ``beach_rescue_handshakes_total{outcome}`` (``ok`` or the close code's name in
            lower case, or ``disconnected``).
        handshake_seconds: ``beach_rescue_handshake_duration_seconds``.
        build_info: ``beach_rescue_build_info{version, hot_path}`` 1: the package version and
            whether the hot path runs compiled (``compiled``, ``pure`` or ``partly``; decision 0022),
            so a dashboard can tell a node that takes a fifth more CPU per message for its build.
    """

    def __init__(
        self,
        stats: RelayStats,
        table: SessionTable,
        control: ControlLink,
        keys: KeySource,
        *,
        draining: Callable[[], bool],
        registrar: Callable[[], NodeRegistrar | None],
        poller: Callable[[], ReadPoller | None] = lambda: None,
        keeper: Callable[[], AssignmentKeeper | None] = lambda: None,
        token_uses: Callable[[], dict[str, int]] = dict,
        gc_pauses: GcPauses | None = None,
        connections: ConnectionStats | None = None,
        max_connections: Callable[[], int] = lambda: 0,
        admin_http: HttpStats | None = None,
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        # process_cpu_seconds_total, RSS, open fds: the CPU > 70 % alert and the soak reports read them.
        ProcessCollector(registry=self.registry)
        # Read once: the installed build does not change under a running process.
        self.build_info = Info(
            "beach_rescue_build",
            "The relay's package version and its hot path's build: compiled (mypyc), pure (Python) "
            "or partly (some modules compiled: a broken install); always 1",
            registry=self.registry,
        )
        self.build_info.info({"version": __version__, "hot_path": build.kind()})
        self.handshakes = Counter(
            "beach_rescue_handshakes",
            "Relay handshakes by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.handshake_seconds = Histogram(
            "beach_rescue_handshake_duration_seconds",
            "Time from the WebSocket upgrade to WELCOME (successful handshakes)",
            buckets=HANDSHAKE_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(
            _StatsCollector(
                stats,
                table,
                control,
                keys,
                draining,
                registrar,
                poller,
                keeper,
                token_uses,
                gc_pauses,
                connections,
                max_connections,
                admin_http,
            )
        )

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """Every metric, and the content type: OpenMetrics if ``accept`` asks for it, else text."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type
