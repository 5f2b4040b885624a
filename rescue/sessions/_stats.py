"""Plain-integer counters for the relay's hot path, read by the metrics collector at scrape time.

The forwarding pumps update these once per batch with ``+=`` on plain attributes: no locks, no
label lookups, no allocation. ``prometheus_client`` counters take a lock per update, which would
cost more than the forwarding itself at small message sizes; the relay's collector turns these
numbers into Prometheus families only when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Final

__all__ = ["FORWARD_LATENCY_BUCKETS", "MESSAGE_SIZE_BUCKETS", "FastHistogram", "RelayStats"]

# Bound once (compiled code reads a Final without a lookup in the bisect module: decision 0022).
_bisect_left: Final = bisect.bisect_left
# Message sizes (bytes, header included): keystroke-sized frames through full 64 KiB frames.
# (Typed as variable-length tuples: compiled, a Final inferred as a fixed-length tuple was never set,
# "NameError: value for final name …": docs/decisions/0022-compiled-hot-path.md.)
MESSAGE_SIZE_BUCKETS: Final[tuple[float, ...]] = (
    64.0,
    256.0,
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
)
# Relay forwarding latency (seconds from reading a batch to finishing its write): the SPEC target is
# P95 < 40 ms, so the buckets are dense around it.
FORWARD_LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.08,
    0.16,
    0.5,
    1.0,
    5.0,
)


class FastHistogram:
    """A lock-free histogram: per-bucket counts (non-cumulative), a sum and a count.

    Args:
        bounds: the upper bounds of the buckets, increasing; ``+Inf`` is implied.
    """

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float, n: int = 1) -> None:
        """Record ``n`` observations of ``value``."""
        self.counts[_bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def observe_first(self) -> None:
        """Record one observation in the first bucket, counted as 0 (a write done at once)."""
        self.counts[0] += 1
        self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, cumulative count)`` pairs in Prometheus order, ending with ``+Inf``."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


class RelayStats:
    """Counters shared by every session of one relay node (one instance per node).

    Attributes:
        messages_forwarded: CONTROL/DATA messages accepted for a connected partner.
        bytes_forwarded: their bytes (header included).
        frames_discarded: CONTROL/DATA messages dropped because the partner was absent or leaving
            (SPEC: resume recovers them).
        backpressure_stalls: times a reader stopped because its partner's queue was full.
        throttle_waits: times a reader paused to respect ``max_bytes_per_s``.
        relay_heartbeats: HEARTBEAT (seq 0) the relay sent to a sender it was holding back.
        heartbeats_echoed: HEARTBEAT echoes queued.
        heartbeats_dropped: echoes dropped because the peer's priority queue was full.
        sessions_emptied: sessions that ended because their last peer left.
        idle_pruned: connections closed with HEARTBEAT_TIMEOUT.
        rejoins: ``{"replaced": n, "returned": n}``: a role came back on a new connection, either
            taking over a live one or after the old one left.
        pairings: sessions that got both peers for the first time.
        closes: ``{close code: n}`` for every connection the relay closed or saw closed with a code.
        transport_lost: connections that ended without a close code (reset, EOF).
        internal_errors: unexpected exceptions caught at a connection boundary (bugs).
        protocol_errors: ``{kind: n}``: connections closed because their peer broke the protocol,
            by :attr:`rescue.errors.ProtocolError.kind` (``protocol``, ``fragments``,
            ``small_frames``, ...).
        message_sizes: sizes of forwarded messages (each batch contributes its count at its mean).
        forward_latency: seconds from reading a batch to finishing the write that carried it.
    """

    __slots__ = (
        "backpressure_stalls",
        "bytes_forwarded",
        "closes",
        "forward_latency",
        "frames_discarded",
        "heartbeats_dropped",
        "heartbeats_echoed",
        "idle_pruned",
        "internal_errors",
        "message_sizes",
        "messages_forwarded",
        "pairings",
        "protocol_errors",
        "rejoins",
        "relay_heartbeats",
        "sessions_emptied",
        "throttle_waits",
        "transport_lost",
    )

    def __init__(self) -> None:
        self.messages_forwarded = 0
        self.bytes_forwarded = 0
        self.frames_discarded = 0
        self.backpressure_stalls = 0
        self.throttle_waits = 0
        self.relay_heartbeats = 0
        self.heartbeats_echoed = 0
        self.heartbeats_dropped = 0
        self.sessions_emptied = 0
        self.idle_pruned = 0
        self.pairings = 0
        self.transport_lost = 0
        self.internal_errors = 0
        self.rejoins: dict[str, int] = {"replaced": 0, "returned": 0}
        self.closes: dict[int, int] = {}
        self.protocol_errors: dict[str, int] = {}
        self.message_sizes = FastHistogram(MESSAGE_SIZE_BUCKETS)
        self.forward_latency = FastHistogram(FORWARD_LATENCY_BUCKETS)

    def count_protocol_error(self, kind: str) -> None:
        """Count one connection closed for a broken protocol rule of ``kind``."""
        self.protocol_errors[kind] = self.protocol_errors.get(kind, 0) + 1

    def count_close(self, code: int) -> None:
        """Count one connection closed with ``code``."""
        self.closes[code] = self.closes.get(code, 0) + 1
