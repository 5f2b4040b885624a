"""``rescue keygen``, ``rescue mint`` and ``rescue verify`` (SPEC §11)."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from rescue._keyfiles import load_keyring, load_signing_key
from rescue.cli import main
from rescue.protocol import KeyRing, SigningKey, b64url_decode, b64url_encode, mint_token, verify_token


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def _one_line(text: str) -> bool:
    return text.count("\n") == 1 and text.endswith("\n")


@pytest.fixture
def key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    path = tmp_path / "signing.json"
    status, _, _ = _run(capsys, "keygen", "--out", str(path))
    assert status == 0
    return path


@pytest.fixture
def jwks_file(tmp_path: Path, key_file: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KeyRing([load_signing_key(key_file)]).to_jwks()))
    return path


# ---------------------------------------------------------------------------------------------
# keygen


def test_keygen_writes_private_jwk_0600_and_prints_public_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.json"
    status, out, err = _run(capsys, "keygen", "--out", str(path))
    assert status == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private = json.loads(path.read_text())
    assert set(private) == {"kty", "crv", "x", "d", "kid"}
    key = SigningKey.from_jwk(private)
    assert json.loads(out) == {"keys": [key.public_jwk()]}
    assert private["d"] not in out
    assert private["d"] not in err
    assert key.kid_text in err
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]  # no temporary file left behind


def test_keygen_file_is_never_readable_by_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a permissive umask, the key bytes are only ever written to a file that is already 0600."""
    modes: list[int] = []
    real_write = os.write

    def spying_write(fd: int, data: bytes | memoryview) -> int:
        if b'"d"' in bytes(data):
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", spying_write)
    old_umask = os.umask(0)
    try:
        status, _, _ = _run(capsys, "keygen", "--out", str(tmp_path / "k.json"))
    finally:
        os.umask(old_umask)
    assert status == 0
    assert modes == [0o600]
    assert stat.S_IMODE((tmp_path / "k.json").stat().st_mode) == 0o600


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "k.json"
    path.write_text("precious")
    status, out, err = _run(capsys, "keygen", "--out", str(path))
    assert status == 1
    assert out == ""
    assert _one_line(err)
    assert "--force" in err
    assert path.read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["k.json"]

    status, out, _ = _run(capsys, "keygen", "--out", str(path), "--force")
    assert status == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(out)["keys"][0] == load_signing_key(path).public_jwk()


def test_keygen_reads_out_and_force_from_env(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "env.json"
    monkeypatch.setenv("RESCUE_OUT", str(path))
    assert _run(capsys, "keygen")[0] == 0
    first = path.read_text()
    monkeypatch.setenv("RESCUE_FORCE", "yes")
    assert _run(capsys, "keygen")[0] == 0
    assert path.read_text() != first


def test_keygen_into_missing_directory_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = _run(capsys, "keygen", "--out", str(tmp_path / "nope" / "k.json"))
    assert status == 1
    assert _one_line(err)


# ---------------------------------------------------------------------------------------------
# mint


def test_mint_prints_a_verifiable_token(key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(
        capsys, "mint", "--key", str(key_file), "--session", "s-1", "--role", "guest",
        "--ttl", "120", "--aud", "relay-2", "--cohort", "beta", "--fb", "1",
    )  # fmt: skip
    assert status == 0
    assert _one_line(out)
    token = b64url_decode(out.strip())
    claims = verify_token(token, load_keyring(key_file), now=time.time(), audience="relay-2")
    assert (claims.sid, claims.role, claims.aud, claims.cohort, claims.fb) == (
        "s-1",
        "guest",
        "relay-2",
        "beta",
        1,
    )
    assert claims.lifetime == 120
    assert abs(claims.iat - time.time()) < 60


def test_mint_defaults(key_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = _run(capsys, "mint", "--key", str(key_file), "--session", "s", "--role", "host")
    assert status == 0
    claims = verify_token(b64url_decode(out.strip()), load_keyring(key_file), now=time.time())
    assert (claims.aud, claims.cohort, claims.fb, claims.lifetime, claims.iss) == (
        "*",
        "default",
        0,
        300,
        "beach-rescue",
    )


@pytest.mark.parametrize("ttl", ["301", "0", "-1", "3600"])
def test_mint_refuses_ttl_out_of_range(key_file: Path, capsys: pytest.CaptureFixture[str], ttl: str) -> None:
    status, out, err = _run(
        capsys, "mint", "--key", str(key_file), "--session", "s", "--role", "host", f"--ttl={ttl}"
    )
    assert status != 0
    assert out == ""
    assert _one_line(err)
    assert "300" in err


def test_mint_reads_options_from_env(
    key_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESCUE_KEY", str(key_file))
    monkeypatch.setenv("RESCUE_SESSION", "from-env")
    monkeypatch.setenv("RESCUE_ROLE", "guest")
    monkeypatch.setenv("RESCUE_TTL", "30")
    status, out, _ = _run(capsys, "mint")
    assert status == 0
    claims = verify_token(b64url_decode(out.strip()), load_keyring(key_file), now=time.time())
    assert (claims.sid, claims.role, claims.lifetime) == ("from-env", "guest", 30)
    monkeypatch.setenv("RESCUE_TTL", "301")
    status, _, err = _run(capsys, "mint")
    assert status == 1
    assert _one_line(err)


@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (["--session", "bad session"], 1),  # not [A-Za-z0-9._:-]
        (["--session", "s", "--role", "admin"], 2),  # argparse choices
        (["--session", "s", "--ttl", "ten"], 2),  # argparse type
    ],
)
def test_mint_bad_arguments(
    key_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], status: int
) -> None:
    argv = ["mint", "--key", str(key_file), "--role", "host", *extra]
    if status == 2:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        capsys.readouterr()
    else:
        got, out, err = _run(capsys, *argv)
        assert (got, out) == (1, "")
        assert _one_line(err)


@pytest.mark.parametrize("content", [None, "{}", '{"keys": []}', "not json"])
def test_mint_with_bad_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None
) -> None:
    path = tmp_path / "key.json"
    if content is not None:
        path.write_text(content)
    status, out, err = _run(capsys, "mint", "--key", str(path), "--session", "s", "--role", "host")
    assert (status, out) == (1, "")
    assert _one_line(err)
    assert err.startswith("rescue mint: error:")


