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
from typing import Final

__all__ = ["GC_THRESHOLDS", "tune_gc"]

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
