"""``--redis-url`` forms: one server, Redis Cluster, Sentinel (rescue.guardrails._url, decision 0013)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.errors import StoreUnavailable
from rescue.guardrails import RedisStore
from rescue.guardrails._url import RedisKind, RedisTarget, parse_redis_url


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://u:p@h", "unix:///tmp/r.sock?db=2", "REDIS://h"])
def test_one_server_urls_go_to_redis_py_as_given(url: str) -> None:
    assert parse_redis_url(url) == RedisTarget(RedisKind.SINGLE, url=url)


def test_cluster_url_names_seed_nodes() -> None:
    assert parse_redis_url("redis+cluster://10.0.0.1:7000,10.0.0.2,[::1]:7002") == RedisTarget(
        RedisKind.CLUSTER, hosts=(("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    )
    assert parse_redis_url("rediss+cluster://app:s%40cret@h:7000/0") == RedisTarget(
        RedisKind.CLUSTER, hosts=(("h", 7000),), username="app", password="s@cret", tls=True
    )


def test_sentinel_url_names_sentinels_master_and_db() -> None:
    assert parse_redis_url("redis+sentinel://s1:26380,s2/mymaster") == RedisTarget(
        RedisKind.SENTINEL, hosts=(("s1", 26380), ("s2", 26379)), service="mymaster"
    )
    assert parse_redis_url("redis+sentinel://:pw@s1/mymaster/3") == RedisTarget(
        RedisKind.SENTINEL, hosts=(("s1", 26379),), service="mymaster", db=3, password="pw"
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "unknown scheme"),
        ("redis+foo://h", "unknown scheme"),
        ("h:6379", "scheme"),
        ("redis+cluster://h:7000/1", "only database 0"),
        ("redis+cluster://", "host:port"),
        ("redis+cluster://h:0", "bad port"),
        ("redis+cluster://h:x", "bad port"),
        ("redis+cluster://h,", "bad host"),
        ("redis+cluster://h?x=1", "query options"),
        ("redis+sentinel://s1", "master-name"),
        ("redis+sentinel://s1/m/x", "database"),
        ("redis+sentinel://s1/m/0/extra", "master-name"),
    ],
)
def test_bad_urls_say_what_is_wrong(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_redis_url(url)


def test_a_bad_url_never_echoes_the_password() -> None:
    with pytest.raises(ValueError) as info:
        parse_redis_url("redis+cluster://u:hunter2@h:x")
    assert "hunter2" not in str(info.value)


def test_store_refuses_a_bad_url_as_store_unavailable() -> None:
    with pytest.raises(StoreUnavailable, match="bad Redis URL"):
        RedisStore("redis+sentinel://s1")


@given(st.text(max_size=80))
def test_any_text_parses_or_is_a_value_error(text: str) -> None:
    for url in (text, "redis+cluster://" + text, "redis+sentinel://" + text):
        try:
            target = parse_redis_url(url)
        except ValueError:
            continue
        assert target.kind in RedisKind


def test_sentinel_credentials_ride_in_the_query_and_never_in_the_repr() -> None:
    target = parse_redis_url("redis+sentinel://u:data-pw@s1/m?sentinel_username=su&sentinel_password=s%26pw")
    assert (target.password, target.sentinel_username, target.sentinel_password) == ("data-pw", "su", "s&pw")
    assert "pw" not in repr(target)


@pytest.mark.parametrize(
    "url",
    ["redis+sentinel://s1/m?db=2", "redis+cluster://h:1?sentinel_password=x", "redis+sentinel://s1/m#frag"],
)
def test_other_query_options_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)
