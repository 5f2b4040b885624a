"""Reconnect delays: exponential backoff with full jitter (SPEC §9), by close-code policy (SPEC §2)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Final

from rescue._codes import Backoff

__all__ = ["BASE_DELAY_S", "LONG_BACKOFF_STEPS", "MAX_DELAY_S", "BackoffPolicy"]

BASE_DELAY_S: Final = 0.25  # SPEC §9: base 250 ms
MAX_DELAY_S: Final = 30.0  # SPEC §9: cap 30 s
# RATE_LIMITED "reconnects after a longer backoff": the same schedule entered 4 doublings up, so the
# first window is 4 s instead of 250 ms and a rate-limited fleet spreads out at once.
LONG_BACKOFF_STEPS: Final = 4
# A "reconnect at once" policy (TOKEN_EXPIRED, WRONG_NODE) that fails again right away falls back to
# normal backoff after this many immediate tries, so a confused token service cannot cause a storm.
MAX_IMMEDIATE_RETRIES: Final = 1


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """How long to wait before reconnect attempt ``attempt`` (0-based, reset after a WELCOME).

    Attributes:
        base: the first window, seconds.
        cap: the largest window, seconds.
        long_steps: doublings added for ``Backoff.LONG``.
        rng: the jitter source (seed it in tests).
    """

    base: float = BASE_DELAY_S
    cap: float = MAX_DELAY_S
    long_steps: int = LONG_BACKOFF_STEPS
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def window(self, attempt: int) -> float:
        """The upper bound of the delay for ``attempt``: ``min(cap, base * 2**attempt)``."""
        return float(min(self.cap, self.base * 2.0 ** min(attempt, 62)))

    def full_jitter(self, attempt: int) -> float:
        """A delay drawn uniformly from ``[0, window(attempt)]`` (AWS "full jitter")."""
        return self.rng.uniform(0.0, self.window(attempt))

    def delay(self, kind: Backoff, attempt: int, *, reconnect_in_ms: int | None = None) -> float:
        """The delay for a close-code policy's ``backoff`` column.

        Args:
            kind: ``NONE`` (at once, unless it keeps failing), ``NORMAL``, ``LONG`` or ``SERVER``.
            attempt: consecutive failed attempts so far (0 for the first retry).
            reconnect_in_ms: the server's ``reconnect_in_ms`` for ``SERVER``.
        """
        if kind is Backoff.SERVER:
            if reconnect_in_ms is not None:
                return reconnect_in_ms / 1000.0
            return self.full_jitter(attempt)
        if kind is Backoff.NONE:
            return 0.0 if attempt < MAX_IMMEDIATE_RETRIES else self.full_jitter(attempt)
        if kind is Backoff.LONG:
            return self.full_jitter(attempt + self.long_steps)
        return self.full_jitter(attempt)
