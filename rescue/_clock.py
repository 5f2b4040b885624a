"""The run's clock, read on the relay's per-message path without an interpreted call.

trio's own clock (``SystemClock``) answers ``current_time()`` with ``offset + perf_counter()``, in a
method of interpreted Python: with the hot path compiled (decision 0022) that call, made about
twice per forwarded message (the read's frame budget, the session core's ``now``), was the one
interpreted frame left on the path, plus two attribute lookups to reach it. :class:`RunClock`
reads the offset once and adds it in compiled code; any other clock (``trio.testing.MockClock``
in the tests, a clock a future trio gives in its place) is asked as it is, so virtual time stays
what the clock says.
"""

from __future__ import annotations

import time
from typing import Final

import trio

__all__ = ["RunClock", "run_clock"]

_perf_counter: Final = time.perf_counter
# How far apart the clock's own answer and offset + perf_counter() may be when RunClock checks
# that it reads trio's clock right (two consecutive reads: microseconds; a different clock: far more).
_AGREE_S: Final = 0.01


class RunClock:
    """A clock's ``current_time()``, the same value, cheaper when it is trio's ``SystemClock``.

    Args:
        clock: the run's clock (``trio.lowlevel.current_clock()``).
    """

    __slots__ = ("_clock", "_direct", "_offset")

    def __init__(self, clock: trio.abc.Clock) -> None:
        self._clock = clock
        self._offset = 0.0
        self._direct = False
        offset = getattr(clock, "offset", None)
        # trio's clock as trio (0.27 to 0.35 at least) writes it: believed only when it agrees
        if (
            type(clock).__name__ == "SystemClock"
            and isinstance(offset, float)
            and abs(clock.current_time() - (offset + _perf_counter())) < _AGREE_S
        ):
            self._offset = offset
            self._direct = True

    @property
    def direct(self) -> bool:
        """Whether the time is computed here (trio's ``SystemClock``) rather than asked of the clock."""
        return self._direct

    def now(self) -> float:
        """The clock's current time (``clock.current_time()``)."""
        if self._direct:
            return self._offset + _perf_counter()
        return self._clock.current_time()


_last: RunClock | None = None


def run_clock(clock: trio.abc.Clock) -> RunClock:
    """A :class:`RunClock` for ``clock``, shared: the one made last while it reads the same clock
    (a node has one run and one clock; every session holds the same object)."""
    global _last
    last = _last
    if last is None or last._clock is not clock:
        last = _last = RunClock(clock)
    return last
