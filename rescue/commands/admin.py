"""``rescue admin pause|resume|status|cohort ID --enable/--disable [--api URL]`` (SPEC §11).

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
# An admin call is one small request; if the service doesn't answer in this long, say so.
REQUEST_TIMEOUT_S: Final = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``admin`` sub-command and its actions."""
    admin = subparsers.add_parser(
        "admin",
        help="operate the token service: pause, resume, status, cohort flags",
        description="Talk to the token service's admin API. The admin key comes from $RESCUE_ADMIN_KEY.",
    )
    actions = admin.add_subparsers(dest="action", metavar="ACTION", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        add_option(p, "--api", default=DEFAULT_API, metavar="URL", help="token service base URL")

    pause = actions.add_parser("pause", help="pause WebSocket fallback fleet-wide (kill switch)")
    pause.add_argument("--reason", default=None, help="why (shown in status)")
    pause.add_argument("--drain", action="store_true", help="also close existing relay sessions")
    common(pause)
    pause.set_defaults(func=_pause)

    resume = actions.add_parser("resume", help="resume WebSocket fallback")
    resume.add_argument("--reason", default=None, help="why (shown in status)")
    common(resume)
    resume.set_defaults(func=_resume)

    status = actions.add_parser("status", help="show the kill switch and the live relay nodes")
    common(status)
    status.set_defaults(func=_status)

    cohort = actions.add_parser("cohort", help="show or set a cohort's fallback_ws_enabled flag")
    cohort.add_argument("cohort_id", metavar="ID", help="cohort id")
    group = cohort.add_mutually_exclusive_group()
    group.add_argument("--enable", dest="enable", action="store_const", const=True, default=None)
    group.add_argument("--disable", dest="enable", action="store_const", const=False)
    common(cohort)
    cohort.set_defaults(func=_cohort)


def _admin_key() -> str:
    key = os.environ.get("RESCUE_ADMIN_KEY", "").strip()
    if not key:
        raise ConfigError("set RESCUE_ADMIN_KEY to the token service's admin key")
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


def _status(args: argparse.Namespace) -> int:
    state = _call(args, "GET", "/v1/fallback/status")
    nodes = _call(args, "GET", "/v1/admin/nodes")
    return _print({"fleet": state, "nodes": nodes.get("nodes", []) if isinstance(nodes, dict) else []})


def _cohort(args: argparse.Namespace) -> int:
    path = f"/v1/admin/cohorts/{args.cohort_id}"
    if args.enable is None:
        return _print(_call(args, "GET", path))
    return _print(_call(args, "PUT", path, {"fallback_ws_enabled": args.enable}))
