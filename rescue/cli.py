"""The ``rescue`` command line (SPEC §11).

Each sub-command lives in its own module under ``rescue.commands`` and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` to a callable
``(args) -> int``. Every option can also come from a ``RESCUE_<OPTION>`` environment variable
(``--node-id`` ← ``RESCUE_NODE_ID``); use :func:`add_option` so the help text says so.

Errors: a :class:`~rescue.errors.RescueError` (or ``OSError``) escaping a command — also inside an
exception group from a nursery — becomes one line on stderr and exit status 1; argparse's own
usage errors exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from rescue import __version__
from rescue.errors import RescueError

__all__ = ["add_option", "build_parser", "main"]

# Modules that register sub-commands, in the order `rescue --help` lists them.
COMMAND_MODULES = [
    "rescue.commands.keys",  # keygen, mint, verify
    "rescue.commands.relay",  # relay
    "rescue.commands.token_service",  # token-service
    "rescue.commands.admin",  # admin pause/resume/status/cohort
    "rescue.commands.peer",  # share, join
    "rescue.commands.dev",  # dev
]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rescue",
        description="beach-rescue: WebSocket fallback relay and token service for Beach sessions.",
    )
    parser.add_argument("--version", action="version", version=f"rescue {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        messages = _user_errors(exc)
        if messages is None:
            raise  # a bug: the traceback is what a maintainer needs
        print(f"rescue {args.command}: error: {'; '.join(messages)}", file=sys.stderr)
        return 1
    return status


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
