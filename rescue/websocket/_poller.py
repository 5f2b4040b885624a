"""Shared read readiness for many sockets: one edge-triggered epoll set, read-ahead, quiet sockets.

Why (``docs/decisions/0007-shared-read-poller.md``): a relay holding thousands of mostly idle
connections paid, for every inbound message, a wake-up of that connection's reader task, a pass
of trio's run loop and an ``epoll_ctl`` re-arm (trio arms each wait ``EPOLLONESHOT``). On the
VMs we measure on, the wake-up costs far more than the message: 10,000 idle connections with a
heartbeat every 15 s (~670 messages a second) took ~10 % of a core, as much as a byte-copying
trio relay.

This poller keeps every registered socket in a private edge-triggered epoll set (registered
once, never re-armed) and waits for that one descriptor through trio. When sockets are ready it
runs, for each whose reader is parked, that socket's callback -- the connection's read-ahead,
which reads, parses and lets the relay handle the common cases synchronously -- and wakes the
reader task only when the callback cannot finish the job.

Quiet sockets (decision 0015; :meth:`ReadPoller.set_quiet`: only heartbeats lately) stay in the
same set, so anything their owner lets make them readable is dispatched at once. The owner raises
the socket's ``SO_RCVLOWAT`` above one heartbeat frame (:data:`QUIET_RCVLOWAT`): a lone heartbeat
then makes no wake-up at all, while the first real message (a larger frame) does, immediately.
The heartbeats themselves are collected by *looks*: each quiet socket is looked at (as if it were
ready) once per ``heartbeat_s``, phase-locked to its last heartbeat, and the looks of all quiet
sockets are batched on a grid of ``quiet_tick_s``. Thousands of heartbeat-only connections thus
cost a few wake-ups a second, and the first message after a quiet spell pays no tick at all. A
heartbeat a look missed (the peer's clock drifted) is read with the next one: two heartbeats
pass the low-water mark.

Edge-triggered contract: a reader must read until the socket is drained (a short read) before it
waits again; :class:`~rescue.websocket.WebSocketConnection` does (a full read retries without
waiting). Readiness that arrives while the reader is busy is remembered, so the next wait returns
at once; a hang-up (EOF, error) keeps the socket ready for good, so an EOF that arrived with the
last data is never missed.

It is an I/O multiplexer, not an owner: every socket and reader task still belongs to its
session's nursery. When the poller's task ends, every waiter is woken and falls back to trio's
own ``wait_readable``. Linux only (``select.epoll``); elsewhere :data:`AVAILABLE` is False and
connections simply use trio.
"""

from __future__ import annotations

import heapq
import math
import select
from collections.abc import Callable
from typing import Final

import outcome
import trio

__all__ = ["AVAILABLE", "POLLER_AVAILABLE", "QUIET_RCVLOWAT", "ReadAhead", "ReadPoller"]

AVAILABLE: Final = hasattr(select, "epoll")
# The same, under the name rescue.websocket exports it by (AVAILABLE alone says too little).
POLLER_AVAILABLE: Final = AVAILABLE
# Events taken per epoll_wait: bounds one dispatch pass; more ready sockets take another pass.
MAX_EVENTS: Final = 4096
# SO_RCVLOWAT for a quiet socket (decision 0015): the smallest CONTROL/DATA/CLOSE frame a peer can
# send is 34 bytes (2-byte WebSocket header + 4-byte mask + 12-byte rescue header + 16-byte AEAD
# tag or a CBOR close body of at least 17), a HEARTBEAT is 18 (empty body). So a lone heartbeat
# stays in the kernel without waking anything, and every real message wakes the poller at once.
QUIET_RCVLOWAT: Final = 34
if AVAILABLE:
    _MASK: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    # The peer shut down or the socket failed: the end is readable for good.
    _HANGUP: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
# _Fd.look_at when no look is scheduled (never a slot's time)
_NO_LOOK: Final = -1.0


class ReadAhead:
    """A registered socket's owner, as the poller calls it (:meth:`ReadPoller.register`).

    :meth:`read_ahead` runs in the poller's task when the socket is ready *and* a task waits on
    it: it may do the waiting task's work synchronously and return True to leave that task parked,
    or False to wake it. It must not raise and must not block.
    :class:`~rescue.websocket.WebSocketConnection` is one; a plain function is wrapped in one.
    Compiled, the poller calls it directly (a call through a bound method was a generic call and
    an argument-parsing wrapper per ready socket: decision 0022).
    """

    __slots__ = ()

    def read_ahead(self) -> bool:
        """Handle the ready socket's input now (True), or leave it to the waiting task (False)."""
        return False


