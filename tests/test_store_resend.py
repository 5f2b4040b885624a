"""No guardrail write is sent twice, on the redis-py transports too (decision 0020, amended).

The trio-native client's rule (tests/test_resp.py) for TLS (``rediss://``), Sentinel and Cluster:
a round trip whose connection fails after it went out may have run (only the reply was lost), so a
write is a store error, never sent again; a read is sent again, once. Each test puts a TCP proxy of
ours between the store and a real ``redis-server``: it forwards everything both ways, and once
armed it forwards the next request (that names a marker: TLS hides it, so there any request),
waits for Redis's answer (so Redis ran it) and closes the store's connection instead of answering.
The old code (redis-py's ``Retry(NoBackoff(), 1)``, a cluster pipeline that sends a node's
commands again after a connection error) ran the write twice: the counter moved by 2, not 1.

A cluster's redirects are not resends of a write that ran: a command answered ``MOVED`` or ``ASK``
did not run, and still reaches its new master (once).
"""

from __future__ import annotations

import functools
import queue
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import trio

from rescue.errors import StoreUnavailable
from rescue.guardrails import CounterField, FleetState, RedisStore, counter_key, hour_bucket
from rescue.guardrails._redis import _COUNT_LUA
from rescue.guardrails._store import assignment_key
from rescue.testing import SelfSignedTLS, free_tcp_ports

from .conftest import (
    SENTINEL_MASTER,
    RedisClusterServers,
    SentinelServers,
    start_redis_cluster,
    tcp_redis_argv,
)
from .test_guardrails_cluster import left_to_the_cycle_collector

pytestmark = pytest.mark.redis

TIMEOUT = 30  # a cluster or sentinel set-up on a loaded 2-core box
NOW = 1_700_000_000.0
COUNTER = counter_key("beta", hour_bucket(NOW))
SHA = _COUNT_LUA.sha.encode()  # in every increment's EVALSHA


