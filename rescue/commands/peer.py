"""``rescue share`` and ``rescue join`` (SPEC §11): a real peer on each side of a session.

- ``share [--api URL] [--session ID] [--no-pty] [--cohort C] -- COMMAND...`` (the host) waits for
  the guest to prove the passphrase (its first frame that authenticates), then runs COMMAND; with
  a wrong passphrase the session ends with INTEGRITY_ERROR and COMMAND never starts. On a terminal
  (and without ``--no-pty``) COMMAND gets a pseudo-terminal: its output goes to the guest (channel
  0) and to the local terminal, keystrokes from both sides go to it. Its window size is the
  smallest of the host's terminal and the guest's (SPEC §12, :class:`SharedWindow`): the guest
  reports its size as CONTROL ``{"winsize": [rows, cols]}``, the host re-applies the size on its
  own SIGWINCH and on every guest report, says on its terminal which size is in force, and sends
  the size in force to the guest (who is told when the host's window is the smaller one).
  Otherwise the streams are raw bytes, byte-exact: the guest's stdin
  (channel 1) feeds COMMAND's stdin (closed when the guest sends ``{"eof": true}``), COMMAND's stdout
  goes to the guest's stdout (channel 0) and its stderr to the guest's stderr (channel 2). When
  COMMAND exits, ``{"exit": status}`` is sent after the last byte; ``share`` waits for the guest to
  acknowledge everything, ends the session and exits with the same status.
- ``join SESSION [--api URL]`` (the guest) writes the stream, and only the stream, to stdout;
  every message of its own goes to stderr. On a terminal it switches stdin to raw mode (restored
  on every exit path: normal end, errors, SIGINT/SIGTERM/SIGHUP) and reports its window size. It
  exits with the shared command's exit status.

Both print on stderr when they (re)connect, when the partner comes and goes, and when and why they
reconnect; how the session ended is said once, in words (a wrong passphrase: "the guest's passphrase
does not match" on the host). Log records stay off the terminal unless ``--log-level`` asks for them.
The passphrase comes from ``RESCUE_PASSPHRASE`` or a prompt on the terminal; ``share``
generates one (and prints it on stderr) when neither gives one.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import functools
import getpass
import logging
import os
import secrets
import shlex
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

from rescue._codes import CloseCode
from rescue._log import configure_logging
from rescue._tracing import traced_process
from rescue.cli import add_option, self_command
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
        "end encrypted, once the guest has joined. Prints the session id and the exact command the "
        "guest runs on stderr.\n\n"
        f"The passphrase comes from ${PASSPHRASE_ENV}, else a prompt on the terminal, else a generated "
        "one (printed on stderr).\n"
        f"${SERVICE_KEY_ENV} is the bearer key for the token service when it requires one (a service "
        "key: an opaque string its operator gives you).\n\n"
        "example:\n"
        f"  {PASSPHRASE_ENV}=correct-horse rescue share --session demo-1 -- bash",
    )
    add_option(share, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")
    add_option(share, "--session", default=None, metavar="ID", help="session id (default: a random one)")
    add_option(share, "--no-pty", action="store_true", help="raw byte streams instead of a terminal")
    add_option(share, "--cohort", default=DEFAULT_COHORT, metavar="C", help="cohort id for the token request")
    _add_log_option(share)
    share.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND...")
    share.set_defaults(func=_share_main)

    join = subparsers.add_parser(
        "join",
        help="join a shared session: its stream on stdout, your keystrokes to it",
        description="Join SESSION as the guest. Writes only the shared stream to stdout (messages go "
        "to stderr) and exits with the shared command's exit status.\n\n"
        f"The passphrase comes from ${PASSPHRASE_ENV}, else a prompt on the terminal.\n"
        f"${SERVICE_KEY_ENV} is the bearer key for the token service when it requires one.\n\n"
        "example (rescue share prints the exact command):\n"
        f"  {PASSPHRASE_ENV}=correct-horse rescue join demo-1",
    )
    join.add_argument("session", metavar="SESSION", help="the session id printed by rescue share")
    add_option(join, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")
    add_option(join, "--cohort", default=DEFAULT_COHORT, metavar="C", help="cohort id for the token request")
    _add_log_option(join)
    join.set_defaults(func=_join_main)


def _add_log_option(p: argparse.ArgumentParser) -> None:
    add_option(
        p,
        "--log-level",
        default=None,
        metavar="LEVEL",
        help="also write JSON log lines at LEVEL on stderr (default: none, only messages meant for you)",
    )


def _setup_logging(args: argparse.Namespace) -> None:
    """The terminal gets our own one-line messages, not log records: without --log-level the
    ``rescue`` loggers write nowhere (Python would otherwise print WARNING records bare on stderr)."""
    if args.log_level:
        configure_logging(args.log_level)
        return
    logger = logging.getLogger("rescue")
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False


# ------------------------------------------------------------------------------------ terminal bits


class Console:
    """Messages of our own on stderr; line endings that still work while the terminal is raw.

    How the session ended is said once (:meth:`report_closed`), however many paths notice it.
    """

    def __init__(self, prog: str) -> None:
        self.prog = prog
        self.raw = False
        self.close_reported = False

    def say(self, text: str) -> None:
        end = "\r\n" if self.raw else "\n"
        sys.stderr.write(f"rescue {self.prog}: {text}{end}")
        sys.stderr.flush()

    def report_closed(self, closed: SessionClosed, peer_word: str) -> None:
        """One line for a session that did not end normally; nothing the second time."""
        if self.close_reported:
            return
        self.close_reported = True
        self.say(describe_close(closed, peer_word))

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
                if connections == 0:  # nothing was lost: it never got that far
                    self.say(f"cannot connect yet: {event.reason}{code}; trying again in {event.delay:.1f} s")
                else:
                    token = ", with a fresh token" if event.fresh_token else ""
                    self.say(
                        f"connection lost: {event.reason}{code}; reconnecting in {event.delay:.1f} s{token}"
                    )
            elif isinstance(event, SessionClosed) and event.code not in (None, 1000) and not event.local:
                self.report_closed(event, peer_word)

        return report


def describe_close(closed: SessionClosed, peer_word: str) -> str:
    """The line the user reads about how a session ended (``peer_word``: who the partner is)."""
    if closed.code == CloseCode.INTEGRITY_ERROR:
        # Either side may be the one that noticed; to the person at the terminal it is the same.
        if peer_word == "guest":
            return "error: the guest's passphrase does not match (their frames fail authentication)"
        return "error: the passphrase does not match the host's (its frames fail authentication)"
    if isinstance(closed.error, GuardrailError):
        return f"error: the relay fallback is refused ({closed.error.error}): {closed.error}"
    if closed.error is not None:
        return f"error: {closed.error}"
    name = _close_name(closed.code)
    return f"session ended: {closed.reason or 'closed'} ({name})"


def _close_name(code: int | None) -> str:
    if code is None:
        return "no close code"
    try:
        return f"{CloseCode(code).name} {code}"
    except ValueError:
        return str(code)


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


# A window size a partner sends must fit the pty's 16-bit fields; anything else is ignored.
MAX_WINSIZE: Final = 0xFFFF


def parse_winsize(value: object) -> tuple[int, int] | None:
    """``[rows, cols]`` from a CONTROL ``{"winsize"}`` as a size, or ``None`` if it is not one."""
    if not isinstance(value, list | tuple) or len(value) != 2:
        return None
    rows, cols = value
    for n in (rows, cols):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_WINSIZE:
            return None
    return rows, cols


class SharedWindow:
    """The size in force on the shared pty (SPEC §12): the smallest of the attached terminals, per
    dimension, as tmux does, so no one's screen is smaller than the program's.

    Pure state; the shell applies :attr:`size` to the pty and tells both sides. The guest's last
    size is kept while it is away (it comes back within the resume grace and does not resend it).
    """

    def __init__(self, host: tuple[int, int]) -> None:
        self.host = host
        self.guest: tuple[int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(rows, cols) in force."""
        if self.guest is None:
            return self.host
        return min(self.host[0], self.guest[0]), min(self.host[1], self.guest[1])

    def describe(self) -> str:
        """Which size is in force and why, for the host's terminal."""
        rows, cols = self.size
        if self.size == self.host:
            return f"window {rows}x{cols} (yours)"
        return f"window {rows}x{cols}: the guest's window is smaller (yours is {self.host[0]}x{self.host[1]})"


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
    _setup_logging(args)
    session = args.session or secrets.token_urlsafe(9)
    if len(session) > MAX_SESSION_LEN:
        raise ConfigError(f"session id longer than {MAX_SESSION_LEN} characters")
    console = Console("share")
    passphrase = _read_passphrase("Passphrase for the session (empty: generate one): ")
    if passphrase is None:
        passphrase = secrets.token_urlsafe(15)
        console.say(f"passphrase: {passphrase}")
    console.say(f"session: {session}")
    console.say(f"the guest joins with: {guest_command(args, session)}")
    console.say(f"  (passphrase from ${PASSPHRASE_ENV} or a prompt)")
    cohort = None if args.cohort == DEFAULT_COHORT else args.cohort
    console.say(f"or in a browser: {join_url(args.api, session, cohort)}")
    use_pty = not args.no_pty and sys.stdin.isatty()
    with traced_process("beach-rescue-client"):
        return trio.run(_share, args, command, session, passphrase, use_pty, console)


