"""Give each ECS task its own relay node identity, then exec ``rescue`` (deploy/ecs/relay.json).

Every relay node needs a unique node id and the public URL clients reach it at (SPEC §7: the token
service assigns sessions to a node and puts that node's URL in the token answer). Kubernetes hands a
pod its name through the downward API; ECS has no such thing, so this launcher reads the task
metadata endpoint (``$ECS_CONTAINER_METADATA_URI_V4``) and sets:

- ``RESCUE_NODE_ID`` = ``relay-<task id>`` (the last part of the task ARN), unless already set;
- ``RESCUE_PUBLIC_URL`` = ``$RESCUE_PUBLIC_URL_TEMPLATE`` with ``{task_id}``, ``{node_id}`` and
  ``{ip}`` (the task's private IPv4) filled in, unless ``RESCUE_PUBLIC_URL`` is already set.

then replaces itself with ``rescue <its arguments>``, so signals (SIGTERM → drain) reach the relay
directly. Standard library only. Outside ECS (no metadata variable) it changes nothing.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Any

METADATA_ENV = "ECS_CONTAINER_METADATA_URI_V4"
# The metadata endpoint is link-local and answers in milliseconds; don't hang a task start on it.
TIMEOUT_S = 5.0
# Task metadata is a few KiB; refuse to read more than this.
MAX_BODY = 1024 * 1024


class LaunchError(Exception):
    """The task metadata could not be read or lacks what we need."""


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return json.loads(response.read(MAX_BODY))
    except (OSError, ValueError) as exc:
        raise LaunchError(f"cannot read ECS metadata {url}: {exc}") from exc


def node_environment(environ: dict[str, str]) -> dict[str, str]:
    """The ``RESCUE_*`` variables to add for this task (empty outside ECS)."""
    base = environ.get(METADATA_ENV, "").rstrip("/")
    if not base:
        return {}
    task = _get_json(f"{base}/task")
    container = _get_json(base)
    try:
        task_id = str(task["TaskARN"]).rsplit("/", 1)[-1]
        ip = str(container["Networks"][0]["IPv4Addresses"][0])
    except (KeyError, IndexError, TypeError) as exc:
        raise LaunchError(f"ECS metadata lacks the task ARN or the task IP: {exc!r}") from exc
    if not task_id:
        raise LaunchError("ECS metadata has an empty task ARN")
    out: dict[str, str] = {}
    node_id = environ.get("RESCUE_NODE_ID") or f"relay-{task_id}"
    if "RESCUE_NODE_ID" not in environ:
        out["RESCUE_NODE_ID"] = node_id
    template = environ.get("RESCUE_PUBLIC_URL_TEMPLATE", "")
    if template and "RESCUE_PUBLIC_URL" not in environ:
        try:
            out["RESCUE_PUBLIC_URL"] = template.format(task_id=task_id, node_id=node_id, ip=ip)
        except (KeyError, IndexError, ValueError) as exc:
            raise LaunchError(f"bad RESCUE_PUBLIC_URL_TEMPLATE {template!r}: {exc!r}") from exc
    return out


def main(argv: list[str]) -> int:
    try:
        extra = node_environment(dict(os.environ))
    except LaunchError as exc:
        print(f"ecs_launch: error: {exc}", file=sys.stderr)
        return 1
    os.environ.update(extra)
    os.execvp("rescue", ["rescue", *argv])  # replace ourselves: SIGTERM must reach the relay
    return 0  # pragma: no cover - execvp does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
