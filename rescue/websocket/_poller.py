"""Shared read readiness for many sockets: edge-triggered epoll sets, read-ahead, a quiet set.

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
reader task only when the callback cannot finish the job. Sockets whose owner marked them quiet
(:meth:`ReadPoller.set_quiet`: only heartbeats lately) live in a second set that is looked at
as soon as one of them is ready and then not again for ``quiet_tick_s``: thousands of
heartbeat-only connections cost a few wake-ups a second instead of one per heartbeat, and the
first message after a quiet spell waits at most ``quiet_tick_s``.

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

import select
from collections.abc import Callable
from typing import Final

import outcome
import trio

__all__ = ["AVAILABLE", "POLLER_AVAILABLE", "ReadPoller"]

AVAILABLE: Final = hasattr(select, "epoll")
# The same, under the name rescue.websocket exports it by (AVAILABLE alone says too little).
POLLER_AVAILABLE: Final = AVAILABLE
# Events taken per epoll_wait: bounds one dispatch pass; more ready sockets take another pass.
MAX_EVENTS: Final = 4096
if AVAILABLE:
    _MASK: Final = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET
    # The peer shut down or the socket failed: the end is readable for good.
    _HANGUP: Final = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR


class ReadPoller:
    """Read readiness for registered file descriptors, dispatched in batches by :meth:`run`.

    Sockets live in one of two epoll sets. The *active* set is watched all the time (a wake-up
    as soon as anything is ready). The *quiet* set holds sockets their owner marked quiet
    (:meth:`set_quiet`: only heartbeats lately): it is looked at as soon as one of them is
    ready, then not again for ``quiet_tick_s``, so thousands of heartbeat-only connections cost
    a few wake-ups a second instead of one per heartbeat.

    Args:
        coalesce_s: after handling a batch of ready *active* sockets, how long to let readiness
            accumulate before looking again (0: look again as soon as the batch's tasks ran).
        quiet_tick_s: the same for the quiet set: the most a message on a quiet socket waits.

    Usage::

        poller = ReadPoller(quiet_tick_s=0.1)
        await nursery.start(poller.run)       # outlives every connection that uses it
        poller.register(fd)                   # once per socket (active)
        await poller.wait_readable(fd)        # instead of trio.lowlevel.wait_readable(sock)
        poller.set_quiet(fd, True)            # the owner saw only heartbeats for a while
        poller.unregister(fd)                 # before closing the socket (wakes a waiter)
    """

    def __init__(self, *, coalesce_s: float = 0.0, quiet_tick_s: float = 0.1) -> None:
        if not (0 <= coalesce_s <= 3600 and 0 <= quiet_tick_s <= 3600):  # (NaN fails too)
            raise ValueError("coalesce_s and quiet_tick_s must be between 0 and 3600")
        self.coalesce_s = coalesce_s
        self.quiet_tick_s = quiet_tick_s
        self._active: select.epoll | None = None
        self._quiet_set: select.epoll | None = None
        self._registered: set[int] = set()
        self._quiet: set[int] = set()  # registered fds that live in the quiet set
        self._ready: set[int] = set()  # readiness seen while nobody waited on the fd
        # hung up (EOF or error seen): always ready, so a short read that left the EOF behind
        # (data and FIN in one edge) cannot leave its reader waiting for an edge that never comes
        self._hangup: set[int] = set()
        self._waiters: dict[int, trio.lowlevel.Task] = {}
        self._callbacks: dict[int, Callable[[], bool]] = {}
        self.wakeups = 0  # dispatch passes (both sets)
        self.events = 0  # readiness events dispatched
        self.handled = 0  # events a callback handled without waking the waiting task
        self.moves = 0  # sockets moved between the active and the quiet set

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is active (registration and waits go through the poller)."""
        return self._active is not None

    def statistics(self) -> dict[str, int | float]:
        """Counters for ``/debug/stats``: sockets (all, quiet), waiters, wake-ups, events, moves."""
        return {
            "registered": len(self._registered),
            "quiet": len(self._quiet),
            "waiting": len(self._waiters),
            "wakeups": self.wakeups,
            "events": self.events,
            "handled": self.handled,
            "moves": self.moves,
            "coalesce_s": self.coalesce_s,
            "quiet_tick_s": self.quiet_tick_s,
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
        quiet = self._quiet_set = select.epoll()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch, quiet, self.quiet_tick_s)
                task_status.started()
                await self._watch(active, self.coalesce_s)
        finally:
            self._active = self._quiet_set = None
            waiters = list(self._waiters.values())
            self._waiters.clear()
            self._callbacks.clear()
            self._registered.clear()
            self._quiet.clear()
            self._ready.clear()
            self._hangup.clear()
            for task in waiters:
                trio.lowlevel.reschedule(task)  # a spurious wake: the reader re-checks and uses trio
            for epoll in (active, quiet):
                trio.lowlevel.notify_closing(epoll.fileno())
                epoll.close()

    async def _watch(self, epoll: select.epoll, pause_s: float) -> None:
        fd = epoll.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self._dispatch(epoll)
            if pause_s:
                await trio.sleep(pause_s)

    def _dispatch(self, epoll: select.epoll) -> None:
        waiters = self._waiters
        callbacks = self._callbacks
        reschedule = trio.lowlevel.reschedule
        self.wakeups += 1
        while True:
            events = epoll.poll(0, MAX_EVENTS)
            self.events += len(events)
            for fd, mask in events:
                if mask & _HANGUP and fd in self._registered:
                    self._hangup.add(fd)
                task = waiters.get(fd)
                if task is None:
                    if fd in self._registered:
                        self._ready.add(fd)
                    continue
                callback = callbacks.get(fd)
                if callback is not None and fd not in self._hangup and callback():
                    self.handled += 1
                    continue  # handled without waking the task
                del waiters[fd]
                reschedule(task)
            if len(events) < MAX_EVENTS:
                return

    def register(self, fd: int, callback: Callable[[], bool] | None = None) -> bool:
        """Watch ``fd`` for readability (once per socket; pending data counts as ready).

        ``callback``, if given, runs in the poller's task when ``fd`` is ready *and* a task waits
        on it: it may do the waiting task's work synchronously and return True to leave that task
        parked, or False to wake it. It must not raise and must not block.

        Returns:
            False if the poller is not running (the caller keeps using trio's own waits).
        """
        active = self._active
        if active is None:
            return False
        if fd in self._quiet:  # a reused number still filed as quiet: start over
            self._forget(fd)
        self._ready.discard(fd)
        self._hangup.discard(fd)
        try:
            active.register(fd, _MASK)
        except FileExistsError:
            # a closed socket's number reused before it was unregistered: take it over
            active.modify(fd, _MASK)
        self._registered.add(fd)
        if callback is not None:
            self._callbacks[fd] = callback
        else:
            self._callbacks.pop(fd, None)
        return True

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; a task waiting on it gets :class:`trio.ClosedResourceError`.

        Call it while ``fd`` is still open (before closing the socket). Idempotent.
        """
        self._forget(fd)
        self._registered.discard(fd)
        self._ready.discard(fd)
        self._hangup.discard(fd)
        self._callbacks.pop(fd, None)
        task = self._waiters.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task, outcome.Error(trio.ClosedResourceError()))

    def _forget(self, fd: int) -> None:
        epoll = self._quiet_set if fd in self._quiet else self._active
        self._quiet.discard(fd)
        if epoll is not None:
            try:
                epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # already gone (closed elsewhere) or the epoll is closing

    def set_quiet(self, fd: int, quiet: bool) -> None:
        """Move a registered ``fd`` to the quiet set (polled every ``quiet_tick_s``) or back.

        Nothing is lost in the move: data already waiting counts as ready in the new set.
        A no-op for an fd that is not registered or already where asked.
        """
        if fd not in self._registered or quiet == (fd in self._quiet):
            return
        source, target = (self._active, self._quiet_set) if quiet else (self._quiet_set, self._active)
        if source is None or target is None:
            return
        try:
            source.unregister(fd)
        except (OSError, ValueError):
            pass
        target.register(fd, _MASK)
        if quiet:
            self._quiet.add(fd)
        else:
            self._quiet.discard(fd)
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
        if fd in self._ready or fd in self._hangup:
            # cancellation first, so a cancelled wait does not use up the remembered readiness
            await trio.lowlevel.checkpoint_if_cancelled()
            self._ready.discard(fd)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        if fd not in self._registered:
            raise RuntimeError(f"fd {fd} is not registered with this poller")
        if fd in self._waiters:
            raise trio.BusyResourceError("another task is already waiting for this socket")
        task = trio.lowlevel.current_task()
        self._waiters[fd] = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._waiters.get(fd) is task:
                del self._waiters[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)
