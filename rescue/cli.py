"""The ``rescue`` command line (SPEC §11).

Each sub-command lives in its own module under ``rescue.commands`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` to a callable
``(args) -> int``. Every option can also come from a ``RESCUE_<OPTION>`` environment variable
(``--node-id`` ← ``RESCUE_NODE_ID``); use :func:`add_option` so the help text says so.

Errors: a :class:`~rescue.errors.RescueError` (or ``OSError``) escaping a command — also inside an
exception group from a nursery — becomes one line on stderr and exit status 1; argparse's own
usage errors exit 2.

A reader that goes away (``rescue admin status | head``) is not an error: every command stops
quietly with the shell's status for SIGPIPE (141), as ``yes | head`` does — handled here, once,
the way the Python docs recommend (stdout pointed at ``/dev/null`` so the interpreter's own final
flush does not complain either).
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import shlex
import signal
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from rescue import __version__
from rescue import _build as build
from rescue.errors import RescueError

__all__ = ["HelpFormatter", "RescueParser", "add_option", "build_parser", "main", "self_command"]

# Modules that register sub-commands, in the order `rescue --help` lists them, with the commands
# each one registers. A command line that names its command imports only that command's module:
# the others pull in trio, redis-py and prometheus-client, about a second of start-up
# that every `rescue admin …` at 3 a.m. (and every drill step) would otherwise pay
# (tests/test_cli.py checks the table against what each module registers).
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "rescue.commands.keys": ("keygen", "mint", "verify"),
    "rescue.commands.relay": ("relay",),
    "rescue.commands.token_service": ("token-service",),
    "rescue.commands.admin": ("admin",),
    "rescue.commands.peer": ("share", "join"),
    "rescue.commands.dev": ("dev",),
    "rescue.commands.probe": ("probe",),
    "rescue.commands.completion": ("completion",),
}


def env_name(option: str) -> str:
    """``--node-id`` → ``RESCUE_NODE_ID``."""
    return "RESCUE_" + option.lstrip("-").replace("-", "_").upper()


def add_option(parser: argparse.ArgumentParser, option: str, **kwargs: Any) -> argparse.Action:
    """``parser.add_argument`` whose default comes from ``RESCUE_<OPTION>`` when that is set.

    The environment value goes through the option's ``type`` like a command-line value would;
    for ``action="store_true"`` options, ``1``/``true``/``yes``/``on`` mean true.
    """
    var = env_name(option)
    raw = os.environ.get(var)
    if raw is not None:
        if kwargs.get("action") == "store_true":
            kwargs["default"] = raw.strip().lower() in {"1", "true", "yes", "on"}
        elif kwargs.get("nargs") in ("*", "+"):
            kwargs["default"] = raw.split()
        else:
            kwargs["default"] = raw
        kwargs["required"] = False
    help_text = kwargs.get("help", "")
    kwargs["help"] = f"{help_text} [env {var}]".strip() if help_text != argparse.SUPPRESS else help_text
    return parser.add_argument(option, **kwargs)


class HelpFormatter(argparse.HelpFormatter):
    """Descriptions keep their line breaks: each line is a paragraph wrapped to the width, an
    indented line (an example command) is kept as it is. Every option with a default says what it
    is, before its ``[env RESCUE_…]`` note."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        for line in text.splitlines():
            if not line.strip() or line.startswith(" "):
                out.append(indent + line if line.strip() else "")
            else:
                out.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent))
        return "\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
            or action.nargs == 0  # store_const/store_true: the flag's presence is the value
        ):
            return action.help
        note = f"(default: {'%(default)s'})"
        head, sep, env = text.partition(" [env ")
        return f"{head} {note}{sep}{env}".strip()


