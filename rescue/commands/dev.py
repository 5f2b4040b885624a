"""``rescue dev`` (SPEC §11): token service + relay in one process, for trying things out.

Everything is throwaway: an in-memory guardrail store, a signing key generated at start, an admin key
generated at start (or ``$RESCUE_ADMIN_KEY``), the ``dev`` cohort enabled and no authentication needed
to mint (``BEACH_RESCUE_DISABLE_OIDC`` behaviour). It refuses to start when ``RESCUE_ENV=production``.
The relay runs exactly as ``rescue relay`` does: it verifies tokens with the service's key ring,
polls the service's paused state (so ``rescue admin pause`` reaches it within 2 s) and reports
activations.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import secrets
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from functools import partial
from typing import IO

import trio

from rescue._http import MAX_CONNECTIONS as HTTP_MAX_CONNECTIONS
from rescue._log import configure_logging, get_logger, log_event
from rescue._tracing import traced_process
from rescue.cli import add_option, self_command
from rescue.commands.token_service import add_cors_option, cors_origins
from rescue.errors import ConfigError
from rescue.guardrails import GuardrailConfig, Guardrails, MemoryStore
from rescue.protocol import KeyRing, SigningKey
from rescue.relay import DEFAULT_FD_RESERVE, MIN_CONNECTIONS, Relay, RelayConfig
from rescue.tokenservice import PublishedKeys, TokenService, TokenServiceConfig, join_url, serve_token_service

__all__ = ["DEV_COHORT", "DevAddresses", "register", "run_dev"]

DEV_COHORT = "dev"
_LOG = get_logger("rescue.dev")
# A dev process should stop promptly on Ctrl-C: peers get SERVER_SHUTDOWN and a short window.
DEV_DRAIN_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True, slots=True)
class DevAddresses:
    """Where the pieces of a running ``rescue dev`` listen."""

    api_url: str
    relay_url: str
    admin_url: str | None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dev`` sub-command."""
    p = subparsers.add_parser(
        "dev",
        help="token service + relay in one process (in-memory store, throwaway key)",
        description="Run the token service and a relay node in one process with an in-memory store, "
        "a throwaway signing key and the 'dev' cohort enabled. No Redis, no setup. Refuses to start "
        "when RESCUE_ENV=production.",
    )
    add_option(p, "--host", default="127.0.0.1", metavar="H", help="address every listener binds")
    add_option(p, "--api-port", type=int, default=8080, metavar="A", help="token service port")
    add_option(p, "--relay-port", type=int, default=8081, metavar="R", help="relay WebSocket port")
    add_option(p, "--admin-port", type=int, default=9090, metavar="M", help="relay admin port")
    add_cors_option(p)
    add_option(p, "--log-level", default="WARNING", metavar="LEVEL", help="logging level (JSON on stderr)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if os.environ.get("RESCUE_ENV", "").strip().lower() == "production":
        raise ConfigError("refusing to start: rescue dev is not for RESCUE_ENV=production")
    configure_logging(args.log_level)
    origins = cors_origins(args, os.environ)
    admin_key = os.environ.get("RESCUE_ADMIN_KEY", "").strip() or None
    with contextlib.ExitStack() as cleanup:
        key_file = None
        if admin_key is None:
            # A throwaway key, handed over in a 0600 file: stdout may be captured as logs, and
            # secrets never go to logs, not even dev ones. Its folder goes when we do.
            admin_key = secrets.token_urlsafe(24)
            directory = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="rescue-dev-"))
            key_file = _write_private(directory, admin_key)
        # SIGTERM outside trio's signal receiver (starting up, shutting down) would kill us without
        # running the cleanup above; make it unwind like Ctrl-C instead.
        cleanup.enter_context(_sigterm_unwinds())
        with traced_process("beach-rescue-dev"):
            trio.run(
                partial(
                    run_dev,
                    host=args.host,
                    api_port=args.api_port,
                    relay_port=args.relay_port,
                    admin_port=args.admin_port,
                    admin_key=admin_key,
                    admin_key_file=key_file,
                    banner=sys.stdout,
                    cors_origins=origins,
                )
            )
    return 0


