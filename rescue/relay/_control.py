"""The relay's links to the control plane (SPEC §6, §7): keys, kill switch, activations, registry.

- :class:`KeySource`: the JWK set from a file or a URL, refreshed periodically and on demand when a
  token names an unknown ``kid`` (key rotation never fails a handshake for long).
- :class:`ControlLink`: polls ``GET /v1/fallback/status`` every ``status_poll_s`` (so the paused
  state is at most about a second old), reports ``POST /v1/fallback/activations`` from a bounded
  queue, and fails closed for new handshakes once the last good state is older than
  ``status_stale_s``.
- :class:`NodeRegistrar`: keeps this node's record (id, public URL, draining, full) in the guardrail
  store with a short expiry, rewritten soon after the node fills up or frees a place; its owner
  removes it once on the way out, after every other task stopped.
- :class:`AssignmentKeeper`: keeps the session→node assignment of every session live on this node
  alive in batches, claims a new session's assignment at HELLO (``WRONG_NODE`` when another live
  node holds it) and closes sessions whose assignment was moved elsewhere (decision 0008).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final, NamedTuple

import httpx
import trio

from rescue._codes import CloseCode
from rescue._keyfiles import load_keyring
from rescue._log import get_logger, log_event
from rescue.errors import ConfigError, RescueError
from rescue.guardrails import GuardrailStore, NodeInfo, store_deadline
from rescue.protocol import KeyRing

__all__ = [
    "MAX_PENDING_ACTIVATIONS",
    "REGISTER_DEADLINE_S",
    "AssignmentKeeper",
    "ControlLink",
    "KeySource",
    "NodeRegistrar",
]

_LOG = get_logger("rescue.relay")

# Activation reports waiting to be sent. Reports are counts for the guardrail ratio, so losing a
# few during a token-service outage skews it a little; 1,024 covers a minute of pairings on a busy
# node without letting an outage grow memory. Overflow is counted and logged.
MAX_PENDING_ACTIVATIONS: Final = 1024
# A JWK set is a handful of keys; a megabyte is already absurd.
MAX_JWKS_BYTES: Final = 1 << 20
# An unknown kid triggers at most one refetch per this many seconds, so a stream of tokens signed
# by garbage kids cannot make the relay hammer the token service.
UNKNOWN_KID_REFRESH_S: Final = 10.0
# Budget of one registration write or removal. A healthy Redis answers in a millisecond; a stalled
# one must neither hold up start-up nor shutdown for longer than this (the record then expires).
REGISTER_DEADLINE_S: Final = 1.0
# A keep-alive round gets REGISTER_DEADLINE_S per this many sessions (10,000 sessions are ten
# pipelined round trips of a few milliseconds each; the bound only stops a stalled Redis).
KEEP_PER_DEADLINE_S: Final = 5000
# How often the registrar looks at whether the node is full (an in-memory check, no store call):
# the token service learns of a change within about this long plus one write.
FULL_CHECK_S: Final = 0.25
# At least this long between two registry writes made for a change of "full" (the periodic refresh
# and a drain are not held back): a node flapping at its limit costs Redis at most one extra
# write per second, each carrying the state of its moment; a change that reverts within the wait
# costs none.
FULL_WRITE_INTERVAL_S: Final = 1.0


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


class KeySource:
    """Verification keys from a JWK set file or URL.

    Args:
        source: a file path or an ``http(s)://`` URL.
        ring: initial keys (tests); otherwise call :meth:`load` before use.
    """

    def __init__(self, source: str, *, ring: KeyRing | None = None) -> None:
        self.source = source
        self.ring = ring if ring is not None else KeyRing()
        self.loaded_at = -math.inf
        self.refreshes_ok = 0
        self.refreshes_failed = 0
        self._last_on_demand = -math.inf
        self._lock = trio.Lock()

    @property
    def is_url(self) -> bool:
        """Whether the keys come from a URL."""
        return _is_url(self.source)

    async def load(self, client: httpx.AsyncClient | None) -> None:
        """Fetch or read the keys now.

        Raises:
            ConfigError: unreadable, unreachable, not a JWK set, or empty.
        """
        async with self._lock:
            if self.is_url:
                if client is None:
                    raise ConfigError("keys come from a URL but no HTTP client was given")
                ring = await self._fetch(client)
            else:
                ring = await trio.to_thread.run_sync(load_keyring, Path(self.source))
            self.ring = ring
            self.loaded_at = trio.current_time()
            self.refreshes_ok += 1

    async def _fetch(self, client: httpx.AsyncClient) -> KeyRing:
        try:
            response = await client.get(self.source)
        except httpx.HTTPError as exc:
            raise ConfigError(f"cannot fetch keys from {self.source}: {type(exc).__name__}") from exc
        if response.status_code != 200:
            raise ConfigError(f"keys URL {self.source} answered {response.status_code}")
        if len(response.content) > MAX_JWKS_BYTES:
            raise ConfigError(f"keys from {self.source} exceed {MAX_JWKS_BYTES} bytes")
        try:
            doc = response.json()
        except ValueError as exc:
            raise ConfigError(f"keys from {self.source} are not JSON") from exc
        return KeyRing.from_jwks(doc)

    async def refresh(self, client: httpx.AsyncClient | None) -> bool:
        """Reload the keys, keeping the old ones on failure; True on success."""
        try:
            await self.load(client)
        except ConfigError as exc:
            self.refreshes_failed += 1
            log_event(_LOG, "relay.keys_refresh_failed", level=logging.WARNING, error=str(exc))
            return False
        return True

    async def refresh_for_unknown_kid(self, client: httpx.AsyncClient | None) -> bool:
        """Refresh because a token named an unknown kid, at most once per 10 s; True if refreshed."""
        now = trio.current_time()
        if now - self._last_on_demand < UNKNOWN_KID_REFRESH_S:
            return False
        self._last_on_demand = now
        return await self.refresh(client)

    async def run(self, client: httpx.AsyncClient | None, interval: float) -> None:
        """Refresh every ``interval`` seconds, forever."""
        while True:
            await trio.sleep(interval)
            await self.refresh(client)


class Refusal(NamedTuple):
    """A reason to refuse new handshakes: the close code and the text for the CLOSE body."""

    code: CloseCode
    reason: str


class ControlLink:
    """The token service as the relay sees it: paused state and activation reports (SPEC §6).

    Args:
        base_url: the token service, or ``None`` for a standalone relay.
        poll_s: status poll interval.
        stale_s: fail closed once the last good state is older than this.
        paused: the local kill switch (``FALLBACK_WS_PAUSED=1``), ORed with the fleet's.
        on_drain: called (synchronously) after each poll that says paused with ``drain``.
        report_key: bearer key for ``POST /v1/fallback/activations`` when the token service
            requires one (its ``RESCUE_REPORT_KEYS``); never logged.
    """

    def __init__(
        self,
        base_url: str | None,
        *,
        poll_s: float,
        stale_s: float,
        paused: bool = False,
        on_drain: Callable[[], None] | None = None,
        report_key: str | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/") if base_url else None
        self._report_headers = {"authorization": f"Bearer {report_key}"} if report_key else {}
        self.poll_s = poll_s
        self.stale_s = stale_s
        self.local_paused = paused
        self.fleet_paused = False
        self.fleet_drain = False
        self.last_ok = -math.inf  # unknown state counts as stale: fail closed until the first poll
        self.last_error: str | None = None
        self.polls: dict[str, int] = {"ok": 0, "error": 0}
        self.activations: dict[str, int] = {"ok": 0, "error": 0, "dropped": 0}
        self.on_drain = on_drain
        send, receive = trio.open_memory_channel[str](MAX_PENDING_ACTIVATIONS)
        self._activations_in = send
        self._activations_out = receive

    @property
    def standalone(self) -> bool:
        """True without a token service."""
        return self.base_url is None

    def state_age(self) -> float:
        """Seconds since the last good status (``inf`` before the first; 0 when standalone)."""
        if self.standalone:
            return 0.0
        return trio.current_time() - self.last_ok

    def stale(self) -> bool:
        """Whether the known state is too old to trust."""
        return self.state_age() > self.stale_s

    def refusal(self) -> Refusal | None:
        """Why new handshakes must be refused right now, and with which code (``None``: accept).

        A pause is ``GUARDRAIL_TRIPPED``: clients stop. A kill-switch state that is merely unknown
        (token service unreachable for longer than ``stale_s``) is ``OVERLOADED``: clients fetch a
        fresh token with backoff and come back once the control plane answers, so a control-plane
        outage never ends a session for good (see docs/relay.md, "Failing closed").
        """
        if self.local_paused:
            return Refusal(CloseCode.GUARDRAIL_TRIPPED, "fallback is paused on this node")
        if self.standalone:
            return None
        if self.stale():
            return Refusal(CloseCode.OVERLOADED, "kill switch state unknown (token service unreachable)")
        if self.fleet_paused:
            return Refusal(CloseCode.GUARDRAIL_TRIPPED, "fallback is paused")
        return None

    def detail(self) -> dict[str, Any]:
        """JSON detail for ``/readyz`` and ``/debug/stats``."""
        age = self.state_age()
        return {
            "token_service": self.base_url is not None,
            "paused": self.local_paused or self.fleet_paused,
            "drain": self.fleet_drain,
            "state_age_s": None if math.isinf(age) else round(age, 3),
            "stale": self.stale(),
            "last_error": self.last_error,
        }

    def report_activation(self, cohort: str) -> None:
        """Queue an activation report (never blocks; counted and dropped when the queue is full)."""
        if self.standalone:
            return
        try:
            self._activations_in.send_nowait(cohort)
        except trio.WouldBlock:
            self.activations["dropped"] += 1

    async def run(
        self, client: httpx.AsyncClient, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Poll the status and send activation reports until cancelled (returns at once standalone).

        Reports started after the first poll, whatever its outcome.

        Cancellation:
            The only way it ends; queued activation reports are dropped.
        """
        if self.base_url is None:
            task_status.started()
            return
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._report_loop, client)
            # one poll first, so a node that starts next to a healthy token service is ready at
            # once; an unreachable one leaves the state stale (refusing, /readyz 503) and we go on
            started = trio.current_time()
            await self.poll_once(client)
            task_status.started()
            await trio.sleep_until(started + self.poll_s)
            await self._poll_loop(client)

    async def poll_once(self, client: httpx.AsyncClient) -> bool:
        """Fetch the status once; True when it was read."""
        assert self.base_url is not None
        try:
            response = await client.get(f"{self.base_url}/v1/fallback/status")
            if response.status_code != 200:
                raise RescueError(f"status answered {response.status_code}")
            doc = response.json()
            if not isinstance(doc, dict) or not isinstance(doc.get("paused"), bool):
                raise RescueError("status is not an object with a boolean 'paused'")
        except (httpx.HTTPError, RescueError, ValueError) as exc:
            self.polls["error"] += 1
            if self.last_error is None:
                log_event(_LOG, "relay.control_unreachable", level=logging.WARNING, error=str(exc))
            self.last_error = f"{type(exc).__name__}: {exc}"[:200]
            return False
        was_paused = self.fleet_paused
        self.fleet_paused = doc["paused"]
        self.fleet_drain = bool(doc.get("drain", False)) and self.fleet_paused
        self.last_ok = trio.current_time()
        if self.last_error is not None:
            log_event(_LOG, "relay.control_reachable")
        self.last_error = None
        self.polls["ok"] += 1
        if was_paused != self.fleet_paused:
            log_event(_LOG, "relay.fleet_paused" if self.fleet_paused else "relay.fleet_resumed")
        if self.fleet_drain and self.on_drain is not None:
            self.on_drain()
        return True

    async def _poll_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            started = trio.current_time()
            await self.poll_once(client)
            await trio.sleep_until(started + self.poll_s)

    async def _report_loop(self, client: httpx.AsyncClient) -> None:
        async for cohort in self._activations_out:
            try:
                response = await client.post(
                    f"{self.base_url}/v1/fallback/activations",
                    json={"cohort": cohort},
                    headers=self._report_headers,
                )
                ok = response.status_code < 300
            except httpx.HTTPError:
                ok = False
            self.activations["ok" if ok else "error"] += 1


