"""Socket-level pieces the two servers share: the WebSocket listener (``rescue/websocket/_server.py``)
and the HTTP server (``rescue/_http.py``, decision 0017).

- :func:`accept_in_bursts`: the accept loop, taking up to :data:`ACCEPT_BATCH` waiting connections
  per wake-up;
- :func:`refuse_at_once`: answer a connection turned away over a connection cap, and close it,
  inside the accept loop (no task, no wait).
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from typing import Final

import trio

__all__ = [
    "ACCEPT_BATCH",
    "ACCEPT_CAPACITY_ERRNOS",
    "ACCEPT_RETRY_S",
    "REFUSAL_READ",
    "accept_in_bursts",
    "refuse_at_once",
]

# Connections the accept loop takes per wake-up, without a checkpoint between them. One accept per
# pass of trio's run loop (what SocketListener.accept does: a checkpoint after each) left the last
# of a burst of new connections -- a reconnect storm opens hundreds at once -- waiting behind
# hundreds of passes of request work: the tail of the token storm benchmark at concurrency 256 (P90
# 239 ms, P99 531; docs/perf/tokenservice.md), a dead relay's peers arriving at another node.
ACCEPT_BATCH: Final = 64
# accept() errors that mean "out of descriptors/memory for now": the loop tells its server (which
# counts and logs them), waits ACCEPT_RETRY_S and tries again instead of dying, as
# trio.serve_listeners does (and with its 0.1 s).
ACCEPT_CAPACITY_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
ACCEPT_RETRY_S: Final = 0.1
# accept() errors about one connection that is already gone (a reset before it was taken; on Linux
# a pending network error of the new socket, accept(2)): skip it, as trio's SocketListener does
_ACCEPT_SKIP_ERRNOS: Final = frozenset(
    getattr(errno, name)
    for name in (
        "EPERM", "ECONNABORTED", "ECONNRESET", "ETIMEDOUT", "EPROTO", "ENETDOWN", "ENOPROTOOPT",
        "EHOSTDOWN", "ENONET", "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH",
    )
    if hasattr(errno, name)
)  # fmt: skip

# What a refusal reads (and drops) of what a client already sent: a whole upgrade request (8 KiB at
# most), or an HTTP request with a body as large as the HTTP server's receive (more than that seldom
# arrives before the accept loop takes the connection).
REFUSAL_READ: Final = 64 * 1024
# Where it goes: one buffer, written and never read (servers in two threads may both write it).
_DISCARD: Final = bytearray(REFUSAL_READ)


async def accept_in_bursts(
    listener: socket.socket,
    take: Callable[[socket.socket], None],
    accept_failed: Callable[[OSError], None],
) -> None:
    """Accept connections forever: wait until ``listener`` has some, then take up to
    :data:`ACCEPT_BATCH` of them without a checkpoint, each handed to ``take``.

    ``take`` runs in the loop, before the next accept: it starts the connection's task, or turns
    the connection away there and then (:func:`refuse_at_once`), so that a burst never holds more
    sockets than its server's cap.

    Args:
        listener: a listening, **non-blocking** stdlib socket.
        take: called with each accepted (blocking) stdlib socket; it owns the socket from then on.
        accept_failed: called when ``accept()`` runs out of fds or memory
            (:data:`ACCEPT_CAPACITY_ERRNOS`), before the loop waits :data:`ACCEPT_RETRY_S` and
            tries again; it counts and logs.

    Raises:
        OSError: an ``accept()`` error that is neither about resources nor about one connection
            already gone (those are skipped).
    """
    while True:
        await trio.lowlevel.wait_readable(listener)
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in _ACCEPT_SKIP_ERRNOS:
                    continue
                if exc.errno not in ACCEPT_CAPACITY_ERRNOS:
                    raise
                accept_failed(exc)
                await trio.sleep(ACCEPT_RETRY_S)
                break
            take(conn)


def refuse_at_once(sock: socket.socket | trio.socket.SocketType, answer: bytes) -> None:
    """Answer a newcomer over a connection cap and close its socket, without a task or a wait.

    A task would run only after the accept loop's burst (and maybe its next ones), the refused
    sockets held meanwhile: past the cap, which bounds the process's descriptors. What already
    arrived of the request is read and dropped first (unread input makes ``close()`` a reset, which
    can destroy the answer before the client reads it); ``answer`` (a few hundred bytes into a fresh
    socket's empty buffer; ``b""``: none, as for a TLS client) is written without blocking.

    Args:
        sock: the accepted socket: a trio one (non-blocking), or a stdlib one (made non-blocking
            here: on Linux, ``accept()`` gives a blocking socket even from a non-blocking listener).
        answer: the bytes to write before the close.

    Resource handling:
        ``sock`` is always closed. A peer that is gone already, or a full buffer, is no error: the
        close is the answer then.
    """
    try:
        if isinstance(sock, socket.socket):
            sock.setblocking(False)
        fd = sock.fileno()
        try:
            os.readv(fd, [_DISCARD])
        except BlockingIOError:
            pass
        if answer:
            os.write(fd, answer)
    except OSError:
        pass
    finally:
        sock.close()
