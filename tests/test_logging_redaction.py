"""No token, key or passphrase ever reaches a log line (SPEC §5 "Secrets never appear in logs").

Covers rescue._log at every level it protects: secret-named fields (exact names and ``*_token`` /
``*_key`` … suffixes) at any depth of dicts, lists and tuples; bytes; messages and exception texts
that quote a secret (the shape scrubber); and the real operator commands (``rescue keygen``,
``rescue mint``) run through ``rescue.cli.main``, whose stderr and logs must carry no private key.
Also the line's shape: one timestamp (``ts``), and an ``event`` name on the HTTP server's own lines.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rescue import cli
from rescue._http import Request, Response, Router, serve_http
from rescue._log import configure_logging, get_logger, log_event, redact, scrub, session_tag

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def fake_secret() -> str:
    """A random secret shaped like ours (43 base64url chars, the size of an Ed25519 key or service key)."""
    return secrets.token_urlsafe(32)


@pytest.fixture
def log_stream() -> Any:
    """Route the ``rescue`` loggers to a string buffer as JSON lines; restore afterwards."""
    root = logging.getLogger("rescue")
    saved = (root.handlers[:], root.level, root.propagate)
    stream = io.StringIO()
    configure_logging("DEBUG", stream)
    yield stream
    root.handlers[:], root.level, root.propagate = saved


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


# --- field redaction -------------------------------------------------------------------------------

SECRET_NAMES = [
    "token",
    "passphrase",
    "psk",
    "key",
    "secret",
    "authorization",
    "Authorization",
    "d",
    "signing_key",
    "admin_key",
    "service_key",
    "password",
    "entitlement_proof",
    "access_token",
    "refresh_token",
    "retired_key",
    "client_secret",
    "db_password",
    "room_passphrase",
    "frame_psk",
]


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_named_fields_are_redacted(log_stream: io.StringIO, name: str) -> None:
    value = fake_secret()
    log_event(get_logger("test"), "secret.field", **{name: value, "node": "relay-1"})
    out = log_stream.getvalue()
    assert value not in out
    (doc,) = lines(log_stream)
    assert doc[name] == "[redacted]"
    assert doc["node"] == "relay-1"  # ordinary fields are untouched
    assert doc["event"] == "secret.field"


def test_nested_dicts_lists_and_tuples_are_redacted(log_stream: io.StringIO) -> None:
    d, token, psk = fake_secret(), fake_secret(), fake_secret()
    jwk_set = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "public-x", "d": d, "kid": "k1"}]}
    log_event(
        get_logger("test"),
        "nested",
        jwks=jwk_set,
        request={"headers": {"Authorization": f"Bearer {token}"}, "body": {"session_id": "s"}},
        attempts=({"psk": psk}, {"n": 2}),
    )
    out = log_stream.getvalue()
    for secret in (d, token, psk):
        assert secret not in out
    (doc,) = lines(log_stream)
    assert doc["jwks"]["keys"][0]["d"] == "[redacted]"
    assert doc["jwks"]["keys"][0]["x"] == "public-x"
    assert doc["request"]["headers"]["Authorization"] == "[redacted]"
    assert doc["attempts"] == [{"psk": "[redacted]"}, {"n": 2}]


def test_bytes_are_logged_as_their_length_only(log_stream: io.StringIO) -> None:
    raw = secrets.token_bytes(32)
    log_event(get_logger("test"), "bytes", frame=raw, nested={"blob": bytearray(raw)}, view=memoryview(raw))
    (doc,) = lines(log_stream)
    assert doc["frame"] == doc["nested"]["blob"] == doc["view"] == "<32 bytes>"
    assert raw.hex() not in log_stream.getvalue()


def test_guardrail_counts_and_identifiers_survive_redaction(log_stream: io.StringIO) -> None:
    """Redaction must not eat the numbers operators need (``tokens`` is a counter, not a token)."""
    tag = session_tag("a-session-id")
    log_event(
        get_logger("test"),
        "guardrail_soft_breach",
        cohort="dev",
        sessions=400,
        tokens=12,
        activations=3,
        ratio=0.0075,
        session=tag,
        request_id="550e8400-e29b-41d4-a716-446655440000",
        reason="guardrail_store_unavailable",
    )
    (doc,) = lines(log_stream)
    assert (doc["sessions"], doc["tokens"], doc["activations"], doc["ratio"]) == (400, 12, 3, 0.0075)
    assert doc["session"] == tag
    assert len(tag) == 12
    assert doc["request_id"] == "550e8400-e29b-41d4-a716-446655440000"
    assert doc["reason"] == "guardrail_store_unavailable"


# --- the line's shape ---------------------------------------------------------------------------------


def test_one_timestamp_per_line(log_stream: io.StringIO) -> None:
    """``ts`` is the only timestamp (a ``wall`` field used to say the same); no field replaces it."""
    before = time.time()
    log_event(get_logger("test"), "shape.check", cohort="dev")
    log_event(get_logger("test"), "shape.spoof", ts="yesterday", event_count=1)
    after = time.time()
    first, second = lines(log_stream)
    assert list(first) == ["ts", "level", "logger", "event", "cohort"]
    assert before - 0.001 <= first["ts"] <= after + 0.001
    assert isinstance(second["ts"], float)
    assert second["event"] == "shape.spoof"
    assert not any(key == "wall" for doc in (first, second) for key in doc)


class _BrokenApp:
    """An app whose ``handle`` raises (a Router never does: it answers 500 itself)."""

    max_body = 1024

    async def handle(self, request: Request) -> Response:
        raise RuntimeError("app failure")


async def test_server_lines_carry_an_event_name(log_stream: io.StringIO) -> None:
    """The HTTP server's own lines (bound, an app's crash) have an ``event``, their text in ``detail``."""
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve_http, Router(), "127.0.0.1", 0)
            nursery.cancel_scope.cancel()
        async with trio.open_nursery() as nursery:
            broken = await nursery.start(serve_http, _BrokenApp(), "127.0.0.1", 0)
            async with httpx.AsyncClient() as client:
                answer = await client.get(f"http://127.0.0.1:{broken}/")
                assert answer.status_code == 500
                assert "app failure" not in answer.text
            nursery.cancel_scope.cancel()
    server = [doc for doc in lines(log_stream) if doc["logger"] == "rescue.http.server"]
    events = [doc["event"] for doc in server]
    assert events.count("http.server.bound") == 2
    assert "http.server.app_error" in events
    bound = next(doc for doc in server if doc["event"] == "http.server.bound")
    assert bound["url"] == f"http://127.0.0.1:{port}"
    assert bound["detail"] == f"listening on http://127.0.0.1:{port}"
    crash = next(doc for doc in server if doc["event"] == "http.server.app_error")
    assert crash["level"] == "error"
    assert "app failure" in crash["exc"]
    assert all(" " not in doc["event"] for doc in server)


# --- free text: messages and exceptions --------------------------------------------------------------


def test_secret_in_exception_message_is_scrubbed(log_stream: io.StringIO) -> None:
    token = fake_secret() + fake_secret()
    logger = get_logger("test")
    try:
        raise ValueError(f"cannot decode token {token}")
    except ValueError:
        logger.exception("token.decode_failed")
    out = log_stream.getvalue()
    assert token not in out
    (doc,) = lines(log_stream)
    assert "ValueError: cannot decode token [redacted]" in doc["exc"]


def test_secret_in_chained_exception_and_format_args_is_scrubbed(log_stream: io.StringIO) -> None:
    key, token = fake_secret(), fake_secret()
    logger = get_logger("test")
    try:
        try:
            raise KeyError(key)
        except KeyError as inner:
            raise RuntimeError(f"lookup failed near {token}") from inner
    except RuntimeError:
        logger.exception("lookup.failed")
    logger.warning("bad header %s", f"Bearer {token}")
    out = log_stream.getvalue()
    assert key not in out
    assert token not in out
    assert len(lines(log_stream)) == 2


def test_str_of_unserialisable_objects_is_scrubbed(log_stream: io.StringIO) -> None:
    secret = fake_secret()

    class Opaque:
        def __str__(self) -> str:
            return f"Opaque(material={secret})"

    log_event(get_logger("test"), "opaque", thing=Opaque())
    assert secret not in log_stream.getvalue()
    (doc,) = lines(log_stream)
    assert doc["thing"] == "Opaque(material=[redacted])"


def test_scrub_leaves_ordinary_text_alone() -> None:
    text = (
        "transport.fallback.activated node=relay-1 cohort=dev_cohort_with_a_really_long_name_here "
        "digest=sha256:"
        + "ab" * 32
        + " uuid=550e8400-e29b-41d4-a716-446655440000 url=wss://r1.example/v1/connect"
    )
    assert scrub(text) == text


@given(
    secret=st.text(alphabet=B64URL, min_size=32, max_size=300).filter(
        lambda s: any(c.isupper() for c in s) and any(c.islower() for c in s) and any(c.isdigit() for c in s)
    ),
    before=st.sampled_from(["", " ", "token=", "Bearer ", '"', "(", "\n"]),
    after=st.sampled_from(["", " ", ".", '"', ")", "\n", ":"]),
)
def test_scrub_removes_every_token_shaped_run(secret: str, before: str, after: str) -> None:
    assert secret not in scrub(f"prefix {before}{secret}{after} suffix")


def _nest(value: Any, path: list[int]) -> Any:
    """Wrap ``value`` under a secret-named key, then in layers of dicts/lists chosen by ``path``."""
    node: Any = {"token": value}
    for step in path:
        node = {"wrapper": node} if step == 0 else [node, 1] if step == 1 else ({"x": 1}, node)
    return node


@given(
    secret=st.text(min_size=8, max_size=64).map(lambda s: "SECRET-" + s),
    path=st.lists(st.integers(0, 2), max_size=6),
)
def test_secret_fields_are_redacted_at_any_depth(secret: str, path: list[int]) -> None:
    """Any value (not only token-shaped) under a secret name is gone, however deep."""
    stream = io.StringIO()
    formatter_logger = logging.getLogger("rescue.test.hypothesis")
    root = logging.getLogger("rescue")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        configure_logging("DEBUG", stream)
        log_event(formatter_logger, "deep", payload=_nest(secret, path))
    finally:
        root.handlers[:], root.level, root.propagate = saved
    assert json.dumps(secret)[1:-1] not in stream.getvalue()
    assert secret not in json.dumps(redact({"payload": _nest(secret, path)}), default=str)


# --- the operator commands --------------------------------------------------------------------------


def _private_d(key_file: Path) -> str:
    doc = json.loads(key_file.read_text())
    jwk = doc["keys"][0] if "keys" in doc else doc
    d = jwk["d"]
    assert isinstance(d, str)
    assert len(d) >= 40
    return d


def test_keygen_and_mint_never_print_or_log_the_private_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], log_stream: io.StringIO
) -> None:
    key_file = tmp_path / "signing-key.json"
    assert cli.main(["keygen", "--out", str(key_file)]) == 0
    keygen_out, keygen_err = capsys.readouterr()
    d = _private_d(key_file)
    assert d not in keygen_out
    assert d not in keygen_err
    public = json.loads(keygen_out)
    assert all("d" not in jwk for jwk in public["keys"])

    assert cli.main(["mint", "--key", str(key_file), "--session", "sess-123", "--role", "host"]) == 0
    mint_out, mint_err = capsys.readouterr()
    token = mint_out.strip()
    assert len(token) > 100  # the token itself is the command's output, by design
    assert d not in mint_out + mint_err
    assert token not in mint_err
    assert "sess-123" not in mint_err

    # A failing mint (TTL over the limit) reports one line and still leaks nothing.
    assert (
        cli.main(["mint", "--key", str(key_file), "--session", "s", "--role", "guest", "--ttl", "301"]) != 0
    )
    _, bad_err = capsys.readouterr()
    assert bad_err.strip()
    assert d not in bad_err

    logs = log_stream.getvalue()
    assert d not in logs
    assert token not in logs


def test_verify_failure_does_not_echo_the_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], log_stream: io.StringIO
) -> None:
    key_file = tmp_path / "k.json"
    other = tmp_path / "other.json"
    assert cli.main(["keygen", "--out", str(key_file)]) == 0
    capsys.readouterr()
    assert cli.main(["keygen", "--out", str(other)]) == 0
    other_jwks, _ = capsys.readouterr()
    jwks_file = tmp_path / "other-jwks.json"
    jwks_file.write_text(other_jwks)
    assert cli.main(["mint", "--key", str(key_file), "--session", "s1", "--role", "host"]) == 0
    token = capsys.readouterr().out.strip()
    # Signed by a key the JWK set does not hold: verification fails, and says why without the token.
    assert cli.main(["verify", "--keys", str(jwks_file), token]) != 0
    out, err = capsys.readouterr()
    assert err.strip()
    assert token not in out + err + log_stream.getvalue()
