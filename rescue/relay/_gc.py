"""Garbage-collector settings for a relay node process (see ``docs/decisions/0006-relay-hot-path.md``).

A relay holds a large, long-lived heap: every connection keeps ~150 GC-tracked objects (its
WebSocket, parser, pumps, cancel scopes, coroutine frames) for as long as it lives, so at 10,000
connections the collector's full (generation 2) pass walks millions of objects. With CPython's
defaults that pass ran once or twice a minute on an idle node and took ~1 s each time, during which
no socket was served (heartbeat echoes waited up to 1.9 s).

:func:`tune_gc` does two things, once, after start-up:

- ``gc.freeze()``: everything allocated while starting (modules, classes, the config, the key
  ring, the HTTP and metrics machinery) moves to the permanent generation, which no collection
  walks again. Freezing is one-shot: objects made later are collected normally, so cyclic garbage
  from closed connections is still reclaimed.
- larger thresholds (:data:`GC_THRESHOLDS`): a young collection promotes whatever happens to be
  alive at that instant, so collecting every 700 net allocations (the default) pushes a steady
  trickle of short-lived relay objects (batches, coroutines in flight) into the old generations,
  and that trickle is what triggers the full passes. Collecting less often promotes far fewer of
  them; a young collection still runs every few thousand net allocations, so young cycles are
  reclaimed within milliseconds under load.

Memory stays bounded: full collections still happen (CPython runs one once the objects promoted
since the last one exceed 25 % of the old generation), only much less often.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Final

from rescue.sessions import FastHistogram

__all__ = ["GC_PAUSE_BUCKETS", "GC_THRESHOLDS", "GcPauses", "tune_gc"]

# (young, middle, old): net allocations between young collections; young collections per middle
# one; middle collections per (candidate) full one. Defaults are (700, 10, 10).
GC_THRESHOLDS: Final = (20_000, 20, 20)


def tune_gc() -> None:
    """Freeze the start-up heap and raise the collection thresholds (call once, after start-up).

    Idempotent in effect; safe to call from tests (it only changes collection timing, never what
    is collected).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


# Collector pauses (seconds): a young collection takes well under a millisecond; a full one over a
# heap of 10,000 connections took ~1 s before tune_gc; the SPEC's forwarding target is P95 < 40 ms.
GC_PAUSE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class GcPauses:
    """Times every garbage collection of this process (``gc.callbacks``): no socket is served meanwhile.

    The relay installs one while it runs (:meth:`install` / :meth:`remove`); ``/metrics`` shows
    ``beach_rescue_gc_pause_seconds{generation}`` and ``beach_rescue_gc_pause_max_seconds``, and
    ``/debug/stats`` the same under ``gc``. Two callbacks per collection (a clock read each), so the
    cost is nothing next to the collection itself.

    Attributes:
        by_generation: one :class:`~rescue.sessions.FastHistogram` per generation (0, 1, 2).
        max_pause: the longest pause seen (seconds); ``max_generation`` its generation.
        collected: objects the collections freed (cyclic garbage).
    """

    __slots__ = ("_forced", "_started", "by_generation", "collected", "max_generation", "max_pause")

    def __init__(self) -> None:
        self.by_generation = [FastHistogram(GC_PAUSE_BUCKETS) for _ in range(3)]
        self.max_pause = 0.0
        self.max_generation = -1
        self.collected = 0
        self._started = 0.0
        self._forced = False  # a full_collection() is running: not a pause of serving

    def reset(self) -> None:
        """Forget what was timed so far (after the deliberate start-up collection of :func:`tune_gc`)."""
        for hist in self.by_generation:
            hist.counts = [0] * len(hist.counts)
            hist.total = 0.0
            hist.count = 0
        self.max_pause = 0.0
        self.max_generation = -1
        self.collected = 0

    def install(self) -> None:
        """Start timing collections (idempotent)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def remove(self) -> None:
        """Stop timing collections."""
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if self._forced:
            return
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = min(2, max(0, int(info.get("generation", 0))))
        self.by_generation[generation].observe(pause)
        self.collected += int(info.get("collected", 0))
        if pause > self.max_pause:
            self.max_pause = pause
            self.max_generation = generation

    def full_collection(self) -> dict[str, Any]:
        """Run one full collection now and time it: what the next full pass would cost.

        For ``POST /debug/gc`` (it pauses the node for that long, on purpose): after hostile
        input, this is the pause a later collection would pay for whatever the input left behind.
        It is not counted among the serving pauses (:attr:`by_generation`, :attr:`max_pause`).
        ``gc.get_objects()`` walks the heap too, so the call costs about twice the pause.
        """
        before = len(gc.get_objects())
        self._forced = True
        try:
            started = time.perf_counter()
            collected = gc.collect()
            pause = time.perf_counter() - started
        finally:
            self._forced = False
        return {
            "pause_s": round(pause, 6),
            "collected": collected,
            "tracked_before": before,
            "tracked_after": len(gc.get_objects()),
        }

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready summary (for ``/debug/stats``)."""
        return {
            "collections": [h.count for h in self.by_generation],
            "pause_s_total": [round(h.total, 6) for h in self.by_generation],
            "max_pause_s": round(self.max_pause, 6),
            "max_pause_generation": self.max_generation,
            "collected": self.collected,
        }
