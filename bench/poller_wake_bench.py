"""Micro-benchmark: what one wake-up of the read poller costs through trio, against the poller's own
``epoll_wait`` -- the price of decision 0019's unbuilt lead, "the poller sleeping in its own
``epoll_wait`` with trio's epoll descriptor nested in its set".

Today the poller (``rescue/websocket/_poller.py``) waits for its edge-triggered epoll set through
``trio.lowlevel.wait_readable``: per wake-up trio re-arms the descriptor (``EPOLLONESHOT``: one
``epoll_ctl``), sleeps in its own ``epoll_wait``, makes a pass of its run loop and switches into
the poller's task, which then asks its own set for the ready sockets (``epoll.poll(0)``). Sleeping
in the poller's own ``epoll_wait`` would leave one system call of all that. This measures both on a
descriptor that is always readable (so neither ever sleeps: what is left is the CPU a wake-up
costs), and the figure that matters: that difference at a node's wake-up rate, as a share of a core.

Usage (from the repository root)::

    .venv/bin/python -m bench.poller_wake_bench                      # ~5 s
    .venv/bin/python -m bench.poller_wake_bench --wakeups-per-s 1400 --iterations 500000

Prints CPU microseconds per wake-up (``time.process_time``: other processes on a shared machine do
not skew it) for each way, the difference, and that difference at ``--wakeups-per-s`` (the relay's
``/debug/stats`` poller ``wakeups`` over a second: ~1,000-1,400 at 1,000 active sessions at 64
KB/s, docs/perf/README.md) in percent of one core. No network: a socketpair, one core.
"""

from __future__ import annotations

import argparse
import select
import socket
import time

import trio


def through_trio(sock: socket.socket, iterations: int) -> float:
    """CPU seconds per ``trio.lowlevel.wait_readable`` of a readable socket (the poller's wait today)."""

    async def main() -> float:
        start = time.process_time()
        for _ in range(iterations):
            await trio.lowlevel.wait_readable(sock)
        return (time.process_time() - start) / iterations

    return trio.run(main)


def own_epoll(sock: socket.socket, iterations: int) -> float:
    """CPU seconds per ``epoll_wait`` of the poller's own set holding the readable socket."""
    epoll = select.epoll()
    try:
        epoll.register(sock.fileno(), select.EPOLLIN)
        poll = epoll.poll
        start = time.process_time()
        for _ in range(iterations):
            poll(0, 64)
        return (time.process_time() - start) / iterations
    finally:
        epoll.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000, help="wake-ups per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements of each; the best is kept")
    parser.add_argument(
        "--wakeups-per-s", type=float, default=1200.0, help="the node's poller wake-ups a second"
    )
    args = parser.parse_args(argv)
    a, b = socket.socketpair()
    with a, b:
        b.send(b"x")  # a is readable from now on, and stays so (nobody reads it)
        trio_s = min(through_trio(a, args.iterations) for _ in range(args.repeat))
        own_s = min(own_epoll(a, args.iterations) for _ in range(args.repeat))
    saved = trio_s - own_s
    print(f"wake-up through trio (wait_readable): {trio_s * 1e6:6.2f} us CPU")
    print(f"the poller's own epoll_wait:          {own_s * 1e6:6.2f} us CPU")
    print(f"difference per wake-up:               {saved * 1e6:6.2f} us")
    share = saved * args.wakeups_per_s * 100
    print(f"at {args.wakeups_per_s:,.0f} wake-ups a second: {share:.2f} % of one core")


if __name__ == "__main__":
    main()
