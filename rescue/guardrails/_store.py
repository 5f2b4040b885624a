r"""The guardrail store interface, its value types, and the pure maths around it (no I/O here).

Two implementations share one contract (tests/test_guardrails_contract.py): ``MemoryStore`` for
``rescue dev`` and tests, ``RedisStore`` for a fleet. Redis layout (see docs/guardrails.md; ``<x>``
is a value, and the only literal braces are the ``{nodes}`` hash tag of the node registry)::

    fallback:fleet                              hash  paused, reason, since, drain, cause,
                                                      initialised (epoch; see below)
    fallback:telemetry                          hash  act_tokens, act_first, ses_tokens, ses_first
                                                      TTL = 2 x the telemetry grace, set per token
    fallback:cohorts                            hash  cohort_id -> "1" / "0" (fallback_ws_enabled)
    fallback:cohort:<cohort_id>:<yyyy-mm-dd-hh> hash  sessions, tokens, activations   TTL 90 min
    fallback:{nodes}                            set   node ids                      \ one hash slot
    fallback:{nodes}:<node_id>                  str   JSON {"id", "url", "draining", "full"} / short TTL
    fallback:assign:<blake2b(session_id)>       str   node id       TTL = token lifetime, kept alive
                                                              by the node holding the session live
    fallback:cti:<blake2b(cti)>                 str   "1": the token's one connection  TTL = its life

Every atomic operation touches keys of one hash slot (Redis Cluster): one key each, except the
node registry, whose set and records share the ``{nodes}`` hash tag.

A store that lost its data (Redis restarted without persistence, a failover to an empty replica,
a flush) would otherwise read as "not paused, no cohort enabled, no counts": a kill switch that
was on would be off. So an operator initialises the store once (``rescue admin init-store``, or
``rescue token-service --init-store`` outside production), which writes the ``initialised``
field; a store without it reports ``FleetState.initialised = False`` and the policy treats the
fleet as paused until someone initialises it again (docs/guardrails.md, "Store initialisation").
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final, Protocol

__all__ = [
    "COUNTER_TTL_S",
    "NODES_KEY",
    "STORE_INITIALISED_FIELD",
    "CounterField",
    "FleetState",
    "GuardrailStore",
    "HourCounts",
    "MintSnapshot",
    "NodeInfo",
    "TelemetryGap",
    "WindowCounts",
    "assignment_key",
    "check_cohort_id",
    "check_node_id",
    "counter_key",
    "hour_bucket",
    "node_key",
    "rendezvous_pick",
    "rolling_window",
]

# SPEC §5: hourly counter hashes live 90 minutes from their first increment.
COUNTER_TTL_S: Final = 90 * 60
SECONDS_PER_HOUR: Final = 3600
KEY_PREFIX: Final = "fallback:"
# Why the fleet is paused (FleetState.cause): an operator (admin API / CLI), FALLBACK_WS_PAUSED on a
# process, the hard breach ratio, missing telemetry (decision 0012), or a store that is not
# initialised (it lost its data; never stored, the policy derives it). One label value each.
PAUSE_CAUSES: Final = ("operator", "env", "hard_breach", "telemetry_missing", "store_uninitialised")
# The field of the fleet hash that says an operator initialised the store (see the docstring).
STORE_INITIALISED_FIELD: Final = "initialised"

# Cohort and node ids go into Redis keys and JSON: a small charset and a length bound stop key
# injection (":" in a cohort id would forge another cohort's counter key) and unbounded keys.
_COHORT_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Public URLs of relay nodes are short; bound them so a bad registration can't bloat every listing.
MAX_NODE_URL: Final = 512


def check_cohort_id(cohort_id: str) -> str:
    """Return ``cohort_id`` if it is 1-64 chars of ``[A-Za-z0-9._-]``.

    Raises:
        ValueError: it is not.
    """
    if not isinstance(cohort_id, str) or _COHORT_ID.fullmatch(cohort_id) is None:
        raise ValueError("cohort_id must be 1-64 characters of [A-Za-z0-9._-]")
    return cohort_id


def check_node_id(node_id: str) -> str:
    """Return ``node_id`` if it is 1-128 chars of ``[A-Za-z0-9._:-]``.

    Raises:
        ValueError: it is not.
    """
    if not isinstance(node_id, str) or _NODE_ID.fullmatch(node_id) is None:
        raise ValueError("node id must be 1-128 characters of [A-Za-z0-9._:-]")
    return node_id


class CounterField(StrEnum):
    """The fields of an hourly cohort counter hash."""

    SESSIONS = "sessions"
    TOKENS = "tokens"
    ACTIVATIONS = "activations"


@dataclass(frozen=True, slots=True)
class FleetState:
    """The fleet-wide kill switch.

    Attributes:
        paused: minting stops and relays refuse new handshakes.
        reason: free text from the operator (or the auto-pause), None when never given.
        since: wall-clock (epoch seconds) of the last pause/resume, None if never set.
        drain: when paused, relays also close existing sessions.
        cause: who paused, one of :data:`PAUSE_CAUSES` (None when not paused or unknown).
        initialised: the store holds the mark an operator's initialisation wrote; False means it
            is new or lost its data, and the policy reads the fleet as paused (not in the JSON:
            the effective state says so through ``paused`` and ``reason``).
    """

    paused: bool = False
    reason: str | None = None
    since: float | None = None
    drain: bool = False
    cause: str | None = None
    initialised: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "reason": self.reason,
            "since": self.since,
            "drain": self.drain,
            "cause": self.cause,
        }


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One relay node as registered in the store.

    Attributes:
        node_id: the node's id (a token's ``aud``).
        public_url: the ``wss://…/v1/connect`` URL clients connect to.
        draining: the node is shutting down: it gets no new sessions, and the sessions assigned to
            it move elsewhere.
        full: the node cannot take a new session right now (``max_sessions`` reached, or its
            connection cap turns newcomers away): it gets no new sessions, but keeps its own (a
            peer of a session assigned to it is still sent there). Older token services ignore
            the field; a record without it (an older relay) reads as not full.
    """

    node_id: str
    public_url: str
    draining: bool = False
    full: bool = False

    def __post_init__(self) -> None:
        check_node_id(self.node_id)
        if not isinstance(self.public_url, str) or not 0 < len(self.public_url) <= MAX_NODE_URL:
            raise ValueError(f"node public_url must be 1-{MAX_NODE_URL} characters")

    @property
    def accepting(self) -> bool:
        """Whether a new session may be assigned here (neither draining nor full)."""
        return not (self.draining or self.full)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.node_id, "url": self.public_url, "draining": self.draining, "full": self.full}

    @classmethod
    def from_json(cls, data: Any) -> NodeInfo:
        """Parse :meth:`to_json` output; unknown fields are ignored and ``full`` is optional, so
        records of older and newer relays both parse.

        Raises:
            ValueError: ``data`` is not a valid node record.
        """
        if not isinstance(data, dict):
            raise ValueError("node record must be an object")
        node_id, url = data.get("id"), data.get("url")
        draining, full = data.get("draining", False), data.get("full", False)
        if not isinstance(node_id, str) or not isinstance(url, str) or not isinstance(draining, bool):
            raise ValueError("node record needs id (str), url (str), draining (bool)")
        if not isinstance(full, bool):
            raise ValueError("node record's full must be a bool")
        return cls(node_id, url, draining, full)