def _write_private(directory: str, secret: str) -> str:
    path = os.path.join(directory, "admin-key")  # the directory is 0700 (mkdtemp)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return path


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def unwind(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


async def run_dev(
    *,
    host: str = "127.0.0.1",
    api_port: int = 8080,
    relay_port: int = 8081,
    admin_port: int | None = 9090,
    admin_key: str | None = None,
    admin_key_file: str | None = None,
    banner: IO[str] | None = None,
    handle_signals: bool = True,
    cors_origins: frozenset[str] = frozenset(),
    task_status: trio.TaskStatus[DevAddresses] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run token service and relay until SIGINT/SIGTERM (or cancellation).

    Args:
        host: address every listener binds (ports may be 0: the bound ones are reported).
        api_port: token service port.
        relay_port: relay WebSocket port.
        admin_port: relay admin port (``None`` disables it).
        admin_key: bearer key of the admin API (``None`` disables the admin API).
        admin_key_file: where the banner tells the operator to read ``admin_key`` from (``None``:
            it came from ``$RESCUE_ADMIN_KEY``, which the operator already has).
        banner: where to print the URLs and a ready-to-paste example (``None``: nowhere).
        handle_signals: stop on SIGINT/SIGTERM (only possible in the main thread).
        cors_origins: origins whose pages may call the token API cross-origin (none by default).
        task_status: receives the :class:`DevAddresses` once everything listens.

    Resource handling:
        Both servers and every connection live in this call's nursery; on a signal the relay drains
        (CLOSE SERVER_SHUTDOWN to every peer) for at most ``DEV_DRAIN_S`` before everything stops.
    """
    signing = SigningKey.generate()
    store = MemoryStore()
    await store.set_cohort_enabled(DEV_COHORT, True)
    guardrails = Guardrails(store, GuardrailConfig(environment="development"))
    # The receiver is open from the start: a Ctrl-C while starting up (even right after the banner)
    # stops us the same orderly way, never as a KeyboardInterrupt from some task.
    with contextlib.ExitStack() as stack:
        signals = stack.enter_context(trio.open_signal_receiver(*STOP_SIGNALS)) if handle_signals else None
        await _serve_dev(
            signals,
            store=store,
            guardrails=guardrails,
            signing=signing,
            host=host,
            api_port=api_port,
            relay_port=relay_port,
            admin_port=admin_port,
            admin_key=admin_key,
            admin_key_file=admin_key_file,
            banner=banner,
            cors_origins=cors_origins,
            task_status=task_status,
        )


async def _serve_dev(
    signals: AsyncIterator[int] | None,
    *,
    store: MemoryStore,
    guardrails: Guardrails,
    signing: SigningKey,
    host: str,
    api_port: int,
    relay_port: int,
    admin_port: int | None,
    admin_key: str | None,
    admin_key_file: str | None,
    banner: IO[str] | None,
    cors_origins: frozenset[str],
    task_status: trio.TaskStatus[DevAddresses],
) -> None:
    async with trio.open_nursery() as nursery:
        # The service starts first (the relay polls it); the relay's URL, known once it is bound,
        # then goes into the service's config for every token answer.
        service = TokenService(
            TokenServiceConfig(
                keys=PublishedKeys(signing, ()),
                admin_key=admin_key,
                disable_oidc=True,
                cors_origins=cors_origins,
            ),
            guardrails,
        )
        bound_api = await nursery.start(serve_token_service, service, host, api_port)
        api_base = f"http://{host}:{bound_api}"
        relay = Relay(
            RelayConfig(
                keys=None,
                token_service=api_base,
                host=host,
                port=relay_port,
                admin_port=admin_port,
                node_id="dev",
                drain_s=DEV_DRAIN_S,
                fd_reserve=_dev_fd_reserve(),
            ),
            keys=KeyRing([signing]),
            store=store,  # registers itself like a fleet node (SPEC §7); tokens then name it in aud
        )
        addresses = await nursery.start(relay.run)
        service.config = dataclasses.replace(service.config, relay_url=addresses.url)
        admin_url = f"http://{host}:{addresses.admin_port}" if addresses.admin_port else None
        dev = DevAddresses(api_url=api_base, relay_url=addresses.url, admin_url=admin_url)
        log_event(_LOG, "dev.listening", api=dev.api_url, relay=dev.relay_url, admin=dev.admin_url)
        if banner is not None:
            print(_banner(dev, admin_key is not None, admin_key_file), file=banner, flush=True)
        task_status.started(dev)
        if signals is not None:
            async for signum in signals:
                log_event(_LOG, "dev.stopping", signal=signal.Signals(signum).name)
                break
            await relay.drain()
            nursery.cancel_scope.cancel()


def _dev_fd_reserve() -> int:
    """The relay's ``fd_reserve`` in ``rescue dev``: the token service shares its process, and its
    HTTP server may hold up to half the fds (``rescue._http.MAX_CONNECTIONS``), so the relay's
    WebSocket listener leaves those too; under a tiny fd limit it keeps at least 16 connections."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(0, min(HTTP_MAX_CONNECTIONS + DEFAULT_FD_RESERVE // 2, limit - MIN_CONNECTIONS))


def _banner(dev: DevAddresses, admin_api: bool, admin_key_file: str | None) -> str:
    lines = [
        "beach-rescue dev: token service + relay in one process "
        "(in-memory store, throwaway key; not for production)",
        f"  token service   {dev.api_url}   (POST /v1/fallback/token, GET /openapi.json)",
        f"  relay           {dev.relay_url}",
    ]
    if dev.admin_url:
        lines.append(f"  relay admin     {dev.admin_url}   (/livez /readyz /metrics /debug/stats)")
    lines.append(f"  cohort          {DEV_COHORT} (enabled)")
    rescue = self_command()
    lines += [
        "",
        "Try it (two terminals):",
        f"  RESCUE_PASSPHRASE=correct-horse {rescue} share --api {dev.api_url} --session demo-1 -- bash",
        f"  RESCUE_PASSPHRASE=correct-horse {rescue} join demo-1 --api {dev.api_url}",
        f"  or in a browser: {join_url(dev.api_url, 'demo-1')}",
        "A token by hand:",
        f"  curl -fsS -X POST {dev.api_url}/v1/fallback/token -H 'content-type: application/json' \\",
        '    -d \'{"session_id": "demo-1", "role": "host", "cohort_id": "dev", "client_version": "curl", '
        '"telemetry_opt_in": false}\'',
    ]
    if admin_api:
        lines.append("Operator commands:")
        if admin_key_file is not None:
            lines.append(f"  export RESCUE_ADMIN_KEY=$(cat {admin_key_file})   # throwaway key")
        lines += [
            f"  {rescue} admin status --api {dev.api_url}",
            f"  {rescue} admin pause --api {dev.api_url}",
            f"  {rescue} admin resume --api {dev.api_url}",
        ]
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)