class CuttingProxy:
    """A TCP proxy to 127.0.0.1:``port`` that loses one reply on request (:meth:`cut_after`)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.marker: bytes | None = None
        self.requests: list[bytes] = []  # every chunk a client sent through the proxy

    def cut_after(self, marker: bytes = b"") -> None:
        """Lose the answer to the next request containing ``marker`` (b"": the next request)."""
        self.marker = marker

    def seen(self, marker: bytes) -> int:
        return sum(marker in chunk for chunk in self.requests)

    async def handle(self, client: trio.SocketStream) -> None:
        try:
            async with client, await trio.open_tcp_stream("127.0.0.1", self.port) as server:
                cut = trio.Event()

                async def answers() -> None:
                    while data := await server.receive_some(65536):
                        if cut.is_set():  # Redis answered, so it ran the request: the client never hears
                            break
                        await client.send_all(data)
                    nursery.cancel_scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(answers)
                    while data := await client.receive_some(65536):
                        self.requests.append(data)
                        if self.marker is not None and self.marker in data:
                            self.marker = None
                            cut.set()
                        await server.send_all(data)
                    nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # either side went away: so does the other


async def _lost(call: Callable[..., Awaitable[object]], *args: Any, **kwargs: Any) -> bool:
    """Whether ``call`` failed with StoreUnavailable (checked after the counters are, so the old
    code's double count is what a failure shows)."""
    try:
        await call(*args, **kwargs)
    except StoreUnavailable:
        return True
    return False


@asynccontextmanager
async def cutting_proxy(port: int) -> AsyncIterator[tuple[CuttingProxy, int]]:
    """A :class:`CuttingProxy` to ``port`` listening on 127.0.0.1; yields it and its port.

    It runs in a thread of its own (its own trio loop): redis-py's cluster client connects to the
    nodes in its constructor, which the store calls in the test's loop.
    """
    proxy = CuttingProxy(port)
    started: queue.Queue[tuple[trio.lowlevel.TrioToken, trio.CancelScope, int]] = queue.Queue()

    async def serve() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                listen = functools.partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1")
                listeners = await nursery.start(listen)
                started.put((trio.lowlevel.current_trio_token(), scope, listeners[0].socket.getsockname()[1]))

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    token, scope, proxy_port = await trio.to_thread.run_sync(started.get)
    try:
        yield proxy, proxy_port
    finally:
        token.run_sync_soon(scope.cancel)
        await trio.to_thread.run_sync(thread.join)


# --- TLS ---------------------------------------------------------------------------------------------


class TLSRedis:
    def __init__(self, port: int, tls: SelfSignedTLS, process: subprocess.Popen[bytes]) -> None:
        self.port, self.tls, self.process = port, tls, process

    def client(self) -> redis.Redis:
        ca = str(self.tls.cert_file)
        return redis.Redis(port=self.port, ssl=True, ssl_ca_certs=ca, decode_responses=True, socket_timeout=5)

    def url(self, port: int) -> str:
        """The ``rediss://`` URL of this server reached on ``port`` (the proxy's)."""
        return f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={self.tls.cert_file}"


@pytest.fixture
def tls_redis() -> Iterator[TLSRedis]:
    """A private redis-server that speaks only TLS, on 127.0.0.1."""
    directory = tempfile.mkdtemp(prefix="rescue-tls-redis-")
    tls = SelfSignedTLS.create(Path(directory) / "tls")
    (port,) = free_tcp_ports(1)
    argv = tcp_redis_argv(0, directory, "--tls-port", str(port), "--tls-cert-file", str(tls.cert_file),
                          "--tls-key-file", str(tls.key_file), "--tls-ca-cert-file", str(tls.cert_file),
                          "--tls-auth-clients", "no")  # fmt: skip
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = TLSRedis(port, tls, process)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert process.poll() is None, "redis-server (TLS) exited"
            try:
                with server.client() as client:
                    client.ping()
                break
            except redis.RedisError:
                assert time.monotonic() < deadline, "redis-server (TLS) did not answer in time"
                time.sleep(0.02)
        with server.client() as client:
            client.hset("fallback:fleet", "initialised", repr(NOW))
        yield server
    finally:
        process.kill()
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


async def test_tls_a_write_whose_reply_was_lost_is_not_sent_again(tls_redis: TLSRedis) -> None:
    async with cutting_proxy(tls_redis.port) as (proxy, port):
        store = RedisStore(tls_redis.url(port), probe_interval=0)
        try:
            with trio.fail_after(TIMEOUT):
                await store.increment("beta", CounterField.TOKENS, now=NOW)  # connected, scripts loaded
                proxy.cut_after()  # TLS: the proxy can't read the request, so the next one
                lost = await _lost(store.increment, "beta", CounterField.TOKENS, now=NOW)
                assert proxy.marker is None  # the reply was lost
                with tls_redis.client() as client:
                    assert client.hget(COUNTER, "tokens") == "2"  # ran once (the old code: 3)
                assert lost
                assert store.breaker.open  # an outage like any other
        finally:
            await store.aclose()


async def test_tls_a_read_whose_reply_was_lost_is_read_again(tls_redis: TLSRedis) -> None:
    async with cutting_proxy(tls_redis.port) as (proxy, port):
        store = RedisStore(tls_redis.url(port), probe_interval=0)
        try:
            with trio.fail_after(TIMEOUT):
                await store.set_fleet_state(FleetState(paused=True, reason="drill"))
                proxy.cut_after()
                assert (await store.fleet_state()).reason == "drill"
                assert proxy.marker is None
                proxy.cut_after()  # the mint's read pipeline
                assert (await store.mint_snapshot("beta", now=NOW)).fleet.paused
                assert not store.breaker.open
        finally:
            await store.aclose()


async def test_tls_an_error_among_a_pipelines_answers_is_freed_by_reference_counting(
    tls_redis: TLSRedis,
) -> None:
    """Not a resend: the cycle of tests/test_guardrails_cluster.py's test of the same name, on
    redis-py's own pipeline (a TLS store's), which catches an error reply where it reads it and
    hands it back among the answers."""
    with tls_redis.client() as client:
        client.set(counter_key("wrongtype-2", "2024010100"), "a string, not a hash")
    store = RedisStore(tls_redis.url(tls_redis.port))
    try:
        with trio.fail_after(TIMEOUT):
            left = await left_to_the_cycle_collector(store, "wrongtype-2", ["2024010100", "2024010101"], 4)
            assert left == {}, "pinned by reference cycles until a full collection"
            assert not store.breaker.open
    finally:
        await store.aclose()


# --- Sentinel ----------------------------------------------------------------------------------------


def _monitor_through(servers: SentinelServers, port: int) -> None:
    """Every sentinel monitors the primary at 127.0.0.1:``port`` (the proxy) instead: what they
    tell a client is where the primary is."""
    for i in range(len(servers.sentinel_ports)):
        with servers.sentinel_client(i) as sentinel:
            sentinel.execute_command("SENTINEL", "REMOVE", SENTINEL_MASTER)
            sentinel.execute_command("SENTINEL", "MONITOR", SENTINEL_MASTER, "127.0.0.1", port, 2)
            sentinel.execute_command("SENTINEL", "SET", SENTINEL_MASTER, "down-after-milliseconds", 60000)


async def test_sentinel_a_write_whose_reply_was_lost_is_not_sent_again(
    redis_sentinel: SentinelServers,
) -> None:
    servers = redis_sentinel
    async with cutting_proxy(servers.data_ports[0]) as (proxy, port):
        await trio.to_thread.run_sync(_monitor_through, servers, port)
        store = RedisStore(servers.url, probe_interval=0)
        try:
            with trio.fail_after(TIMEOUT):
                await store.increment("beta", CounterField.TOKENS, now=NOW)
                assert proxy.seen(SHA) == 1  # through the proxy
                proxy.cut_after(SHA)
                lost = await _lost(store.increment, "beta", CounterField.TOKENS, now=NOW)
                assert proxy.marker is None
                with servers.data_client(0) as primary:
                    assert primary.hget(COUNTER, "tokens") == "2"  # the old code: 3
                assert proxy.seen(SHA) == 2  # one EVALSHA per increment, none sent again
                assert lost
                assert store.breaker.open
                # the next call goes out on a new connection (probe_interval=0: the breaker lets it)
                await store.increment("beta", CounterField.TOKENS, now=NOW)
                with servers.data_client(0) as primary:
                    assert primary.hget(COUNTER, "tokens") == "3"
                proxy.cut_after(b"fallback:fleet")  # a read is read again
                assert not (await store.fleet_state()).paused
                assert proxy.seen(b"fallback:fleet") == 2
        finally:
            await store.aclose()


# --- Cluster -----------------------------------------------------------------------------------------


@pytest.fixture
async def private_cluster() -> AsyncIterator[RedisClusterServers]:
    """A three-master cluster of this test's own (its slots and announced ports get moved)."""
    cluster = await trio.to_thread.run_sync(start_redis_cluster)
    try:
        cluster.flush()
        yield cluster
    finally:
        cluster.stop()


def _owner(cluster: RedisClusterServers, key: str) -> int:
    """Index (in ``cluster.ports``) of the master serving ``key`` now."""
    with cluster.client() as client:
        return cluster.ports.index(int(client.get_node_from_key(key).port))


def _announce(cluster: RedisClusterServers, index: int, port: int) -> None:
    """Master ``index`` tells clients (and, by gossip, the other masters) to reach it on ``port``;
    returns once every master's slot map says so."""
    with cluster.node(index) as node:
        node.config_set("cluster-announce-port", port)
    deadline = time.monotonic() + TIMEOUT
    for i in range(len(cluster.ports)):
        with cluster.node(i) as node:
            while not any(entry[2][1] == port for entry in node.execute_command("CLUSTER SLOTS")):
                assert time.monotonic() < deadline, "the announced port did not spread"
                time.sleep(0.05)


async def test_cluster_a_write_whose_reply_was_lost_is_not_sent_again(
    private_cluster: RedisClusterServers,
) -> None:
    cluster = private_cluster
    owner = _owner(cluster, COUNTER)
    async with cutting_proxy(cluster.ports[owner]) as (proxy, port):
        await trio.to_thread.run_sync(_announce, cluster, owner, port)
        seed = cluster.ports[(owner + 1) % len(cluster.ports)]
        store = RedisStore(f"redis+cluster://127.0.0.1:{seed}", probe_interval=0)
        try:
            with trio.fail_after(TIMEOUT):
                await store.increment("beta", CounterField.TOKENS, now=NOW)
                assert proxy.seen(SHA) == 1  # through the proxy
                proxy.cut_after(SHA)
                lost = await _lost(store.increment, "beta", CounterField.TOKENS, now=NOW)
                with cluster.node(owner) as node:
                    assert node.hget(COUNTER, "tokens") == "2"  # the old code: 3
                assert proxy.seen(SHA) == 2  # none sent again (the old code: a node's commands, one by one)
                assert lost
                # a mint's record (three scripts, up to three masters) is a write too
                proxy.cut_after(SHA)
                mint = functools.partial(store.record_mint, session_id="s-1", node_id="n-1", ttl=60)
                lost = await _lost(mint, "beta", now=NOW)
                with cluster.node(owner) as node:
                    assert node.hget(COUNTER, "tokens") == "3"
                assert proxy.seen(SHA) == 3
                assert lost
                # a read is read again
                proxy.cut_after(COUNTER.encode())
                (counts,) = await store.hour_counts("beta", [hour_bucket(NOW)])
                assert counts.tokens == 3
                assert proxy.seen(COUNTER.encode()) >= 2
        finally:
            await store.aclose()


def _node_id(cluster: RedisClusterServers, index: int) -> str:
    with cluster.node(index) as node:
        return str(node.execute_command("CLUSTER MYID"))


async def test_cluster_a_redirected_write_runs_once_on_its_new_master(
    private_cluster: RedisClusterServers,
) -> None:
    """A stale slot map (MOVED) and a slot being migrated (ASK): the command did not run where the
    store sent it, so it goes on to the right master, and runs there once."""
    cluster = private_cluster
    store = RedisStore(cluster.url)
    try:
        with trio.fail_after(TIMEOUT):
            await store.increment("beta", CounterField.SESSIONS, now=NOW - 7200)  # slot map, scripts
            # MOVED: the counter's (empty) slot now belongs to another master; the store's map is old
            owner = _owner(cluster, COUNTER)
            other = (owner + 1) % len(cluster.ports)
            with cluster.client() as client:
                slot = client.keyslot(COUNTER)
            target = _node_id(cluster, other)
            for i in [other, owner, *(j for j in range(len(cluster.ports)) if j not in (owner, other))]:
                with cluster.node(i) as node:
                    node.execute_command("CLUSTER SETSLOT", slot, "NODE", target)
            holder = await store.record_mint("beta", now=NOW, session_id="s-1", node_id="n-1", ttl=60)
            assert holder == "n-1"
            with cluster.node(other) as node:
                assert node.hget(COUNTER, "tokens") == "1"
            with cluster.node(owner) as node:
                assert node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
            # ASK: the slot is being migrated back; the key is not on the old master yet
            with cluster.node(owner) as node:
                node.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", target)
            with cluster.node(other) as node:
                node.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", _node_id(cluster, owner))
                node.delete(COUNTER)  # absent on the migrating master: it answers ASK
            await store.increment("beta", CounterField.TOKENS, now=NOW)
            with cluster.node(other) as node:  # not on the master it was sent to
                assert node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0
            back = _node_id(cluster, owner)
            for i in [owner, other, *(j for j in range(len(cluster.ports)) if j not in (owner, other))]:
                with cluster.node(i) as node:
                    node.execute_command("CLUSTER SETSLOT", slot, "NODE", back)
            with cluster.node(owner) as node:  # the migration done: ran once, on the importing master
                assert node.hget(COUNTER, "tokens") == "1"
            assert await store.session_node("s-1") == "n-1"
            with cluster.client() as client:
                assert client.get(assignment_key("s-1")) == "n-1"
    finally:
        await store.aclose()
