"""The token service's keys: the current signing key and retired keys still being published.

A retired key stays in ``GET /v1/fallback/keys`` until every token it can have signed has expired:
``retired_at + MAX_TTL + CLOCK_SKEW`` (SPEC §3). ``retired_at`` is the ``"retired_at"`` member (epoch
seconds) of the retired key's JWK/JWK-set file when present, else the moment this process loaded it
— while old replicas may still sign with that key, they publish it themselves as their current key.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from rescue._keyfiles import load_keyring
from rescue.errors import ConfigError
from rescue.protocol import CLOCK_SKEW, MAX_TTL, KeyRing, SigningKey, VerifyKey

__all__ = ["PublishedKeys", "RetiredKey", "load_retired_keys"]

# The longest a token signed just before retirement can still be accepted by a relay.
RETIRED_KEY_GRACE_S = MAX_TTL + CLOCK_SKEW


@dataclass(frozen=True, slots=True)
class RetiredKey:
    """A verification key that no longer signs, and when it stopped (epoch seconds)."""

    key: VerifyKey
    retired_at: float

    @property
    def published_until(self) -> float:
        return self.retired_at + RETIRED_KEY_GRACE_S


def load_retired_keys(paths: Iterable[str], *, default_retired_at: float) -> list[RetiredKey]:
    """Read retired keys (JWK set, public JWK, or private JWK files).

    Raises:
        ConfigError: a file is unreadable or holds no valid keys, or ``retired_at`` is malformed.
    """
    out: list[RetiredKey] = []
    for path in paths:
        ring = load_keyring(path)  # validates size, JSON and keys
        retired_at = default_retired_at
        doc = json.loads(Path(path).read_bytes())
        if isinstance(doc, dict) and "retired_at" in doc:
            value = doc["retired_at"]
            if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{path}: 'retired_at' must be epoch seconds")
            retired_at = float(value)
        out.extend(RetiredKey(key, retired_at) for key in ring)
    return out


class PublishedKeys:
    """The signing key and the key set relays verify with.

    Args:
        signing_key: signs every new token.
        retired: keys that signed tokens before; dropped once their grace has passed.
    """

    def __init__(self, signing_key: SigningKey, retired: Iterable[RetiredKey] = ()) -> None:
        self.signing_key = signing_key
        self.retired = [r for r in retired if r.key.kid != signing_key.kid]

    def verify_keys(self, *, now: float) -> list[VerifyKey]:
        """Current key first, then retired keys still in their grace period."""
        keys = [self.signing_key.verify_key]
        seen = {self.signing_key.kid}
        for r in self.retired:
            if now < r.published_until and r.key.kid not in seen:
                keys.append(r.key)
                seen.add(r.key.kid)
        return keys

    def keyring(self, *, now: float) -> KeyRing:
        return KeyRing(self.verify_keys(now=now))

    def jwks(self, *, now: float) -> dict[str, list[dict[str, str]]]:
        """The JWK set document for ``GET /v1/fallback/keys``."""
        return self.keyring(now=now).to_jwks()
