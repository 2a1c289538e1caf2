"""Per-destination-domain rate limits: token buckets over an injected clock.

SPEC §7: a bucket per destination domain, refilled continuously at
`limit / 60` tokens per second, holding at most `limit` (the burst). A
message whose domain has no token waits (delivery asks again when the token
is due); that wait is not an attempt and holds no delivery greenlet.

With `workers = N` each worker enforces `limit / N` (burst and rate, at least
one token of burst), so the N processes together stay within the limit
without sharing state.

`backend = "redis"` (`RedisLimiter`) keeps the same bucket per domain in
Redis, shared by every worker of every node: one Lua script (registered once,
one round trip per decision) refills and spends it atomically on the Redis
server's clock, so nodes with skewed clocks still share one budget. When
Redis cannot be reached, delivery goes on under a `LocalLimiter` (this node's
share, split across its workers as for the local backend), a warning is logged
once per outage, `hedwig_ratelimit_fallback` is 1, and Redis is tried again
after RETRY_REDIS seconds; the shared buckets resume when it answers.

Must not: sleep, read the wall clock itself, or let a Redis failure stop or
bounce a message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from . import metrics

log = logging.getLogger(__name__)


class TokenBucket:
    """`capacity` tokens at most, `rate` tokens per second, full at the start."""

    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until a token is available (0.0: one is there now). Spends nothing."""
        self._refill(now)
        if self.tokens >= 1.0:
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> float:
        """Spend a token if there is one (returns 0.0); else the wait, spending nothing."""
        wait = self.wait(now)
        if wait == 0.0:
            self.tokens -= 1.0
        return wait


class Limiter(Protocol):
    def wait(self, domain: str) -> float: ...

    def take(self, domain: str) -> float: ...


class Unlimited:
    def wait(self, domain: str) -> float:
        return 0.0

    def take(self, domain: str) -> float:
        return 0.0


class LocalLimiter:
    """One bucket per limited domain in this process; the limit split across `workers`."""

    def __init__(self, default_limit: int | None, domain_limits: Mapping[str, int],
                 workers: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.default_limit = default_limit or 0
        self.domain_limits = {d.lower(): n for d, n in domain_limits.items()}
        self.workers = max(workers, 1)
        self.clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def limit_for(self, domain: str) -> int:
        """Messages per minute for `domain` across all workers; 0 = unlimited."""
        return self.domain_limits.get(domain.lower(), self.default_limit)

    def _bucket(self, domain: str) -> TokenBucket | None:
        domain = domain.lower()
        bucket = self._buckets.get(domain)
        if bucket is None:
            limit = self.limit_for(domain)
            if limit <= 0:
                return None
            share = limit / self.workers
            bucket = TokenBucket(max(share, 1.0), share / 60.0, self.clock())
            self._buckets[domain] = bucket
        return bucket

    def wait(self, domain: str) -> float:
        bucket = self._bucket(domain)
        return 0.0 if bucket is None else bucket.wait(self.clock())

    def take(self, domain: str) -> float:
        bucket = self._bucket(domain)
        return 0.0 if bucket is None else bucket.take(self.clock())


# KEYS[1] the domain's bucket; ARGV: capacity, rate (tokens/s), "1" to spend a token.
# Returns the wait in seconds as a string ("0" = a token was there), since Redis
# would truncate a Lua number to an integer.
BUCKET_SCRIPT = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or capacity
local stamp = tonumber(state[2]) or now
if now > stamp then
  tokens = math.min(capacity, tokens + (now - stamp) * rate)
  stamp = now
end
if tokens < 1 then
  return tostring((1 - tokens) / rate)
end
if ARGV[3] == '1' then
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'stamp', tostring(stamp))
  redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
end
return '0'
"""
REDIS_TIMEOUT = 0.5  # seconds for a connection or a decision before falling back
RETRY_REDIS = 1.0  # seconds between tries while Redis is unreachable


class RedisLimiter:
    """Shared buckets in Redis (whole limit, all nodes); `fallback` while Redis is unreachable."""

    def __init__(self, client, key_prefix: str, fallback: LocalLimiter,  # type: ignore[no-untyped-def]
                 clock: Callable[[], float] = time.monotonic, on_fallback: Callable[[bool], None] | None = None) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.fallback = fallback
        self.clock = clock
        self.on_fallback = on_fallback or (lambda down: None)
        self.script = client.register_script(BUCKET_SCRIPT)
        self.down_until = 0.0  # while clock() < this, use the fallback without asking Redis
        self.down = False
        self._due: dict[str, float] = {}  # domain -> when its last refusal said a token is due

    def wait(self, domain: str) -> float:
        """Without a round trip: the wait the last refusal announced, else 0 (take() decides).

        Delivery asks wait() before reading a body and take() before sending;
        answering wait() locally keeps a message at one Redis round trip.
        """
        if self.down and self.clock() < self.down_until:
            return self._decide(domain, take=False)
        due = self._due.get(domain.lower())
        return max(due - self.clock(), 0.0) if due is not None else 0.0

    def take(self, domain: str) -> float:
        wait = self._decide(domain, take=True)
        if wait > 0.0:
            self._due[domain.lower()] = self.clock() + wait
        else:
            self._due.pop(domain.lower(), None)
        return wait

    def _decide(self, domain: str, take: bool) -> float:
        limit = self.fallback.limit_for(domain)  # same limits; only the split differs
        if limit <= 0:
            return 0.0
        local = self.fallback.take if take else self.fallback.wait
        if self.down and self.clock() < self.down_until:
            return local(domain)
        try:
            answer = self.script(keys=[self.key_prefix + "ratelimit:" + domain.lower()],
                                 args=[limit, limit / 60.0, "1" if take else "0"])
        except Exception as exc:  # noqa: BLE001 - any Redis failure: go on under local limits
            if not self.down:
                log.warning("rate limits: Redis unreachable (%s); using this node's local limits until it is back",
                            exc)
                self.down = True
                self.on_fallback(True)
            self.down_until = self.clock() + RETRY_REDIS
            return local(domain)
        if self.down:
            log.warning("rate limits: Redis is back; shared limits again")
            self.down = False
            self.on_fallback(False)
        return float(answer)


def make_limiter(rate_limits, workers: int = 1) -> Limiter:  # type: ignore[no-untyped-def]
    """The limiter `[server.rate_limits]` asks for."""
    if not rate_limits.enabled:
        return Unlimited()
    local = LocalLimiter(rate_limits.default_limit, rate_limits.domain_limits, workers)
    if rate_limits.backend != "redis":
        return local
    import redis  # optional (SPEC): only this backend needs it; checked by config_problem()

    client = redis.Redis.from_url(rate_limits.redis_url, socket_timeout=REDIS_TIMEOUT,
                                  socket_connect_timeout=REDIS_TIMEOUT, health_check_interval=30)
    return RedisLimiter(client, rate_limits.key_prefix, local, on_fallback=lambda down: metrics.ratelimit_fallback.set(1 if down else 0))
