"""A real beach-rescue fleet on 127.0.0.1: redis-server, ``rescue token-service``, N ``rescue relay``.

Every part is a child process started through its public command line (SPEC §11), with its own
log file, and can be stopped (SIGTERM or SIGKILL) and started again on the same ports, which is
what the chaos harness does to it and what an operator's supervisor would do.

- Redis is private: a unix socket in a fresh temporary directory, TCP off, no persistence (a
  restart loses every key, as a fresh Redis container would). With ``redis_mode="sentinel"`` it is
  a primary and a replica on 127.0.0.1 TCP ports watched by one Sentinel (quorum 1, a primary is
  down after 1 s), and every rescue process gets ``redis+sentinel://`` (decision 0013): a
  ``redis_failover`` fault kills the primary and the Sentinel promotes the replica.
- The token service signs with a throwaway key (``rescue keygen``) and mints without
  authentication (``BEACH_RESCUE_DISABLE_OIDC=1``, ``BEACH_DEV_ENABLE_FALLBACK_WS=1``; both are
  ignored under ``RESCUE_ENV=production``, which is removed from the children's environment).
- Relays verify tokens with the public JWK set from a file (so a relay restarted while the token
  service is down still starts), register in Redis and poll the token service for the kill switch.

Resource handling:
    :func:`open_fleet` kills whatever is still running when it exits (bounded, shielded) and
    removes the Redis socket directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import httpx
import trio

from rescue.testing import free_tcp_ports

__all__ = [
    "RELAY_TUNING",
    "SENTINEL_MASTER",
    "Fleet",
    "FleetError",
    "Service",
    "free_port",
    "open_fleet",
    "rescue_argv",
]

# How long a (re)started process may take to answer its readiness check. Python start-up plus
# imports take ~1 s on an idle machine; a shared 2-core box under load can take far longer.
START_TIMEOUT_S: Final = 60.0
# After SIGKILL a process is gone at once; after SIGTERM it may drain first (bounded by drain_s).
KILL_WAIT_S: Final = 10.0
# Readiness polling period.
POLL_S: Final = 0.05
# Each readiness/probe HTTP request; short, since a hung child must not stall the harness.
HTTP_TIMEOUT_S: Final = 2.0
# /debug/stats of a node holding a thousand sessions is a few hundred KiB of JSON made on a
# busy event loop: it gets longer than a probe.
STATS_TIMEOUT_S: Final = 15.0
# One bucket line of the token service's request histogram for the token route.
_TOKEN_BUCKET: Final = re.compile(
    r'^beach_fallback_request_duration_seconds_bucket\{(?=[^}]*route="/v1/fallback/token")[^}]*'
    r'le="([^"]+)"[^}]*\} (\S+)$',
    re.M,
)
# Sentinel mode: the master name, how soon a silent primary counts as down, and the failover bound.
SENTINEL_MASTER: Final = "chaos"
SENTINEL_DOWN_AFTER_MS: Final = 1000
SENTINEL_FAILOVER_TIMEOUT_MS: Final = 5000
# Environment the children must not inherit: it would change what they do behind our back.
_SCRUB_PREFIXES: Final = ("RESCUE_", "FALLBACK_WS_", "BEACH_")

# Relay settings the harness asks for when `rescue relay --help` offers them (flag -> value).
# A shorter drain keeps SIGTERM faults (whose reconnect_in_ms is spread over the drain window)
# to a few seconds; a higher handshake rate limit keeps a fleet-wide reconnect after a relay
# restart -- every session of the node at once, all from 127.0.0.1 -- from being rate limited.
RELAY_TUNING: Final = {
    "--drain-s": "5",
    "--handshakes-per-ip-per-min": "100000",
}


def _take_flags(args: Sequence[str], flags: Collection[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``--flag value`` pairs for ``flags`` out of ``args``: (their values, the rest)."""
    taken: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        if args[i] in flags and i + 1 < len(args):
            taken[args[i]] = args[i + 1]
            i += 2
        else:
            rest.append(args[i])
            i += 1
    return taken, rest


