"""Shared test configuration.

Sections are owned by the part of the product they serve; add fixtures next to the section they
belong to. Every network test binds 127.0.0.1 port 0 and has a ``trio.fail_after`` bound.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# CI machines are small and noisy: no per-example deadline, and fewer examples unless asked.
settings.register_profile(
    "default", deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=100
)
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# ---------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist; docs/perf/test-suite.md)
#
# pyproject's addopts say `-n auto --dist loadfile`: each test file runs whole on one worker (its
# module fixtures -- a promtool batch, a browser, the schemathesis services -- are made once, and
# its tests keep their order). `auto` is decided here rather than by xdist: one worker per CPU this
# process may run on, at most MAX_TEST_WORKERS; none (the plain serial run) when the arguments name
# a single test file, where workers would only add their start-up. `-n N` on the command line (or
# PYTEST_XDIST_AUTO_NUM_WORKERS=N) wins; `-n 0` runs serially.
# ---------------------------------------------------------------------------------------------

import collections  # noqa: E402

import pytest  # noqa: E402

# CI has 2 cores; the suite is measured at 2 workers. Past ~4 the run is bound by its longest files
# (the chaos and drill smokes, ~30-50 s each) and by each worker's own collection.
MAX_TEST_WORKERS = 4


@pytest.hookimpl(optionalhook=True)  # a hook of xdist's: unknown to pytest without it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    override = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS")
    if override:
        return int(override)
    if config.args_source == pytest.Config.ArgsSource.ARGS:
        files = {arg.split("::", 1)[0] for arg in config.args}
        if len(files) == 1 and os.path.isfile(next(iter(files))):
            return 0
    return min(len(os.sched_getaffinity(0)), MAX_TEST_WORKERS)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test has a node id of its own, or the run stops.

    schemathesis (4.32, on pytest 9.2) names its per-operation tests ``test_with_keys[GET
    /healthz]`` and so on but gives each the id of its function, ``...::test_with_keys``; xdist's
    ``--dist loadfile`` keys a file's tests by id, so it ran the first of each and silently dropped
    the rest: 51 of test_tokenservice_schemathesis.py's 57 tests, in a run that passed. Such an
    item gets its name's ``[...]`` as its id's parameters, as pytest's own parametrized tests do.
    """
    counts = collections.Counter(item.nodeid for item in items)
    for item in items:
        if counts[item.nodeid] < 2 or not isinstance(item, pytest.Function):
            continue
        base, params = item.originalname, item.name[len(item.originalname) + 1 : -1]
        node_id = getattr(item, "_id", None)  # pytest 9's structured id (private)
        if item.name == f"{base}[{params}]" and node_id is not None and node_id.params is None:
            item._id = node_id.with_params(params)
    shared = [nodeid for nodeid, n in collections.Counter(i.nodeid for i in items).items() if n > 1]
    if shared:
        raise pytest.UsageError(f"tests share a node id (xdist would run only one of each): {shared[:5]}")


# ---------------------------------------------------------------------------------------------
# Redis (guardrails, token service)
#
# Tests never touch the machine's default Redis: each server here is a private `redis-server`
# listening only on a unix socket in a fresh temporary directory (`--port 0` disables TCP), with
# persistence off. `redis_url` shares one server per test session and flushes it before each test;
# `private_redis` gives a test its own server, which it may kill (outage tests).
# Every server is handed out *initialised* (the guardrail store's mark an operator's
# `rescue admin init-store` writes; without it the fleet reads as paused). A test about a store
# that lost its data flushes it or calls `restart_empty()`.
# ---------------------------------------------------------------------------------------------

import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import redis  # noqa: E402

from rescue.guardrails import initialise_redis  # noqa: E402

# Starting redis-server takes ~10 ms; a loaded 2-core CI box may take far longer.
REDIS_START_TIMEOUT_S = 15.0


@dataclass
class RedisServer:
    """A private redis-server process on a unix socket."""

    process: subprocess.Popen[bytes]
    socket_path: str
    directory: str

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}?db=0"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=self.socket_path, decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)

    def remove(self) -> None:
        """Stop it (SIGKILL also ends a SIGSTOPped server) and delete its directory, socket and all."""
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def initialise(self) -> None:
        """Write the guardrail store's initialised mark (what `rescue admin init-store` does)."""
        with self.client() as client:
            initialise_redis(client, now=time.time())

    def flush(self, *, initialise: bool = True) -> None:
        """Empty it (and initialise it again, unless told not to)."""
        with self.client() as client:
            client.flushall()
        if initialise:
            self.initialise()

    def restart_empty(self) -> None:
        """SIGKILL it and start a new, empty, *uninitialised* one on the same socket: what a
        Redis without persistence (a new container) looks like after a restart."""
        self.stop()
        self.process = _spawn_redis(self.socket_path, self.directory)
        _wait_ping(self)


