"""Sans-I/O rate limiters: a token bucket and a per-source handshake limiter.

Nothing here reads a clock or does I/O: every call takes ``now`` (seconds, any monotonic origin),
so the relay drives them with ``trio.current_time()`` and tests drive them with plain numbers.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["DEFAULT_MAX_SOURCES", "HandshakeLimiter", "TokenBucket"]

# How many source addresses the handshake limiter remembers. Each entry is ~150 bytes, so 16,384
# sources cost ~2.5 MB at most; past that the least recently seen source is forgotten (it gets a
# fresh bucket if it comes back), which fails open for that one source rather than growing memory.
DEFAULT_MAX_SOURCES: Final = 16_384
# Entries pruned per call once they have fully refilled: amortised O(1) cleanup that brings the
# table back to empty after a burst without a background task.
_PRUNE_PER_CALL: Final = 2


class TokenBucket:
    """A token bucket with a debt model: :meth:`consume` may overdraw and says how long to wait.

    Args:
        rate: tokens added per second (> 0).
        capacity: the most tokens the bucket holds (the burst size, > 0).
        now: the current time; the bucket starts full.
    """

    __slots__ = ("_stamp", "_tokens", "capacity", "rate")

    def __init__(self, rate: float, capacity: float, *, now: float) -> None:
        if not (rate > 0 and math.isfinite(rate)) or not (capacity > 0 and math.isfinite(capacity)):
            raise ValueError(f"rate and capacity must be positive and finite, not {rate!r}, {capacity!r}")
        self.rate = float(rate)
        self.capacity = float(capacity)
        self._tokens = float(capacity)
        self._stamp = now

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._tokens

    def consume(self, amount: float, now: float) -> float:
        """Take ``amount`` tokens, going into debt if needed.

        Returns:
            Seconds the caller should wait before consuming again (0.0 when not in debt). Waiting
            that long brings the bucket back to zero, so the long-run rate never exceeds ``rate``.
        """
        self._refill(now)
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    def try_take(self, now: float, amount: float = 1.0) -> bool:
        """Take ``amount`` tokens if that many are available; never goes into debt."""
        self._refill(now)
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def full_at(self) -> float:
        """The time at which the bucket will be full again (for pruning)."""
        return self._stamp + max(0.0, self.capacity - self._tokens) / self.rate


class HandshakeLimiter:
    """Handshakes per source per minute (SPEC §2 ``RATE_LIMITED``), with a bounded table.

    Each source gets a token bucket of ``per_minute`` tokens refilled at ``per_minute / 60`` per
    second, so a source may burst ``per_minute`` handshakes and then sustain ``per_minute`` a minute.

    Args:
        per_minute: handshakes allowed per source per minute; 0 disables the limit.
        max_sources: the most sources remembered at once (see :data:`DEFAULT_MAX_SOURCES`).
    """

    __slots__ = ("_buckets", "max_sources", "per_minute")

    def __init__(self, per_minute: int, *, max_sources: int = DEFAULT_MAX_SOURCES) -> None:
        if per_minute < 0 or max_sources < 1:
            raise ValueError("per_minute must be >= 0 and max_sources >= 1")
        self.per_minute = per_minute
        self.max_sources = max_sources
        # dict order is recency order: a touched source is popped and re-inserted at the end
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        """Record one handshake attempt from ``source``; False when it is over the limit."""
        if self.per_minute == 0:
            return True
        self._prune(now)
        bucket = self._buckets.pop(source, None)
        if bucket is None:
            while len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]  # least recently seen
            bucket = TokenBucket(self.per_minute / 60.0, self.per_minute, now=now)
        self._buckets[source] = bucket
        return bucket.try_take(now)

    def _prune(self, now: float) -> None:
        for _ in range(_PRUNE_PER_CALL):
            if not self._buckets:
                return
            oldest = next(iter(self._buckets))
            if self._buckets[oldest].full_at() > now:
                return
            del self._buckets[oldest]  # a full bucket carries no state worth keeping
