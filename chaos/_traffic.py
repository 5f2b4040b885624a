"""Sessions that stream checksummed bytes both ways through the SDK, and what they observed.

A :class:`SessionRun` is one host and one guest (``rescue.client.open_peer``, tokens from the token
service) in this process. Each side writes a predictable stream (:mod:`chaos._stream`) at a fixed
rate in random-sized chunks and verifies what it receives from the other side by content. A
:class:`PeerTracker` turns each peer's connection events into *reconnect episodes*: an episode
starts when a connection that had its WELCOME is lost and ends when the next WELCOME arrives
(success) or when the peer gives up (failure).
"""

from __future__ import annotations

import functools
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import trio

from chaos._stream import Pattern, StreamCheck
from rescue.client import (
    BackoffPolicy,
    Connected,
    ConnectionEvent,
    DataReceived,
    PartnerEvent,
    Peer,
    Reconnecting,
    SessionClosed,
    TokenClient,
    TokenGrant,
    TokenProvider,
    open_peer,
)
from rescue.client._backoff import MAX_DELAY_S
from rescue.errors import RescueError
from rescue.protocol import CloseCode
from rescue.testing import abort_connection

__all__ = [
    "Episode",
    "PeerTracker",
    "SessionGroup",
    "SessionRun",
    "Throughput",
    "TokenFetch",
    "TokenLog",
    "TrafficConfig",
    "percentile",
    "trio_task_count",
    "wait_flowing",
]

# Channel each role writes on (SPEC §2: 0 terminal output from the host, 1 terminal input).
_CHANNEL: Final = {"host": 0, "guest": 1}
# How often the drain at the end re-checks that every written byte arrived.
_DRAIN_POLL_S: Final = 0.05
# A writer that fell further behind its schedule than this (backpressure while the partner was
# away) restarts the schedule instead of bursting to catch up.
_MAX_LAG_S: Final = 1.0
# Largest Peer.send the traffic uses: below one frame's payload, so a send is one frame.
_CHUNK_CAP: Final = 8 * 1024
# A token request from the harness gets this long (the SDK's own default).
_TOKEN_TIMEOUT_S: Final = 10.0
# How often wait_flowing() looks at the sessions.
_FLOWING_POLL_S: Final = 0.05


