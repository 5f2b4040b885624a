"""``rescue share`` / ``rescue join`` end to end, as real subprocesses, against the real token service
and relay running in this process: raw byte-exact streams, exit status, stderr hygiene, and a pty
session driven through pseudo-terminal pairs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import termios

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rescue.commands.peer import MAX_WINSIZE, SharedWindow, parse_winsize, set_winsize
from rescue.testing import run_dev_stack

PASSPHRASE = "correct horse battery staple"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RESCUE_PASSPHRASE"] = PASSPHRASE
    env.pop("RESCUE_SESSION", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "rescue.cli", *args]


async def test_no_pty_byte_exact_with_exit_status_and_stderr() -> None:
    data = bytes(range(256)) * 16 + random.Random(7).randbytes(3 * 1024 * 1024) + bytes(range(255, -1, -1))
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    with trio.fail_after(50):
        async with run_dev_stack() as stack:
            share_cmd = _cli(
                "share", "--no-pty", "--api", stack.api_url, "--session", "cli-raw", "--",
                "sh", "-c", "cat; echo to-stderr >&2; exit 7",
            )  # fmt: skip
            join_cmd = _cli("join", "cli-raw", "--api", stack.api_url)

            async def run(name: str, command: list[str], stdin: bytes) -> None:
                results[name] = await trio.run_process(
                    command, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=_env()
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "share", share_cmd, b"")
                nursery.start_soon(run, "join", join_cmd, data)
    share, join = results["share"], results["join"]
    assert join.returncode == 7, join.stderr.decode(errors="replace")
    assert share.returncode == 7, share.stderr.decode(errors="replace")
    assert join.stdout == data  # byte-exact: every byte value, nothing added, nothing lost
    # join's own messages and the command's stderr (channel 2) go to stderr, never stdout
    assert b"to-stderr" in join.stderr
    assert b"rescue join: connected to the relay" in join.stderr
    assert b"session: cli-raw" in share.stderr
    assert share.stdout == b""  # --no-pty: nothing mirrored to the host's stdout


async def test_join_with_unknown_guardrail_cohort_fails_cleanly() -> None:
    with trio.fail_after(30):
        async with run_dev_stack() as stack:
            result = await trio.run_process(
                _cli("join", "cli-nope", "--api", stack.api_url, "--cohort", "closed"),
                stdin=b"",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=_env(),
            )
    assert result.returncode == 1
    assert result.stdout == b""
    assert b"cohort_disabled" in result.stderr


def test_join_without_passphrase_on_a_pipe_is_a_one_line_error() -> None:
    env = _env()
    del env["RESCUE_PASSPHRASE"]
    result = subprocess.run(
        _cli("join", "x", "--api", "http://127.0.0.1:9"),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == b""
    assert result.stderr.count(b"\n") == 1
    assert b"RESCUE_PASSPHRASE" in result.stderr


class Terminal:
    """A pty pair: the test holds the master; the process gets the slave as its terminal."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.output = bytearray()
        self.stream = trio.lowlevel.FdStream(os.dup(self.master))

    async def pump(self) -> None:
        while True:
            try:
                chunk = await self.stream.receive_some(65536)
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                return
            self.output += chunk

    async def wait_for(self, text: bytes) -> None:
        while text not in self.output:
            await trio.sleep(0.05)

    async def type(self, text: bytes) -> None:
        await self.stream.send_all(text)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")
async def test_pty_session_through_pty_pairs() -> None:
    host_tty, guest_tty = Terminal(), Terminal()
    set_winsize(host_tty.slave, 30, 100)
    guest_modes = termios.tcgetattr(guest_tty.slave)
    codes: dict[str, int] = {}
    script = 'printf "ready\\n"; stty size; read line; echo "got:$line"; exit 5'
    with trio.fail_after(50):
        async with run_dev_stack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(host_tty.pump)
            nursery.start_soon(guest_tty.pump)

            async def run(name: str, command: list[str], term: Terminal) -> None:
                process = await trio.lowlevel.open_process(
                    command, stdin=term.slave, stdout=term.slave, stderr=term.slave, env=_env()
                )
                codes[name] = await process.wait()

            async with trio.open_nursery() as processes:
                processes.start_soon(
                    run,
                    "share",
                    _cli("share", "--api", stack.api_url, "--session", "cli-pty", "--", "sh", "-c", script),
                    host_tty,
                )
                processes.start_soon(run, "join", _cli("join", "cli-pty", "--api", stack.api_url), guest_tty)
                await guest_tty.wait_for(b"ready")
                await guest_tty.type(b"hello\r")  # raw mode on the guest: the host's pty does the echo
                await guest_tty.wait_for(b"got:hello")
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert codes == {"share": 5, "join": 5}, (bytes(host_tty.output), bytes(guest_tty.output))
    # The command ran on a real terminal of the host's window size, and its output reached both.
    assert b"30 100" in guest_tty.output
    assert b"got:hello" in host_tty.output
    assert b"hello" in guest_tty.output
    # join restored the terminal it had put in raw mode.
    assert termios.tcgetattr(guest_tty.slave) == guest_modes
    host_tty.close()
    guest_tty.close()