def rescue_argv(*args: str) -> list[str]:
    """The ``rescue`` command line (the console script next to this Python, else ``-m``)."""
    script = Path(sys.executable).with_name("rescue")
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-P", "-m", "rescue.cli", *args]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (kept for restarts on the same port):
    outside the kernel's ephemeral range, so no other process is handed it while a service is down
    for a restart, and under pytest-xdist from this worker's own share (``rescue.testing``)."""
    (port,) = free_tcp_ports()
    return port


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: ours minus RESCUE_*/BEACH_*/FALLBACK_WS_*, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_SCRUB_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class FleetError(Exception):
    """A fleet process could not be started or did not become ready."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Service:
    """One restartable child process.

    Attributes:
        name: short name (``redis``, ``token-service``, ``relay-1``, ...).
        argv: its command line.
        env: its environment.
        log_path: stdout and stderr are appended here (across restarts).
        ready: an async check; True once the process serves.
        process: the running process, if any.
        starts: how many times it was started.
        expected_exits: exits we caused (signals we sent).
        unexpected_exits: exits nobody asked for (crashes): each one fails a run.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], Awaitable[bool]]
    process: trio.Process | None = None
    starts: int = 0
    expected_exits: int = 0
    unexpected_exits: list[int | None] = field(default_factory=list)
    stopping: bool = False
    _log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """The running process's pid."""
        return self.process.pid if self.process is not None and self.process.returncode is None else None

    @property
    def running(self) -> bool:
        """Whether the process is alive (as far as ``poll`` knows)."""
        return self.process is not None and self.process.poll() is None

    async def start(self) -> float:
        """Start it and wait until ``ready``; the seconds that took.

        Raises:
            FleetError: it exited, or was not ready within :data:`START_TIMEOUT_S`.
        """
        if self.running:
            raise FleetError(f"{self.name} is already running")
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"\n==== chaos: start #{self.starts + 1} of {self.name}\n".encode())
        self._log.flush()
        started = trio.current_time()
        self.process = await trio.lowlevel.open_process(
            self.argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env
        )
        self.starts += 1
        with trio.move_on_after(START_TIMEOUT_S):
            while True:
                if self.process.poll() is not None:
                    raise FleetError(
                        f"{self.name} exited with {self.process.returncode} while starting:\n"
                        + _tail(self.log_path)
                    )
                if await self.ready():
                    return trio.current_time() - started
                await trio.sleep(POLL_S)
        await self.stop(signal.SIGKILL)
        raise FleetError(f"{self.name} was not ready within {START_TIMEOUT_S:g} s:\n" + _tail(self.log_path))

    async def stop(self, sig: signal.Signals = signal.SIGTERM, *, wait_s: float = KILL_WAIT_S) -> int | None:
        """Send ``sig`` and wait for the exit (SIGKILL after ``wait_s``); the exit status.

        Cancellation:
            Safe; a process left running is killed by :func:`open_fleet` at the end.
        """
        process = self.process
        if process is None:
            return None
        self.stopping = True
        try:
            if process.poll() is None:
                self.expected_exits += 1
                process.send_signal(sig)
                with trio.move_on_after(wait_s):
                    await process.wait()
                if process.poll() is None:
                    process.kill()
                    await process.wait()
            return process.returncode
        finally:
            if process.poll() is None:  # cancelled while waiting: don't leave it behind
                process.kill()
            self.process = None
            self.stopping = False

    def check_crash(self) -> bool:
        """Record (once) and report whether the process exited without being asked to."""
        process = self.process
        if self.stopping or process is None or process.poll() is None:
            return False
        self.unexpected_exits.append(process.returncode)
        self.process = None
        return True

    def close_log(self) -> None:
        """Close the log file."""
        if self._log is not None:
            self._log.close()
            self._log = None


