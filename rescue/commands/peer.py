"""``rescue share`` and ``rescue join`` (SPEC §11): a real peer on each side of a session.

- ``share [--api URL] [--session ID] [--no-pty] [--cohort C] -- COMMAND...`` (the host) waits for
  the guest, then runs COMMAND. On a terminal (and without ``--no-pty``) COMMAND gets a
  pseudo-terminal: its output goes to the guest (channel 0) and to the local terminal, keystrokes
  from both sides go to it, the window size follows the local terminal and is sent to the guest as
  CONTROL ``{"winsize": [rows, cols]}`` at start and on every SIGWINCH. Otherwise the streams
  are raw bytes, byte-exact: the guest's stdin
  (channel 1) feeds COMMAND's stdin (closed when the guest sends ``{"eof": true}``), COMMAND's stdout
  goes to the guest's stdout (channel 0) and its stderr to the guest's stderr (channel 2). When
  COMMAND exits, ``{"exit": status}`` is sent after the last byte; ``share`` waits for the guest to
  acknowledge everything, ends the session and exits with the same status.
- ``join SESSION [--api URL]`` (the guest) writes the stream, and only the stream, to stdout;
  every message of its own goes to stderr. On a terminal it switches stdin to raw mode (restored
  on every exit path: normal end, errors, SIGINT/SIGTERM/SIGHUP) and reports its window size. It
  exits with the shared command's exit status.

Both print on stderr when they (re)connect, when the partner comes and goes, and when and why they
reconnect. The passphrase comes from ``RESCUE_PASSPHRASE`` or a prompt on the terminal; ``share``
generates one (and prints it on stderr) when neither gives one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import getpass
import os
import secrets
import signal
import stat
import struct
import subprocess
import sys
import termios
import tty
from collections.abc import Awaitable, Callable, Iterator
from typing import Final

import trio

from rescue._tracing import traced_process
from rescue.cli import add_option
from rescue.client import (
    DEFAULT_COHORT,
    Connected,
    ConnectionEvent,
    ControlReceived,
    DataReceived,
    PartnerEvent,
    Peer,
    Reconnecting,
    SessionClosed,
    open_peer,
)
from rescue.errors import ConfigError, ConnectionClosedError, GuardrailError, RescueError
from rescue.protocol import MAX_SESSION_LEN
from rescue.tokenservice import join_url

__all__ = ["register"]

DEFAULT_API: Final = "http://127.0.0.1:8080"  # `rescue dev`'s token service
PASSPHRASE_ENV: Final = "RESCUE_PASSPHRASE"
SERVICE_KEY_ENV: Final = "RESCUE_SERVICE_KEY"
# Bytes read from a pty, pipe or stdin per wake-up: one DATA frame's worth.
READ_SIZE: Final = 65536 - 28
# After COMMAND exits, how long its output may still be drained (a background child holding the
# pty open must not keep `share` alive forever).
OUTPUT_DRAIN_S: Final = 5.0
# How long `share` waits for the guest to acknowledge the last bytes and the exit status, and
# `join` for its own input to be acknowledged, before ending the session anyway.
FINAL_DRAIN_S: Final = 30.0
# Stop after this long without being able to (re)connect: the partner's side has given up by then
# (resume_grace_s is 30 s; pair_timeout_s 120 s).
GIVE_UP_AFTER_S: Final = 120.0
DEFAULT_WINSIZE: Final = (24, 80)
# Exit status of a peer stopped by a signal: the shell convention.
SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``share`` and ``join`` sub-commands."""
    share = subparsers.add_parser(
        "share",
        help="share a command's terminal (or stdin/stdout) through the relay",
        description="Run COMMAND and share its terminal with the guest who joins the session, end to "
        "end encrypted. Prints the session id (and a generated passphrase) on stderr.",
    )
    add_option(share, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")
    add_option(share, "--session", default=None, metavar="ID", help="session id (default: a random one)")
    add_option(share, "--no-pty", action="store_true", help="raw byte streams instead of a terminal")
    add_option(share, "--cohort", default=DEFAULT_COHORT, help="cohort id for the token request")
    share.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    share.set_defaults(func=_share_main)

    join = subparsers.add_parser(
        "join",
        help="join a shared session: its stream on stdout, your keystrokes to it",
        description="Join SESSION as the guest. Writes only the shared stream to stdout (messages go "
        "to stderr) and exits with the shared command's exit status.",
    )
    join.add_argument("session", metavar="SESSION", help="the session id printed by rescue share")
    add_option(join, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")
    add_option(join, "--cohort", default=DEFAULT_COHORT, help="cohort id for the token request")
    join.set_defaults(func=_join_main)


# ------------------------------------------------------------------------------------ terminal bits


class Console:
    """Messages of our own on stderr; line endings that still work while the terminal is raw."""

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.raw = False

    def say(self, text: str) -> None:
        end = "\r\n" if self.raw else "\n"
        sys.stderr.write(f"rescue {self.prog}: {text}{end}")
        sys.stderr.flush()

    def on_event(self, peer_word: str) -> Callable[[ConnectionEvent], None]:
        """A callback for :func:`open_peer` that reports connection events."""
        connections = 0

        def report(event: ConnectionEvent) -> None:
            nonlocal connections
            if isinstance(event, Connected):
                connections += 1
                if connections == 1:
                    waiting = "" if event.partner_present else f", waiting for the {peer_word}"
                    self.say(f"connected to the relay{waiting}")
                else:
                    self.say("reconnected")
            elif isinstance(event, PartnerEvent):
                self.say(f"{peer_word} {event.event}")
            elif isinstance(event, Reconnecting):
                code = f" ({event.code})" if event.code is not None else ""
                token = ", with a fresh token" if event.fresh_token else ""
                self.say(f"connection lost: {event.reason}{code}; reconnecting in {event.delay:.1f} s{token}")
            elif isinstance(event, SessionClosed) and event.code not in (None, 1000) and not event.local:
                self.say(f"session closed: {event.reason} ({event.code})")

        return report


@contextlib.contextmanager
def raw_terminal(fd: int, console: Console) -> Iterator[None]:
    """Put the terminal on ``fd`` in raw mode; restore it however the block ends."""
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        console.raw = True
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        console.raw = False


def get_winsize(fd: int) -> tuple[int, int] | None:
    """(rows, cols) of the terminal on ``fd``, or ``None``."""
    try:
        rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(8)))
    except OSError:
        return None
    return (rows, cols) if rows and cols else None


