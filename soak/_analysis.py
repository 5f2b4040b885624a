"""Is a series flat? Least-squares slope after the warm-up of a run, against a tolerance.

A leak is steady growth; churn and allocator noise go up and down. The fitted line's growth
across the analysed window (slope x window length) is compared with a tolerance of
``max(absolute, relative x mean)``. Longer runs make the test stricter in rate terms (the same
tolerance spread over more hours), which is why the SPEC asks for 24 h.

The window is the later of the run's second half and the end of a fixed warm-up. Warm-up is
growth that stops by itself once the load is steady, and it is not short: a process's connection
pool and worker threads grow to the concurrency it sees, and until decision 0017 the token
service (then on hypercorn) held every connection the client closed for its keep-alive timeout
(15 s) before the socket was released, so its fd count climbed for ~25 s and then stayed at about
(new connections per second x 15 s); rescue's own server closes at the client's EOF. Judged
over the second half of a 10 s run, such a climb reads as +5,000 fds/h: a leak verdict for a
plateau. A run that ends inside the warm-up is therefore *not judged*
(``flat is None``) rather than judged on its warm-up; :func:`flatness_verdict` says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MIN_POINTS",
    "Flatness",
    "Tolerance",
    "flatness",
    "flatness_verdict",
    "judged_window",
    "least_squares",
]

# Fewer samples than this after the warm-up: no line is fitted (the series is not judged).
MIN_POINTS = 3


@dataclass(frozen=True)
class Tolerance:
    """How much fitted growth over the window still counts as flat.

    Attributes:
        absolute: growth always allowed, in the series' unit.
        relative: growth allowed as a share of the window's mean.
    """

    absolute: float
    relative: float

    def allowed(self, mean: float) -> float:
        """The growth allowed for a window with this mean."""
        return max(self.absolute, self.relative * abs(mean))


@dataclass(frozen=True)
class Flatness:
    """The verdict for one series.

    Attributes:
        points: samples in the window.
        mean: their mean.
        slope_per_h: fitted slope, unit per hour.
        growth: fitted growth across the window (slope x window span).
        allowed: the tolerance for that growth.
        flat: ``growth <= allowed`` (shrinking always passes); ``None`` with fewer than
            :data:`MIN_POINTS` points after the warm-up (not judged).
        window_from: seconds after the first sample where the judged window starts.
    """

    points: int
    mean: float
    slope_per_h: float
    growth: float
    allowed: float
    flat: bool | None
    window_from: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "mean": round(self.mean, 3),
            "slope_per_h": round(self.slope_per_h, 3),
            "growth_in_window": round(self.growth, 3),
            "allowed_growth": round(self.allowed, 3),
            "flat": self.flat,
            "window_from_s": round(self.window_from, 3),
        }


def least_squares(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line through the points.

    Raises:
        ValueError: fewer than two points, different lengths, or every x equal.
    """
    n = len(xs)
    if n != len(ys) or n < 2:
        raise ValueError("need two or more (x, y) pairs")
    mx = sum(xs) / n
    my = sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("all x values are equal")
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    return slope, my - slope * mx


def judged_window(
    ts: Sequence[float], ys: Sequence[float], *, warmup_s: float
) -> tuple[float, list[tuple[float, float]]]:
    """Where the judged window starts (the later of the run's midpoint and ``warmup_s`` after the
    first sample) and its ``(t, y)`` samples: the one definition the verdict and the plot share."""
    if not ts:
        return 0.0, []
    start = max(ts[0] + (ts[-1] - ts[0]) / 2, ts[0] + warmup_s)
    return start, [(t, y) for t, y in zip(ts, ys, strict=True) if t >= start]


def flatness(
    ts: Sequence[float], ys: Sequence[float], tolerance: Tolerance, *, warmup_s: float = 0.0
) -> Flatness:
    """Judge ``(ts, ys)`` (``ts`` in seconds) against ``tolerance`` over the window from the later
    of the run's midpoint and ``warmup_s`` after its first sample, to its end."""
    if len(ts) != len(ys):
        raise ValueError("ts and ys differ in length")
    if not ts:
        return Flatness(0, 0.0, 0.0, 0.0, tolerance.absolute, None)
    start, window = judged_window(ts, ys, warmup_s=warmup_s)
    if not window:
        return Flatness(0, 0.0, 0.0, 0.0, tolerance.absolute, None, start - ts[0])
    xs = [t for t, _ in window]
    vs = [y for _, y in window]
    mean = sum(vs) / len(vs)
    allowed = tolerance.allowed(mean)
    if len(window) < MIN_POINTS or xs[-1] == xs[0]:
        return Flatness(len(window), mean, 0.0, 0.0, allowed, None, start - ts[0])
    slope, _ = least_squares(xs, vs)
    growth = slope * (xs[-1] - xs[0])
    return Flatness(len(window), mean, slope * 3600.0, growth, allowed, growth <= allowed, start - ts[0])


def flatness_verdict(
    verdicts: Sequence[bool | None], *, run_s: float, warmup_s: float, interval_s: float
) -> tuple[bool, str]:
    """The soak's "flat" target from every series' verdict: (pass, what to report).

    Fails when any judged series grows. A run with nothing judged passes only when it was too
    short to judge (it ended within the warm-up plus :data:`MIN_POINTS` sample intervals), and
    says so: calling a run that never left its warm-up "flat" would be as wrong as "leaking".
    """
    grows = sum(1 for v in verdicts if v is False)
    judged = sum(1 for v in verdicts if v is not None)
    if not verdicts:
        return False, "no series sampled"
    if judged == 0:
        if run_s < warmup_s + MIN_POINTS * interval_s:
            return True, (
                f"not judged: the run ({run_s:g} s) ends within its {warmup_s:g} s warm-up; "
                "a soak needs hours"
            )
        return False, f"no series could be judged in a {run_s:g} s run"
    text = f"{judged - grows}/{judged} flat after a {warmup_s:g} s warm-up"
    if judged < len(verdicts):
        text += f", {len(verdicts) - judged} too short to judge"
    return grows == 0, text
