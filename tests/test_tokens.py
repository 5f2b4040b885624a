"""Fallback tokens: base64url, keys and JWK, minting, every verification failure, cwt interop."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import cbor2
import nacl.signing
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue._keyfiles import load_keyring, load_signing_key
from rescue.errors import ConfigError, TokenError
from rescue.protocol import (
    MAX_TOKEN_SIZE,
    Claims,
    CloseCode,
    KeyRing,
    MintError,
    SigningKey,
    VerifyKey,
    b64url_decode,
    b64url_encode,
    mint_token,
    verify_token,
)

if TYPE_CHECKING:
    from cwt.cose_key_interface import COSEKeyInterface

NOW = 1_700_000_000.0
SEED = bytes(range(32))
OTHER_SEED = bytes(range(1, 33))


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey(SEED)


@pytest.fixture(scope="module")
def ring(key: SigningKey) -> KeyRing:
    return KeyRing([key])


def _mint(key: SigningKey, **overrides: Any) -> bytes:
    args: dict[str, Any] = {"session_id": "sess-1", "role": "host", "now": NOW, **overrides}
    return mint_token(key, **args)


def _claims_map(overrides: dict[Any, Any] | None = None) -> dict[Any, Any]:
    base: dict[Any, Any] = {
        1: "beach-rescue",
        3: "*",
        4: int(NOW) + 300,
        5: int(NOW),
        6: int(NOW),
        7: b"\x11" * 16,
        "sid": "sess-1",
        "role": "guest",
        "cohort": "default",
        "fb": 0,
    }
    base.update(overrides or {})
    return {k: v for k, v in base.items() if v is not _DROP}


_DROP = object()


def _sign1(
    seed: bytes,
    payload: bytes,
    *,
    protected: dict[Any, Any] | None = None,
    unprotected: dict[Any, Any] | None = None,
    tag: int = 18,
) -> bytes:
    """A COSE_Sign1 built by hand with cbor2 + nacl (independent of rescue's encoder)."""
    signer = nacl.signing.SigningKey(seed)
    kid = hashlib.sha256(bytes(signer.verify_key)).digest()[:8]
    prot = cbor2.dumps(protected if protected is not None else {1: -8, 4: kid})
    sig = signer.sign(cbor2.dumps(["Signature1", prot, b"", payload])).signature
    return cbor2.dumps(cbor2.CBORTag(tag, [prot, unprotected or {}, payload, sig]))


def _reason(token: bytes, keys: KeyRing, **kwargs: Any) -> TokenError:
    kwargs.setdefault("now", NOW)
    with pytest.raises(TokenError) as info:
        verify_token(token, keys, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------------
# base64url


@given(st.binary(max_size=300))
def test_b64url_round_trip(data: bytes) -> None:
    text = b64url_encode(data)
    assert "=" not in text
    assert "+" not in text
    assert "/" not in text
    assert b64url_decode(text) == data
    assert b64url_decode(text.encode()) == data


@pytest.mark.parametrize("bad", ["QQ==", "QQ=", "Q", "QR", "a+b/", "ab cd", "ab\n", "é", "QUJD\x00"])
def test_b64url_strict(bad: str) -> None:
    with pytest.raises(ValueError):
        b64url_decode(bad)


@given(st.text(max_size=40))
def test_b64url_arbitrary_text_raises_only_value_error(text: str) -> None:
    try:
        b64url_decode(text)
    except ValueError:
        pass


# ---------------------------------------------------------------------------------------------
# keys and JWK


def test_kid_is_sha256_prefix_of_public_key(key: SigningKey) -> None:
    public = bytes(nacl.signing.SigningKey(SEED).verify_key)
    assert key.verify_key.raw == public
    assert key.kid == hashlib.sha256(public).digest()[:8]
    assert key.kid_text == b64url_encode(key.kid)
    assert len(key.kid_text) == 11


def test_jwk_round_trip(key: SigningKey) -> None:
    private = key.to_jwk(private=True)
    assert set(private) == {"kty", "crv", "x", "d", "kid"}
    assert private["d"] == b64url_encode(SEED)
    assert SigningKey.from_jwk(private).to_jwk(private=True) == private
    public = key.public_jwk()
    assert public == key.to_jwk() == key.to_jwk(private=False)
    assert "d" not in public
    assert public == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": b64url_encode(key.verify_key.raw),
        "kid": key.kid_text,
    }
    assert VerifyKey.from_jwk(public) == key.verify_key
    assert VerifyKey.from_jwk(private) == key.verify_key  # the public part of a private JWK


def test_generate_gives_distinct_keys_and_repr_hides_secret() -> None:
    a, b = SigningKey.generate(), SigningKey.generate()
    assert a.kid != b.kid
    d = a.to_jwk(private=True)["d"]
    assert d not in repr(a)
    assert a.kid_text in repr(a)


def _public(**overrides: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = SigningKey(SEED).public_jwk()
    jwk.update(overrides)
    return {k: v for k, v in jwk.items() if v is not _DROP}


@pytest.mark.parametrize(
    "jwk",
    [
        _public(kty="EC"),
        _public(kty=_DROP),
        _public(crv="X25519"),
        _public(x=_DROP),
        _public(x=5),
        _public(x=b64url_encode(bytes(31))),
        _public(x=b64url_encode(bytes(32)) + "="),
        _public(x="not base64!"),
        _public(kid="AAAAAAAAAAA"),
        _public(alg="ES256"),
        _public(use="enc"),
    ],
)
def test_bad_public_jwk_is_config_error(jwk: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        VerifyKey.from_jwk(jwk)
    with pytest.raises(ConfigError):
        KeyRing.from_jwks({"keys": [jwk]})


def test_jwk_without_kid_or_with_alg_is_accepted(key: SigningKey) -> None:
    assert VerifyKey.from_jwk(_public(kid=_DROP)) == key.verify_key
    assert VerifyKey.from_jwk(_public(alg="EdDSA", use="sig")) == key.verify_key


def test_bad_private_jwk_is_config_error(key: SigningKey) -> None:
    private = key.to_jwk(private=True)
    with pytest.raises(ConfigError, match="no 'd'"):
        SigningKey.from_jwk(key.public_jwk())
    with pytest.raises(ConfigError, match="'x' is not the public key"):
        SigningKey.from_jwk({**private, "x": SigningKey(OTHER_SEED).public_jwk()["x"]})
    with pytest.raises(ConfigError, match="kid"):
        SigningKey.from_jwk({**private, "kid": SigningKey(OTHER_SEED).kid_text})
    with pytest.raises(ConfigError):
        SigningKey.from_jwk({**private, "d": b64url_encode(bytes(16))})
    with pytest.raises(ConfigError):
        SigningKey.from_jwk([private])  # type: ignore[arg-type]


def test_keyring_jwks_round_trip(key: SigningKey) -> None:
    other = SigningKey(OTHER_SEED)
    ring = KeyRing([key])
    ring.add(other.verify_key)
    ring.add(key)  # idempotent
    assert len(ring) == 2
    assert ring.get(key.kid) == key.verify_key
    assert key.kid in ring
    assert b"\x00" * 8 not in ring
    assert ring.get(b"nope") is None
    jwks = ring.to_jwks()
    assert jwks == {"keys": [key.public_jwk(), other.public_jwk()]}
    assert KeyRing.from_jwks(json.loads(json.dumps(jwks))).to_jwks() == jwks
    assert [k.kid for k in ring] == [key.kid, other.kid]


@pytest.mark.parametrize(
    "doc",
    [
        {},
        {"keys": []},
        {"keys": {}},
        {"keys": [1]},
        [],
        "keys",
        {"keys": [SigningKey(SEED).to_jwk(private=True)]},
    ],
)
def test_bad_jwks_is_config_error(doc: Any) -> None:
    with pytest.raises(ConfigError):
        KeyRing.from_jwks(doc)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=20,
)


@given(doc=json_values)
def test_arbitrary_json_jwks_raises_only_config_error(doc: Any) -> None:
    for candidate in (doc, {"keys": [doc]}):
        try:
            KeyRing.from_jwks(candidate)
        except ConfigError:
            pass


def test_load_signing_key_and_keyring(tmp_path: Path, key: SigningKey) -> None:
    private_file = tmp_path / "key.json"
    private_file.write_text(json.dumps(key.to_jwk(private=True)))
    assert load_signing_key(private_file).to_jwk(private=True) == key.to_jwk(private=True)
    # a private key file works as a key ring: its public part
    assert load_keyring(private_file).to_jwks() == {"keys": [key.public_jwk()]}
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(KeyRing([key]).to_jwks()))
    assert load_keyring(jwks_file).to_jwks() == {"keys": [key.public_jwk()]}
    single = tmp_path / "public.json"
    single.write_text(json.dumps(key.public_jwk()))
    assert load_keyring(single).to_jwks() == {"keys": [key.public_jwk()]}


@pytest.mark.parametrize(
    "content",
    [None, "", "{", "[]", '{"kty": "OKP"}', "\xff\xfe", " " * (1 << 20) + "{}"],
)
def test_load_errors_are_one_line_config_errors(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "k.json"
    if content is not None:
        path.write_bytes(content.encode("latin-1"))
    for load in (load_signing_key, load_keyring):
        with pytest.raises(ConfigError) as info:
            load(path)
        assert "\n" not in str(info.value)
        assert str(path) in str(info.value)


def test_load_signing_key_rejects_a_jwks(tmp_path: Path, key: SigningKey) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(KeyRing([key]).to_jwks()))
    with pytest.raises(ConfigError):
        load_signing_key(path)


# ---------------------------------------------------------------------------------------------
# minting


def test_mint_claims_and_layout(key: SigningKey, ring: KeyRing) -> None:
    token = _mint(
        key, role="guest", audience="relay-7", cohort="beta", ttl=120, fb=1, issuer="ts", now=NOW + 0.9
    )
    outer = cbor2.loads(token)
    assert outer.tag == 18
    protected, unprotected, payload, signature = outer.value
    assert cbor2.loads(protected) == {1: -8, 4: key.kid}
    assert protected == bytes.fromhex("a2012704 48".replace(" ", "")) + key.kid
    assert unprotected == {}
    assert len(signature) == 64
    raw = cbor2.loads(payload)
    assert list(raw) == [1, 3, 4, 5, 6, 7, "fb", "sid", "role", "cohort"]  # canonical order
    assert raw[4] == int(NOW) + 120
    assert raw[5] == raw[6] == int(NOW)
    claims = verify_token(token, ring, now=NOW, audience="relay-7")
    assert claims == Claims(
        iss="ts", aud="relay-7", exp=int(NOW) + 120, nbf=int(NOW), iat=int(NOW),
        cti=raw[7], sid="sess-1", role="guest", cohort="beta", fb=1,
    )  # fmt: skip
    assert claims.analytics_allowed
    assert claims.lifetime == 120
    assert len(token) < MAX_TOKEN_SIZE


def test_mint_uses_fresh_random_cti(key: SigningKey, ring: KeyRing) -> None:
    a = verify_token(_mint(key), ring, now=NOW)
    b = verify_token(_mint(key), ring, now=NOW)
    assert a.cti != b.cti
    assert len(a.cti) == 16


def test_mint_is_deterministic_for_fixed_cti(key: SigningKey) -> None:
    assert _mint(key, cti=b"\x01" * 16) == _mint(key, cti=b"\x01" * 16)


@pytest.mark.parametrize(
    "overrides",
    [
        {"ttl": 301},
        {"ttl": 0},
        {"ttl": -5},
        {"ttl": 1.5},
        {"ttl": True},
        {"session_id": ""},
        {"session_id": "a b"},
        {"session_id": "x" * 129},
        {"role": "admin"},
        {"audience": ""},
        {"cohort": "c" * 129},
        {"fb": -1},
        {"fb": 2**64},
        {"cti": b"short"},
        {"now": float("nan")},
        {"now": -1.0},
        {"issuer": 7},
    ],
)
def test_mint_rejects_out_of_contract_arguments(key: SigningKey, overrides: dict[str, Any]) -> None:
    with pytest.raises(MintError) as info:
        _mint(key, **overrides)
    assert isinstance(info.value, ConfigError)
    assert isinstance(info.value, ValueError)


def test_mint_accepts_ttl_bounds(key: SigningKey, ring: KeyRing) -> None:
    assert verify_token(_mint(key, ttl=300), ring, now=NOW).lifetime == 300
    assert verify_token(_mint(key, ttl=1), ring, now=NOW).lifetime == 1


claim_values = st.fixed_dictionaries(
    {
        "session_id": st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True),
        "role": st.sampled_from(["host", "guest"]),
        "audience": st.text(min_size=1, max_size=128),
        "cohort": st.text(min_size=1, max_size=128),
        "ttl": st.integers(1, 300),
        "fb": st.integers(0, 2**64 - 1),
        "issuer": st.text(min_size=1, max_size=40),
        "now": st.floats(0, 4e9, allow_nan=False),
        "cti": st.binary(min_size=16, max_size=16),
    }
)


