"""Fallback tokens (SPEC §3): a CWT signed as a COSE_Sign1 with EdDSA / Ed25519, and its keys.

Wire form of a token (RFC 9052 / RFC 8392)::

    18([                                  # CBOR tag 18, COSE_Sign1
        h'A2 01 27 04 48 <kid:8>',        # protected: bstr of {1: -8 (EdDSA), 4: kid}
        {},                               # unprotected: empty map
        h'<claims>',                      # payload: bstr of the CBOR claims map
        h'<signature:64>',                # Ed25519 over Sig_structure below
    ])
    Sig_structure = ["Signature1", protected, h'', payload]

Claims map: ``1`` iss, ``3`` aud, ``4`` exp, ``5`` nbf, ``6`` iat, ``7`` cti (16 bytes), ``"sid"``,
``"role"``, ``"cohort"``, ``"fb"``. Minting encodes every CBOR item canonically (cbor2
``canonical=True``), so a token is a pure function of key, claims and cti (Ed25519 is deterministic).

Keys are Ed25519; ``kid`` = the first 8 bytes of SHA-256 of the raw 32-byte public key, carried as
those 8 bytes in COSE and as base64url without padding in JWK (``"kid"``). Verification keys are
published as a JWK set ``{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": …, "kid": …}]}``.

All time is injected (``now``, seconds since the Unix epoch): nothing here reads a clock.
Byte layouts and vectors: ``docs/protocol.md``, ``tests/vectors/token.json``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import cbor2
import nacl.exceptions
import nacl.signing

from rescue._codes import CloseCode
from rescue.errors import ConfigError, TokenError
from rescue.protocol._messages import SESSION_ID_RE as SESSION_ID_RE  # shared pattern, re-exported
from rescue.protocol._messages import is_cbor_array, is_cbor_map

__all__ = [
    "ALG_EDDSA",
    "CLOCK_SKEW",
    "CTI_SIZE",
    "KID_SIZE",
    "MAX_TOKEN_SIZE",
    "MAX_TTL",
    "Claims",
    "KeyRing",
    "MintError",
    "SigningKey",
    "VerifyKey",
    "b64url_decode",
    "b64url_encode",
    "mint_token",
    "verify_token",
]

MAX_TTL: Final = 300  # SPEC §3: exp - iat ≤ 300 s, enforced by minting and by the relay
CLOCK_SKEW: Final = 30  # SPEC §3: allowance on exp and nbf
KID_SIZE: Final = 8
CTI_SIZE: Final = 16
ALG_EDDSA: Final = -8  # COSE "EdDSA"
# A real token is 200-250 bytes; 1 KiB leaves room for long node ids and issuers while keeping
# what the relay will CBOR-decode from an unauthenticated client small.
MAX_TOKEN_SIZE: Final = 1024
# Every text claim (iss, aud, sid, cohort) is at most this many characters (sid: SPEC §2 HELLO limit).
MAX_CLAIM_TEXT: Final = 128
MAX_FEATURE_BITS: Final = 2**64 - 1  # "fb" is a CBOR uint that fits a u64

COSE_SIGN1_TAG: Final = 18
CWT_TAG: Final = 61  # optional outer CWT tag (RFC 8392 §6); accepted on verify, never minted
ROLES: Final = ("host", "guest")

_ED25519_SIZE: Final = 32
_SIGNATURE_SIZE: Final = 64
_HDR_ALG: Final = 1
_HDR_CRIT: Final = 2
_HDR_KID: Final = 4
_ISS, _AUD, _EXP, _NBF, _IAT, _CTI = 1, 3, 4, 5, 6, 7
_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


class MintError(ConfigError, ValueError):
    """Mint arguments the contract forbids (ttl over 300 s, bad session id or role, …).

    Both a :class:`~rescue.errors.ConfigError` (the CLI prints it as one line) and a ``ValueError``.
    """


# --------------------------------------------------------------------------------------------
# base64url


def b64url_encode(data: bytes) -> str:
    """Base64url (RFC 4648 §5) without padding."""
    return base64.urlsafe_b64encode(bytes(data)).rstrip(b"=").decode("ascii")


def b64url_decode(text: str | bytes) -> bytes:
    """Strict base64url without padding: only ``A-Z a-z 0-9 - _``, no ``=``, no whitespace, and
    the unused low bits of the last character must be zero (so every value has one spelling).

    Raises:
        ValueError: anything else.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("base64url text must be ASCII") from None
    if not isinstance(text, str):
        raise ValueError("base64url text must be str or bytes")
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not base64url without padding")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url without padding") from None
    if b64url_encode(raw) != text:
        raise ValueError("non-canonical base64url (unused bits set)")
    return raw


