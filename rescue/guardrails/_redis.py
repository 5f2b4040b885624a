"""The Redis guardrail store: a trio-native client for one server, redis-py in worker threads else.

Each operation builds its round trip as a list of steps (a command, or a Lua script by SHA) and
hands it to one of two transports: for a plain ``redis://`` or ``unix://`` server the trio-native
RESP client (``_native``, decision 0020: no thread hop per call); for TLS, a Cluster or a Sentinel
redis-py's sync client in a worker thread (``redis-py``'s asyncio client does not run on trio,
decision 0003). Each operation is one round trip (a command, a Lua script or a plain pipeline of
them), so its atomicity never depends on two calls cooperating.

One server, a Redis Cluster or a Sentinel-managed primary (``_url.parse_redis_url``; decision 0013).
Cluster-safe by construction: every atomic step is one command or one Lua script whose declared
keys share one hash slot (``_store`` lists the keys and their tags); several steps that go together
are a non-transactional pipeline, which redis-py's cluster client splits per node and sends to all
of them at once. No MULTI (redis-py 5's cluster pipeline has none), no KEYS/SCAN.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Final, Generic, NamedTuple, TypeVar

import redis
import redis.cluster
import redis.exceptions
import redis.sentinel
import trio
from redis.backoff import NoBackoff
from redis.retry import Retry

from rescue.errors import StoreUnavailable, unraised
from rescue.guardrails._deadline import (
    PROBE_INTERVAL_S,
    Admission,
    Breaker,
    current_store_budget,
    current_store_deadline,
)
from rescue.guardrails._native import NativeRedis, native_target, response_error
from rescue.guardrails._resp import RespError
from rescue.guardrails._store import (
    COUNTER_TTL_S,
    KEY_PREFIX,
    NODES_KEY,
    STORE_INITIALISED_FIELD,
    CounterField,
    FleetState,
    HourCounts,
    MintSnapshot,
    NodeInfo,
    TelemetryGap,
    assignment_key,
    check_cohort_id,
    check_node_id,
    counter_key,
    hour_bucket,
    node_key,
    token_use_key,
)
from rescue.guardrails._url import RedisKind, parse_redis_url

__all__ = ["REDIS_THREADS", "TOKEN_SERVICE_REDIS_THREADS", "RedisStore", "initialise_redis"]

_T = TypeVar("_T")


class _Script:
    """A Lua script, called by its SHA (either transport loads it on ``NOSCRIPT``)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # Redis's script id


class _ScriptCall(NamedTuple):
    """One script call of a round trip: the script, its keys and its arguments."""

    script: _Script
    keys: list[str]
    args: list[Any]


# One step of a round trip: a plain command (its words) or a script call.
_Step = tuple[Any, ...] | _ScriptCall

# Worker threads (and pooled connections) per store. A token request makes ~5 Redis calls of
# ~0.1 ms each; 16 concurrent calls saturate a Redis far beyond what one token-service process can
# send, while trio's global default of 40 threads stays free for other blocking work.
REDIS_THREADS: Final = 16
# What the token service passes instead (``threads=``): its mints are CPU-bound in one process,
# and every worker thread contends for the GIL with the event loop. Under a storm (concurrency
# 64-256, docs/perf/tokenservice.md) 16 threads left a thread that had its Redis answer waiting
# an unbounded time for the GIL: P99 at 2-4x the reference's; 4 threads cut the tail to the
# reference's and raised req/s (1.34-1.85x the reference vs 0.78-1.06x, same runs). The relay
# keeps 16 (its store calls are replay claims during a reconnect storm, not measured here).
# On the trio-native path (a plain redis:// or unix:// server, decision 0020) the same numbers size
# the connection pool: no threads, no GIL convoy; 4 connections carried 1,200 mints/s.
TOKEN_SERVICE_REDIS_THREADS: Final = 4
# Every call is bounded by these socket timeouts, which is also how long a cancellation can take to
# land (a worker thread can't be interrupted). Short: the store is on the request path, and an
# unreachable Redis must turn into a fast 503, not a hung client.
SOCKET_TIMEOUT_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 1.0


def _no_retry() -> Retry:
    """redis-py sends a command again after a connection error or a timeout when its ``Retry``
    allows it, also a write Redis already ran (only the reply was lost): a counter counted twice.
    The data connections get none; the store sends a read again itself (``_execute_sync``,
    decision 0020, "Retry")."""
    return Retry(NoBackoff(), 0)


_FLEET_KEY: Final = f"{KEY_PREFIX}fleet"
_TELEMETRY_KEY: Final = f"{KEY_PREFIX}telemetry"
# The TelemetryGap fields an activation / sessions-started report clears.
_GAP_FIELDS: Final = {
    CounterField.ACTIVATIONS: ("act_tokens", "act_first"),
    CounterField.SESSIONS: ("ses_tokens", "ses_first"),
}
_COHORTS_KEY: Final = f"{KEY_PREFIX}cohorts"
_NODE_PREFIX: Final = f"{NODES_KEY}:"  # + node id = node_key(node_id): the registry's hash slot

