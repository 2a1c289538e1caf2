"""routing: static routes, MX order, null MX and every branch of plan() (pure, no DNS)."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping

import pytest

from hedwig.routing import (
    MAX_EXCHANGES,
    MAX_TARGETS,
    Answer,
    Deliver,
    Fail,
    NoData,
    NxDomain,
    Records,
    Target,
    TempFail,
    is_null_mx,
    order_mx,
    plan,
    plan_route,
    static_route,
)

PORT = 2525


class Recording(Mapping[str, Answer]):
    """An `addresses` mapping that remembers which names plan() looked at, in order."""

    def __init__(self, answers: Mapping[str, Answer]) -> None:
        self.answers = dict(answers)
        self.asked: list[str] = []

    def __getitem__(self, name: str) -> Answer:
        self.asked.append(name)
        return self.answers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.answers)

    def __len__(self) -> int:
        return len(self.answers)


def rng() -> random.Random:
    return random.Random(7)


def mx(*records: tuple[int, str]) -> Records:
    return Records(tuple(records))


def ips(*values: str) -> Records:
    return Records(tuple(values))


def t(host: str, name: str, port: int = PORT) -> Target:
    return Target(host, port, name)


# --- static_route ----------------------------------------------------------------------

ROUTES = {"example.test": ("127.0.0.1", 2526), "*": ("smarthost.test", 587)}


@pytest.mark.parametrize(("domain", "routes", "expected"), [
    ("example.test", ROUTES, ("127.0.0.1", 2526)),      # exact beats "*"
    ("EXAMPLE.Test", ROUTES, ("127.0.0.1", 2526)),      # case-insensitive
    ("example.test.", ROUTES, ("127.0.0.1", 2526)),     # trailing dot
    ("other.test", ROUTES, ("smarthost.test", 587)),    # "*" for everything else
    ("sub.example.test", ROUTES, ("smarthost.test", 587)),  # exact means exact, not suffix
    ("other.test", {"example.test": ("127.0.0.1", 2526)}, None),
    ("example.test", {}, None),
])
def test_static_route(domain: str, routes: dict[str, tuple[str, int]],
                      expected: tuple[str, int] | None) -> None:
    assert static_route(domain, routes) == expected


# --- order_mx and is_null_mx -------------------------------------------------------------


def test_order_mx_by_preference() -> None:
    records = ((30, "c.test"), (10, "a.test"), (20, "b.test"))
    assert order_mx(records, rng()) == ["a.test", "b.test", "c.test"]


def test_order_mx_drops_duplicates_keeping_the_best_preference() -> None:
    records = ((30, "a.test"), (20, "b.test"), (10, "A.test."), (20, "b.test"))
    assert order_mx(records, rng()) == ["a.test", "b.test"]


def test_order_mx_is_random_among_equal_preferences_only() -> None:
    records = ((10, "a.test"), (10, "b.test"), (5, "first.test"), (50, "last.test"))
    seen = set()
    generator = random.Random(1234)
    for _ in range(200):
        order = order_mx(records, generator)
        assert order[0] == "first.test" and order[-1] == "last.test"
        seen.add(tuple(order[1:3]))
    assert seen == {("a.test", "b.test"), ("b.test", "a.test")}


def test_order_mx_is_reproducible_with_a_seed() -> None:
    records = tuple((10, f"mx{i}.test") for i in range(8))
    assert order_mx(records, random.Random(3)) == order_mx(records, random.Random(3))
    assert sorted(order_mx(records, random.Random(3))) == sorted(name for _, name in records)


@pytest.mark.parametrize(("records", "expected"), [
    (((0, "."),), True),
    (((0, ""),), True),
    (((10, "."),), True),              # RFC 7505 says preference 0, but "." is what counts
    (((0, "."), (10, "mx.test")), False),  # not exactly one: a broken zone, not a null MX
    (((0, "mx.test"),), False),
    ((), False),
])
def test_is_null_mx(records: tuple[tuple[int, str], ...], expected: bool) -> None:
    assert is_null_mx(records) is expected


# --- plan: the MX answer -------------------------------------------------------------------


@pytest.mark.parametrize(("answer", "expected"), [
    (NxDomain(), Fail(True, "domain does not exist", "5.1.2")),
    (mx((0, "")), Fail(True, "domain accepts no mail (null MX)", "5.1.10")),
    (mx((0, ".")), Fail(True, "domain accepts no mail (null MX)", "5.1.10")),
    (TempFail("MX example.test: SERVFAIL"),
     Fail(False, "MX lookup failed: MX example.test: SERVFAIL", "4.4.3")),
])
def test_plan_without_addresses(answer: Answer, expected: Fail) -> None:
    addresses = Recording({"example.test": ips("192.0.2.1")})
    assert plan("example.test", answer, addresses, PORT, rng()) == expected
    assert addresses.asked == []  # decided on the MX answer alone


def test_plan_mx_hosts_in_preference_order_a_then_aaaa() -> None:
    answer = mx((20, "mx2.test"), (10, "mx1.test"))
    addresses = Recording({
        "mx1.test": ips("192.0.2.1", "192.0.2.2", "2001:db8::1"),
        "mx2.test": ips("192.0.2.3"),
    })
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver((
        t("192.0.2.1", "mx1.test"), t("192.0.2.2", "mx1.test"), t("2001:db8::1", "mx1.test"),
        t("192.0.2.3", "mx2.test"),
    ))
    assert addresses.asked == ["mx1.test", "mx2.test"]


@pytest.mark.parametrize("dead", [NxDomain(), NoData()])
def test_plan_skips_an_exchange_without_addresses(dead: Answer) -> None:
    answer = mx((10, "gone.test"), (20, "mx.test"))
    addresses: dict[str, Answer] = {"gone.test": dead, "mx.test": ips("192.0.2.9")}
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver(
        (t("192.0.2.9", "mx.test"),))


def test_plan_uses_the_reachable_exchange_when_another_tempfails() -> None:
    answer = mx((10, "broken.test"), (20, "mx.test"))
    addresses: dict[str, Answer] = {
        "broken.test": TempFail("A broken.test: timed out"), "mx.test": ips("192.0.2.9")}
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver(
        (t("192.0.2.9", "mx.test"),))


def test_plan_all_exchanges_without_addresses_defers() -> None:
    answer = mx((10, "a.test"), (20, "b.test"))
    addresses: dict[str, Answer] = {"a.test": NxDomain(), "b.test": NoData()}
    assert plan("example.test", answer, addresses, PORT, rng()) == Fail(
        False, "MX hosts have no addresses", "4.4.4")


def test_plan_all_exchanges_skipped_with_a_tempfail_defers() -> None:
    answer = mx((10, "a.test"), (20, "b.test"))
    addresses: dict[str, Answer] = {"a.test": NxDomain(), "b.test": TempFail("A b.test: SERVFAIL")}
    result = plan("example.test", answer, addresses, PORT, rng())
    assert isinstance(result, Fail) and not result.permanent
    assert "b.test: A b.test: SERVFAIL" in result.reason


def test_plan_exchange_missing_from_the_mapping_defers() -> None:
    result = plan("example.test", mx((10, "mx.test")), {}, PORT, rng())
    assert isinstance(result, Fail) and not result.permanent


def test_plan_ip_literal_exchange_is_used_as_is() -> None:
    answer = mx((10, "192.0.2.7"), (20, "[2001:db8::7]"))
    addresses = Recording({})
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver((
        t("192.0.2.7", "192.0.2.7"), t("2001:db8::7", "2001:db8::7"),
    ))
    assert addresses.asked == []


def test_plan_root_exchange_among_others_is_skipped() -> None:
    answer = mx((0, ""), (10, "mx.test"))  # RFC 7505 §3: a null MX must be alone
    addresses = Recording({"mx.test": ips("192.0.2.9")})
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver(
        (t("192.0.2.9", "mx.test"),))
    assert addresses.asked == ["mx.test"]


def test_plan_tries_an_address_shared_by_two_exchanges_once() -> None:
    answer = mx((10, "a.test"), (20, "b.test"))
    addresses = {"a.test": ips("192.0.2.1"), "b.test": ips("192.0.2.1", "192.0.2.2")}
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver(
        (t("192.0.2.1", "a.test"), t("192.0.2.2", "b.test")))


def test_plan_ignores_values_that_are_not_addresses() -> None:
    answer = mx((10, "mx.test"))
    addresses = {"mx.test": ips("not-an-ip", "192.0.2.1")}
    assert plan("example.test", answer, addresses, PORT, rng()) == Deliver(
        (t("192.0.2.1", "mx.test"),))


# --- plan: implicit MX (RFC 5321 §5.1) ----------------------------------------------------


@pytest.mark.parametrize("no_mx", [NoData(), Records(())])
def test_plan_implicit_mx(no_mx: Answer) -> None:
    addresses = Recording({"example.test": ips("192.0.2.5", "2001:db8::5")})
    assert plan("Example.TEST.", no_mx, addresses, PORT, rng()) == Deliver((
        t("192.0.2.5", "example.test"), t("2001:db8::5", "example.test"),
    ))
    assert addresses.asked == ["example.test"]  # the normalized domain


@pytest.mark.parametrize(("own", "permanent"), [
    (NoData(), True),
    (NxDomain(), True),
    (ips("not-an-ip"), True),
    (TempFail("A example.test: timed out"), False),
])
def test_plan_implicit_mx_failures(own: Answer, permanent: bool) -> None:
    result = plan("example.test", NoData(), {"example.test": own}, PORT, rng())
    assert isinstance(result, Fail) and result.permanent is permanent


# --- plan: the caps -----------------------------------------------------------------------


def test_plan_caps_the_number_of_targets() -> None:
    answer = mx(*((10 * i, f"mx{i}.test") for i in range(5)))
    addresses = Recording({
        f"mx{i}.test": ips(*(f"192.0.{i}.{j}" for j in range(1, 5))) for i in range(5)
    })
    result = plan("example.test", answer, addresses, PORT, rng())
    assert isinstance(result, Deliver)
    assert len(result.targets) == MAX_TARGETS == 10
    assert [x.host for x in result.targets[:5]] == [
        "192.0.0.1", "192.0.0.2", "192.0.0.3", "192.0.0.4", "192.0.1.1"]
    # lazily: the last two exchanges were never looked up
    assert addresses.asked == ["mx0.test", "mx1.test", "mx2.test"]


def test_plan_caps_one_exchange_with_many_addresses() -> None:
    answer = mx((10, "big.test"), (20, "other.test"))
    addresses = Recording({
        "big.test": ips(*(f"10.0.{i // 250}.{i % 250}" for i in range(1000))),
        "other.test": ips("192.0.2.1"),
    })
    result = plan("example.test", answer, addresses, PORT, rng())
    assert isinstance(result, Deliver) and len(result.targets) == MAX_TARGETS
    assert addresses.asked == ["big.test"]


def test_plan_caps_the_exchanges_consulted() -> None:
    answer = mx(*((i, f"mx{i}.test") for i in range(100)))
    addresses = Recording({f"mx{i}.test": NoData() for i in range(100)})
    assert plan("example.test", answer, addresses, PORT, rng()) == Fail(
        False, "MX hosts have no addresses", "4.4.4")
    assert len(addresses.asked) == MAX_EXCHANGES


# --- plan_route -----------------------------------------------------------------------


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", t("127.0.0.1", "127.0.0.1", 2526)),
    ("::1", t("::1", "::1", 2526)),
])
def test_plan_route_by_ip(host: str, expected: Target) -> None:
    addresses = Recording({})
    assert plan_route(host, 2526, addresses) == Deliver((expected,))
    assert addresses.asked == []


def test_plan_route_by_name() -> None:
    addresses = Recording({"relay.test": ips("192.0.2.1", "2001:db8::1")})
    assert plan_route("Relay.Test", 587, addresses) == Deliver(
        (t("192.0.2.1", "relay.test", 587), t("2001:db8::1", "relay.test", 587)))


@pytest.mark.parametrize("answer", [NxDomain(), NoData(), TempFail("timed out"), ips("bogus")])
def test_plan_route_unresolvable_defers(answer: Answer) -> None:
    # The route is the operator's configuration: fix it and the mail goes, not bounced.
    result = plan_route("relay.test", 587, {"relay.test": answer})
    assert isinstance(result, Fail) and not result.permanent
    assert "relay.test" in result.reason


def test_address_literal_domain_goes_to_that_host() -> None:
    rng = random.Random(1)
    got = plan("[127.0.0.9]", NoData(), {}, 2525, rng)
    assert got == Deliver((Target("127.0.0.9", 2525, "127.0.0.9"),))
    assert plan("[IPv6:::1]", NoData(), {}, 25, rng) == Deliver((Target("::1", 25, "::1"),))
    bad = plan("[not-an-ip]", NoData(), {}, 25, rng)
    assert isinstance(bad, Fail) and bad.permanent
