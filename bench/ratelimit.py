"""The cost of a rate-limit decision: Redis (one Lua round trip) beside the local bucket.

Starts a private `redis-server` on 127.0.0.1 (Debian's package; no
persistence), then times `take()` for a limited domain with a limit high
enough never to say no, so every call is a full decision:

  local          LocalLimiter.take(): the in-process token bucket
  redis          RedisLimiter.take(): EVALSHA of the bucket script, one round trip
  redis x N      the same from N greenlets at once under gevent (as delivery greenlets
                 call it), to show decisions overlap rather than queue

It reports decisions/s, µs per decision, and Redis's own count of commands
per decision (INFO commandstats: the EVALSHA the client sent, and the
commands the script ran inside Redis), so "one round trip per decision" is
measured, not assumed.

    python bench/ratelimit.py [--decisions 20000] [--greenlets 50] [--write-results]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # a bench entry point, like hedwig/__main__.py: patch first

import argparse  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import redis  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hedwig.ratelimit import LocalLimiter, RedisLimiter  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

LIMITS = {"bench.test": 10**9}  # never out of tokens: every call is a whole decision


ROUND_TRIPS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_script|load", "cmdstat_script")


def counts(client: redis.Redis) -> tuple[int, int]:
    """(commands the client sent, commands Redis ran incl. those inside scripts), INFO excluded."""
    stats = client.info("commandstats")
    sent = sum(v["calls"] for k, v in stats.items() if k in ROUND_TRIPS)
    ran = sum(v["calls"] for k, v in stats.items() if k != "cmdstat_info")
    return sent, ran


def per_decision(before: tuple[int, int], after: tuple[int, int], n: int) -> str:
    return f"{(after[0] - before[0]) / n:.2f} | {(after[1] - before[1]) / n:.2f}"


def time_calls(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for _ in range(n):
        fn("bench.test")
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--decisions", type=int, default=20000)
    p.add_argument("--greenlets", type=int, default=50)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args()
    n = args.decisions
    rows = []
    local = LocalLimiter(None, LIMITS)
    elapsed = time_calls(local.take, n)
    rows.append(("local", n / elapsed, elapsed / n * 1e6, "0 | 0"))
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        lim = RedisLimiter(client, "bench:", LocalLimiter(None, LIMITS))
        lim.take("bench.test")  # loads the script once
        before = counts(client)
        elapsed = time_calls(lim.take, n)
        rows.append(("redis", n / elapsed, elapsed / n * 1e6, per_decision(before, counts(client), n)))
        each = n // args.greenlets
        before = counts(client)
        start = time.perf_counter()
        gevent.joinall([gevent.spawn(time_calls, lim.take, each) for _ in range(args.greenlets)])
        elapsed = time.perf_counter() - start
        total = each * args.greenlets
        rows.append((f"redis x {args.greenlets} greenlets", total / elapsed, elapsed / total * 1e6,
                     per_decision(before, counts(client), total)))
        assert not lim.down, "Redis fell back during the run"
        version = client.info("server")["redis_version"]
    lines = [
        f"### Rate-limit decisions ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)",
        "",
        f"`python bench/ratelimit.py --decisions {n} --greenlets {args.greenlets}`; redis-server {version} "
        f"on 127.0.0.1, redis-py {redis.__version__}, one process (client) under gevent.",
        "",
        "| backend | decisions/s | µs per decision | round trips per decision | Redis commands run per decision |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {rate:,.0f} | {us:.1f} | {cmds} |" for name, rate, us, cmds in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        with open(os.path.join(ROOT, "bench", "RESULTS.md"), "a") as f:
            f.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
