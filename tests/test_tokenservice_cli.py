"""``rescue token-service`` and ``rescue admin``: configuration, a real process, the admin CLI."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from rescue.cli import build_parser, main
from rescue.commands.token_service import build_config, run_token_service
from rescue.errors import ConfigError
from rescue.guardrails import GuardrailConfig, RedisStore
from rescue.protocol import SigningKey

from .conftest import token_service_process

TIMEOUT = 20  # a subprocess start on a loaded 2-core box


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    path = tmp_path / "signing.jwk"
    path.write_text(json.dumps(SigningKey.generate().to_jwk(private=True)))
    return str(path)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["token-service", *argv])


def test_build_config(key_file: str) -> None:
    args = parse("--signing-key", key_file, "--redis-url", "redis://x", "--relay-url", "wss://r/v1/connect")
    config = build_config(args, {"RESCUE_SERVICE_KEYS": "a, b,,", "RESCUE_ADMIN_KEY": "adm"})
    assert config.service_keys == {"a", "b"}
    assert config.admin_key == "adm"
    assert config.relay_url == "wss://r/v1/connect"
    assert not config.disable_oidc
    custom = parse("--signing-key", key_file, "--redis-url", "redis://x", "--admin-key-env", "MY_ADMIN")
    assert build_config(custom, {"MY_ADMIN": "k", "BEACH_RESCUE_DISABLE_OIDC": "1"}).admin_key == "k"


@pytest.mark.parametrize(
    ("extra", "env"),
    [
        ([], {}),  # nobody could mint
        ([], {"BEACH_RESCUE_DISABLE_OIDC": "1", "RESCUE_ENV": "production"}),  # ignored in production
        (["--token-ttl", "301"], {"RESCUE_SERVICE_KEYS": "k"}),
        (["--oidc-jwks", "x.json"], {"RESCUE_SERVICE_KEYS": "k"}),  # needs issuer and audience too
        (["--relay-url", "https://not-ws"], {"RESCUE_SERVICE_KEYS": "k"}),
    ],
)
def test_build_config_errors(key_file: str, extra: list[str], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        build_config(parse("--signing-key", key_file, "--redis-url", "redis://x", *extra), env)


def test_bad_key_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jwk"
    bad.write_text("{}")
    assert main(["token-service", "--signing-key", str(bad), "--redis-url", "redis://x"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rescue token-service: error:")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.redis
async def test_process_serves_and_exits_0_on_sigterm(key_file: str, redis_url: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with token_service_process(key_file, redis_url) as (process, port):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                r = await client.get("/healthz")
                assert r.json() == {"status": "ok", "fallback_paused": False}
                r = await client.post("/v1/admin/pause", headers={"authorization": "Bearer adm"})
                assert r.json()["paused"] is True
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


@pytest.mark.redis
async def test_admin_cli_against_live_service(
    key_file: str, redis_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = parse("--signing-key", key_file, "--redis-url", redis_url, "--relay-url", "wss://r/v1/connect")
    config = build_config(args, {"RESCUE_SERVICE_KEYS": "svc", "RESCUE_ADMIN_KEY": "adm"})
    monkeypatch.setenv("RESCUE_ADMIN_KEY", "adm")

    errors: list[str] = []

    async def cli(*argv: str) -> tuple[int, Any]:
        status = await trio.to_thread.run_sync(main, ["admin", *argv])
        captured = capsys.readouterr()
        errors.append(captured.err)
        return status, json.loads(captured.out) if captured.out.strip() else None

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                run_token_service, config, RedisStore(redis_url), GuardrailConfig(), "127.0.0.1", 0
            )
            api = ["--api", f"http://127.0.0.1:{port}"]
            status, doc = await cli("pause", "--reason", "drill", "--drain", *api)
            assert status == 0
            assert (doc["paused"], doc["reason"], doc["drain"]) == (True, "drill", True)
            status, doc = await cli("status", *api)
            assert doc["fleet"]["paused"] is True
            assert doc["nodes"] == []
            status, doc = await cli("resume", *api)
            assert doc["paused"] is False
            status, doc = await cli("cohort", "beta", "--enable", *api)
            assert doc["fallback_ws_enabled"] is True
            status, doc = await cli("cohort", "beta", *api)
            assert doc["fallback_ws_enabled"] is True
            status, doc = await cli("cohort", "beta", "--disable", *api)
            assert doc["fallback_ws_enabled"] is False
            # wrong key: one line on stderr, exit 1
            monkeypatch.setenv("RESCUE_ADMIN_KEY", "wrong")
            status, doc = await cli("status", *api)
            assert status == 1
            assert "403 forbidden" in errors[-1]
            assert len(errors[-1].strip().splitlines()) == 1
            monkeypatch.delenv("RESCUE_ADMIN_KEY")
            assert (await cli("status", *api))[0] == 1
            nursery.cancel_scope.cancel()


def test_admin_cli_unreachable(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RESCUE_ADMIN_KEY", "adm")
    assert main(["admin", "status", "--api", "http://127.0.0.1:9"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_bad_redis_url_is_one_line_error(
    key_file: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RESCUE_SERVICE_KEYS", "svc")
    for url in ("redis+cluster://h:x", "redis+sentinel://s1", "redis+sentinel://u:hunter2@s1"):
        assert main(["token-service", "--signing-key", key_file, "--redis-url", url]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("rescue token-service: error: bad Redis URL:")
        assert "hunter2" not in err[-1]
