"""What a session needs from a peer's connection: a batch-oriented binary message transport.

:class:`rescue.websocket.WebSocketConnection` satisfies it; tests may plug in anything else that does.
"""

from __future__ import annotations

from typing import Final, Protocol

import trio

from rescue.errors import ConnectionClosedError

__all__ = ["TRANSPORT_ERRORS", "Transport"]

# Everything a transport raises when the other end is gone or the socket is unusable. A
# ProtocolError (bad bytes) is not in here: it closes the connection with its own code.
TRANSPORT_ERRORS: Final = (ConnectionClosedError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class Transport(Protocol):
    """A message transport with one reader and one writer task.

    ``receive_messages`` returns every complete message one read produced (never an empty list at
    end of stream: it raises instead); ``send_messages`` writes a list of messages in one write;
    ``close`` performs a bounded-by-the-caller closing handshake; ``abort`` drops the socket now.

    ``send_nowait`` writes at once without waiting, from any task, but only while no send is in
    progress or pending (else it returns False and writes nothing). A partial write keeps its tail
    (``has_unsent``), which the next ``send_messages`` writes first; a transport that cannot write
    without waiting simply returns False.

    ``set_quiet`` is a hint: only heartbeats arrive lately (the transport may look at the socket
    less often) or data flows again; a transport without such a mode ignores it.
    """

    async def receive_messages(self) -> list[bytes]: ...

    async def send_messages(self, messages: list[bytes]) -> None: ...

    def send_nowait(self, messages: list[bytes]) -> bool: ...

    @property
    def has_unsent(self) -> bool: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...

    def abort(self) -> None: ...

    def set_quiet(self, quiet: bool) -> None: ...
