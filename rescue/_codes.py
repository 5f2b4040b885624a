"""Close codes (SPEC §2) and what a client should do on each (re-exported by rescue.protocol)."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_CLOSE_REASON_BYTES",
    "Backoff",
    "ClientPolicy",
    "CloseCode",
    "clip_close_reason",
    "policy_for",
]

# 123 bytes: the most a WebSocket close frame can carry as its reason (125 - 2 code bytes), so the
# CLOSE body's reason and the WebSocket close reason are always the same text.
MAX_CLOSE_REASON_BYTES: Final = 123


def clip_close_reason(reason: str) -> str:
    """``reason`` cut to :data:`MAX_CLOSE_REASON_BYTES` UTF-8 bytes, never inside a character.

    The one place a close reason is clipped: the relay's refusals and session closes, the client's
    closes and the WebSocket close frame all go through it, so a CLOSE body and its close frame
    carry the same text.
    """
    data = reason.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return data[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


class CloseCode(enum.IntEnum):
    """WebSocket close codes, also carried as ``code`` in a CLOSE message body."""

    NORMAL = 1000
    SERVER_SHUTDOWN = 1012
    AUTH_FAILED = 4001
    TOKEN_EXPIRED = 4002
    GUARDRAIL_TRIPPED = 4003
    SESSION_MISMATCH = 4004
    WRONG_NODE = 4005
    HEARTBEAT_TIMEOUT = 4008
    RATE_LIMITED = 4009
    PROTOCOL_ERROR = 4010
    REPLACED = 4011
    PAIR_TIMEOUT = 4012
    PEER_GONE = 4013
    INTEGRITY_ERROR = 4014
    OVERLOADED = 4029


class Backoff(enum.Enum):
    """How long a client waits before it reconnects."""

    NONE = "none"  # reconnect at once
    NORMAL = "normal"  # exponential backoff with full jitter (base 250 ms, cap 30 s)
    LONG = "long"  # the same schedule started further up (rate limited)
    SERVER = "server"  # wait the ``reconnect_in_ms`` the server put in its CLOSE body


@dataclass(frozen=True, slots=True)
class ClientPolicy:
    """The client-policy column of the close-code table.

    Attributes:
        reconnect: whether the client tries again at all.
        new_token: whether it must fetch a fresh token (maybe naming another node) first.
        backoff: how long it waits before the attempt.
    """

    reconnect: bool
    new_token: bool = False
    backoff: Backoff = Backoff.NONE


_STOP = ClientPolicy(reconnect=False)

_POLICIES: dict[CloseCode, ClientPolicy] = {
    CloseCode.NORMAL: _STOP,
    CloseCode.SERVER_SHUTDOWN: ClientPolicy(reconnect=True, new_token=True, backoff=Backoff.SERVER),
    CloseCode.AUTH_FAILED: _STOP,
    CloseCode.TOKEN_EXPIRED: ClientPolicy(reconnect=True, new_token=True, backoff=Backoff.NONE),
    CloseCode.GUARDRAIL_TRIPPED: _STOP,
    CloseCode.SESSION_MISMATCH: _STOP,
    CloseCode.WRONG_NODE: ClientPolicy(reconnect=True, new_token=True, backoff=Backoff.NONE),
    CloseCode.HEARTBEAT_TIMEOUT: ClientPolicy(reconnect=True, backoff=Backoff.NORMAL),
    CloseCode.RATE_LIMITED: ClientPolicy(reconnect=True, backoff=Backoff.LONG),
    CloseCode.PROTOCOL_ERROR: _STOP,
    CloseCode.REPLACED: _STOP,
    CloseCode.PAIR_TIMEOUT: _STOP,
    CloseCode.PEER_GONE: _STOP,
    CloseCode.INTEGRITY_ERROR: _STOP,
    CloseCode.OVERLOADED: ClientPolicy(reconnect=True, new_token=True, backoff=Backoff.NORMAL),
}

# A transport that died without a close code (TCP reset, 1006) is retried with backoff: the relay
# or the network went away, which is exactly what reconnect-and-resume is for.
_ABNORMAL = ClientPolicy(reconnect=True, backoff=Backoff.NORMAL)


def policy_for(code: int | None) -> ClientPolicy:
    """What a client does after a connection closed with ``code``.

    Args:
        code: the close code received, or ``None`` when the transport died without one.
            Codes outside the table are treated like an abnormal closure (retry with backoff).
    """
    if code is None:
        return _ABNORMAL
    try:
        return _POLICIES[CloseCode(code)]
    except ValueError:
        return _ABNORMAL
