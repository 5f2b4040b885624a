"""``rescue token-service`` (SPEC §11): the control plane.

::

    rescue token-service --signing-key KEY_FILE [--retired-keys FILE…] --redis-url URL [--port A]
                         [--admin-key-env VAR] [--relay-url URL] [--oidc-jwks FILE_OR_URL …]

Secrets come from environment variables, never from the command line (which `ps` shows): the admin
key from ``$RESCUE_ADMIN_KEY`` (or the variable ``--admin-key-env`` names), service keys
(comma-separated) from ``$RESCUE_SERVICE_KEYS``, relay report keys from ``$RESCUE_REPORT_KEYS``, the
session-tag key from ``$RESCUE_LOG_TAG_KEY`` (shared with the relays; ``rescue._log``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from collections.abc import Mapping
from functools import partial

import trio

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
    JwksSource,
    OidcVerifier,
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
    load_retired_keys,
    parse_origins,
    serve_token_service,
)

__all__ = ["build_config", "register"]

_LOG = get_logger("rescue.tokenservice")
# Closing the Redis pool is local work; bound it anyway since it runs shielded during shutdown.
STORE_CLOSE_TIMEOUT_S = 5.0
_TRUE = frozenset({"1", "true", "yes", "on"})


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``token-service`` sub-command."""
    p = subparsers.add_parser(
        "token-service",
        help="run the token service (control plane)",
        description="Serve the token service API (SPEC §4): token minting behind the guardrails, kill "
        "switch, cohort flags, node assignment and public keys. Secrets come from environment "
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
    add_option(p, "--port", type=int, default=8080, metavar="A", help="port to listen on")
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
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT or cancellation; closes ``store`` on the way out.

    With ``init_store``, a store that is not initialised is initialised first (``--init-store``).
    """
    service = TokenService(config, Guardrails(store, guardrail_config))
    try:
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
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(serve_token_service, service, host, port)
            log_event(
                _LOG, "tokenservice.listening", host=host, port=bound, kid=config.keys.signing_key.kid_text
            )
            task_status.started(bound)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log_event(_LOG, "tokenservice.stopping", signal=signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(STORE_CLOSE_TIMEOUT_S) as scope:
            scope.shield = True
            await store.aclose()


def _run(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    config = build_config(args, os.environ)
    configure_session_tags(os.environ, component="token-service")
    guardrail_config = GuardrailConfig.from_env()
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
    )
    with traced_process("beach-rescue-token-service"):
        trio.run(run)
    return 0
