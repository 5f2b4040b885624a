"""Session tags are keyed (issue #11): a log reader can't recover a guessable session id.

The unkeyed tag was ``blake2b(session_id, digest_size=6)``: anyone holding the logs hashed
candidate ids until one matched. Now the tag is keyed with the deployment's ``RESCUE_LOG_TAG_KEY``
(a random per-process key when unset). Checked here: the tag depends on the key, is stable under
one key, is never the unkeyed hash; the environment variable is read by the servers' startup
(``configure_session_tags``) and lazily by anyone else; a too-short key is refused. That a real
relay and a real token service of one deployment tag a session alike is in
``tests/test_tracing_e2e.py`` (both processes' spans are matched by the tag this process computes
with the same key).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue import _log
from rescue._log import (
    LOG_TAG_KEY_ENV,
    configure_logging,
    configure_session_tags,
    session_tag,
    set_session_tag_key,
)
from rescue.errors import ConfigError

KEY_A = "deployment-a-0123456789abcdef"
KEY_B = "deployment-b-0123456789abcdef"


@pytest.fixture(autouse=True)
def _restore_tag_key() -> Iterator[None]:
    saved = _log._tag_key
    yield
    _log._tag_key = saved


def unkeyed(session_id: str) -> str:
    return hashlib.blake2b(session_id.encode(), digest_size=6).hexdigest()


@given(st.text(min_size=1, max_size=128))
def test_tags_depend_on_the_key_and_never_equal_the_unkeyed_hash(session_id: str) -> None:
    set_session_tag_key(KEY_A)
    under_a = session_tag(session_id)
    assert session_tag(session_id) == under_a  # stable under one key
    set_session_tag_key(KEY_B)
    under_b = session_tag(session_id)
    assert under_a != under_b
    assert unkeyed(session_id) not in (under_a, under_b)
    assert len(under_a) == len(under_b) == 12


def test_a_guessable_id_is_not_recovered_by_hashing_candidates() -> None:
    set_session_tag_key(KEY_A)
    tag = session_tag("session-42")
    # the attack the unkeyed tag allowed: hash every candidate, look for the tag
    assert [n for n in range(1000) if unkeyed(f"session-{n}") == tag] == []


def test_processes_with_one_key_agree_and_random_keys_do_not() -> None:
    set_session_tag_key(KEY_A)
    first = session_tag("sess-1")
    set_session_tag_key(KEY_A)  # another process of the same deployment
    assert session_tag("sess-1") == first
    set_session_tag_key(None)
    random_1 = session_tag("sess-1")
    set_session_tag_key(None)
    assert session_tag("sess-1") != random_1
    assert first != random_1


def test_surrounding_whitespace_is_not_part_of_the_key() -> None:
    set_session_tag_key(KEY_A)
    tag = session_tag("s")
    set_session_tag_key(f"  {KEY_A}\n")  # a Secret mounted with a trailing newline
    assert session_tag("s") == tag


def test_short_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match=LOG_TAG_KEY_ENV):
        set_session_tag_key("short")
    with pytest.raises(ConfigError):
        configure_session_tags({LOG_TAG_KEY_ENV: "x" * 15})


def test_configure_reads_the_env_and_warns_only_when_unset() -> None:
    root = logging.getLogger("rescue")
    saved = (root.handlers[:], root.level, root.propagate)
    stream = io.StringIO()
    configure_logging("INFO", stream)
    try:
        assert configure_session_tags({LOG_TAG_KEY_ENV: KEY_A}, component="relay") is True
        keyed = session_tag("sess-1")
        assert stream.getvalue() == ""
        assert configure_session_tags({}, component="token-service") is False
        assert session_tag("sess-1") != keyed
    finally:
        root.handlers[:], root.level, root.propagate = saved
    (line,) = stream.getvalue().splitlines()
    doc = json.loads(line)
    assert (doc["event"], doc["level"], doc["component"]) == (
        "log.session_tag_key_missing",
        "warning",
        "token-service",
    )
    assert LOG_TAG_KEY_ENV in doc["detail"]
    set_session_tag_key(KEY_A)
    assert session_tag("sess-1") == keyed


def test_unconfigured_processes_read_the_env_on_first_use(monkeypatch: pytest.MonkeyPatch) -> None:
    set_session_tag_key(KEY_B)
    expected = session_tag("sess-1")
    monkeypatch.setenv(LOG_TAG_KEY_ENV, KEY_B)
    _log._tag_key = None  # a fresh process that never called configure_session_tags
    assert session_tag("sess-1") == expected
