"""One deadline for all the store work of one request, and a breaker for a store known to be down.

A token request makes several store calls (kill switch, cohort flag, counters, node assignment).
Bounding each call on its own lets a stalled Redis cost a request N times the bound; instead the caller
opens one :func:`store_deadline` around the whole request and every store call inside it shares
that budget (a context variable, so it follows the request's task and nothing else).

:class:`Breaker` is the store's memory of an outage: after a call failed for lack of a store,
callers are refused at once instead of queueing behind it, except one probe call per
``probe_interval`` that finds out when the store is back. It is pure (time passed in), so it is
tested without a store.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from enum import Enum
from typing import Final

import trio

__all__ = ["PROBE_INTERVAL_S", "Admission", "Breaker", "current_store_deadline", "store_deadline"]

# How often a store known to be down is tried again. One probe per half second finds a restarted
# Redis quickly, while a stalled one holds at most a couple of worker threads in probes.
PROBE_INTERVAL_S: Final = 0.5

_DEADLINE: contextvars.ContextVar[float] = contextvars.ContextVar("rescue_store_deadline", default=math.inf)


@contextlib.contextmanager
def store_deadline(seconds: float) -> Iterator[None]:
    """Give every store call made inside the block (by this task) ``seconds`` in total.

    Nested blocks keep the earlier deadline. A call that runs out of budget raises
    :class:`~rescue.errors.StoreUnavailable`; it never blocks past the deadline.
    """
    deadline = min(_DEADLINE.get(), trio.current_time() + seconds)
    token = _DEADLINE.set(deadline)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def current_store_deadline() -> float:
    """The trio-clock deadline for store calls of the current context (``inf``: none)."""
    return _DEADLINE.get()


class Admission(Enum):
    """What the breaker says about one call."""

    GO = "go"  # the store is believed up
    PROBE = "probe"  # the store is down; this call finds out whether it is back
    REFUSE = "refuse"  # the store is down and a probe is due later (or already running)


class Breaker:
    """Circuit breaker over "the store is unavailable" outcomes.

    Closed (store up): every call goes. The first failure opens it: calls are refused without
    touching the store until ``probe_interval`` has passed, then exactly one call is let through as
    a probe; its success closes the breaker, its failure (or its cancellation) waits another
    interval. A success of any call closes it.

    Args:
        probe_interval: seconds between probes while open.
    """

    def __init__(self, *, probe_interval: float = PROBE_INTERVAL_S) -> None:
        self.probe_interval = probe_interval
        self.open = False
        self.opened = 0  # times it opened (a metric)
        self.refused = 0  # calls refused without trying
        self._retry_at = -math.inf
        self._probing = False

    def admit(self, now: float) -> Admission:
        """Whether a call starting at ``now`` may go; a PROBE must be followed by :meth:`done`."""
        if not self.open:
            return Admission.GO
        if self._probing or now < self._retry_at:
            self.refused += 1
            return Admission.REFUSE
        self._probing = True
        return Admission.PROBE

    def done(self, admission: Admission, *, ok: bool | None, now: float) -> None:
        """Record a call's outcome: ``ok`` True/False, or None when it was cancelled (no verdict)."""
        if admission is Admission.PROBE:
            self._probing = False
            if ok is None:  # the probe's caller gave up: try again at once
                self._retry_at = now
        if ok:
            self.open = False
        elif ok is False:
            if not self.open:
                self.opened += 1
            self.open = True
            self._retry_at = now + self.probe_interval
