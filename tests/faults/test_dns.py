"""DNS faults under load: a temporary DNS failure defers, never bounces; fixed DNS delivers everything.

Delivery goes by MX, resolved through the test's own dnslib server
(tests/support/dns.py) named in `[server.smtp] nameservers`, to a real sink
on `[server.smtp] port` -- no static routes. Each scenario breaks the DNS
for the destination domain, relays a load of tagged messages
(tests/support/load.py), waits until every message has been deferred at
least once, repairs the zone, and checks at a quiet moment that every
acknowledged message was delivered exactly once and none bounced
(tests/support/conservation.py, from outside and from the counters).

The resolver caches a temporary failure for 5 s (hedwig/resolver.py,
TEMPFAIL_TTL), so delivery resumes within about 5 s plus one retry delay of
the repair.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.faults.test_upstream import attempt_lines, deferred_once, faulty_relay, run_load, settle
from tests.integration.test_delivery import dns, sinks  # noqa: F401 - fixtures
from tests.support.dns import DnsServer
from tests.support.load import sink_tags
from tests.support.proc import HOST, HedwigProcess, free_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(60)]

DOMAIN = "dns-fault.test"
MX_HOST = f"mx.{DOMAIN}"
TOTAL = 60
HEALTHY: dict[str, Any] = {DOMAIN: {"MX": [(10, MX_HOST)]}, MX_HOST: {"A": [HOST]}}

# name -> (the zone while broken, the text the deferral's reply must carry)
FAULTS: dict[str, tuple[dict[str, Any], str]] = {
    "mx-timeout": ({DOMAIN: "TIMEOUT"}, "timed out"),
    "mx-servfail": ({DOMAIN: "SERVFAIL"}, "SERVFAIL"),
    "mx-host-address-servfail": ({**HEALTHY, MX_HOST: {"A": "SERVFAIL", "AAAA": "SERVFAIL"}}, "SERVFAIL"),
    "truncated-and-no-tcp": ({DOMAIN: {"TRUNCATE": "NOTCP", "MX": [(10, MX_HOST)]}, MX_HOST: {"A": [HOST]}},
                             "MX lookup failed"),
}


def mx_relay(hedwig: Callable[..., HedwigProcess], dns: DnsServer, sink_port: int,
             metrics_port: int) -> HedwigProcess:
    return hedwig(faulty_relay({}, metrics_port, port=sink_port, dns=dns))


@pytest.mark.parametrize("fault", list(FAULTS))
def test_temporary_dns_failure_defers_and_fixed_dns_delivers(hedwig, sinks, dns, fault_report, fault: str) -> None:
    """Promise (SPEC §5: SERVFAIL/timeout -> defer): while the destination's DNS times out, answers
    SERVFAIL (for the MX, or for the MX host's addresses), or truncates its UDP answer with no
    TCP service behind it, every message of a 60-message load is deferred -- none bounced, none
    sent anywhere; once the zone answers again every message is delivered exactly once."""
    started = time.monotonic()
    broken, reason = FAULTS[fault]
    dns.zone.update(broken)
    sink = sinks()
    metrics_port = free_port()
    proc = mx_relay(hedwig, dns, sink.port, metrics_port)
    acked = run_load(proc.port, TOTAL, prefix=fault, rcpts=(f"rcpt@{DOMAIN}",))
    deferred_once(proc, acked)
    assert sink.connections == 0 and sink.messages == []
    deferrals = attempt_lines(proc, "deferred")
    assert deferrals and all(reason in ln for ln in deferrals), deferrals[:3]
    queries = sum(dns.queries.values())

    dns.zone.update(HEALTHY)
    report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
    assert report.delivered == set(acked) and not report.bounced and not report.duplicates, report.summary()
    assert not attempt_lines(proc, "bounced")
    fault_report(f"{report.summary()} deferrals={len(deferrals)} DNS queries while broken={queries} "
                 f"(TCP {sum(dns.tcp_queries.values())}) in {time.monotonic() - started:.1f}s")


def test_truncated_udp_answer_is_retried_over_tcp(hedwig, sinks, dns, fault_report) -> None:
    """Promise: an MX answer truncated over UDP (TC bit) is asked again over TCP, so a 60-message
    load to that domain is delivered at the first attempt: no deferral, no bounce, each once."""
    started = time.monotonic()
    dns.zone.update({DOMAIN: {"TRUNCATE": True, "MX": [(10, MX_HOST)]}, MX_HOST: {"A": [HOST]}})
    sink = sinks()
    metrics_port = free_port()
    proc = mx_relay(hedwig, dns, sink.port, metrics_port)
    acked = run_load(proc.port, TOTAL, prefix="truncated", rcpts=(f"rcpt@{DOMAIN}",))
    report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
    assert report.delivered == set(acked) and not report.bounced and not report.duplicates, report.summary()
    assert dns.tcp_queries[(DOMAIN, "MX")] >= 1, dns.queries
    assert not attempt_lines(proc, "deferred")
    assert len(re.findall(r" delivered rcpts=1 attempts=1\b", proc.log_text())) == TOTAL
    fault_report(f"{report.summary()} MX queries UDP+TCP={dns.queries[(DOMAIN, 'MX')]} "
                 f"TCP={dns.tcp_queries[(DOMAIN, 'MX')]} in {time.monotonic() - started:.1f}s")


def test_mx_pointing_to_a_name_without_addresses_defers(hedwig, sinks, dns, fault_report) -> None:
    """Promise (the issue's DNS fault): MX records that point to a name with no A/AAAA records
    (a zone mid-change) defer the mail rather than bounce it; once the address is published,
    every message is delivered exactly once."""
    started = time.monotonic()
    dns.zone.update({**HEALTHY, MX_HOST: {"NEG_TTL": 1}})  # the name exists, without addresses
    sink = sinks()
    metrics_port = free_port()
    proc = mx_relay(hedwig, dns, sink.port, metrics_port)
    acked = run_load(proc.port, TOTAL, prefix="noaddr", rcpts=(f"rcpt@{DOMAIN}",))
    deferred_once(proc, acked)
    dns.zone.update(HEALTHY)
    report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
    assert report.delivered == set(acked) and not report.bounced, report.summary()
    fault_report(f"{report.summary()} in {time.monotonic() - started:.1f}s")