def _spawn_redis(socket_path: str, directory: str) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (the CI script installs it: apt-get install redis-server)")
    return subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", socket_path, "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--dir", directory, "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _command(*args: str) -> bytes:
    """A command as a RESP array (an inline command would split a password with a space)."""
    return f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args
    )


def answers_ping(address: str | int, password: str | None = None) -> bool:
    """Whether the Redis on unix socket ``address`` (or 127.0.0.1 port ``address``) answers PING
    (after AUTH with ``password``): one try over a plain socket.

    Not redis-py: 5.0.0, the lowest we support, leaks the socket of a refused connection (a
    ResourceWarning that fails whichever test the collector runs in), and a server that is starting
    refuses connections.
    """
    family, target = (
        (socket.AF_UNIX, address) if isinstance(address, str) else (socket.AF_INET, ("127.0.0.1", address))
    )
    request = (_command("AUTH", password) if password is not None else b"") + _command("PING")
    replies = 2 if password is not None else 1
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(target)
            sock.sendall(request)
            answer = b""
            while answer.count(b"\r\n") < replies:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                answer += chunk
        except OSError:
            return False
    return answer.endswith(b"+PONG\r\n") and not answer.startswith(b"-")


def wait_for_ping(
    address: str | int, process: subprocess.Popen[bytes], deadline: float, password: str | None = None
) -> bool:
    """Wait until the Redis at ``address`` (:func:`answers_ping`) answers PING; False if ``process``
    exited or the ``time.monotonic()`` deadline passed."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        if answers_ping(address, password):
            return True
        time.sleep(0.01)
    return False


def _wait_ping(server: RedisServer) -> None:
    if wait_for_ping(server.socket_path, server.process, time.monotonic() + REDIS_START_TIMEOUT_S):
        return
    exited = server.process.poll() is not None
    server.remove()
    if exited:
        pytest.fail(f"redis-server exited with status {server.process.returncode}")
    pytest.fail("redis-server did not answer PING in time")


def start_redis_server() -> RedisServer:
    """Start a private redis-server, wait until it answers PING, initialise the guardrail store."""
    directory = tempfile.mkdtemp(prefix="rescue-redis-")  # short: unix socket paths max out at 107 bytes
    socket_path = os.path.join(directory, "redis.sock")
    server = RedisServer(_spawn_redis(socket_path, directory), socket_path, directory)
    _wait_ping(server)
    server.initialise()
    return server


def _running_redis() -> Iterator[RedisServer]:
    """A fixture's private Redis: started, and removed after."""
    server = start_redis_server()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_session_server() -> Iterator[RedisServer]:
    yield from _running_redis()


@pytest.fixture
def redis_url(redis_session_server: RedisServer) -> str:
    """URL of the shared private Redis, flushed (and initialised) for this test."""
    redis_session_server.flush()
    return redis_session_server.url


