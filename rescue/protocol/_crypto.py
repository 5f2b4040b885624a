"""End-to-end frame encryption between the two peers (SPEC §2 "End-to-end encryption").

The relay never holds a key: it forwards CONTROL and DATA bodies byte for byte. The peers derive

1. ``psk = Argon2id(passphrase, salt)``, ``salt = BLAKE2b-512(session_id ‖ "beach-salt")[:16]``,
   libsodium "interactive" limits, 32 bytes (:func:`derive_psk`);
2. one key per sending connection, ``HKDF-SHA256(ikm=psk, salt=session_id,
   info="beach-rescue/v1/frame" ‖ role ‖ nonce)``, 32 bytes (:func:`derive_frame_key`);
3. ChaCha20-Poly1305 (IETF) with nonce ``u32 space ‖ u64 seq`` (big-endian; space 0 for sequenced
   frames, 1 for UNSEQUENCED CONTROL) and the 12-byte header as associated data (:class:`FrameCipher`).

Exact byte layouts are in ``docs/protocol.md``; known-answer vectors in
``tests/vectors/crypto.json``.

Invariant the caller (the ordered stream) must keep: under one key, one ``(space, seq)`` pair only
ever seals the same header and plaintext. A retransmit under the key it was first sent with must
therefore be byte-identical (it then yields the same ciphertext and leaks nothing); anything else
reuses a ChaCha20 nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

import nacl.bindings
import nacl.exceptions
import nacl.pwhash.argon2id

from rescue._codes import CloseCode
from rescue.errors import ProtocolError
from rescue.protocol._frames import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    Flags,
    Header,
    Kind,
    decode_frame,
    decode_header,
    encode_header,
)

__all__ = [
    "FRAME_INFO_PREFIX",
    "KEY_SIZE",
    "NONCE_SIZE",
    "PEER_NONCE_SIZE",
    "PSK_SIZE",
    "SALT_SUFFIX",
    "TAG_SIZE",
    "DecryptError",
    "FrameCipher",
    "aead_nonce",
    "derive_frame_key",
    "derive_psk",
    "hkdf_sha256",
    "psk_salt",
]

PSK_SIZE: Final = 32
KEY_SIZE: Final = 32  # ChaCha20-Poly1305 key
NONCE_SIZE: Final = 12  # ChaCha20-Poly1305 IETF nonce: u32 space ‖ u64 seq
TAG_SIZE: Final = 16  # Poly1305 tag appended to every ciphertext
PEER_NONCE_SIZE: Final = 16  # the HELLO nonce, fresh per connection (SPEC §2)
SALT_SUFFIX: Final = b"beach-salt"
FRAME_INFO_PREFIX: Final = b"beach-rescue/v1/frame"
ROLES: Final = ("host", "guest")

_ARGON2_SALT_SIZE: Final = 16  # libsodium crypto_pwhash_SALTBYTES
_SPACE_SEQUENCED: Final = 0
_SPACE_UNSEQUENCED: Final = 1
_NONCE: Final = struct.Struct(">IQ")
_HKDF_HASH_SIZE: Final = 32
_HKDF_MAX_LENGTH: Final = 255 * _HKDF_HASH_SIZE  # RFC 5869 §2.3
_SEALED_KINDS: Final = frozenset({Kind.CONTROL, Kind.DATA})


class DecryptError(ProtocolError):
    """A CONTROL or DATA body failed authentication (wrong key, tampered header or body).

    The code is always ``INTEGRITY_ERROR``. SPEC §2: the receiver drops such a frame and counts it;
    three in a row end the session with that code.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, CloseCode.INTEGRITY_ERROR)


def psk_salt(session_id: str) -> bytes:
    """The Argon2id salt for ``session_id``: ``BLAKE2b-512(utf8(session_id) ‖ b"beach-salt")[:16]``.

    BLAKE2b with its default 64-byte digest, no key, no personalisation; the first 16 bytes are used.
    """
    digest = hashlib.blake2b(session_id.encode("utf-8") + SALT_SUFFIX, digest_size=64).digest()
    return digest[:_ARGON2_SALT_SIZE]


