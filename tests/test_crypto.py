"""End-to-end frame crypto: psk, HKDF, frame keys and the ChaCha20-Poly1305 FrameCipher."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ProtocolError
from rescue.protocol import CloseCode, Flags, Kind
from rescue.protocol._crypto import (
    KEY_SIZE,
    TAG_SIZE,
    DecryptError,
    FrameCipher,
    aead_nonce,
    derive_frame_key,
    derive_psk,
    hkdf_sha256,
    psk_salt,
)
from rescue.protocol._frames import DEFAULT_MAX_FRAME, HEADER_SIZE, MAX_SEQ, decode_header, encode_header

SESSION = "test-session.1"
HOST_NONCE = bytes(range(16))
GUEST_NONCE = bytes(range(16, 32))


@pytest.fixture(scope="module")
def psk() -> bytes:
    """Argon2id is slow (≈0.1 s, 64 MiB): derive it once for the whole module."""
    return derive_psk("hunter2 hunter2", SESSION)


@pytest.fixture(scope="module")
def host_key(psk: bytes) -> bytes:
    return derive_frame_key(psk, SESSION, "host", HOST_NONCE)


@pytest.fixture(scope="module")
def guest_key(psk: bytes) -> bytes:
    return derive_frame_key(psk, SESSION, "guest", GUEST_NONCE)


# ---------------------------------------------------------------------------------------------
# psk


def test_psk_salt_is_first_16_bytes_of_blake2b_512() -> None:
    digest = hashlib.blake2b(b"abc" + b"beach-salt", digest_size=64).digest()
    assert psk_salt("abc") == digest[:16]
    assert len(psk_salt("")) == 16
    assert psk_salt("abc") != psk_salt("abd")


def test_psk_is_32_bytes_and_str_means_utf8(psk: bytes) -> None:
    assert len(psk) == 32
    assert derive_psk(b"hunter2 hunter2", SESSION) == psk


def test_psk_depends_on_session_and_passphrase(psk: bytes) -> None:
    assert derive_psk("hunter2 hunter2", SESSION + "x") != psk
    assert derive_psk("hunter2 hunter3", SESSION) != psk


# ---------------------------------------------------------------------------------------------
# HKDF (RFC 5869 appendix A, SHA-256 cases)

RFC5869 = [
    (  # A.1 basic
        "0b" * 22,
        "000102030405060708090a0b0c",
        "f0f1f2f3f4f5f6f7f8f9",
        42,
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
    ),
    (  # A.2 longer inputs and outputs
        bytes(range(0x50)).hex(),
        bytes(range(0x60, 0xB0)).hex(),
        bytes(range(0xB0, 0x100)).hex(),
        82,
        "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
        "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
        "cc30c58179ec3e87c14c01d5c1f3434f1d87",
    ),
    (  # A.3 zero-length salt and info
        "0b" * 22,
        "",
        "",
        42,
        "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
    ),
]


@pytest.mark.parametrize(("ikm", "salt", "info", "length", "okm"), RFC5869)
def test_hkdf_rfc5869(ikm: str, salt: str, info: str, length: int, okm: str) -> None:
    assert hkdf_sha256(bytes.fromhex(ikm), bytes.fromhex(salt), bytes.fromhex(info), length).hex() == okm


def test_hkdf_length_bounds() -> None:
    assert hkdf_sha256(b"k", b"s", b"i", 0) == b""
    assert len(hkdf_sha256(b"k", b"s", b"i", 255 * 32)) == 255 * 32
    with pytest.raises(ValueError):
        hkdf_sha256(b"k", b"s", b"i", 255 * 32 + 1)
    with pytest.raises(ValueError):
        hkdf_sha256(b"k", b"s", b"i", -1)


# ---------------------------------------------------------------------------------------------
# frame keys


def test_frame_key_is_hkdf_of_documented_inputs(psk: bytes, host_key: bytes) -> None:
    expected = hkdf_sha256(psk, SESSION.encode(), b"beach-rescue/v1/frame" + b"host" + HOST_NONCE, 32)
    assert host_key == expected
    assert len(host_key) == KEY_SIZE


def test_frame_keys_differ_per_role_nonce_and_session(psk: bytes) -> None:
    keys = {
        derive_frame_key(psk, SESSION, "host", HOST_NONCE),
        derive_frame_key(psk, SESSION, "guest", HOST_NONCE),
        derive_frame_key(psk, SESSION, "host", GUEST_NONCE),
        derive_frame_key(psk, SESSION + "2", "host", HOST_NONCE),
        derive_frame_key(bytes(32), SESSION, "host", HOST_NONCE),
    }
    assert len(keys) == 5


@pytest.mark.parametrize(
    ("psk_len", "role", "nonce_len"),
    [(31, "host", 16), (32, "admin", 16), (32, "Host", 16), (32, "host", 15), (32, "guest", 17)],
)
def test_frame_key_rejects_bad_inputs(psk_len: int, role: str, nonce_len: int) -> None:
    with pytest.raises(ValueError):
        derive_frame_key(bytes(psk_len), SESSION, role, bytes(nonce_len))


# ---------------------------------------------------------------------------------------------
# FrameCipher

sealed_headers = st.one_of(
    st.builds(
        lambda seq, ch, comp: (Kind.DATA, seq, ch, Flags.COMPRESSED if comp else Flags.NONE),
        st.integers(1, MAX_SEQ),
        st.integers(0, 255),
        st.booleans(),
    ),
    st.builds(
        lambda seq, unseq, comp: (
            Kind.CONTROL,
            seq,
            0,
            (Flags.UNSEQUENCED if unseq else Flags.NONE) | (Flags.COMPRESSED if comp else Flags.NONE),
        ),
        st.integers(1, MAX_SEQ),
        st.booleans(),
        st.booleans(),
    ),
)


@given(spec=sealed_headers, plaintext=st.binary(max_size=2048))
def test_seal_open_round_trip(host_key: bytes, spec: tuple[Kind, int, int, Flags], plaintext: bytes) -> None:
    kind, seq, channel, flags = spec
    cipher = FrameCipher(host_key)
    message = cipher.seal_frame(kind, plaintext, seq=seq, channel=channel, flags=flags)
    assert len(message) == HEADER_SIZE + len(plaintext) + TAG_SIZE
    header, opened = FrameCipher(host_key).open_frame(message)
    assert opened == plaintext
    assert (header.kind, header.seq, header.channel, header.flags) == (kind, seq, channel, flags)
    # the same thing through seal()/open() on explicit header bytes
    raw_header = message[:HEADER_SIZE]
    assert cipher.seal(raw_header, plaintext) == message[HEADER_SIZE:]
    assert cipher.open(raw_header, message[HEADER_SIZE:]) == plaintext


@given(spec=sealed_headers, plaintext=st.binary(max_size=256))
def test_matches_independent_chacha20poly1305(
    host_key: bytes, spec: tuple[Kind, int, int, Flags], plaintext: bytes
) -> None:
    kind, seq, channel, flags = spec
    message = FrameCipher(host_key).seal_frame(kind, plaintext, seq=seq, channel=channel, flags=flags)
    header = message[:HEADER_SIZE]
    space = 1 if flags & Flags.UNSEQUENCED else 0
    nonce = struct.pack(">IQ", space, seq)
    assert message[HEADER_SIZE:] == ChaCha20Poly1305(host_key).encrypt(nonce, plaintext, header)


@given(plaintext=st.binary(max_size=64), data=st.data())
def test_any_flipped_bit_fails(host_key: bytes, plaintext: bytes, data: st.DataObject) -> None:
    message = FrameCipher(host_key).seal_frame(Kind.DATA, plaintext, seq=7, channel=1)
    bit = data.draw(st.integers(0, len(message) * 8 - 1), label="bit")
    tampered = bytearray(message)
    tampered[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(ProtocolError) as info:
        FrameCipher(host_key).open_frame(bytes(tampered))
    try:
        decode_header(bytes(tampered[:HEADER_SIZE]))
    except ProtocolError:
        return  # the header itself became invalid: PROTOCOL_ERROR is the right answer
    # a still-valid header (other seq, channel, flags …) or a changed body: authentication fails
    assert isinstance(info.value, DecryptError)
    assert info.value.code is CloseCode.INTEGRITY_ERROR


def test_flipping_each_header_field_fails(host_key: bytes) -> None:
    cipher = FrameCipher(host_key)
    message = cipher.seal_frame(Kind.DATA, b"ls -la\n", seq=5, channel=1)
    body = message[HEADER_SIZE:]
    for other in (
        encode_header(Kind.DATA, seq=6, channel=1),
        encode_header(Kind.DATA, seq=5, channel=0),
        encode_header(Kind.DATA, seq=5, channel=1, flags=Flags.COMPRESSED),
        encode_header(Kind.CONTROL, seq=5),
    ):
        with pytest.raises(DecryptError):
            cipher.open(other, body)


def test_keys_are_direction_specific(host_key: bytes, guest_key: bytes) -> None:
    message = FrameCipher(host_key).seal_frame(Kind.DATA, b"secret", seq=1)
    assert FrameCipher(host_key).open_frame(message)[1] == b"secret"
    with pytest.raises(DecryptError):
        FrameCipher(guest_key).open_frame(message)
    assert FrameCipher(guest_key).seal_frame(Kind.DATA, b"secret", seq=1) != message


def test_unsequenced_and_sequenced_use_different_nonce_spaces(host_key: bytes) -> None:
    seq_header = decode_header(encode_header(Kind.CONTROL, seq=3))
    unseq_header = decode_header(encode_header(Kind.CONTROL, seq=3, flags=Flags.UNSEQUENCED))
    assert aead_nonce(seq_header) == bytes.fromhex("000000000000000000000003")
    assert aead_nonce(unseq_header) == bytes.fromhex("000000010000000000000003")

    cipher = FrameCipher(host_key)
    a = cipher.seal_frame(Kind.CONTROL, b"\xa1cack\x01", seq=3)
    b = cipher.seal_frame(Kind.CONTROL, b"\xa1cack\x01", seq=3, flags=Flags.UNSEQUENCED)
    # different nonces ⇒ different keystream: the encrypted bytes differ, not just the tag
    assert a[HEADER_SIZE:-TAG_SIZE] != b[HEADER_SIZE:-TAG_SIZE]
    # and each only opens under its own header
    with pytest.raises(DecryptError):
        cipher.open(b[:HEADER_SIZE], a[HEADER_SIZE:])
    with pytest.raises(DecryptError):
        cipher.open(a[:HEADER_SIZE], b[HEADER_SIZE:])


@given(message=st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(host_key: bytes, message: bytes) -> None:
    try:
        FrameCipher(host_key).open_frame(message)
    except ProtocolError:
        pass


@given(header=st.binary(min_size=0, max_size=20), body=st.binary(max_size=64))
def test_open_with_arbitrary_header_raises_only_protocol_error(
    host_key: bytes, header: bytes, body: bytes
) -> None:
    try:
        FrameCipher(host_key).open(header, body)
    except ProtocolError:
        pass


def test_body_shorter_than_tag(host_key: bytes) -> None:
    header = encode_header(Kind.DATA, seq=1)
    with pytest.raises(DecryptError):
        FrameCipher(host_key).open(header, b"\x00" * (TAG_SIZE - 1))
    with pytest.raises(DecryptError):
        FrameCipher(host_key).open_frame(header)


def test_non_sealed_kinds_are_refused(host_key: bytes) -> None:
    cipher = FrameCipher(host_key)
    heartbeat = encode_header(Kind.HEARTBEAT, seq=9)
    with pytest.raises(ValueError):
        cipher.seal(heartbeat, b"")
    with pytest.raises(ProtocolError) as info:
        cipher.open(heartbeat, b"\x00" * 16)
    assert info.value.code is CloseCode.PROTOCOL_ERROR
    with pytest.raises(ProtocolError):
        cipher.open_frame(encode_header(Kind.CLOSE) + b"\xa0" * 20)
    with pytest.raises(ValueError):
        cipher.seal_frame(Kind.HELLO, b"x", seq=1)


def test_seal_rejects_bad_headers(host_key: bytes) -> None:
    cipher = FrameCipher(host_key)
    with pytest.raises(ValueError):
        cipher.seal(encode_header(Kind.DATA, seq=1) + b"\x00", b"x")  # 13 bytes
    with pytest.raises(ValueError):
        cipher.seal(b"\x01\x01\x00\x00" + bytes(8), b"x")  # DATA seq 0
    with pytest.raises(ValueError):
        cipher.seal_frame(Kind.DATA, b"x", seq=0)
    with pytest.raises(ValueError):
        cipher.seal_frame(Kind.DATA, b"x", seq=1, flags=Flags.UNSEQUENCED)  # DATA can't be unsequenced
    with pytest.raises(ValueError):
        cipher.seal_frame(Kind.CONTROL, b"x", seq=1, channel=2)


def test_max_frame_bounds_the_sealed_message(host_key: bytes) -> None:
    cipher = FrameCipher(host_key)
    biggest = DEFAULT_MAX_FRAME - HEADER_SIZE - TAG_SIZE
    message = cipher.seal_frame(Kind.DATA, bytes(biggest), seq=1)
    assert len(message) == DEFAULT_MAX_FRAME
    assert cipher.open_frame(message)[1] == bytes(biggest)
    with pytest.raises(ValueError):
        cipher.seal_frame(Kind.DATA, bytes(biggest + 1), seq=1)
    with pytest.raises(ProtocolError):
        cipher.open_frame(message, max_frame=DEFAULT_MAX_FRAME - 1)


def test_cipher_key_size_and_repr(host_key: bytes) -> None:
    with pytest.raises(ValueError):
        FrameCipher(bytes(31))
    assert host_key.hex() not in repr(FrameCipher(host_key))
    assert "redacted" in repr(FrameCipher(host_key))