@dataclass(frozen=True)
class TrafficConfig:
    """What every session writes.

    Attributes:
        rate: bytes per second per direction.
        chunk_min: smallest ``Peer.send`` call, bytes.
        chunk_max: largest (kept below one frame's payload so a send is one frame).
        drain_timeout_s: at the end, how long a session waits for its last bytes to arrive.
        backoff_cap: the peers' largest reconnect window (the SDK's 30 s by default; the smoke
            runs use a couple of seconds so a peer whose node was down a while retries soon after
            it is back rather than up to a whole doubled window later).
    """

    rate: float = 16 * 1024
    chunk_min: int = 64
    chunk_max: int = _CHUNK_CAP
    drain_timeout_s: float = 60.0
    backoff_cap: float = MAX_DELAY_S

    @classmethod
    def for_rate(
        cls,
        rate: float,
        *,
        every_s: float = 1.0,
        drain_timeout_s: float = 60.0,
        backoff_cap: float = MAX_DELAY_S,
    ) -> TrafficConfig:
        """Chunk sizes that fit ``rate``: about one write per ``every_s`` per direction at low rates.

        At 16 KiB/s and above this is the default (64 B - 8 KiB chunks). Below, chunks run from
        ``min(64, max / 3)`` to ``max = 1.5 * rate * every_s`` bytes (a mean of about
        ``rate * every_s``: one write a second at 64 B/s), so a fleet of a thousand slow sessions
        makes a known number of writes a second rather than one per 4 KiB of a schedule that is a
        minute long (and a stream that looks stalled between writes).
        """
        chunk_max = max(2, min(_CHUNK_CAP, int(rate * every_s * 1.5)))
        chunk_min = max(1, min(64, chunk_max // 3))
        return cls(
            rate=rate,
            chunk_min=chunk_min,
            chunk_max=chunk_max,
            drain_timeout_s=drain_timeout_s,
            backoff_cap=backoff_cap,
        )


class Throughput:
    """Delivered bytes per second of run-clock time (all sessions together).

    Args:
        per_second: keep one bin per second (chaos plots); ``False`` keeps only the total, so a
            24 h soak does not grow its own memory with the bins.
    """

    def __init__(self, *, per_second: bool = True) -> None:
        self.bins: list[int] = []
        self.total = 0
        self.per_second = per_second

    def add(self, now: float, size: int) -> None:
        """Count ``size`` bytes delivered at run-clock time ``now``."""
        self.total += size
        if not self.per_second:
            return
        index = max(0, int(now))
        if index >= len(self.bins):
            self.bins.extend([0] * (index + 1 - len(self.bins)))
        self.bins[index] += size

    def recent(self, now: float, seconds: int = 3) -> float:
        """Mean bytes/s over the last ``seconds`` whole seconds before run-clock time ``now``."""
        end = int(now)
        window = self.bins[max(0, end - seconds) : end]
        return sum(window) / seconds if window else 0.0


@dataclass
class Episode:
    """One reconnect: from losing a welcomed connection to the next WELCOME (or giving up).

    Attributes:
        peer: ``session/role``.
        start: when the connection was lost (run clock).
        cause: the first reason given (close code name or transport reason).
        end: when it ended.
        ok: True when a new connection got its WELCOME; False when the peer gave up.
        attempts: connection attempts that failed within the episode.
        delay: the SDK's wait before its first new attempt (``reconnect_in_ms`` after a drain,
            the backoff's jitter otherwise): how reconnects spread after a fault.
        node: the node the episode ended on (its WELCOME), when it succeeded.
    """

    peer: str
    start: float
    cause: str
    end: float | None = None
    ok: bool | None = None
    attempts: int = 0
    delay: float | None = None
    node: str | None = None

    @property
    def duration(self) -> float | None:
        """Seconds from loss to outcome."""
        return None if self.end is None else self.end - self.start

    def to_json(self) -> dict[str, Any]:
        return {
            "peer": self.peer,
            "start": round(self.start, 3),
            "end": None if self.end is None else round(self.end, 3),
            "ok": self.ok,
            "cause": self.cause,
            "failed_attempts": self.attempts,
            "delay": None if self.delay is None else round(self.delay, 3),
            "node": self.node,
        }


def _describe(code: int | None, reason: str) -> str:
    if code is None:
        return "no close code: " + reason[:60]
    try:
        return CloseCode(code).name
    except ValueError:
        return str(code)


@dataclass(frozen=True, slots=True)
class TokenFetch:
    """One token request a peer made through the SDK.

    Attributes:
        peer: ``session/role``.
        at: run clock when it was made.
        latency_s: how long the answer took (as this process saw it: the event loop's own lag
            under a thousand sessions is part of it).
        node: the node the grant names (``None`` when it failed).
        error: the exception's type name when it failed.
    """

    peer: str
    at: float
    latency_s: float
    node: str | None
    error: str | None = None


class TokenLog:
    """Every token fetch of every peer it wraps: when, how long, which node.

    Args:
        clock: the run clock.
        url_to_node: relay URL -> node id.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        url_to_node: dict[str, str],
        *,
        concurrency: int | None = None,
    ) -> None:
        self.clock = clock
        self.url_to_node = url_to_node
        self.fetches: list[TokenFetch] = []
        # At most this many requests in flight from this process (the rest wait here, which is
        # cheap, instead of in the HTTP client's pool, whose bookkeeping grows with its queue).
        self.limiter = trio.CapacityLimiter(concurrency) if concurrency else None

    def provider(self, inner: TokenProvider, peer: str) -> TokenProvider:
        """``inner``, recording each call (a fresh token per connect is the SDK's business)."""

        async def fetch() -> TokenGrant:
            at, started = self.clock(), trio.current_time()
            try:
                if self.limiter is not None:
                    async with self.limiter:
                        grant = await inner()
                else:
                    grant = await inner()
            except RescueError as exc:
                self.fetches.append(
                    TokenFetch(peer, at, trio.current_time() - started, None, type(exc).__name__)
                )
                raise
            node = self.url_to_node.get(grant.relay_url, grant.relay_url)
            self.fetches.append(TokenFetch(peer, at, trio.current_time() - started, node))
            return grant

        return fetch

    def between(self, start: float, end: float) -> list[TokenFetch]:
        """Fetches made from ``start`` to ``end`` (run clock)."""
        return [f for f in self.fetches if start <= f.at <= end]

    @staticmethod
    def summary(fetches: Sequence[TokenFetch]) -> dict[str, Any]:
        """Count, failures, latency P50/P95/max (ms) and the busiest second of ``fetches``."""
        latencies = [f.latency_s * 1000 for f in fetches if f.error is None]
        per_second = Counter(int(f.at) for f in fetches)

        def ms(x: float | None) -> float | None:
            return None if x is None else round(x, 1)

        return {
            "fetches": len(fetches),
            "failed": sum(1 for f in fetches if f.error is not None),
            "errors": dict(Counter(f.error for f in fetches if f.error is not None)),
            "latency_p50_ms": ms(percentile(latencies, 0.5)),
            "latency_p95_ms": ms(percentile(latencies, 0.95)),
            "latency_max_ms": ms(max(latencies, default=None)),
            "peak_per_s": max(per_second.values(), default=0),
        }


class PeerTracker:
    """A peer's connection events, as counts and reconnect episodes.

    Args:
        name: ``session/role``.
        clock: the run clock.
        on_episode: called with each episode when it ends.
    """

    def __init__(self, name: str, clock: Callable[[], float], on_episode: Callable[[Episode], None]) -> None:
        self.name = name
        self.clock = clock
        self.on_episode = on_episode
        self.connected = False
        self.ever_connected = False
        self.node: str | None = None
        self.connections = 0
        self.reconnect_events = 0  # Reconnecting after the first WELCOME: attempts that follow
        self.reconnect_welcomes = 0  # WELCOMEs after the first
        self.causes: Counter[str] = Counter()
        self.partner_events: Counter[str] = Counter()
        self.episode: Episode | None = None
        self.interrupted = 0
        self.closed: SessionClosed | None = None
        self.url_to_node: dict[str, str] = {}
        self.welcomed_at: float | None = None  # run clock of the last WELCOME

    def on_event(self, event: ConnectionEvent) -> None:
        """The ``on_event`` callback of ``open_peer``."""
        now = self.clock()
        if isinstance(event, Connected):
            self.connections += 1
            if self.ever_connected:
                self.reconnect_welcomes += 1
            self.ever_connected = True
            self.connected = True
            self.welcomed_at = now
            self.node = self.url_to_node.get(event.relay_url, event.relay_url)
            if self.episode is not None:
                self.episode.node = self.node
            self._end_episode(now, ok=True)
        elif isinstance(event, Reconnecting):
            self.connected = False
            if not self.ever_connected:
                return  # still the first connection: not a reconnect
            self.reconnect_events += 1
            cause = _describe(event.code, event.reason)
            self.causes[cause] += 1
            if self.episode is None:
                self.episode = Episode(self.name, now, cause, delay=event.delay)
            else:
                self.episode.attempts += 1
        elif isinstance(event, SessionClosed):
            self.connected = False
            self.closed = event
            # A NORMAL close (ours or the partner's) ends the session on purpose; the session's
            # own checks notice if that happened before the end of the run.
            if not event.local and event.code != CloseCode.NORMAL:
                if self.episode is None:
                    self.episode = Episode(self.name, now, "closed: " + _describe(event.code, event.reason))
                self._end_episode(now, ok=False)
        elif isinstance(event, PartnerEvent):
            self.partner_events[event.event] += 1

    def _end_episode(self, now: float, *, ok: bool) -> None:
        episode = self.episode
        if episode is None:
            return
        episode.end = now
        episode.ok = ok
        self.episode = None
        self.on_episode(episode)

    def finish(self, *, ended_normally: bool) -> None:
        """The session is over: settle an episode that is still open.

        Args:
            ended_normally: the session drained every byte and was closed on purpose. A peer
                that was still reconnecting then (its socket was dropped just before the end,
                after its last bytes had arrived) had nothing left to resume: the episode is
                dropped and counted in ``interrupted``, neither a success nor a failure.
                Otherwise an open episode never recovered: a failure.
        """
        if self.episode is not None and ended_normally:
            self.episode = None
            self.interrupted += 1
            return
        self._end_episode(self.clock(), ok=False)


@dataclass
class SessionRun:
    """One session: host and guest in this process, streaming both ways until ``stop`` is set.

    Attributes:
        session_id: the session id.
        checks: ``host->guest`` and ``guest->host`` stream checks.
        trackers: ``host`` and ``guest`` connection trackers.
        peers: the open peers (while the session runs).
        error: why the session failed, or ``None``.
        peer_stats: each peer's final ``statistics()`` (resumes, retransmits, ...).
        ended: when the session finished (run clock).
        token_log: records every token fetch of both peers, when given.
        http: one HTTP client shared by the token fetches of many sessions, when given (a
            client per request costs ~50 ms of CPU for its TLS set-up: a thousand sessions
            reconnecting at once would spend the harness's CPU on it).
        lost_since_watch: a peer lost its connection after :meth:`watch_resume`.
        resumed_at: after such a loss, when both peers were back and each direction delivered
            a byte again (run clock).
    """

    session_id: str
    seed: int | str
    config: TrafficConfig
    clock: Callable[[], float]
    throughput: Throughput
    on_episode: Callable[[Episode], None]
    url_to_node: dict[str, str] = field(default_factory=dict)
    checks: dict[str, StreamCheck] = field(init=False)
    trackers: dict[str, PeerTracker] = field(init=False)
    peers: dict[str, Peer] = field(default_factory=dict)
    error: str | None = None
    peer_stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    started: float | None = None
    ended: float | None = None
    stop: trio.Event = field(default_factory=trio.Event)
    token_log: TokenLog | None = None
    http: httpx.AsyncClient | None = None
    resume_since: float | None = None
    lost_since_watch: bool = False
    resumed_at: float | None = None
    _resume_marks: dict[str, int] | None = None

    def __post_init__(self) -> None:
        self.checks = {
            "host->guest": StreamCheck(Pattern(f"{self.seed}:{self.session_id}:host->guest")),
            "guest->host": StreamCheck(Pattern(f"{self.seed}:{self.session_id}:guest->host")),
        }
        self.trackers = {}
        for role in ("host", "guest"):
            tracker = PeerTracker(f"{self.session_id}/{role}", self.clock, self.on_episode)
            tracker.url_to_node = self.url_to_node
            self.trackers[role] = tracker

    # ----------------------------------------------------------------------------- queries

    @property
    def failed(self) -> bool:
        """Whether the session ended abnormally."""
        return self.error is not None

    @property
    def both_connected(self) -> bool:
        """Both peers hold a welcomed connection."""
        return all(t.connected for t in self.trackers.values())

    def nodes(self) -> set[str]:
        """The nodes the peers were last welcomed by."""
        return {t.node for t in self.trackers.values() if t.node is not None}

    def abort(self, role: str) -> bool:
        """Drop ``role``'s socket as a network failure would; False when it had none."""
        peer = self.peers.get(role)
        return peer is not None and abort_connection(peer)

    def watch_resume(self, since: float) -> None:
        """Time the next interruption: from ``since`` (a fault) to the stream flowing again.

        After this, a peer that loses its connection sets ``lost_since_watch``; once both peers
        are welcomed again, ``resumed_at`` is set by the first moment each direction has
        delivered a byte after that (replayed or new). A later loss starts over.
        """
        self.resume_since = since
        self.lost_since_watch = False
        self.resumed_at = None
        self._resume_marks = None

    def resume_s(self) -> float | None:
        """Seconds from the watched fault to the resumed stream (``None``: not interrupted or not yet)."""
        if self.resume_since is None or self.resumed_at is None:
            return None
        return self.resumed_at - self.resume_since

    def _on_event(self, role: str) -> Callable[[ConnectionEvent], None]:
        tracker = self.trackers[role]

        def on_event(event: ConnectionEvent) -> None:
            was_welcomed = tracker.ever_connected
            tracker.on_event(event)
            if self.resume_since is None:
                return
            if isinstance(event, Reconnecting) and was_welcomed:
                self.lost_since_watch = True
                self.resumed_at = None
                self._resume_marks = None
            elif isinstance(event, Connected) and self.lost_since_watch and self.both_connected:
                self._resume_marks = {name: c.delivered for name, c in self.checks.items()}

        return on_event

    def _provider(self, api_url: str, role: str) -> str | TokenProvider:
        if self.http is None and self.token_log is None:
            return api_url
        inner: TokenProvider
        if self.http is not None:
            inner = TokenClient(api_url, session_id=self.session_id, role=role, client=self.http)
        else:
            inner = functools.partial(_fetch_alone, api_url, self.session_id, role)
        if self.token_log is None:
            return inner
        return self.token_log.provider(inner, f"{self.session_id}/{role}")

    def mark(self) -> None:
        """Start a recovery watch on both directions (see :meth:`StreamCheck.mark`)."""
        for check in self.checks.values():
            check.mark()

    @property
    def recovered(self) -> bool:
        """Both directions moved past the last mark (a failed session never recovers)."""
        return not self.failed and all(c.recovered for c in self.checks.values())

    def recovered_at(self) -> float | None:
        """When the last of the two directions moved past the mark."""
        times = [c.recovered_at for c in self.checks.values()]
        if any(t is None for t in times):
            return None
        return max(t for t in times if t is not None)

    # ----------------------------------------------------------------------------- running

    async def run(
        self, api_url: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Open both peers, stream until ``stop``, then drain and verify; never raises RescueError.

        Cancellation:
            Cancelling ends the session at once (no drain); ``error`` says so.
        """
        rng = random.Random(f"{self.seed}:{self.session_id}")
        psk = rng.randbytes(32)  # any shared 32 bytes will do: the relay never sees it
        started = False
        try:
            async with (
                open_peer(
                    self._provider(api_url, "host"),
                    self.session_id,
                    "host",
                    psk=psk,
                    on_event=self._on_event("host"),
                    backoff=BackoffPolicy(cap=self.config.backoff_cap, rng=random.Random(rng.random())),
                ) as host,
                open_peer(
                    self._provider(api_url, "guest"),
                    self.session_id,
                    "guest",
                    psk=psk,
                    on_event=self._on_event("guest"),
                    backoff=BackoffPolicy(cap=self.config.backoff_cap, rng=random.Random(rng.random())),
                ) as guest,
            ):
                self.peers = {"host": host, "guest": guest}
                self.started = self.clock()
                task_status.started()
                started = True
                await self._stream(host, guest, rng)
                for role, peer in self.peers.items():
                    self.peer_stats[role] = _stats_json(peer)
        except RescueError as exc:
            self._fail(f"{type(exc).__name__}: {exc}")
        finally:
            self.peers = {}
            self.ended = self.clock()
            if not started:
                task_status.started()

    def _fail(self, why: str) -> None:
        if self.error is None:
            self.error = why[:300]

    async def _stream(self, host: Peer, guest: Peer, rng: random.Random) -> None:
        async with trio.open_nursery() as traffic:
            traffic.start_soon(self._receive, guest, "host->guest", _CHANNEL["host"])
            traffic.start_soon(self._receive, host, "guest->host", _CHANNEL["guest"])
            async with trio.open_nursery() as writers:
                writers.start_soon(self._write, host, "host->guest", random.Random(rng.random()))
                writers.start_soon(self._write, guest, "guest->host", random.Random(rng.random()))
            # Writers stop when `stop` is set (or the session failed): wait for the last bytes.
            with trio.move_on_after(self.config.drain_timeout_s):
                # polls counters two receiver tasks advance (no event for "both caught up")
                while not self.failed and any(  # noqa: ASYNC110
                    c.delivered < c.sent for c in self.checks.values()
                ):
                    await trio.sleep(_DRAIN_POLL_S)
            if not self.failed and any(c.delivered != c.sent for c in self.checks.values()):
                self._fail("bytes missing after the drain timeout")
            traffic.cancel_scope.cancel()

    async def _write(self, peer: Peer, direction: str, rng: random.Random) -> None:
        check = self.checks[direction]
        config = self.config
        channel = _CHANNEL[direction.split("->")[0]]
        due = trio.current_time()
        while not self.stop.is_set() and not self.failed:
            size = rng.randint(config.chunk_min, config.chunk_max)
            data = check.pattern.slice(check.sent, size)
            try:
                await peer.send(channel, data)
            except RescueError as exc:
                self._fail(f"{direction} send: {type(exc).__name__}: {exc}")
                return
            check.sent += size
            due += size / config.rate
            now = trio.current_time()
            if now - due > _MAX_LAG_S:
                due = now
            with trio.move_on_at(due):
                await self.stop.wait()

    async def _receive(self, peer: Peer, direction: str, channel: int) -> None:
        check = self.checks[direction]
        while True:
            try:
                message = await peer.receive()
            except trio.EndOfChannel:
                if not self.stop.is_set():
                    self._fail(f"{direction}: the session ended early")
                return
            except RescueError as exc:
                self._fail(f"{direction} receive: {type(exc).__name__}: {exc}")
                return
            if not isinstance(message, DataReceived) or message.channel != channel:
                self._fail(f"{direction}: unexpected {message!r:.80}")
                continue
            now = self.clock()
            check.receive(message.data, now)
            self.throughput.add(now, len(message.data))
            marks = self._resume_marks
            if (
                marks is not None
                and self.resumed_at is None
                and all(c.delivered > marks[name] for name, c in self.checks.items())
            ):
                self.resumed_at = now


async def _fetch_alone(api_url: str, session_id: str, role: str) -> TokenGrant:
    """One token over a client of its own, as each real peer has: no pool shared by a thousand
    peers (one shared client stalled the 1,000-session run: fetches waited minutes in the harness
    while the service answered in milliseconds). ``verify=False``: the URL is plain http on
    127.0.0.1, and not loading the CA bundle saves ~50 ms of CPU per client."""
    async with httpx.AsyncClient(timeout=_TOKEN_TIMEOUT_S, verify=False) as client:
        return await TokenClient(api_url, session_id=session_id, role=role, client=client)()


def _stats_json(peer: Peer) -> dict[str, Any]:
    s = peer.statistics()
    return {
        "connections": s.connections,
        "integrity_failures": s.integrity_failures,
        "stale_key_frames": s.stale_key_frames,
        "resumes": s.sender.resumes,
        "retransmitted_frames": s.sender.retransmitted_frames,
        "peak_buffered_bytes": s.sender.peak_buffered_bytes,
        "duplicates_dropped": s.receiver.duplicates_dropped,
        "delivered_frames": s.receiver.delivered_frames,
    }


class SessionGroup:
    """Many :class:`SessionRun` sharing a clock, throughput meter, episode list, token log and HTTP client.

    Args:
        prefix: session ids are ``prefix-0`` ... ``prefix-(count-1)``.
        count: how many sessions.
        seed: traffic and backoff seed.
        config: what every session writes.
        clock: the run clock.
        url_to_node: relay URL -> node id.
        http: the shared HTTP client for token fetches (it stays the caller's).
        throughput: the meter (a per-second one by default).
        token_concurrency: token requests in flight at once from all the sessions (no bound by
            default); give the shared client's pool size.
    """

    def __init__(
        self,
        prefix: str,
        count: int,
        *,
        seed: int,
        config: TrafficConfig,
        clock: Callable[[], float],
        url_to_node: dict[str, str],
        http: httpx.AsyncClient | None = None,
        throughput: Throughput | None = None,
        token_concurrency: int | None = None,
    ) -> None:
        self.clock = clock
        self.throughput = throughput or Throughput()
        self.episodes: list[Episode] = []
        self.token_log = TokenLog(clock, url_to_node, concurrency=token_concurrency)
        self.sessions = [
            SessionRun(
                f"{prefix}-{i}",
                seed=seed,
                config=config,
                clock=clock,
                throughput=self.throughput,
                on_episode=self.episodes.append,
                url_to_node=url_to_node,
                token_log=self.token_log,
                http=http,
            )
            for i in range(count)
        ]

    async def start(self, nursery: trio.Nursery, api_url: str, *, per_second: float | None = None) -> None:
        """Start every session in ``nursery``, at most ``per_second`` a second (a gentle ramp).

        A thousand sessions opened at once would be a token and handshake storm of their own
        before the first fault; the ramp keeps the start-up from measuring that.
        """
        interval = 0.0 if per_second is None else 1.0 / per_second
        due = trio.current_time()
        for session in self.sessions:
            # start_soon, not start: waiting for each session's first steps would tie the ramp to
            # the event loop's round time, which grows with every session already running
            nursery.start_soon(session.run, api_url)
            due += interval
            await trio.sleep_until(due)

    def stop(self) -> None:
        """Stop every session's writers (each then drains and verifies)."""
        for session in self.sessions:
            session.stop.set()

    def on_node(self, node: str) -> list[SessionRun]:
        """Sessions with a peer last welcomed by ``node``."""
        return [s for s in self.sessions if node in s.nodes()]

    def by_node(self) -> dict[str, list[SessionRun]]:
        """Sessions by the node their peers were last welcomed by (a split one under both)."""
        out: dict[str, list[SessionRun]] = {}
        for session in self.sessions:
            for node in session.nodes():
                out.setdefault(node, []).append(session)
        return out

    def watch(self, since: float) -> None:
        """:meth:`SessionRun.watch_resume` and :meth:`SessionRun.mark` on every live session."""
        for session in self.sessions:
            if not session.failed:
                session.watch_resume(since)
                session.mark()


async def wait_flowing(sessions: Sequence[SessionRun], within_s: float) -> bool:
    """Wait until every session is connected and has delivered bytes both ways (or failed).

    Returns:
        False when ``within_s`` seconds passed first.
    """
    with trio.move_on_after(within_s):
        while not all(  # noqa: ASYNC110 -- polls state many tasks update; no one event to wait on
            s.failed or (s.both_connected and all(c.delivered > 0 for c in s.checks.values()))
            for s in sessions
        ):
            await trio.sleep(_FLOWING_POLL_S)
        return True
    return False


def trio_task_count() -> int:
    """Live tasks in this trio run (the whole tree under the root task)."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        count += 1
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return count


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0-1) by linear interpolation, or ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
