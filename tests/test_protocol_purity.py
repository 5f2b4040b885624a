"""The pure cores are sans-I/O: no I/O library imported, no file, clock or process call made.

Checked by reading the source (ast), for ``rescue/protocol/`` (the wire protocol, tokens, crypto)
and the two state machines built on it: the relay's ``rescue/sessions/_core.py`` and the
client's ``rescue/client/_core.py``.
"""

from __future__ import annotations

import ast
import pathlib

import rescue.protocol

FORBIDDEN = {"trio", "trio_websocket", "socket", "asyncio", "httpx", "redis", "anyio", "ssl", "subprocess"}
# Calls that do I/O or read a clock, by the name called (a builtin, or a method/function name):
# files (open, Path.open/read_text/...), the process's streams, and clocks (pure code takes time
# as an argument). os.urandom stays allowed: minting needs fresh randomness, and it touches no
# state a test could observe.
FORBIDDEN_CALLS = {
    "open",
    "read_text",
    "read_bytes",
    "write_text",
    "write_bytes",
    "input",
    "print",
    "time",
    "monotonic",
    "perf_counter",
    "sleep",
    "current_time",
    "listdir",
    "scandir",
    "stat",
    "unlink",
    "remove",
    "makedirs",
    "mkdir",
    "system",
    "popen",
    "getenv",
}
ROOT = pathlib.Path(rescue.protocol.__file__).parent.parent
PURE = sorted(
    [*(ROOT / "protocol").rglob("*.py"), ROOT / "sessions" / "_core.py", ROOT / "client" / "_core.py"]
)


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _looks_like_file_open(call: ast.Call) -> bool:
    """``x.open()`` or ``x.open("rb", ...)``: a file's (Path.open) signature, not a cipher's."""
    if not call.args:
        return True
    first = call.args[0]
    return isinstance(first, ast.Constant) and isinstance(first.value, str)


def _calls(path: pathlib.Path) -> set[str]:
    """Names of every call in the file: ``open(...)`` → open, ``p.read_text()`` → read_text."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                names.add(func.id)
            elif isinstance(func, ast.Attribute):
                if func.attr == "open" and not _looks_like_file_open(node):
                    continue  # e.g. FrameCipher.open(header, body): AEAD decryption, not a file
                names.add(func.attr)
    return names


def test_pure_modules_import_no_io_library() -> None:
    assert len(PURE) > 5, "protocol package not found"
    offenders = {str(f.relative_to(ROOT)): sorted(_imports(f) & FORBIDDEN) for f in PURE}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_pure_modules_make_no_io_or_clock_call() -> None:
    offenders = {str(f.relative_to(ROOT)): sorted(_calls(f) & FORBIDDEN_CALLS) for f in PURE}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_checker_catches_a_trio_import(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import trio.lowlevel\nfrom socket import socket\n")
    assert _imports(bad) & FORBIDDEN == {"trio", "socket"}


def test_checker_catches_file_and_clock_calls(tmp_path: pathlib.Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom pathlib import Path\n"
        "def f(p):\n    with open(p) as fh:\n        fh.read()\n"
        "    Path(p).read_text()\n    Path(p).open('rb')\n    cipher.open(h, body)\n"
        "    return time.monotonic()\n"
    )
    assert _calls(bad) & FORBIDDEN_CALLS == {"open", "read_text", "monotonic"}
    only_cipher = tmp_path / "cipher.py"
    only_cipher.write_text("def f(cipher, h, body):\n    return cipher.open(h, body)\n")
    assert _calls(only_cipher) & FORBIDDEN_CALLS == set()
    path_open = tmp_path / "path_open.py"
    path_open.write_text("def f(p):\n    return p.open('rb')\n")
    assert _calls(path_open) & FORBIDDEN_CALLS == {"open"}
