"""Decoded-CBOR shapes across cbor2 majors: tokens and messages accept what every allowed cbor2 gives.

cbor2 5.x decodes every array to a ``list`` and every map to a ``dict``; cbor2 6.x decodes what sits
inside a tag immutable (``tuple``, ``cbor2.frozendict``). A token is a tagged array (COSE_Sign1, tag
18), so with cbor2 6 the verifier once rejected every token ("COSE_Sign1 must be an array of 4
items"). These tests run on whichever cbor2 is installed (the dev venv has 5.x, because ``cwt`` caps
it; the range jobs in ``.ci/run`` run this file on the lowest and the newest allowed cbor2), and they
also feed the immutable shapes directly, so both shapes are checked on either major.
"""

from __future__ import annotations

import types
from typing import Any

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import ProtocolError, TokenError
from rescue.protocol import Caps
from rescue.protocol._messages import is_cbor_array, is_cbor_map
from rescue.protocol._tokens import (
    Claims,
    KeyRing,
    SigningKey,
    _envelope_parts,
    mint_token,
    verify_token,
)

NOW = 1_700_000_000.0
KEY = SigningKey(bytes(range(32)))
RING = KeyRing([KEY])


def _frozen_map(items: dict[Any, Any]) -> Any:
    """The immutable mapping the installed cbor2 itself uses (6.x ``frozendict``, 5.x ``FrozenDict``)."""
    frozen = getattr(cbor2, "frozendict", None) or getattr(cbor2, "FrozenDict", None)
    return frozen(items) if frozen is not None else types.MappingProxyType(items)


def freeze(value: Any) -> Any:
    """``value`` as cbor2 6.x decodes it inside a tag: arrays as tuples, maps immutable, all the way down."""
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, freeze(value.value))
    if isinstance(value, list | tuple):
        return tuple(freeze(item) for item in value)
    if isinstance(value, dict):
        return _frozen_map({key: freeze(item) for key, item in value.items()})
    return value


def thaw(value: Any) -> Any:
    """``value`` as cbor2 5.x decodes it: lists and dicts everywhere."""
    if isinstance(value, cbor2.CBORTag):
        return cbor2.CBORTag(value.tag, thaw(value.value))
    if isinstance(value, list | tuple):
        return [thaw(item) for item in value]
    if is_cbor_map(value):
        return {key: thaw(item) for key, item in value.items()}
    return value


def _mint(**overrides: Any) -> bytes:
    args: dict[str, Any] = {"session_id": "sess-1", "role": "host", "now": NOW, **overrides}
    return mint_token(KEY, **args)


def test_minted_token_verifies_on_the_installed_cbor2() -> None:
    # The bug as a user met it: mint, then verify, with whatever cbor2 pip resolved.
    token = _mint()
    outer = cbor2.loads(token)
    assert is_cbor_array(outer.value), (
        f"cbor2 {_cbor2_version()} decoded the COSE_Sign1 body as {outer.value!r}"
    )
    claims = verify_token(token, RING, now=NOW)
    assert claims.sid == "sess-1"
    assert claims.role == "host"


def _cbor2_version() -> str:
    from importlib.metadata import version

    return version("cbor2")


@given(
    session=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True),
    role=st.sampled_from(["host", "guest"]),
    ttl=st.integers(1, 300),
    fb=st.integers(0, 2**16),
    cwt_wrapped=st.booleans(),
)
def test_envelope_reads_the_same_from_mutable_and_immutable_decodings(
    session: str, role: str, ttl: int, fb: int, cwt_wrapped: bool
) -> None:
    decoded = cbor2.loads(_mint(session_id=session, role=role, ttl=ttl, fb=fb))
    if cwt_wrapped:
        decoded = cbor2.CBORTag(61, decoded)
    as_5x = _envelope_parts(thaw(decoded))
    as_6x = _envelope_parts(freeze(decoded))
    assert as_5x == as_6x
    _protected, kid, payload, _signature = as_6x
    assert kid == KEY.kid
    assert Claims.from_cbor_map(freeze(cbor2.loads(payload))) == Claims.from_cbor_map(cbor2.loads(payload))


@pytest.mark.parametrize("shape", [freeze, thaw], ids=["tuple", "list"])
def test_envelope_still_rejects_wrong_arity_and_non_map_headers(shape: Any) -> None:
    protected, unprotected, payload, signature = cbor2.loads(_mint()).value
    three = cbor2.CBORTag(18, [protected, unprotected, payload])
    with pytest.raises(TokenError, match="array of 4 items"):
        _envelope_parts(shape(three))
    list_header = cbor2.CBORTag(18, [protected, [1], payload, signature])
    with pytest.raises(TokenError, match="unprotected header must be a map"):
        _envelope_parts(shape(list_header))
    with pytest.raises(TokenError, match="tagged COSE_Sign1"):
        _envelope_parts(shape([protected, unprotected, payload, signature]))


def test_claims_map_may_be_immutable() -> None:
    claims = cbor2.loads(cbor2.loads(_mint(cohort="beta")).value[2])
    assert Claims.from_cbor_map(freeze(claims)).cohort == "beta"
    with pytest.raises(TokenError, match="not a CBOR map"):
        Claims.from_cbor_map(freeze(list(claims.items())))


def test_caps_accept_a_tuple_or_a_list_and_an_immutable_map() -> None:
    for value in ({"compression": ["zlib", "zstd"]}, freeze({"compression": ["zlib", "zstd"]})):
        assert Caps.from_cbor(value) == Caps(compression=("zlib", "zstd"))
    with pytest.raises(ProtocolError, match=r"caps\.compression must be a list"):
        Caps.from_cbor({"compression": "zlib"})
    with pytest.raises(ProtocolError, match="must be a CBOR map"):
        Caps.from_cbor(freeze(["zlib"]))


def test_jwk_set_keys_may_be_a_tuple() -> None:
    ring = KeyRing.from_jwks({"keys": (KEY.public_jwk(),)})
    assert KEY.kid in ring