@given(values=claim_values)
def test_round_trip_random_claims(key: SigningKey, ring: KeyRing, values: dict[str, Any]) -> None:
    texts = values["audience"] + values["cohort"] + values["issuer"]
    if len(texts.encode()) > 600:
        # long multi-byte texts can push a token past MAX_TOKEN_SIZE; minting must refuse, not truncate
        try:
            token = mint_token(key, **values)
        except MintError as exc:
            message = str(exc)
        else:
            message = ""
            assert len(token) <= MAX_TOKEN_SIZE
        if message:
            assert f"exceeds {MAX_TOKEN_SIZE}" in message
            return
    token = mint_token(key, **values)
    iat = int(values["now"] // 1)
    claims = verify_token(token, ring, now=values["now"], audience=values["audience"])
    assert claims == Claims(
        iss=values["issuer"], aud=values["audience"], exp=iat + values["ttl"], nbf=iat, iat=iat,
        cti=values["cti"], sid=values["session_id"], role=values["role"], cohort=values["cohort"],
        fb=values["fb"],
    )  # fmt: skip
    assert Claims.from_cbor_map(claims.to_cbor_map()) == claims


# ---------------------------------------------------------------------------------------------
# verification failures, one by one


def test_expired_with_skew(key: SigningKey, ring: KeyRing) -> None:
    token = _mint(key, ttl=60)
    exp = int(NOW) + 60
    assert verify_token(token, ring, now=exp + 29.999).exp == exp  # inside the 30 s allowance
    err = _reason(token, ring, now=exp + 30)
    assert (err.reason, err.code) == ("expired", CloseCode.TOKEN_EXPIRED)
    err = _reason(token, ring, now=exp + 1, skew=0)
    assert err.reason == "expired"


def test_not_yet_valid_with_skew(key: SigningKey, ring: KeyRing) -> None:
    token = _mint(key)
    assert verify_token(token, ring, now=NOW - 30).nbf == int(NOW)
    err = _reason(token, ring, now=NOW - 30.5)
    assert (err.reason, err.code) == ("not_yet_valid", CloseCode.AUTH_FAILED)


def test_wrong_audience(key: SigningKey, ring: KeyRing) -> None:
    token = _mint(key, audience="relay-a")
    assert verify_token(token, ring, now=NOW, audience="relay-a").aud == "relay-a"
    assert verify_token(token, ring, now=NOW).aud == "relay-a"  # audience None: not checked
    err = _reason(token, ring, audience="relay-b")
    assert (err.reason, err.code) == ("wrong_audience", CloseCode.WRONG_NODE)
    star = _mint(key, audience="*")
    assert verify_token(star, ring, now=NOW, audience="relay-b").aud == "*"


def test_unknown_kid(key: SigningKey) -> None:
    err = _reason(_mint(key), KeyRing([SigningKey(OTHER_SEED)]))
    assert (err.reason, err.code) == ("unknown_kid", CloseCode.AUTH_FAILED)


def test_bad_signature(key: SigningKey, ring: KeyRing) -> None:
    outer = cbor2.loads(_mint(key))
    protected, _unprotected, payload, signature = outer.value
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert _reason(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, flipped])), ring).reason == (
        "bad_signature"
    )
    # claims changed after signing (a longer lifetime), signature kept
    changed = cbor2.loads(payload)
    changed[4] += 1000
    forged = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, cbor2.dumps(changed), signature]))
    assert _reason(forged, ring).reason == "bad_signature"
    # signed by another key that claims our kid
    impostor = _sign1(OTHER_SEED, payload, protected={1: -8, 4: key.kid})
    assert _reason(impostor, ring).reason == "bad_signature"