class RescueParser(argparse.ArgumentParser):
    """The parser of ``rescue`` and of every sub-command (sub-parsers inherit the class)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def self_command() -> str:
    """How to run this same ``rescue`` from a fresh shell, quoted, for the commands we print.

    A bare ``rescue`` is not on PATH after ``./run dev`` (the venv is not activated), so: the
    absolute path of the console script we were started as, else ``python -m rescue`` with this
    interpreter's absolute path.
    """
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    argv0 = sys.argv[0] if sys.argv else ""
    if main_spec is None and argv0 and os.path.basename(argv0) == "rescue":
        path = os.path.abspath(argv0)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return shlex.quote(path)
    return shlex.join([os.path.abspath(sys.executable), "-m", "rescue"])


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``rescue`` parser with every sub-command, or, given the command line about to be parsed,
    with only the sub-command it names (when it names a known one: anything else, ``--help`` and
    ``--version`` included, gets the whole parser, so usage errors list every command)."""
    parser = RescueParser(
        prog="rescue",
        description="beach-rescue: WebSocket fallback relay and token service for Beach sessions.",
    )
    parser.add_argument(
        "--version", action="version", version=f"rescue {__version__}, hot path {build.describe()}"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = _named_command(argv)
    for module, commands in COMMAND_MODULES.items():
        if named is None or named in commands:
            importlib.import_module(module).register(subparsers)
    return parser


def _named_command(argv: Sequence[str] | None) -> str | None:
    """The sub-command a command line names: its first word, when that is a known command."""
    if not argv or argv[0].startswith("-"):
        return None
    known = {command for commands in COMMAND_MODULES.values() for command in commands}
    return argv[0] if argv[0] in known else None


# Exit status when stdout's reader went away: what a shell reports for a process killed by SIGPIPE.
BROKEN_PIPE_STATUS = 128 + signal.SIGPIPE


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            status = _main(argv)
        finally:
            # inside the try: a reader gone before our last bytes (also after --help's exit) is a
            # broken pipe too
            sys.stdout.flush()
    except BaseException as exc:
        if not _is_broken_pipe(exc):
            raise
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    return status


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(words).parse_args(words)
    try:
        status: int = args.func(args)
    except BaseException as exc:
        if _only(exc, KeyboardInterrupt):  # Ctrl-C, also from inside a nursery
            return 130
        if not isinstance(exc, Exception):
            raise
        if _is_broken_pipe(exc):
            raise
        messages = _user_errors(exc)
        if messages is None:
            raise  # a bug: the traceback is what a maintainer needs
        print(f"rescue {args.command}: error: {'; '.join(messages)}", file=sys.stderr)
        return 1
    return status


def _is_broken_pipe(exc: BaseException) -> bool:
    """``exc`` is a BrokenPipeError (or a group of nothing else, from a nursery) and stdout's reader
    is gone: a socket's EPIPE with stdout still open stays an error worth reporting."""
    return _only_broken_pipes(exc) and _stdout_reader_gone()


def _only_broken_pipes(exc: BaseException) -> bool:
    return _only(exc, BrokenPipeError)


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """``exc`` is a ``kind``, or an exception group of nothing else (at any depth)."""
    if isinstance(exc, kind):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return False


def _stdout_reader_gone() -> bool:
    """poll() reports POLLERR on a pipe's write end (POLLHUP on a socket) once no one reads it."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def _silence_stdout() -> None:
    """Point stdout at /dev/null: the interpreter's final flush of what is still buffered then
    succeeds instead of printing 'Exception ignored … BrokenPipeError' (Python docs, "Note on
    SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return  # not a real file (tests capture it): nothing will flush to a pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _user_errors(exc: BaseException) -> list[str] | None:
    """The one-line messages of ``exc`` if it is (a group of nothing but) expected errors.

    Commands run inside trio nurseries, so a ``ConfigError`` from start-up arrives wrapped in an
    exception group; every leaf is reported, and anything that is not a RescueError/OSError makes
    the whole thing a bug (``None``).
    """
    if isinstance(exc, (RescueError, OSError)):
        return [str(exc)]
    if isinstance(exc, BaseExceptionGroup):
        messages: list[str] = []
        for inner in exc.exceptions:
            found = _user_errors(inner)
            if found is None:
                return None
            messages.extend(found)
        return messages
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
