"""The entry-point tail chaos/run.py and soak/run.py share: run, report, print, exit status."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

from chaos._fleet import FleetError
from chaos._report import write_json

__all__ = ["run_and_report"]

_C = TypeVar("_C")


def run_and_report(
    name: str,
    run: Callable[[_C], Awaitable[tuple[dict[str, Any], Path]]],
    config: _C,
    render_report: Callable[[dict[str, Any]], str],
    *,
    plots: Callable[[dict[str, Any], Path], object] | None = None,
) -> int:
    """Run a harness, write ``report.json``/``report.md`` (+ plots), print the table.

    Returns:
        0 when every target was met, 1 when one was missed, 2 when the harness itself could not run
        (the fleet did not start: the message names the failing process).
    """
    failure: FleetError | None = None
    try:
        report, out_dir = trio.run(run, config)
    except* FleetError as group:
        first = group.exceptions[0]
        failure = first if isinstance(first, FleetError) else FleetError(str(group))
    if failure is not None:
        print(f"{name}: error: {failure}", file=sys.stderr)
        return 2
    write_json(out_dir / "report.json", report)
    text = render_report(report)
    (out_dir / "report.md").write_text(text)
    if plots is not None:
        try:
            plots(report, out_dir)
        except Exception as exc:  # plots are a convenience; the verdict is in report.json
            print(f"{name}: plots not written: {exc}", file=sys.stderr)
    latest = out_dir.parent / "latest"
    with contextlib.suppress(OSError):
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(out_dir.name)
    print()
    print(text)
    print(f"report: {out_dir / 'report.json'}")
    return 0 if report["pass"] else 1