@pytest.fixture
def redis_sends(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every write of a request to a Redis server from now on, as the server's address, in order.

    redis-py sends a command, a pipeline or a script in one ``send_packed_command`` per connection
    (a cluster pipeline: one per node it touches), the trio-native client (decision 0020) in one
    ``_round_trip``, so this counts round trips. It wraps the real methods (the bytes still go to
    the real server).
    """
    import redis.connection

    from rescue.guardrails._native import NativeRedis

    sent: list[str] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def counting(self: Any, command: Any, check_health: bool = True) -> None:
        sent.append(f"{getattr(self, 'host', '')}:{getattr(self, 'port', '')}{getattr(self, 'path', '')}")
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    real_trip = NativeRedis._round_trip

    async def counting_trip(self: NativeRedis, conn: Any, payload: bytes, count: int) -> Any:
        sent.append(self.target.path or f"{self.target.host}:{self.target.port}")
        return await real_trip(self, conn, payload, count)

    monkeypatch.setattr(NativeRedis, "_round_trip", counting_trip)
    return sent


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis server of this test's own; the test may ``stop()`` it."""
    yield from _running_redis()


@pytest.fixture
def stalled() -> Iterator[list[RedisServer]]:
    """Servers a test SIGSTOPs (a stalled Redis); they are continued before the fixtures stop them."""
    servers: list[RedisServer] = []
    yield servers
    for server in servers:
        server.process.send_signal(signal.SIGCONT)


@pytest.fixture
def redis_factory() -> Iterator[Callable[[], RedisServer]]:
    """Start as many private Redis servers as a test needs (each may be stopped); all go at the end."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        server = start_redis_server()
        servers.append(server)
        return server

    try:
        yield start
    finally:
        for server in servers:
            server.remove()


# ---------------------------------------------------------------------------------------------
# Redis Cluster (decision 0013): three private masters on 127.0.0.1 (a cluster needs TCP, and a bus
# port per node), each in its own directory of one temporary directory, no persistence, joined by
# `redis-cli --cluster create`. The ports, like every port a server here is told in advance, come
# from rescue.testing.free_tcp_ports: outside the ephemeral range, and this xdist worker's own.
# Session-scoped (start-up takes a second or two); `redis_cluster_url` flushes every master before
# each test.
# ---------------------------------------------------------------------------------------------

import random  # noqa: E402

import redis.cluster  # noqa: E402

from rescue.testing import free_tcp_ports  # noqa: E402

CLUSTER_MASTERS = 3
# joining three masters and gossiping the slot map to "ok" takes 1-3 s; the box may be loaded
CLUSTER_START_TIMEOUT_S = 60.0


def tcp_redis_argv(port: int, directory: str, *extra: str) -> list[str]:
    """A private redis-server on 127.0.0.1:``port`` in ``directory``, persistence off; a replica's
    full sync starts at once (the default waits 5 s for more replicas to share one transfer)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (the CI script installs it: apt-get install redis-server)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--repl-diskless-sync-delay", "0", "--dir", directory, "--daemonize", "no", *extra]  # fmt: skip


@dataclass
class RedisClusterServers:
    """A private three-master Redis Cluster on 127.0.0.1."""

    processes: list[subprocess.Popen[bytes]]
    ports: list[int]
    directory: str

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def node(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.ports[index], decode_responses=True, socket_timeout=5)

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(
            host="127.0.0.1", port=self.ports[0], decode_responses=True, socket_timeout=5
        )

    def flush(self, *, initialise: bool = True) -> None:
        """Empty every node (data and scripts), and initialise the guardrail store again unless
        told not to (like `RedisServer.flush`)."""
        for i in range(len(self.ports)):
            with self.node(i) as node:
                if node.info("replication")["role"] != "master":
                    continue  # a replica follows its master (and refuses writes)
                node.flushall()
                node.script_flush()
        if initialise:
            with self.client() as client:
                initialise_redis(client, now=time.time())

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
        for process in self.processes:
            process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def start_redis_cluster(masters: int = CLUSTER_MASTERS, replicas: int = 0) -> RedisClusterServers:
    """Start ``masters`` cluster-enabled redis-servers (and ``replicas`` replicas of each), join them
    into one cluster, wait for "ok" (and every replica in sync)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed (it comes with redis-server)")
    servers = RedisClusterServers([], [], tempfile.mkdtemp(prefix="rescue-cluster-"))
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    try:
        while len(servers.ports) < masters * (1 + replicas):
            port, bus_port = free_tcp_ports(2)
            directory = os.path.join(servers.directory, str(port))
            os.mkdir(directory)
            process = subprocess.Popen(
                tcp_redis_argv(port, directory, "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                               "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000"),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
            if wait_for_ping(port, process, deadline):
                servers.processes.append(process)
                servers.ports.append(port)
                continue
            process.kill()
            process.wait(timeout=10)
            if time.monotonic() > deadline:
                pytest.fail("cluster redis-servers did not start in time")
            # a process outside this test run took a port between the check and the bind: try others
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in servers.ports),
             "--cluster-replicas", str(replicas), "--cluster-yes"],
            check=True, capture_output=True, timeout=CLUSTER_START_TIMEOUT_S,
        )  # fmt: skip
        for i in range(len(servers.ports)):
            with servers.node(i) as node:
                while node.execute_command("CLUSTER INFO").get("cluster_state") != "ok" or (
                    node.info("replication")["role"] != "master"
                    and node.info("replication").get("master_link_status") != "up"
                ):
                    if time.monotonic() > deadline:
                        pytest.fail("the cluster did not reach cluster_state:ok in time")
                    time.sleep(0.05)
        return servers
    except BaseException:
        servers.stop()
        raise


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[RedisClusterServers]:
    servers = start_redis_cluster()
    try:
        yield servers
    finally:
        servers.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster_session: RedisClusterServers) -> str:
    """``redis+cluster://`` URL of the shared private cluster, flushed (data and scripts) for this test."""
    redis_cluster_session.flush()
    return redis_cluster_session.url


# ---------------------------------------------------------------------------------------------
# Redis Sentinel (decision 0013): a primary, a replica and three sentinels (quorum 2), private, on
# 127.0.0.1 ports from free_tcp_ports in one temporary directory, no persistence. Automatic failover
# is held off (down-after 60 s) so a test decides when the replica is promoted (`SENTINEL FAILOVER`)
# and can look at the time in between, when no primary answers. Function-scoped: tests kill its
# servers.
# ---------------------------------------------------------------------------------------------

SENTINEL_MASTER = "rescue"
SENTINELS = 3
# the sentinels ask for a password (they use it among themselves too): the URL's
# sentinel_password option is exercised by every test on this set-up
SENTINEL_PASSWORD = "sentinel-secret"


@dataclass
class SentinelServers:
    """A private primary + replica + sentinels. ``primary`` / ``replica``: indexes into ``data_ports``."""

    data: list[subprocess.Popen[bytes]]
    data_ports: list[int]
    sentinels: list[subprocess.Popen[bytes]]
    sentinel_ports: list[int]
    directory: str

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SENTINEL_MASTER}?sentinel_password={SENTINEL_PASSWORD}"

    def data_client(self, index: int) -> redis.Redis:
        return redis.Redis(port=self.data_ports[index], decode_responses=True, socket_timeout=5)

    def sentinel_client(self, index: int) -> redis.Redis:
        return redis.Redis(
            port=self.sentinel_ports[index],
            password=SENTINEL_PASSWORD,
            decode_responses=True,
            socket_timeout=5,
        )

    def master_port(self, index: int) -> int:
        """The primary's port as sentinel ``index`` names it now."""
        with self.sentinel_client(index) as client:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SENTINEL_MASTER)[1])

    def stop(self) -> None:
        for process in [*self.data, *self.sentinels]:
            if process.poll() is None:
                process.kill()
        for process in [*self.data, *self.sentinels]:
            process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


