"""``rescue relay`` (SPEC §11): one relay node.

::

    rescue relay --keys JWKS_FILE_OR_URL [--host H] [--port P] [--admin-port M] [--node-id N]
                 [--token-service URL] [--redis-url URL] [--tls-cert F --tls-key F] [limits…]

Without ``--token-service`` the node runs standalone: local token verification only (kill switch
from ``FALLBACK_WS_PAUSED=1`` alone, no activation reports). SIGTERM (or SIGINT) drains: ``/readyz``
turns 503, listeners close, every peer gets CLOSE ``SERVER_SHUTDOWN`` with ``reconnect_in_ms``
spread over ``--drain-s``, and the process exits 0 once they are gone or the drain period ends.

``--nodes N`` (N ≥ 2) runs N such nodes as child processes on consecutive ports, node ``i`` with id
``<node-id>-<i>``, restarting any that crashes and draining all of them on SIGTERM
(``rescue.relay._supervisor``): one node per core on a multi-core host.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from functools import partial

import trio

from rescue import _build as build
from rescue._log import LOG_TAG_KEY_ENV, configure_logging, configure_session_tags, get_logger, log_event
from rescue._tracing import traced_process
from rescue.cli import add_option
from rescue.errors import ConfigError
from rescue.relay import DEFAULT_ADMIN_PORT, DEFAULT_PORT, Relay, RelayConfig, Supervisor, node_specs, tune_gc

__all__ = ["build_config", "register", "run_relay"]

_LOG = get_logger("rescue.relay")
_TRUE = frozenset({"1", "true", "yes", "on"})
_DEFAULTS = RelayConfig(keys="-")  # only to show the defaults in --help


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``relay`` sub-command."""
    p = subparsers.add_parser(
        "relay",
        help="run a relay node (data plane)",
        description="Run one relay node: pairs the two peers of each session and forwards their "
        "end-to-end encrypted frames (SPEC §2), with an admin HTTP port (/livez, /healthz, /readyz, "
        "/metrics, /debug/stats). FALLBACK_WS_PAUSED=1 starts it paused (refusing new handshakes); "
        "RESCUE_REPORT_KEY is the bearer key for activation reports when the token service wants one; "
        "RESCUE_LOG_TAG_KEY keys the session tags in logs and spans (the same value on every relay "
        "and the token service of a deployment).",
    )
    add_option(
        p,
        "--keys",
        metavar="JWKS_FILE_OR_URL",
        default=None,
        help="JWK set verifying tokens (file or http(s) URL); default: the token service's /v1/fallback/keys",
    )
    add_option(p, "--host", default=_DEFAULTS.host, metavar="H", help="address the WebSocket port binds")
    add_option(p, "--port", type=int, default=DEFAULT_PORT, metavar="P", help="WebSocket port (0: any)")
    add_option(
        p,
        "--admin-port",
        type=int,
        default=DEFAULT_ADMIN_PORT,
        metavar="M",
        help="admin HTTP port (0: any, -1: off)",
    )
    add_option(
        p, "--admin-host", default=None, metavar="H", help="address the admin port binds (default --host)"
    )
    add_option(p, "--node-id", default=_DEFAULTS.node_id, metavar="N", help="this node's id (tokens' aud)")
    add_option(
        p,
        "--public-url",
        default=None,
        metavar="URL",
        help="ws(s)://…/v1/connect that clients reach this node at (registered in Redis)",
    )
    add_option(p, "--token-service", default=None, metavar="URL", help="token service base URL")
    add_option(
        p,
        "--redis-url",
        default=None,
        metavar="URL",
        help="Redis for node registration (SPEC §7); the token service's URL forms, "
        "redis+cluster:// and redis+sentinel:// included",
    )
    add_option(p, "--tls-cert", default=None, metavar="F", help="PEM certificate chain for wss://")
    add_option(p, "--tls-key", default=None, metavar="F", help="PEM private key for wss://")
    add_option(
        p, "--heartbeat-s", type=int, default=_DEFAULTS.heartbeat_s, metavar="S", help="heartbeat interval"
    )
    add_option(
        p,
        "--resume-grace-s",
        type=int,
        default=_DEFAULTS.resume_grace_s,
        metavar="S",
        help="how long a lone peer waits for its partner to come back (PEER_GONE)",
    )
    add_option(
        p,
        "--pair-timeout-s",
        type=float,
        default=_DEFAULTS.pair_timeout_s,
        metavar="S",
        help="how long a peer waits for its first partner (PAIR_TIMEOUT)",
    )
    add_option(p, "--max-frame", type=int, default=_DEFAULTS.max_frame, metavar="B", help="largest message")
    add_option(
        p, "--max-sessions", type=int, default=_DEFAULTS.max_sessions, metavar="N", help="sessions per node"
    )
    add_option(
        p,
        "--max-connections",
        type=int,
        default=_DEFAULTS.max_connections,
        metavar="N",
        help="open WebSocket connections at most (0: the fd limit less --fd-reserve); past it one "
        "still in its upgrade or before HELLO is closed for the newcomer, or the newcomer gets 503 "
        "server_busy (and /readyz is 503 meanwhile); sessions are never shed",
    )
    add_option(
        p,
        "--fd-reserve",
        type=int,
        default=_DEFAULTS.fd_reserve,
        metavar="N",
        help="file descriptors the WebSocket listener leaves to the admin port (a quarter of them), "
        "Redis, the token service, TLS files and logs",
    )
    add_option(
        p,
        "--handshakes-per-ip-per-min",
        type=int,
        default=_DEFAULTS.handshakes_per_ip_per_min,
        metavar="N",
        help="handshakes per source address per minute (RATE_LIMITED; 0: off)",
    )
    add_option(
        p,
        "--max-bytes-per-s",
        type=int,
        default=_DEFAULTS.max_bytes_per_s,
        metavar="B",
        help="forwarding rate per connection and direction, throttled by not reading (0: unlimited)",
    )
    add_option(
        p,
        "--drain-s",
        type=float,
        default=_DEFAULTS.drain_s,
        metavar="S",
        help="on SIGTERM, how long peers get to leave (and the spread of their reconnect_in_ms)",
    )
    add_option(
        p,
        "--status-stale-s",
        type=float,
        default=_DEFAULTS.status_stale_s,
        metavar="S",
        help="refuse new handshakes once the token service's paused state is older than this",
    )
    add_option(
        p,
        "--upgrade-timeout-s",
        type=float,
        default=_DEFAULTS.upgrade_timeout_s,
        metavar="S",
        help="time for TCP + TLS + HTTP upgrade (a slow-loris upgrade is dropped after it)",
    )
    add_option(
        p,
        "--hello-timeout-s",
        type=float,
        default=_DEFAULTS.hello_timeout_s,
        metavar="S",
        help="time from the upgrade to a complete HELLO",
    )
    add_option(
        p,
        "--close-timeout-s",
        type=float,
        default=_DEFAULTS.close_timeout_s,
        metavar="S",
        help="bound on a relay-initiated close before the socket is aborted",
    )
    add_option(
        p,
        "--queue-max-frames",
        type=int,
        default=_DEFAULTS.queue_max_frames,
        metavar="N",
        help="per-direction queue bound in messages",
    )
    add_option(
        p,
        "--queue-max-bytes",
        type=int,
        default=_DEFAULTS.queue_max_bytes,
        metavar="N",
        help="per-direction queue bound in bytes",
    )
    add_option(
        p,
        "--burst-bytes",
        type=int,
        default=_DEFAULTS.burst_bytes,
        metavar="N",
        help="bucket size for --max-bytes-per-s (0: one second's worth)",
    )
    add_option(
        p,
        "--keys-refresh-s",
        type=float,
        default=_DEFAULTS.keys_refresh_s,
        metavar="S",
        help="how often the JWK set is re-read or re-fetched",
    )
    add_option(
        p,
        "--register-ttl-s",
        type=float,
        default=_DEFAULTS.register_ttl_s,
        metavar="S",
        help="expiry of the node's Redis registration",
    )
    add_option(
        p,
        "--assignment-ttl-s",
        type=float,
        default=_DEFAULTS.assignment_ttl_s,
        metavar="S",
        help="lifetime each refresh gives the Redis assignment of a session live on this node",
    )
    add_option(
        p,
        "--no-read-poller",
        action="store_true",
        help="wait for each connection's input with trio's own per-socket wait instead of the shared "
        "epoll poller (decision 0007)",
    )
    add_option(
        p,
        "--read-coalesce-s",
        type=float,
        default=_DEFAULTS.read_coalesce_s,
        metavar="S",
        help="let readiness of active connections accumulate this long after each batch (0: none)",
    )
    add_option(
        p,
        "--quiet-after-s",
        type=float,
        default=_DEFAULTS.quiet_after_s,
        metavar="S",
        help="a connection with only heartbeats for this long is marked quiet: lone heartbeats stop "
        "waking the relay, data still does at once (0: never)",
    )
    add_option(
        p,
        "--quiet-tick-s",
        type=float,
        default=_DEFAULTS.quiet_tick_s,
        metavar="S",
        help="grid on which quiet connections' heartbeats are collected (their echo waits ~0.5-1.5 ticks)",
    )
    add_option(
        p,
        "--nodes",
        type=int,
        default=1,
        metavar="N",
        help="run N supervised node processes on consecutive ports (--port, --admin-port and up), "
        "ids <node-id>-1 … <node-id>-N; a crashed node is restarted, SIGTERM drains them all",
    )
    add_option(p, "--log-level", default="INFO", metavar="LEVEL", help="logging level (JSON on stderr)")
    p.set_defaults(func=_run, parser=p)


