"""Process and machine sampling from /proc (Linux): CPU seconds, RSS, machine busy time, load."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Final

CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return 0.0
    # Fields after the command name (which may contain spaces) start at "state" (field 3).
    fields = stat[stat.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``); 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass(frozen=True)
class MachineCpu:
    """Cumulative machine CPU time (all cores) from /proc/stat, in clock ticks."""

    busy: int
    total: int

    @classmethod
    def read(cls) -> MachineCpu:
        with open("/proc/stat", "rb") as f:
            parts = [int(x) for x in f.readline().split()[1:]]
        idle = parts[3] + (parts[4] if len(parts) > 4 else 0)  # idle + iowait
        total = sum(parts[:8])  # guest time is already counted in user
        return cls(total - idle, total)

    def busy_cores_since(self, earlier: MachineCpu) -> float:
        """Average number of busy cores between ``earlier`` and this sample."""
        dt = self.total - earlier.total
        if dt <= 0:
            return 0.0
        return (self.busy - earlier.busy) / dt * (os.cpu_count() or 1)


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return round(one, 2), round(five, 2), round(fifteen, 2)
