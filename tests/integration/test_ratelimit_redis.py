"""Cluster-wide rate limits: two Hedwig nodes sharing one Redis (SPEC §7, issue 9).

Two real servers (separate spools and ports, as two machines would have)
relay to one upstream sink with `backend = "redis"` and "slow.test" = 30 per
minute. The shared bucket means the sink sees 30 plus the refill across both
nodes, not 30 per node. With Redis stopped mid-run, delivery goes on under
each node's local limits, nothing is lost, the fallback shows in the metrics,
and the shared bucket is used again once Redis is back.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from tests.integration.test_delivery import delivery_config, message, send, sinks  # noqa: F401 - fixture
from tests.integration.test_ratelimit import Watch
from tests.support.conservation import conserved
from tests.support.proc import HOST, RawClient, free_port, wait_until
from tests.support.redis_server import RedisServer
from tests.support.scrape import scrape

pytestmark = pytest.mark.timeout(90)

LIMIT = 30  # per minute: a burst of 30, then one token every 2 s


def node_config(sink_port: int, redis_url: str, prefix: str) -> dict[str, Any]:
    config = delivery_config(
        routes={"*": f"{HOST}:{sink_port}"},
        rate_limits={"enabled": True, "backend": "redis", "redis_url": redis_url, "key_prefix": prefix,
                     "domain_limits": {"slow.test": LIMIT}},
    )
    config["server"]["metrics"] = {"bind": f"{HOST}:{free_port()}"}
    return config


def metrics_port(proc) -> int:  # type: ignore[no-untyped-def]
    return int(proc.config["server"]["metrics"]["bind"].rsplit(":", 1)[1])


def send_many(port: int, tags: list[str], acked: dict[str, str]) -> None:
    with RawClient(port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        for tag in tags:
            acked[tag] = send(port, [f"{tag}@slow.test"], message(tag), client=client)
        client.cmd("QUIT", 221)


def load_both(nodes, count: int) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """`count` messages to slow.test through each node at once; tag -> queue id."""
    acked: dict[str, str] = {}
    threads = [threading.Thread(target=send_many, args=(node.port, [f"n{i}m{j}" for j in range(count)], acked))
               for i, node in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(acked) == count * len(nodes)
    return acked


def sink_tags(sink) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.split("@")[0] for m in list(sink.messages) for r in m.rcpt_tos]


def test_two_nodes_share_one_budget(hedwig, sinks) -> None:
    """50 messages through each of two nodes: in the first 10 s the sink sees at most the
    burst plus the refill (30 + 5) across both, not 30 per node, and no node counted a wait
    as an attempt."""
    sink = sinks()
    with RedisServer() as server:
        nodes = [hedwig(node_config(sink.port, server.url, "shared:")) for _ in range(2)]
        watch = Watch(sink, "slow.test")
        start = time.monotonic()
        acked = load_both(nodes, 50)
        try:
            time.sleep(max(0.0, 10 - (time.monotonic() - start)))
            early = sum(1 for t in watch.times if t - start <= 10)
            assert LIMIT - 2 <= early <= LIMIT + 5, f"{early} delivered in the first 10 s across both nodes"
            wait_until(lambda: len(watch.times) >= early + 2, 8, what="the refill keeps flowing")
        finally:
            watch.stop()
        for node in nodes:
            m = scrape(metrics_port(node))
            assert m.value("hedwig_emails_deferred_total") == 0 and m.value("hedwig_retry_attempts_total") == 0
            assert m.value("hedwig_ratelimit_fallback") == 0
        assert redis.Redis.from_url(server.url).exists("shared:ratelimit:slow.test")
        report_a = conserved({k: v for k, v in acked.items() if k.startswith("n0")}, sink_tags(sink), nodes[0].spool)
        report_b = conserved({k: v for k, v in acked.items() if k.startswith("n1")}, sink_tags(sink), nodes[1].spool)
        report_a.assert_nothing_lost()
        report_b.assert_nothing_lost()


def test_redis_stopped_mid_run_delivery_goes_on_and_shared_limits_resume(hedwig, sinks) -> None:
    """Redis goes away after the burst: each node goes on under its local limit (a burst of
    its own), the fallback gauge is 1, nothing is lost or bounced; when Redis is back the
    shared bucket decides again (emptied by hand, it lets almost nothing through)."""
    sink = sinks()
    server = RedisServer().start()
    try:
        nodes = [hedwig(node_config(sink.port, server.url, "outage:")) for _ in range(2)]
        acked = load_both(nodes, 50)
        wait_until(lambda: len(sink.messages) >= LIMIT, 10, what="the shared burst")
        time.sleep(1.0)
        shared = len(sink.messages)
        assert shared <= LIMIT + 2, shared
        server.stop()
        # Each node's local bucket takes over: more than the shared refill could allow.
        wait_until(lambda: len(sink.messages) >= shared + LIMIT, 15, what="delivery under local limits")
        for node in nodes:
            wait_until(lambda: scrape(metrics_port(node)).value("hedwig_ratelimit_fallback") == 1, 5,
                       what="the fallback gauge")
            assert "Redis unreachable" in node.log_text()
        server.start()
        client = redis.Redis.from_url(server.url)
        seconds, micros = client.time()  # an empty shared bucket, stamped now on Redis's clock
        client.hset("outage:ratelimit:slow.test", mapping={"tokens": "0", "stamp": str(seconds + micros / 1e6)})
        for i, node in enumerate(nodes):  # a few more through each node: they meet the shared, empty bucket
            send_many(node.port, [f"n{i}late{j}" for j in range(5)], acked)
        for node in nodes:
            wait_until(lambda: "Redis is back" in node.log_text(), 15, what="the shared limits resumed")
            wait_until(lambda: scrape(metrics_port(node)).value("hedwig_ratelimit_fallback") == 0, 5,
                       what="the fallback gauge back to 0")
        # Tokens taken from the fresh bucket before it was emptied are spent by now; from here
        # on only the shared bucket's refill (one per 2 s) can let mail through.
        time.sleep(0.5)
        since, before = time.monotonic(), len(sink.messages)
        time.sleep(4.0)
        allowed = 1 + (time.monotonic() - since) * LIMIT / 60
        late = len(sink.messages) - before
        assert late <= allowed + 1, f"{late} delivered from an empty shared bucket (refill allows {allowed:.1f})"
        for i, node in enumerate(nodes):
            mine = {k: v for k, v in acked.items() if k.startswith(f"n{i}")}
            report = conserved(mine, sink_tags(sink), node.spool)
            report.assert_nothing_lost()
            assert not report.bounced and not report.duplicates, report.summary()
    finally:
        server.stop()