async def test_share_stops_the_command_when_the_guest_is_gone_for_good() -> None:
    with trio.fail_after(40):
        async with run_dev_stack(resume_grace_s=1) as stack, trio.open_nursery() as nursery:
            join = await trio.lowlevel.open_process(
                _cli("join", "cli-gone", "--api", stack.api_url),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=_env(),
            )
            share_done: dict[str, subprocess.CompletedProcess[bytes]] = {}

            async def share() -> None:
                share_done["r"] = await trio.run_process(
                    _cli(
                        "share",
                        "--no-pty",
                        "--api",
                        stack.api_url,
                        "--session",
                        "cli-gone",
                        "--",
                        "sh",
                        "-c",
                        "echo started; sleep 60",
                    ),
                    stdin=b"",
                    capture_stderr=True,
                    check=False,
                    env=_env(),
                )

            nursery.start_soon(share)
            assert join.stdout is not None
            assert await join.stdout.receive_some(100) == b"started\n"
            join.kill()  # the guest vanishes without a CLOSE
            await join.wait()
            while "r" not in share_done:
                await trio.sleep(0.1)
    result = share_done["r"]
    assert result.returncode == 1
    assert b"PEER_GONE" in result.stderr or b"4013" in result.stderr


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes, seen: bytearray) -> None:
    while marker not in seen:
        chunk = await stream.receive_some(4096)
        assert chunk, f"stream ended before {marker!r}: {bytes(seen)!r}"
        seen += chunk


async def test_the_guest_command_share_prints_works_when_pasted() -> None:
    """With a cohort other than the default (and any --api), the printed `join` line is complete."""
    with trio.fail_after(60):
        async with run_dev_stack(cohort="beta") as stack:
            share = await trio.lowlevel.open_process(
                _cli("share", "--no-pty", "--api", stack.api_url, "--session", "cli-paste",
                     "--cohort", "beta", "--", "sh", "-c", "cat; exit 4"),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
            )  # fmt: skip
            assert share.stderr is not None
            seen = bytearray()
            await _read_until(share.stderr, b"the guest joins with: ", seen)
            await _read_until(share.stderr, b"\n", seen[seen.index(b"the guest joins with: ") :])
            await _read_until(share.stderr, b"\n", seen)
            line = seen.split(b"the guest joins with: ", 1)[1].split(b"\n", 1)[0].decode()
            assert "--cohort beta" in line
            pasted = await trio.run_process(
                ["sh", "-c", line], stdin=b"pasted as printed\n", capture_stdout=True,
                capture_stderr=True, check=False, env=_env(),
            )  # fmt: skip
            assert await share.wait() == 4
    assert pasted.returncode == 4, pasted.stderr
    assert pasted.stdout == b"pasted as printed\n"


