"""Helpers for tests — ours and Beach integrators' — that run the real thing on 127.0.0.1.

A package of its own, on top of every production package (``_relay.py``: keys, a HELLO-speaking
peer, a test relay; ``_sdk.py``: local tokens, a restartable relay, a dev stack; ``_hostile.py``: a
raw client that sends malformed bytes and floods; ``_process.py``: a real ``rescue dev`` process): no
production package imports test helpers, and none imports another sideways to build them.

Nothing here fakes the relay, the token service or the sockets: these start real ones in-process
(ports 0) and give you peers to drive them with. A server that must be told its port in advance
(a Redis Cluster, a supervisor's fixed ports) takes it from ``free_tcp_ports()``: outside the
kernel's ephemeral range and, under pytest-xdist, from this worker's own share of the ports.

Relay level (no encryption; the relay forwards bodies byte for byte)::

    keys = TestKeys()
    relay = Relay(relay_test_config(), keys=keys.ring)
    addresses = await nursery.start(relay.run)
    host = await TestPeer.connect(addresses.url, keys, session="s1", role="host")

SDK level (real end-to-end encrypted peers, lossless resume)::

    async with run_dev_stack() as stack, open_peer(stack.api_url, "s1", "host", psk=TEST_PSK) as peer:
        ...
        await stack.relay.restart()          # peers reconnect and resume
        abort_connection(peer)               # kill one peer's socket under it

The guardrail store has an in-memory implementation (:class:`rescue.guardrails.MemoryStore`) that
passes the same contract tests as Redis; tests of what Redis promises use a private real
``redis-server`` (see ``tests/conftest.py``).
"""

from rescue.testing._hostile import RawClient as RawClient
from rescue.testing._hostile import RawOutcome as RawOutcome
from rescue.testing._ports import free_tcp_ports as free_tcp_ports
from rescue.testing._process import RESCUE_CLI as RESCUE_CLI
from rescue.testing._process import DevProcess as DevProcess
from rescue.testing._process import run_dev_process as run_dev_process
from rescue.testing._process import start_dev_process as start_dev_process
from rescue.testing._relay import ClosedBy as ClosedBy
from rescue.testing._relay import TestKeys as TestKeys
from rescue.testing._relay import TestPeer as TestPeer
from rescue.testing._relay import peer_conn as peer_conn
from rescue.testing._relay import relay_test_config as relay_test_config
from rescue.testing._relay import seq_frame as seq_frame
from rescue.testing._relay import start_test_relay as start_test_relay
from rescue.testing._sdk import TEST_PSK as TEST_PSK
from rescue.testing._sdk import DevStack as DevStack
from rescue.testing._sdk import LocalTokens as LocalTokens
from rescue.testing._sdk import RelayRunner as RelayRunner
from rescue.testing._sdk import abort_connection as abort_connection
from rescue.testing._sdk import run_dev_stack as run_dev_stack
from rescue.testing._sdk import run_relay as run_relay
from rescue.testing._tls import SelfSignedTLS as SelfSignedTLS
