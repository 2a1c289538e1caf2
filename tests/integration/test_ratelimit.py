"""Per-domain rate limits against a real Hedwig process and a real upstream sink (SPEC §7).

A limited domain gets its burst, then one message per refill interval; other
domains are not slowed; a wait for a token is not a delivery attempt.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.integration.test_delivery import delivery_config, message, send, sinks  # noqa: F401 - fixture
from tests.support.proc import HOST, RawClient, free_port, read_journal, wait_until
from tests.support.scrape import Scrape, scrape, scrape_until

pytestmark = pytest.mark.timeout(90)


class Watch:
    """When each message for a domain reached the sink (polled every 20 ms in a thread)."""

    def __init__(self, sink, domain: str) -> None:
        self.sink, self.domain, self.times = sink, domain, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            n = sum(any(r.endswith("@" + self.domain) for r in m.rcpt_tos) for m in list(self.sink.messages))
            now = time.monotonic()
            self.times += [now] * (n - len(self.times))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def no_attempt_counted_for_waits(m: Scrape) -> None:
    """SPEC §7 in the metrics: a wait for a token is no deferral, no failed attempt, no retry.

    Every delivered message left the queue at its first attempt, in one job, so the
    jobs beyond the sent messages are the waits' set-asides: there must be some, or
    the rate limit was never hit and this proves nothing."""
    assert m.value("hedwig_emails_deferred_total") == 0, m.text
    assert m.value("hedwig_retry_attempts_total") == 0, m.text
    assert m.matching("hedwig_send_attempts_total", status="failure") == [], m.text
    sent = m.value("hedwig_emails_sent_total")
    assert m.value("hedwig_send_attempts_total", status="success") == sent, m.text
    assert m.value("hedwig_worker_jobs_processed_total") > sent, m.text


@pytest.mark.timeout(90)
def test_a_limited_domain_gets_its_burst_then_the_configured_rate(hedwig, sinks) -> None:
    """"slow.test" = 30/min: 40 messages there and 40 elsewhere. In the first 10 s the
    upstream sees at most the burst plus the refill (30 + 5) for slow.test and all 40 for
    the other domain; the rest of slow.test follows at one per 2 s; waits are no attempts,
    in the journal, the log and the metrics (scraped while slow.test waits, and at the end)."""
    sink = sinks()
    metrics_port = free_port()
    config = delivery_config(
        routes={"*": f"{HOST}:{sink.port}"},
        rate_limits={"enabled": True, "domain_limits": {"slow.test": 30}},
    )
    config["server"]["metrics"] = {"bind": f"{HOST}:{metrics_port}"}
    proc = hedwig(config)
    slow, fast = Watch(sink, "slow.test"), Watch(sink, "fast.test")
    start = time.monotonic()
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        for i in range(40):
            send(proc.port, [f"r{i}@slow.test"], message(f"slow{i}"), client=client)
            send(proc.port, [f"r{i}@fast.test"], message(f"fast{i}"), client=client)
        client.cmd("QUIT", 221)
    try:
        wait_until(lambda: len(fast.times) == 40, 10, what="all 40 for fast.test")
        time.sleep(max(0.0, 10 - (time.monotonic() - start)))
        slow_10s = len(slow.times)
        assert 30 <= slow_10s <= 35, slow_10s
        waiting = scrape(metrics_port)  # slow.test's rest is waiting for tokens now
        assert waiting.value("hedwig_emails_received_total") == 80, waiting.text
        assert waiting.value("hedwig_queue_depth") >= 40 - 35, waiting.text
        no_attempt_counted_for_waits(waiting)
        wait_until(lambda: len(slow.times) >= slow_10s + 3, 15, what="the refill")
        # Between two tokens the counters catch up with what reached the sink.
        end = scrape_until(metrics_port, lambda m: m.value("hedwig_emails_sent_total") == len(sink.messages), 5,
                           what="sent = messages at the sink")
    finally:
        slow.stop(), fast.stop()
    no_attempt_counted_for_waits(end)
    assert end.value("hedwig_send_attempts_total", domain="fast.test", status="success") == 40, end.text
    later = slow.times[30:]
    gaps = [b - a for a, b in zip(later, later[1:])]
    assert gaps and min(gaps) > 1.2, gaps  # ~2 s per token at 30/min
    # Rate-limit waits are not attempts: nothing deferred, no attempt recorded.
    states, _ = read_journal(proc.spool)
    assert all(state["attempts"] == 0 for state in states.values()), states
    assert "outcome=deferred" not in proc.log_text()