class Fleet:
    """The running fleet. Made by :func:`open_fleet`.

    Attributes:
        redis: the redis-server.
        token_service: the token service.
        relays: the relay nodes, ``relay-1`` ... ``relay-N``.
        api_url: the token service's base URL.
        redis_url: ``unix://...`` of the private Redis.
        admin_key: the token service's admin bearer key.
        log_tag_key: ``RESCUE_LOG_TAG_KEY`` of the token service and every relay.
        relay_tuning: the relay flags from :data:`RELAY_TUNING` the relay CLI accepted.
        relay_flags_missing: the ones it does not offer.
    """

    def __init__(
        self,
        work_dir: Path,
        log_dir: Path,
        *,
        nodes: int,
        client: httpx.AsyncClient,
        env: dict[str, str] | None = None,
        token_service_args: Sequence[str] = (),
        relay_args: Sequence[str] = (),
        redis_mode: str = "single",
    ) -> None:
        if redis_mode not in ("single", "sentinel"):
            raise ValueError(f"redis_mode must be single or sentinel, not {redis_mode!r}")
        self.redis_mode = redis_mode
        self.work_dir = work_dir
        self.extra_env = dict(env or {})  # for every rescue child (OTEL_*, guardrail settings)
        self.token_service_args = list(token_service_args)
        self.relay_args = list(relay_args)
        self.log_dir = log_dir
        self.nodes = nodes
        self.http = client
        self.admin_key = secrets.token_urlsafe(24)
        # One deployment, one session-tag key: the token service and every relay tag a session
        # alike (rescue._log.session_tag); a caller's `env` may still override it.
        self.log_tag_key = secrets.token_urlsafe(32)
        self.extra_env = {"RESCUE_LOG_TAG_KEY": self.log_tag_key, **self.extra_env}
        self.redis_dir = Path(tempfile.mkdtemp(prefix="chaos-redis-"))  # short: unix socket path limit
        self.redis_socket = self.redis_dir / "redis.sock"
        self.redis_url = f"unix://{self.redis_socket}?db=0"
        # sentinel mode: the data servers (primary first, at the start) and the Sentinel
        self.redis_servers: list[Service] = []
        self.redis_ports: dict[str, int] = {}
        self.sentinel: Service | None = None
        self.sentinel_port = 0
        if redis_mode == "sentinel":
            self.sentinel_port = free_port()
            self.redis_url = f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{SENTINEL_MASTER}"
        self.api_port = free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.relay_tuning: dict[str, str] = {}
        self.relay_flags_missing: list[str] = []
        self.redis: Service | None = None
        self.token_service: Service | None = None
        self.relays: list[Service] = []
        self.relay_admin_ports: dict[str, int] = {}
        self.relay_ports: dict[str, int] = {}

    # ---------------------------------------------------------------------------- set-up

    async def _prepare(self, log_level: str) -> None:
        key = self.work_dir / "signing-key.jwk"
        jwks = self.work_dir / "jwks.json"
        done: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def run(name: str, *argv: str, check: bool) -> None:
            done[name] = await trio.run_process(
                rescue_argv(*argv), capture_stdout=True, capture_stderr=True, check=check, env=child_env()
            )

        # two independent process start-ups: side by side
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(run, "keygen", "keygen", "--out", str(key), "--force", check=True))
            nursery.start_soon(partial(run, "help", "relay", "--help", check=False))
        result, relay_help = done["keygen"], done["help"]
        sys.stderr.buffer.write(result.stderr)  # keygen's note on where the key went, as before
        json.loads(result.stdout)  # a JWK set, or the run stops here
        jwks.write_bytes(result.stdout)
        if relay_help.returncode != 0:
            raise FleetError(
                "`rescue relay --help` failed: " + relay_help.stderr.decode(errors="replace")[-500:]
            )
        offered = relay_help.stdout.decode()
        given, self.relay_args = _take_flags(self.relay_args, RELAY_TUNING)
        for flag, value in RELAY_TUNING.items():
            if flag in offered:
                self.relay_tuning[flag] = given.get(flag, value)  # relay_args win
            else:
                self.relay_flags_missing.append(flag)
        relay_log_level = ["--log-level", log_level] if "--log-level" in offered else []

        redis_binary = shutil.which("redis-server")
        if redis_binary is None:
            raise FleetError("redis-server is not installed (apt-get install redis-server)")
        if self.redis_mode == "sentinel":
            self._prepare_sentinel(redis_binary)
        self.redis = Service(
            "redis",
            [redis_binary, "--port", "0", "--unixsocket", str(self.redis_socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.redis_dir), "--daemonize", "no"],
            child_env(),
            self.log_dir / "redis.log",
            self._redis_ready,
        )  # fmt: skip
        env = child_env(
            {
                "BEACH_RESCUE_DISABLE_OIDC": "1",
                "BEACH_DEV_ENABLE_FALLBACK_WS": "1",
                "RESCUE_ADMIN_KEY": self.admin_key,
                # SIGTERM drains for --drain-s (default 10 s, sized for a load balancer's probes:
                # decision 0023); nothing balances over this one process, and a restart fault
                # must not wait out a drain for nobody (an env var: older revisions ignore it)
                "RESCUE_DRAIN_S": "0.5",
                # its admin port (decision 0024; default 9080) on a free port: two fleets, or a
                # fleet and a test, must not meet there (an env var, for the same reason)
                "RESCUE_ADMIN_PORT": str(free_port()),
                **self.extra_env,
            }
        )
        self.token_service = Service(
            "token-service",
            rescue_argv(
                "token-service", "--signing-key", str(key), "--redis-url", self.redis_url,
                "--host", "127.0.0.1", "--port", str(self.api_port), "--log-level", log_level,
                *self.token_service_args,
            ),
            env,
            self.log_dir / "token-service.log",
            self._token_service_ready,
        )  # fmt: skip
        for i in range(1, self.nodes + 1):
            node_id = f"relay-{i}"
            port, admin_port = free_port(), free_port()
            self.relay_ports[node_id] = port
            self.relay_admin_ports[node_id] = admin_port
            argv = rescue_argv(
                "relay", "--keys", str(jwks), "--host", "127.0.0.1", "--port", str(port),
                "--admin-port", str(admin_port), "--node-id", node_id,
                "--token-service", self.api_url, "--redis-url", self.redis_url,
                *relay_log_level,
            )  # fmt: skip
            for flag, value in self.relay_tuning.items():
                argv += [flag, value]
            argv += self.relay_args
            self.relays.append(
                Service(
                    node_id,
                    argv,
                    child_env(self.extra_env),
                    self.log_dir / f"{node_id}.log",
                    self._relay_ready(node_id),
                )
            )

    def _prepare_sentinel(self, redis_binary: str) -> None:
        for name in ("redis-a", "redis-b"):
            port = self.redis_ports[name] = free_port()
            directory = self.redis_dir / name
            directory.mkdir()
            # a replica's full sync starts at once (by default the primary waits 5 s for others)
            argv = [redis_binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--repl-diskless-sync-delay", "0",
                    "--dir", str(directory), "--daemonize", "no"]  # fmt: skip
            if name == "redis-b":
                argv += ["--replicaof", "127.0.0.1", str(self.redis_ports["redis-a"])]
            self.redis_servers.append(
                Service(name, argv, child_env(), self.log_dir / f"{name}.log", self._tcp_ping(port))
            )
        conf = self.redis_dir / "sentinel.conf"  # Sentinel rewrites its own config file
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\ndir {self.redis_dir}\n"
            f"sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {self.redis_ports['redis-a']} 1\n"
            f"sentinel down-after-milliseconds {SENTINEL_MASTER} {SENTINEL_DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SENTINEL_MASTER} {SENTINEL_FAILOVER_TIMEOUT_MS}\n"
        )
        self.sentinel = Service(
            "sentinel",
            [redis_binary, str(conf), "--sentinel", "--daemonize", "no"],
            child_env(),
            self.log_dir / "sentinel.log",
            self._tcp_ping(self.sentinel_port),
        )

    def _tcp_ping(self, port: int) -> Callable[[], Awaitable[bool]]:
        async def ready() -> bool:
            return await redis_ping(port=port)

        return ready

    async def sentinel_command(self, *args: str) -> Any:
        """One command to the Sentinel (``None`` when it does not answer)."""
        import redis

        def call() -> Any:
            client = redis.Redis(
                host="127.0.0.1",
                port=self.sentinel_port,
                socket_timeout=HTTP_TIMEOUT_S,
                decode_responses=True,
            )
            try:
                return client.execute_command(*args)
            finally:
                client.close()

        try:
            return await trio.to_thread.run_sync(call)
        except (OSError, redis.RedisError):
            return None

    async def redis_primary(self) -> Service | None:
        """The data server the Sentinel names as primary right now."""
        answer = await self.sentinel_command("SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER)
        if not answer:
            return None
        port = int(answer[1])
        return next((s for s in self.redis_servers if self.redis_ports[s.name] == port), None)

    async def sentinel_settled(self) -> bool:
        """The primary and one replica are both up and known to the Sentinel (a failover can happen)."""
        primary = await self.redis_primary()
        if primary is None or not primary.running:
            return False
        replicas = await self.sentinel_command("SENTINEL", "replicas", SENTINEL_MASTER) or []
        for replica in replicas:
            fields = (
                dict(zip(replica[::2], replica[1::2], strict=False)) if isinstance(replica, list) else replica
            )
            flags = str(fields.get("flags", ""))
            if (
                "down" not in flags
                and "disconnected" not in flags
                and fields.get("master-link-status") == "ok"
            ):
                return True
        return False

    async def start(self, *, log_level: str = "INFO", start_nodes: int | None = None) -> None:
        """Start everything and wait until every node is registered and ready.

        Args:
            log_level: the children's log level.
            start_nodes: start only the first this many relays (the others stay stopped, to be
                started later: a scale-out).

        Raises:
            FleetError: a part did not start.
        """
        await self._prepare(log_level)
        assert self.redis is not None
        assert self.token_service is not None
        if self.redis_mode == "sentinel":
            assert self.sentinel is not None
            for server in self.redis_servers:
                await server.start()
            await self.sentinel.start()
            with trio.move_on_after(START_TIMEOUT_S):
                while not await self.sentinel_settled():  # noqa: ASYNC110 -- asks another process
                    await trio.sleep(POLL_S * 4)
            if not await self.sentinel_settled():
                raise FleetError("the Sentinel did not see a primary and a replica in time")
        else:
            await self.redis.start()
        await self.token_service.start()
        await self.init_store("chaos fleet: first start")  # a new deployment's one operator step
        starting = self.relays[:start_nodes]
        async with trio.open_nursery() as nursery:
            for relay in starting:
                nursery.start_soon(relay.start)
        with trio.move_on_after(START_TIMEOUT_S):
            # polls the token service over HTTP: there is nothing local to wait on
            while set(await self.registered_nodes()) != {r.name for r in starting}:  # noqa: ASYNC110
                await trio.sleep(POLL_S)
            return
        raise FleetError("relays did not all register with the token service in time")

    # ---------------------------------------------------------------------------- checks

    async def _get(self, url: str, wait_s: float = HTTP_TIMEOUT_S, **kwargs: Any) -> httpx.Response | None:
        try:
            return await self.http.get(url, timeout=wait_s, **kwargs)
        except httpx.HTTPError:
            return None

    async def _redis_ready(self) -> bool:
        return await redis_ping(self.redis_socket)

    async def _token_service_ready(self) -> bool:
        response = await self._get(f"{self.api_url}/healthz")
        return response is not None and response.status_code == 200

    def _relay_ready(self, node_id: str) -> Callable[[], Awaitable[bool]]:
        async def ready() -> bool:
            return await self.relay_ready(node_id)

        return ready

    async def relay_ready(self, node_id: str) -> bool:
        """``/readyz`` of one node answers 200."""
        response = await self._get(f"http://127.0.0.1:{self.relay_admin_ports[node_id]}/readyz")
        return response is not None and response.status_code == 200

    async def relay_stats(self, node_id: str) -> dict[str, Any] | None:
        """``/debug/stats`` of one node, or ``None`` when it does not answer."""
        response = await self._get(
            f"http://127.0.0.1:{self.relay_admin_ports[node_id]}/debug/stats", wait_s=STATS_TIMEOUT_S
        )
        return _json_object(response)

    async def session_placement(self) -> tuple[dict[str, dict[str, set[str]]], list[str]]:
        """Where every session's peers are connected, as the running nodes' ``/debug/stats`` say.

        Returns:
            ``{session tag: {role: {node, ...}}}`` over every running node (only roles with a
            connection), and the running nodes that did not answer.
        """
        placement: dict[str, dict[str, set[str]]] = {}
        silent: list[str] = []
        for relay in self.relays:
            if not relay.running:
                continue
            stats = await self.relay_stats(relay.name)
            if stats is None:
                silent.append(relay.name)
                continue
            for session in stats.get("session_detail") or []:
                for role, link in (session.get("peers") or {}).items():
                    if link is not None:
                        placement.setdefault(session["session"], {}).setdefault(role, set()).add(relay.name)
        return placement, silent

    async def split_sessions(self) -> tuple[dict[str, list[str]], int, list[str]]:
        """Sessions whose peers are connected to more than one node (SPEC §7 says never).

        Returns:
            ``{session tag: [nodes]}`` of the split ones, how many sessions had a connected
            peer, and the running nodes that did not answer (their sessions were not seen).
        """
        placement, silent = await self.session_placement()
        split = {}
        for tag, roles in placement.items():
            nodes = set().union(*roles.values())
            if len(nodes) > 1:
                split[tag] = sorted(nodes)
        return split, len(placement), silent

    async def token_latency_buckets(self) -> dict[float, float] | None:
        """The token service's own ``POST /v1/fallback/token`` latency histogram (cumulative).

        ``{upper bound in s: requests at or below it}`` (``inf`` is the total), from its
        ``/metrics``; ``None`` when it does not answer. Differences between two of these are
        the requests in between, as the service timed them: the harness's own lag is not in it.
        """
        response = await self._get(f"{self.api_url}/metrics")
        if response is None or response.status_code != 200:
            return None
        out: dict[float, float] = {}
        for match in _TOKEN_BUCKET.finditer(response.text):
            out[float(match.group(1))] = float(match.group(2))
        return out

    async def registered_nodes(self) -> list[str]:
        """Node ids the token service sees as live and not draining ([] when it cannot tell)."""
        response = await self._get(
            f"{self.api_url}/v1/admin/nodes", headers={"authorization": f"Bearer {self.admin_key}"}
        )
        if response is None or response.status_code != 200:
            return []
        try:
            nodes = response.json()["nodes"]
            return sorted(n["id"] for n in nodes if not n.get("draining"))
        except (ValueError, KeyError, TypeError):
            return []

    async def admin(self, *argv: str) -> Any:
        """Run ``rescue admin ARGV… --api <token service>`` as an operator would (the admin key
        in ``RESCUE_ADMIN_KEY``); its JSON answer.

        Raises:
            FleetError: the command failed (its stderr in the message).
        """
        result = await trio.run_process(
            rescue_argv("admin", *argv, "--api", self.api_url),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=child_env({"RESCUE_ADMIN_KEY": self.admin_key}),
        )
        if result.returncode != 0:
            stderr = result.stderr.decode(errors="replace")[-500:]
            raise FleetError(f"rescue admin {argv[0]} failed: {stderr}")
        return json.loads(result.stdout)

    async def init_store(self, reason: str) -> Any:
        """``rescue admin init-store``: what an operator runs once for a new deployment and after
        Redis came back empty (the runbook); the effective kill switch it answers."""
        return await self.admin("init-store", "--reason", reason)

    async def fleet_status(self) -> dict[str, Any] | None:
        """``GET /v1/fallback/status`` (what every relay polls), or None when it does not answer."""
        return _json_object(await self._get(f"{self.api_url}/v1/fallback/status"))

    async def control_plane_ok(self, session_id: str) -> bool:
        """A token can be minted right now (the probe session is never connected to)."""
        try:
            response = await self.http.post(
                f"{self.api_url}/v1/fallback/token",
                json={
                    "session_id": session_id,
                    "role": "host",
                    "cohort_id": "dev",
                    "client_version": "chaos-probe/1",
                    "telemetry_opt_in": False,
                },
                timeout=HTTP_TIMEOUT_S,
            )
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def relay(self, node_id: str) -> Service:
        """The relay service named ``node_id``."""
        for relay in self.relays:
            if relay.name == node_id:
                return relay
        raise KeyError(node_id)

    def services(self) -> list[Service]:
        """Every service made so far: redis, token service, relays."""
        if self.redis_mode == "sentinel":
            return [*self.redis_servers, *([self.sentinel] if self.sentinel else []),
                    *([self.token_service] if self.token_service else []), *self.relays]  # fmt: skip
        return [s for s in (self.redis, self.token_service, *self.relays) if s is not None]

    async def kill_all(self) -> None:
        """Stop everything: relays first, then the token service, then Redis (SIGTERM, bounded)."""
        async with trio.open_nursery() as nursery:
            for relay in self.relays:
                nursery.start_soon(relay.stop)
        for service in (self.token_service, self.redis, self.sentinel, *self.redis_servers):
            if service is not None:
                await service.stop()
        for service in self.services():
            service.close_log()


def _json_object(response: httpx.Response | None) -> dict[str, Any] | None:
    """A 200 answer's JSON object, or None (no answer, another status, not a JSON object)."""
    if response is None or response.status_code != 200:
        return None
    try:
        doc = response.json()
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


async def redis_ping(path: Path | None = None, *, port: int | None = None) -> bool:
    """Whether a Redis on unix socket ``path`` (or 127.0.0.1 ``port``) answers PING (RESP inline)."""
    try:
        with trio.move_on_after(HTTP_TIMEOUT_S):
            stream: trio.abc.Stream = (
                await trio.open_unix_socket(str(path))
                if path is not None
                else await trio.open_tcp_stream("127.0.0.1", port or 0)
            )
            async with stream:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(64)).startswith(b"+PONG")
    except OSError:
        return False
    return False


