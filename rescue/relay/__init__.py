"""The relay node (SPEC §2 "Relay behaviour", §6-§8, §11 ``rescue relay``).

::

    relay = Relay(RelayConfig(keys="jwks.json", port=0, admin_port=0))
    async with trio.open_nursery() as nursery:
        addresses = await nursery.start(relay.run)      # RelayAddresses(host, port, admin_port, url)
        ...
        await relay.drain()                              # CLOSE SERVER_SHUTDOWN to everyone, then stop
"""

from rescue.relay._config import DEFAULT_ADMIN_PORT as DEFAULT_ADMIN_PORT
from rescue.relay._config import DEFAULT_FD_RESERVE as DEFAULT_FD_RESERVE
from rescue.relay._config import DEFAULT_PORT as DEFAULT_PORT
from rescue.relay._config import MIN_CONNECTIONS as MIN_CONNECTIONS
from rescue.relay._config import RelayConfig as RelayConfig
from rescue.relay._control import ControlLink as ControlLink
from rescue.relay._control import KeySource as KeySource
from rescue.relay._control import NodeRegistrar as NodeRegistrar
from rescue.relay._gc import GC_THRESHOLDS as GC_THRESHOLDS
from rescue.relay._gc import GcPauses as GcPauses
from rescue.relay._gc import tune_gc as tune_gc
from rescue.relay._metrics import RelayMetrics as RelayMetrics
from rescue.relay._relay import Relay as Relay
from rescue.relay._relay import RelayAddresses as RelayAddresses
from rescue.relay._supervisor import Supervisor as Supervisor
from rescue.relay._supervisor import node_specs as node_specs
