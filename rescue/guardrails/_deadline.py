"""One deadline for all the store work of one request, and a breaker for a store known to be down.

A token request makes several store calls (kill switch, cohort flag, counters, node assignment).
Bounding each call on its own lets a stalled Redis cost a request N times the bound; instead the caller
opens one :func:`store_deadline` around the whole request and every store call inside it shares
that budget (a context variable, so it follows the request's task and nothing else).

The budget measures the *store's* time, not the process's: time a call spends waiting for a worker
thread (all busy because the process is saturated, not because Redis is slow) is given back with
:meth:`StoreBudget.pause`, so a CPU-bound storm queues instead of being mistaken for an outage
(decision 0010, amended).

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

__all__ = [
    "PROBE_INTERVAL_S",
    "Admission",
    "Breaker",
    "StoreBudget",
    "current_store_budget",
    "current_store_deadline",
    "store_deadline",
]

# How often a store known to be down is tried again. One probe per half second finds a restarted
# Redis quickly, while a stalled one holds at most a couple of worker threads in probes.
PROBE_INTERVAL_S: Final = 0.5


class StoreBudget:
    """The trio-clock deadline of one :func:`store_deadline` block; movable by :meth:`pause`.

    Args:
        deadline: the trio-clock time the block's store calls must be done by.
        outer: the enclosing block's budget (paused along with this one).
    """

    __slots__ = ("deadline", "outer")

    def __init__(self, deadline: float, outer: StoreBudget | None = None) -> None:
        self.deadline = deadline
        self.outer = outer

    def pause(self, seconds: float) -> None:
        """Give back ``seconds`` that were not the store's (a call waited for a worker thread)."""
        if seconds <= 0:
            return
        budget: StoreBudget | None = self
        while budget is not None:
            budget.deadline += seconds
            budget = budget.outer


_BUDGET: contextvars.ContextVar[StoreBudget | None] = contextvars.ContextVar(
    "rescue_store_budget", default=None
)


@contextlib.contextmanager
def store_deadline(seconds: float) -> Iterator[None]:
    """Give every store call made inside the block (by this task) ``seconds`` of store time in total.

    Store time starts when a worker thread starts the call: waiting for a free thread does not
    count (see :meth:`StoreBudget.pause`). Nested blocks keep the earlier deadline. A call that
    runs out of budget raises :class:`~rescue.errors.StoreUnavailable`; it never blocks past the
    deadline once it runs.
    """
    outer = _BUDGET.get()
    deadline = trio.current_time() + seconds
    if outer is not None and outer.deadline <= deadline:
        yield
        return
    token = _BUDGET.set(StoreBudget(deadline, outer))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def current_store_budget() -> StoreBudget | None:
    """The budget of the current context's :func:`store_deadline` block (None: no deadline)."""
    return _BUDGET.get()


def current_store_deadline() -> float:
    """The trio-clock deadline for store calls of the current context (``inf``: none)."""
    budget = _BUDGET.get()
    return math.inf if budget is None else budget.deadline


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

    def done(self, admission: Admission, *, ok: bool | None, now: float) -> bool:
        """Record a call's outcome: ``ok`` True/False, or None when it was cancelled (no verdict).

        ``ok`` is about the store, not the process: a call that waited for a worker thread and
        gave up before it ran has no verdict (None). Returns True when this outcome opened the
        breaker (the caller then refuses the calls still queued behind it).
        """
        if admission is Admission.PROBE:
            self._probing = False
            if ok is None:  # the probe's caller gave up: try again at once
                self._retry_at = now
        if ok:
            self.open = False
        elif ok is False:
            opened = not self.open
            if opened:
                self.opened += 1
            self.open = True
            self._retry_at = now + self.probe_interval
            return opened
        return False
