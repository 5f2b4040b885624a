"""``rescue token-service`` (SPEC §11): the control plane.

::

    rescue token-service --signing-key KEY_FILE [--retired-keys FILE…] --redis-url URL [--port A]
                         [--admin-port M] [--max-connections N] [--admin-key-env VAR]
                         [--relay-url URL] [--oidc-jwks FILE_OR_URL …] [--drain-s S]

Two ports (decision 0024): the API on ``--port`` (8080), and an admin port on ``--admin-port``
(9080; -1 turns it off) answering only ``/livez``, ``/readyz``, ``/healthz`` and ``/metrics``,
behind a connection cap of its own. Orchestrators' probes and Prometheus ask the admin port, so a
flood that fills the API port's connection cap (``--max-connections``; its newcomers get 503
``server_busy``) fails neither the liveness probe nor the scrape. The API port still answers the
four paths too (callers and older manifests keep working).

Secrets come from environment variables, never from the command line (which `ps` shows): the admin
key from ``$RESCUE_ADMIN_KEY`` (or the variable ``--admin-key-env`` names), service keys
(comma-separated) from ``$RESCUE_SERVICE_KEYS``, relay report keys from ``$RESCUE_REPORT_KEYS``, the
session-tag key from ``$RESCUE_LOG_TAG_KEY`` (shared with the relays; ``rescue._log``).

SIGTERM (or SIGINT) drains (decision 0023): ``/readyz`` turns 503 ``draining`` at once while every
request is still served (answers say ``Connection: close``) for ``--drain-s``; then the listener
closes, in-flight requests get up to 2 s to finish, and the process exits 0. A second signal exits
at once (128 + its number).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Final

import trio

from rescue._http import DEFAULT_GRACEFUL_TIMEOUT, DEFAULT_LIMITS, MAX_CONNECTIONS, HttpLimits, HttpShutdown
from rescue._keyfiles import load_signing_key
from rescue._log import configure_logging, configure_session_tags, get_logger, log_event
from rescue._tracing import traced_process
from rescue.cli import add_option
from rescue.errors import ConfigError
from rescue.guardrails import (
    TOKEN_SERVICE_REDIS_THREADS,
    GuardrailConfig,
    Guardrails,
    GuardrailStore,
    RedisStore,
)
from rescue.protocol import MAX_TTL
from rescue.tokenservice import (
    DEFAULT_ADMIN_PORT,
    JwksSource,
    OidcVerifier,
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
    load_retired_keys,
    parse_origins,
    serve_token_service,
    serve_token_service_admin,
)

__all__ = ["DEFAULT_DRAIN_S", "build_config", "register", "run_token_service", "stop_bound_s"]

_LOG = get_logger("rescue.tokenservice")
# Closing the Redis pool is local work; bound it anyway since it runs shielded during shutdown.
STORE_CLOSE_TIMEOUT_S = 5.0
# How long a SIGTERM'd replica keeps serving with /readyz 503 "draining" before it stops accepting
# (decision 0023). Sized against the Kubernetes readiness probe (deploy/k8s/token-service.yaml:
# periodSeconds 5, timeoutSeconds 2): one probe sees the 503 while the replica still serves, and the
# endpoint removal Kubernetes makes when the pod is deleted reaches every node's proxy and the ingress
# meanwhile (a second or two), so no new connection arrives after the listener closes. The stop
# timeouts of the manifests cover it (stop_bound_s; tests/test_deploy_config.py).
DEFAULT_DRAIN_S: Final = 10.0


def stop_bound_s(drain_s: float = DEFAULT_DRAIN_S) -> float:
    """The longest a SIGTERM'd token service takes to exit: the drain, then the in-flight requests'
    graceful period, then closing the store. Every stop timeout (terminationGracePeriodSeconds, ECS
    stopTimeout, compose stop_grace_period) must exceed it, or the orchestrator's SIGKILL cuts the
    last requests."""
    return drain_s + DEFAULT_GRACEFUL_TIMEOUT + STORE_CLOSE_TIMEOUT_S


_TRUE = frozenset({"1", "true", "yes", "on"})


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``token-service`` sub-command."""
    p = subparsers.add_parser(
        "token-service",
        help="run the token service (control plane)",
        description="Serve the token service API (SPEC §4): token minting behind the guardrails, kill "
        "switch, cohort flags, node assignment and public keys, on --port; and an admin port "
        "(--admin-port, 9080) with /livez, /readyz, /healthz and /metrics behind a connection cap of "
        "its own: point liveness and readiness probes and Prometheus there, so a flood of the API "
        "port (503 server_busy past --max-connections) fails neither. Secrets come from environment "
        "variables: the admin key from $RESCUE_ADMIN_KEY (see --admin-key-env), service keys from "
        "$RESCUE_SERVICE_KEYS (comma-separated), relay report keys from $RESCUE_REPORT_KEYS, the "
        "session-tag key (shared with the relays) from $RESCUE_LOG_TAG_KEY. "
        "BEACH_RESCUE_DISABLE_OIDC=1 (ignored when RESCUE_ENV=production) lets anyone mint.\n\n"
        "Admin, service and report keys are opaque bearer strings: any long random string, e.g.\n"
        "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'\n"
        "Callers send them as 'Authorization: Bearer KEY' (rescue admin reads $RESCUE_ADMIN_KEY, "
        "rescue share/join read $RESCUE_SERVICE_KEY, a relay reads $RESCUE_REPORT_KEY). The signing "
        "key comes from rescue keygen --out KEY_FILE.",
    )
    add_option(
        p, "--signing-key", required=True, metavar="KEY_FILE", help="private Ed25519 JWK that signs tokens"
    )
    add_option(
        p,
        "--retired-keys",
        nargs="*",
        default=[],
        metavar="FILE",
        help="keys that signed before; published until their tokens expired (JWK or JWK set; an "
        "optional top-level 'retired_at' epoch time, else the start of this process)",
    )
    add_option(
        p,
        "--redis-url",
        required=True,
        metavar="URL",
        help="guardrail store: redis://, rediss://, unix://, redis+cluster://H:P[,H:P…] (Redis Cluster) "
        "or redis+sentinel://H:P[,H:P…]/MASTER[/DB] (Sentinel); Valkey takes the same URLs",
    )
    add_option(p, "--host", default="0.0.0.0", metavar="H", help="address to listen on")
    add_option(p, "--port", type=int, default=8080, metavar="A", help="API port to listen on (0: any)")
    add_option(
        p,
        "--admin-port",
        type=int,
        default=DEFAULT_ADMIN_PORT,
        metavar="M",
        help="admin HTTP port: /livez, /readyz, /healthz and /metrics only, behind a connection cap "
        "of its own, for probes and scrapes (0: any, -1: off; the API port answers them too)",
    )
    add_option(
        p, "--admin-host", default=None, metavar="H", help="address the admin port binds (default --host)"
    )
    add_option(
        p,
        "--max-connections",
        type=int,
        default=0,
        metavar="N",
        help="open connections on the API port at most (0: half the fd limit); past it an idle one "
        "is closed for a newcomer, or with none idle the newcomer gets 503 server_busy",
    )
    add_option(
        p,
        "--admin-key-env",
        default="RESCUE_ADMIN_KEY",
        metavar="VAR",
        help="env var holding the admin key",
    )
    add_option(
        p,
        "--relay-url",
        default=None,
        metavar="URL",
        help="wss://…/v1/connect handed out when no relay node is registered (single-node setups)",
    )
    add_option(p, "--issuer", default="beach-rescue", metavar="ISS", help="the tokens' iss claim")
    add_option(p, "--token-ttl", type=int, default=MAX_TTL, metavar="S", help=f"token lifetime, ≤ {MAX_TTL}")
    add_option(p, "--oidc-jwks", default=None, metavar="FILE_OR_URL", help="JWKS for entitlement proofs")
    add_option(p, "--oidc-issuer", default=None, metavar="ISS", help="required iss of entitlement proofs")
    add_option(p, "--oidc-audience", default=None, metavar="AUD", help="required aud of entitlement proofs")
    add_option(
        p,
        "--oidc-entitlement-claim",
        default="entitlements",
        metavar="NAME",
        help="claim granting fallback",
    )
    add_option(
        p,
        "--oidc-entitlement-value",
        default="beach-rescue",
        metavar="VALUE",
        help="value of that claim",
    )
    add_option(
        p,
        "--drain-s",
        type=float,
        default=DEFAULT_DRAIN_S,
        metavar="S",
        help="on SIGTERM, how long to keep serving with /readyz 503 'draining' before no longer "
        "accepting (in-flight requests then get 2 s more); 0 stops accepting at once",
    )
    add_cors_option(p)
    p.add_argument(
        "--init-store",
        action="store_true",
        help="mark the guardrail store initialised at startup if it is not (development, CI and "
        "first-run scripts; refused with RESCUE_ENV=production, where an operator runs "
        "`rescue admin init-store` once instead: see docs/guardrails.md)",
    )
    add_option(p, "--log-level", default="INFO", metavar="LEVEL", help="logging level")
    p.set_defaults(func=_run)


