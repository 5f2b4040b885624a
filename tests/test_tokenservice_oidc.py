"""Entitlement proofs: RS256 and EdDSA JWTs against a JWKS from a file or an httpx-fetched URL."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ConfigError
from rescue.guardrails import Guardrails, MemoryStore
from rescue.protocol import SigningKey
from rescue.tokenservice import (
    EntitlementError,
    JwksSource,
    OidcUnavailable,
    OidcVerifier,
    PublishedKeys,
    TokenService,
    TokenServiceConfig,
)
from rescue.tokenservice._oidc import parse_jwks

NOW = 1_700_000_000.0
ISS = "https://id.beach.example"
AUD = "beach-rescue"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64_int(n: int) -> str:
    return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = Ed25519PrivateKey.generate()
OTHER_ED_KEY = Ed25519PrivateKey.generate()


def rsa_jwk(kid: str = "rsa-1") -> dict[str, Any]:
    numbers = RSA_KEY.public_key().public_numbers()
    return {
        "kty": "RSA",
        "kid": kid,
        "use": "sig",
        "alg": "RS256",
        "n": b64_int(numbers.n),
        "e": b64_int(numbers.e),
    }


def ed_jwk(key: Ed25519PrivateKey = ED_KEY, kid: str = "ed-1") -> dict[str, Any]:
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return {"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(raw)}


def jwt(
    claims: dict[str, Any] | None = None,
    *,
    alg: str = "EdDSA",
    kid: str | None = "ed-1",
    key: Any = None,
    header: dict[str, Any] | None = None,
) -> str:
    body = {"iss": ISS, "aud": AUD, "exp": NOW + 600, "iat": NOW, "entitlements": ["beach-rescue"]}
    body.update(claims or {})
    head = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {}), **(header or {})}
    signing_input = f"{b64(json.dumps(head).encode())}.{b64(json.dumps(body).encode())}".encode()
    if alg == "RS256":
        signature = (key or RSA_KEY).sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "EdDSA":
        signature = (key or ED_KEY).sign(signing_input)
    else:
        signature = b""
    return f"{signing_input.decode()}.{b64(signature)}"


@pytest.fixture
def jwks_file(tmp_path: Path) -> str:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(), ed_jwk(), {"kty": "EC", "crv": "P-256", "kid": "ec"}]}))
    return str(path)


def verifier(source: JwksSource) -> OidcVerifier:
    return OidcVerifier(source, issuer=ISS, audience=AUD)


async def test_rs256_and_eddsa_verify(jwks_file: str) -> None:
    v = verifier(JwksSource(jwks_file))
    claims = await v.verify(jwt(alg="RS256", kid="rsa-1"), now=NOW)
    assert claims["iss"] == ISS
    assert (await v.verify(jwt(), now=NOW))["aud"] == AUD
    # without a kid the key is found by algorithm
    assert await v.verify(jwt(kid=None), now=NOW)
    assert await v.verify(jwt({"aud": ["other", AUD]}), now=NOW)


@pytest.mark.parametrize(
    ("token_args", "error"),
    [
        ({"claims": {"iss": "https://evil.example"}}, "unauthenticated"),
        ({"claims": {"aud": "someone-else"}}, "unauthenticated"),
        ({"claims": {"exp": NOW - 31}}, "unauthenticated"),
        ({"claims": {"exp": "tomorrow"}}, "unauthenticated"),
        ({"claims": {"exp": None}}, "unauthenticated"),
        ({"claims": {"nbf": NOW + 31}}, "unauthenticated"),
        ({"alg": "none", "kid": "ed-1"}, "unauthenticated"),
        ({"alg": "HS256", "kid": "ed-1"}, "unauthenticated"),
        ({"kid": "unknown"}, "unauthenticated"),
        ({"key": OTHER_ED_KEY}, "unauthenticated"),  # signed by a key not in the JWKS
        ({"alg": "RS256", "kid": "ed-1"}, "unauthenticated"),  # alg/key type mismatch
        ({"header": {"crit": ["exp"]}}, "unauthenticated"),
        ({"claims": {"entitlements": ["something-else"]}}, "not_entitled"),
        ({"claims": {"entitlements": None}}, "not_entitled"),
        ({"claims": {"entitlements": False}}, "not_entitled"),
    ],
)
async def test_refusals(jwks_file: str, token_args: dict[str, Any], error: str) -> None:
    v = verifier(JwksSource(jwks_file))
    with pytest.raises(EntitlementError) as info:
        await v.verify(jwt(**token_args), now=NOW)
    assert info.value.error == error


async def test_leeway_and_entitlement_forms(jwks_file: str) -> None:
    v = verifier(JwksSource(jwks_file))
    assert await v.verify(jwt({"exp": NOW - 29}), now=NOW)  # within 30 s of skew
    assert await v.verify(jwt({"nbf": NOW + 29}), now=NOW)
    for value in (True, "beach-rescue", "openid beach-rescue profile", ["a", "beach-rescue"]):
        assert await v.verify(jwt({"entitlements": value}), now=NOW)


async def test_tampered_payload_fails(jwks_file: str) -> None:
    v = verifier(JwksSource(jwks_file))
    head, _, sig = jwt().split(".")
    forged = b64(json.dumps({"iss": ISS, "aud": AUD, "exp": NOW + 9999, "entitlements": True}).encode())
    with pytest.raises(EntitlementError):
        await v.verify(f"{head}.{forged}.{sig}", now=NOW)


@given(st.text(max_size=300))
async def test_garbage_raises_only_entitlement_error(garbage: str) -> None:
    v = OidcVerifier(_StaticJwks(), issuer=ISS, audience=AUD)  # type: ignore[arg-type]
    with pytest.raises(EntitlementError):
        await v.verify(garbage, now=NOW)


class _StaticJwks:
    async def keys(self, *, unknown_kid: bool = False) -> list[Any]:
        await trio.lowlevel.checkpoint()
        return parse_jwks({"keys": [ed_jwk()]})


def test_bad_jwks_file(tmp_path: Path) -> None:
    for content in ("not json", '{"no": "keys"}', "[]"):
        path = tmp_path / "bad.json"
        path.write_text(content)
        with pytest.raises(ConfigError):
            JwksSource(str(path))
    with pytest.raises(ConfigError):
        JwksSource(str(tmp_path / "missing.json"))


def test_weak_rsa_keys_are_ignored() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key().public_numbers()
    assert parse_jwks({"keys": [{"kty": "RSA", "n": b64_int(weak.n), "e": b64_int(weak.e)}]}) == []


async def test_jwks_url_fetch_cache_and_rotation(autojump_clock: trio.testing.MockClock) -> None:
    served: dict[str, Any] = {"keys": [ed_jwk()]}
    fetches: list[float] = []
    status = {"code": 200}

    def handler(request: httpx.Request) -> httpx.Response:
        fetches.append(trio.current_time())
        return httpx.Response(status["code"], json=served)

    source = JwksSource("https://id.beach.example/jwks", transport=httpx.MockTransport(handler))
    v = verifier(source)
    assert await v.verify(jwt(), now=NOW)
    assert await v.verify(jwt(), now=NOW)
    assert len(fetches) == 1  # cached
    # the provider rotates: a new kid is fetched on demand (rate-limited to once per 30 s)
    served["keys"].append(ed_jwk(OTHER_ED_KEY, kid="ed-2"))
    with pytest.raises(EntitlementError):
        await v.verify(jwt(key=OTHER_ED_KEY, kid="ed-2"), now=NOW)  # too soon after the last fetch
    assert len(fetches) == 1
    await trio.sleep(31)
    assert await v.verify(jwt(key=OTHER_ED_KEY, kid="ed-2"), now=NOW)
    assert len(fetches) == 2
    # the provider is down: keep the cached keys after expiry
    status["code"] = 500
    await trio.sleep(301)
    assert await v.verify(jwt(), now=NOW)
    assert len(fetches) == 3


async def test_jwks_url_never_fetched_is_unavailable() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    v = verifier(JwksSource("https://id.beach.example/jwks", transport=httpx.MockTransport(handler)))
    with pytest.raises(OidcUnavailable):
        await v.verify(jwt(), now=NOW)


async def test_token_endpoint_with_entitlement_proof(jwks_file: str) -> None:
    """Through the service's router: 200 with a valid proof, 401/403 otherwise, 503 if the JWKS is down."""
    from rescue._http import Request

    store = MemoryStore()
    await store.set_cohort_enabled("beta", True)
    config = TokenServiceConfig(
        keys=PublishedKeys(SigningKey.generate()),
        relay_url="wss://r/v1/connect",
        oidc=verifier(JwksSource(jwks_file)),
    )
    service = TokenService(config, Guardrails(store), wall_clock=lambda: NOW)

    def request(proof: str | None, headers: dict[str, str] | None = None) -> Request:
        body = {
            "session_id": "s",
            "role": "guest",
            "cohort_id": "beta",
            "client_version": "v",
            "telemetry_opt_in": False,
            "entitlement_proof": proof,
        }
        headers = {"content-type": "application/json", **(headers or {})}
        return Request("POST", "/v1/fallback/token", {}, {}, headers, json.dumps(body).encode())

    assert (await service.router.handle(request(jwt()))).status == 200
    assert (await service.router.handle(request(jwt({"entitlements": []})))).status == 403
    assert (
        json.loads((await service.router.handle(request(jwt({"entitlements": []})))).body)["error"]
        == "not_entitled"
    )
    assert (await service.router.handle(request(jwt({"iss": "x"})))).status == 401
    assert (await service.router.handle(request(None))).status == 401
    # a bearer header is checked as a service key, even with a valid proof
    assert (await service.router.handle(request(jwt(), {"authorization": "Bearer nope"}))).status == 401

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    url_config = TokenServiceConfig(
        keys=PublishedKeys(SigningKey.generate()),
        relay_url="wss://r/v1/connect",
        oidc=verifier(JwksSource("https://id/jwks", transport=httpx.MockTransport(down))),
    )
    url_service = TokenService(url_config, Guardrails(store), wall_clock=lambda: NOW)
    response = await url_service.router.handle(request(jwt()))
    assert response.status == 503
    assert json.loads(response.body)["error"] == "entitlement_unavailable"
