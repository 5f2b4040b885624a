"""The relay's sessions: a sans-I/O session core and its trio shell (pairing, pumps, flow control).

:class:`SessionCore` (pure: messages and time in, actions out) decides everything a session
decides; :class:`Session` owns one nursery holding every task of both peer connections and
carries out the core's answers; a :class:`PeerLink` is one peer's connection with its reader and
writer pumps. The relay node (:mod:`rescue.relay`) does the handshake and hands verified
connections over.
"""

from rescue.sessions._config import DEFAULT_QUEUE_MAX_BYTES as DEFAULT_QUEUE_MAX_BYTES
from rescue.sessions._config import DEFAULT_QUEUE_MAX_FRAMES as DEFAULT_QUEUE_MAX_FRAMES
from rescue.sessions._config import SessionLimits as SessionLimits
from rescue.sessions._core import RELAY_HEARTBEAT as RELAY_HEARTBEAT
from rescue.sessions._core import Link as Link
from rescue.sessions._core import LivenessWheel as LivenessWheel
from rescue.sessions._core import SessionCore as SessionCore
from rescue.sessions._core import websocket_close_code as websocket_close_code
from rescue.sessions._limits import DEFAULT_MAX_SOURCES as DEFAULT_MAX_SOURCES
from rescue.sessions._limits import HandshakeLimiter as HandshakeLimiter
from rescue.sessions._limits import TokenBucket as TokenBucket
from rescue.sessions._link import PeerLink as PeerLink
from rescue.sessions._session import Session as Session
from rescue.sessions._session import SessionTable as SessionTable
from rescue.sessions._stats import FastHistogram as FastHistogram
from rescue.sessions._stats import RelayStats as RelayStats
from rescue.sessions._transport import TRANSPORT_ERRORS as TRANSPORT_ERRORS
from rescue.sessions._transport import Transport as Transport
