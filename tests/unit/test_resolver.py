"""resolver: dnspython against a real DNS server on 127.0.0.1 (tests/support/dns.py).

Real UDP/TCP sockets, threads, no patching; the cache runs on a fake clock so
no test sleeps.  Each test is bounded by its timeout marker.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

from hedwig.resolver import TEMPFAIL_TTL, Resolver
from hedwig.routing import (
    MAX_TARGETS,
    Deliver,
    Fail,
    NoData,
    NxDomain,
    Records,
    Target,
    TempFail,
)
from tests.support.dns import DnsServer

pytestmark = pytest.mark.timeout(30)

PORT = 2525


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def base_zone() -> dict[str, Any]:
    return {
        "example.test": {"MX": [(20, "MX2.Example.TEST."), (10, "mx1.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"]},
        "mx2.example.test": {"A": ["127.0.0.2"]},
        "nullmx.test": {"MX": [(0, ".")]},
        "implicit.test": {"A": ["127.0.0.3"]},
        "noaddr.test": {"TXT": []},  # exists, but neither MX nor A/AAAA
        "servfail.test": "SERVFAIL",
        "refused.test": "REFUSED",
        "slow.test": "TIMEOUT",
        "trunc.test": {"TRUNCATE": True, "MX": [(10, "mx1.example.test")]},
        "trunc-notcp.test": {"TRUNCATE": "NOTCP", "MX": [(10, "mx1.example.test")]},
        "relay.test": {"A": ["127.0.0.4"]},
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(base_zone()) as dns_server:
        yield dns_server


@pytest.fixture
def resolver(server: DnsServer, clock: FakeClock) -> Resolver:
    return Resolver((server.nameserver,), timeout=1.0, clock=clock)


def seeded() -> random.Random:
    return random.Random(5)


# --- answers ----------------------------------------------------------------------------


def test_mx_records_normalized(resolver: Resolver) -> None:
    answer = resolver.mx("Example.Test.")
    assert isinstance(answer, Records)
    assert sorted(answer.values) == [(10, "mx1.example.test"), (20, "mx2.example.test")]


def test_plan_mx_by_preference(resolver: Resolver) -> None:
    assert resolver.plan("example.test", {}, PORT, seeded()) == Deliver((
        Target("127.0.0.1", PORT, "mx1.example.test"),
        Target("::1", PORT, "mx1.example.test"),
        Target("127.0.0.2", PORT, "mx2.example.test"),
    ))


def test_implicit_mx(resolver: Resolver) -> None:
    assert resolver.mx("implicit.test") == NoData()
    assert resolver.plan("implicit.test", {}, PORT, seeded()) == Deliver(
        (Target("127.0.0.3", PORT, "implicit.test"),))


def test_no_mx_and_no_address_bounces(resolver: Resolver) -> None:
    result = resolver.plan("noaddr.test", {}, PORT, seeded())
    assert isinstance(result, Fail) and result.permanent


def test_null_mx(resolver: Resolver, server: DnsServer) -> None:
    assert resolver.mx("nullmx.test") == Records(((0, ""),))
    assert resolver.plan("nullmx.test", {}, PORT, seeded()) == Fail(
        True, "domain accepts no mail (null MX)", "5.1.10")
    assert set(server.queries) == {("nullmx.test", "MX")}  # no address lookups


def test_nxdomain(resolver: Resolver, server: DnsServer) -> None:
    assert resolver.mx("nowhere.test") == NxDomain()
    assert resolver.addresses("nowhere.test") == NxDomain()
    assert server.queries[("nowhere.test", "AAAA")] == 0  # A said NXDOMAIN: no AAAA query
    assert resolver.plan("nowhere.test", {}, PORT, seeded()) == Fail(
        True, "domain does not exist", "5.1.2")


@pytest.mark.parametrize("domain", ["servfail.test", "refused.test"])
def test_servfail_and_refused_are_tempfail(resolver: Resolver, domain: str) -> None:
    answer = resolver.mx(domain)
    assert isinstance(answer, TempFail)
    assert domain in answer.reason
    result = resolver.plan(domain, {}, PORT, seeded())
    assert isinstance(result, Fail) and not result.permanent


def test_timeout_is_tempfail_within_the_timeout(resolver: Resolver) -> None:
    started = time.monotonic()
    answer = resolver.mx("slow.test")
    elapsed = time.monotonic() - started
    assert isinstance(answer, TempFail) and "timed out" in answer.reason
    assert 0.9 <= elapsed < 2.5


def test_truncated_answer_is_retried_over_tcp(resolver: Resolver, server: DnsServer) -> None:
    assert resolver.mx("trunc.test") == Records(((10, "mx1.example.test"),))
    assert server.tcp_queries[("trunc.test", "MX")] == 1


def test_truncated_answer_without_tcp_is_tempfail(resolver: Resolver) -> None:
    answer = resolver.mx("trunc-notcp.test")
    assert isinstance(answer, TempFail)


def test_large_answer_goes_over_tcp_and_the_plan_is_capped(
        resolver: Resolver, server: DnsServer) -> None:
    server.zone["big.test"] = {"A": [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(200)]}
    answer = resolver.addresses("big.test")
    assert isinstance(answer, Records) and len(answer.values) == 200
    assert server.tcp_queries[("big.test", "A")] == 1
    result = resolver.plan("big.test", {}, PORT, seeded())
    assert isinstance(result, Deliver) and len(result.targets) == MAX_TARGETS


# --- addresses: A and AAAA combined ----------------------------------------------------


@pytest.mark.parametrize(("entry", "expected"), [
    ({"A": ["127.0.0.1", "127.0.0.2"], "AAAA": ["::1"]},
     Records(("127.0.0.1", "127.0.0.2", "::1"))),
    ({"AAAA": ["::1"]}, Records(("::1",))),
    ({"MX": [(10, "x.test")]}, NoData()),
    ({"A": "SERVFAIL", "AAAA": ["::1"]}, Records(("::1",))),  # records win over a failure
    ({"A": ["127.0.0.1"], "AAAA": "SERVFAIL"}, Records(("127.0.0.1",))),
])
def test_addresses(resolver: Resolver, server: DnsServer, entry: dict[str, Any],
                   expected: Any) -> None:
    server.zone["host.test"] = entry
    assert resolver.addresses("host.test") == expected


@pytest.mark.parametrize("entry", [{"A": "SERVFAIL"}, {"A": [], "AAAA": "REFUSED"}])
def test_addresses_tempfail_without_records(
        resolver: Resolver, server: DnsServer, entry: dict[str, Any]) -> None:
    server.zone["host.test"] = entry
    assert isinstance(resolver.addresses("host.test"), TempFail)


def test_addresses_follow_a_cname(resolver: Resolver, server: DnsServer) -> None:
    server.zone["alias.test"] = {"CNAME": "mx1.example.test"}
    assert resolver.addresses("alias.test") == Records(("127.0.0.1", "::1"))


def test_addresses_of_an_ip_are_that_ip(resolver: Resolver, server: DnsServer) -> None:
    assert resolver.addresses("127.0.0.9") == Records(("127.0.0.9",))
    assert not server.queries


def test_addresses_looked_up_lazily(resolver: Resolver, server: DnsServer) -> None:
    server.zone["many.test"] = {"MX": [(10, "wide.test"), (20, "mx2.example.test")]}
    server.zone["wide.test"] = {"A": [f"127.0.1.{i}" for i in range(1, 13)]}
    result = resolver.plan("many.test", {}, PORT, seeded())
    assert isinstance(result, Deliver) and len(result.targets) == MAX_TARGETS
    assert {name for name, _ in server.queries} == {"many.test", "wide.test"}


# --- the cache ---------------------------------------------------------------------------


def test_positive_answers_cached_for_their_ttl(
        resolver: Resolver, server: DnsServer, clock: FakeClock) -> None:
    server.zone["ttl.test"] = {"MX": [(10, "mx1.example.test")], "TTL": 60}
    first = resolver.mx("ttl.test")
    server.zone["ttl.test"] = {"MX": [(10, "mx2.example.test")], "TTL": 60}
    clock.advance(59)
    assert resolver.mx("TTL.test.") == first  # same key: lower-case, no trailing dot
    assert server.queries[("ttl.test", "MX")] == 1
    clock.advance(2)
    assert resolver.mx("ttl.test") == Records(((10, "mx2.example.test"),))
    assert server.queries[("ttl.test", "MX")] == 2


def test_ttl_zero_is_not_cached(resolver: Resolver, server: DnsServer) -> None:
    server.zone["zero.test"] = {"A": ["127.0.0.1"], "TTL": 0}
    resolver.addresses("zero.test")
    resolver.addresses("zero.test")
    assert server.queries[("zero.test", "A")] == 2


def test_nxdomain_cached_for_the_soa_negative_ttl(
        resolver: Resolver, server: DnsServer, clock: FakeClock) -> None:
    assert resolver.mx("later.test") == NxDomain()
    server.zone["later.test"] = {"MX": [(10, "mx1.example.test")]}
    clock.advance(29)
    assert resolver.mx("later.test") == NxDomain()  # SOA minimum is 30 s
    assert server.queries[("later.test", "MX")] == 1
    clock.advance(2)
    assert resolver.mx("later.test") == Records(((10, "mx1.example.test"),))
    assert server.queries[("later.test", "MX")] == 2


def test_nodata_cached_for_the_soa_negative_ttl(
        resolver: Resolver, server: DnsServer, clock: FakeClock) -> None:
    server.zone["neg.test"] = {"A": ["127.0.0.1"], "NEG_TTL": 10}
    assert resolver.mx("neg.test") == NoData()
    clock.advance(9)
    resolver.mx("neg.test")
    assert server.queries[("neg.test", "MX")] == 1
    clock.advance(2)
    resolver.mx("neg.test")
    assert server.queries[("neg.test", "MX")] == 2


def test_negative_ttl_without_soa_is_60s(clock: FakeClock) -> None:
    with DnsServer({"x.test": {"A": ["127.0.0.1"]}}, negative_ttl=None) as server:
        resolver = Resolver((server.nameserver,), timeout=1.0, clock=clock)
        assert resolver.mx("x.test") == NoData()
        assert resolver.mx("gone.test") == NxDomain()
        clock.advance(59)
        resolver.mx("x.test")
        resolver.mx("gone.test")
        assert server.queries[("x.test", "MX")] == server.queries[("gone.test", "MX")] == 1
        clock.advance(2)
        resolver.mx("x.test")
        resolver.mx("gone.test")
        assert server.queries[("x.test", "MX")] == server.queries[("gone.test", "MX")] == 2


def test_tempfail_cached_briefly(
        resolver: Resolver, server: DnsServer, clock: FakeClock) -> None:
    assert isinstance(resolver.mx("servfail.test"), TempFail)
    clock.advance(TEMPFAIL_TTL - 1)
    assert isinstance(resolver.mx("servfail.test"), TempFail)
    assert server.queries[("servfail.test", "MX")] == 1
    server.zone["servfail.test"] = {"MX": [(10, "mx1.example.test")]}
    clock.advance(2)
    assert resolver.mx("servfail.test") == Records(((10, "mx1.example.test"),))


def test_cache_is_bounded(server: DnsServer, clock: FakeClock) -> None:
    resolver = Resolver((server.nameserver,), timeout=1.0, clock=clock, max_entries=2)
    for domain in ("example.test", "nullmx.test", "implicit.test", "example.test"):
        resolver.mx(domain)
    assert server.queries[("example.test", "MX")] == 2  # evicted by the third name
    resolver.mx("implicit.test")
    assert server.queries[("implicit.test", "MX")] == 1  # still there


# --- plan() with [server.routes] ------------------------------------------------------


def test_plan_static_route_by_ip(resolver: Resolver, server: DnsServer) -> None:
    routes = {"example.test": ("127.0.0.9", 2526)}
    assert resolver.plan("Example.Test", routes, PORT) == Deliver(
        (Target("127.0.0.9", 2526, "127.0.0.9"),))
    assert not server.queries  # no DNS at all


def test_plan_static_route_by_name(resolver: Resolver, server: DnsServer) -> None:
    routes = {"example.test": ("relay.test", 2526)}
    assert resolver.plan("example.test", routes, PORT) == Deliver(
        (Target("127.0.0.4", 2526, "relay.test"),))
    assert server.queries[("example.test", "MX")] == 0


def test_plan_static_route_to_a_missing_name_defers(resolver: Resolver) -> None:
    result = resolver.plan("example.test", {"example.test": ("missing.test", 2526)}, PORT)
    assert isinstance(result, Fail) and not result.permanent


def test_plan_wildcard_route(resolver: Resolver, server: DnsServer) -> None:
    routes = {"*": ("relay.test", 587), "implicit.test": ("127.0.0.8", 2526)}
    assert resolver.plan("anything.test", routes, PORT) == Deliver(
        (Target("127.0.0.4", 587, "relay.test"),))
    assert resolver.plan("implicit.test", routes, PORT) == Deliver(
        (Target("127.0.0.8", 2526, "127.0.0.8"),))
    assert not any(rdtype == "MX" for _, rdtype in server.queries)