@pytest.mark.parametrize("alg", [-7, -35, 5, None, "EdDSA"])
def test_bad_algorithm(key: SigningKey, ring: KeyRing, alg: Any) -> None:
    protected: dict[Any, Any] = {4: key.kid} if alg is None else {1: alg, 4: key.kid}
    token = _sign1(SEED, cbor2.dumps(_claims_map()), protected=protected)
    assert _reason(token, ring).reason == "bad_algorithm"


def test_lifetime_too_long(ring: KeyRing) -> None:
    iat = int(NOW)
    token = _sign1(SEED, cbor2.dumps(_claims_map({4: iat + 301})))
    err = _reason(token, ring)
    assert (err.reason, err.code) == ("lifetime_too_long", CloseCode.AUTH_FAILED)
    # also when nbf is far before exp while iat looks recent
    token = _sign1(SEED, cbor2.dumps(_claims_map({4: iat + 100, 5: iat - 1000})))
    assert _reason(token, ring).reason == "lifetime_too_long"
    ok = _sign1(SEED, cbor2.dumps(_claims_map({4: iat + 300})))
    assert verify_token(ok, ring, now=NOW).lifetime == 300


@pytest.mark.parametrize(
    "overrides",
    [
        {1: _DROP},
        {3: _DROP},
        {4: _DROP},
        {5: _DROP},
        {6: _DROP},
        {7: _DROP},
        {"sid": _DROP},
        {"role": _DROP},
        {"cohort": _DROP},
        {"fb": _DROP},
        {4: float(NOW + 100)},
        {4: str(int(NOW) + 100)},
        {5: True},
        {6: -1},
        {7: b"\x00" * 15},
        {7: "0123456789abcdef"},
        {"sid": "bad session"},
        {"sid": 5},
        {"role": "admin"},
        {"cohort": ""},
        {"fb": -1},
        {"fb": 2**64},
        {"fb": False},
        {3: ["relay-1"]},
        {1: b"beach-rescue"},
    ],
)
def test_missing_or_ill_typed_claims_are_malformed(ring: KeyRing, overrides: dict[Any, Any]) -> None:
    token = _sign1(SEED, cbor2.dumps(_claims_map(overrides)))
    err = _reason(token, ring)
    assert (err.reason, err.code) == ("malformed", CloseCode.AUTH_FAILED)


