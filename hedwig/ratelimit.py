"""Per-destination-domain rate limits: token buckets over an injected clock.

SPEC §7: a bucket per destination domain, refilled continuously at
`limit / 60` tokens per second, holding at most `limit` (the burst). A
message whose domain has no token waits (delivery asks again when the token
is due); that wait is not an attempt and holds no delivery greenlet.

With `workers = N` each worker enforces `limit / N` (burst and rate, at least
one token of burst), so the N processes together stay within the limit
without sharing state. A backend with shared state (Redis) implements the
same two calls, `wait(domain)` and `take(domain)`.

Must not: do I/O (the local backend), sleep, or read the wall clock itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Protocol

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


def make_limiter(rate_limits, workers: int = 1) -> Limiter:  # type: ignore[no-untyped-def]
    """The limiter `[server.rate_limits]` asks for."""
    if not rate_limits.enabled:
        return Unlimited()
    if rate_limits.backend != "local":
        log.warning("rate_limits.backend = %r is not supported by this version yet: "
                    "enforcing the limits per process", rate_limits.backend)
    return LocalLimiter(rate_limits.default_limit, rate_limits.domain_limits, workers)
