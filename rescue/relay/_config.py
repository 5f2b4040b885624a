"""Every number a relay node runs by, in one frozen value object."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final

from rescue.protocol import DEFAULT_MAX_FRAME
from rescue.sessions import (
    DEFAULT_MAX_SOURCES,
    DEFAULT_QUEUE_MAX_BYTES,
    DEFAULT_QUEUE_MAX_FRAMES,
    SessionLimits,
)

__all__ = ["DEFAULT_ADMIN_PORT", "DEFAULT_FD_RESERVE", "DEFAULT_PORT", "MIN_CONNECTIONS", "RelayConfig"]

DEFAULT_PORT: Final = 8081  # SPEC §11 (`rescue dev` uses the same relay port)
DEFAULT_ADMIN_PORT: Final = 9090
# fds the WebSocket listener leaves to the rest of the process (RelayConfig.fd_reserve): a relay
# at rest holds ~25 (listeners, epolls, trio's wakeup pair, Redis and token-service connections,
# stdio), the admin port up to a quarter of the reserve; the rest is headroom (a TLS file read, a
# keys reload, connections being shed but not closed yet).
DEFAULT_FD_RESERVE: Final = 128
# A derived cap below this is a misconfiguration (the fd limit barely covers the reserve).
MIN_CONNECTIONS: Final = 16


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Settings of one relay node (SPEC §2 "Relay behaviour", §6, §7, §11).

    Attributes:
        keys: JWK set for token verification: a file path or an ``http(s)://`` URL. ``None`` with
            ``token_service`` set means ``{token_service}/v1/fallback/keys``.
        host: address the WebSocket listener binds.
        port: its port (0 picks a free one).
        admin_host: address of the admin HTTP port (``None``: same as ``host``).
        admin_port: the admin port (``/healthz``, ``/readyz``, ``/metrics``, ``/debug/stats``);
            ``None`` disables it, 0 picks a free one.
        node_id: this node's id; tokens must name it (or ``"*"``) in ``aud``.
        public_url: the URL clients reach this node at (registered in Redis); default built from
            host and port.
        token_service: base URL of the token service; ``None`` runs standalone (no kill switch
            beyond ``paused``, no activation reports).
        redis_url: Redis for node registration (SPEC §7); ``None`` skips registration.
        tls_cert: PEM certificate chain for ``wss://``; with ``tls_key``.
        tls_key: PEM private key.
        path: the WebSocket endpoint path.
        upgrade_timeout_s: time for TCP + TLS + HTTP upgrade.
        hello_timeout_s: time from the upgrade to a complete HELLO (SPEC: 10 s).
        heartbeat_s: announced heartbeat interval; 3 x without a message is HEARTBEAT_TIMEOUT.
        resume_grace_s: how long a lone peer waits for its partner to come back (PEER_GONE).
        pair_timeout_s: how long a peer waits alone for its first partner (PAIR_TIMEOUT).
        max_frame: largest message, header included (WebSocket messages above it: PROTOCOL_ERROR).
        max_sessions: sessions per node; a HELLO that would create one more gets OVERLOADED.
        max_connections: open WebSocket connections (any state) at most; 0 = the process's fd
            limit (``RLIMIT_NOFILE``, soft) less ``fd_reserve``. Past it a connection still in its
            upgrade or before its HELLO is closed for the newcomer, or with none the newcomer gets
            503 ``server_busy`` at once; sessions are never shed.
        fd_reserve: descriptors kept out of the WebSocket listener's reach for everything else the
            process opens: the admin port (capped at a quarter of it) for ``/healthz`` and
            ``/metrics``, Redis, the token-service link, TLS and key files, logs.
        handshakes_per_ip_per_min: handshakes per source address per minute (RATE_LIMITED); 0 = off.
        rate_limit_sources: how many source addresses the rate limiter remembers.
        max_bytes_per_s: forwarding rate per connection and direction, throttled by not reading;
            0 = unlimited.
        burst_bytes: bucket size for ``max_bytes_per_s`` (0 = one second's worth).
        queue_max_frames: per-direction queue bound in messages.
        queue_max_bytes: per-direction queue bound in bytes.
        close_timeout_s: the one bound on every close the relay does (a refusal, a session close,
            answering a peer's close frame) before the socket is aborted.
        drain_s: on shutdown, how long peers get to leave after CLOSE SERVER_SHUTDOWN (and the
            window over which their ``reconnect_in_ms`` is spread).
        status_poll_s: how often the token service's paused state is fetched (SPEC: cache ≤ 1 s).
        status_stale_s: fail closed (refuse new handshakes, ``/readyz`` 503) once the last good
            state is older than this.
        http_timeout_s: timeout of each request to the token service.
        keys_refresh_s: how often the JWK set is re-read (file) or re-fetched (URL).
        register_ttl_s: expiry of the node's Redis registration; refreshed every third of it.
        assignment_ttl_s: lifetime each refresh gives the session→node assignment of a session
            live on this node; refreshed every third of it (decision 0008).
        paused: start paused (``FALLBACK_WS_PAUSED=1``): refuse every new handshake.
        read_poller: wait for established connections' input through one shared epoll poller
            (Linux; decision 0007) instead of one trio wait per connection.
        read_coalesce_s: with ``read_poller``, how long readiness of active connections
            accumulates after a batch is handled (the most a message can wait extra); 0 = none.
        quiet_after_s: with ``read_poller``, a connection that sent only heartbeats for this
            long is marked quiet: its lone heartbeats no longer wake the relay (they are
            collected once per ``heartbeat_s``, decision 0015) while its next CONTROL/DATA
            still does, at once, and makes it active again. 0 = never.
        quiet_tick_s: the grid quiet connections' heartbeat looks are batched on (their echo
            waits about 0.5-1.5 ticks); not a delay for data.
    """

    keys: str | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    admin_host: str | None = None
    admin_port: int | None = DEFAULT_ADMIN_PORT
    node_id: str = "relay-1"
    public_url: str | None = None
    token_service: str | None = None
    redis_url: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    path: str = "/v1/connect"
    upgrade_timeout_s: float = 10.0
    hello_timeout_s: float = 10.0
    heartbeat_s: int = 15
    resume_grace_s: int = 30
    pair_timeout_s: float = 120.0
    max_frame: int = DEFAULT_MAX_FRAME
    max_sessions: int = 10_000
    max_connections: int = 0
    fd_reserve: int = DEFAULT_FD_RESERVE
    handshakes_per_ip_per_min: int = 120
    rate_limit_sources: int = DEFAULT_MAX_SOURCES
    max_bytes_per_s: int = 0
    burst_bytes: int = 0
    queue_max_frames: int = DEFAULT_QUEUE_MAX_FRAMES
    queue_max_bytes: int = DEFAULT_QUEUE_MAX_BYTES
    close_timeout_s: float = 5.0
    drain_s: float = 30.0
    status_poll_s: float = 1.0
    status_stale_s: float = 10.0
    http_timeout_s: float = 2.0
    keys_refresh_s: float = 60.0
    register_ttl_s: float = 15.0
    assignment_ttl_s: float = 300.0
    paused: bool = False
    read_poller: bool = True
    read_coalesce_s: float = 0.0
    # a third of the default heartbeat_s: a peer that paused typing for 5 s goes quiet at its next
    # heartbeat instead of waking the node with one or two more (decision 0015, amended 2026-12-07)
    quiet_after_s: float = 5.0
    quiet_tick_s: float = 0.1

    def __post_init__(self) -> None:
        self.session_limits()  # validates the session numbers
        if self.keys is None and self.token_service is None:
            raise ValueError("keys is required unless token_service is set (keys: a JWK set file or URL)")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        positive = (
            "upgrade_timeout_s",
            "hello_timeout_s",
            "drain_s",
            "status_poll_s",
            "status_stale_s",
            "http_timeout_s",
            "keys_refresh_s",
            "register_ttl_s",
            "assignment_ttl_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        for name in ("read_coalesce_s", "quiet_tick_s"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be between 0 and 1")
        if not self.quiet_after_s >= 0:  # (NaN too)
            raise ValueError("quiet_after_s must be >= 0")
        for name, low in (
            ("max_sessions", 1),
            ("rate_limit_sources", 1),
            ("handshakes_per_ip_per_min", 0),
            ("max_connections", 0),
            ("fd_reserve", 0),
        ):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}")

    def session_limits(self) -> SessionLimits:
        """The slice of this config every session runs by."""
        return SessionLimits(
            heartbeat_s=self.heartbeat_s,
            resume_grace_s=self.resume_grace_s,
            pair_timeout_s=self.pair_timeout_s,
            max_frame=self.max_frame,
            queue_max_frames=self.queue_max_frames,
            queue_max_bytes=self.queue_max_bytes,
            max_bytes_per_s=self.max_bytes_per_s,
            burst_bytes=self.burst_bytes,
            close_timeout_s=self.close_timeout_s,
            quiet_after_s=self.quiet_after_s if self.read_poller else 0.0,
        )

    def connection_cap(self, fd_limit: int) -> int:
        """The WebSocket listener's connection cap under a soft ``RLIMIT_NOFILE`` of ``fd_limit``.

        Raises:
            ValueError: the fd limit leaves fewer than 16 connections past ``fd_reserve`` (or
                ``max_connections`` asks for more than the limit allows).
        """
        room = fd_limit - self.fd_reserve
        if self.max_connections:
            if self.max_connections > room:
                raise ValueError(
                    f"max_connections {self.max_connections} needs an fd limit of at least "
                    f"{self.max_connections + self.fd_reserve} (with fd_reserve {self.fd_reserve}); "
                    f"it is {fd_limit}: raise it (ulimit -n, LimitNOFILE=) or lower max_connections"
                )
            return self.max_connections
        if room < MIN_CONNECTIONS:
            raise ValueError(
                f"the fd limit {fd_limit} leaves {room} connections past fd_reserve {self.fd_reserve}: "
                "raise it (ulimit -n, LimitNOFILE=) or lower fd_reserve"
            )
        return room

    def admin_connections(self) -> int:
        """The admin port's connection cap: a quarter of ``fd_reserve``, at least 8."""
        return max(8, self.fd_reserve // 4)

    @property
    def keys_source(self) -> str:
        """Where the JWK set comes from (file path or URL)."""
        if self.keys is not None:
            return self.keys
        assert self.token_service is not None
        return self.token_service.rstrip("/") + "/v1/fallback/keys"

    def replace(self, **changes: object) -> RelayConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