def test_non_integer_labels_do_not_stand_in_for_integer_ones(key: SigningKey, ring: KeyRing) -> None:
    claims = _claims_map({1: _DROP})
    claims[True] = "beach-rescue"  # CBOR true, which Python would treat as the label 1
    assert _reason(_sign1(SEED, cbor2.dumps(claims)), ring).reason == "malformed"
    token = _sign1(SEED, cbor2.dumps(_claims_map()), protected={1.0: -8, 4: key.kid})
    assert _reason(token, ring).reason == "bad_algorithm"


def test_extra_claims_are_ignored(ring: KeyRing) -> None:
    token = _sign1(SEED, cbor2.dumps(_claims_map({2: "subject", "x-new": [1, 2]})))
    assert verify_token(token, ring, now=NOW).sid == "sess-1"


def test_signature_is_checked_before_the_payload_is_parsed(key: SigningKey, ring: KeyRing) -> None:
    garbage = b"\xff\xff not cbor"
    # correctly signed garbage: only now is it parsed, and found malformed
    assert _reason(_sign1(SEED, garbage), ring).reason == "malformed"
    # wrongly signed garbage: rejected for the signature, the payload never looked at
    assert _reason(_sign1(OTHER_SEED, garbage, protected={1: -8, 4: key.kid}), ring).reason == "bad_signature"
    # unknown key: rejected before the signature and the payload
    assert _reason(_sign1(OTHER_SEED, garbage), ring).reason == "unknown_kid"


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"\x00",
        b"\xd2",
        cbor2.dumps([b"", {}, b"", b""]),  # untagged
        cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""])),  # MAC0
        cbor2.dumps(cbor2.CBORTag(18, [b"", {}, b""])),
        cbor2.dumps(cbor2.CBORTag(18, "abcd")),
        cbor2.dumps(cbor2.CBORTag(18, [{}, {}, b"", b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\xa0", [], b"", b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [b"\x80", {}, b"", b"\x00" * 64])),  # protected not a map
        cbor2.dumps(cbor2.CBORTag(18, [b"\xff", {}, b"", b"\x00" * 64])),
        cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -8, 4: "kid"}), {}, b"", b"\x00" * 64])),
        b"\x00" * (MAX_TOKEN_SIZE + 1),
    ],
)
def test_structurally_malformed(ring: KeyRing, token: bytes) -> None:
    assert _reason(token, ring).reason == "malformed"


