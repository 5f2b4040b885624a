"""Pure parts of the relay: token bucket, per-source handshake limiter, config validation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rescue.relay import RelayConfig
from rescue.sessions import HandshakeLimiter, SessionLimits, TokenBucket

_times = st.lists(st.floats(0, 30, allow_nan=False), min_size=1, max_size=200).map(sorted)


@given(rate=st.floats(0.5, 1000), capacity=st.floats(1, 1000), times=_times)
def test_bucket_never_grants_more_than_capacity_plus_refill(
    rate: float, capacity: float, times: list[float]
) -> None:
    bucket = TokenBucket(rate, capacity, now=0.0)
    granted = sum(bucket.try_take(t) for t in times)
    assert granted <= capacity + rate * times[-1] + 1e-6


@given(
    rate=st.floats(1, 1e6), capacity=st.floats(1, 1e6), sizes=st.lists(st.integers(1, 100_000), max_size=50)
)
def test_bucket_debt_model_long_run_rate(rate: float, capacity: float, sizes: list[int]) -> None:
    """Consuming and then waiting the returned delay never exceeds ``rate`` beyond the burst."""
    bucket = TokenBucket(rate, capacity, now=0.0)
    now = 0.0
    for size in sizes:
        now += bucket.consume(size, now)  # wait off the debt before the next consumption
    assert sum(sizes) <= capacity + rate * now + max(sizes, default=0) + 1e-6 * (1 + sum(sizes))


def test_bucket_refills() -> None:
    bucket = TokenBucket(10, 10, now=0)
    assert bucket.consume(30, 0) == pytest.approx(2.0)
    assert bucket.tokens(2.0) == pytest.approx(0.0)
    assert bucket.tokens(100.0) == 10
    with pytest.raises(ValueError):
        TokenBucket(0, 1, now=0)


@given(
    per_minute=st.integers(1, 100),
    events=st.lists(st.tuples(st.integers(0, 30), st.floats(0, 600, allow_nan=False)), max_size=300),
    max_sources=st.integers(1, 40),
)
def test_limiter_bounds_table_and_rate(
    per_minute: int, events: list[tuple[int, float]], max_sources: int
) -> None:
    limiter = HandshakeLimiter(per_minute, max_sources=max_sources)
    allowed: dict[int, list[float]] = {}
    for source, t in sorted(events, key=lambda e: e[1]):
        if limiter.allow(f"10.0.0.{source}", t):
            allowed.setdefault(source, []).append(t)
        assert len(limiter) <= max_sources
    if max_sources >= 31:  # nobody was forgotten: each source stays within burst + refill
        for times in allowed.values():
            assert len(times) <= per_minute + per_minute / 60 * (times[-1] - times[0]) + 1e-6


def test_limiter_limits_one_source_and_forgets_idle_ones() -> None:
    limiter = HandshakeLimiter(3, max_sources=100)
    assert [limiter.allow("a", 0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("b", 0)  # other sources are independent
    assert limiter.allow("a", 20)  # one token back after 20 s at 3/min
    assert not limiter.allow("a", 20)
    for t in range(100, 110):  # once full again, entries are pruned by later calls
        limiter.allow("c", t)
    assert len(limiter) == 1


def test_limiter_disabled() -> None:
    limiter = HandshakeLimiter(0)
    assert all(limiter.allow("a", 0) for _ in range(1000))
    assert len(limiter) == 0


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="keys is required"):
        RelayConfig()
    with pytest.raises(ValueError, match="go together"):
        RelayConfig(keys="k", tls_cert="c")
    with pytest.raises(ValueError, match="heartbeat_s"):
        RelayConfig(keys="k", heartbeat_s=0)
    with pytest.raises(ValueError, match="drain_s"):
        RelayConfig(keys="k", drain_s=0)
    with pytest.raises(ValueError):
        SessionLimits(max_frame=100)
    config = RelayConfig(token_service="http://ts:8080/")
    assert config.keys_source == "http://ts:8080/v1/fallback/keys"
    assert config.session_limits().liveness_timeout_s == 45
    assert config.replace(port=0).port == 0
