"""Regenerate the known-answer vectors in this directory from fixed inputs.

Usage: ``.venv/bin/python tests/vectors/generate.py`` (rewrites ``crypto.json`` and ``token.json``).

The vectors are for implementers of other clients (Rust, browser): every value is derived from
the ``inputs`` object stored next to it, and ``tests/test_vectors.py`` recomputes each one, with
rescue and with an independent library (``cryptography``, ``cwt``), and compares byte for byte.
Regenerating should never change a committed value; if it does, the wire format changed.
"""

from __future__ import annotations

import json
from pathlib import Path

import cbor2

from rescue.protocol import (
    HEADER_SIZE,
    Flags,
    KeyRing,
    Kind,
    SigningKey,
    b64url_encode,
    decode_header,
    mint_token,
    verify_token,
)
from rescue.protocol._crypto import (
    FrameCipher,
    aead_nonce,
    derive_frame_key,
    derive_psk,
    psk_salt,
)

HERE = Path(__file__).resolve().parent

CRYPTO_INPUTS = {
    "passphrase": "correct horse battery staple",
    "session_id": "vector-session-0001",
    "host_nonce_hex": bytes(range(0x10)).hex(),
    "guest_nonce_hex": bytes(range(0xF0, 0x100)).hex(),
    "argon2id": {"opslimit": 2, "memlimit_bytes": 67108864, "lanes": 1, "version": "0x13"},
}
DATA_FRAME = {  # sent by the host: terminal output, seq 1
    "sender": "host",
    "kind": "DATA",
    "flags": 0,
    "channel": 0,
    "seq": 1,
    "plaintext_hex": b"hello, beach\r\n".hex(),
}
ACK_FRAME = {  # sent by the guest: UNSEQUENCED CONTROL {"ack": 1}, its own counter 1
    "sender": "guest",
    "kind": "CONTROL",
    "flags": int(Flags.UNSEQUENCED),
    "channel": 0,
    "seq": 1,
    "plaintext_hex": cbor2.dumps({"ack": 1}, canonical=True).hex(),
}
TOKEN_INPUTS = {
    # RFC 8032 §7.1 TEST 1 secret key, so the public key is a published value too.
    "ed25519_seed_hex": "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
    "now": 1700000000,
    "ttl": 300,
    "session_id": "vector-session-0001",
    "role": "guest",
    "audience": "relay-1",
    "cohort": "beta",
    "fb": 1,
    "issuer": "beach-rescue",
    "cti_hex": bytes(range(0xA0, 0xB0)).hex(),
}


def _frame(inputs: dict[str, object], keys: dict[str, bytes]) -> dict[str, object]:
    cipher = FrameCipher(keys[str(inputs["sender"])])
    message = cipher.seal_frame(
        Kind[str(inputs["kind"])],
        bytes.fromhex(str(inputs["plaintext_hex"])),
        seq=int(str(inputs["seq"])),
        channel=int(str(inputs["channel"])),
        flags=Flags(int(str(inputs["flags"]))),
    )
    header = message[:HEADER_SIZE]
    return {
        **inputs,
        "header_hex": header.hex(),
        "aead_nonce_hex": aead_nonce(decode_header(header)).hex(),
        "ciphertext_hex": message[HEADER_SIZE:].hex(),
        "message_hex": message.hex(),
    }


def crypto_vectors() -> dict[str, object]:
    session = str(CRYPTO_INPUTS["session_id"])
    psk = derive_psk(str(CRYPTO_INPUTS["passphrase"]), session)
    keys = {
        role: derive_frame_key(psk, session, role, bytes.fromhex(str(CRYPTO_INPUTS[f"{role}_nonce_hex"])))
        for role in ("host", "guest")
    }
    return {
        "description": "beach-rescue v1 end-to-end crypto; see docs/protocol.md",
        "inputs": CRYPTO_INPUTS,
        "psk_salt_hex": psk_salt(session).hex(),
        "psk_hex": psk.hex(),
        "host_frame_key_hex": keys["host"].hex(),
        "guest_frame_key_hex": keys["guest"].hex(),
        "data_frame": _frame(DATA_FRAME, keys),
        "ack_frame": _frame(ACK_FRAME, keys),
    }


def token_vectors() -> dict[str, object]:
    t = TOKEN_INPUTS
    key = SigningKey(bytes.fromhex(str(t["ed25519_seed_hex"])))
    token = mint_token(
        key,
        session_id=str(t["session_id"]),
        role=str(t["role"]),
        audience=str(t["audience"]),
        cohort=str(t["cohort"]),
        ttl=int(str(t["ttl"])),
        fb=int(str(t["fb"])),
        issuer=str(t["issuer"]),
        now=float(str(t["now"])),
        cti=bytes.fromhex(str(t["cti_hex"])),
    )
    claims = verify_token(token, KeyRing([key]), now=float(str(t["now"])), audience=str(t["audience"]))
    protected, _unprotected, payload, signature = cbor2.loads(token).value
    return {
        "description": "beach-rescue v1 fallback token (COSE_Sign1 CWT, EdDSA); see docs/protocol.md",
        "inputs": TOKEN_INPUTS,
        "public_key_hex": key.verify_key.raw.hex(),
        "kid_hex": key.kid.hex(),
        "public_jwk": key.public_jwk(),
        "jwks": KeyRing([key]).to_jwks(),
        "protected_hex": protected.hex(),
        "payload_hex": payload.hex(),
        "sig_structure_hex": cbor2.dumps(["Signature1", protected, b"", payload], canonical=True).hex(),
        "signature_hex": signature.hex(),
        "token_hex": token.hex(),
        "token_b64url": b64url_encode(token),
        "claims": claims.to_json(),
    }


def main() -> None:
    for name, doc in (("crypto.json", crypto_vectors()), ("token.json", token_vectors())):
        (HERE / name).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {HERE / name}")


if __name__ == "__main__":
    main()
