"""Which package may import which: lower layers never import higher ones, and nothing sideways.

Read from the source (ast). ``rescue.testing`` sits on top of everything (test helpers start real
relays and peers); no production package imports it, and the client never imports the relay.
"""

from __future__ import annotations

import ast
import pathlib

import rescue

ROOT = pathlib.Path(rescue.__file__).parent
# The shared private modules at the top (_codes, _log, _http, _net, _tracing, _keyfiles) and errors are
# allowed everywhere; this maps each package to the other rescue packages it may import.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "websocket": set(),
    "guardrails": set(),
    "sessions": {"protocol"},
    "client": {"protocol", "websocket"},
    "relay": {"protocol", "websocket", "sessions", "guardrails"},
    "tokenservice": {"protocol", "guardrails"},
    "commands": {"protocol", "websocket", "sessions", "client", "relay", "guardrails", "tokenservice"},
    "testing": {"protocol", "websocket", "sessions", "client", "relay", "guardrails", "tokenservice"},
}


def _rescue_imports(path: pathlib.Path) -> set[str]:
    """The first component after ``rescue.`` of every absolute import (``rescue.relay._x`` → relay)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "rescue" and len(parts) > 1 and (ROOT / parts[1] / "__init__.py").exists():
                found.add(parts[1])  # a package (top-level modules: errors, cli, _log, ... are shared)
    return found


def test_every_package_is_in_the_map() -> None:
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(ALLOWED)


def test_no_package_imports_a_higher_or_sideways_one() -> None:
    offenders: dict[str, list[str]] = {}
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _rescue_imports(path) - allowed - {package}
            if bad:
                offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert offenders == {}


def test_the_checker_sees_a_sideways_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from rescue.relay._relay import x\nimport rescue.errors\nfrom rescue._log import y\n")
    assert _rescue_imports(bad) == {"relay"}