# ---------------------------------------------------------------------------------------------
# verify


def _token(key_file: Path, **kwargs: Any) -> str:
    args: dict[str, Any] = {"session_id": "sess", "role": "host", "now": time.time(), **kwargs}
    return b64url_encode(mint_token(load_signing_key(key_file), **args))


def test_verify_prints_claims_as_json(
    key_file: Path, jwks_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = _token(key_file, fb=1, cti=b"\xfa" * 16, audience="node-9")
    status, out, err = _run(capsys, "verify", "--keys", str(jwks_file), token)
    assert (status, err) == (0, "")
    claims = json.loads(out)
    assert set(claims) == {"iss", "aud", "exp", "nbf", "iat", "cti", "sid", "role", "cohort", "fb"}
    assert claims["cti"] == b64url_encode(b"\xfa" * 16)
    assert (claims["sid"], claims["role"], claims["fb"], claims["aud"]) == ("sess", "host", 1, "node-9")
    assert claims["exp"] - claims["iat"] == 300
    # --aud checks the audience
    assert _run(capsys, "verify", "--keys", str(jwks_file), "--aud", "node-9", token)[0] == 0


def test_verify_reads_token_from_stdin(
    key_file: Path, jwks_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(_token(key_file) + "\n"))
    status, out, _ = _run(capsys, "verify", "--keys", str(jwks_file), "-")
    assert status == 0
    assert json.loads(out)["sid"] == "sess"


def test_verify_with_keys_from_env(
    key_file: Path, jwks_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESCUE_KEYS", str(jwks_file))
    assert _run(capsys, "verify", _token(key_file))[0] == 0


def _failing(key_file: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    other = tmp_path / "other.json"
    other.write_text(json.dumps(KeyRing([SigningKey.generate()]).to_jwks()))
    good = _token(key_file)
    tampered = bytearray(b64url_decode(good))
    tampered[-1] ^= 0x01
    return {
        "expired": ([_token(key_file, now=time.time() - 1000)], ""),
        "not_yet_valid": ([_token(key_file, now=time.time() + 1000)], ""),
        "bad_signature": ([b64url_encode(bytes(tampered))], ""),
        "unknown_kid": ([good], str(other)),
        "wrong_audience": (["--aud", "node-b", _token(key_file, audience="node-a")], ""),
        "malformed": (["bm90IGEgdG9rZW4"], ""),
        "malformed ": (["***"], ""),  # not base64url at all
    }


@pytest.mark.parametrize(
    "reason",
    ["expired", "not_yet_valid", "bad_signature", "unknown_kid", "wrong_audience", "malformed", "malformed "],
)
def test_verify_failure_exits_1_with_the_reason(
    key_file: Path, jwks_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], reason: str
) -> None:
    argv, keys = _failing(key_file, tmp_path)[reason]
    status, out, err = _run(capsys, "verify", "--keys", keys or str(jwks_file), *argv)
    assert (status, out) == (1, "")
    assert _one_line(err)
    assert err.startswith(f"rescue verify: {reason.strip()}:")


def test_verify_with_bad_keys_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": [{"kty": "RSA"}]}')
    status, out, err = _run(capsys, "verify", "--keys", str(path), "AAAA")
    assert (status, out) == (1, "")
    assert _one_line(err)
    assert "kty" in err


# ---------------------------------------------------------------------------------------------
# the installed script, end to end


def test_installed_script_keygen_mint_verify(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "rescue"
    assert script.exists(), f"console script not installed at {script}"
    env = {**os.environ, "RESCUE_SESSION": "via-env"}
    env.pop("RESCUE_TTL", None)
    key = tmp_path / "key.json"

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(script), *argv], capture_output=True, text=True, env=env, timeout=60, check=False
        )

    keygen = run("keygen", "--out", str(key))
    assert keygen.returncode == 0, keygen.stderr
    jwks = tmp_path / "jwks.json"
    jwks.write_text(keygen.stdout)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600

    mint = run("mint", "--key", str(key), "--role", "guest", "--ttl", "60")
    assert mint.returncode == 0, mint.stderr
    verify = run("verify", "--keys", str(jwks), mint.stdout.strip())
    assert verify.returncode == 0, verify.stderr
    assert json.loads(verify.stdout)["sid"] == "via-env"

    refused = run("mint", "--key", str(key), "--role", "guest", "--ttl", "301")
    assert refused.returncode != 0
    assert refused.stdout == ""
    assert refused.stderr.count("\n") == 1

    help_text = run("verify", "--help")
    assert help_text.returncode == 0
    assert "RESCUE_KEYS" in help_text.stdout
