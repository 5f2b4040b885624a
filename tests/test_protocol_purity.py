"""The protocol core is sans-I/O: no module under rescue/protocol imports trio or does I/O."""

from __future__ import annotations

import ast
import pathlib

import rescue.protocol

FORBIDDEN = {"trio", "trio_websocket", "socket", "asyncio", "httpx", "redis", "anyio", "ssl"}


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_protocol_package_imports_no_io_library() -> None:
    root = pathlib.Path(rescue.protocol.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert files, "protocol package not found"
    offenders = {str(f.relative_to(root)): sorted(_imports(f) & FORBIDDEN) for f in files}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_checker_catches_a_trio_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio.lowlevel\nfrom socket import socket\n")
    assert _imports(bad) & FORBIDDEN == {"trio", "socket"}
