"""Process sampling from /proc (Linux): resident memory, open file descriptors, threads, CPU."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

__all__ = ["ProcSample", "loadavg", "sample"]

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class ProcSample:
    """One look at a process; every field is 0 when the process is gone.

    Attributes:
        rss_kb: resident set size (``VmRSS``), KiB.
        fds: open file descriptors (entries in ``/proc/PID/fd``).
        threads: OS threads (``Threads``).
        cpu_s: user + system CPU seconds so far.
    """

    rss_kb: int
    fds: int
    threads: int
    cpu_s: float


def sample(pid: int) -> ProcSample:
    """Read ``pid``'s memory, descriptors, threads and CPU time (zeros if it has exited)."""
    rss = threads = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith(b"Threads:"):
                    threads = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (OSError, ValueError):
        return ProcSample(0, 0, 0, 0.0)
    # Fields after the command name (which may contain spaces and parentheses) start at field 3.
    fields = stat[stat.rindex(b")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return ProcSample(rss, fds, threads, cpu)


def loadavg() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages."""
    return os.getloadavg()