def add_cors_option(p: argparse.ArgumentParser) -> None:
    """``--cors-origin`` (repeatable; ``$RESCUE_CORS_ORIGINS`` adds a comma-separated list)."""
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="an origin (https://host[:port]) whose pages may call the token API cross-origin; "
        "repeatable; none by default [env RESCUE_CORS_ORIGINS, comma-separated]",
    )


def cors_origins(args: argparse.Namespace, environ: Mapping[str, str]) -> frozenset[str]:
    """The allowlist from ``--cors-origin`` and ``$RESCUE_CORS_ORIGINS`` (raises ConfigError)."""
    return parse_origins([*args.cors_origin, environ.get("RESCUE_CORS_ORIGINS", "")])


def _keys_from_env(environ: Mapping[str, str], var: str) -> frozenset[str]:
    return frozenset(k.strip() for k in environ.get(var, "").split(",") if k.strip())


def build_config(args: argparse.Namespace, environ: Mapping[str, str]) -> TokenServiceConfig:
    """Turn parsed options and the environment into a :class:`TokenServiceConfig`.

    Raises:
        ConfigError: unusable keys or settings, or a configuration in which nobody could mint.
    """
    if not 0 < args.token_ttl <= MAX_TTL:
        raise ConfigError(f"--token-ttl must be in 1..{MAX_TTL}")
    production = environ.get("RESCUE_ENV", "").strip().lower() == "production"
    disable_oidc = environ.get("BEACH_RESCUE_DISABLE_OIDC", "").strip().lower() in _TRUE
    if disable_oidc and production:
        log_event(_LOG, "config.disable_oidc_ignored", level=logging.WARNING, reason="RESCUE_ENV=production")
        disable_oidc = False
    keys = PublishedKeys(
        load_signing_key(args.signing_key),
        load_retired_keys(args.retired_keys or [], default_retired_at=time.time()),
    )
    oidc = None
    oidc_parts = (args.oidc_jwks, args.oidc_issuer, args.oidc_audience)
    if any(oidc_parts):
        if not all(oidc_parts):
            raise ConfigError("--oidc-jwks, --oidc-issuer and --oidc-audience go together")
        oidc = OidcVerifier(
            JwksSource(args.oidc_jwks),
            issuer=args.oidc_issuer,
            audience=args.oidc_audience,
            entitlement_claim=args.oidc_entitlement_claim,
            entitlement_value=args.oidc_entitlement_value,
        )
    admin_key = environ.get(args.admin_key_env, "").strip() or None
    service_keys = _keys_from_env(environ, "RESCUE_SERVICE_KEYS")
    if not disable_oidc and not service_keys and oidc is None:
        raise ConfigError(
            "nobody could mint tokens: set RESCUE_SERVICE_KEYS, configure --oidc-*, or (outside "
            "production) BEACH_RESCUE_DISABLE_OIDC=1"
        )
    if args.relay_url is not None and not args.relay_url.startswith(("ws://", "wss://")):
        raise ConfigError("--relay-url must be a ws:// or wss:// URL")
    return TokenServiceConfig(
        keys=keys,
        service_keys=service_keys,
        admin_key=admin_key,
        relay_url=args.relay_url,
        disable_oidc=disable_oidc,
        oidc=oidc,
        report_keys=_keys_from_env(environ, "RESCUE_REPORT_KEYS"),
        issuer=args.issuer,
        token_ttl=args.token_ttl,
        cors_origins=cors_origins(args, environ),
    )