# --------------------------------------------------------------------------------------------
# keys


def _kid_of(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()[:KID_SIZE]


def _jwk_bytes(jwk: Mapping[str, Any], member: str, where: str) -> bytes:
    value = jwk.get(member)
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {member!r} must be a base64url string")
    try:
        raw = b64url_decode(value)
    except ValueError:
        raise ConfigError(f"{where}: {member!r} is not base64url without padding") from None
    if len(raw) != _ED25519_SIZE:
        raise ConfigError(f"{where}: {member!r} must encode {_ED25519_SIZE} bytes, not {len(raw)}")
    return raw


def _check_jwk_frame(jwk: object, where: str) -> Mapping[str, Any]:
    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: a JWK must be a JSON object")
    if jwk.get("kty") != "OKP":
        raise ConfigError(f"{where}: 'kty' must be 'OKP' (Ed25519 keys only)")
    if jwk.get("crv") != "Ed25519":
        raise ConfigError(f"{where}: 'crv' must be 'Ed25519'")
    if "alg" in jwk and jwk["alg"] not in ("EdDSA", "Ed25519"):
        raise ConfigError(f"{where}: 'alg' must be 'EdDSA' when present")
    if "use" in jwk and jwk["use"] != "sig":
        raise ConfigError(f"{where}: 'use' must be 'sig' when present")
    return jwk


def _check_jwk_kid(jwk: Mapping[str, Any], public: bytes, where: str) -> None:
    if "kid" in jwk:
        expected = b64url_encode(_kid_of(public))
        if jwk["kid"] != expected:
            raise ConfigError(
                f"{where}: 'kid' does not match the key (expected {expected}: first 8 bytes of "
                "SHA-256 of the public key, base64url)"
            )


class VerifyKey:
    """An Ed25519 public key with its ``kid``.

    Attributes:
        raw: the 32-byte public key.
        kid: first 8 bytes of SHA-256 of ``raw``.
    """

    __slots__ = ("_key", "kid", "raw")

    def __init__(self, raw: bytes) -> None:
        """Wrap a raw 32-byte Ed25519 public key.

        Raises:
            ValueError: not 32 bytes.
        """
        if len(raw) != _ED25519_SIZE:
            raise ValueError(f"Ed25519 public key must be {_ED25519_SIZE} bytes, not {len(raw)}")
        self.raw = bytes(raw)
        self.kid = _kid_of(self.raw)
        self._key = nacl.signing.VerifyKey(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey(kid={b64url_encode(self.kid)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    @property
    def kid_text(self) -> str:
        """The kid as it appears in JSON: base64url without padding (11 characters)."""
        return b64url_encode(self.kid)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """Whether ``signature`` is a valid Ed25519 signature of ``message`` by this key."""
        if len(signature) != _SIGNATURE_SIZE:
            return False
        try:
            self._key.verify(bytes(message), bytes(signature))
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError):
            return False
        return True

    def to_jwk(self) -> dict[str, str]:
        """``{"kty": "OKP", "crv": "Ed25519", "x": …, "kid": …}``."""
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(self.raw), "kid": self.kid_text}

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], *, where: str = "JWK") -> VerifyKey:
        """Parse a public Ed25519 JWK (a ``d`` member, if any, is checked and ignored).

        Raises:
            ConfigError: not an OKP/Ed25519 JWK, bad ``x``, or a ``kid`` that does not match.
        """
        if isinstance(jwk, Mapping) and "d" in jwk:
            return SigningKey.from_jwk(jwk, where=where).verify_key
        jwk = _check_jwk_frame(jwk, where)
        public = _jwk_bytes(jwk, "x", where)
        _check_jwk_kid(jwk, public, where)
        return cls(public)