def _start(argv: list[str], deadline: float, password: str | None = None) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0
    if port and wait_for_ping(port, process, deadline, password):
        return process
    process.kill()
    process.wait(timeout=10)
    pytest.fail(f"redis-server on port {port} did not start (port taken?)")


def _wait_until(condition: Callable[[], bool], deadline: float) -> None:
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail("the sentinel set-up did not become ready in time")
        time.sleep(0.05)


def start_sentinel_servers() -> SentinelServers:
    """Start a primary, one replica and :data:`SENTINELS` sentinels that all know both servers."""
    rng = random.Random()
    servers = SentinelServers([], [], [], [], tempfile.mkdtemp(prefix="rescue-sentinel-"))
    deadline = time.monotonic() + CLUSTER_START_TIMEOUT_S
    try:
        data_ports = free_tcp_ports(2)
        for role, port in zip(("primary", "replica"), data_ports, strict=True):
            directory = os.path.join(servers.directory, role)
            os.mkdir(directory)
            extra = [] if role == "primary" else ["--replicaof", "127.0.0.1", str(servers.data_ports[0])]
            servers.data.append(_start(tcp_redis_argv(port, directory, *extra), deadline))
            servers.data_ports.append(port)
        # Each sentinel's config already names the replica and the other sentinels (their ids
        # fixed here), as a restarted Sentinel's rewritten config would: otherwise each learns of
        # them by gossip (hello messages every 2 s), ~5 s before the first test could start.
        ports = free_tcp_ports(SENTINELS)
        ids = [f"{rng.getrandbits(160):040x}" for _ in range(SENTINELS)]
        for i, port in enumerate(ports):
            config = os.path.join(servers.directory, f"sentinel-{i}.conf")  # sentinels rewrite it
            with open(config, "w") as f:
                f.write(
                    f"port {port}\nbind 127.0.0.1\ndir {servers.directory}\n"
                    f"sentinel myid {ids[i]}\n"
                    f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {servers.data_ports[0]} 2\n"
                    f"sentinel down-after-milliseconds {SENTINEL_MASTER} 60000\n"
                    f"sentinel failover-timeout {SENTINEL_MASTER} 10000\n"
                    f"sentinel known-replica {SENTINEL_MASTER} 127.0.0.1 {servers.data_ports[1]}\n"
                    + "".join(
                        f"sentinel known-sentinel {SENTINEL_MASTER} 127.0.0.1 {ports[j]} {ids[j]}\n"
                        for j in range(SENTINELS)
                        if j != i
                    )
                    + f"requirepass {SENTINEL_PASSWORD}\n"
                )
            binary = tcp_redis_argv(port, servers.directory)[0]
            servers.sentinels.append(
                _start([binary, config, "--sentinel", "--port", str(port)], deadline, SENTINEL_PASSWORD)
            )
            servers.sentinel_ports.append(port)
        # ready: the replica is in sync, and every sentinel knows it and the other sentinels (so
        # after a failover each hears of the new primary from the others, through the replica)
        with servers.data_client(1) as replica:
            _wait_until(lambda: replica.info("replication").get("master_link_status") == "up", deadline)
        for i in range(SENTINELS):
            with servers.sentinel_client(i) as sentinel:
                _wait_until(
                    lambda: (
                        int(sentinel.sentinel_master(SENTINEL_MASTER)["num-slaves"]) == 1
                        and len(sentinel.sentinel_sentinels(SENTINEL_MASTER)) == SENTINELS - 1
                    ),
                    deadline,
                )
        # handed out initialised, like every Redis here; WAIT: the replica has the mark too
        with servers.data_client(0) as primary:
            initialise_redis(primary, now=time.time())
            primary.execute_command("WAIT", 1, int(CLUSTER_START_TIMEOUT_S * 1000))
        return servers
    except BaseException:
        servers.stop()
        raise