class NodeRegistrar:
    """This node's record in the guardrail store (SPEC §7), refreshed every ``ttl / 3``.

    The record says whether the node is *full*: ``full()`` is true while a new session would be
    refused here (``max_sessions`` reached, or the connection cap turning newcomers away: the
    capacity reasons of ``/readyz``), and the token service then assigns it no new sessions while
    still sending a session's own peers back to it. ``full()`` is read every
    :data:`FULL_CHECK_S`; a change is written at once, but not sooner than
    :data:`FULL_WRITE_INTERVAL_S` after the previous write made for a change, and a change that
    reverted before its write is no change. Every write carries the state of its moment.

    Args:
        store: the guardrail store (Redis in production).
        node_id: this node's id.
        public_url: where clients reach it.
        ttl: record expiry in seconds.
        full: whether the node cannot take a new session now (cheap: called every
            :data:`FULL_CHECK_S`); without it the node never says it is full.
    """

    def __init__(
        self,
        store: GuardrailStore,
        *,
        node_id: str,
        public_url: str,
        ttl: float,
        full: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.public_url = public_url
        self.ttl = ttl
        self.draining = False
        self.registered = False
        self.full = False  # as last written successfully: what the token service sees
        self.outcomes: dict[str, int] = {"ok": 0, "error": 0}
        # changes of "full" in the record as written: to full, and back
        self.full_changes: dict[str, int] = {"full": 0, "not_full": 0}
        self._full_now = full
        self._wake = trio.Event()

    def set_draining(self) -> None:
        """Mark the node draining (re-registered at once, so no new sessions are assigned)."""
        self.draining = True
        self._wake.set()

    def _is_full(self) -> bool:
        return self._full_now is not None and self._full_now()

    async def register_once(self) -> bool:
        """Write the record once (within :data:`REGISTER_DEADLINE_S`), with ``full`` as it is now;
        True on success.

        Cancellation:
            Shielded, within the same deadline: a write abandoned to its worker thread could land
            after :meth:`remove` and bring the record back. (SIGTERM triggers a draining write; on
            a node with nothing to drain the services are cancelled a moment later, and the
            abandoned write raced the removal -- and sometimes won, leaving a dead node listed.)
        """
        full = self._is_full()
        try:
            with trio.CancelScope(shield=True), store_deadline(REGISTER_DEADLINE_S):
                await self.store.register_node(
                    NodeInfo(self.node_id, self.public_url, self.draining, full), ttl=self.ttl
                )
        except RescueError as exc:
            self.outcomes["error"] += 1
            log_event(_LOG, "relay.register_failed", level=logging.WARNING, error=str(exc))
            return False
        self.outcomes["ok"] += 1
        self.registered = True
        if full != self.full:
            self.full = full
            self.full_changes["full" if full else "not_full"] += 1
            log_event(_LOG, "relay.registered_full" if full else "relay.registered_not_full")
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register, then refresh every ``ttl / 3`` (at once after :meth:`set_draining`, and when
        the node fills up or frees a place, see the class) until cancelled.

        Reports started after the first attempt, whatever its outcome.

        Cancellation:
            The only way it ends, at once (a call in flight is abandoned to its worker thread; see
            :class:`~rescue.guardrails.RedisStore`). It does not remove the record: the owner calls
            :meth:`remove` once every other task has stopped.
        """
        await self.register_once()
        task_status.started()
        refresh_at = trio.current_time() + self.ttl / 3
        change_at = -math.inf  # no write for a change of "full" before this
        while True:
            wake_at = refresh_at
            if self._full_now is not None:
                wake_at = min(wake_at, max(trio.current_time() + FULL_CHECK_S, change_at))
            with trio.move_on_at(wake_at):
                await self._wake.wait()
            now = trio.current_time()
            changed = self._is_full() != self.full
            if changed and now >= change_at:
                change_at = now + FULL_WRITE_INTERVAL_S
            elif not (self._wake.is_set() or now >= refresh_at):
                continue
            self._wake = trio.Event()
            await self.register_once()
            refresh_at = trio.current_time() + self.ttl / 3

    async def remove(self) -> bool:
        """Remove the record (within :data:`REGISTER_DEADLINE_S`); True on success, else it expires."""
        try:
            with store_deadline(REGISTER_DEADLINE_S):
                await self.store.remove_node(self.node_id)
        except RescueError as exc:
            log_event(_LOG, "relay.unregister_failed", level=logging.WARNING, error=str(exc))
            return False
        self.registered = False
        return True


class AssignmentKeeper:
    """Keeps this node's live sessions assigned to it (SPEC §7; docs/decisions/0008).

    Every store call runs under a :func:`~rescue.guardrails.store_deadline`: at HELLO
    :data:`REGISTER_DEADLINE_S`, so a stalled Redis delays a handshake by at most that.

    A session lives for hours, a token and its assignment for minutes: while a session is live
    here (at least one peer connected), its assignment is refreshed every ``ttl / 3`` in batches,
    so the token service keeps sending both peers here whatever the node set does meanwhile.

    Args:
        store: the guardrail store.
        node_id: this node's id.
        ttl: the lifetime each refresh gives an assignment.
        sessions: the ids of the sessions live on this node right now.
        on_lost: called with (session id, node id) for a live session whose assignment names
            another node (the token service moved it: this node was judged gone or draining);
            the relay closes it with ``WRONG_NODE`` so both peers follow.

    Error handling:
        A store error during a refresh is counted and logged; the next round tries again (an
        assignment outlives two missed rounds). At HELLO a store error admits the peer: its token
        names this node, and refusing would turn a Redis blip into an outage.
    """

    def __init__(
        self,
        store: GuardrailStore,
        *,
        node_id: str,
        ttl: float,
        sessions: Callable[[], Iterable[str]],
        on_lost: Callable[[str, str], None],
    ) -> None:
        self.store = store
        self.node_id = node_id
        self.ttl = ttl
        self._sessions = sessions
        self._on_lost = on_lost
        self.outcomes: dict[str, int] = {
            "kept": 0,
            "lost": 0,
            "claimed": 0,
            "moved_here": 0,
            "wrong_node": 0,
            "error": 0,
        }
        self._failing = False

    async def claim(self, session_id: str) -> str | None:
        """Take ``session_id`` for this node at HELLO; the other node that holds it, or None.

        The assignment becomes this node's when it is missing, already ours, or names a node
        that is gone or draining (compare-and-set, as the token service moves it).
        """
        try:
            with store_deadline(REGISTER_DEADLINE_S):
                holder = (await self.store.keep_assignments(self.node_id, [session_id], ttl=self.ttl))[
                    session_id
                ]
                if holder == self.node_id:
                    self.outcomes["claimed"] += 1
                    return None
                other = {n.node_id: n for n in await self.store.live_nodes()}.get(holder)
                if other is None or other.draining:
                    holder, moved = await self.store.reassign_session(
                        session_id, expected=holder, node_id=self.node_id, ttl=self.ttl
                    )
                    if moved or holder == self.node_id:
                        self.outcomes["moved_here"] += 1
                        return None
        except RescueError as exc:
            self._count_error(exc)
            return None
        self.outcomes["wrong_node"] += 1
        return holder

    async def keep_once(self) -> None:
        """Refresh every live session's assignment once; report the ones moved elsewhere."""
        ids = list(self._sessions())
        if not ids:
            return
        try:
            with store_deadline(REGISTER_DEADLINE_S * (1 + len(ids) // KEEP_PER_DEADLINE_S)):
                holders = await self.store.keep_assignments(self.node_id, ids, ttl=self.ttl)
        except RescueError as exc:
            self._count_error(exc)
            return
        if self._failing:
            self._failing = False
            log_event(_LOG, "relay.assignments_kept_again", sessions=len(ids))
        for session_id, holder in holders.items():
            if holder == self.node_id:
                self.outcomes["kept"] += 1
            else:
                self.outcomes["lost"] += 1
                self._on_lost(session_id, holder)

    def _count_error(self, exc: RescueError) -> None:
        self.outcomes["error"] += 1
        if not self._failing:
            self._failing = True
            log_event(_LOG, "relay.assignments_failed", level=logging.WARNING, error=str(exc))

    async def run(self) -> None:
        """Refresh every ``ttl / 3`` seconds until cancelled."""
        while True:
            await trio.sleep(self.ttl / 3)
            await self.keep_once()