def set_winsize(fd: int, rows: int, cols: int) -> None:
    """Set the window size of the pty on ``fd`` (its process group gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class FdIO:
    """Reads and writes on one fd without blocking trio.

    Pipes, sockets and terminals go through :class:`trio.lowlevel.FdStream` (non-blocking, restored
    when closed); regular files and other fds epoll cannot watch (``/dev/null``) go through a worker
    thread.
    """

    def __init__(self, fd: int) -> None:
        mode = os.fstat(fd).st_mode
        pollable = stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))
        self._fd = os.dup(fd)
        self._stream = trio.lowlevel.FdStream(self._fd) if pollable else None

    def fileno(self) -> int:
        """Our duplicate of the fd."""
        return self._fd

    async def read(self, size: int = READ_SIZE) -> bytes:
        """Up to ``size`` bytes; ``b""`` at end of file (or EIO on a pty whose child is gone)."""
        try:
            if self._stream is not None:
                return await self._stream.receive_some(size)
            return await trio.to_thread.run_sync(os.read, self._fd, size, abandon_on_cancel=True)
        except OSError as exc:
            if exc.errno == errno.EIO:
                return b""
            raise
        except trio.BrokenResourceError:
            return b""

    async def write(self, data: bytes) -> None:
        """All of ``data``."""
        if self._stream is not None:
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        while view:
            written = await trio.to_thread.run_sync(os.write, self._fd, view)
            view = view[written:]

    async def aclose(self) -> None:
        """Close our duplicate of the fd."""
        if self._stream is not None:
            await self._stream.aclose()
        else:
            os.close(self._fd)


class _SessionGuard:
    """Runs the tasks that talk to the peer; the first one that finds the session gone stops all.

    Without it a ``ConnectionClosedError`` from one task would leave the nursery as an
    ExceptionGroup; with it the caller gets one plain error after the nursery.
    """

    def __init__(self) -> None:
        self.lost: BaseException | None = None
        self.scope: trio.CancelScope | None = None

    def wrap(self, fn: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        async def guarded() -> None:
            try:
                await fn()
            except (RescueError, trio.EndOfChannel) as exc:
                if self.lost is None:
                    self.lost = exc
                if self.scope is not None:
                    self.scope.cancel()

        return guarded

    def check(self) -> None:
        """Raise :class:`ConnectionClosedError` if a task found the session gone."""
        if self.lost is not None:
            raise ConnectionClosedError(None, f"session ended while the command ran: {self.lost}")


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _read_passphrase(prompt: str) -> str | None:
    value = os.environ.get(PASSPHRASE_ENV)
    if value:
        return value
    if sys.stdin.isatty():
        try:
            return getpass.getpass(prompt) or None
        except (EOFError, OSError):
            return None
    return None


# ----------------------------------------------------------------------------------------- share


def _share_main(args: argparse.Namespace) -> int:
    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("nothing to share: give a command after --, e.g. rescue share -- bash")
    session = args.session or secrets.token_urlsafe(9)
    if len(session) > MAX_SESSION_LEN:
        raise ConfigError(f"session id longer than {MAX_SESSION_LEN} characters")
    console = Console("share")
    passphrase = _read_passphrase("Passphrase for the session (empty: generate one): ")
    if passphrase is None:
        passphrase = secrets.token_urlsafe(15)
        console.say(f"passphrase: {passphrase}")
    console.say(f"session: {session}")
    console.say(f"the guest joins with: RESCUE_PASSPHRASE=... rescue join {session} --api {args.api}")
    console.say(f"or in a browser: {join_url(args.api, session)}")
    use_pty = not args.no_pty and sys.stdin.isatty()
    with traced_process("beach-rescue-client"):
        return trio.run(_share, args, command, session, passphrase, use_pty, console)


async def _share(
    args: argparse.Namespace,
    command: list[str],
    session: str,
    passphrase: str,
    use_pty: bool,
    console: Console,
) -> int:
    return await _until_signal(
        functools.partial(_share_session, args, command, session, passphrase, use_pty, console),
        on_signal=lambda signum: console.say(f"stopped by signal {signum}"),
    )


async def _until_signal(
    session: Callable[[], Awaitable[int]], *, on_signal: Callable[[int], None] | None = None
) -> int:
    """Run ``session`` for its exit status; SIGINT/SIGTERM/SIGHUP cancel it and make it 128 + signal."""
    status = 1
    with trio.open_signal_receiver(*SIGNALS) as signals:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal status
                async for signum in signals:
                    if on_signal is not None:
                        on_signal(signum)
                    status = 128 + signum
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            status = await session()
            nursery.cancel_scope.cancel()
    return status


async def _share_session(
    args: argparse.Namespace,
    command: list[str],
    session: str,
    passphrase: str,
    use_pty: bool,
    console: Console,
) -> int:
    async with open_peer(
        args.api,
        session,
        "host",
        passphrase,
        cohort=args.cohort,
        service_key=os.environ.get(SERVICE_KEY_ENV),
        on_event=console.on_event("guest"),
        give_up_after=GIVE_UP_AFTER_S,
    ) as peer:
        await peer.wait_partner()
        if peer.closed is not None:
            return _report_closed(peer, console)
        try:
            if use_pty:
                with raw_terminal(sys.stdin.fileno(), console):
                    status = await _run_in_pty(peer, command, console)
            else:
                status = await _run_with_pipes(peer, command)
            await peer.send_control({"exit": status})
            with trio.move_on_after(FINAL_DRAIN_S):
                await peer.drain()
        except ConnectionClosedError:
            return _report_closed(peer, console)
        except RescueError as exc:
            console.say(f"error: {exc}")
            return 1
    console.say(f"command exited with status {status}")
    return status


def _report_closed(peer: Peer, console: Console) -> int:
    closed = peer.closed
    if closed is not None and isinstance(closed.error, GuardrailError):
        console.say(f"error: the relay fallback is refused ({closed.error.error}): {closed.error}")
    elif closed is not None and closed.error is not None:
        console.say(f"error: {closed.error}")
    elif closed is not None:
        console.say(f"session ended: {closed.reason or 'closed'} ({closed.code})")
    return 1


async def _wait_process(process: trio.Process) -> int:
    return _exit_status(await process.wait())


async def _run_with_pipes(peer: Peer, command: list[str]) -> int:
    """COMMAND with pipes: guest channel 1 → stdin, stdout → channel 0, stderr → channel 2."""
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stdin = process.stdin

    async def output(stream: trio.abc.ReceiveStream, channel: int) -> None:
        while data := await stream.receive_some(READ_SIZE):
            await peer.send(channel, bytes(data))

    async def feed() -> None:
        while True:
            message = await peer.receive()
            try:
                if isinstance(message, DataReceived) and message.channel == 1:
                    await stdin.send_all(message.data)
                elif isinstance(message, ControlReceived) and message.data.get("eof"):
                    await stdin.aclose()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command stopped reading: drop the guest's input, as a pipe would

    guard = _SessionGuard()
    status = 1
    try:
        async with trio.open_nursery() as nursery:
            guard.scope = nursery.cancel_scope
            nursery.start_soon(guard.wrap(feed))

            async with trio.open_nursery() as streams:
                streams.start_soon(guard.wrap(functools.partial(output, process.stdout, 0)))
                streams.start_soon(guard.wrap(functools.partial(output, process.stderr, 2)))
            if guard.lost is None:
                status = await _wait_process(process)
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            await stdin.aclose()
    guard.check()
    return status


def _controlling_tty() -> None:  # runs in the child between fork and exec
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def _run_in_pty(peer: Peer, command: list[str], console: Console) -> int:
    """COMMAND on a new pty mirrored to our terminal; keystrokes from both sides go to it."""
    local_in = sys.stdin.fileno()
    master, slave = os.openpty()
    rows, cols = get_winsize(local_in) or DEFAULT_WINSIZE
    set_winsize(slave, rows, cols)
    try:
        process = await trio.lowlevel.open_process(
            command,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=_controlling_tty,
        )
    finally:
        os.close(slave)
    pty = FdIO(master)
    os.close(master)
    keyboard = FdIO(local_in)
    screen = FdIO(sys.stdout.fileno())
    output_done = trio.Event()

    async def output() -> None:
        while data := await pty.read():
            await peer.send(0, data)
            await screen.write(data)
        output_done.set()

    async def guest_input() -> None:
        while True:
            message = await peer.receive()
            if isinstance(message, DataReceived) and message.channel == 1:
                await pty.write(message.data)

    async def local_input() -> None:
        while data := await keyboard.read():
            await pty.write(data)

    async def resizes() -> None:
        await peer.send_control({"winsize": [rows, cols]})
        with trio.open_signal_receiver(signal.SIGWINCH) as sigwinch:
            async for _ in sigwinch:
                size = get_winsize(local_in)
                if size is not None:
                    set_winsize(pty.fileno(), *size)
                    await peer.send_control({"winsize": list(size)})

    guard = _SessionGuard()
    status = 1
    try:
        async with trio.open_nursery() as nursery:
            guard.scope = nursery.cancel_scope
            for task in (output, guest_input, local_input, resizes):
                nursery.start_soon(guard.wrap(task))
            status = await _wait_process(process)
            with trio.move_on_after(OUTPUT_DRAIN_S):
                await output_done.wait()
            nursery.cancel_scope.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            for io in (pty, keyboard, screen):
                await io.aclose()
    guard.check()
    return status


# ------------------------------------------------------------------------------------------ join


def _join_main(args: argparse.Namespace) -> int:
    console = Console("join")
    passphrase = _read_passphrase("Passphrase: ")
    if passphrase is None:
        raise ConfigError(f"no passphrase: set {PASSPHRASE_ENV} or run on a terminal to be asked")
    with traced_process("beach-rescue-client"):
        return trio.run(_join, args, passphrase, console)


async def _join(args: argparse.Namespace, passphrase: str, console: Console) -> int:
    interactive = sys.stdin.isatty()

    async def session() -> int:
        # raw mode is entered inside the signal receiver and restored on every way out of here
        with raw_terminal(sys.stdin.fileno(), console) if interactive else contextlib.nullcontext():
            return await _join_session(args, passphrase, console, interactive)

    return await _until_signal(session)


async def _join_session(
    args: argparse.Namespace, passphrase: str, console: Console, interactive: bool
) -> int:
    stdin = FdIO(sys.stdin.fileno())
    stdout = FdIO(sys.stdout.fileno())
    stderr = FdIO(sys.stderr.fileno())
    try:
        async with (
            open_peer(
                args.api,
                args.session,
                "guest",
                passphrase,
                cohort=args.cohort,
                service_key=os.environ.get(SERVICE_KEY_ENV),
                on_event=console.on_event("host"),
                give_up_after=GIVE_UP_AFTER_S,
            ) as peer,
            trio.open_nursery() as nursery,
        ):

            async def forward_input() -> None:
                while data := await stdin.read():
                    await peer.send(1, data)
                await peer.send_control({"eof": True})

            async def report_size() -> None:
                size = get_winsize(sys.stdin.fileno())
                if size is not None:
                    await peer.send_control({"winsize": list(size)})
                with trio.open_signal_receiver(signal.SIGWINCH) as sigwinch:
                    async for _ in sigwinch:
                        size = get_winsize(sys.stdin.fileno())
                        if size is not None:
                            await peer.send_control({"winsize": list(size)})

            nursery.start_soon(forward_input)
            if interactive:
                nursery.start_soon(report_size)
            status = await _play(peer, stdout, stderr)
            nursery.cancel_scope.cancel()
        if status is None:
            # The session ended without an exit status: normal end (the host stopped sharing) is
            # 0, anything else is reported.
            closed = peer.closed
            if closed is None or (closed.code == 1000 and closed.error is None):
                return 0
            return _report_closed(peer, console)
        return status
    finally:
        with trio.CancelScope(shield=True):
            for io in (stdin, stdout, stderr):
                await io.aclose()


async def _play(peer: Peer, stdout: FdIO, stderr: FdIO) -> int | None:
    """Write the host's stream out until its exit status arrives (``None``: the session ended)."""
    while True:
        try:
            message = await peer.receive()
        except (trio.EndOfChannel, RescueError):
            return None
        if isinstance(message, DataReceived):
            if message.channel == 0:
                await stdout.write(message.data)
            elif message.channel == 2:
                await stderr.write(message.data)
        else:
            exit_status = message.data.get("exit")
            if isinstance(exit_status, int) and not isinstance(exit_status, bool):
                return exit_status & 0xFF
