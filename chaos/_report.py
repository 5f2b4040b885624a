"""Shared report helpers for chaos/ and soak/: durations, text tables, output files, plot set-up."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "fmt_duration",
    "machine_info",
    "parse_duration",
    "render_table",
    "write_json",
]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` or plain seconds → seconds.

    Raises:
        ValueError: anything else, or a duration that is not positive.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 10m, 2h)")
    seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return seconds


def fmt_duration(seconds: float) -> str:
    """Seconds as ``1h02m``, ``3m05s`` or ``42.0s``."""
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (also readable as plain text), columns padded to width."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on (the machine is shared: load matters)."""
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def write_json(path: Path, doc: Any) -> None:
    """Write ``doc`` as indented JSON."""
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")


def render_targets(targets: Sequence[dict[str, Any]]) -> str:
    """The PASS/FAIL table both harnesses end their report with."""
    return render_table(
        ["target", "required", "measured", "verdict"],
        [[t["name"], t["target"], t["value"], "PASS" if t["pass"] else "FAIL"] for t in targets],
    )


def parse_duration_pair(text: str) -> tuple[float, float]:
    """``"0.5s,4s"`` → ``(0.5, 4.0)``; one value means both ends (``"2s"`` → ``(2.0, 2.0)``)."""
    lo, _, hi = text.partition(",")
    a, b = parse_duration(lo), parse_duration(hi or lo)
    if a > b:
        raise ValueError(f"min above max in {text!r}")
    return a, b
