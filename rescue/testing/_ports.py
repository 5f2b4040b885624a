"""TCP ports on 127.0.0.1 to bind *later*, for a server that must be told its port in advance.

Most tests bind port 0 and read the port back. Some cannot: a Redis Cluster or Sentinel set-up
(each server's config names the others), a relay supervisor given ``--port N`` for its nodes
``N, N+1, ...``, a fleet whose relays restart on the ports they had. Such a port is checked free
now and bound a moment (or, for a restart, seconds) later, and in between something else may take
it. Two things make that impossible from inside the test suite rather than unlikely:

- The ports come from **outside the kernel's ephemeral range** (``net.ipv4.ip_local_port_range``,
  32768-60999 by default) and at or above 10000 (below: registered services, e.g. 6379, 8080,
  9090). No ``bind(port 0)`` and no outgoing connection anywhere on the machine is ever given one.
- Under pytest-xdist (``PYTEST_XDIST_WORKER`` / ``PYTEST_XDIST_WORKER_COUNT``, which the workers'
  child processes inherit too) each worker picks only from **its own slice** of those ports, so
  two workers never pick the same one; within one process a port is handed out at most once.

What remains is a process outside the suite binding one of them, which a retry cannot tell from a
real failure anyway.
"""

from __future__ import annotations

import os
import random
import socket
from typing import Final

__all__ = ["free_tcp_ports"]

LOWEST_PORT: Final = 10_000
_DEFAULT_EPHEMERAL: Final = (32768, 60999)
_ATTEMPTS: Final = 2000
_handed_out: set[int] = set()  # by this process: never twice (a port may be picked, not yet bound)


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL
    return low, high


def _worker_share() -> tuple[int, int]:
    """(this process's slice index, number of slices): one slice per pytest-xdist worker."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    try:
        count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
        index = int(worker.removeprefix("gw")) if worker.startswith("gw") else 0
    except ValueError:
        return 0, 1
    if count < 1 or not 0 <= index < count:
        return 0, 1
    return index, count


def candidate_ports() -> list[int]:
    """This process's slice of the ports outside the ephemeral range, in order."""
    low, high = _ephemeral_range()
    ports = [p for p in range(LOWEST_PORT, 65536) if not low <= p <= high]
    index, count = _worker_share()
    size = len(ports) // count
    return ports[index * size : (index + 1) * size]


def _bindable(port: int) -> bool:
    with socket.socket() as s:  # no SO_REUSEADDR: a port with a connection in TIME_WAIT is not free
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_tcp_ports(count: int = 1, *, consecutive: bool = False) -> list[int]:
    """``count`` distinct TCP ports of 127.0.0.1 that were free a moment ago and that nothing else in
    this test run will pick or be given (see the module's doc); ``consecutive``: ``N, N+1, ...``."""
    if count < 1:
        raise ValueError("count must be at least 1")
    candidates = candidate_ports()
    allowed = set(candidates)
    rng = random.SystemRandom()
    picked: list[int] = []
    for _ in range(_ATTEMPTS):
        if consecutive:
            start = rng.choice(candidates)
            run = list(range(start, start + count))
            if all(p in allowed and p not in _handed_out and _bindable(p) for p in run):
                picked = run
                break
        else:
            port = rng.choice(candidates)
            if port not in _handed_out and port not in picked and _bindable(port):
                picked.append(port)
                if len(picked) == count:
                    break
    else:
        raise RuntimeError(f"no {count} free TCP ports among {len(candidates)} candidates")
    _handed_out.update(picked)
    return picked