# Answers that mean "no usable primary right now", not "your command is wrong": a failover in
# progress (READONLY from a demoted primary, MASTERDOWN, CLUSTERDOWN, TRYAGAIN while a slot moves)
# or a cluster whose slot map can't be read. They are outages (fail closed, breaker), like a
# refused connection.
_OUTAGE_ERRORS: Final = (
    redis.exceptions.ReadOnlyError,
    redis.exceptions.ClusterError,
    redis.exceptions.TryAgainError,
    redis.exceptions.RedisClusterException,
)

# Count into an hourly counter; its TTL is set on the first increment only, in the same step.
_COUNT_LUA: Final = _Script("""
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3], 'NX')
return n
""")
# Register (or refresh) a node: its record with the TTL and its id in the registry set, together.
# KEYS[1] the set, KEYS[2] the record: one hash slot (the {nodes} tag).
_REGISTER_LUA: Final = _Script("""
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[1], ARGV[1])
return 1
""")
# Tokens since each telemetry input was last heard (decision 0012): one key, one step.
_GAP_LUA: Final = _Script("""
redis.call('HINCRBY', KEYS[1], 'act_tokens', 1)
redis.call('HSETNX', KEYS[1], 'act_first', ARGV[1])
if ARGV[3] == '1' then
  redis.call('HINCRBY', KEYS[1], 'ses_tokens', 1)
  redis.call('HSETNX', KEYS[1], 'ses_first', ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
""")
_REMOVE_LUA: Final = _Script("""
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[1], ARGV[1])
return 1
""")

# SET NX, and if a value was there already extend it and return it. One script = one atomic step.
_ASSIGN_LUA: Final = _Script("""
local old = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2], 'GET')
if old then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return old
end
return ARGV[1]
""")
# Compare-and-set: replace the assignment only if it still names the node we judged dead/draining.
_REASSIGN_LUA: Final = _Script("""
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {ARGV[2], 1}
end
return {cur, 0}
""")
# A node holding a session live keeps its assignment: set it to this node unless another node has
# it. One key per call, so a batch is a pipeline of these and works on a cluster too.
_KEEP_LUA: Final = _Script("""
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return cur
""")
# Sessions per keep-alive pipeline: bounds one round trip's size (a 1,000-key pipeline is ~60 KB
# and well under a millisecond of Redis time) while a node with 10,000 sessions needs only ten.
KEEP_BATCH: Final = 1000
# Live nodes: the registry set names candidates, each node's own key (with its TTL) says whether it
# is alive; ids whose key expired are pruned here, atomically, so a concurrent refresh can't be lost.
# The records are not declared (their ids are only known inside): they share the set's hash slot
# (the {nodes} tag), which is all Redis Cluster requires of a script's keys.
_LIVE_NODES_LUA: Final = _Script("""
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local v = redis.call('GET', ARGV[1] .. id)
  if v then table.insert(out, v) else redis.call('SREM', KEYS[1], id) end
end
return out
""")


_KNOWN_DOWN: Final = "guardrail store unavailable (known down; retrying in the background)"


class _ThreadCall(Generic[_T]):
    """One store call run in a worker thread: its outcome, set by the thread itself.

    ``finished`` is written by the thread as soon as ``fn`` returns, before trio hears of it, so a
    deadline that fires while a busy event loop has not yet seen the answer does not turn a
    store that did answer into an outage.
    """

    __slots__ = ("_error", "_fn", "_result", "done", "finished")

    def __init__(self, fn: Callable[[], _T]) -> None:
        self._fn = fn
        self._result: _T | None = None
        self._error: BaseException | None = None
        self.finished = False
        self.done = trio.Event()  # set in trio once the thread returned (and its slot is free)

    def run(self) -> None:  # in the worker thread
        try:
            self._result = self._fn()
        except BaseException as exc:  # handed to the caller by unwrap()
            # A copy (rescue.errors.unraised): the caught error's traceback holds this frame,
            # whose `self` holds the error -- a cycle that kept the call until the cycle collector
            # ran. Its message, type and attributes say what failed; StoreUnavailable quotes them.
            self._error = unraised(exc)
        self.finished = True

    def unwrap(self) -> _T:
        if self._error is not None:
            # a copy again: raised, the kept one would hold the caller's frames (and through them
            # this call, which holds it), the request's stack pinned until a full collection
            raise unraised(self._error)
        return self._result  # type: ignore[return-value]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


_SCRIPTS: Final = (
    _LIVE_NODES_LUA,
    _ASSIGN_LUA,
    _KEEP_LUA,
    _COUNT_LUA,
    _GAP_LUA,
    _REGISTER_LUA,
    _REMOVE_LUA,
    _REASSIGN_LUA,
)