def test_envelope_rules(key: SigningKey, ring: KeyRing) -> None:
    payload = cbor2.dumps(_claims_map())
    # kid (or alg) in the unprotected header: SPEC puts both in the protected header
    token = _sign1(SEED, payload, protected={1: -8}, unprotected={4: key.kid})
    assert _reason(token, ring).reason == "malformed"
    # critical parameters are not understood
    token = _sign1(SEED, payload, protected={1: -8, 2: [99], 4: key.kid})
    assert _reason(token, ring).reason == "malformed"
    # a 63-byte signature
    outer = cbor2.loads(_mint(key))
    p, u, pl, sig = outer.value
    assert _reason(cbor2.dumps(cbor2.CBORTag(18, [p, u, pl, sig[:-1]])), ring).reason == "malformed"
    # trailing bytes after the token (unsigned, so they would make tokens malleable)
    assert _reason(_mint(key) + b"\x00", ring).reason == "malformed"
    # an extra unprotected parameter is fine (it is not trusted for anything)
    assert verify_token(_sign1(SEED, payload, unprotected={"note": "x"}), ring, now=NOW).role == "guest"
    # the optional outer CWT tag 61 (RFC 8392 §6)
    assert verify_token(cbor2.dumps(cbor2.CBORTag(61, outer)), ring, now=NOW).sid == "sess-1"