def derive_psk(passphrase: str | bytes, session_id: str) -> bytes:
    """Stretch the session passphrase into the 32-byte pre-shared key (slow on purpose).

    Argon2id v1.3 with libsodium's ``crypto_pwhash_OPSLIMIT_INTERACTIVE`` (2 passes) and
    ``crypto_pwhash_MEMLIMIT_INTERACTIVE`` (64 MiB), one lane. A ``str`` passphrase is encoded as
    UTF-8 without any Unicode normalisation. This takes about 0.1 s and 64 MiB: do it once per
    session, and off the event loop (it blocks).

    Args:
        passphrase: the secret both peers know.
        session_id: the session id, which salts the derivation.

    Returns:
        32 bytes.
    """
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    return bytes(
        nacl.pwhash.argon2id.kdf(
            PSK_SIZE,
            secret,
            psk_salt(session_id),
            opslimit=nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE,
            memlimit=nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE,
        )
    )


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF with HMAC-SHA256 (RFC 5869): extract then expand.

    Args:
        ikm: input keying material.
        salt: extract salt; empty means a string of 32 zero bytes, as the RFC says.
        info: context for expand.
        length: output length, 0 … 8160 bytes.

    Raises:
        ValueError: ``length`` out of range.
    """
    if not 0 <= length <= _HKDF_MAX_LENGTH:
        raise ValueError(f"HKDF-SHA256 output length must be 0..{_HKDF_MAX_LENGTH}, not {length}")
    prk = hmac.digest(salt or bytes(_HKDF_HASH_SIZE), ikm, "sha256")
    out = bytearray()
    block = b""
    counter = 1
    while len(out) < length:
        block = hmac.digest(prk, block + info + bytes([counter]), "sha256")
        out += block
        counter += 1
    return bytes(out[:length])


def derive_frame_key(psk: bytes, session_id: str, role: str, nonce: bytes) -> bytes:
    """The key for frames a peer sends on one connection.

    ``HKDF-SHA256(ikm=psk, salt=utf8(session_id), info=b"beach-rescue/v1/frame" ‖ utf8(role) ‖ nonce)``,
    32 bytes. ``role`` and ``nonce`` are the *sender's*: its role and the nonce of its HELLO.

    Args:
        psk: the 32-byte pre-shared key from :func:`derive_psk`.
        session_id: the session id.
        role: the sender's role, ``"host"`` or ``"guest"``.
        nonce: the sender's 16-byte HELLO nonce.

    Raises:
        ValueError: wrong psk or nonce size, or an unknown role.
    """
    if len(psk) != PSK_SIZE:
        raise ValueError(f"psk must be {PSK_SIZE} bytes, not {len(psk)}")
    if role not in ROLES:
        raise ValueError(f"role must be 'host' or 'guest', not {role!r}")
    if len(nonce) != PEER_NONCE_SIZE:
        raise ValueError(f"connection nonce must be {PEER_NONCE_SIZE} bytes, not {len(nonce)}")
    info = FRAME_INFO_PREFIX + role.encode("utf-8") + bytes(nonce)
    return hkdf_sha256(bytes(psk), session_id.encode("utf-8"), info, KEY_SIZE)


def aead_nonce(header: Header) -> bytes:
    """The 12-byte AEAD nonce for a frame: ``u32 space ‖ u64 seq``, big-endian.

    ``space`` is 1 when the header's UNSEQUENCED flag is set and 0 otherwise, so the transport's
    own ack/resume counter and the data sequence never collide under one key.
    """
    space = _SPACE_UNSEQUENCED if header.unsequenced else _SPACE_SEQUENCED
    return _NONCE.pack(space, header.seq)


class FrameCipher:
    """ChaCha20-Poly1305 (IETF) for the frames of one sending connection.

    One instance per direction: the sender seals with the key derived from its own role and nonce,
    the receiver opens with the same key (derived from the partner's role and nonce). Stateless
    apart from the key; ordering and replay are the ordered stream's job.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Wrap a 32-byte key from :func:`derive_frame_key`.

        Raises:
            ValueError: the key is not 32 bytes.
        """
        if len(key) != KEY_SIZE:
            raise ValueError(f"frame key must be {KEY_SIZE} bytes, not {len(key)}")
        self._key = bytes(key)

    def __repr__(self) -> str:
        return "FrameCipher(<key redacted>)"

    def seal(self, header: bytes, plaintext: bytes) -> bytes:
        """Encrypt a body; ``header`` (the 12 header bytes) is authenticated, not encrypted.

        Returns:
            ciphertext ‖ 16-byte tag.

        Raises:
            ValueError: the header is not a valid CONTROL or DATA header.
        """
        if len(header) != HEADER_SIZE:
            raise ValueError(f"header must be exactly {HEADER_SIZE} bytes, not {len(header)}")
        try:
            parsed = decode_header(header)
        except ProtocolError as exc:
            raise ValueError(f"cannot seal under an invalid header: {exc}") from None
        if parsed.kind not in _SEALED_KINDS:
            raise ValueError(f"only CONTROL and DATA bodies are encrypted, not {parsed.kind.name}")
        return bytes(
            nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
                bytes(plaintext), bytes(header), aead_nonce(parsed), self._key
            )
        )

    def open(self, header: bytes, ciphertext: bytes) -> bytes:
        """Authenticate and decrypt a body received under ``header``.

        Raises:
            ProtocolError: the header itself is invalid (``PROTOCOL_ERROR``).
            DecryptError: authentication failed (``INTEGRITY_ERROR``): wrong key, a changed header
                or body, or a body shorter than the tag.
        """
        if len(header) != HEADER_SIZE:
            raise ProtocolError(f"header must be exactly {HEADER_SIZE} bytes, not {len(header)}")
        parsed = decode_header(header)
        if parsed.kind not in _SEALED_KINDS:
            raise ProtocolError(f"{parsed.kind.name} frames carry no encrypted body")
        return self._open(parsed, bytes(header), ciphertext)

    def _open(self, parsed: Header, header: bytes, ciphertext: bytes) -> bytes:
        if len(ciphertext) < TAG_SIZE:
            raise DecryptError(f"{parsed.kind.name} body of {len(ciphertext)} bytes is shorter than the tag")
        try:
            plaintext = nacl.bindings.crypto_aead_chacha20poly1305_ietf_decrypt(
                bytes(ciphertext), header, aead_nonce(parsed), self._key
            )
        except nacl.exceptions.CryptoError:
            raise DecryptError(f"{parsed.kind.name} seq {parsed.seq} failed authentication") from None
        return bytes(plaintext)

    def seal_frame(
        self,
        kind: Kind,
        payload: bytes,
        *,
        seq: int,
        channel: int = 0,
        flags: Flags = Flags.NONE,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> bytes:
        """Build one whole sealed message: header ‖ AEAD(payload).

        Args:
            kind: ``Kind.CONTROL`` or ``Kind.DATA``.
            payload: the plaintext body (for CONTROL, the encoded CBOR map).
            seq: the sequence number (or the UNSEQUENCED counter), ≥ 1.
            channel: DATA channel; 0 for CONTROL.
            flags: ``Flags.COMPRESSED`` and/or (CONTROL only) ``Flags.UNSEQUENCED``.
            max_frame: the negotiated message limit; the sealed message must fit in it.

        Raises:
            ValueError: an invalid header combination, or a message over ``max_frame``.
        """
        size = HEADER_SIZE + len(payload) + TAG_SIZE
        if size > max_frame:
            raise ValueError(f"sealed message of {size} bytes exceeds max_frame {max_frame}")
        try:
            header = encode_header(kind, flags=flags, channel=channel, seq=seq)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        return header + self.seal(header, payload)

    def open_frame(self, message: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[Header, bytes]:
        """Parse and decrypt one whole CONTROL or DATA message.

        Returns:
            the parsed header and the plaintext body.

        Raises:
            ProtocolError: invalid header, oversize message, or a kind that is not CONTROL/DATA.
            DecryptError: authentication failed (``INTEGRITY_ERROR``).
        """
        frame = decode_frame(message, max_frame=max_frame)
        if frame.header.kind not in _SEALED_KINDS:
            raise ProtocolError(f"{frame.header.kind.name} frames carry no encrypted body")
        return frame.header, self._open(frame.header, bytes(message[:HEADER_SIZE]), frame.body)
