"""Key rotation: retired keys stay published until every token they signed has expired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rescue.errors import ConfigError, TokenError
from rescue.protocol import CLOCK_SKEW, MAX_TTL, KeyRing, SigningKey, mint_token, verify_token
from rescue.tokenservice import PublishedKeys, RetiredKey, load_retired_keys

T0 = 1_700_000_000.0


def test_token_signed_by_retired_key_verifies_with_published_set() -> None:
    old, new = SigningKey.generate(), SigningKey.generate()
    # the last token the old key signed, just before it was retired at T0
    last_old_token = mint_token(old, session_id="s", role="host", now=T0 - 0.5, ttl=MAX_TTL)
    keys = PublishedKeys(new, [RetiredKey(old.verify_key, retired_at=T0)])
    new_token = mint_token(new, session_id="s", role="guest", now=T0, ttl=MAX_TTL)

    def published(at: float) -> KeyRing:
        # what a relay gets from GET /v1/fallback/keys (round-tripped through JSON)
        return KeyRing.from_jwks(json.loads(json.dumps(keys.jwks(now=at))))

    # at every moment the old token is still acceptable, its key is published
    for at in (T0, T0 + 100, T0 + MAX_TTL + CLOCK_SKEW - 1.5):
        ring = published(at)
        assert verify_token(last_old_token, ring, now=at).role == "host"
        assert verify_token(new_token, ring, now=min(at, T0 + MAX_TTL)).role == "guest"
    # once it can no longer be accepted anyway, the retired key is dropped
    late = T0 + MAX_TTL + CLOCK_SKEW
    assert [k.kid for k in published(late)] == [new.kid]
    with pytest.raises(TokenError):
        verify_token(last_old_token, published(late), now=late)


def test_current_key_first_and_duplicates_removed() -> None:
    key, old = SigningKey.generate(), SigningKey.generate()
    keys = PublishedKeys(
        key, [RetiredKey(key.verify_key, T0), RetiredKey(old.verify_key, T0), RetiredKey(old.verify_key, T0)]
    )
    assert [k["kid"] for k in keys.jwks(now=T0)["keys"]] == [key.kid_text, old.kid_text]
    assert all("d" not in k for k in keys.jwks(now=T0)["keys"])


def test_load_retired_keys(tmp_path: Path) -> None:
    private = SigningKey.generate()
    public = SigningKey.generate()
    (tmp_path / "a.jwk").write_text(json.dumps(private.to_jwk(private=True)))
    (tmp_path / "b.json").write_text(json.dumps({"keys": [public.public_jwk()], "retired_at": T0 - 60}))
    loaded = load_retired_keys([str(tmp_path / "a.jwk"), str(tmp_path / "b.json")], default_retired_at=T0)
    assert [(r.key, r.retired_at) for r in loaded] == [(private.verify_key, T0), (public.verify_key, T0 - 60)]
    (tmp_path / "c.json").write_text(json.dumps({"keys": [public.public_jwk()], "retired_at": "yesterday"}))
    with pytest.raises(ConfigError):
        load_retired_keys([str(tmp_path / "c.json")], default_retired_at=T0)
    (tmp_path / "d.json").write_text("nope")
    with pytest.raises(ConfigError):
        load_retired_keys([str(tmp_path / "d.json")], default_retired_at=T0)