def test_verify_rejects_non_finite_now(key: SigningKey, ring: KeyRing) -> None:
    with pytest.raises(ValueError):
        verify_token(_mint(key), ring, now=float("nan"))


@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_token_error(ring: KeyRing, data: bytes) -> None:
    with pytest.raises(TokenError) as info:
        verify_token(data, ring, now=NOW)
    assert info.value.code in (CloseCode.AUTH_FAILED, CloseCode.TOKEN_EXPIRED, CloseCode.WRONG_NODE)


@given(data=st.data())
def test_mutated_tokens_raise_only_token_error_or_verify_unchanged(
    key: SigningKey, ring: KeyRing, data: st.DataObject
) -> None:
    token = bytearray(_mint(key, cti=b"\x05" * 16))
    original = verify_token(bytes(token), ring, now=NOW)
    for _ in range(data.draw(st.integers(1, 4), label="mutations")):
        op = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]), label="op")
        at = data.draw(st.integers(0, max(len(token) - 1, 0)), label="at")
        if op == "flip" and token:
            token[at] ^= 1 << data.draw(st.integers(0, 7), label="bit")
        elif op == "set" and token:
            token[at] = data.draw(st.integers(0, 255), label="byte")
        elif op == "insert":
            token[at:at] = data.draw(st.binary(min_size=1, max_size=3), label="ins")
        elif op == "delete" and token:
            del token[at]
        elif op == "truncate":
            del token[at:]
    try:
        claims = verify_token(bytes(token), ring, now=NOW)
    except TokenError:
        return
    assert claims == original  # only the unsigned envelope changed, never a claim


