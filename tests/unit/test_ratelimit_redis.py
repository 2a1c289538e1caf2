"""The Redis backend's Lua bucket against a real redis-server (SPEC §7, issue 9).

The script runs in Redis on Redis's clock, so these tests use real time, with
rates fast enough that a few hundred milliseconds show the refill; the
fallback's clock is injected so an outage needs no waiting.
"""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from hedwig.ratelimit import RETRY_REDIS, LocalLimiter, RedisLimiter
from tests.support.redis_server import RedisServer, shared_redis_url

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def redis_url():
    url = shared_redis_url()
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def limiter(url: str, limits: dict[str, int], default: int | None = None, **kwargs) -> RedisLimiter:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    prefix = f"test-{uuid.uuid4().hex}:"  # every test its own buckets, even on a shared server
    return RedisLimiter(client, prefix, LocalLimiter(default, limits), **kwargs)


def test_the_burst_is_the_limit_then_the_wait_is_one_tokens_time(redis_url):
    lim = limiter(redis_url, {"slow.test": 30})
    assert [lim.take("slow.test") for _ in range(30)] == [0.0] * 30
    wait = lim.take("slow.test")
    assert 1.5 < wait <= 2.0  # 30/min: one token every 2 s
    assert 1.5 < lim.wait("Slow.TEST") <= 2.0  # the same bucket, case-insensitive; wait spends nothing
    assert lim.take("other.test") == 0.0  # no limit for it


def test_wait_spends_nothing(redis_url):
    lim = limiter(redis_url, {"a.test": 2})
    for _ in range(5):
        assert lim.wait("a.test") == 0.0
    assert lim.take("a.test") == 0.0 and lim.take("a.test") == 0.0
    assert lim.take("a.test") > 0.0


def test_tokens_come_back_at_the_rate(redis_url):
    lim = limiter(redis_url, {"fast.test": 6000})  # 100 per second
    while lim.take("fast.test") == 0.0:
        pass
    time.sleep(0.3)
    got = 0
    while lim.take("fast.test") == 0.0:
        got += 1
    assert 20 <= got <= 45, got  # ~30 refilled in 0.3 s (plus the time the loop took)


def test_default_limit_and_unlimited(redis_url):
    lim = limiter(redis_url, {"free.test": 0}, default=3)
    assert [lim.take("x.test") for _ in range(3)] == [0.0] * 3 and lim.take("x.test") > 0
    assert all(lim.take("free.test") == 0.0 for _ in range(50))


def test_concurrent_callers_never_get_more_than_the_bucket_holds(redis_url):
    lim_a = limiter(redis_url, {"busy.test": 60})
    lim_b = RedisLimiter(redis.Redis.from_url(redis_url), lim_a.key_prefix,
                         LocalLimiter(None, {"busy.test": 60}))
    granted = []
    lock = threading.Lock()
    start = time.monotonic()

    def hammer(lim: RedisLimiter) -> None:
        for _ in range(40):
            if lim.take("busy.test") == 0.0:
                with lock:
                    granted.append(time.monotonic())

    threads = [threading.Thread(target=hammer, args=(lim_a if i % 2 else lim_b,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - start
    # 400 tries from two clients: the burst (60) plus one per second of the run, never more.
    assert 60 <= len(granted) <= 60 + int(elapsed) + 1, (len(granted), elapsed)


def test_an_unreachable_redis_falls_back_to_local_limits_and_comes_back(redis_url):
    events = []
    now = [1000.0]
    server = RedisServer()
    lim = RedisLimiter(redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5),
                       f"test-{uuid.uuid4().hex}:", LocalLimiter(None, {"d.test": 3}, clock=lambda: now[0]),
                       clock=lambda: now[0], on_fallback=events.append)
    # Redis is down: the local bucket (3) decides, one warning, the metric hook once.
    assert [lim.take("d.test") for _ in range(3)] == [0.0] * 3
    assert lim.take("d.test") > 0.0
    assert events == [True]
    with server:
        assert lim.take("d.test") > 0.0  # not asked again before RETRY_REDIS
        now[0] += RETRY_REDIS
        assert lim.take("d.test") == 0.0  # Redis's own bucket, full
        assert events == [True, False]
        client = redis.Redis.from_url(server.url)
        assert client.exists(lim.key_prefix + "ratelimit:d.test")
