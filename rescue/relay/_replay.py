"""One connection per token: a replay cache keyed by the token's ``cti`` (issue 11).

A fallback token is a bearer credential for one role of one session. The takeover rule (SPEC §2: a
new connection of a role replaces the live one with ``REPLACED``) is right for a peer that
reconnects, but it let a *copy* of a live token displace its rightful peer. So a token opens one
connection, once: the relay remembers every ``cti`` it admitted for the token's remaining lifetime
plus the clock skew it allows, and refuses a second HELLO with the same ``cti`` (``AUTH_FAILED``).
Clients fetch a fresh token for every connection attempt (docs/protocol.md).

Two layers:

- **This node** (:class:`UsedTokens`): a bounded in-memory table, always on; a standalone relay
  needs nothing else.
- **The fleet**: with a guardrail store (``--redis-url``) the ``cti`` is also claimed there with
  ``SET NX PX`` (:meth:`~rescue.guardrails.GuardrailStore.claim_token_use`), so a copy presented to
  another node is refused too. A store error admits the peer (counted), like the assignment claim:
  the token is valid and was not seen here, and refusing would turn a Redis blip into an outage.
"""

from __future__ import annotations

import logging
from typing import Final

from rescue._log import get_logger, log_event
from rescue.errors import RescueError
from rescue.guardrails import GuardrailStore, store_deadline
from rescue.protocol import CLOCK_SKEW, Claims

__all__ = ["MAX_USED_TOKENS", "TokenReplayGuard", "UsedTokens"]

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

    Attributes:
        store: the guardrail store (set by the relay once its Redis store exists), or None.
        outcomes: ``{"first": n, "replayed": n, "replayed_fleet": n, "store_error": n}``.
    """

    def __init__(self, used: UsedTokens | None = None) -> None:
        self.used = used if used is not None else UsedTokens()
        self.store: GuardrailStore | None = None
        self.outcomes: dict[str, int] = {"first": 0, "replayed": 0, "replayed_fleet": 0, "store_error": 0}
        self._failing = False

    async def first_use(self, claims: Claims, now: float) -> bool:
        """Whether the token of ``claims`` may open a connection (its first use); records it."""
        exp = float(claims.exp)
        if not self.used.first_use(claims.cti, exp, now):
            self.outcomes["replayed"] += 1
            return False
        store = self.store
        if store is not None:
            try:
                with store_deadline(CLAIM_DEADLINE_S):
                    first = await store.claim_token_use(claims.cti, ttl=max(1.0, self.used.ttl(exp, now)))
            except RescueError as exc:
                self.outcomes["store_error"] += 1
                if not self._failing:
                    self._failing = True
                    log_event(_LOG, "relay.token_claim_failed", level=logging.WARNING, error=str(exc))
                return True
            self._failing = False
            if not first:
                self.outcomes["replayed_fleet"] += 1
                return False
        self.outcomes["first"] += 1
        return True
