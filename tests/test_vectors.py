"""Known-answer vectors (tests/vectors/*.json) recomputed from their inputs, byte for byte.

Each value is checked twice: with rescue's own code, and with independent implementations
(``cryptography`` for Argon2id, HKDF, ChaCha20-Poly1305 and Ed25519; hand-built CBOR; ``cwt`` for the
token), so the vectors pin the wire format rather than just today's behaviour of our code.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from rescue.protocol import (
    HEADER_SIZE,
    Flags,
    KeyRing,
    Kind,
    SigningKey,
    b64url_decode,
    b64url_encode,
    decode_header,
    encode_header,
    mint_token,
    verify_token,
)
from rescue.protocol._crypto import FrameCipher, aead_nonce, derive_frame_key, derive_psk, psk_salt

VECTORS = Path(__file__).parent / "vectors"


def _load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((VECTORS / name).read_text())
    return doc


@pytest.fixture(scope="module")
def crypto() -> dict[str, Any]:
    return _load("crypto.json")


@pytest.fixture(scope="module")
def token_doc() -> dict[str, Any]:
    return _load("token.json")


@pytest.fixture(scope="module")
def psk(crypto: dict[str, Any]) -> bytes:
    """Argon2id runs once per module (≈0.1 s, 64 MiB)."""
    i = crypto["inputs"]
    return derive_psk(i["passphrase"], i["session_id"])


# ---------------------------------------------------------------------------------------------
# crypto.json


def test_salt_is_blake2b_512_prefix(crypto: dict[str, Any]) -> None:
    session = crypto["inputs"]["session_id"]
    independent = hashlib.new("blake2b", session.encode() + b"beach-salt").digest()[:16]
    assert psk_salt(session).hex() == crypto["psk_salt_hex"] == independent.hex()


def test_psk_matches_the_vector(crypto: dict[str, Any], psk: bytes) -> None:
    assert psk.hex() == crypto["psk_hex"]


def test_psk_matches_independent_argon2id(
    oracle: Callable[[str], ModuleType], crypto: dict[str, Any], psk: bytes
) -> None:
    # cryptography has Argon2id from 44 on; rescue itself needs only cryptography >= 42 (RS256)
    argon2 = oracle("cryptography.hazmat.primitives.kdf.argon2")
    i = crypto["inputs"]
    params = i["argon2id"]
    independent = argon2.Argon2id(
        salt=bytes.fromhex(crypto["psk_salt_hex"]),
        length=32,
        iterations=params["opslimit"],
        lanes=params["lanes"],
        memory_cost=params["memlimit_bytes"] // 1024,  # KiB
    ).derive(i["passphrase"].encode())
    assert psk.hex() == crypto["psk_hex"] == independent.hex()


@pytest.mark.parametrize("role", ["host", "guest"])
def test_frame_keys(crypto: dict[str, Any], psk: bytes, role: str) -> None:
    i = crypto["inputs"]
    nonce = bytes.fromhex(i[f"{role}_nonce_hex"])
    ours = derive_frame_key(psk, i["session_id"], role, nonce)
    independent = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=i["session_id"].encode(),
        info=b"beach-rescue/v1/frame" + role.encode() + nonce,
    ).derive(bytes.fromhex(crypto["psk_hex"]))
    assert ours.hex() == crypto[f"{role}_frame_key_hex"] == independent.hex()


@pytest.mark.parametrize("name", ["data_frame", "ack_frame"])
def test_sealed_frames(crypto: dict[str, Any], psk: bytes, name: str) -> None:
    f = crypto[name]
    key = bytes.fromhex(crypto[f"{f['sender']}_frame_key_hex"])
    plaintext = bytes.fromhex(f["plaintext_hex"])
    header = encode_header(Kind[f["kind"]], flags=Flags(f["flags"]), channel=f["channel"], seq=f["seq"])
    assert header.hex() == f["header_hex"]
    # nonce: u32 space (1 iff UNSEQUENCED) ‖ u64 seq, big-endian
    space = 1 if f["flags"] & Flags.UNSEQUENCED else 0
    expected_nonce = space.to_bytes(4, "big") + f["seq"].to_bytes(8, "big")
    assert aead_nonce(decode_header(header)).hex() == f["aead_nonce_hex"] == expected_nonce.hex()

    message = FrameCipher(key).seal_frame(
        Kind[f["kind"]], plaintext, seq=f["seq"], channel=f["channel"], flags=Flags(f["flags"])
    )
    independent = header + ChaCha20Poly1305(key).encrypt(expected_nonce, plaintext, header)
    assert message.hex() == f["message_hex"] == independent.hex()
    assert message[HEADER_SIZE:].hex() == f["ciphertext_hex"]

    parsed, opened = FrameCipher(key).open_frame(bytes.fromhex(f["message_hex"]))
    assert opened == plaintext
    assert parsed.seq == f["seq"]


def test_ack_frame_plaintext_is_canonical_cbor(crypto: dict[str, Any]) -> None:
    assert cbor2.loads(bytes.fromhex(crypto["ack_frame"]["plaintext_hex"])) == {"ack": 1}


# ---------------------------------------------------------------------------------------------
# token.json


def _signing_key(doc: dict[str, Any]) -> SigningKey:
    return SigningKey(bytes.fromhex(doc["inputs"]["ed25519_seed_hex"]))


def test_token_key_material(token_doc: dict[str, Any]) -> None:
    key = _signing_key(token_doc)
    seed = bytes.fromhex(token_doc["inputs"]["ed25519_seed_hex"])
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    assert key.verify_key.raw.hex() == token_doc["public_key_hex"] == public.hex()
    assert key.kid.hex() == token_doc["kid_hex"] == hashlib.sha256(public).digest()[:8].hex()
    assert key.public_jwk() == token_doc["public_jwk"]
    assert token_doc["public_jwk"]["x"] == b64url_encode(public)
    assert token_doc["public_jwk"]["kid"] == b64url_encode(bytes.fromhex(token_doc["kid_hex"]))
    assert KeyRing.from_jwks(token_doc["jwks"]).to_jwks() == token_doc["jwks"]


def test_token_rebuilt_by_hand_is_byte_identical(token_doc: dict[str, Any]) -> None:
    """Build the token from the inputs with plain cbor2 + cryptography, per SPEC §3 only."""
    t = token_doc["inputs"]
    kid = bytes.fromhex(token_doc["kid_hex"])
    protected = cbor2.dumps({1: -8, 4: kid}, canonical=True)
    claims = {
        1: t["issuer"],
        3: t["audience"],
        4: t["now"] + t["ttl"],
        5: t["now"],
        6: t["now"],
        7: bytes.fromhex(t["cti_hex"]),
        "sid": t["session_id"],
        "role": t["role"],
        "cohort": t["cohort"],
        "fb": t["fb"],
    }
    payload = cbor2.dumps(claims, canonical=True)
    sig_structure = cbor2.dumps(["Signature1", protected, b"", payload], canonical=True)
    signature = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(t["ed25519_seed_hex"])).sign(sig_structure)
    token = cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]), canonical=True)

    assert protected.hex() == token_doc["protected_hex"]
    assert payload.hex() == token_doc["payload_hex"]
    assert sig_structure.hex() == token_doc["sig_structure_hex"]
    assert signature.hex() == token_doc["signature_hex"]
    assert token.hex() == token_doc["token_hex"]
    assert b64url_encode(token) == token_doc["token_b64url"]
    assert b64url_decode(token_doc["token_b64url"]) == token


def test_token_minted_by_rescue_is_byte_identical(token_doc: dict[str, Any]) -> None:
    t = token_doc["inputs"]
    token = mint_token(
        _signing_key(token_doc),
        session_id=t["session_id"],
        role=t["role"],
        audience=t["audience"],
        cohort=t["cohort"],
        ttl=t["ttl"],
        fb=t["fb"],
        issuer=t["issuer"],
        now=t["now"],
        cti=bytes.fromhex(t["cti_hex"]),
    )
    assert token.hex() == token_doc["token_hex"]


def test_token_verifies_to_expected_claims(token_doc: dict[str, Any]) -> None:
    t = token_doc["inputs"]
    keys = KeyRing.from_jwks(token_doc["jwks"])
    claims = verify_token(bytes.fromhex(token_doc["token_hex"]), keys, now=t["now"], audience=t["audience"])
    assert claims.to_json() == token_doc["claims"]
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(token_doc["public_key_hex"])).verify(
        bytes.fromhex(token_doc["signature_hex"]), bytes.fromhex(token_doc["sig_structure_hex"])
    )


def test_token_verifies_with_cwt(oracle: Callable[[str], ModuleType], token_doc: dict[str, Any]) -> None:
    cwt = oracle("cwt")
    key = cwt.COSEKey.new(
        {
            1: 1,
            2: bytes.fromhex(token_doc["kid_hex"]),
            3: -8,
            -1: 6,
            -2: bytes.fromhex(token_doc["public_key_hex"]),
        }
    )
    payload = cwt.COSE.new().decode(bytes.fromhex(token_doc["token_hex"]), key)
    assert payload.hex() == token_doc["payload_hex"]
