"""``rescue/errors.py`` documents the whole exception tree: every exception class rescue defines."""

from __future__ import annotations

import ast
import pathlib

import rescue
import rescue.errors

ROOT = pathlib.Path(rescue.__file__).parent
# Not errors of rescue's: an HTTP handler's way to ask for a JSON error answer (see errors.py), and
# the probe's private "this step failed" signal, which never leaves probe_once (commands/probe.py).
NOT_IN_THE_TREE = {"HttpError", "JsonError", "RespProtocolError", "_Failed", "_Incomplete"}


def _exception_classes() -> dict[str, str]:
    """Every class whose bases name an exception (by the naming rule: ...Error, ...Exception, or a
    class already found), with the file it lives in."""
    bases_of: dict[str, tuple[list[str], str]] = {}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ClassDef):
                names = [
                    b.id if isinstance(b, ast.Name) else b.attr
                    for b in node.bases
                    if isinstance(b, ast.Name | ast.Attribute)
                ]
                bases_of[node.name] = (names, str(path.relative_to(ROOT)))
    found: dict[str, str] = {}
    changed = True
    while changed:
        changed = False
        for name, (bases, where) in bases_of.items():
            if name in found:
                continue
            if any(b in ("Exception", "ValueError", "RuntimeError") or b in found for b in bases):
                found[name] = where
                changed = True
    return found


def test_the_docstring_tree_lists_every_exception_class() -> None:
    classes = _exception_classes()
    assert len(classes) >= 16
    doc = rescue.errors.__doc__ or ""
    missing = sorted(
        name
        for name in classes
        if name not in NOT_IN_THE_TREE and f" {name} " not in doc.replace("(", " ").replace("\n", " \n")
    )
    assert missing == []
