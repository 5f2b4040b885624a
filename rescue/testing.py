"""Helpers for tests — ours and Beach integrators' — that run the real thing on 127.0.0.1.

Nothing here fakes the relay, the token service or the sockets: these start real ones in-process
(ports 0) and give you peers to drive them with.

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

from rescue.client._testing import TEST_PSK as TEST_PSK
from rescue.client._testing import DevStack as DevStack
from rescue.client._testing import LocalTokens as LocalTokens
from rescue.client._testing import RelayRunner as RelayRunner
from rescue.client._testing import abort_connection as abort_connection
from rescue.client._testing import run_dev_stack as run_dev_stack
from rescue.client._testing import run_relay as run_relay
from rescue.relay._testing import ClosedBy as ClosedBy
from rescue.relay._testing import TestKeys as TestKeys
from rescue.relay._testing import TestPeer as TestPeer
from rescue.relay._testing import relay_test_config as relay_test_config
