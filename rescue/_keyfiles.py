"""Key files on disk: the only place keys are read from files (``rescue.protocol`` does no I/O).

``rescue keygen`` writes a private Ed25519 JWK; ``rescue relay --keys`` and the token service read
JWK sets or single JWKs. Parsing and validation are the protocol's (:class:`SigningKey`,
:class:`KeyRing`, pure); this module only reads the bytes, bounded, and turns every failure into
a one-line :class:`~rescue.errors.ConfigError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from rescue.errors import ConfigError
from rescue.protocol import KeyRing, SigningKey, VerifyKey

__all__ = ["MAX_KEY_FILE_SIZE", "load_keyring", "load_signing_key"]
# Key files and JWK sets are small; 1 MiB holds thousands of retired keys and bounds what we read.
MAX_KEY_FILE_SIZE: Final = 1 << 20


def _read_json(path: str | os.PathLike[str], what: str) -> Any:
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = f.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise ConfigError(f"{what} {p} is larger than {MAX_KEY_FILE_SIZE} bytes")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{what} {p} is not valid JSON: {str(exc).splitlines()[0]}") from None


def load_signing_key(path: str | os.PathLike[str]) -> SigningKey:
    """Read a private Ed25519 JWK file (as written by ``rescue keygen``).

    Raises:
        ConfigError: unreadable, not JSON, or not a valid private Ed25519 JWK (one-line message).
    """
    return SigningKey.from_jwk(_read_json(path, "key file"), where=f"key file {path}")


def load_keyring(path: str | os.PathLike[str]) -> KeyRing:
    """Read verification keys: a JWK set file, a single public JWK, or a private JWK file (whose
    public part is used).

    Raises:
        ConfigError: unreadable, not JSON, or not valid keys (one-line message).
    """
    doc = _read_json(path, "key file")
    if isinstance(doc, Mapping) and "keys" in doc:
        try:
            return KeyRing.from_jwks(doc)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return KeyRing([VerifyKey.from_jwk(doc, where=f"key file {path}")])