def _command(step: _Step, *, load: bool = False) -> tuple[Any, ...]:
    """A step's command words: a script call is an ``EVALSHA`` (``EVAL`` with ``load``: it also
    puts the script in the server's cache)."""
    if isinstance(step, _ScriptCall):
        name, script = ("EVAL", step.script.source) if load else ("EVALSHA", step.script.sha)
        return (name, script, len(step.keys), *step.keys, *step.args)
    return step


def _initialise_command(now: float) -> tuple[Any, ...]:
    return ("HSET", _FLEET_KEY, STORE_INITIALISED_FIELD, repr(now))


class RedisStore:
    """A :class:`~rescue.guardrails.GuardrailStore` on Redis (SPEC §5, §7 layout in ``_store``).

    Args:
        url: ``redis://host:port/db``, ``rediss://…``, ``unix:///path/redis.sock?db=0``,
            ``redis+cluster://host:port[,host:port…]`` (Redis Cluster seed nodes) or
            ``redis+sentinel://host:port[,host:port…]/master-name[/db]`` (sentinels).
        socket_timeout: seconds before a Redis call is abandoned with :class:`StoreUnavailable`.
        threads: concurrent Redis calls (and pooled connections per server): trio-native
            connections for a plain ``redis://``/``unix://`` server, worker threads otherwise.

    Resource handling:
        Holds a connection pool of at most ``threads`` connections (per cluster node);
        call :meth:`aclose`.

    Error handling:
        Any Redis or socket error becomes :class:`~rescue.errors.StoreUnavailable` (with the
        original as ``__cause__``). A pooled connection that went stale when Redis restarted is
        replaced before anything is written to it. A round trip is sent twice only if it is a
        read (``idempotent`` in :meth:`_run`), on every transport: a write whose connection was
        lost after it went out (Redis may have run it, only the reply was lost) is a
        ``StoreUnavailable`` like any outage, never run twice (decision 0020, "Retry"; redis-py's
        own retries are off). Every call honours the caller's :func:`store_deadline` (one budget
        for a whole request, counting store time only: waiting for a free slot is given back).
        A Cluster's client reads its slot map when the first call builds it (in its worker
        thread, never on the event loop): unreachable seeds make that call an outage too.
        After a failure the store is known down (:attr:`breaker`): calls fail at once, those
        queued for a slot too, except one probe per ``probe_interval`` that notices when Redis
        is back. A saturated process (every slot busy, Redis healthy) queues; it is no outage.

    Cancellation:
        Immediate. A trio-native call cancelled mid-round-trip closes its connection (never
        reused). A call already running in a worker thread is abandoned: the thread finishes its
        round trip alone on the connection it checked out (bounded by the socket timeouts), and
        :meth:`aclose` never closes a connection that a thread still uses.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout: float = SOCKET_TIMEOUT_S,
        probe_interval: float = PROBE_INTERVAL_S,
        threads: int = REDIS_THREADS,
    ) -> None:
        self._sentinel: Any = None
        self._client: Any = None
        self._py_scripts: dict[_Script, Any] = {}  # with the client: see _use
        # a Cluster's client, built by the first call in its worker thread (see _redis)
        self._connect_later: Callable[[], Any] | None = None
        self._connect_lock = threading.Lock()
        self._native: NativeRedis | None = None
        self.threads = threads
        try:
            self.kind = parse_redis_url(url).kind
            target = native_target(url)
            if target is not None:
                self._native = NativeRedis(
                    target,
                    max_idle=threads,
                    socket_timeout=socket_timeout,
                    connect_timeout=min(CONNECT_TIMEOUT_S, socket_timeout),
                )
            else:
                connect = self._connect(url, socket_timeout)
                if self.kind is RedisKind.CLUSTER:
                    self._connect_later = connect
                else:  # no I/O: redis-py's Redis and Sentinel connect on their first command
                    self._use(connect())
        except ValueError as exc:
            raise StoreUnavailable(f"bad Redis URL: {exc}") from exc
        self._limiter = trio.CapacityLimiter(threads)
        self.breaker = Breaker(probe_interval=probe_interval)
        self._closed = False
        # calls under way, abandoned worker threads included; guarded by a thread lock because
        # the threads themselves count down
        self._lock = threading.Lock()
        self._in_flight = 0
        self._idle = threading.Event()
        self._idle.set()
        self._native_idle = trio.lowlevel.ParkingLot()  # woken as a native call ends
        # cancel scopes of calls waiting for a slot (admitted while the store was up)
        self._waiting: set[trio.CancelScope] = set()
        self._scripts_loaded = False  # see _execute_sync

    def _use(self, client: Any) -> None:
        """Make ``client`` the store's redis-py client (its scripts registered first: a thread that
        sees the client finds them)."""
        self._py_scripts = {s: client.register_script(s.source) for s in _SCRIPTS}
        self._client = client

    def _redis(self) -> Any:
        """The redis-py client, in a worker thread; a Cluster's is built here by the first call.

        ``RedisCluster(...)`` reads the slot map from the seed nodes in its constructor (``CLUSTER
        SLOTS``, then ``COMMAND``), up to the connect and socket timeouts per seed: built on the
        event loop, a seed that accepts and never answers froze the whole process (a relay's live
        sessions and probes) for 2 s per seed, then raised out of ``RedisStore()``. Here it is part
        of the first call, an outage like any other (the call fails, the breaker's next probe
        builds it again); calls that come meanwhile wait for the one being built.
        """
        if self._client is None:
            with self._connect_lock:
                if self._client is None:
                    assert self._connect_later is not None
                    self._use(self._connect_later())
        return self._client

    def _connect(self, url: str, socket_timeout: float) -> Callable[[], Any]:
        """What builds the redis-py client for ``url``: ``Redis``, ``RedisCluster`` or a
        Sentinel's master (only the cluster's does I/O: see :meth:`_redis`).

        Raises:
            ValueError: a bad URL.
        """
        target = parse_redis_url(url)
        timeouts: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": min(CONNECT_TIMEOUT_S, socket_timeout),
        }
        if target.kind is RedisKind.SINGLE:
            return partial(
                redis.Redis.from_url,
                url,
                decode_responses=True,
                max_connections=self.threads,
                retry=_no_retry(),
                **timeouts,
            )
        auth: dict[str, Any] = {"username": target.username, "password": target.password}
        if target.tls:
            auth["ssl"] = True
        if target.kind is RedisKind.CLUSTER:
            # redis-py follows MOVED/ASK and refreshes its slot map itself (also after a failover);
            # a pool per node, each bounded like the single-server pool. No command is run again
            # after a connection error: redis-py 5 counts those re-runs in
            # cluster_error_retry_attempts (3 by default), later versions in `retry` and warn
            # that the argument is deprecated; both are given, so every version gets none.
            def cluster() -> Any:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    return redis.cluster.RedisCluster(
                        startup_nodes=[
                            redis.cluster.ClusterNode(host, port)  # type: ignore[no-untyped-call]
                            for host, port in target.hosts
                        ],
                        decode_responses=True,
                        max_connections=self.threads,
                        retry=_no_retry(),
                        cluster_error_retry_attempts=0,
                        **timeouts,
                        **auth,
                    )

            return cluster
        # Sentinel: every new connection asks the sentinels where the primary is, and a connection
        # to a primary that was demoted is dropped (redis-py turns its READONLY into a connection
        # error): the call fails like any outage (a write is not sent again, decision 0020), and the
        # next call, on a new connection, lands on the new primary once the sentinels promoted it.
        # The questions to the sentinels are reads: every sentinel is asked in turn, one quick
        # retry each, not redis-py's default backoff (three retries with sleeps per sentinel made a
        # wrong sentinel password cost 11 s)
        sentinel_kwargs: dict[str, Any] = {**timeouts, "retry": Retry(NoBackoff(), 1)}
        if target.tls:
            sentinel_kwargs["ssl"] = True
        if target.sentinel_password is not None:
            sentinel_kwargs["username"] = target.sentinel_username
            sentinel_kwargs["password"] = target.sentinel_password
        self._sentinel = redis.sentinel.Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts), sentinel_kwargs=sentinel_kwargs
        )
        return partial(
            self._sentinel.master_for,
            target.service,
            decode_responses=True,
            db=target.db,
            max_connections=self.threads,
            retry=_no_retry(),
            **timeouts,
            **auth,
        )

    def _pools(self) -> list[Any]:
        """Every redis-py connection pool this store opened (one, one per cluster node, plus the
        sentinels'); none for the trio-native client."""
        if self._client is None:
            return []
        if self.kind is RedisKind.CLUSTER:
            nodes = self._client.get_nodes()
            return [n.redis_connection.connection_pool for n in nodes if n.redis_connection is not None]
        pools = [self._client.connection_pool]
        if self._sentinel is not None:
            pools += [s.connection_pool for s in self._sentinel.sentinels]
        return pools

    @property
    def in_flight(self) -> int:
        """Calls under way: trio-native round trips, worker threads (including calls their caller
        gave up on)."""
        return self._in_flight

    def _start(self, call: _ThreadCall[Any]) -> None:
        """Run ``call`` in a worker thread (its limiter slot already held on behalf of ``call``).

        The slot is given back, and ``call.done`` set, in trio once the thread returns, also when
        the caller stopped waiting for it (an abandoned call keeps its slot and connection until
        its round trip ends, within the socket timeouts).
        """
        token = trio.lowlevel.current_trio_token()
        limiter = self._limiter
        with self._lock:
            self._in_flight += 1
            self._idle.clear()

        def finish() -> None:  # in trio
            limiter.release_on_behalf_of(call)
            call.done.set()

        def deliver(_: object) -> None:  # in the worker thread, after call.run
            with self._lock:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(finish)

        # no thread name: trio would set (and reset) the OS thread name around every call, two
        # prctl calls per store call that showed in the storm profile
        trio.lowlevel.start_thread_soon(call.run, deliver)

    async def _run(self, steps: list[_Step], *, idempotent: bool = False) -> list[Any]:
        """Run ``steps`` as one round trip on whichever transport this store uses; their results.

        ``idempotent``: the steps may run twice without harm (reads), so they are sent again, once,
        if the connection is lost after they went out (decision 0020, "Retry"); anything else is
        never sent twice, on any transport.
        """
        if self._closed:
            raise StoreUnavailable("guardrail store is closed")
        admission = self.breaker.admit(trio.current_time())
        if admission is Admission.REFUSE:
            await trio.lowlevel.checkpoint()
            raise StoreUnavailable(_KNOWN_DOWN)
        ok: bool | None = None  # the store's verdict: None when the store was never asked
        # the slot's owner: the worker thread's call, or for a native call just a token
        call = None
        if self._native is None:
            call = _ThreadCall(partial(self._execute_sync, steps, idempotent))
        slot = call or object()
        try:
            # 1. Wait for a slot (a connection, or a worker thread). All busy means the process is
            # saturated (or a stalled Redis holds them, which the running calls find out): not the
            # store's time, so the request's budget is paused meanwhile. If the breaker opens while
            # we wait, we are refused (see the finally clause below).
            queued_at = trio.current_time()
            acquired = False
            with trio.CancelScope() as wait:
                if admission is Admission.GO:
                    self._waiting.add(wait)
                try:
                    await self._limiter.acquire_on_behalf_of(slot)
                    acquired = True
                finally:
                    self._waiting.discard(wait)
            if wait.cancel_called:  # the store was found down while we waited
                if acquired:
                    self._limiter.release_on_behalf_of(slot)
                raise StoreUnavailable(_KNOWN_DOWN)
            budget = current_store_budget()
            if budget is not None:
                budget.pause(trio.current_time() - queued_at)
            # 2. The call itself, under the request's budget.
            if call is None:
                result = await self._run_native(slot, steps, idempotent=idempotent)
            else:
                result = await self._run_thread(call)
            ok = True
            return result
        except StoreUnavailable:
            ok = False
            raise
        except _OUTAGE_ERRORS as exc:  # before ResponseError: some of these are ResponseErrors
            ok = False
            raise StoreUnavailable(f"guardrail store unavailable: {type(exc).__name__}: {exc}") from exc
        except redis.ResponseError:
            ok = True  # the store answered (a script or type error): not an outage
            raise
        except (redis.RedisError, OSError) as exc:
            ok = False
            raise StoreUnavailable(f"guardrail store unavailable: {type(exc).__name__}: {exc}") from exc
        finally:
            if self.breaker.done(admission, ok=ok, now=trio.current_time()):
                # the store is down: the calls queued for a slot would only queue behind the
                # stalled ones; they are refused now, like the calls that come after
                for scope in self._waiting:
                    scope.cancel()

    async def _run_native(self, slot: object, steps: list[_Step], *, idempotent: bool) -> list[Any]:
        """The round trip on a trio-native connection; past the deadline it is cancelled and its
        connection closed (never reused: its answer could still arrive)."""
        self._in_flight += 1
        try:
            with trio.move_on_at(current_store_deadline()):
                return await self._execute_native(steps, idempotent=idempotent)
            raise StoreUnavailable("guardrail store unavailable: request deadline exceeded")
        finally:
            self._in_flight -= 1
            self._limiter.release_on_behalf_of(slot)
            self._native_idle.unpark_all()

    async def _run_thread(self, call: _ThreadCall[list[Any]]) -> list[Any]:
        """The round trip in a worker thread. Past the deadline the thread is abandoned (it
        finishes its one round trip alone, on the connection it checked out, and aclose() never
        closes a connection in use) -- unless it had already returned and only this busy event
        loop had not seen it yet."""
        self._start(call)
        with trio.move_on_at(current_store_deadline()):
            await call.done.wait()
        if not call.finished:
            raise StoreUnavailable("guardrail store unavailable: request deadline exceeded")
        return call.unwrap()

    async def _execute_native(self, steps: list[_Step], *, idempotent: bool) -> list[Any]:
        """``steps`` as one pipelined write on a native connection; a script the server does not
        know (``NOSCRIPT``: Redis restarted) did nothing, so it alone is sent again as ``EVAL``
        (which also caches it), the others already took effect and are not repeated."""
        assert self._native is not None
        commands = [_command(step) for step in steps]
        replies: list[Any] = await self._native.execute(commands, idempotent=idempotent)
        missing = [i for i, r in enumerate(replies) if isinstance(r, RespError) and r.startswith("NOSCRIPT")]
        if missing:
            loads = [_command(steps[i], load=True) for i in missing]
            again = await self._native.execute(loads, idempotent=idempotent)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, RespError):
                raise response_error(reply)
            if commands[i][0] == "HGETALL":  # a flat list of pairs; redis-py makes it a dict
                pairs = iter(reply)
                replies[i] = dict(zip(pairs, pairs, strict=False))
        return replies

    def _execute_sync(self, steps: list[_Step], idempotent: bool) -> list[Any]:
        """``steps`` with redis-py (in a worker thread), sent once -- or, if ``idempotent``, sent
        again once after the connection failed (decision 0020, "Retry", the native client's rule).

        redis-py's own retries are off (:func:`_no_retry`); its pool checks a pooled connection
        before lending it (one the server closed while it sat idle is replaced before anything is
        written to it). A connection error after the write is ``ConnectionError`` (redis-py has
        closed that connection; on a Sentinel the next one asks the sentinels, on a Cluster the
        slot map was read again): a read goes out once more, a write fails. A timeout is never
        sent again (as on the native transport).
        """
        self._redis()
        try:
            return self._round_trip_sync(steps)
        except redis.exceptions.ConnectionError:
            if not idempotent:
                raise
        return self._round_trip_sync(steps)

    def _round_trip_sync(self, steps: list[_Step]) -> list[Any]:
        """``steps`` as one command, or else one plain pipeline with scripts by SHA (on a cluster
        :meth:`_cluster_round_trip`). A script answered ``NOSCRIPT`` (its Redis restarted, or on a
        cluster: a node failed over to a replica without the script cache) did nothing, so it alone
        is run again by its script object, which loads it; the others already took effect and are
        not repeated (a counter is never counted twice)."""
        if len(steps) == 1 and not isinstance(steps[0], _ScriptCall):
            return [self._client.execute_command(*steps[0])]
        if not self._scripts_loaded:
            self._load_scripts()
        if self.kind is RedisKind.CLUSTER:
            result = self._cluster_round_trip(steps)
        else:
            pipe = self._client.pipeline(transaction=False)
            for step in steps:
                pipe.execute_command(*_command(step))
            result = pipe.execute(raise_on_error=False)
        for i, item in enumerate(result):
            if not isinstance(item, Exception):
                continue
            # An error reply comes back as a value, caught where it was read (redis-py's pipeline,
            # _cluster_round_trip): its traceback holds that frame, which holds the answers, which
            # hold it -- a cycle, and through the frames' callers (f_back) it held this thread's
            # stack and its call until a full pass of the cycle collector. Where the reply was
            # read says nothing its type and message do not.
            item.__traceback__ = None
            step = steps[i]
            if isinstance(item, redis.exceptions.NoScriptError) and isinstance(step, _ScriptCall):
                self._scripts_loaded = False
                result[i] = self._py_scripts[step.script](keys=step.keys, args=step.args)
        for item in result:
            if isinstance(item, Exception):
                # a copy (rescue.errors.unraised): raised, this one's traceback would hold this
                # frame, which holds it (`item`, `result`)
                raise unraised(item)
        return result

    def _cluster_round_trip(self, steps: list[_Step]) -> list[Any]:
        """``steps`` on a cluster in one wave: each master's commands in one write, every write
        sent before any answer is read; the answers in order, error replies as values.

        Not redis-py's cluster pipeline: after a connection error it sends that node's commands
        again one by one, a write Redis may have run included (decision 0020, "Retry"). Here a
        failed connection fails the round trip (the connections whose answers were not read are
        closed, and the slot map is read again, so the next call finds a master that failed
        over). An answer ``MOVED``, ``ASK`` or ``TRYAGAIN`` says the command did not run: it alone
        is sent again through the cluster client, which follows the redirect (and refreshes its
        slot map). Each step names its master from the client's slot map (no I/O; redis-py 8's
        cluster pipeline asks a server ``COMMAND GETKEYS`` for every script call instead).
        """
        client = self._client
        commands = [_command(step) for step in steps]
        # node name -> (its redis-py client, a connection of its pool, indexes of its commands)
        groups: dict[str, tuple[Any, Any, list[int]]] = {}
        unread: list[tuple[Any, Any, list[int]]] = []
        results: list[Any] = [None] * len(commands)
        try:
            for i, step in enumerate(steps):
                node = client.get_node_from_key(step.keys[0] if isinstance(step, _ScriptCall) else step[1])
                group = groups.get(node.name)
                if group is None:
                    node_client = client.get_redis_connection(node)
                    # redis-py's own helper for its cluster pipeline (a command name for redis-py 5's
                    # pool, ignored by later ones)
                    conn = redis.cluster.get_connection(node_client, "PIPELINE")
                    group = groups[node.name] = (node_client, conn, [])
                group[2].append(i)
            unread = list(groups.values())
            for _, conn, indexes in unread:
                conn.send_packed_command(conn.pack_commands([commands[i] for i in indexes]))
            while unread:
                node_client, conn, indexes = unread[0]
                for i in indexes:
                    try:
                        results[i] = node_client.parse_response(conn, commands[i][0])
                    except redis.exceptions.ResponseError as exc:
                        results[i] = exc
                unread.pop(0)
        except BaseException as exc:
            for _, conn, _ in unread:  # an answer may still come: never lent again
                conn.disconnect()
            if isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
                with contextlib.suppress(redis.exceptions.RedisError, redis.exceptions.RedisClusterException):
                    client.nodes_manager.initialize()
            raise
        finally:
            for node_client, conn, _ in groups.values():
                node_client.connection_pool.release(conn)
        redirected = (redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.TryAgainError)
        for i, result in enumerate(results):
            if isinstance(result, redirected):
                try:
                    results[i] = client.execute_command(*commands[i])
                except redis.exceptions.ResponseError as exc:
                    results[i] = exc
        return results

    def _load_scripts(self) -> None:
        # redis-py checks a pipeline's scripts with SCRIPT EXISTS on every execute: one more round
        # trip per pipeline; instead they are loaded once, and again after a NOSCRIPT. On a
        # cluster SCRIPT LOAD goes to every primary.
        for script in _SCRIPTS:
            self._client.script_load(script.source)
        self._scripts_loaded = True

    async def ping(self) -> None:
        await self._run([("PING",)], idempotent=True)

    async def fleet_state(self) -> FleetState:
        (raw,) = await self._run([("HGETALL", _FLEET_KEY)], idempotent=True)
        return _parse_fleet(raw)

    async def set_fleet_state(self, state: FleetState) -> None:
        mapping = {
            "paused": "1" if state.paused else "0",
            "drain": "1" if state.drain else "0",
            "reason": state.reason or "",
            "since": repr(state.since) if state.since is not None else "",
            "cause": state.cause or "",
        }
        # One HSET of every kill-switch field: atomic (a reader never sees it half-written), one
        # key, and the `initialised` mark stays (only data loss removes it).
        await self._run([("HSET", _FLEET_KEY, *(x for pair in mapping.items() for x in pair))])

    async def initialise(self, *, now: float) -> None:
        await self._run([_initialise_command(now)])

    async def cohort_enabled(self, cohort_id: str) -> bool:
        check_cohort_id(cohort_id)
        (value,) = await self._run([("HGET", _COHORTS_KEY, cohort_id)], idempotent=True)
        return bool(value == "1")

    async def set_cohort_enabled(self, cohort_id: str, enabled: bool) -> None:
        check_cohort_id(cohort_id)
        await self._run([("HSET", _COHORTS_KEY, cohort_id, "1" if enabled else "0")])

    async def increment(self, cohort_id: str, field: CounterField, *, now: float, amount: int = 1) -> None:
        key = counter_key(cohort_id, hour_bucket(now))
        name = CounterField(field).value
        steps: list[_Step] = [_ScriptCall(_COUNT_LUA, [key], [name, amount, COUNTER_TTL_S])]
        if name in _GAP_FIELDS:
            # the input arrived: its telemetry gap closes (another key, maybe another cluster node:
            # one plain pipeline, each step atomic on its own)
            steps.append(("HDEL", _TELEMETRY_KEY, *_GAP_FIELDS[CounterField(name)]))
        await self._run(steps)

    async def hour_counts(self, cohort_id: str, buckets: list[str]) -> list[HourCounts]:
        if not buckets:
            return []
        raw = await self._run([("HGETALL", counter_key(cohort_id, b)) for b in buckets], idempotent=True)
        return [HourCounts.from_mapping(r) for r in raw]

    async def register_node(self, node: NodeInfo, *, ttl: float) -> None:
        value = json.dumps(node.to_json(), separators=(",", ":"))
        keys = [NODES_KEY, node_key(node.node_id)]
        await self._run([_ScriptCall(_REGISTER_LUA, keys, [node.node_id, value, _ms(ttl)])])

    async def remove_node(self, node_id: str) -> None:
        await self._run([_ScriptCall(_REMOVE_LUA, [NODES_KEY, node_key(node_id)], [node_id])])

    async def live_nodes(self) -> list[NodeInfo]:
        # a read; its one write, pruning ids whose record expired, gives the same set run twice
        (raw,) = await self._run([_ScriptCall(_LIVE_NODES_LUA, [NODES_KEY], [_NODE_PREFIX])], idempotent=True)
        return _parse_nodes(raw)

    async def mint_snapshot(self, cohort_id: str, *, now: float) -> MintSnapshot:
        fleet, cohort, current, previous, nodes, gap = await self._run(
            [
                ("HGETALL", _FLEET_KEY),
                ("HGET", _COHORTS_KEY, cohort_id),
                ("HGETALL", counter_key(cohort_id, hour_bucket(now))),
                ("HGETALL", counter_key(cohort_id, hour_bucket(now - 3600))),
                _ScriptCall(_LIVE_NODES_LUA, [NODES_KEY], [_NODE_PREFIX]),
                ("HGETALL", _TELEMETRY_KEY),
            ],
            idempotent=True,  # reads (and live_nodes' pruning), the kill switch among them
        )
        return MintSnapshot(
            fleet=_parse_fleet(fleet),
            cohort_enabled=cohort == "1",
            current=HourCounts.from_mapping(current),
            previous=HourCounts.from_mapping(previous),
            nodes=tuple(_parse_nodes(nodes)),
            telemetry=TelemetryGap.from_mapping(gap),
        )

    async def telemetry_gap(self) -> TelemetryGap:
        (raw,) = await self._run([("HGETALL", _TELEMETRY_KEY)], idempotent=True)
        return TelemetryGap.from_mapping(raw)

    async def record_mint(
        self,
        cohort_id: str,
        *,
        now: float,
        session_id: str,
        node_id: str | None,
        ttl: float,
        telemetry_ttl: float = 3600.0,
        sessions_reported: bool = True,
    ) -> str | None:
        key = counter_key(cohort_id, hour_bucket(now))
        steps: list[_Step] = [_ScriptCall(_COUNT_LUA, [key], [CounterField.TOKENS.value, 1, COUNTER_TTL_S])]
        if node_id is not None:
            check_node_id(node_id)
            steps.append(_ScriptCall(_ASSIGN_LUA, [assignment_key(session_id)], [node_id, _ms(ttl)]))
        # the telemetry gap (decision 0012): its own key, one script
        steps.append(
            _ScriptCall(
                _GAP_LUA, [_TELEMETRY_KEY], [repr(now), _ms(telemetry_ttl), "1" if sessions_reported else "0"]
            )
        )
        # Scripts in one plain pipeline: one round trip on one server; on a cluster the counter,
        # the assignment and the gap usually live on different nodes, reached at once (decision 0013)
        result = await self._run(steps)
        return str(result[1]) if node_id is not None else None

    async def assign_session(self, session_id: str, node_id: str, *, ttl: float) -> str:
        check_node_id(node_id)
        key = assignment_key(session_id)
        (result,) = await self._run([_ScriptCall(_ASSIGN_LUA, [key], [node_id, _ms(ttl)])])
        return str(result)

    async def session_node(self, session_id: str) -> str | None:
        (value,) = await self._run([("GET", assignment_key(session_id))], idempotent=True)
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def claim_token_use(self, cti: bytes, node_id: str, *, ttl: float) -> str:
        check_node_id(node_id)
        key = token_use_key(cti)
        # one round trip, one key: SET NX, then GET reads whichever node holds it now
        _, holder = await self._run([("SET", key, node_id, "NX", "PX", _ms(ttl)), ("GET", key)])
        return holder.decode() if isinstance(holder, bytes) else str(holder or node_id)

    async def reassign_session(
        self, session_id: str, *, expected: str, node_id: str, ttl: float
    ) -> tuple[str, bool]:
        check_node_id(node_id)
        key = assignment_key(session_id)
        step = _ScriptCall(_REASSIGN_LUA, [key], [expected, node_id, _ms(ttl)])
        ((holder, wrote),) = await self._run([step])
        return str(holder), bool(wrote)

    async def keep_assignments(
        self, node_id: str, session_ids: Sequence[str], *, ttl: float
    ) -> dict[str, str]:
        check_node_id(node_id)
        ids = list(session_ids)
        args: list[Any] = [node_id, _ms(ttl)]
        out: dict[str, str] = {}
        for start in range(0, len(ids), KEEP_BATCH):
            chunk = ids[start : start + KEEP_BATCH]
            held = await self._run([_ScriptCall(_KEEP_LUA, [assignment_key(sid)], args) for sid in chunk])
            out.update(zip(chunk, map(str, held), strict=True))
        return out

    async def aclose(self) -> None:
        """Refuse new calls, wait for running ones to finish, then close the connections.

        Cancellation:
            Bounded by the caller: if cancelled while calls still run, the trio-native
            connections are closed under them (they fail), but only the idle redis-py connections
            (a thread's connection is never closed under it; the process exits or the thread
            returns it to a pool nobody uses).
        """
        self._closed = True
        try:
            if self._native is not None:
                while self._in_flight:
                    await self._native_idle.park()
            else:
                await trio.to_thread.run_sync(self._idle.wait, abandon_on_cancel=True)
        finally:
            if self._native is not None:
                self._native.close()
            for pool in self._pools():
                pool.disconnect(inuse_connections=False)


def initialise_redis(client: Any, *, now: float) -> None:
    """Write the store's ``initialised`` mark with a sync redis-py ``client`` (the same command
    :meth:`RedisStore.initialise` sends; test fixtures call this directly)."""
    client.execute_command(*_initialise_command(now))


def _parse_fleet(raw: dict[str, str]) -> FleetState:
    since: float | None
    try:
        since = float(raw["since"]) if raw.get("since") else None
    except ValueError:
        since = None
    return FleetState(
        paused=raw.get("paused") == "1",
        reason=raw.get("reason") or None,
        since=since,
        drain=raw.get("drain") == "1",
        cause=raw.get("cause") or None,
        initialised=bool(raw.get(STORE_INITIALISED_FIELD)),
    )


def _parse_nodes(raw: list[str]) -> list[NodeInfo]:
    nodes = []
    for item in raw:
        try:
            nodes.append(NodeInfo.from_json(json.loads(item)))
        except ValueError:  # a corrupt record is a dead node, not an outage
            continue
    return sorted(nodes, key=lambda n: n.node_id)
