"""Builds the relay's hot path compiled with mypyc (docs/decisions/0022-compiled-hot-path.md).

Everything else about the package is in pyproject.toml. The modules in ``COMPILED`` are plain,
strictly typed Python; mypyc (from the mypy pinned in ``[build-system] requires``) turns them into
C extensions that go into the wheel beside their sources, and Python imports the extension.

- ``RESCUE_PURE_PYTHON=1`` builds a pure-Python package (the same source, interpreted). ``./run``
  sets it for the editable dev install, so an edited module is never shadowed by a stale build.
- Without a C compiler the extensions are skipped with a warning and the package is pure Python:
  it works the same, only slower (``rescue --version`` says which one is installed).
"""

from __future__ import annotations

import os

from setuptools import setup

# The relay's per-message and per-heartbeat path: framing, the read poller, the connection's
# read-ahead and writes, the session core, the connection links and the counters they bump. Keep in step with
# rescue/_build.py (what `rescue --version` reports) -- tests/test_packaging.py checks both.
COMPILED = [
    "rescue/_clock.py",
    "rescue/websocket/_codec.py",
    "rescue/websocket/_poller.py",
    "rescue/websocket/_connection.py",
    "rescue/sessions/_core.py",
    "rescue/sessions/_link.py",
    "rescue/sessions/_stats.py",
]


def _extensions() -> list[object]:
    if os.environ.get("RESCUE_PURE_PYTHON") == "1":
        return []
    from mypyc.build import mypycify

    # Third-party types are left out on purpose (no site-packages, missing imports are Any): the
    # build env has none of the runtime dependencies, and the compiled code must not depend on
    # which are visible -- a call into trio is a Python call either way. Not the strict project
    # config either: that is `./run types`' job, on the same source, with every stub present.
    options = ["--config-file=", "--no-site-packages", "--ignore-missing-imports"]
    extensions = mypycify([*options, *COMPILED], opt_level="3", debug_level="1", group_name="rescue")
    for extension in extensions:
        extension.optional = True  # no compiler: a warning and the pure-Python package
    return extensions


setup(ext_modules=_extensions())
