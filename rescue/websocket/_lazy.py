"""An event and a parking lot that allocate their trio object only when a task first waits.

A relay holds thousands of mostly idle connections, and each of their ``trio.Event`` objects
carries a ``set`` (~220 B) and each ``trio.lowlevel.ParkingLot`` an ``OrderedDict`` (~240 B) from
the start, although they are waited on only while a connection closes or two tasks send at once.
These stand-ins keep one slot each until then (``docs/perf/memory.md``). Same semantics as the trio
types for what :class:`~rescue.websocket.WebSocketConnection` uses.
"""

from __future__ import annotations

import trio

__all__ = ["LazyEvent", "LazyParkingLot"]


class LazyEvent:
    """``trio.Event``'s ``set`` / ``is_set`` / ``wait``; the ``trio.Event`` exists only once a task waits."""

    __slots__ = ("_event", "_flag")

    def __init__(self) -> None:
        self._flag = False
        self._event: trio.Event | None = None

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        """Set the flag and wake every waiter (idempotent)."""
        self._flag = True
        if self._event is not None:
            self._event.set()

    async def wait(self) -> None:
        """Return once the flag is set (a checkpoint, as ``trio.Event.wait``)."""
        if self._flag:
            await trio.lowlevel.checkpoint()
            return
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class LazyParkingLot:
    """``ParkingLot``'s ``park`` / ``unpark_all`` / truth (anyone parked); made on the first ``park``."""

    __slots__ = ("_lot",)

    def __init__(self) -> None:
        self._lot: trio.lowlevel.ParkingLot | None = None

    def __bool__(self) -> bool:
        return bool(self._lot)

    async def park(self) -> None:
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()

    def unpark_all(self) -> None:
        if self._lot is not None:
            self._lot.unpark_all()