def guest_command(args: argparse.Namespace, session: str) -> str:
    """The ``rescue join`` command line for the guest, ready to paste: this same executable, and
    every option the guest needs to reach the same session (``--api`` always, ``--cohort`` when it
    is not the default)."""
    argv = ["join", session, "--api", args.api]
    if args.cohort != DEFAULT_COHORT:
        argv += ["--cohort", args.cohort]
    return f"{self_command()} {shlex.join(argv)}"


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
        # COMMAND starts only for a guest that has proven the passphrase (its first authenticated
        # frame); with a wrong one the session ends with INTEGRITY_ERROR before anything runs.
        await peer.wait_partner_verified()
        if peer.closed is not None:
            return _report_closed(peer, console, "guest")
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
            return _report_closed(peer, console, "guest")
        except RescueError as exc:
            console.say(f"error: {exc}")
            return 1
    console.say(f"command exited with status {status}")
    return status


def _report_closed(peer: Peer, console: Console, peer_word: str) -> int:
    if peer.closed is not None:
        console.report_closed(peer.closed, peer_word)
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

    window = SharedWindow((rows, cols))

    async def apply_size() -> None:
        """Put the size in force on the pty (its programs get SIGWINCH) and tell the guest."""
        size = window.size
        if size != get_winsize(pty.fileno()):
            set_winsize(pty.fileno(), *size)
            console.say(window.describe())
        await peer.send_control({"winsize": list(size)})

    async def guest_input() -> None:
        while True:
            message = await peer.receive()
            if isinstance(message, DataReceived) and message.channel == 1:
                await pty.write(message.data)
            elif isinstance(message, ControlReceived) and "winsize" in message.data:
                size = parse_winsize(message.data["winsize"])
                if size is not None and size != window.guest:
                    window.guest = size
                    await apply_size()

    async def local_input() -> None:
        while data := await keyboard.read():
            await pty.write(data)

    async def resizes() -> None:
        await peer.send_control({"winsize": list(window.size)})
        with trio.open_signal_receiver(signal.SIGWINCH) as sigwinch:
            async for _ in sigwinch:
                size = get_winsize(local_in)
                if size is not None and size != window.host:
                    window.host = size
                    await apply_size()

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
    _setup_logging(args)
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

            announced: tuple[int, int] | None = None

            def size_in_force(size: tuple[int, int]) -> None:
                # Said only when the host's window, not ours, limits the shared one (and once).
                nonlocal announced
                own = get_winsize(sys.stdin.fileno()) if interactive else None
                smaller = own is not None and (size[0] < own[0] or size[1] < own[1])
                if smaller and size != announced:
                    assert own is not None
                    console.say(
                        f"the shared window is {size[0]}x{size[1]}: the host's window is smaller "
                        f"than yours ({own[0]}x{own[1]})"
                    )
                announced = size if smaller else None

            nursery.start_soon(forward_input)
            if interactive:
                nursery.start_soon(report_size)
            status = await _play(peer, stdout, stderr, size_in_force)
            nursery.cancel_scope.cancel()
        if status is None:
            # The session ended without an exit status: normal end (the host stopped sharing) is
            # 0, anything else is reported.
            closed = peer.closed
            if closed is None or (closed.code == 1000 and closed.error is None):
                return 0
            return _report_closed(peer, console, "host")
        return status
    finally:
        with trio.CancelScope(shield=True):
            for io in (stdin, stdout, stderr):
                await io.aclose()


async def _play(
    peer: Peer, stdout: FdIO, stderr: FdIO, on_winsize: Callable[[tuple[int, int]], None]
) -> int | None:
    """Write the host's stream out until its exit status arrives (``None``: the session ended);
    the window size in force on the host's pty goes to ``on_winsize``."""
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
            size = parse_winsize(message.data.get("winsize"))
            if size is not None:
                on_winsize(size)
            exit_status = message.data.get("exit")
            if isinstance(exit_status, int) and not isinstance(exit_status, bool):
                return exit_status & 0xFF