@contextlib.asynccontextmanager
async def open_fleet(
    work_dir: Path,
    *,
    nodes: int,
    log_level: str = "INFO",
    env: dict[str, str] | None = None,
    start_nodes: int | None = None,
    token_service_args: Sequence[str] = (),
    relay_args: Sequence[str] = (),
    redis_mode: str = "single",
) -> AsyncIterator[Fleet]:
    """Start a fleet under ``work_dir`` (logs in ``work_dir/logs``); stop it on the way out.

    ``env`` is added to the environment of the token service and every relay (``RESCUE_*``
    guardrail settings, ``OTEL_*`` tracing). ``start_nodes`` relays of ``nodes`` are started (all
    by default); ``token_service_args`` and ``relay_args`` are appended to those command lines
    (short TTLs in tests). ``redis_mode="sentinel"``: a primary, a replica and a Sentinel instead
    of one Redis (see the module docstring).

    Raises:
        FleetError: a part did not start (its log tail is in the message).
    """
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    async with httpx.AsyncClient() as client:
        fleet = Fleet(
            work_dir,
            log_dir,
            nodes=nodes,
            client=client,
            env=env,
            token_service_args=token_service_args,
            relay_args=relay_args,
            redis_mode=redis_mode,
        )
        try:
            await fleet.start(log_level=log_level, start_nodes=start_nodes)
            yield fleet
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(3 * KILL_WAIT_S) as scope:
                await fleet.kill_all()
            if scope.cancelled_caught:
                for service in fleet.services():
                    if service.process is not None and service.process.poll() is None:
                        service.process.kill()
            shutil.rmtree(fleet.redis_dir, ignore_errors=True)