class _Call(ReadAhead):
    """A function as a :class:`ReadAhead`."""

    __slots__ = ("_function",)

    def __init__(self, function: Callable[[], bool]) -> None:
        self._function = function

    def read_ahead(self) -> bool:
        return self._function()


class _Fd:
    """What the poller knows about one registered descriptor: one record, one lookup per event
    (five sets and dicts before: five hash-table probes, each a likely cache miss, per event)."""

    __slots__ = ("hangup", "look_at", "owner", "quiet", "ready", "waiter")

    def __init__(self, owner: ReadAhead | None) -> None:
        self.owner = owner
        self.waiter: trio.lowlevel.Task | None = None  # the task parked in wait_readable
        self.ready = False  # readiness seen while nobody waited
        # hung up (EOF or error seen): always ready, so a short read that left the EOF behind
        # (data and FIN in one edge) cannot leave its reader waiting for an edge that never comes
        self.hangup = False
        self.quiet = False  # looked at on a schedule (set_quiet)
        self.look_at = _NO_LOOK  # quiet: its next look (phase-locked to the peer's heartbeats)


class ReadPoller:
    """Read readiness for registered file descriptors, dispatched in batches by :meth:`run`.

    Every socket lives in one epoll set, watched all the time (a wake-up as soon as anything is
    ready). Sockets their owner marked quiet (:meth:`set_quiet`: only heartbeats lately) are in
    addition *looked at* -- dispatched as if ready -- once per ``heartbeat_s``, one look per
    expected heartbeat, the looks of all quiet sockets batched on a ``quiet_tick_s`` grid; so the
    owner may raise the socket's ``SO_RCVLOWAT`` (:data:`QUIET_RCVLOWAT`) and lone heartbeats cost
    no wake-up of their own. A real readiness event of a quiet socket re-anchors its looks.

    Args:
        coalesce_s: after handling a batch of ready sockets, how long to let readiness
            accumulate before looking again (0: look again as soon as the batch's tasks ran).
        quiet_tick_s: the grid quiet sockets' looks are batched on: with ``heartbeat_s``, what a
            heartbeat echo of a quiet peer waits (about 0.5-1.5 ticks). Not a data delay.
        heartbeat_s: the peers' heartbeat period (what the relay announces): a quiet socket is
            looked at this long after its last heartbeat, plus half a tick of slack.

    Usage::

        poller = ReadPoller(quiet_tick_s=0.1, heartbeat_s=15)
        await nursery.start(poller.run)       # outlives every connection that uses it
        poller.register(fd)                   # once per socket (active)
        await poller.wait_readable(fd)        # instead of trio.lowlevel.wait_readable(sock)
        poller.set_quiet(fd, True)            # only heartbeats lately (and SO_RCVLOWAT raised)
        poller.unregister(fd)                 # before closing the socket (wakes a waiter)
    """

    def __init__(
        self, *, coalesce_s: float = 0.0, quiet_tick_s: float = 0.1, heartbeat_s: float = 15.0
    ) -> None:
        if not (0 <= coalesce_s <= 3600 and 0 <= quiet_tick_s <= 3600):  # (NaN fails too)
            raise ValueError("coalesce_s and quiet_tick_s must be between 0 and 3600")
        if not 0 < heartbeat_s <= 3600:
            raise ValueError("heartbeat_s must be above 0 and at most 3600")
        self.coalesce_s = coalesce_s
        self.quiet_tick_s = quiet_tick_s
        self.heartbeat_s = heartbeat_s
        self._active: select.epoll | None = None
        self._fds: dict[int, _Fd] = {}  # every registered descriptor
        self._quiet_count = 0
        self._waiting = 0
        # Quiet descriptors' looks, filed in a timing wheel of grid slots: slot -> records (stale
        # ones skipped: their look_at moved), and a heap of the slots in use (~heartbeat_s /
        # quiet_tick_s of them). Filing a look is a list append and a look pass takes whole slots,
        # where a heap of every quiet fd cost two sift walks of ~log2(n) tuple comparisons per
        # heartbeat (~5 % of an idle node's busy samples at 10,000 connections).
        self._slots: dict[float, list[_Fd]] = {}
        self._slot_heap: list[float] = []
        self._look_scope: trio.CancelScope | None = None
        self.wakeups = 0  # dispatch passes (both sets)
        self.events = 0  # readiness events dispatched
        self.handled = 0  # events a callback handled without waking the waiting task
        self.moves = 0  # sockets marked quiet or active again
        self.looks = 0  # scheduled looks at quiet sockets (not readiness events)

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is active (registration and waits go through the poller)."""
        return self._active is not None

    def statistics(self) -> dict[str, int | float]:
        """Counters for ``/debug/stats``: sockets (all, quiet), waiters, wake-ups, events, moves."""
        return {
            "registered": len(self._fds),
            "quiet": self._quiet_count,
            "waiting": self._waiting,
            "wakeups": self.wakeups,
            "events": self.events,
            "handled": self.handled,
            "moves": self.moves,
            "looks": self.looks,
            "coalesce_s": self.coalesce_s,
            "quiet_tick_s": self.quiet_tick_s,
            "heartbeat_s": self.heartbeat_s,
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Dispatch readiness until cancelled; then wake every waiter (they fall back to trio).

        Raises:
            RuntimeError: not on Linux, or already running.
        """
        if not AVAILABLE:
            raise RuntimeError("ReadPoller needs select.epoll (Linux)")
        if self._active is not None:
            raise RuntimeError("ReadPoller is already running")
        active = self._active = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._look_loop)
                task_status.started()
                await self._watch(active, self.coalesce_s)
        finally:
            self._active = None
            self._look_scope = None
            self._slots.clear()
            self._slot_heap.clear()
            records = list(self._fds.values())
            self._fds.clear()
            self._quiet_count = self._waiting = 0
            for record in records:
                record.look_at = _NO_LOOK
                task = record.waiter
                if task is not None:
                    record.waiter = None
                    trio.lowlevel.reschedule(task)  # a spurious wake: the reader re-checks and uses trio
            trio.lowlevel.notify_closing(active.fileno())
            active.close()

    async def _watch(self, epoll: select.epoll, pause_s: float) -> None:
        fd = epoll.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self._dispatch(epoll)
            if pause_s:
                await trio.sleep(pause_s)

    def _dispatch(self, epoll: select.epoll) -> None:
        fds = self._fds
        self.wakeups += 1
        while True:
            events = epoll.poll(0, MAX_EVENTS)
            self.events += len(events)
            for fd, mask in events:
                record = fds.get(fd)
                if record is None:
                    continue  # unregistered since
                if mask & _HANGUP:
                    record.hangup = True
                if record.quiet:  # past its low-water mark: data, or heartbeats a look missed
                    self._schedule_look(record, trio.current_time())
                if self._deliver(record):
                    self.handled += 1
            if len(events) < MAX_EVENTS:
                return

    def _deliver(self, record: _Fd) -> bool:
        """``record`` is ready (or looked at): its owner's read-ahead if a task waits, else wake it.

        Returns:
            True when the owner handled the input and the waiting task stays parked.
        """
        task = record.waiter
        if task is None:
            record.ready = True  # for the next wait_readable
            return False
        owner = record.owner
        if owner is not None and not record.hangup and owner.read_ahead():
            return True
        if record.waiter is task:  # (not unregistered by its owner meanwhile)
            record.waiter = None
            self._waiting -= 1
            trio.lowlevel.reschedule(task)
        return False

    # -- looks at quiet sockets -------------------------------------------------------------
    def _schedule_look(self, record: _Fd, heartbeat_at: float) -> None:
        """Look at quiet ``record`` once its next heartbeat (one period after ``heartbeat_at``) is in."""
        at = heartbeat_at + self.heartbeat_s + self.quiet_tick_s / 2
        record.look_at = at
        slot = self._file(record, at)
        scope = self._look_scope
        if scope is not None:
            due = self._slot_time(slot)
            if due < scope.deadline:
                scope.deadline = due

    def _slot_of(self, at: float) -> float:
        """The grid slot a look due at ``at`` is filed in (its index; ``at`` itself without a grid)."""
        tick = self.quiet_tick_s
        return float(math.ceil(at / tick)) if tick else at

    def _slot_time(self, slot: float) -> float:
        """When the looks filed in ``slot`` are due: its grid point."""
        tick = self.quiet_tick_s
        return slot * tick if tick else slot

    def _file(self, record: _Fd, at: float) -> float:
        slot = self._slot_of(at)
        records = self._slots.get(slot)
        if records is None:
            self._slots[slot] = [record]
            heapq.heappush(self._slot_heap, slot)
        else:
            records.append(record)
        return slot

    async def _look_loop(self) -> None:
        """Sleep until the next grid point with a look due; then look at every quiet fd due."""
        slot_heap = self._slot_heap
        slots = self._slots
        while True:
            with trio.CancelScope(deadline=self._slot_time(slot_heap[0]) if slot_heap else math.inf) as scope:
                self._look_scope = scope
                await trio.sleep_forever()
            self._look_scope = None
            now = trio.current_time()
            self.wakeups += 1
            period = self.heartbeat_s
            count = 0
            while slot_heap and self._slot_time(slot_heap[0]) <= now:
                slot = heapq.heappop(slot_heap)
                for record in slots.pop(slot):
                    at = record.look_at
                    if self._slot_of(at) != slot:
                        continue  # stale: moved, made active again, or unregistered
                    # phase-locked to the peer's heartbeats (not to this look, which came late);
                    # a slot later than this pass, so the sleep's next deadline comes from the heap
                    at += period
                    record.look_at = at
                    self._file(record, at)
                    count += 1
                    self._deliver(record)  # (not counted in handled: that is readiness events only)
            self.looks += count

    def register(self, fd: int, callback: ReadAhead | Callable[[], bool] | None = None) -> bool:
        """Watch ``fd`` for readability (once per socket; pending data counts as ready).

        ``callback``, if given (a :class:`ReadAhead`, or a function returning what its
        ``read_ahead`` would), runs in the poller's task when ``fd`` is ready *and* a task waits on
        it: it may do the waiting task's work synchronously and return True to leave that task
        parked, or False to wake it. It must not raise and must not block.

        Returns:
            False if the poller is not running (the caller keeps using trio's own waits).
        """
        active = self._active
        if active is None:
            return False
        owner = callback if callback is None or isinstance(callback, ReadAhead) else _Call(callback)
        record = self._fds.get(fd)
        if record is None:
            self._fds[fd] = _Fd(owner)
        else:
            # a closed socket's number reused before it was unregistered: start it over (a task
            # waiting on the number keeps waiting)
            if record.quiet:
                record.quiet = False
                self._quiet_count -= 1
            record.look_at = _NO_LOOK
            record.ready = record.hangup = False
            record.owner = owner
        try:
            active.register(fd, _MASK)
        except FileExistsError:
            active.modify(fd, _MASK)  # (the reused number, still in the epoll set)
        return True

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; a task waiting on it gets :class:`trio.ClosedResourceError`.

        Call it while ``fd`` is still open (before closing the socket). Idempotent.
        """
        if self._active is not None:
            try:
                self._active.unregister(fd)
            except (OSError, ValueError):
                pass  # already gone (closed elsewhere) or the epoll is closing
        record = self._fds.pop(fd, None)
        if record is None:
            return
        record.look_at = _NO_LOOK  # (its filed looks are stale now)
        if record.quiet:
            record.quiet = False
            self._quiet_count -= 1
        task = record.waiter
        if task is not None:
            record.waiter = None
            self._waiting -= 1
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))

    def set_quiet(self, fd: int, quiet: bool, *, heard_s_ago: float = 0.0) -> None:
        """Mark a registered ``fd`` quiet (looked at once per heartbeat period) or active again.

        Call it right after a heartbeat was read from ``fd``: its looks are phase-locked to when
        that heartbeat *arrived*, ``heard_s_ago`` seconds ago (the kernel knows: ``TCP_INFO``;
        a relay that ran late would otherwise make every later look late too). Readiness is
        dispatched at once either way; marking quiet is what lets the owner raise
        ``SO_RCVLOWAT`` to :data:`QUIET_RCVLOWAT` (and lower it again before marking the socket
        active) without losing heartbeats. A no-op for an fd that is not registered, or
        already as asked, or when the poller is not running.
        """
        record = self._fds.get(fd)
        if record is None or quiet == record.quiet or self._active is None:
            return
        record.quiet = quiet
        if quiet:
            self._quiet_count += 1
            self._schedule_look(record, trio.current_time() - min(max(heard_s_ago, 0.0), self.heartbeat_s))
        else:
            self._quiet_count -= 1
            record.look_at = _NO_LOOK
        self.moves += 1

    async def wait_readable(self, fd: int) -> None:
        """Wait until ``fd`` may have data (like ``trio.lowlevel.wait_readable``; wake-ups may be spurious).

        Raises:
            trio.BusyResourceError: another task is already waiting on ``fd``.
            trio.ClosedResourceError: ``fd`` was unregistered while waiting.
            RuntimeError: ``fd`` is not registered.

        Cancellation:
            A checkpoint; cancelling leaves the registration in place.
        """
        record = self._fds.get(fd)
        if record is None:
            raise RuntimeError(f"fd {fd} is not registered with this poller")
        if record.ready or record.hangup:
            # cancellation first, so a cancelled wait does not use up the remembered readiness
            await trio.lowlevel.checkpoint_if_cancelled()
            record.ready = False
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if record.waiter is not None:
            raise trio.BusyResourceError("another task is already waiting for this socket")
        task = trio.lowlevel.current_task()
        record.waiter = task
        self._waiting += 1

        def abort(_: object) -> trio.lowlevel.Abort:
            if record.waiter is task:
                record.waiter = None
                self._waiting -= 1
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
