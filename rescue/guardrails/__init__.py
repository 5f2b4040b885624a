"""Guardrails: the store interface, its memory and Redis implementations, and the policy (SPEC §5, §7).

Public API::

    store = RedisStore("redis://127.0.0.1:6379/0")      # or MemoryStore() for `rescue dev`
    guardrails = Guardrails(store, GuardrailConfig.from_env())
    auth = await guardrails.authorize_token("beta", now=time.time())   # hint "ok" / "soft_breach"
    node = await guardrails.assign_node(session_id, ttl=300)           # NodeInfo or None

See docs/guardrails.md for the Redis layout and the rolling-window definition.
"""

from rescue.guardrails._deadline import Breaker as Breaker
from rescue.guardrails._deadline import store_deadline as store_deadline
from rescue.guardrails._memory import MemoryStore as MemoryStore
from rescue.guardrails._policy import STORE_UNINITIALISED_REASON as STORE_UNINITIALISED_REASON
from rescue.guardrails._policy import Authorization as Authorization
from rescue.guardrails._policy import GuardrailConfig as GuardrailConfig
from rescue.guardrails._policy import Guardrails as Guardrails
from rescue.guardrails._policy import GuardrailWindow as GuardrailWindow
from rescue.guardrails._policy import effective_fleet_state as effective_fleet_state
from rescue.guardrails._policy import missing_telemetry as missing_telemetry
from rescue.guardrails._redis import REDIS_THREADS as REDIS_THREADS
from rescue.guardrails._redis import TOKEN_SERVICE_REDIS_THREADS as TOKEN_SERVICE_REDIS_THREADS
from rescue.guardrails._redis import RedisStore as RedisStore
from rescue.guardrails._redis import initialise_redis as initialise_redis
from rescue.guardrails._store import COUNTER_TTL_S as COUNTER_TTL_S
from rescue.guardrails._store import PAUSE_CAUSES as PAUSE_CAUSES
from rescue.guardrails._store import CounterField as CounterField
from rescue.guardrails._store import FleetState as FleetState
from rescue.guardrails._store import GuardrailStore as GuardrailStore
from rescue.guardrails._store import HourCounts as HourCounts
from rescue.guardrails._store import NodeInfo as NodeInfo
from rescue.guardrails._store import TelemetryGap as TelemetryGap
from rescue.guardrails._store import WindowCounts as WindowCounts
from rescue.guardrails._store import check_cohort_id as check_cohort_id
from rescue.guardrails._store import check_node_id as check_node_id
from rescue.guardrails._store import counter_key as counter_key
from rescue.guardrails._store import hour_bucket as hour_bucket
from rescue.guardrails._store import rendezvous_pick as rendezvous_pick
from rescue.guardrails._store import rolling_window as rolling_window

__all__ = [
    "COUNTER_TTL_S",
    "PAUSE_CAUSES",
    "REDIS_THREADS",
    "STORE_UNINITIALISED_REASON",
    "TOKEN_SERVICE_REDIS_THREADS",
    "Authorization",
    "Breaker",
    "CounterField",
    "FleetState",
    "GuardrailConfig",
    "GuardrailStore",
    "GuardrailWindow",
    "Guardrails",
    "HourCounts",
    "MemoryStore",
    "NodeInfo",
    "RedisStore",
    "TelemetryGap",
    "WindowCounts",
    "check_cohort_id",
    "check_node_id",
    "counter_key",
    "effective_fleet_state",
    "hour_bucket",
    "initialise_redis",
    "missing_telemetry",
    "rendezvous_pick",
    "rolling_window",
    "store_deadline",
]