# ---------------------------------------------------------------------------------------------
# interop with the independent cwt package


def _cose_keys(cwt: ModuleType, key: SigningKey) -> tuple[COSEKeyInterface, COSEKeyInterface]:
    """cwt keys built from our JWK. COSE kid = the 8 raw kid bytes (the JWK "kid" is their base64url)."""
    jwk = key.to_jwk(private=True)
    x, d, kid = b64url_decode(jwk["x"]), b64url_decode(jwk["d"]), b64url_decode(jwk["kid"])
    public = cwt.COSEKey.new({1: 1, 2: kid, 3: -8, -1: 6, -2: x})
    private = cwt.COSEKey.new({1: 1, 2: kid, 3: -8, -1: 6, -2: x, -4: d})
    return public, private


def test_our_token_verifies_with_cwt(oracle: Callable[[str], ModuleType], key: SigningKey) -> None:
    cwt = oracle("cwt")
    public, _ = _cose_keys(cwt, key)
    token = _mint(key, role="guest", audience="relay-3", cohort="c1", fb=1, cti=b"\x07" * 16)
    payload = cwt.COSE.new().decode(token, public)
    assert cbor2.loads(payload) == {
        1: "beach-rescue", 3: "relay-3", 4: int(NOW) + 300, 5: int(NOW), 6: int(NOW), 7: b"\x07" * 16,
        "sid": "sess-1", "role": "guest", "cohort": "c1", "fb": 1,
    }  # fmt: skip
    # cwt's CWT layer checks exp/nbf against the real clock, so give it a token minted now
    live = _mint(key, now=time.time())
    decoded = cwt.decode(live, public)
    assert isinstance(decoded, dict)
    assert decoded["sid"] == "sess-1"
    # and cwt rejects our token when the signature is damaged
    broken = bytearray(token)
    broken[-1] ^= 1
    with pytest.raises(cwt.VerifyError):
        cwt.COSE.new().decode(bytes(broken), public)


def test_cwt_signed_token_verifies_with_ours(
    oracle: Callable[[str], ModuleType], key: SigningKey, ring: KeyRing
) -> None:
    cwt = oracle("cwt")
    _, private = _cose_keys(cwt, key)
    claims = _claims_map({7: os.urandom(16), "fb": 3, "cohort": "gamma"})
    ctx = cwt.COSE.new(alg_auto_inclusion=False, kid_auto_inclusion=False)
    token = ctx.encode_and_sign(cbor2.dumps(claims), private, protected={1: -8, 4: key.kid}, unprotected={})
    verified = verify_token(token, ring, now=NOW, audience="relay-x")
    assert verified.to_cbor_map() == claims
    # cwt's CWT-layer layout (alg auto-included in the protected header, kid in the unprotected
    # one) is not the SPEC §3 layout: we refuse it as malformed rather than guess
    auto = cwt.COSE.new(alg_auto_inclusion=True, kid_auto_inclusion=True)
    default_layout = auto.encode_and_sign(cbor2.dumps(claims), private)
    assert cbor2.loads(default_layout).value[1] == {4: key.kid}
    assert _reason(default_layout, ring).reason == "malformed"