class SigningKey:
    """An Ed25519 signing key (wraps ``nacl.signing.SigningKey``).

    The private JWK's ``d`` is the 32-byte seed (RFC 8037). ``repr`` never shows it.
    """

    __slots__ = ("_key", "verify_key")

    def __init__(self, seed: bytes) -> None:
        """Build the key from its 32-byte seed.

        Raises:
            ValueError: not 32 bytes.
        """
        if len(seed) != _ED25519_SIZE:
            raise ValueError(f"Ed25519 seed must be {_ED25519_SIZE} bytes, not {len(seed)}")
        self._key = nacl.signing.SigningKey(bytes(seed))
        self.verify_key = VerifyKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key (from the OS CSPRNG)."""
        return cls(os.urandom(_ED25519_SIZE))

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.verify_key.kid_text}, <private>)"

    @property
    def kid(self) -> bytes:
        """First 8 bytes of SHA-256 of the public key."""
        return self.verify_key.kid

    @property
    def kid_text(self) -> str:
        """The kid as base64url without padding."""
        return self.verify_key.kid_text

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message``."""
        return bytes(self._key.sign(bytes(message)).signature)

    def public_jwk(self) -> dict[str, str]:
        """The public JWK (no ``d``)."""
        return self.verify_key.to_jwk()

    def to_jwk(self, private: bool = False) -> dict[str, str]:
        """The JWK; with ``private=True`` it includes ``d`` (the seed) — keep that secret."""
        jwk = self.public_jwk()
        if private:
            seed = b64url_encode(bytes(self._key))
            jwk = {"kty": "OKP", "crv": "Ed25519", "x": jwk["x"], "d": seed, "kid": jwk["kid"]}
        return jwk

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any], *, where: str = "JWK") -> SigningKey:
        """Parse a private Ed25519 JWK (``d`` required; ``x`` and ``kid``, when present, must match).

        Raises:
            ConfigError: anything malformed or inconsistent.
        """
        jwk = _check_jwk_frame(jwk, where)
        if "d" not in jwk:
            raise ConfigError(f"{where}: not a private key (no 'd')")
        key = cls(_jwk_bytes(jwk, "d", where))
        if "x" in jwk and _jwk_bytes(jwk, "x", where) != key.verify_key.raw:
            raise ConfigError(f"{where}: 'x' is not the public key of 'd'")
        _check_jwk_kid(jwk, key.verify_key.raw, where)
        return key


class KeyRing:
    """Verification keys by kid: what a relay accepts tokens from (current plus retired keys)."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[VerifyKey | SigningKey] = ()) -> None:
        self._keys: dict[bytes, VerifyKey] = {}
        for key in keys:
            self.add(key)

    def add(self, key: VerifyKey | SigningKey) -> None:
        """Add a verification key (a signing key contributes its public part)."""
        public = key.verify_key if isinstance(key, SigningKey) else key
        self._keys[public.kid] = public

    def get(self, kid: bytes) -> VerifyKey | None:
        """The key with this kid, if any."""
        return self._keys.get(bytes(kid))

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, bytes) and kid in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[VerifyKey]:
        return iter(list(self._keys.values()))

    def __repr__(self) -> str:
        return f"KeyRing([{', '.join(k.kid_text for k in self._keys.values())}])"

    def to_jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public JWK set ``{"keys": [...]}``, in insertion order."""
        return {"keys": [k.to_jwk() for k in self._keys.values()]}

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any]) -> KeyRing:
        """Parse a JWK set of public Ed25519 keys.

        Raises:
            ConfigError: not ``{"keys": [...]}``, an empty set, an entry that is not a valid public
                Ed25519 JWK, or an entry carrying a private ``d`` (never publish private keys).
        """
        if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list | tuple):
            raise ConfigError('a JWK set must be a JSON object {"keys": [...]}')
        entries: list[Any] = jwks["keys"]
        if not entries:
            raise ConfigError("the JWK set has no keys")
        ring = cls()
        for index, entry in enumerate(entries):
            where = f"JWK set key {index}"
            if isinstance(entry, Mapping) and "d" in entry:
                raise ConfigError(f"{where}: contains a private key ('d'); a JWK set holds public keys only")
            ring.add(VerifyKey.from_jwk(entry, where=where))
        return ring


# --------------------------------------------------------------------------------------------
# claims