@pytest.fixture
def redis_sentinel() -> Iterator[SentinelServers]:
    """A private primary + replica + three sentinels of this test's own (it may kill any of them)."""
    servers = start_sentinel_servers()
    try:
        yield servers
    finally:
        servers.stop()


# ---------------------------------------------------------------------------------------------
# Real `rescue token-service` and `rescue relay` processes, with the flags an operator uses
# ---------------------------------------------------------------------------------------------

import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import AsyncIterator  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import trio  # noqa: E402

SERVICE_PROCESS_ENV = {"RESCUE_SERVICE_KEYS": "svc", "RESCUE_ADMIN_KEY": "adm", "RESCUE_ENV": "test"}
# the headers that go with SERVICE_PROCESS_ENV's keys
SERVICE_AUTH = {"authorization": "Bearer svc"}
ADMIN_AUTH = {"authorization": "Bearer adm"}


def clean_env() -> dict[str, str]:
    """This process's environment without ``RESCUE_*``/``FALLBACK_*`` settings: a ``rescue`` process a
    test starts reads only the flags the test gives it."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("RESCUE_", "FALLBACK_"))}


def token_request(session: str, role: str = "host", cohort: str = "beta") -> dict[str, object]:
    """A ``POST /v1/fallback/token`` body (telemetry opted out)."""
    return {"session_id": session, "role": role, "cohort_id": cohort, "client_version": "t/1",
            "telemetry_opt_in": False}  # fmt: skip


@asynccontextmanager
async def token_service_process(
    key_file: str, redis_url: str, *extra: str
) -> AsyncIterator[tuple[trio.Process, int]]:
    """``rescue token-service --redis-url URL`` on 127.0.0.1, port 0; yields (process, port).

    Service key ``svc``, admin key ``adm``. Killed on the way out if still running (a test that
    checks the exit sends SIGTERM and waits itself). The caller bounds the start with fail_after.
    SIGTERM drains for 0.2 s, not the default 10 s (a test that times the drain passes its own
    ``--drain-s`` in ``extra``: the last one wins). The admin port is on too, at any free port
    (:func:`token_service_listening` says which).
    """
    async with token_service_listening(key_file, redis_url, *extra) as (process, listening):
        yield process, listening["port"]


@asynccontextmanager
async def token_service_listening(
    key_file: str, redis_url: str, *extra: str
) -> AsyncIterator[tuple[trio.Process, dict[str, Any]]]:
    """:func:`token_service_process`, yielding its ``tokenservice.listening`` log line (``port``,
    ``admin_port``) instead of the port; the rest of its stderr is left unread in the pipe."""
    env = {**os.environ, **SERVICE_PROCESS_ENV}
    argv = [sys.executable, "-P", "-m", "rescue.cli", "token-service", "--signing-key", key_file,
            "--redis-url", redis_url, "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
            "--relay-url", "wss://r/v1/connect", "--drain-s", "0.2", *extra]  # fmt: skip
    process = await trio.lowlevel.open_process(argv, env=env, stderr=subprocess.PIPE)
    assert process.stderr is not None
    try:
        buffer = b""
        listening = None
        while listening is None:
            chunk = await process.stderr.receive_some(4096)
            assert chunk, f"token-service exited early: {buffer.decode(errors='replace')}"
            buffer += chunk
            for line in buffer.split(b"\n")[:-1]:  # whole lines only
                if b"tokenservice.listening" in line:
                    listening = json.loads(line)
        yield process, listening
    finally:
        with trio.CancelScope(shield=True):  # also when a fail_after fired: never leave it running
            if process.returncode is None:
                process.kill()
                await process.wait()
            await process.stderr.aclose()


async def open_relay_process(
    jwks: Path, log: Path, *extra: str, preexec_fn: Callable[[], object] | None = None
) -> trio.Process:
    """``rescue relay --keys JWKS --port 0 --admin-port 0 *extra`` with none of this process's
    ``RESCUE_*`` settings (:func:`clean_env`), stderr (its JSON log) into ``log``; stopping it is
    the caller's job. ``preexec_fn`` runs in the child before it starts (a lower fd limit)."""
    with log.open("wb") as stderr:
        return await trio.lowlevel.open_process(
            [sys.executable, "-P", "-m", "rescue.cli", "relay", "--keys", str(jwks), "--port", "0",
             "--admin-port", "0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=clean_env(),
            preexec_fn=preexec_fn,
        )  # fmt: skip


async def start_relay_process(
    jwks: Path, log: Path, *extra: str, preexec_fn: Callable[[], object] | None = None
) -> tuple[trio.Process, dict[str, Any]]:
    """:func:`open_relay_process`, once it is listening: the process and its ``relay.listening``
    line (``url``, ``admin_port``, ...). Stopping it is the caller's job, unless it does not get
    there: exited (an AssertionError with its log) or not within 30 s (killed, ``TooSlowError``)."""
    proc = await open_relay_process(jwks, log, *extra, preexec_fn=preexec_fn)
    try:
        with trio.fail_after(30):
            while True:
                for line in log.read_bytes().split(b"\n")[:-1]:  # whole lines only
                    if (
                        line.startswith(b"{")
                        and (event := json.loads(line)).get("event") == "relay.listening"
                    ):
                        return proc, event
                assert proc.poll() is None, f"relay exited early: {log.read_text(errors='replace')}"
                await trio.sleep(0.05)
    except BaseException:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        raise


@asynccontextmanager
async def relay_process(jwks: Path, redis_url: str, node_id: str, log: Path) -> AsyncIterator[trio.Process]:
    """``rescue relay --redis-url URL`` (standalone: local token checks, node registration every
    second), stderr into ``log``; killed on the way out if still running."""
    process = await open_relay_process(
        jwks, log, "--node-id", node_id, "--redis-url", redis_url, "--register-ttl-s", "3", "--drain-s", "0.5"
    )
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
                await process.wait()


# ---------------------------------------------------------------------------------------------
# Browser peer (web/, the /join/ page): node and Chromium
#
# Tests that need node (the JS client's own tests, the CBOR/frame cross-fuzz, the bundle check) or
# Chromium (the Playwright tests) are skipped with a reason on a machine without them, so
# `./run test` works anywhere. CI must never skip them silently: `.ci/run` installs node, npm and
# Chromium and exports RESCUE_REQUIRE_BROWSER=1, which turns those skips into failures. (Not keyed
# on CI=true: a runner without the system Chromium, like the GitHub workflow today, then reports
# the skips with their reason instead of failing for a tool it was never given.)
# ---------------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parent.parent
WEB_DIR = REPO_ROOT / "web"
CHROMIUM = "/usr/bin/chromium"


def browser_tests_required() -> bool:
    """Whether a missing node/Chromium is a failure rather than a skip (.ci/run)."""
    return os.environ.get("RESCUE_REQUIRE_BROWSER", "") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip the test (developer machine) or fail it (CI, see :func:`browser_tests_required`)."""
    if browser_tests_required():
        pytest.fail(f"{reason} (required: RESCUE_REQUIRE_BROWSER=1, as .ci/run sets it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def node_web() -> Path:
    """The web/ directory with its npm dependencies installed, and node on PATH."""
    if shutil.which("node") is None:
        skip_or_fail("node is not installed (the browser client's tests run under node)")
    if not (WEB_DIR / "package.json").is_file():
        skip_or_fail("no web/ directory (an installed package, not a checkout)")
    if not (WEB_DIR / "node_modules").is_dir():
        skip_or_fail("web/node_modules is missing: run `just web-deps` (npm ci from the lock file)")
    return WEB_DIR


@pytest.fixture(scope="session")
def chromium_path() -> str:
    """The system Chromium Playwright drives (no browser downloads), and Playwright itself."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        skip_or_fail("playwright is not installed (it is in the dev extra)")
    if not os.access(CHROMIUM, os.X_OK):
        skip_or_fail(f"no Chromium at {CHROMIUM} (Debian package chromium)")
    return CHROMIUM


# ---------------------------------------------------------------------------------------------
# Deploy tools (hadolint, promtool, ...): a check that needs one skips without it on a developer
# machine and fails in CI (CI=true), which installs them (scripts/validate-deploy).
# ---------------------------------------------------------------------------------------------


def require_tool(name: str, install: str = "see scripts/validate-deploy") -> str:
    """The path of the tool ``name`` (on PATH or in the checkout's .venv), else skip the test, or fail
    it in CI; ``install`` says how to get it."""
    path = shutil.which(name) or shutil.which(name, path=str(REPO_ROOT / ".venv" / "bin"))
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI ({install})")
        pytest.skip(f"{name} not installed ({install})")
    return path


# ---------------------------------------------------------------------------------------------
# Independent implementations (oracles) from the dev extra
#
# Interop and known-answer tests check rescue against other implementations (cwt, cryptography's
# Argon2id). The range jobs (scripts/range-check: the runtime dependencies at their lowest and
# newest allowed versions, no dev extra) run those files with RESCUE_RANGE_JOB=1, where a missing
# oracle skips its check; everywhere else a missing oracle is an error, never a silent skip.
# ---------------------------------------------------------------------------------------------

import importlib  # noqa: E402
from types import ModuleType  # noqa: E402


@pytest.fixture
def oracle() -> Callable[[str], ModuleType]:
    def load(name: str) -> ModuleType:
        if os.environ.get("RESCUE_RANGE_JOB"):
            return pytest.importorskip(name, reason=f"{name} is not installed in this range job")
        return importlib.import_module(name)

    return load


# Log events
# ---------------------------------------------------------------------------------------------

import logging  # noqa: E402


@pytest.fixture
def events() -> Iterator[list[logging.LogRecord]]:
    """The log records of the token service and the guardrails (DEBUG and up) during the test."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect()
    loggers = [logging.getLogger("rescue.tokenservice"), logging.getLogger("rescue.guardrails")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    yield records
    for lg, level in zip(loggers, old, strict=True):
        lg.removeHandler(handler)
        lg.setLevel(level)


# --- long-running harnesses (chaos/, soak/) run as an operator would ------------------------------


def run_harness(
    script: str, *args: str, out: Path, runs: str, timeout: float
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any], Path]:
    """Run ``python <repo>/<script> *args --out OUT`` with no ``RESCUE_*``/``BEACH_*``/
    ``FALLBACK_WS_*`` settings leaking in from the test's environment; (the finished process, its
    one ``OUT/<runs>-*/report.json``, that run's folder). Fails with the harness's output when
    there is not exactly one report."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESCUE_", "BEACH_", "FALLBACK_WS_"))}
    result = subprocess.run(
        [sys.executable, str(root / script), *args, "--out", str(out)],
        capture_output=True, text=True, timeout=timeout, cwd=root, env=env, check=False,
    )  # fmt: skip
    reports = list(out.glob(f"{runs}-*/report.json"))
    assert len(reports) == 1, result.stdout[-3000:] + result.stderr[-3000:]
    return result, json.loads(reports[0].read_text()), reports[0].parent
