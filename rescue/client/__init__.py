"""The Python SDK for beach-rescue peers (SPEC §2, §9).

Public API::

    async with open_peer(api_url_or_token_provider, session_id, "host", passphrase) as peer:
        await peer.send(0, b"bytes")                 # blocks on backpressure (replay buffer full)
        await peer.send_control({"exit": 0})         # application CONTROL, in order with data
        msg = await peer.receive()                   # DataReceived(channel, data) | ControlReceived(data)
        await peer.drain()                           # everything sent was acknowledged
    # leaving the block sends CLOSE NORMAL (ends the session for both peers)

    grant = await TokenClient(api_url, session_id=..., role="guest")()   # POST /v1/fallback/token
    result = await FallbackLadder(...).run()                               # WebRTC → TURN → relay

The sans-I/O core (:class:`PeerCore`) is public too, for other I/O shells and for tests.
"""

from rescue.client._backoff import BackoffPolicy as BackoffPolicy
from rescue.client._core import ControlReceived as ControlReceived
from rescue.client._core import CoreStatistics as CoreStatistics
from rescue.client._core import DataReceived as DataReceived
from rescue.client._core import PeerCore as PeerCore
from rescue.client._ladder import Attempt as Attempt
from rescue.client._ladder import FallbackLadder as FallbackLadder
from rescue.client._ladder import LadderResult as LadderResult
from rescue.client._ladder import prefetched as prefetched
from rescue.client._peer import Connected as Connected
from rescue.client._peer import ConnectionEvent as ConnectionEvent
from rescue.client._peer import PartnerEvent as PartnerEvent
from rescue.client._peer import Peer as Peer
from rescue.client._peer import Reconnecting as Reconnecting
from rescue.client._peer import SessionClosed as SessionClosed
from rescue.client._peer import open_peer as open_peer
from rescue.client._tokens import DEFAULT_COHORT as DEFAULT_COHORT
from rescue.client._tokens import TokenClient as TokenClient
from rescue.client._tokens import TokenGrant as TokenGrant
from rescue.client._tokens import TokenProvider as TokenProvider
from rescue.client._tokens import TokenRequestError as TokenRequestError
from rescue.client._tokens import TokenServiceUnavailable as TokenServiceUnavailable
