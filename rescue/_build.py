"""Which build of the relay's hot path is installed: compiled by mypyc, or pure Python.

The wheel carries the modules of :data:`HOT_PATH` as C extensions compiled from their own source
(setup.py, ``docs/decisions/0022-compiled-hot-path.md``); an editable checkout, a build without a
C compiler, or ``RESCUE_PURE_PYTHON=1`` runs the same source interpreted. Both behave alike; the
compiled one takes less CPU per message. ``rescue --version``, the relay's start-up log line,
``/debug/stats`` and ``/metrics`` (``beach_rescue_build_info{hot_path}``) say which one runs, so an
operator comparing nodes knows what they compare.

Found by looking at files, not by importing (``--version`` must stay cheap): Python's import
system prefers an extension module to a ``.py`` of the same name in the same folder.
"""

from __future__ import annotations

from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Final

__all__ = ["COMPILED", "HOT_PATH", "PARTLY", "PURE", "compiled_modules", "describe", "kind"]

# Keep in step with setup.py's COMPILED (tests/test_packaging.py checks both).
HOT_PATH: Final = (
    "rescue._clock",
    "rescue.websocket._codec",
    "rescue.websocket._poller",
    "rescue.websocket._connection",
    "rescue.sessions._core",
    "rescue.sessions._link",
    "rescue.sessions._stats",
)
_ROOT: Final = Path(__file__).resolve().parent.parent
# kind()'s answers: the relay's beach_rescue_build_info{hot_path} label values.
COMPILED: Final = "compiled"
PURE: Final = "pure"
PARTLY: Final = "partly"


def compiled_modules() -> list[str]:
    """The modules of :data:`HOT_PATH` installed as compiled extensions."""
    found = []
    for name in HOT_PATH:
        stem = _ROOT.joinpath(*name.split("."))
        if any(stem.with_name(stem.name + suffix).is_file() for suffix in EXTENSION_SUFFIXES):
            found.append(name)
    return found


def kind() -> str:
    """:data:`COMPILED`, :data:`PURE` or :data:`PARTLY` (some modules compiled, not all: a broken
    install) -- :func:`describe` as one word, for a metric label."""
    return _kind(len(compiled_modules()))


def describe() -> str:
    """``"compiled (mypyc)"``, ``"pure Python"``, or what is odd about it (``"partly compiled: 3/6"``)."""
    n = len(compiled_modules())
    return _WORDS.get(_kind(n), f"partly compiled: {n}/{len(HOT_PATH)}")


_WORDS: Final = {COMPILED: "compiled (mypyc)", PURE: "pure Python"}


def _kind(compiled: int) -> str:
    if compiled == len(HOT_PATH):
        return COMPILED
    return PURE if compiled == 0 else PARTLY