async def run_token_service(
    config: TokenServiceConfig,
    store: GuardrailStore,
    guardrail_config: GuardrailConfig,
    host: str,
    port: int,
    *,
    init_store: bool = False,
    drain_s: float = DEFAULT_DRAIN_S,
    admin_host: str | None = None,
    admin_port: int | None = None,
    limits: HttpLimits = DEFAULT_LIMITS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> int:
    """Serve until SIGTERM/SIGINT has drained it, or until cancelled; closes ``store`` on the way out.

    With ``init_store``, a store that is not initialised is initialised first (``--init-store``).
    With ``admin_port`` (0: any), the admin port serves the probes and ``/metrics`` too, on
    ``admin_host`` (default ``host``), through the drain and stopping with the API port (decision
    0024). ``limits``: the API port's (its connection cap; default :data:`rescue._http.DEFAULT_LIMITS`).

    The first SIGTERM or SIGINT begins the drain (decision 0023): ``/readyz`` answers 503
    ``draining`` at once, every other request is still served (answers say ``Connection: close``,
    so keep-alive clients reconnect through the load balancer) for ``drain_s`` seconds; then the
    listener closes, idle connections close and in-flight requests get
    :data:`rescue._http.DEFAULT_GRACEFUL_TIMEOUT` to finish. A signal while starting up stops it
    without listening (nothing to drain). A second signal ends it at once: every connection is cut.

    Returns:
        The exit status: 0 after a drain (or a cancellation), 128 + the signal number when a second
        signal cut it short.

    Cancellation:
        Cancelling skips the drain: the server stops as on cancellation of
        :func:`rescue._http.serve_http` (in-flight requests get their graceful period).
    """
    service = TokenService(config, Guardrails(store, guardrail_config))
    shutdown = HttpShutdown()
    drain_begun = trio.Event()
    status = 0
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def on_signals(signals: AsyncIterator[int]) -> None:
                    nonlocal status
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not drain_begun.is_set():
                            service.draining = True
                            shutdown.close_connections()
                            log_event(_LOG, "tokenservice.draining", signal=name, drain_s=drain_s)
                            drain_begun.set()
                            continue
                        log_event(
                            _LOG,
                            "tokenservice.stopping",
                            level=logging.WARNING,
                            signal=name,
                            detail="a second signal: every connection is cut now",
                        )
                        status = 128 + signum
                        shutdown.abort()
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signals, signals)
                await _check_store(service, store, init_store=init_store)
                if not drain_begun.is_set():  # else stopped while starting: nothing to drain
                    await _serve_until_drained(
                        service,
                        _Listen(host, port, admin_host or host, admin_port, limits),
                        shutdown,
                        drain_begun,
                        drain_s,
                        task_status,
                    )
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(STORE_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            await store.aclose()
    log_event(_LOG, "tokenservice.stopped", status=status)
    return status


async def _check_store(service: TokenService, store: GuardrailStore, *, init_store: bool) -> None:
    """Initialise the store (``--init-store``) or say that it is not; never fails."""
    try:
        stored = await store.fleet_state()
        if not stored.initialised and init_store:
            await service.guardrails.initialise_store(reason="rescue token-service --init-store")
        elif not stored.initialised:
            log_event(
                _LOG,
                "guardrail_store_uninitialised",
                level=logging.ERROR,
                detail="fallback is paused until an operator runs `rescue admin init-store` "
                "(a new deployment, or Redis lost its data: see the runbook)",
            )
    except Exception as exc:  # keep serving: every request fails closed until Redis is back
        log_event(_LOG, "guardrail_store_unavailable", level=logging.ERROR, error=str(exc)[:200])


@dataclass(frozen=True, slots=True)
class _Listen:
    """Where the servers of one token service listen, and the API port's limits."""

    host: str
    port: int
    admin_host: str
    admin_port: int | None  # None: no admin port
    limits: HttpLimits


async def _serve_until_drained(
    service: TokenService,
    listen: _Listen,
    shutdown: HttpShutdown,
    drain_begun: trio.Event,
    drain_s: float,
    task_status: trio.TaskStatus[int],
) -> None:
    """Serve; once the drain has begun, serve ``drain_s`` more, then stop the servers (graceful).

    The admin port starts first: by the time the API port takes work, its probes can be answered.
    Both stop together (one ``shutdown`` drives both: ``Connection: close`` during the drain, the
    abort of a second signal)."""
    async with trio.open_nursery() as server:
        admin_bound = None
        if listen.admin_port is not None:
            admin_bound = await server.start(
                partial(
                    serve_token_service_admin,
                    service,
                    listen.admin_host,
                    listen.admin_port,
                    shutdown=shutdown,
                )
            )
        bound = await server.start(
            partial(
                serve_token_service,
                service,
                listen.host,
                listen.port,
                limits=listen.limits,
                shutdown=shutdown,
            )
        )
        log_event(
            _LOG,
            "tokenservice.listening",
            host=listen.host,
            port=bound,
            admin_host=listen.admin_host if admin_bound is not None else None,
            admin_port=admin_bound,
            kid=service.config.keys.signing_key.kid_text,
        )
        task_status.started(bound)
        await drain_begun.wait()
        await trio.sleep(drain_s)
        log_event(
            _LOG,
            "tokenservice.stopping",
            detail=f"drained: no new connections, in-flight requests get {DEFAULT_GRACEFUL_TIMEOUT:g} s",
        )
        server.cancel_scope.cancel()


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = build_config(args, os.environ)
    configure_session_tags(os.environ, component="token-service")
    guardrail_config = GuardrailConfig.from_env()
    if not 0 <= args.drain_s < math.inf:  # (NaN too)
        raise ConfigError("--drain-s must be a number of seconds >= 0")
    if args.admin_port < -1 or args.port < 0 or args.max_connections < 0:
        raise ConfigError("--port must be >= 0, --admin-port >= -1, --max-connections >= 0")
    if args.init_store and guardrail_config.is_production:
        # Left in a manifest, the flag would quietly re-initialise a store that lost a pause
        # whenever a replica restarts: production initialises once, by hand.
        raise ConfigError(
            "--init-store is refused with RESCUE_ENV=production: run `rescue admin init-store` "
            "once after the first deploy (docs/operations/runbook.md)"
        )
    store = RedisStore(args.redis_url, threads=TOKEN_SERVICE_REDIS_THREADS)  # see the constant
    run = partial(
        run_token_service,
        config,
        store,
        guardrail_config,
        args.host,
        args.port,
        init_store=args.init_store,
        drain_s=args.drain_s,
        admin_host=args.admin_host,
        admin_port=None if args.admin_port == -1 else args.admin_port,
        limits=HttpLimits(max_connections=args.max_connections or MAX_CONNECTIONS),
    )
    with traced_process("beach-rescue-token-service"):
        return trio.run(run)
