"""Entitlement proofs (SPEC §5): OIDC ID tokens (JWT, RS256 or EdDSA) checked against a JWKS.

Verification order: size, structure, header (``alg`` in the allowed set, never ``none``), key
lookup by ``kid`` (refetching the JWKS once if the kid is unknown), signature — only then are the
claims trusted — issuer, audience, ``exp``/``nbf`` with leeway, and the entitlement claim.

The JWKS comes from a file (read once) or an ``http(s)://`` URL fetched with httpx and cached.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from rescue._log import get_logger, log_event
from rescue.errors import ConfigError, RescueError

__all__ = ["EntitlementError", "JwksSource", "OidcUnavailable", "OidcVerifier"]

_LOG = get_logger("rescue.tokenservice.oidc")

# ID tokens are a few hundred bytes to a few KiB; bound what we parse.
MAX_JWT_SIZE: Final = 8 * 1024
# A provider's JWKS is a handful of keys.
MAX_JWKS_SIZE: Final = 256 * 1024
MAX_JWKS_KEYS: Final = 64
# Providers rotate keys rarely and publish new ones in advance; refetch every 5 minutes, and on an
# unknown kid at most every 30 s (so garbage kids can't make us hammer the provider).
JWKS_CACHE_S: Final = 300.0
JWKS_UNKNOWN_KID_REFETCH_S: Final = 30.0
JWKS_FETCH_TIMEOUT_S: Final = 5.0
# RSA keys below 2048 bits are not acceptable for signatures today (NIST SP 800-131A).
MIN_RSA_BITS: Final = 2048
DEFAULT_LEEWAY_S: Final = 30
ALLOWED_ALGS: Final = frozenset({"RS256", "EdDSA"})


_B64URL_ALPHABET: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


class EntitlementError(RescueError):
    """The proof was refused.

    Attributes:
        error: ``unauthenticated`` (not a valid token for us) or ``not_entitled`` (valid, but the
            entitlement claim doesn't grant fallback).
    """

    def __init__(self, error: str, message: str) -> None:
        super().__init__(message)
        self.error = error


class OidcUnavailable(RescueError):
    """The JWKS could not be obtained, so no proof can be checked (answered with 503)."""


def _b64url(part: str) -> bytes:
    if not part or any(
        c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in part
    ):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def _b64_int(value: object) -> int:
    if not isinstance(value, str):
        raise ValueError("not a base64url string")
    return int.from_bytes(_b64url(value), "big")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    alg: str  # "RS256" or "EdDSA"
    public: rsa.RSAPublicKey | Ed25519PublicKey


def _parse_jwk(jwk: Mapping[str, Any]) -> _Key | None:
    """One JWK → a verification key, or None for keys we don't use (other kty/crv, enc keys)."""
    if jwk.get("use", "sig") != "sig":
        return None
    kid = jwk.get("kid")
    kid = kid if isinstance(kid, str) else None
    kty = jwk.get("kty")
    try:
        if kty == "RSA" and jwk.get("alg", "RS256") == "RS256":
            public_rsa = rsa.RSAPublicNumbers(_b64_int(jwk.get("e")), _b64_int(jwk.get("n"))).public_key()
            if public_rsa.key_size < MIN_RSA_BITS:
                return None
            return _Key(kid, "RS256", public_rsa)
        if kty == "OKP" and jwk.get("crv") == "Ed25519" and jwk.get("alg", "EdDSA") in ("EdDSA", "Ed25519"):
            x = jwk.get("x")
            if not isinstance(x, str):
                return None
            return _Key(kid, "EdDSA", Ed25519PublicKey.from_public_bytes(_b64url(x)))
    except ValueError:
        return None
    return None


def parse_jwks(doc: Any) -> list[_Key]:
    """The usable signature keys of a JWK set document.

    Raises:
        ValueError: not a JWK set.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("a JWK set must be an object with a 'keys' list")
    keys = [k for jwk in doc["keys"][:MAX_JWKS_KEYS] if isinstance(jwk, dict) and (k := _parse_jwk(jwk))]
    return keys


class JwksSource:
    """The identity provider's keys, from a file or an ``http(s)://`` URL.

    Args:
        source: a path or URL.
        transport: an httpx transport (tests use ``httpx.MockTransport``); None for the network.

    Raises:
        ConfigError: a file source is unreadable or not a JWK set (at construction).
    """

    def __init__(self, source: str, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.source = source
        self._transport = transport
        self._keys: list[_Key] | None = None
        self._fetched_at = -math.inf
        self._lock = trio.Lock()
        if not self.is_url:
            path = Path(source)
            try:
                data = path.read_bytes()
                if len(data) > MAX_JWKS_SIZE:
                    raise ConfigError(f"OIDC JWKS file {source} is too large")
                self._keys = parse_jwks(json.loads(data))
            except (OSError, ValueError) as exc:
                raise ConfigError(f"OIDC JWKS file {source}: {exc}") from None

    @property
    def is_url(self) -> bool:
        return self.source.startswith(("http://", "https://"))

    async def keys(self, *, unknown_kid: bool = False) -> list[_Key]:
        """The current keys; refetched when stale or (rate-limited) when a kid was unknown.

        Raises:
            OidcUnavailable: a URL source has never been fetched successfully.
        """
        if not self.is_url:
            assert self._keys is not None
            return self._keys
        async with self._lock:
            age = trio.current_time() - self._fetched_at
            if (
                self._keys is None
                or age >= JWKS_CACHE_S
                or (unknown_kid and age >= JWKS_UNKNOWN_KID_REFETCH_S)
            ):
                await self._fetch()
            if self._keys is None:
                raise OidcUnavailable("the OIDC JWKS could not be fetched")
            return self._keys

    async def _fetch(self) -> None:
        self._fetched_at = trio.current_time()  # also on failure: don't retry on every request
        try:
            async with httpx.AsyncClient(transport=self._transport, timeout=JWKS_FETCH_TIMEOUT_S) as client:
                response = await client.get(self.source)
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            if len(response.content) > MAX_JWKS_SIZE:
                raise ValueError("JWKS too large")
            self._keys = parse_jwks(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            # keep serving with the keys we had (if any)
            log_event(_LOG, "oidc.jwks_fetch_failed", level=logging.WARNING, error=str(exc)[:200])


class OidcVerifier:
    """Checks entitlement proofs.

    Args:
        jwks: where the provider's keys come from.
        issuer: the required ``iss``.
        audience: the required ``aud`` (a string, or one of the list).
        entitlement_claim: the claim that must grant fallback.
        entitlement_value: the claim grants it if it is ``true``, equals this value, is a list
            containing it, or a space-separated string (scope style) containing it.
        leeway: clock-skew allowance in seconds on ``exp`` and ``nbf``.
    """

    def __init__(
        self,
        jwks: JwksSource,
        *,
        issuer: str,
        audience: str,
        entitlement_claim: str = "entitlements",
        entitlement_value: str = "beach-rescue",
        leeway: float = DEFAULT_LEEWAY_S,
    ) -> None:
        self.jwks = jwks
        self.issuer = issuer
        self.audience = audience
        self.entitlement_claim = entitlement_claim
        self.entitlement_value = entitlement_value
        self.leeway = leeway

    async def verify(self, token: str, *, now: float) -> dict[str, Any]:
        """Verify ``token`` and return its claims.

        Raises:
            EntitlementError: ``unauthenticated`` or ``not_entitled``.
            OidcUnavailable: the keys can't be obtained.
        """
        if not isinstance(token, str) or len(token) > MAX_JWT_SIZE:
            raise EntitlementError("unauthenticated", "entitlement_proof is not a JWT")
        parts = token.split(".")
        if len(parts) != 3:
            raise EntitlementError("unauthenticated", "entitlement_proof is not a JWT")
        try:
            header = json.loads(_b64url(parts[0]))
            signature = _b64url(parts[2])
        except (ValueError, RecursionError):
            raise EntitlementError("unauthenticated", "entitlement_proof is not a JWT") from None
        if not isinstance(header, dict):
            raise EntitlementError("unauthenticated", "entitlement_proof header is not an object")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALLOWED_ALGS:
            raise EntitlementError(
                "unauthenticated", f"entitlement_proof alg must be one of {sorted(ALLOWED_ALGS)}"
            )
        if "crit" in header:
            raise EntitlementError("unauthenticated", "entitlement_proof has critical header parameters")
        signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
        candidates = self._candidates(await self.jwks.keys(), alg, kid)
        if not candidates and kid is not None:
            candidates = self._candidates(await self.jwks.keys(unknown_kid=True), alg, kid)
        if not candidates:
            raise EntitlementError("unauthenticated", "entitlement_proof is signed by an unknown key")
        if not any(_verify(k, signing_input, signature) for k in candidates):
            raise EntitlementError("unauthenticated", "entitlement_proof signature does not verify")
        try:
            claims = json.loads(_b64url(parts[1]))
        except (ValueError, RecursionError):
            raise EntitlementError("unauthenticated", "entitlement_proof payload is not JSON") from None
        if not isinstance(claims, dict):
            raise EntitlementError("unauthenticated", "entitlement_proof payload is not an object")
        self._check_claims(claims, now)
        return claims

    @staticmethod
    def _candidates(keys: list[_Key], alg: str, kid: object) -> list[_Key]:
        return [k for k in keys if k.alg == alg and (kid is None or k.kid == kid)]

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        if claims.get("iss") != self.issuer:
            raise EntitlementError("unauthenticated", "entitlement_proof has the wrong issuer")
        aud = claims.get("aud")
        audiences = aud if isinstance(aud, list) else [aud]
        if self.audience not in audiences:
            raise EntitlementError("unauthenticated", "entitlement_proof is for another audience")
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not isinstance(exp, int | float) or not _is_number(exp):
            raise EntitlementError("unauthenticated", "entitlement_proof has no valid exp")
        if now >= exp + self.leeway:
            raise EntitlementError("unauthenticated", "entitlement_proof has expired")
        if nbf is not None and (not _is_number(nbf) or now < nbf - self.leeway):
            raise EntitlementError("unauthenticated", "entitlement_proof is not valid yet")
        if not self._entitled(claims.get(self.entitlement_claim)):
            raise EntitlementError("not_entitled", "the entitlement_proof does not grant WebSocket fallback")

    def _entitled(self, value: object) -> bool:
        if value is True:
            return True
        if isinstance(value, str):
            return value == self.entitlement_value or self.entitlement_value in value.split()
        if isinstance(value, list):
            return self.entitlement_value in value
        return False


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _verify(key: _Key, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key.public, rsa.RSAPublicKey):
            key.public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        else:
            key.public.verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
