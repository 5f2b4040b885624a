"""Clean install end to end: what `pip install beach-rescue` gives a user, tested as the user runs it.

Once per session: build the wheel, install it into a fresh venv **without** any extra, resolving the
newest releases pyproject.toml allows (no lock: that is what a user gets), then drive only that venv's
``rescue``: keygen → mint → verify; ``rescue dev`` + ``rescue share --no-pty`` + ``rescue join``
moving a few MiB byte-exact; ``rescue relay`` and ``rescue token-service`` (private redis-server,
``--redis-url``) answering ``/healthz`` and exiting 0 on SIGTERM.

Needs PyPI, so it is marked ``clean_install`` and deselected by default; ``.ci/run`` runs it
(``./run pytest -m clean_install``). The dev venv's cwt caps cbor2 below 6; this venv has whatever
is newest, which is how cbor2 6 once broke every token without the suite noticing (issue #10).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import trio

pytestmark = [pytest.mark.clean_install, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 600  # wheel build + resolving and downloading the runtime dependencies
START_TIMEOUT_S = 30  # a process start on a loaded 2-core box
PASSPHRASE = "correct horse battery staple"


@dataclass(frozen=True)
class CleanVenv:
    bin: Path

    @property
    def rescue(self) -> str:
        return str(self.bin / "rescue")

    def env(self, **extra: str) -> dict[str, str]:
        # only this venv on PATH, and none of the caller's RESCUE_* settings
        own = ("RESCUE_", "FALLBACK_", "VIRTUAL_ENV")
        env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
        return {**env, "PATH": f"{self.bin}:/usr/bin:/bin", **extra}


@pytest.fixture(scope="session")
def clean_venv(tmp_path_factory: pytest.TempPathFactory) -> CleanVenv:
    work = tmp_path_factory.mktemp("clean-install")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(work / "dist"), str(ROOT)],
        check=True,
        timeout=INSTALL_TIMEOUT_S,
    )
    (wheel,) = (work / "dist").glob("beach_rescue-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    vpip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*vpip, "install", "--quiet", str(wheel)], check=True, timeout=INSTALL_TIMEOUT_S)
    subprocess.run([*vpip, "check"], check=True, timeout=120)
    return CleanVenv(venv / "bin")


def _installed(venv: CleanVenv) -> dict[str, str]:
    out = subprocess.run(
        [str(venv.bin / "python"), "-m", "pip", "--disable-pip-version-check", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {p["name"].lower(): p["version"] for p in json.loads(out)}


def test_venv_has_the_runtime_dependencies_only(clean_venv: CleanVenv) -> None:
    installed = _installed(clean_venv)
    assert "beach-rescue" in installed
    for dev_only in ("cwt", "pytest", "hypothesis", "trio-websocket", "ruff", "mypy"):
        assert dev_only not in installed, f"{dev_only} reached a user's install without extras"
    # the package runs from the venv, not from this checkout
    where = subprocess.run(
        [str(clean_venv.bin / "python"), "-c", "import rescue; print(rescue.__file__)"],
        capture_output=True, text=True, check=True, cwd="/", timeout=60,
    ).stdout  # fmt: skip
    assert where.startswith(str(clean_venv.bin.parent)), where


def test_keygen_mint_verify(clean_venv: CleanVenv, tmp_path: Path) -> None:
    def rescue(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [clean_venv.rescue, *args], input=stdin, capture_output=True, text=True,
            check=False, timeout=60, cwd=tmp_path, env=clean_venv.env(),
        )  # fmt: skip

    made = rescue("keygen", "--out", "signing.jwk")
    assert made.returncode == 0, made.stderr
    (tmp_path / "jwks.json").write_text(made.stdout)
    minted = rescue("mint", "--key", "signing.jwk", "--session", "clean-1", "--role", "guest", "--aud", "n1")
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    verified = rescue("verify", "--keys", "jwks.json", "--aud", "n1", token)
    assert verified.returncode == 0, verified.stderr
    claims = json.loads(verified.stdout)
    assert (claims["sid"], claims["role"], claims["aud"]) == ("clean-1", "guest", "n1")
    wrong = rescue("verify", "--keys", "jwks.json", "--aud", "n2", "-", stdin=token)
    assert wrong.returncode == 1
    assert "wrong_audience" in wrong.stderr
    module = subprocess.run(
        [str(clean_venv.bin / "python"), "-m", "rescue", "--version"],
        capture_output=True, text=True, check=True, timeout=60, env=clean_venv.env(),
    )  # fmt: skip
    assert module.stdout.startswith("rescue ")


@dataclass
class Running:
    process: trio.Process
    output: bytearray = field(default_factory=bytearray)


@asynccontextmanager
async def _running(
    argv: list[str], env: dict[str, str], ready: re.Pattern[bytes], *, stream: str = "stderr"
) -> AsyncIterator[tuple[Running, re.Match[bytes]]]:
    """Start ``argv``, wait until ``stream`` matches ``ready``, keep draining it; kill on the way out."""
    process = await trio.lowlevel.open_process(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
    )
    pipe = process.stdout if stream == "stdout" else process.stderr
    assert pipe is not None
    running = Running(process)
    try:
        with trio.fail_after(START_TIMEOUT_S):
            while (match := ready.search(running.output)) is None:
                chunk = await pipe.receive_some()
                assert chunk, f"{argv[1]} exited early: {running.output.decode(errors='replace')}"
                running.output += chunk

        async def drain() -> None:
            while chunk := await pipe.receive_some():
                running.output += chunk

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain)
            yield running, match
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.move_on_after(10):
            await process.wait()
        await pipe.aclose()


async def _sigterm_exits_0(running: Running) -> None:
    running.process.send_signal(signal.SIGTERM)
    with trio.fail_after(START_TIMEOUT_S):
        status = await running.process.wait()
    assert status == 0, running.output.decode(errors="replace")


async def test_dev_share_join_moves_mib_byte_exact(clean_venv: CleanVenv) -> None:
    data = bytes(range(256)) * 64 + random.Random(10).randbytes(3 * 1024 * 1024)
    env = clean_venv.env(RESCUE_ENV="development", RESCUE_PASSPHRASE=PASSPHRASE)
    dev_argv = [clean_venv.rescue, "dev", "--api-port", "0", "--relay-port", "0", "--admin-port", "0"]
    banner = re.compile(rb"token service\s+(http://\S+)[\s\S]*Stop with Ctrl-C\.")
    async with _running(dev_argv, env, banner, stream="stdout") as (dev, match):
        api = match[1].decode()
        share_argv = [clean_venv.rescue, "share", "--no-pty", "--api", api, "--session", "clean-raw"]
        share_argv += ["--", "cat"]
        join_argv = [clean_venv.rescue, "join", "clean-raw", "--api", api]
        results: dict[str, subprocess.CompletedProcess[bytes]] = {}

        async def run(name: str, argv: list[str], stdin: bytes) -> None:
            results[name] = await trio.run_process(
                argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
            )

        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run, "share", share_argv, b"")
                nursery.start_soon(run, "join", join_argv, data)
        share, join = results["share"], results["join"]
        assert share.returncode == 0, share.stderr.decode(errors="replace")
        assert join.returncode == 0, join.stderr.decode(errors="replace")
        assert len(join.stdout) == len(data)
        assert join.stdout == data
        await _sigterm_exits_0(dev)


@pytest.mark.redis
async def test_relay_and_token_service_answer_healthz_and_exit_0_on_sigterm(
    clean_venv: CleanVenv, tmp_path: Path, redis_url: str
) -> None:
    made = subprocess.run(
        [clean_venv.rescue, "keygen", "--out", str(tmp_path / "signing.jwk")],
        capture_output=True, text=True, check=True, timeout=60, env=clean_venv.env(),
    )  # fmt: skip
    (tmp_path / "jwks.json").write_text(made.stdout)
    env = clean_venv.env(RESCUE_SERVICE_KEYS="svc", RESCUE_ENV="test")
    relay_argv = [
        clean_venv.rescue, "relay", "--keys", str(tmp_path / "jwks.json"), "--node-id", "clean",
        "--host", "127.0.0.1", "--port", "0", "--admin-port", "0", "--drain-s", "1",
    ]  # fmt: skip
    service_argv = [
        clean_venv.rescue, "token-service", "--signing-key", str(tmp_path / "signing.jwk"),
        "--redis-url", redis_url, "--host", "127.0.0.1", "--port", "0",
        "--relay-url", "ws://127.0.0.1:1/v1/connect",
    ]  # fmt: skip
    listening = re.compile(
        rb'^(\{[^\n]*"event": ?"(?:relay|tokenservice)\.listening"[^\n]*\})\n', re.MULTILINE
    )
    async with (
        _running(relay_argv, env, listening) as (relay, relay_up),
        _running(service_argv, env, listening) as (service, service_up),
        httpx.AsyncClient(timeout=10) as http,
    ):
        admin_port = json.loads(relay_up[1])["admin_port"]
        health = await http.get(f"http://127.0.0.1:{admin_port}/healthz")
        assert health.status_code == 200, health.text
        api_port = json.loads(service_up[1])["port"]
        health = await http.get(f"http://127.0.0.1:{api_port}/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["status"] == "ok"
        await _sigterm_exits_0(relay)
        await _sigterm_exits_0(service)
