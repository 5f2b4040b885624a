"""``rescue.websocket._lazy``: the event and parking lot a connection makes only when a task waits.

They replace ``trio.Event`` / ``ParkingLot`` in :class:`~rescue.websocket.WebSocketConnection`
(~0.7 KB per idle connection, ``docs/perf/memory.md``), so they must behave the same for what the
connection uses; the close paths over real sockets are in ``test_ws_io.py``.
"""

from __future__ import annotations

import trio
import trio.testing

from rescue.websocket import WebSocketConnection
from rescue.websocket._lazy import LazyEvent, LazyParkingLot

TEST_TIMEOUT = 10


async def test_lazy_event_wakes_every_waiter_and_a_set_event_does_not_block() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        event = LazyEvent()
        assert not event.is_set()
        woken: list[int] = []

        async def waiter(i: int) -> None:
            await event.wait()
            woken.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
            assert woken == []
            event.set()
        assert sorted(woken) == [0, 1, 2]
        assert event.is_set()
        event.set()  # idempotent
        with trio.testing.assert_checkpoints():
            await event.wait()  # already set: returns at once, still a checkpoint


async def test_lazy_parking_lot_parks_and_unparks_all() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        lot = LazyParkingLot()
        assert not lot
        lot.unpark_all()  # nobody parked, nothing made: a no-op
        done: list[int] = []

        async def parker(i: int) -> None:
            await lot.park()
            done.append(i)

        async with trio.open_nursery() as nursery:
            for i in range(2):
                nursery.start_soon(parker, i)
            await trio.testing.wait_all_tasks_blocked()
            assert lot
            lot.unpark_all()
        assert sorted(done) == [0, 1]
        assert not lot


async def test_an_idle_connection_holds_no_trio_event_or_parking_lot() -> None:
    with trio.fail_after(TEST_TIMEOUT):
        left, right = trio.testing.memory_stream_pair()
        conn = WebSocketConnection(left, client=False)
        for slot in ("_peer_done", "_transport_closed", "_idle"):
            held = getattr(conn, slot)
            assert not isinstance(held, (trio.Event, trio.lowlevel.ParkingLot)), slot
            assert not any(
                isinstance(getattr(held, name), (trio.Event, trio.lowlevel.ParkingLot))
                for name in type(held).__slots__
            ), slot
        conn.abort()
        assert conn.closed
        await right.aclose()