@dataclass(frozen=True, slots=True)
class HourCounts:
    """One hourly counter hash."""

    sessions: int = 0
    tokens: int = 0
    activations: int = 0

    @classmethod
    def from_mapping(cls, raw: dict[str, str] | dict[str, int]) -> HourCounts:
        def num(name: str) -> int:
            try:
                return max(0, int(raw.get(name, 0)))
            except (TypeError, ValueError):
                return 0

        return cls(num("sessions"), num("tokens"), num("activations"))


@dataclass(frozen=True, slots=True)
class TelemetryGap:
    """Tokens minted fleet-wide since the guardrail last heard each of its two inputs (decision 0012).

    Every minted token adds to both counts; an activation report (a relay paired a session) clears
    the ``activation`` pair, a sessions-started report clears the ``sessions`` pair. The whole record
    expires when no token was minted for twice the telemetry grace period, so an old stray token
    never counts towards a later gap.

    Attributes:
        tokens_since_activation: tokens minted since the last activation report.
        since_activation: wall-clock time of the first of them (None: none minted).
        tokens_since_sessions: tokens minted since the last sessions-started report.
        since_sessions: wall-clock time of the first of them (None: none minted).
    """

    tokens_since_activation: int = 0
    since_activation: float | None = None
    tokens_since_sessions: int = 0
    since_sessions: float | None = None

    @classmethod
    def from_mapping(cls, raw: dict[str, str]) -> TelemetryGap:
        def num(name: str) -> int:
            try:
                return max(0, int(raw.get(name, 0)))
            except (TypeError, ValueError):
                return 0

        def stamp(name: str) -> float | None:
            try:
                return float(raw[name]) if raw.get(name) else None
            except ValueError:
                return None

        return cls(num("act_tokens"), stamp("act_first"), num("ses_tokens"), stamp("ses_first"))

    def to_json(self) -> dict[str, Any]:
        return {
            "tokens_since_activation": self.tokens_since_activation,
            "since_activation": self.since_activation,
            "tokens_since_sessions": self.tokens_since_sessions,
            "since_sessions": self.since_sessions,
        }