def _staircase_free(output: bytes) -> bool:
    """Every line ending on the terminal returns the carriage (raw mode needs an explicit \\r)."""
    return all(output[i - 1 : i] == b"\r" for i in range(len(output)) if output[i : i + 1] == b"\n")


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")
async def test_wrong_passphrase_one_clear_line_each_side_and_no_command() -> None:
    host_tty, guest_tty = Terminal(), Terminal()
    guest_modes = termios.tcgetattr(guest_tty.slave)
    codes: dict[str, int] = {}
    guest_env = {**_env(), "RESCUE_PASSPHRASE": "not the passphrase"}
    with trio.fail_after(60):
        async with run_dev_stack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(host_tty.pump)
            nursery.start_soon(guest_tty.pump)

            async def run(name: str, command: list[str], term: Terminal, env: dict[str, str]) -> None:
                process = await trio.lowlevel.open_process(
                    command, stdin=term.slave, stdout=term.slave, stderr=term.slave, env=env
                )
                codes[name] = await process.wait()

            async with trio.open_nursery() as processes:
                share = _cli("share", "--api", stack.api_url, "--session", "cli-wrong", "--",
                             "sh", "-c", "echo COMMAND-STARTED; sleep 30")  # fmt: skip
                processes.start_soon(run, "share", share, host_tty, _env())
                processes.start_soon(
                    run, "join", _cli("join", "cli-wrong", "--api", stack.api_url), guest_tty, guest_env
                )
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    host, guest = bytes(host_tty.output), bytes(guest_tty.output)
    assert codes == {"share": 1, "join": 1}, (host, guest)
    assert b"COMMAND-STARTED" not in host + guest  # the command never ran for an unproven guest
    assert host.count(b"does not match") == 1, host
    assert b"rescue share: error: the guest's passphrase does not match" in host
    assert guest.count(b"does not match") == 1, guest
    assert b"rescue join: error: the passphrase does not match the host's" in guest
    for output in (host, guest):
        assert b"client." not in output  # no bare log event names
        assert _staircase_free(output), output
    assert termios.tcgetattr(guest_tty.slave) == guest_modes  # join restored the terminal
    host_tty.close()
    guest_tty.close()


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs pseudo-terminals")
async def test_the_smallest_window_is_in_force_and_both_sides_are_told() -> None:
    """SPEC §12: the guest's smaller window shrinks the shared pty; a larger one gives the host's back."""
    host_tty, guest_tty = Terminal(), Terminal()
    set_winsize(host_tty.slave, 30, 100)
    set_winsize(guest_tty.slave, 20, 60)
    codes: dict[str, int] = {}
    script = 'printf "ready\\n"; read a; stty size; read b; stty size; read c; stty size; exit 0'
    with trio.fail_after(60):
        async with run_dev_stack() as stack, trio.open_nursery() as nursery:
            nursery.start_soon(host_tty.pump)
            nursery.start_soon(guest_tty.pump)
            started: dict[str, trio.Process] = {}

            async def run(name: str, command: list[str], term: Terminal) -> None:
                process = await trio.lowlevel.open_process(
                    command, stdin=term.slave, stdout=term.slave, stderr=term.slave, env=_env()
                )
                started[name] = process
                codes[name] = await process.wait()

            async with trio.open_nursery() as processes:
                share = _cli(
                    "share", "--api", stack.api_url, "--session", "cli-size", "--", "sh", "-c", script
                )
                processes.start_soon(run, "share", share, host_tty)
                processes.start_soon(run, "join", _cli("join", "cli-size", "--api", stack.api_url), guest_tty)
                await guest_tty.wait_for(b"ready")
                await host_tty.wait_for(b"window 20x60: the guest's window is smaller")
                await guest_tty.type(b"one\r")
                await guest_tty.wait_for(b"20 60")
                # The guest's window grows past the host's: the host's size is in force again.
                set_winsize(guest_tty.slave, 40, 120)
                started["join"].send_signal(signal.SIGWINCH)  # (its terminal is not its controlling tty)
                await guest_tty.wait_for(b"the shared window is 30x100: the host's window is smaller")
                await guest_tty.type(b"two\r")
                await guest_tty.wait_for(b"30 100")
                # The host's own window shrinks: re-applied on its SIGWINCH.
                set_winsize(host_tty.slave, 25, 90)
                started["share"].send_signal(signal.SIGWINCH)
                await host_tty.wait_for(b"window 25x90 (yours)")
                await guest_tty.type(b"three\r")
                await guest_tty.wait_for(b"25 90")
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
    assert codes == {"share": 0, "join": 0}, (bytes(host_tty.output), bytes(guest_tty.output))
    assert b"window 30x100 (yours)" in host_tty.output
    host_tty.close()
    guest_tty.close()


async def test_join_that_never_connected_does_not_say_connection_lost() -> None:
    """Before the first connection nothing was lost: the line says it cannot connect yet."""
    with trio.fail_after(30):
        join = await trio.lowlevel.open_process(
            _cli("join", "cli-nowhere", "--api", "http://127.0.0.1:9"),  # nothing listens on port 9
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        assert join.stderr is not None
        seen = bytearray()
        try:
            await _read_until(join.stderr, b"trying again in", seen)
            await _read_until(join.stderr, b"\n", seen)
        finally:
            join.kill()
            await join.wait()
    first = bytes(seen).splitlines()[0]
    assert first.startswith(b"rescue join: cannot connect yet: token service unavailable"), first
    assert b"connection lost" not in seen


SIZES = st.tuples(st.integers(1, MAX_WINSIZE), st.integers(1, MAX_WINSIZE))
ANYTHING = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner),
    max_leaves=8,
)


@given(host=SIZES, guest=st.none() | SIZES)
def test_the_shared_window_is_the_smallest_per_dimension(
    host: tuple[int, int], guest: tuple[int, int] | None
) -> None:
    window = SharedWindow(host)
    window.guest = guest
    rows, cols = window.size
    attached = [host] if guest is None else [host, guest]
    assert rows == min(r for r, _ in attached)
    assert cols == min(c for _, c in attached)
    assert window.describe().startswith(f"window {rows}x{cols}")


@given(value=ANYTHING)
def test_parse_winsize_takes_only_two_sizes_in_range(value: object) -> None:
    size = parse_winsize(value)  # never raises: a partner's bad CONTROL is ignored
    if size is not None:
        assert all(type(n) is int and 1 <= n <= MAX_WINSIZE for n in size)
        assert list(size) == list(value)  # type: ignore[call-overload]


def test_parse_winsize_examples() -> None:
    assert parse_winsize([24, 80]) == (24, 80)
    for bad in ([0, 80], [24], [24, 80, 1], [True, 80], ["24", "80"], [24, 70000], None, {"r": 1}):
        assert parse_winsize(bad) is None
