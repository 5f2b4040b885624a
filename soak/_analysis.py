"""Is a series flat? Least-squares slope over the second half of a run, against a tolerance.

A leak is steady growth; churn and allocator noise go up and down. The fitted line's growth
across the analysed window (slope x window length) is compared with a tolerance of
``max(absolute, relative x mean)``. Longer runs make the test stricter in rate terms (the same
tolerance spread over more hours), which is why the SPEC asks for 24 h.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Flatness", "Tolerance", "flatness", "least_squares"]


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
        flat: ``growth <= allowed`` (shrinking always passes); ``None`` with fewer than 3 points.
    """

    points: int
    mean: float
    slope_per_h: float
    growth: float
    allowed: float
    flat: bool | None

    def to_json(self) -> dict[str, Any]:
        return {
            "points": self.points,
            "mean": round(self.mean, 3),
            "slope_per_h": round(self.slope_per_h, 3),
            "growth_in_window": round(self.growth, 3),
            "allowed_growth": round(self.allowed, 3),
            "flat": self.flat,
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


def flatness(ts: Sequence[float], ys: Sequence[float], tolerance: Tolerance) -> Flatness:
    """Fit the second half of ``(ts, ys)`` (``ts`` in seconds) and judge it against ``tolerance``."""
    if len(ts) != len(ys):
        raise ValueError("ts and ys differ in length")
    if not ts:
        return Flatness(0, 0.0, 0.0, 0.0, tolerance.absolute, None)
    half = ts[0] + (ts[-1] - ts[0]) / 2
    window = [(t, y) for t, y in zip(ts, ys, strict=True) if t >= half]
    xs = [t for t, _ in window]
    vs = [y for _, y in window]
    mean = sum(vs) / len(vs)
    allowed = tolerance.allowed(mean)
    if len(window) < 3 or xs[-1] == xs[0]:
        return Flatness(len(window), mean, 0.0, 0.0, allowed, None)
    slope, _ = least_squares(xs, vs)
    growth = slope * (xs[-1] - xs[0])
    return Flatness(len(window), mean, slope * 3600.0, growth, allowed, growth <= allowed)