@dataclass(frozen=True, slots=True)
class MintSnapshot:
    """Everything a token decision reads, fetched in one round trip (decision 0010).

    Attributes:
        fleet: the kill switch as stored.
        cohort_enabled: the cohort's ``fallback_ws_enabled`` flag.
        current, previous: the cohort's counters of this and the previous UTC hour.
        nodes: the live registered nodes, sorted by id.
        telemetry: tokens minted since the last activation / sessions-started report.
    """

    fleet: FleetState
    cohort_enabled: bool
    current: HourCounts
    previous: HourCounts
    nodes: tuple[NodeInfo, ...]
    telemetry: TelemetryGap = TelemetryGap()


@dataclass(frozen=True, slots=True)
class WindowCounts:
    """Counts over the rolling hour (weighted, so they may be fractional).

    Attributes:
        sessions, tokens, activations: weighted sums (see :func:`rolling_window`).
        previous_weight: the weight given to the previous hour's bucket (0 to 1).
    """

    sessions: float
    tokens: float
    activations: float
    previous_weight: float

    @property
    def ratio(self) -> float | None:
        """activations / sessions, or None without sessions."""
        return self.activations / self.sessions if self.sessions > 0 else None


def hour_bucket(now: float) -> str:
    """The UTC hour bucket name ``yyyy-mm-dd-hh`` containing wall-clock time ``now``."""
    return _hour_name(int(now // SECONDS_PER_HOUR))


@functools.lru_cache(maxsize=8)
def _hour_name(hour: int) -> str:
    # every mint names two buckets; formatting a datetime each time was ~2 % of a mint's CPU
    return datetime.fromtimestamp(hour * SECONDS_PER_HOUR, UTC).strftime("%Y-%m-%d-%H")


def counter_key(cohort_id: str, bucket: str) -> str:
    """``fallback:cohort:<cohort_id>:<yyyy-mm-dd-hh>`` (SPEC §5; the SPEC's braces are placeholders).

    No hash tag: every operation on a counter touches that one key, so on a Redis Cluster the
    counters spread over the shards by their full name.
    """
    return f"{KEY_PREFIX}cohort:{check_cohort_id(cohort_id)}:{bucket}"


# The node registry: a set of ids and one record per node with its own TTL, read and pruned by one
# script and written with the set by one script, so all of them carry the hash tag ``{nodes}``
# (Redis Cluster hashes only the tag: the set and every record share one slot).
NODES_KEY: Final = f"{KEY_PREFIX}{{nodes}}"


def node_key(node_id: str) -> str:
    """``fallback:{nodes}:<node_id>``: a node's record, in the registry set's hash slot."""
    return f"{NODES_KEY}:{check_node_id(node_id)}"


def assignment_key(session_id: str) -> str:
    """The Redis key of a session's node assignment: a hash, so no session id sits in Redis."""
    digest = hashlib.blake2b(session_id.encode(), digest_size=16, person=b"rescue-assign").hexdigest()
    return f"{KEY_PREFIX}assign:{digest}"


def token_use_key(cti: bytes) -> str:
    """The Redis key recording that the token ``cti`` opened a connection (a hash of it)."""
    digest = hashlib.blake2b(cti, digest_size=16, person=b"rescue-cti").hexdigest()
    return f"{KEY_PREFIX}cti:{digest}"


def rolling_window(current: HourCounts, previous: HourCounts, now: float) -> WindowCounts:
    """Weighted counts over the "rolling hour" ending at ``now``.

    With ``f`` the elapsed fraction of the current UTC hour, the window is::

        current + previous * max(0, 1 - 2f)

    i.e. the full previous hour right after the hour turns, fading linearly to nothing at half past.
    The window thus always covers the last 30 to 60 minutes and is continuous in time. The previous
    bucket is only read while it is guaranteed to exist: its 90-minute TTL starts at its first
    increment, which is at the earliest the start of its hour, so it may vanish from half past the
    next hour on; the textbook ``previous * (1 - f)`` would jump when that happens.
    """
    elapsed = (now % SECONDS_PER_HOUR) / SECONDS_PER_HOUR
    weight = max(0.0, 1.0 - 2.0 * elapsed)
    return WindowCounts(
        sessions=current.sessions + previous.sessions * weight,
        tokens=current.tokens + previous.tokens * weight,
        activations=current.activations + previous.activations * weight,
        previous_weight=weight,
    )


def _hrw_score(session_id: str, node_id: str) -> int:
    data = f"{node_id}\x00{session_id}".encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def rendezvous_pick(session_id: str, nodes: Iterable[NodeInfo]) -> NodeInfo | None:
    """Rendezvous (highest-random-weight) hashing: the node with the highest hash(node, session).

    Adding or removing a node moves only the sessions that hash highest to it. Ties (only possible
    for equal ids) break by node id. Returns None for no nodes.
    """
    best: tuple[int, str] | None = None
    chosen: NodeInfo | None = None
    for node in nodes:
        key = (_hrw_score(session_id, node.node_id), node.node_id)
        if best is None or key > best:
            best, chosen = key, node
    return chosen


class GuardrailStore(Protocol):
    """Shared guardrail state. Every method may raise :class:`~rescue.errors.StoreUnavailable`.

    Cancellation: every method is a checkpoint; implementations that block in a thread bound each
    call with a socket timeout, so cancellation takes effect within that bound.
    """

    async def ping(self) -> None:
        """Check the store answers."""

    async def fleet_state(self) -> FleetState:
        """The kill switch as stored (default: not paused), with whether the store is initialised."""

    async def set_fleet_state(self, state: FleetState) -> None:
        """Replace the kill switch state (``state.initialised`` is ignored: only
        :meth:`initialise` marks the store initialised, and nothing but data loss unmarks it)."""

    async def initialise(self, *, now: float) -> None:
        """Mark the store initialised at wall-clock ``now``, leaving the kill switch as it is."""

    async def cohort_enabled(self, cohort_id: str) -> bool:
        """The cohort's ``fallback_ws_enabled`` flag (default False)."""

    async def set_cohort_enabled(self, cohort_id: str, enabled: bool) -> None:
        """Set the cohort's ``fallback_ws_enabled`` flag."""

    async def increment(self, cohort_id: str, field: CounterField, *, now: float, amount: int = 1) -> None:
        """Add ``amount`` to ``field`` of the cohort's counter for the UTC hour containing ``now``.

        The counter hash gets its 90-minute TTL on the first increment, atomically with it. An
        ``ACTIVATIONS`` or ``SESSIONS`` increment also clears that input's :class:`TelemetryGap`.
        """

    async def hour_counts(self, cohort_id: str, buckets: list[str]) -> list[HourCounts]:
        """The counters of the given hour buckets (zeros for missing ones), in order."""

    async def register_node(self, node: NodeInfo, *, ttl: float) -> None:
        """Register or refresh a relay node; it disappears ``ttl`` seconds after its last refresh."""

    async def remove_node(self, node_id: str) -> None:
        """Forget a node at once (clean shutdown)."""

    async def live_nodes(self) -> list[NodeInfo]:
        """Every registered node whose registration hasn't expired, sorted by id."""

    async def assign_session(self, session_id: str, node_id: str, *, ttl: float) -> str:
        """Record ``session_id → node_id`` unless an assignment exists (SET NX); return the one in force.

        The assignment lives ``ttl`` seconds; reading an existing one extends it to ``ttl``.
        """

    async def session_node(self, session_id: str) -> str | None:
        """The node ``session_id`` is assigned to, or None: a plain read (the TTL is left alone)."""

    async def reassign_session(
        self, session_id: str, *, expected: str, node_id: str, ttl: float
    ) -> tuple[str, bool]:
        """Replace the assignment with ``node_id`` if it is still ``expected`` (or gone).

        Returns the assignment in force afterwards, and whether this call wrote it (of two racing
        moves only one did, so a move is recorded once).
        """

    async def mint_snapshot(self, cohort_id: str, *, now: float) -> MintSnapshot:
        """Kill switch, cohort flag, this and the previous hour's counters, the live nodes and the
        telemetry gap, read together (one round trip on Redis): the reads of one token request."""

    async def telemetry_gap(self) -> TelemetryGap:
        """The fleet's :class:`TelemetryGap` (zeros when no token was minted lately)."""

    async def record_mint(
        self,
        cohort_id: str,
        *,
        now: float,
        session_id: str,
        node_id: str | None,
        ttl: float,
        telemetry_ttl: float = 3600.0,
        sessions_reported: bool = True,
    ) -> str | None:
        """Count one token for the cohort's hour and in the :class:`TelemetryGap` (which then lives
        ``telemetry_ttl`` seconds; towards the sessions-started gap only if ``sessions_reported``:
        Beach reports this cohort's sessions, unlike the synthetic probe's) and, with ``node_id``,
        assign the session like :meth:`assign_session` (SET NX, an existing one extended and
        returned), together (one
        round trip on Redis). Returns the assignment in force, or None without ``node_id``."""

    async def keep_assignments(
        self, node_id: str, session_ids: Sequence[str], *, ttl: float
    ) -> dict[str, str]:
        """Hold sessions on ``node_id``: the relay node that has them live calls this in batches.

        For each session, atomically per session: an assignment that is missing or names
        ``node_id`` is (re)set to ``node_id`` for ``ttl`` seconds; one that names another node is
        left alone (that node holds it, or the token service moved it away from us).

        Returns:
            Every session id mapped to the node assigned afterwards (``node_id`` or the other one).
        """

    async def claim_token_use(self, cti: bytes, node_id: str, *, ttl: float) -> str:
        """Record that node ``node_id`` admitted the token named ``cti`` (SET NX PX); the node that did first.

        The record lives ``ttl`` seconds (the token's remaining lifetime plus clock skew), so a
        relay fleet sharing the store knows which node a token was used on: a copy presented to
        any other node is refused.
        """

    async def aclose(self) -> None:
        """Release connections; the store is unusable afterwards."""
