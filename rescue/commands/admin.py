"""``rescue admin pause|resume|status|init-store|cohort ID --enable/--disable [--api URL]`` (SPEC §11).

The admin key comes from ``$RESCUE_ADMIN_KEY`` (never from the command line, which ``ps`` shows).
Every sub-command prints the service's JSON answer on stdout and exits 0, or prints one line on
stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Final

import httpx

from rescue.cli import add_option
from rescue.errors import ConfigError

__all__ = ["register"]

DEFAULT_API: Final = "http://127.0.0.1:8080"
ADMIN_KEY_ENV: Final = "RESCUE_ADMIN_KEY"
_KEY_NOTE: Final = f"\n\nThe admin key comes from ${ADMIN_KEY_ENV} (see rescue admin --help)."
# An admin call is one small request; if the service doesn't answer in this long, say so.
REQUEST_TIMEOUT_S: Final = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``admin`` sub-command and its actions."""
    admin = subparsers.add_parser(
        "admin",
        help="operate the token service: pause, resume, status, store initialisation, cohort flags",
        description="Talk to the token service's admin API (SPEC §4).\n\n"
        f"The admin key comes from ${ADMIN_KEY_ENV} (never a flag: ps shows flags). It is any long "
        "random string, the same one the token service reads from its $RESCUE_ADMIN_KEY (or the "
        "variable its --admin-key-env names); make one with\n"
        "  python3 -c 'import secrets; print(secrets.token_urlsafe(32))'\n"
        "rescue dev makes a throwaway one and prints where to read it.\n\n"
        "examples:\n"
        f"  {ADMIN_KEY_ENV}=... rescue admin status --api http://127.0.0.1:8080\n"
        "  rescue admin pause --reason 'relay incident' --drain\n"
        "  rescue admin cohort beta --enable",
    )
    actions = admin.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_option(p, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")

    def action(name: str, summary: str, details: str) -> argparse.ArgumentParser:
        return actions.add_parser(
            name, help=summary, description=f"{summary[0].upper()}{summary[1:]}.\n\n{details}{_KEY_NOTE}"
        )

    pause = action(
        "pause",
        "pause WebSocket fallback fleet-wide (kill switch)",
        "New tokens are refused (fallback_paused) and every relay refuses new handshakes within "
        "about 2 s; sessions already running go on unless --drain. Prints the new fleet state.",
    )
    pause.add_argument("--reason", default=None, help="why (shown in status)")
    pause.add_argument("--drain", action="store_true", help="also close existing relay sessions")
    common(pause)
    pause.set_defaults(func=_pause)

    resume = action(
        "resume",
        "resume WebSocket fallback",
        "Undoes pause: tokens are minted and relays accept handshakes again. Prints the new fleet state.",
    )
    resume.add_argument("--reason", default=None, help="why (shown in status)")
    common(resume)
    resume.set_defaults(func=_resume)

    init = action(
        "init-store",
        "mark the guardrail store initialised (a new deployment, or after Redis lost its data)",
        "A guardrail store that is not initialised (new, or Redis came back empty) reads as "
        "paused. Once its state is what it should be (re-apply a pause that was in force and the "
        "cohort flags first), confirm it with this; it leaves the kill switch as it is. Prints the "
        "fleet state after. See docs/operations/runbook.md, 'Redis came back empty'.",
    )
    init.add_argument("--reason", default=None, help="why (logged)")
    common(init)
    init.set_defaults(func=_init_store)

    status = action(
        "status",
        "show the kill switch and the live relay nodes",
        "Prints JSON: {'fleet': the paused state and its reason, 'nodes': the registered relay nodes}.",
    )
    common(status)
    status.set_defaults(func=_status)

    cohort = action(
        "cohort",
        "show or set a cohort's fallback_ws_enabled flag",
        "Without --enable/--disable, prints the cohort's flag; with one, sets it and prints the result. "
        "Peers of a disabled cohort get cohort_disabled when they ask for a token.",
    )
    cohort.add_argument("cohort_id", metavar="ID", help="cohort id (what peers send as --cohort)")
    group = cohort.add_mutually_exclusive_group()
    group.add_argument(
        "--enable",
        dest="enable",
        action="store_const",
        const=True,
        default=None,
        help="let this cohort's peers fall back to the relay",
    )
    group.add_argument(
        "--disable",
        dest="enable",
        action="store_const",
        const=False,
        help="refuse this cohort's token requests",
    )
    common(cohort)
    cohort.set_defaults(func=_cohort)


def _admin_key() -> str:
    key = os.environ.get(ADMIN_KEY_ENV, "").strip()
    if not key:
        raise ConfigError(f"set {ADMIN_KEY_ENV} to the token service's admin key (see rescue admin --help)")
    return key


def _call(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    url = args.api.rstrip("/") + path
    headers = {"authorization": f"Bearer {_admin_key()}"}
    try:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as client:
            response = client.request(method, url, json=body, headers=headers)
    except httpx.HTTPError as exc:
        raise ConfigError(f"cannot reach {args.api}: {exc}") from None
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code >= 400:
        if isinstance(doc, dict) and "error" in doc:
            raise ConfigError(f"{response.status_code} {doc['error']}: {doc.get('detail', '')}")
        raise ConfigError(f"{method} {path} answered {response.status_code}")
    return doc


def _print(doc: Any) -> int:
    json.dump(doc, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


def _pause(args: argparse.Namespace) -> int:
    return _print(_call(args, "POST", "/v1/admin/pause", {"reason": args.reason, "drain": args.drain}))


def _resume(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    return _print(_call(args, "POST", "/v1/admin/resume", body))


def _init_store(args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else {}
    return _print(_call(args, "POST", "/v1/admin/store/init", body))


def _status(args: argparse.Namespace) -> int:
    state = _call(args, "GET", "/v1/fallback/status")
    nodes = _call(args, "GET", "/v1/admin/nodes")
    return _print({"fleet": state, "nodes": nodes.get("nodes", []) if isinstance(nodes, dict) else []})


def _cohort(args: argparse.Namespace) -> int:
    path = f"/v1/admin/cohorts/{args.cohort_id}"
    if args.enable is None:
        return _print(_call(args, "GET", path))
    return _print(_call(args, "PUT", path, {"fallback_ws_enabled": args.enable}))