def build_config(args: argparse.Namespace, environ: dict[str, str] | os._Environ[str]) -> RelayConfig:
    """Turn parsed options and the environment into a :class:`RelayConfig`.

    Raises:
        ConfigError: a missing key source or inconsistent settings (one line).
    """
    try:
        config = RelayConfig(
            keys=args.keys,
            host=args.host,
            port=args.port,
            admin_host=args.admin_host,
            admin_port=None if args.admin_port < 0 else args.admin_port,
            node_id=args.node_id,
            public_url=args.public_url,
            token_service=args.token_service,
            redis_url=args.redis_url,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            heartbeat_s=args.heartbeat_s,
            resume_grace_s=args.resume_grace_s,
            pair_timeout_s=args.pair_timeout_s,
            max_frame=args.max_frame,
            max_sessions=args.max_sessions,
            max_connections=args.max_connections,
            fd_reserve=args.fd_reserve,
            handshakes_per_ip_per_min=args.handshakes_per_ip_per_min,
            max_bytes_per_s=args.max_bytes_per_s,
            drain_s=args.drain_s,
            status_stale_s=args.status_stale_s,
            upgrade_timeout_s=args.upgrade_timeout_s,
            hello_timeout_s=args.hello_timeout_s,
            close_timeout_s=args.close_timeout_s,
            queue_max_frames=args.queue_max_frames,
            queue_max_bytes=args.queue_max_bytes,
            burst_bytes=args.burst_bytes,
            keys_refresh_s=args.keys_refresh_s,
            register_ttl_s=args.register_ttl_s,
            assignment_ttl_s=args.assignment_ttl_s,
            read_poller=not args.no_read_poller,
            read_coalesce_s=args.read_coalesce_s,
            quiet_after_s=args.quiet_after_s,
            quiet_tick_s=args.quiet_tick_s,
            paused=environ.get("FALLBACK_WS_PAUSED", "").strip().lower() in _TRUE,
        )
        config.connection_cap(resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # the fd limit fits
        return config
    except ValueError as exc:
        raise ConfigError(flag_names(str(exc), args.parser)) from None


def flag_names(message: str, parser: argparse.ArgumentParser) -> str:
    """``message`` from :class:`RelayConfig` (which names its fields) in the words of the command line.

    A config field with an option is renamed to that option (``token_service`` → ``--token-service``)
    wherever it appears as a snake_case word, and as the first word of the message (``keys is
    required…``); plain English words elsewhere (a "keys" in a sentence) stay as they are.
    """
    flags = {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}

    def rename(match: re.Match[str]) -> str:
        word = match.group(0)
        if word in flags and ("_" in word or match.start() == 0):
            return flags[word]
        return word

    return re.sub(r"\b[a-z][a-z0-9]*(?:_[a-z0-9]+)*\b", rename, message)


async def run_relay(
    relay: Relay,
    *,
    early_signals: list[int] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``relay`` until SIGTERM/SIGINT, then drain it; returns when it has stopped.

    A signal is acted on at any moment, start-up included (the node then drains as soon as it is
    up). ``early_signals`` are signals caught before trio ran (see :func:`_run`); they count as if
    they arrived now.

    Once the node is up, the process's garbage collector is tuned for a long-lived heap
    (:func:`rescue.relay.tune_gc`): this is the node's own process.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        for signum in early_signals or ():
            signal.raise_signal(signum)  # now delivered to the receiver
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_shutdown_on_signal, relay, signals)
            await nursery.start(relay.run)
            tune_gc()
            # tune_gc's one full collection walks the start-up heap on purpose (before any
            # session): the pause figures are about serving, so they start after it
            relay.gc_pauses.reset()
            task_status.started()
            await relay.wait_stopped()
            nursery.cancel_scope.cancel()


async def _shutdown_on_signal(relay: Relay, signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log_event(_LOG, "relay.signal", signal=signal.Signals(signum).name)
        relay.shutdown()  # run() drains and returns; a second signal changes nothing


# Options each child gets its own value of (node_specs), or none at all.
_PER_NODE = frozenset({"help", "nodes", "node_id", "port", "admin_port", "public_url"})


def child_argv(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """``rescue relay`` with every shared option as parsed (``--flag=value``), for a child node.

    Explicit flags win over the ``RESCUE_*`` environment the child inherits, so it runs with
    exactly this configuration; :func:`~rescue.relay._supervisor.node_specs` appends its own
    id, ports and URL.
    """
    # -P: the child imports the package this interpreter has installed (the same build as ours), never
    # a `rescue/` folder that happens to be in the working directory
    argv = [sys.executable, "-P", "-m", "rescue.cli", "relay"]
    for action in parser._actions:
        if not action.option_strings or action.dest in _PER_NODE:
            continue
        value = getattr(args, action.dest, None)
        flag = action.option_strings[-1]
        if isinstance(action, argparse._StoreTrueAction):
            if value:
                argv.append(flag)
        elif value is not None:
            argv.append(f"{flag}={value}")
    return argv


async def run_supervisor(supervisor: Supervisor, *, early_signals: list[int] | None = None) -> int:
    """Run ``supervisor`` until SIGTERM/SIGINT, then drain every node; its exit status.

    ``early_signals`` were caught before trio ran; they count as if they arrived now.
    """
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        for signum in early_signals or ():
            signal.raise_signal(signum)
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                async for signum in signals:
                    log_event(_LOG, "relay.signal", signal=signal.Signals(signum).name)
                    supervisor.stop()
                    return

            nursery.start_soon(watch)
            status = await supervisor.run()
            nursery.cancel_scope.cancel()
    return status


def _run(args: argparse.Namespace) -> int:
    # From here on a SIGTERM is never fatal: it is kept until trio's receiver takes over.
    early: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: early.append(signum))
    configure_logging(args.log_level)
    if args.nodes != 1:
        config = build_config(args, os.environ)  # the same checks a single node makes, once
        if not configure_session_tags(os.environ, component="relay"):
            # The nodes of this host tag sessions alike at least: they inherit one random key.
            os.environ[LOG_TAG_KEY_ENV] = secrets.token_urlsafe(32)
        try:
            specs = node_specs(
                child_argv(args.parser, args),
                nodes=args.nodes,
                node_id=config.node_id,
                port=config.port,
                admin_port=config.admin_port,
                public_url=config.public_url,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return trio.run(
            partial(run_supervisor, Supervisor(specs, drain_s=config.drain_s), early_signals=early)
        )
    config = build_config(args, os.environ)  # a bad configuration is one line, before any log
    log_event(_LOG, "relay.starting", node_id=args.node_id, hot_path=build.describe())
    # the activation-report key is a secret: environment only, never a flag (`ps` shows flags)
    report_key = os.environ.get("RESCUE_REPORT_KEY", "").strip() or None
    relay = Relay(config, report_key=report_key)
    configure_session_tags(os.environ, component="relay")
    with traced_process("beach-rescue-relay"):
        trio.run(partial(run_relay, relay, early_signals=early))
    return 0
