"""A copy of a live token must not displace its peer: token use remembered by ``cti`` (issue 11).

A fallback token is a bearer credential for one role of one session. The takeover rule (SPEC §2: a
new connection of a role replaces the live one with ``REPLACED``) is right for a peer that
reconnects, but it let a *copy* of a live token displace its rightful peer. So the relay remembers
every ``cti`` it admitted for the token's remaining lifetime plus the clock skew it allows:

- a token's **first** use may take over a role like before (a peer reconnecting with a fresh token
  never waits for the relay to notice its old socket died);
- a token used **again** is admitted only into an **empty** role slot (the peer reconnecting with
  the same token after its connection ended: what the SDK does while the token service is
  unreachable, so reconnects survive a control-plane outage, SPEC §6); while any live connection
  holds the role it is refused ``TOKEN_EXPIRED`` (4002: "fetch a fresh token", which a real peer
  can do and a thief cannot);
- a token another node of the fleet admitted is refused the same way.

Clients fetch a fresh token for every connection attempt (docs/protocol.md).

Two layers:

- **This node** (:class:`UsedTokens`): a bounded in-memory table, always on; a standalone relay
  needs nothing else.
- **The fleet**: with a guardrail store (``--redis-url``) the ``cti`` is also claimed there with
  ``SET NX PX`` naming this node (:meth:`~rescue.guardrails.GuardrailStore.claim_token_use`). A
  store error leaves the decision to this node's table (counted), like the assignment claim: a
  Redis blip must not become an outage.
"""

from __future__ import annotations

import logging
from typing import Final

from rescue._log import get_logger, log_event
from rescue.errors import RescueError
from rescue.guardrails import GuardrailStore, store_deadline
from rescue.protocol import CLOCK_SKEW, Claims

__all__ = ["CLAIM_DEADLINE_S", "MAX_USED_TOKENS", "TokenReplayGuard", "UsedTokens"]

_LOG = get_logger("rescue.relay")

# Tokens remembered by one node. Each entry is ~150 bytes (a 16-byte key, a float, a dict slot),
# so 131,072 cost ~20 MB at most; a token lives at most 300 s + 30 s of skew, so the table holds
# every token of ~400 handshakes a second. Past that the oldest entry is forgotten (counted as
# ``evicted``): that one token could be replayed on this node, which fails open for one token
# rather than growing memory or refusing valid peers.
MAX_USED_TOKENS: Final = 131_072
# Entries looked at per call once they have expired: amortised O(1) cleanup without a task.
_PRUNE_PER_CALL: Final = 2
# Budget of the fleet-wide claim at HELLO (one SET NX round trip; a stalled Redis must not hold
# the handshake longer than the assignment claim does).
CLAIM_DEADLINE_S: Final = 0.5


class UsedTokens:
    """The ``cti`` of every token this node admitted, until the token can no longer be used.

    Sans-I/O: every call takes ``now`` (wall-clock seconds, the clock of the token's ``exp``).

    Args:
        max_entries: the bound (see :data:`MAX_USED_TOKENS`).
        skew: seconds a token stays usable past its ``exp`` (the relay's clock-skew allowance).
    """

    __slots__ = ("_seen", "evicted", "max_entries", "skew")

    def __init__(self, *, max_entries: int = MAX_USED_TOKENS, skew: float = CLOCK_SKEW) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self.max_entries = max_entries
        self.skew = skew
        self._seen: dict[bytes, float] = {}  # cti -> when it stops mattering; insertion order
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._seen)

    def ttl(self, exp: float, now: float) -> float:
        """How long a token expiring at ``exp`` must be remembered from ``now``."""
        return max(0.0, exp + self.skew - now)

    def first_use(self, cti: bytes, exp: float, now: float) -> bool:
        """Record ``cti``; False if it was already recorded and still matters (a replay)."""
        self._prune(now)
        until = self._seen.get(cti)
        if until is not None and until > now:
            return False
        while len(self._seen) >= self.max_entries:
            del self._seen[next(iter(self._seen))]
            self.evicted += 1
        self._seen[cti] = exp + self.skew
        return True

    def _prune(self, now: float) -> None:
        seen = self._seen
        for _ in range(_PRUNE_PER_CALL):
            if not seen:
                return
            oldest = next(iter(seen))
            if seen[oldest] > now:
                return
            del seen[oldest]


class TokenReplayGuard:
    """This node's :class:`UsedTokens`, plus the fleet's store when the relay has one.

    :meth:`check` says what a HELLO's token is: ``"first"`` (never used: admit; it may take over a
    role like any fresh token), ``"reused"`` (used on this node before: admit only into an empty
    role slot, see :meth:`Relay._handshake <rescue.relay.Relay>`), or ``"elsewhere"`` (another node
    of the fleet admitted it: refuse).

    Attributes:
        store: the guardrail store (set by the relay once its Redis store exists), or None.
        outcomes: counts of ``first``, ``reused`` (admitted into an empty slot), ``refused_live``
            (a live connection held the role), ``refused_elsewhere`` and ``store_error``.
    """

    def __init__(self, node_id: str, used: UsedTokens | None = None) -> None:
        self.node_id = node_id
        self.used = used if used is not None else UsedTokens()
        self.store: GuardrailStore | None = None
        self.outcomes: dict[str, int] = {
            "first": 0,
            "reused": 0,
            "refused_live": 0,
            "refused_elsewhere": 0,
            "store_error": 0,
        }
        self._failing = False

    async def check(self, claims: Claims, now: float) -> str:
        """``"first"``, ``"reused"`` or ``"elsewhere"`` for the token of ``claims``; records it."""
        exp = float(claims.exp)
        verdict = "first" if self.used.first_use(claims.cti, exp, now) else "reused"
        store = self.store
        if store is None:
            return verdict
        try:
            with store_deadline(CLAIM_DEADLINE_S):
                holder = await store.claim_token_use(
                    claims.cti, self.node_id, ttl=max(1.0, self.used.ttl(exp, now))
                )
        except RescueError as exc:
            self.outcomes["store_error"] += 1
            if not self._failing:
                self._failing = True
                log_event(_LOG, "relay.token_claim_failed", level=logging.WARNING, error=str(exc))
            return verdict  # this node's own knowledge decides (fail open for the fleet part)
        self._failing = False
        if holder != self.node_id:
            self.outcomes["refused_elsewhere"] += 1
            return "elsewhere"
        return verdict

    def count(self, outcome: str) -> None:
        """Count the relay's decision for a checked token."""
        self.outcomes[outcome] += 1