def _exact_keys(mapping: Mapping[Any, Any]) -> dict[int | str, Any]:
    """Only the entries whose key is exactly an ``int`` or ``str``: CBOR ``true`` or ``1.0`` must not
    stand in for the label ``1`` (Python's ``True == 1.0 == 1``)."""
    return {k: v for k, v in mapping.items() if type(k) is int or type(k) is str}


def _is_int(value: object) -> bool:
    return type(value) is int


def _text_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_CLAIM_TEXT


@dataclass(frozen=True, slots=True)
class Claims:
    """The claims of a fallback token (SPEC §3).

    Attributes:
        iss: issuer (claim 1).
        aud: the relay node id the token is for, or ``"*"`` (claim 3).
        exp: expiry, integer seconds since the epoch (claim 4).
        nbf: not before (claim 5).
        iat: issued at (claim 6).
        cti: 16 random bytes naming this token (claim 7).
        sid: session id (``"sid"``).
        role: ``"host"`` or ``"guest"`` (``"role"``).
        cohort: the guardrail cohort (``"cohort"``).
        fb: feature bits (``"fb"``); bit 0 = analytics allowed.
    """

    iss: str
    aud: str
    exp: int
    nbf: int
    iat: int
    cti: bytes
    sid: str
    role: str
    cohort: str
    fb: int

    @property
    def analytics_allowed(self) -> bool:
        """Feature bit 0."""
        return bool(self.fb & 1)

    @property
    def lifetime(self) -> int:
        """``exp - iat`` in seconds."""
        return self.exp - self.iat

    def problems(self) -> list[str]:
        """Type and range problems with these claims (empty when well-formed)."""
        bad: list[str] = []
        for name in ("iss", "aud", "cohort"):
            if not _text_ok(getattr(self, name)):
                bad.append(f"{name} must be a non-empty string of at most {MAX_CLAIM_TEXT} characters")
        for name in ("exp", "nbf", "iat"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                bad.append(f"{name} must be a non-negative integer NumericDate")
        if not isinstance(self.cti, bytes) or len(self.cti) != CTI_SIZE:
            bad.append(f"cti must be {CTI_SIZE} bytes")
        if not isinstance(self.sid, str) or not SESSION_ID_RE.fullmatch(self.sid):
            bad.append("sid must be 1-128 characters of [A-Za-z0-9._:-]")
        if self.role not in ROLES:
            bad.append("role must be 'host' or 'guest'")
        if not _is_int(self.fb) or not 0 <= self.fb <= MAX_FEATURE_BITS:
            bad.append("fb must be an unsigned 64-bit integer")
        return bad

    def to_cbor_map(self) -> dict[int | str, object]:
        """The CWT claims map (RFC 8392 integer keys plus our text keys)."""
        return {
            _ISS: self.iss,
            _AUD: self.aud,
            _EXP: self.exp,
            _NBF: self.nbf,
            _IAT: self.iat,
            _CTI: self.cti,
            "sid": self.sid,
            "role": self.role,
            "cohort": self.cohort,
            "fb": self.fb,
        }

    @classmethod
    def from_cbor_map(cls, claims: object) -> Claims:
        """Read and check a decoded claims map; unknown extra claims are ignored.

        Raises:
            TokenError: ``"malformed"`` when a claim is missing or ill-typed.
        """
        if not is_cbor_map(claims):
            raise TokenError("malformed", "token payload is not a CBOR map")
        keys: dict[str, int | str] = {
            "iss": _ISS, "aud": _AUD, "exp": _EXP, "nbf": _NBF, "iat": _IAT, "cti": _CTI,
            "sid": "sid", "role": "role", "cohort": "cohort", "fb": "fb",
        }  # fmt: skip
        claims = _exact_keys(claims)
        missing = [name for name, key in keys.items() if key not in claims]
        if missing:
            raise TokenError("malformed", f"token lacks claims: {', '.join(missing)}")
        parsed = cls(**{name: claims[key] for name, key in keys.items()})
        problems = parsed.problems()
        if problems:
            raise TokenError("malformed", f"token claims ill-formed: {problems[0]}")
        return parsed

    def to_json(self) -> dict[str, str | int]:
        """A JSON-ready dict; ``cti`` as base64url without padding."""
        return {
            "iss": self.iss,
            "aud": self.aud,
            "exp": self.exp,
            "nbf": self.nbf,
            "iat": self.iat,
            "cti": b64url_encode(self.cti),
            "sid": self.sid,
            "role": self.role,
            "cohort": self.cohort,
            "fb": self.fb,
        }


# --------------------------------------------------------------------------------------------
# mint / verify


def _dumps(obj: object) -> bytes:
    return cbor2.dumps(obj, canonical=True)


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    return _dumps(["Signature1", protected, b"", payload])


def mint_token(
    key: SigningKey,
    *,
    session_id: str,
    role: str,
    audience: str = "*",
    cohort: str = "default",
    ttl: int = MAX_TTL,
    fb: int = 0,
    issuer: str = "beach-rescue",
    now: float,
    cti: bytes | None = None,
) -> bytes:
    """Mint a fallback token.

    ``iat = nbf = floor(now)``, ``exp = iat + ttl``, all integers.

    Args:
        key: the signing key; its kid goes in the protected header.
        session_id: the session (1-128 characters of ``[A-Za-z0-9._:-]``).
        role: ``"host"`` or ``"guest"``.
        audience: the relay node id the token is for, or ``"*"``.
        cohort: the guardrail cohort.
        ttl: lifetime in seconds, 1 … 300.
        fb: feature bits (bit 0: analytics allowed).
        issuer: the ``iss`` claim.
        now: the current wall-clock time, seconds since the epoch.
        cti: the token id (16 bytes); random when omitted (pass one only for test vectors).

    Returns:
        The token bytes (tagged COSE_Sign1). In JSON, carry it as :func:`b64url_encode` text.

    Raises:
        MintError: any argument outside the contract, including ``ttl`` over 300 or ≤ 0.
    """
    if not _is_int(ttl) or not 0 < ttl <= MAX_TTL:
        raise MintError(f"ttl must be an integer number of seconds in 1..{MAX_TTL}, not {ttl!r}")
    if not isinstance(now, int | float) or isinstance(now, bool) or not math.isfinite(now) or now < 0:
        raise MintError(f"now must be a finite non-negative time, not {now!r}")
    if cti is None:
        cti = os.urandom(CTI_SIZE)
    iat = math.floor(now)
    claims = Claims(
        iss=issuer, aud=audience, exp=iat + ttl, nbf=iat, iat=iat, cti=cti,
        sid=session_id, role=role, cohort=cohort, fb=fb,
    )  # fmt: skip
    problems = claims.problems()
    if problems:
        raise MintError(f"cannot mint: {problems[0]}")
    protected = _dumps({_HDR_ALG: ALG_EDDSA, _HDR_KID: key.kid})
    payload = _dumps(claims.to_cbor_map())
    signature = key.sign(_sig_structure(protected, payload))
    token = _dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))
    if len(token) > MAX_TOKEN_SIZE:
        raise MintError(f"token of {len(token)} bytes exceeds {MAX_TOKEN_SIZE}; shorten iss, aud or cohort")
    return token


