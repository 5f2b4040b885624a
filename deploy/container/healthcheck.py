"""Container health probe for the beach-rescue image (no curl in python:3.11-slim).

Exits 0 when ``GET <url>`` answers 200 (and, if the body is a JSON object with a ``status`` field, that
field is ``"ok"``), 1 otherwise,
printing one line either way (Docker keeps the last few in ``docker inspect``).

It is a liveness check: ECS (and Swarm) replace a container it calls unhealthy, so it probes
``/livez``, which never asks Redis or the token service (decision 0021): a store outage must leave
the container healthy (not ready), never restart it. The URL is ``$RESCUE_HEALTHCHECK_URL`` when
set, else the relay's admin port: ``http://127.0.0.1:${RESCUE_ADMIN_PORT:-9090}/livez``. The token
service's admin port is 9080 by default (decision 0024: probes apart from its API port's connection
cap), so its containers set ``RESCUE_HEALTHCHECK_URL=http://127.0.0.1:9080/livez`` (or
``RESCUE_ADMIN_PORT``, which is its ``--admin-port`` too).

Standard library only, so it runs with the image's interpreter and nothing else.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

# Docker's HEALTHCHECK --timeout is 3 s; answer before it so our own message, not a kill, is recorded.
TIMEOUT_S = 2.0
# /livez answers are tiny JSON objects; never read more than this from a confused server.
MAX_BODY = 64 * 1024


def health_url(environ: dict[str, str]) -> str:
    """The URL to probe, from the environment (see the module docstring)."""
    explicit = environ.get("RESCUE_HEALTHCHECK_URL", "").strip()
    if explicit:
        return explicit
    port = environ.get("RESCUE_ADMIN_PORT", "").strip() or "9090"
    return f"http://127.0.0.1:{port}/livez"


def probe(url: str, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """One probe: ``(healthy, one-line description)``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            status = response.status
            body = response.read(MAX_BODY)
    except urllib.error.HTTPError as exc:
        return False, f"unhealthy: {url} answered {exc.code}"
    except (OSError, ValueError) as exc:
        return False, f"unhealthy: {url} unreachable: {exc}"
    if status != 200:
        return False, f"unhealthy: {url} answered {status}"
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None  # a plain-text 200 is healthy; only a JSON status other than "ok" is not
    if isinstance(doc, dict) and "status" in doc and doc["status"] != "ok":
        return False, f"unhealthy: {url} answered 200 with status {doc['status']!r}"
    return True, f"healthy: {url}"


def main() -> int:
    healthy, line = probe(health_url(dict(os.environ)))
    print(line)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
