"""The numbers a session runs by (a slice of the relay's :class:`~rescue.relay.RelayConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from rescue.protocol import DEFAULT_MAX_FRAME

__all__ = [
    "DEFAULT_QUEUE_MAX_BYTES",
    "DEFAULT_QUEUE_MAX_FRAMES",
    "LIVENESS_SLACK_S",
    "MAX_PRIORITY_FRAMES",
    "MAX_RECENT_NONCES",
    "SessionLimits",
]

# Per-direction queue bounds. 256 KiB holds four max-size frames or ~256 keystroke-sized ones:
# enough to keep a 64 KB/s session's pipe full across scheduling hiccups (the SPEC load target), yet
# 1,250 busy sessions worst case stay under 650 MB. A queue may exceed a bound by one read's batch
# (a reader is admitted while the queue is below both bounds), so the real bound is bound + batch.
DEFAULT_QUEUE_MAX_BYTES: Final = 256 * 1024
# Frames bound: per-message object overhead (~60 bytes each) matters for tiny frames.
DEFAULT_QUEUE_MAX_FRAMES: Final = 512
# Heartbeat echoes and relay heartbeats waiting for a stalled socket. A legitimate peer sends one
# heartbeat per heartbeat_s and is timed out after 3, so 32 pending echoes only happen to a peer that
# floods heartbeats without reading; further echoes are dropped and counted.
MAX_PRIORITY_FRAMES: Final = 32
# HELLO nonces remembered per session to refuse a replayed HELLO (SPEC: a nonce is fresh per
# connection). 64 covers far more reconnects than fit in one token lifetime at the handshake limit.
MAX_RECENT_NONCES: Final = 64
# The grid of the node's liveness wheel (rescue.sessions._core.LivenessWheel, decision 0025): a
# silent peer is timed out never early and at most this much after its liveness timeout, and the
# wheel's task wakes at most this often.
LIVENESS_SLACK_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Timing and buffering limits for every session of a node.

    Attributes:
        heartbeat_s: the heartbeat interval announced in WELCOME; a connection with no inbound
            message for 3 x this is closed with ``HEARTBEAT_TIMEOUT``.
        resume_grace_s: how long a peer whose partner left waits for it (``PEER_GONE`` after).
        pair_timeout_s: how long a peer waits alone for its first partner (``PAIR_TIMEOUT``).
        max_frame: the largest message, header included, announced in WELCOME.
        queue_max_frames: per-direction queue bound in messages.
        queue_max_bytes: per-direction queue bound in bytes.
        max_bytes_per_s: per-direction forwarding rate limit (0 = none); enforced by not reading.
        burst_bytes: the token-bucket capacity for ``max_bytes_per_s`` (0 = one second's worth).
        close_timeout_s: how long a relay-initiated close (CLOSE message, close frame, the peer's
            answer) may take before the socket is aborted.
        quiet_after_s: a connection that sent no CONTROL/DATA for this long is marked quiet at
            its next heartbeat (its transport may then poll it less often, decision 0007);
            0 = never.
    """

    heartbeat_s: int = 15
    resume_grace_s: int = 30
    pair_timeout_s: float = 120.0
    max_frame: int = DEFAULT_MAX_FRAME
    queue_max_frames: int = DEFAULT_QUEUE_MAX_FRAMES
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    max_bytes_per_s: int = 0
    burst_bytes: int = 0
    close_timeout_s: float = 5.0
    quiet_after_s: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.heartbeat_s <= 3600:
            raise ValueError("heartbeat_s must be 1..3600")
        if not 0 <= self.resume_grace_s <= 86_400:
            raise ValueError("resume_grace_s must be 0..86400")
        if self.pair_timeout_s <= 0 or self.close_timeout_s <= 0:
            raise ValueError("pair_timeout_s and close_timeout_s must be positive")
        if not 1024 <= self.max_frame <= 16 * 1024 * 1024:
            raise ValueError("max_frame must be 1024..16777216")
        if self.queue_max_frames < 1 or self.queue_max_bytes < 1:
            raise ValueError("queue bounds must be positive")
        if self.max_bytes_per_s < 0 or self.burst_bytes < 0:
            raise ValueError("max_bytes_per_s and burst_bytes must be >= 0")
        if not self.quiet_after_s >= 0:  # (NaN too)
            raise ValueError("quiet_after_s must be >= 0")

    @property
    def liveness_timeout_s(self) -> float:
        """No inbound message for this long closes a connection (3 x heartbeat_s)."""
        return 3.0 * self.heartbeat_s
