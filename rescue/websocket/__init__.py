"""RFC 6455 WebSocket on trio streams, framed by hand for the relay's hot path.

Why hand-framed and not trio-websocket/wsproto: see ``docs/decisions/0001-websocket-data-path.md``.
SPEC §2 rules: binary messages only, no extensions (permessage-deflate is refused), a text or
oversize message is a ``PROTOCOL_ERROR`` (4010).

Server::

    async def handler(conn: WebSocketConnection) -> None:
        while True:
            for message in await conn.receive_messages():   # a batch: all complete messages of one read
                ...
            await conn.send_messages([reply1, reply2])     # one write for the whole batch

    await nursery.start(serve_websocket, handler, "127.0.0.1", 0)   # -> WebSocketServer (.port)

Client::

    async with await connect_websocket("ws://127.0.0.1:8080/v1/connect") as conn:
        await conn.send_message(b"...")

Public API:

* :func:`serve_websocket` ``(handler, host, port, *, path="/v1/connect", ssl_context=None,
  max_message=65536, handshake_timeout=10.0, accept_check=None, handler_nursery=None,
  cap=None, task_status)`` → ``started(WebSocketServer)``; ``accept_check(request, remote_addr) ->
  Rejection | None`` may refuse at HTTP level (e.g. ``Rejection(503, "draining", "…")``);
  ``cap`` (:class:`ConnectionCap`, counting into :class:`ConnectionStats`) bounds the open
  connections: past it a pending one (no upgrade or first message yet) is shed, or the newcomer
  refused with 503 ``server_busy``.
* :func:`connect_websocket` ``(url, *, ssl_context=None, max_message=65536, headers=())`` →
  :class:`WebSocketConnection`.
* :class:`WebSocketConnection`: ``receive_messages() -> list[bytes]``, ``send_messages(payloads)``,
  ``send_message(payload)``, ``close(code=1000, reason="")``, ``aclose()``, ``abort()``,
  ``statistics() -> ConnectionStatistics``, attributes ``remote_addr``, ``path``,
  ``request_headers``, ``client``, ``closed``; async context manager.
* Errors: :class:`WebSocketClosedError` (a :class:`rescue.errors.ConnectionClosedError` with the raw
  ``wire_code``), :class:`rescue.errors.ProtocolError` (code 4010) for bad framing,
  :class:`HandshakeError` (a ``ProtocolError`` with ``status``/``error``/``detail``) for a failed
  upgrade.
* Sans-I/O codec (no trio): :class:`FrameParser`, :class:`FrameBudget` (frames a connection may
  send, :class:`FrameFloodError` past it), events :class:`Ping` / :class:`Pong` /
  :class:`CloseFrameReceived` (binary messages are plain ``bytes``), serializers ``frame_binary``,
  ``frame_messages``, ``frame_parts``, ``frame_close``, ``frame_ping``, ``frame_pong``,
  ``build_frame``, and the handshake helpers ``parse_request``, ``switching_protocols``, ``error_response``,
  ``build_request``, ``parse_response``, ``find_head_end``, ``accept_key``, ``new_key``.
"""

from rescue.websocket._client import connect_websocket as connect_websocket
from rescue.websocket._codec import DEFAULT_MAX_MESSAGE as DEFAULT_MAX_MESSAGE
from rescue.websocket._codec import FRAME_BURST as FRAME_BURST
from rescue.websocket._codec import FRAME_BYTES as FRAME_BYTES
from rescue.websocket._codec import FRAME_RATE as FRAME_RATE
from rescue.websocket._codec import MAX_FRAGMENTS as MAX_FRAGMENTS
from rescue.websocket._codec import MAX_HANDSHAKE_SIZE as MAX_HANDSHAKE_SIZE
from rescue.websocket._codec import CloseFrameReceived as CloseFrameReceived
from rescue.websocket._codec import Event as Event
from rescue.websocket._codec import FrameBudget as FrameBudget
from rescue.websocket._codec import FrameFloodError as FrameFloodError
from rescue.websocket._codec import FrameParser as FrameParser
from rescue.websocket._codec import HandshakeError as HandshakeError
from rescue.websocket._codec import Opcode as Opcode
from rescue.websocket._codec import Ping as Ping
from rescue.websocket._codec import Pong as Pong
from rescue.websocket._codec import Rejection as Rejection
from rescue.websocket._codec import Request as Request
from rescue.websocket._codec import Response as Response
from rescue.websocket._codec import accept_key as accept_key
from rescue.websocket._codec import apply_mask as apply_mask
from rescue.websocket._codec import build_frame as build_frame
from rescue.websocket._codec import build_request as build_request
from rescue.websocket._codec import error_response as error_response
from rescue.websocket._codec import find_head_end as find_head_end
from rescue.websocket._codec import frame_binary as frame_binary
from rescue.websocket._codec import frame_close as frame_close
from rescue.websocket._codec import frame_messages as frame_messages
from rescue.websocket._codec import frame_parts as frame_parts
from rescue.websocket._codec import frame_ping as frame_ping
from rescue.websocket._codec import frame_pong as frame_pong
from rescue.websocket._codec import new_key as new_key
from rescue.websocket._codec import parse_request as parse_request
from rescue.websocket._codec import parse_response as parse_response
from rescue.websocket._codec import switching_protocols as switching_protocols
from rescue.websocket._connection import CLOSE_TIMEOUT as CLOSE_TIMEOUT
from rescue.websocket._connection import READ_SIZE as READ_SIZE
from rescue.websocket._connection import ConnectionStatistics as ConnectionStatistics
from rescue.websocket._connection import WebSocketClosedError as WebSocketClosedError
from rescue.websocket._connection import WebSocketConnection as WebSocketConnection
from rescue.websocket._poller import POLLER_AVAILABLE as POLLER_AVAILABLE
from rescue.websocket._poller import QUIET_RCVLOWAT as QUIET_RCVLOWAT
from rescue.websocket._poller import ReadPoller as ReadPoller
from rescue.websocket._server import DEFAULT_HANDSHAKE_TIMEOUT as DEFAULT_HANDSHAKE_TIMEOUT
from rescue.websocket._server import AcceptCheck as AcceptCheck
from rescue.websocket._server import ConnectionCap as ConnectionCap
from rescue.websocket._server import ConnectionStats as ConnectionStats
from rescue.websocket._server import Handler as Handler
from rescue.websocket._server import WebSocketServer as WebSocketServer
from rescue.websocket._server import serve_websocket as serve_websocket