def _malformed(message: str) -> TokenError:
    return TokenError("malformed", message)


def _loads(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item that spans all of ``data`` (trailing bytes are malformed:
    ``cbor2.loads`` would ignore them, which would make the unsigned outer envelope malleable)."""
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises many types on hostile input; all mean "malformed"
        raise _malformed(f"{what} is not valid CBOR ({type(exc).__name__})") from None
    if fp.tell() != len(data):
        raise _malformed(f"{what} has {len(data) - fp.tell()} trailing bytes after the CBOR item")
    return value


def _parse_envelope(token: bytes) -> tuple[bytes, bytes, bytes, bytes]:
    """→ (protected, kid, payload, signature) after structural and algorithm checks."""
    if not isinstance(token, bytes | bytearray | memoryview):
        raise _malformed("token must be bytes")
    if len(token) > MAX_TOKEN_SIZE:
        raise _malformed(f"token of {len(token)} bytes exceeds {MAX_TOKEN_SIZE}")
    return _envelope_parts(_loads(bytes(token), "token"))


def _envelope_parts(outer: object) -> tuple[bytes, bytes, bytes, bytes]:
    """The checks of :func:`_parse_envelope` on the decoded outer item (whatever container types the
    installed cbor2 decodes a tag's contents to: see :func:`~rescue.protocol._messages.is_cbor_array`)."""
    if isinstance(outer, cbor2.CBORTag) and outer.tag == CWT_TAG:
        outer = outer.value
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise _malformed("token is not a tagged COSE_Sign1 (CBOR tag 18)")
    body = outer.value
    if not is_cbor_array(body) or len(body) != 4:
        raise _malformed("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes) or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise _malformed("COSE_Sign1 protected, payload and signature must be byte strings")
    if not is_cbor_map(unprotected):
        raise _malformed("COSE_Sign1 unprotected header must be a map")
    if _HDR_ALG in unprotected or _HDR_KID in unprotected:
        raise _malformed("alg and kid belong in the protected header")
    header = _loads(protected, "protected header") if protected else {}
    if not is_cbor_map(header):
        raise _malformed("protected header is not a CBOR map")
    header = _exact_keys(header)
    unprotected = _exact_keys(unprotected)
    if _HDR_CRIT in header:
        raise _malformed("critical header parameters are not supported")
    alg = header.get(_HDR_ALG)
    if not _is_int(alg) or alg != ALG_EDDSA:
        raise TokenError("bad_algorithm", f"token algorithm {alg!r} is not EdDSA (-8)")
    kid = header.get(_HDR_KID)
    if not isinstance(kid, bytes):
        raise _malformed("protected header lacks a byte-string kid")
    if len(signature) != _SIGNATURE_SIZE:
        raise _malformed(f"signature must be {_SIGNATURE_SIZE} bytes, not {len(signature)}")
    return protected, kid, payload, signature


def verify_token(
    token: bytes,
    keys: KeyRing,
    *,
    now: float,
    audience: str | None = None,
    skew: int = CLOCK_SKEW,
) -> Claims:
    """Verify a fallback token and return its claims.

    Checks, in order: structure (``malformed``), algorithm (``bad_algorithm``), kid
    (``unknown_kid``), the Ed25519 signature (``bad_signature``) — only then is the payload
    decoded — claims (``malformed``), ``exp - iat`` and ``exp - nbf`` ≤ 300 (``lifetime_too_long``),
    audience (``wrong_audience``), ``now ≥ nbf - skew`` (``not_yet_valid``) and ``now < exp + skew``
    (``expired``).

    Args:
        token: the raw token bytes (base64url-decoded).
        keys: the accepted verification keys.
        now: the current wall-clock time, seconds since the epoch.
        audience: this relay's node id; the token's ``aud`` must equal it or be ``"*"``.
            ``None`` skips the audience check (tools, the token service).
        skew: clock-skew allowance in seconds on ``exp`` and ``nbf``.

    Raises:
        ValueError: ``now`` is not finite (a caller bug, not a token problem).
        TokenError: the only exception for any token bytes. ``code`` is ``TOKEN_EXPIRED`` for
            ``expired``, ``WRONG_NODE`` for ``wrong_audience`` and ``AUTH_FAILED`` otherwise.
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite time, not {now!r}")
    protected, kid, payload, signature = _parse_envelope(token)
    key = keys.get(kid)
    if key is None:
        raise TokenError("unknown_kid", f"token signed by unknown key {b64url_encode(kid)}")
    if not key.verify(_sig_structure(protected, payload), signature):
        raise TokenError("bad_signature", "token signature does not verify")
    claims = Claims.from_cbor_map(_loads(payload, "token payload"))
    if claims.exp - claims.iat > MAX_TTL or claims.exp - claims.nbf > MAX_TTL:
        raise TokenError(
            "lifetime_too_long",
            f"token lifetime {claims.exp - min(claims.iat, claims.nbf)} s exceeds {MAX_TTL} s",
        )
    if audience is not None and claims.aud not in (audience, "*"):
        raise TokenError(
            "wrong_audience", f"token is for node {claims.aud!r}, not {audience!r}", CloseCode.WRONG_NODE
        )
    if now < claims.nbf - skew:
        raise TokenError("not_yet_valid", f"token not valid before {claims.nbf} (now {math.floor(now)})")
    if now >= claims.exp + skew:
        raise TokenError(
            "expired", f"token expired at {claims.exp} (now {math.floor(now)})", CloseCode.TOKEN_EXPIRED
        )
    return claims
