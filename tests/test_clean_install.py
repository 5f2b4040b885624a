"""Clean install end to end: what `pip install beach-rescue` gives a user, tested as the user runs it.

Once per session: build the wheel, install it into a fresh venv **without** any extra, resolving the
newest releases pyproject.toml allows (no lock: that is what a user gets), then drive only that venv's
``rescue``: keygen → mint → verify; ``rescue dev`` + ``rescue share --no-pty`` + ``rescue join``
moving a few MiB byte-exact; ``rescue relay`` and ``rescue token-service`` (private redis-server,
``--redis-url``) answering ``/healthz`` and exiting 0 on SIGTERM; and the two deployed as an operator
deploys them (docs/operations/runbook.md): an empty Redis, ``rescue admin init-store``, a cohort
enabled with ``rescue admin cohort``, the relay taking its keys, kill-switch state and registration
from the token service and Redis, a session through them, both drained by SIGTERM.

Needs PyPI, so it is marked ``clean_install`` and deselected by default; ``.ci/run`` runs it
(``./run pytest -m clean_install``). The dev venv's cwt caps cbor2 below 6; this venv has whatever
is newest, which is how cbor2 6 once broke every token without the suite noticing (issue #10).
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
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

from rescue.guardrails._store import NODES_KEY, node_key

from .conftest import RedisServer

pytestmark = [pytest.mark.clean_install, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT_S = 600  # wheel build + resolving and downloading the runtime dependencies
START_TIMEOUT_S = 30  # a process start on a loaded 2-core box
PASSPHRASE = "correct horse battery staple"
SESSION_TIMEOUT_S = 60  # share + join moving a few MiB: ~1 s when it works
# the JSON log line each service writes once it listens (stderr)
LISTENING = re.compile(rb'^(\{[^\n]*"event": ?"(?:relay|tokenservice)\.listening"[^\n]*\})\n', re.MULTILINE)


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
        [str(clean_venv.bin / "python"), "-P", "-m", "rescue", "--version"],  # -P: the installed one
        capture_output=True, text=True, check=True, timeout=60, env=clean_venv.env(),
    )  # fmt: skip
    assert module.stdout.startswith("rescue ")
    # the wheel a user builds compiles the relay's hot path (setup.py; CI has gcc: .ci/run)
    assert module.stdout.strip().endswith("hot path compiled (mypyc)"), module.stdout


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
        await _share_cat_join(clean_venv, env, data, "--api", match[1].decode(), session="clean-raw")
        await _sigterm_exits_0(dev)


async def _share_cat_join(
    venv: CleanVenv, env: dict[str, str], data: bytes, *options: str, session: str
) -> None:
    """``rescue share --no-pty SESSION -- cat`` and ``rescue join SESSION`` (``options`` to both) with
    ``data`` on the guest's stdin: the guest's stdout is ``data``, byte-exact, and both exit 0."""
    share_argv = [venv.rescue, "share", "--no-pty", *options, "--session", session, "--", "cat"]
    join_argv = [venv.rescue, "join", session, *options]
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}

    async def run(name: str, argv: list[str], stdin: bytes) -> None:
        results[name] = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False, env=env
        )

    with trio.fail_after(SESSION_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, "share", share_argv, b"")
            nursery.start_soon(run, "join", join_argv, data)
    share, join = results["share"], results["join"]
    assert share.returncode == 0, share.stderr.decode(errors="replace")
    assert join.returncode == 0, join.stderr.decode(errors="replace")
    assert len(join.stdout) == len(data)
    assert join.stdout == data


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
        "--redis-url", redis_url, "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        "--relay-url", "ws://127.0.0.1:1/v1/connect", "--drain-s", "1",
    ]  # fmt: skip
    async with (
        _running(relay_argv, env, LISTENING) as (relay, relay_up),
        _running(service_argv, env, LISTENING) as (service, service_up),
        httpx.AsyncClient(timeout=10) as http,
    ):
        admin_port = json.loads(relay_up[1])["admin_port"]
        health = await http.get(f"http://127.0.0.1:{admin_port}/healthz")
        assert health.status_code == 200, health.text
        service_listening = json.loads(service_up[1])
        for port in (service_listening["port"], service_listening["admin_port"]):  # decision 0024
            health = await http.get(f"http://127.0.0.1:{port}/healthz")
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "ok"
        await _sigterm_exits_0(relay)
        await _sigterm_exits_0(service)


@pytest.mark.redis
async def test_operator_deployment_carries_a_session_and_drains(
    clean_venv: CleanVenv, tmp_path: Path, private_redis: RedisServer
) -> None:
    """The runbook's first deployment, each step a separate ``rescue`` process of the clean venv.

    Each operator step is checked to matter (a token request answered 403 ``fallback_paused``,
    then ``cohort_disabled``, then 503 ``no_relay_available`` until the relay registers); the relay
    takes its keys from ``--keys <token service>/v1/fallback/keys``, so a session that moves its
    bytes is proof that it verifies the service's tokens (a relay with other keys closes the peers
    with AUTH_FAILED and ``rescue share`` exits 1; a keys URL that does not answer stops the relay
    at start).
    """
    private_redis.flush(initialise=False)  # a new deployment: only `rescue admin init-store` marks it
    redis_url = private_redis.url
    key = tmp_path / "signing.jwk"
    with trio.fail_after(START_TIMEOUT_S):
        await trio.run_process(
            [clean_venv.rescue, "keygen", "--out", str(key)], capture_stdout=True, env=clean_venv.env()
        )
    admin_key, service_key, report_key, tag_key = (secrets.token_urlsafe(24) for _ in range(4))
    service_env = clean_venv.env(
        RESCUE_ENV="production",
        RESCUE_ADMIN_KEY=admin_key,
        RESCUE_SERVICE_KEYS=service_key,
        RESCUE_REPORT_KEYS=report_key,
        RESCUE_LOG_TAG_KEY=tag_key,
    )
    service_argv = [
        clean_venv.rescue, "token-service", "--signing-key", str(key), "--redis-url", redis_url,
        "--host", "127.0.0.1", "--port", "0", "--admin-port", "0", "--drain-s", "1",
    ]  # fmt: skip
    node_id, cohort = "clean-relay-1", "shipcheck"
    operator_env = clean_venv.env(RESCUE_ADMIN_KEY=admin_key)

    async def rescue(*args: str, env: dict[str, str]) -> str:
        done = await trio.run_process(
            [clean_venv.rescue, *args], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
        assert done.returncode == 0, f"rescue {args[0]}: {done.stderr.decode(errors='replace')}"
        return done.stdout.decode()

    with trio.fail_after(3 * START_TIMEOUT_S + SESSION_TIMEOUT_S):
        async with (
            _running(service_argv, service_env, LISTENING) as (service, service_up),
            httpx.AsyncClient(timeout=10, headers={"authorization": f"Bearer {service_key}"}) as http,
        ):
            api = f"http://127.0.0.1:{json.loads(service_up[1])['port']}"

            async def mint(session: str) -> httpx.Response:
                body = {"session_id": session, "role": "host", "cohort_id": cohort,
                        "client_version": "clean/1", "telemetry_opt_in": False}  # fmt: skip
                return await http.post(f"{api}/v1/fallback/token", json=body)

            refused = await mint("before-init")
            assert (refused.status_code, refused.json()["error"]) == (403, "fallback_paused"), refused.text
            await rescue("admin", "init-store", "--reason", "first deploy", "--api", api, env=operator_env)
            refused = await mint("before-cohort")
            assert (refused.status_code, refused.json()["error"]) == (403, "cohort_disabled"), refused.text
            await rescue("admin", "cohort", cohort, "--enable", "--api", api, env=operator_env)
            refused = await mint("before-relay")
            assert (refused.status_code, refused.json()["error"]) == (503, "no_relay_available"), refused.text

            relay_argv = [
                clean_venv.rescue, "relay", "--keys", f"{api}/v1/fallback/keys", "--token-service", api,
                "--redis-url", redis_url, "--node-id", node_id, "--host", "127.0.0.1", "--port", "0",
                "--admin-port", "0", "--drain-s", "1",
            ]  # fmt: skip
            relay_env = clean_venv.env(
                RESCUE_ENV="production", RESCUE_REPORT_KEY=report_key, RESCUE_LOG_TAG_KEY=tag_key
            )
            async with _running(relay_argv, relay_env, LISTENING) as (relay, relay_up):
                listening = json.loads(relay_up[1])
                admin = f"http://127.0.0.1:{listening['admin_port']}"
                ready = await http.get(f"{admin}/readyz")
                assert ready.status_code == 200, ready.text

                # a token minted over HTTP names the registered node, and verifies with the
                # service's published keys
                minted = await mint("over-http")
                assert minted.status_code == 200, minted.text
                assert minted.json()["relay_url"] == listening["url"]
                published = await http.get(f"{api}/v1/fallback/keys")
                assert published.status_code == 200, published.text
                (tmp_path / "published.jwks").write_bytes(published.content)
                claims = json.loads(
                    await rescue(
                        "verify", "--keys", str(tmp_path / "published.jwks"), "--aud", node_id,
                        minted.json()["token"], env=clean_venv.env(),
                    )
                )  # fmt: skip
                assert (claims["sid"], claims["role"], claims["aud"]) == ("over-http", "host", node_id)

                data = bytes(range(256)) * 16 + random.Random(11).randbytes(1024 * 1024)
                peer_env = clean_venv.env(RESCUE_SERVICE_KEY=service_key, RESCUE_PASSPHRASE=PASSPHRASE)
                await _share_cat_join(
                    clean_venv, peer_env, data, "--api", api, "--cohort", cohort, session="clean-ops"
                )

                # the relay reported the activation with its report key
                with trio.fail_after(START_TIMEOUT_S):
                    while True:
                        window = await http.get(
                            f"{api}/v1/admin/guardrails",
                            params={"cohort": cohort},
                            headers={"authorization": f"Bearer {admin_key}"},
                        )
                        assert window.status_code == 200, window.text
                        if window.json()["activations"] >= 1:
                            break
                        await trio.sleep(0.05)

                with private_redis.client() as store:
                    assert store.exists(node_key(node_id)) == 1
                    assert store.sismember(NODES_KEY, node_id)
                    await _sigterm_exits_0(relay)
                    assert store.exists(node_key(node_id)) == 0, "the relay's registration outlived it"
                    assert not store.sismember(NODES_KEY, node_id)
            await _sigterm_exits_0(service)
