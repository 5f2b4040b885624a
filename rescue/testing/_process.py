"""A real ``rescue dev`` process (token service + relay), started as an operator starts it.

::

    async with run_dev_process() as dev:        # ports 0; URLs read from its banner
        async with open_peer(dev.api, "s1", "host", "pw") as host: ...
        dev.admin_key()                           # the throwaway admin key, from its 0600 file

Leaving the block stops it with SIGTERM (a caller may stop it first and check its exit status).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Final

import trio

__all__ = ["RESCUE_CLI", "DevProcess", "run_dev_process"]

# The CLI of the installed package, run by this interpreter (a venv's python finds its rescue).
RESCUE_CLI: Final = (sys.executable, "-P", "-m", "rescue.cli")
# Importing rescue and binding three ports takes well under a second; a loaded 2-core box more.
DEV_STARTUP_TIMEOUT_S: Final = 30.0
# SIGTERM drains for DEV_DRAIN_S (2 s) and exits; past this it is killed.
DEV_STOP_TIMEOUT_S: Final = 20.0
_BANNER: Final = {
    "api": re.compile(r"token service\s+(http://\S+)"),
    "relay": re.compile(r"relay\s+(ws://\S+)"),
    "admin": re.compile(r"relay admin\s+(http://\S+)"),
    "key_file": re.compile(r"\$\(cat (\S+)\)"),
}


@dataclass(frozen=True, slots=True)
class DevProcess:
    """A running ``rescue dev``: its process, where it listens, and the banner it printed."""

    proc: trio.Process
    api: str
    relay: str
    admin: str
    key_file: str
    banner: str

    def admin_key(self) -> str:
        """The admin API's bearer key (``rescue dev`` writes a throwaway one to a private file)."""
        with open(self.key_file) as f:
            return f.read().strip()


async def start_dev_process(
    cli: Sequence[str] = RESCUE_CLI, env: Mapping[str, str] | None = None, *extra_args: str
) -> DevProcess:
    """Start ``rescue dev`` on ports 0 and wait for its banner; stopping it is the caller's job.

    Args:
        cli: how to run ``rescue`` (default: this interpreter's ``-m rescue.cli``; a console
            script's path works too).
        env: its environment (default: ours); ``RESCUE_ENV=development`` and an empty
            ``RESCUE_ADMIN_KEY`` (a throwaway key in a private file) are set on top.
        extra_args: more ``rescue dev`` flags.

    Raises:
        RuntimeError: it exited before printing its banner, or the banner lacks a URL.
        trio.TooSlowError: no banner within ``DEV_STARTUP_TIMEOUT_S``.
    """
    proc = await trio.lowlevel.open_process(
        [*cli, "dev", "--api-port", "0", "--relay-port", "0", "--admin-port", "0", *extra_args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**(os.environ if env is None else env), "RESCUE_ENV": "development", "RESCUE_ADMIN_KEY": ""},
    )
    try:
        assert proc.stdout is not None
        text = ""
        with trio.fail_after(DEV_STARTUP_TIMEOUT_S):
            while "Stop with Ctrl-C." not in text:
                chunk = await proc.stdout.receive_some()
                if not chunk:
                    raise RuntimeError(f"rescue dev exited early: {text!r}")
                text += chunk.decode()
        found = {name: pattern.search(text) for name, pattern in _BANNER.items()}
        missing = [name for name, match in found.items() if match is None]
        if missing:
            raise RuntimeError(f"rescue dev's banner lacks {missing}: {text}")
    except BaseException:
        await _stop(proc)
        raise
    urls = {name: match.group(1) for name, match in found.items() if match is not None}
    return DevProcess(proc, urls["api"], urls["relay"], urls["admin"], urls["key_file"], text)


@asynccontextmanager
async def run_dev_process(*extra_args: str) -> AsyncIterator[DevProcess]:
    """:func:`start_dev_process`, stopped with SIGTERM (then SIGKILL) when the block ends."""
    dev = await start_dev_process(RESCUE_CLI, None, *extra_args)
    try:
        yield dev
    finally:
        await _stop(dev.proc)


async def _stop(proc: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(DEV_STOP_TIMEOUT_S):
                await proc.wait()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
