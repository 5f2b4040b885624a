"""The relay's sessions: pairing, per-session nursery, forwarding pumps and flow control.

A :class:`Session` owns one nursery holding every task of both peer connections; a
:class:`PeerConn` is one peer's connection with its reader and writer pumps and bounded queues.
The relay node (:mod:`rescue.relay`) does the handshake and hands verified connections over.
"""

from rescue.sessions._config import DEFAULT_QUEUE_MAX_BYTES as DEFAULT_QUEUE_MAX_BYTES
from rescue.sessions._config import DEFAULT_QUEUE_MAX_FRAMES as DEFAULT_QUEUE_MAX_FRAMES
from rescue.sessions._config import SessionLimits as SessionLimits
from rescue.sessions._conn import RELAY_HEARTBEAT as RELAY_HEARTBEAT
from rescue.sessions._conn import PeerConn as PeerConn
from rescue.sessions._conn import websocket_close_code as websocket_close_code
from rescue.sessions._limits import HandshakeLimiter as HandshakeLimiter
from rescue.sessions._limits import TokenBucket as TokenBucket
from rescue.sessions._session import Session as Session
from rescue.sessions._session import SessionTable as SessionTable
from rescue.sessions._stats import FastHistogram as FastHistogram
from rescue.sessions._stats import RelayStats as RelayStats
from rescue.sessions._transport import TRANSPORT_ERRORS as TRANSPORT_ERRORS
from rescue.sessions._transport import Transport as Transport
