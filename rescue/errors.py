"""The exceptions rescue raises, as one tree.

::

    RescueError                         base of everything rescue raises on purpose
    ├── ProtocolError                   bad bytes from a peer; carries the close code to answer with
    │   ├── DecryptError                a frame failed authentication (INTEGRITY_ERROR)  protocol/_crypto.py
    │   ├── FrameFloodError             too many frames for their bytes (kind)           websocket/_codec.py
    │   └── HandshakeError              the HTTP upgrade failed (status, error, detail)  websocket/_codec.py
    ├── TokenError                      a fallback token failed verification; a reason and a close code
    ├── ConfigError                     bad settings, key files or command-line values (one-line message)
    │   └── MintError (+ ValueError)    mint arguments the contract forbids              protocol/_tokens.py
    ├── GuardrailError                  the guardrails refused (paused, cohort disabled, not entitled)
    ├── StoreUnavailable                the guardrail store (Redis) could not be read or written
    ├── BufferFull                      the sender's replay buffer is full: backpressure, not a fault
    ├── ConnectionClosedError           a relay connection ended; carries the close code and reason
    │   └── WebSocketClosedError        ... with the close code as received  websocket/_connection.py
    ├── EntitlementError                an entitlement proof (OIDC JWT) was refused      tokenservice/_oidc.py
    ├── OidcUnavailable                 the entitlement JWKS could not be fetched (503)  tokenservice/_oidc.py
    ├── TokenRequestError               the token service refused a request (4xx)       client/_tokens.py
    └── TokenServiceUnavailable         no token right now (network, timeout, 5xx)      client/_tokens.py

The classes without a path are defined here; the others next to the code that raises them (and
re-exported by their package). ``tests/test_errors.py`` checks that this tree lists every one.
(``rescue._http.JsonError`` and ``rescue._http1.HttpError`` are not errors of rescue's: they are
how an HTTP handler, and the HTTP server's parser, ask for a JSON error answer, and never leave the
HTTP layer. Nor is ``rescue.guardrails._resp.RespProtocolError``: the native Redis client turns it
into a dropped connection and an outage, i.e. :class:`StoreUnavailable`; nor its
``rescue.guardrails._native.ConnectionLost``, a redis-py ``ConnectionError`` for a connection lost
after a round trip went out, which the store turns into :class:`StoreUnavailable` too.)

Every error that crosses an I/O boundary is translated into one of these there, so callers never see
a ``KeyError`` from a malformed CBOR map or a ``struct.error`` from a short header.
"""

from __future__ import annotations

from typing import TypeVar

from rescue._codes import CloseCode

__all__ = [
    "BufferFull",
    "ConfigError",
    "ConnectionClosedError",
    "GuardrailError",
    "ProtocolError",
    "RescueError",
    "StoreUnavailable",
    "TokenError",
]

_E = TypeVar("_E", bound=BaseException)


class RescueError(Exception):
    """Base class of every error rescue raises on purpose."""


class ProtocolError(RescueError):
    """A peer sent bytes that break the wire protocol.

    Attributes:
        code: the close code the connection must be closed with (``PROTOCOL_ERROR`` unless a more
            specific one applies, e.g. ``INTEGRITY_ERROR`` or ``SESSION_MISMATCH``).
        kind: a short stable label for metrics: ``"protocol"`` for any broken rule, or what a
            flood was made of (``"fragments"``, ``"small_frames"``: see the WebSocket codec).
    """

    def __init__(
        self, message: str, code: CloseCode = CloseCode.PROTOCOL_ERROR, *, kind: str = "protocol"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.kind = kind


class TokenError(RescueError):
    """A fallback token failed verification.

    Attributes:
        reason: a short stable machine-readable reason, e.g. ``"bad_signature"``, ``"expired"``,
            ``"unknown_kid"``, ``"not_yet_valid"``, ``"lifetime_too_long"``, ``"wrong_audience"``,
            ``"malformed"``.
        code: the close code a relay answers with (``AUTH_FAILED`` or ``TOKEN_EXPIRED``).
    """

    def __init__(self, reason: str, message: str, code: CloseCode = CloseCode.AUTH_FAILED) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class ConfigError(RescueError):
    """Settings, key files or command-line values are unusable."""


class GuardrailError(RescueError):
    """The guardrails refused the request.

    Attributes:
        error: the SPEC §4 error code (``fallback_paused``, ``cohort_disabled``, ``not_entitled``,
            ``no_relay_available``).
        reason: for ``no_relay_available``, why: ``none`` (no node registered), ``draining``
            (every node is), ``full`` (every node is full or draining); None otherwise.
    """

    def __init__(self, error: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.reason = reason


class StoreUnavailable(RescueError):
    """The guardrail store could not be reached; callers fail closed."""


class ConnectionClosedError(RescueError):
    """A relay connection ended.

    Attributes:
        code: the close code received (or chosen locally when the transport died: ``None``).
        reason: the reason text from the CLOSE message or WebSocket close frame.
    """

    def __init__(self, code: CloseCode | None, reason: str = "") -> None:
        name = code.name if code is not None else "ABNORMAL"
        super().__init__(f"connection closed: {name} {reason}".rstrip())
        self.code = code
        self.reason = reason


class BufferFull(RescueError):
    """The replay buffer has no room for this frame yet: backpressure, not an error of the peer.

    The caller blocks its application until ``Sender.ack`` (or ``Sender.resume``) frees
    enough space, then calls ``Sender.send`` again; nothing was recorded and no sequence number
    was used.

    Attributes:
        needed: bytes the frame would take in the buffer (payload + ``FRAME_OVERHEAD_BYTES``).
        available: bytes free right now.
    """

    def __init__(self, needed: int, available: int) -> None:
        super().__init__(f"replay buffer full: frame needs {needed} bytes, {available} free")
        self.needed = needed
        self.available = available


def unraised(error: _E) -> _E:
    """A new exception equal to ``error`` (type, ``args``, attributes), never raised: for code
    that keeps an error to raise or hand out again.

    Raising a kept instance gives it a traceback; every further raise adds its frames to that
    traceback, and the first of them hold the keeper (``self``) that holds the error: a reference
    cycle, which keeps those frames and all they hold (the caller's stack, a connection, a peer
    and the application's callbacks) until a full pass of the cycle collector, rare in a process
    with a large heap (docs/perf/soak.md). A fresh copy for each raise has no traceback, cause or
    context of its own until it is raised, and nobody keeps it. Keep a copy too (``unraised(exc)``
    of an error just caught): the caught one's traceback already holds the frame that caught it.

    Works for any exception whose state is its ``args`` and its instance attributes (every
    exception class of rescue's, redis-py's): the copy is made without calling ``__init__``, whose
    parameters are not ``args`` (``GuardrailError(error, message)`` keeps only ``message`` there),
    so ``copy.copy`` (which calls ``type(error)(*error.args)``) would not do. Attributes are set
    one by one: an instance of a class compiled by mypyc makes its ``__dict__`` on first use.
    """
    cls = type(error)
    fresh = cls.__new__(cls, *error.args)
    for name, value in vars(error).items():
        # add_note() appends to __notes__: the copy gets its own list
        setattr(fresh, name, list(value) if name == "__notes__" else value)
    return fresh
