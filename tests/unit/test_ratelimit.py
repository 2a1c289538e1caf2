"""Token buckets and the local limiter on a fake clock: no sleeping."""

from __future__ import annotations

import pytest

from hedwig.ratelimit import LocalLimiter, TokenBucket, Unlimited

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_bucket_starts_full_and_bursts_to_capacity():
    b = TokenBucket(capacity=30, rate=0.5, now=0.0)
    assert [b.take(0.0) for _ in range(30)] == [0.0] * 30
    assert b.take(0.0) == pytest.approx(2.0)  # 30/min: the next token in 2 s


def test_wait_spends_nothing_and_refill_is_continuous():
    b = TokenBucket(capacity=2, rate=1.0, now=0.0)
    b.take(0.0), b.take(0.0)
    assert b.wait(0.25) == pytest.approx(0.75)
    assert b.wait(0.25) == pytest.approx(0.75)  # peeking twice costs nothing
    assert b.take(1.0) == 0.0
    assert b.take(1.0) == pytest.approx(1.0)
    assert b.take(10.0) == 0.0 and b.take(10.0) == 0.0  # refilled, but never above capacity
    assert b.take(10.0) > 0


def test_limits_per_domain_case_insensitive_default_and_unlimited():
    clock = Clock()
    lim = LocalLimiter(default_limit=2, domain_limits={"Slow.Test": 1, "free.test": 0}, clock=clock)
    assert lim.limit_for("SLOW.test") == 1 and lim.limit_for("other.test") == 2
    assert lim.take("slow.TEST") == 0.0
    assert lim.take("slow.test") == pytest.approx(60.0)
    assert [lim.take("free.test") for _ in range(100)] == [0.0] * 100  # 0 = unlimited
    assert lim.take("other.test") == 0.0 and lim.take("other.test") == 0.0
    assert lim.take("other.test") == pytest.approx(30.0)
    clock.now += 30
    assert lim.take("other.test") == 0.0  # other domains are not slowed by slow.test


def test_no_default_means_unlimited():
    lim = LocalLimiter(default_limit=None, domain_limits={"slow.test": 6}, clock=Clock())
    assert all(lim.take("x.test") == 0.0 for _ in range(1000))


def test_workers_split_the_limit():
    clock = Clock()
    lim = LocalLimiter(default_limit=None, domain_limits={"slow.test": 30}, workers=2, clock=clock)
    assert sum(lim.take("slow.test") == 0.0 for _ in range(100)) == 15  # half the burst each
    clock.now += 60
    assert sum(lim.take("slow.test") == 0.0 for _ in range(100)) == 15  # half the rate each


def test_unlimited():
    assert Unlimited().take("x") == 0.0 and Unlimited().wait("x") == 0.0
