"""``rescue/errors.py`` documents the whole exception tree: every exception class rescue defines."""

from __future__ import annotations

import ast
import pathlib

import pytest

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


def test_unraised_copies_every_kind_of_kept_error() -> None:
    """``unraised`` (the fresh copy a kept error is raised as) keeps the type, ``args``, message and
    every attribute of each class rescue keeps and raises again, whose ``__init__`` parameters are
    mostly not its ``args`` -- and gives the copy no traceback, cause or context of its own."""
    from rescue._codes import CloseCode
    from rescue.client import TokenRequestError, TokenServiceUnavailable
    from rescue.errors import (
        BufferFull,
        ConnectionClosedError,
        GuardrailError,
        ProtocolError,
        StoreUnavailable,
        TokenError,
        unraised,
    )
    from rescue.protocol._crypto import DecryptError
    from rescue.websocket import WebSocketClosedError
    from rescue.websocket._codec import FrameFloodError, HandshakeError

    kept: list[Exception] = [
        GuardrailError("no_relay_available", "every node is full", reason="full"),
        TokenRequestError(401, "unauthenticated", "bad key"),
        TokenServiceUnavailable("unreachable", "ConnectError"),
        ConnectionClosedError(CloseCode.SESSION_MISMATCH, "gave up: mismatch"),
        ConnectionClosedError(None),
        WebSocketClosedError(4001, "bad token"),
        WebSocketClosedError(1001),
        ProtocolError("bad frame", CloseCode.INTEGRITY_ERROR, kind="protocol"),
        FrameFloodError("small_frames", "too many frames"),
        HandshakeError(503, "draining", "node draining", headers=(("Retry-After", "1"),)),
        DecryptError("frame failed authentication"),
        TokenError("expired", "token expired", CloseCode.TOKEN_EXPIRED),
        BufferFull(70000, 12),
        StoreUnavailable("guardrail store unavailable"),
    ]
    for error in kept:
        with pytest.raises(type(error)):  # raised once, as a kept error was before
            raise error from KeyError("cause")
        assert error.__traceback__ is not None
        error.add_note("seen once")
        copy = unraised(error)
        assert copy is not error
        assert type(copy) is type(error)
        assert (copy.args, str(copy), repr(copy)) == (error.args, str(error), repr(error))
        assert vars(copy) == vars(error)  # code, kind, reason, status, wire_code, headers, notes...
        assert (copy.__traceback__, copy.__cause__, copy.__context__) == (None, None, None)
        copy.add_note("raised again")
        assert error.__notes__ == ["seen once"]  # the kept one's own list
