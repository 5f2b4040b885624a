"""Socket-level pieces the two servers share: the WebSocket listener (``rescue/websocket/_server.py``)
and the HTTP server (``rescue/_http.py``, decision 0017).

- :func:`refuse_at_once`: answer a connection turned away over a connection cap, and close it,
  inside the accept loop (no task, no wait).
"""

from __future__ import annotations

import os
import socket
from typing import Final

import trio

__all__ = ["REFUSAL_READ", "refuse_at_once"]

# What a refusal reads (and drops) of what a client already sent: a whole upgrade request (8 KiB at
# most), or an HTTP request with a body as large as the HTTP server's receive (more than that seldom
# arrives before the accept loop takes the connection).
REFUSAL_READ: Final = 64 * 1024
# Where it goes: one buffer, written and never read (servers in two threads may both write it).
_DISCARD: Final = bytearray(REFUSAL_READ)


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
