"""The trio shell of one peer connection: a reader pump, a writer pump, and nothing that decides.

Every decision is :class:`~rescue.sessions._core.SessionCore`'s; a :class:`PeerLink` only moves
bytes between its socket and the core, and carries out what the session hands it. A frame's path
(decision 0004, 0006, 0007)::

    peer A socket ─► A's input: the poller's read-ahead (fast) or A's reader task (slow)
        ─► core.receive(A, batch, now) ─► the batch is in B's queue (flag WRITE_PARTNER)
        ─► B.pump(): B's writer idle? one send_nowait now : wake B's writer task
        ─► core.sent(B, now) ─► peer B socket

- **Fast and slow path call the same** ``core.receive``. The poller's read-ahead (decision 0007)
  offers each batch it reads while the reader task waits (:meth:`PeerLink.offer`); when the core
  answers ``HOLD`` (the partner's queue is full, or a rate wait) the batch goes to the reader task
  untouched, which waits for ``RESUME`` and hands the same batch in again. Everything else is done
  right there, synchronously, in the poller's task.
- **One sender per socket, by construction.** Only :meth:`pump` (when the writer task is not
  writing and has nothing in hand) and the writer task write; a partial ``send_nowait`` leaves its
  tail with the transport and its batch in the writer's hands, so the writer flushes it next. The
  CLOSE message and the close frame go out after the writer has returned.
- **Closing** (the core's ``CLOSE`` action, :meth:`begin_close`): the reader stops at once, the
  writer finishes (or flushes, for a forwarded peer CLOSE) under the close deadline, then the
  CLOSE message and the WebSocket close go out under the same deadline; anything left when it
  passes is aborted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from rescue._clock import RunClock
from rescue._log import get_logger
from rescue.errors import ProtocolError
from rescue.sessions._core import ECHO_NOW, HOLD, WRITE_NOW, Link, SessionCore
from rescue.sessions._transport import TRANSPORT_ERRORS, Transport

if TYPE_CHECKING:
    from rescue.sessions._session import Session

__all__ = ["PeerLink"]

_LOG = get_logger("rescue.sessions")


class PeerLink:
    """One peer connection of a session: its transport and its two pumps (run in the session's nursery).

    Made by :meth:`Session.attach`, which starts :meth:`run` in the session's nursery. That task
    is the reader; a writer exists only while there is output that one ``send_nowait`` could not
    take (a full socket, the tail of a partial write): it is started in the session's nursery then
    and ends when the output is written. An idle connection is one parked task (~2-3 KB less per
    connection than a standing writer and a nursery of its own: ``docs/perf/memory.md``).
    Everything it owns (its tasks, its socket) ends with :meth:`run`.

    Args:
        transport: the connection (a WebSocket after the upgrade).
        session: the session shell it belongs to (it applies the core's answers).
        initial: messages that arrived in the same read as HELLO, handled before reading more.

    Attributes:
        link: the core's view of this connection (set by :meth:`Session.attach`).
    """

    __slots__ = (
        "_clean",
        "_clock",
        "_core",
        "_dead",
        "_done",
        "_finished",
        "_in_hand",
        "_initial",
        "_reader_scope",
        "_resume",
        "_writer",
        "_writer_scope",
        "link",
        "session",
        "transport",
    )

    def __init__(self, transport: Transport, *, session: Session, initial: list[bytes] | None = None) -> None:
        self.transport = transport
        self.session = session
        # the session's core and clock, held here: reached through the (interpreted) session on
        # every message they were two attribute lookups and an interpreted clock call (0022)
        self._core: SessionCore[PeerLink] = session.core
        self._clock: RunClock = session.run_clock
        self.link: Link[PeerLink]
        self._initial = initial
        # Made when first needed: most connections never hold input or wait to be written.
        self._resume: trio.lowlevel.ParkingLot | None = None  # the reader waits here while its input is held
        self._reader_scope = trio.CancelScope()
        # Set while a task runs the write loop (the writer task, or run() flushing at the close):
        # set when that loop ends. None: nobody is writing, output goes out with send_nowait.
        self._writer: trio.Event | None = None
        self._writer_scope: trio.CancelScope | None = None  # the writer task's (close deadline)
        self._in_hand: list[bytes] | None = None  # a taken batch the writer must write next
        self._dead = False
        self._clean = False
        self._finished = False
        self._done: trio.Event | None = None  # made by wait_done()

    def statistics(self) -> dict[str, int | bool]:
        """A snapshot of the outbound queue (for ``/debug/stats``)."""
        return self.link.statistics()

    @property
    def writing(self) -> bool:
        """Whether a writer is running (output that ``send_nowait`` could not take is being written)."""
        return self._writer is not None

    async def wait_done(self) -> None:
        """Wait until the connection's task has finished and its socket is closed or aborted."""
        if self._finished:
            return
        if self._done is None:
            self._done = trio.Event()
        await self._done.wait()

    # ------------------------------------------------------------------------------------------
    # what the session asks for (sync; from any task)

    def pump(self, now: float) -> None:
        """The core queued output for this link: write it now unless a writer runs (it takes it next)."""
        if self._writer is not None:
            return  # the running writer takes it after its current write
        messages = self._core.take_output(self.link)
        if messages is not None:
            self.write_now(messages, now)

    def write_now(self, messages: list[bytes], now: float) -> None:
        """Write a batch the core gave this link (taken) with one ``send_nowait``, else hand it to a writer.

        Only called while no writer is in a write (the core gives a link one batch at a time,
        until :meth:`SessionCore.sent`), so the socket has one sender.
        """
        transport = self.transport
        if not self.link.closing and transport.send_nowait(messages):
            if not transport.has_unsent:
                flags = self._core.sent(self.link, now)
                if flags:
                    self.session.apply(self, flags, messages, now)
                return
            messages = []  # the transport keeps the tail: the writer's next send writes it first
        self._in_hand = messages
        self._start_writer()

    def _start_writer(self) -> None:
        """Start the writer task in the session's nursery, unless a writer runs already."""
        if self._writer is not None:
            return  # it takes what is in hand next
        done = trio.Event()
        if self.session.start_task(self._writer_task, done):
            self._writer = done
        # else the session has not started yet: run() starts the writer when it begins

    def resume(self) -> None:
        """The core let this link's held input go: the reader hands its batch in again."""
        if self._resume:
            self._resume.unpark_all()

    def begin_close(self) -> None:
        """The core decided to close this link: stop reading, bound the writer by the close deadline."""
        self._reader_scope.cancel()
        if self._writer_scope is not None:
            self._writer_scope.deadline = self.link.close_deadline

    # ------------------------------------------------------------------------------------------
    # input: the fast path (the poller's read-ahead) and the slow path (the reader task)

    def offer(self, batch: list[bytes]) -> bool:
        """The read poller's read-ahead: handle ``batch`` now unless that means waiting.

        Returns:
            True when the batch is handled (the reader task stays parked); False (nothing done)
            when the core holds it back: the reader task gets it and waits.
        """
        link = self.link
        if link.closing:
            return False
        core = self._core
        now = self._clock.now()
        flags = core.receive(link, batch, now)
        if flags == WRITE_NOW:  # the usual cases, inline: the partner's writer is idle
            partner = core.slots[link.other]
            assert partner is not None
            partner.handle.write_now(batch, now)
            return True
        if flags == ECHO_NOW:  # a heartbeat, and this link's writer is idle
            self.write_now(batch, now)
            return True
        self.session.apply(self, flags, batch, now)
        return not flags & HOLD

    async def _handle(self, batch: list[bytes]) -> None:
        session = self.session
        link = self.link
        while True:
            now = trio.current_time()
            flags = session.core.receive(link, batch, now)
            session.apply(self, flags, batch, now)
            if not flags & HOLD:
                return
            if self._resume is None:
                self._resume = trio.lowlevel.ParkingLot()
            await self._resume.park()  # until RESUME (room, the rate wait is over) or the close
            if link.closing:
                return

    async def _reader(self) -> None:
        transport = self.transport
        link = self.link
        batch = self._initial
        self._initial = None
        with self._reader_scope:
            try:
                while True:
                    if batch:
                        await self._handle(batch)
                    if link.closing:
                        return
                    batch = await transport.receive_messages()
            except ProtocolError as exc:
                self.session.stats.count_protocol_error(exc.kind)
                self.session.close(self, exc.code, str(exc))
            except TRANSPORT_ERRORS:
                self.session.lost(self)

    # ------------------------------------------------------------------------------------------
    # output

    async def _write_out(self) -> None:
        """Write what is in hand and what the core gives, until there is nothing (or the link closes)."""
        transport = self.transport
        session = self.session
        core = session.core
        link = self.link
        while True:
            if link.closing and not link.flush:
                return
            messages = self._in_hand
            if messages is None:
                messages = core.take_output(link)
                if messages is None:
                    return
            self._in_hand = None
            await transport.send_messages(messages)  # an unsent tail goes out first
            now = trio.current_time()
            session.apply(self, core.sent(link, now), messages, now)

    async def _writer_task(self, done: trio.Event) -> None:
        """The writer, in the session's nursery: while output is left that ``send_nowait`` could not take."""
        scope = self._writer_scope = trio.CancelScope(deadline=self.link.close_deadline)
        try:
            with scope:
                await self._write_out()
        except ProtocolError:
            pass  # the reader hit a framing error and is closing the connection with its code
        except TRANSPORT_ERRORS:
            self.session.lost(self)
        except Exception:
            # A bug in one connection must not take the node down: log it and drop the socket.
            self._internal_error()
            self.session.lost(self)
        finally:
            if scope.cancelled_caught:
                self._dead = True  # the close deadline passed mid-write: the stream's state is unknown
            self._writer_scope = None
            self._writer = None
            done.set()

    async def _flush(self) -> None:
        """After the reader: write what a flushing close still owes (run's own task, close deadline)."""
        link = self.link
        if self._dead or (link.closing and not link.flush):
            return
        done = self._writer = trio.Event()  # nobody starts a writer task meanwhile
        try:
            with trio.move_on_at(link.close_deadline) as scope:
                await self._write_out()
            if scope.cancelled_caught:
                self._dead = True
        except ProtocolError:
            pass
        except TRANSPORT_ERRORS:
            self.session.lost(self)
        finally:
            self._writer = None
            done.set()

    def _internal_error(self) -> None:
        self.session.core.stats.internal_errors += 1
        _LOG.error("relay.connection_error", exc_info=True, extra={"event": "relay.connection_error"})

    # ------------------------------------------------------------------------------------------
    # the connection task

    async def run(self) -> None:
        """Read until the link closes, then flush, close the socket; started by the session in its nursery.

        Resource handling:
            The transport is closed (bounded by the close deadline) or aborted before this
            returns, whatever happens; a writer task it started has ended.

        Cancellation:
            Cancelling (the session or the node tearing down) skips the closing handshake and aborts
            the socket.
        """
        try:
            if self._in_hand is not None:
                self._start_writer()  # output from before this task ran
            await self._reader()
            writer = self._writer
            if writer is not None:
                await writer.wait()  # bounded by the close deadline (begin_close)
            await self._flush()
            await self._finish_close()
        except Exception:
            # A bug in one connection must not take the node down: log it and drop the socket.
            self._internal_error()
        finally:
            self.session.lost(self)
            if not self._clean:
                self.transport.abort()
            self._finished = True
            if self._done is not None:
                self._done.set()

    async def _finish_close(self) -> None:
        link = self.link
        if self._dead or link.close_code is None:
            return
        with trio.move_on_at(link.close_deadline):
            if link.close_body is not None:
                try:
                    await self.transport.send_messages([link.close_body])
                except ProtocolError:
                    pass  # after a framing error the WebSocket takes no more messages; the code still goes
                except TRANSPORT_ERRORS:
                    return
            try:
                await self.transport.close(link.ws_code, link.close_reason)
            except TRANSPORT_ERRORS:
                return
            self._clean = True
