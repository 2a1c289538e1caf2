"""hedwig.policy: relay control, domain filters and the AUTH throttle, as table tests.

Pure: no sockets, no clock (the throttle is fed explicit times).
"""

from __future__ import annotations

import ipaddress

import pytest

from hedwig import policy
from hedwig.config import FilterConfig
from hedwig.policy import (
    R530_AUTH_REQUIRED,
    R550_RECIPIENT_DOMAIN,
    R550_SENDER_DOMAIN,
    R554_RELAY_DENIED,
    AuthThrottle,
    Filters,
    check_recipient,
    check_relay,
    check_sender,
    domain_of,
    in_networks,
    throttle_key,
)

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


# -- relay ------------------------------------------------------------------------------


@pytest.mark.parametrize("ip, inside", [
    ("10.1.2.3", True), ("11.0.0.1", False), ("2001:db8::1", True), ("2001:db9::1", False),
    ("::ffff:10.0.0.1", True), ("fe80::1%eth0", False), ("not an ip", False), ("", False),
])
def test_in_networks(ip: str, inside: bool) -> None:
    assert in_networks(ip, NETS) is inside


@pytest.mark.parametrize("may_relay, authenticated, users, expected", [
    (True, False, False, None),
    (True, False, True, None),
    (False, True, True, None),
    (False, False, True, R530_AUTH_REQUIRED),
    (False, False, False, R554_RELAY_DENIED),
])
def test_check_relay(may_relay: bool, authenticated: bool, users: bool, expected: object) -> None:
    assert check_relay(may_relay, authenticated, users) == expected


def test_relay_replies_are_the_specs() -> None:
    assert R530_AUTH_REQUIRED.to_bytes() == b"530 5.7.0 Authentication required\r\n"
    assert R554_RELAY_DENIED.to_bytes() == b"554 5.7.1 Relay access denied\r\n"
    assert R550_SENDER_DOMAIN.to_bytes().startswith(b"550 5.7.1 ")
    assert R550_RECIPIENT_DOMAIN.to_bytes().startswith(b"550 5.7.1 ")


# -- filters ------------------------------------------------------------------------------


def filters(*specs: tuple[str, str, tuple[str, ...]]) -> Filters:
    return Filters.compile(FilterConfig(t, d, a) for t, a, d in specs)


@pytest.mark.parametrize("address, domain", [
    ("a@Example.COM", "example.com"), ("postmaster", ""), ("", ""), ('"a@b"@c.example', "c.example"),
    ("a@[192.0.2.1]", "[192.0.2.1]"),
])
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


def test_no_filters_pass_everything() -> None:
    none = Filters.compile([])
    assert check_sender("a@x.example", none) is None
    assert check_recipient("b@y.example", none) is None


def test_sender_allow_list() -> None:
    f = filters(("from_domain_filter", "allow", ("good.example", "Also.Example")))
    assert check_sender("a@good.example", f) is None
    assert check_sender("a@GOOD.example", f) is None  # case-insensitive
    assert check_sender("a@also.example", f) is None
    assert check_sender("a@bad.example", f) == R550_SENDER_DOMAIN
    assert check_sender("a@sub.good.example", f) == R550_SENDER_DOMAIN  # exact match only
    assert check_sender("", f) is None  # the null sender: bounces flow
    assert check_recipient("b@anything.example", f) is None  # sender filters only at MAIL


def test_sender_deny_list() -> None:
    f = filters(("from_domain_filter", "deny", ("spam.example",)))
    assert check_sender("a@SPAM.example", f) == R550_SENDER_DOMAIN
    assert check_sender("a@ham.example", f) is None
    assert check_sender("", f) is None


def test_recipient_allow_and_deny() -> None:
    allow = filters(("to_domain_filter", "allow", ("dest.example",)))
    assert check_recipient("b@Dest.Example", allow) is None
    assert check_recipient("b@other.example", allow) == R550_RECIPIENT_DOMAIN
    assert check_recipient("postmaster", allow) == R550_RECIPIENT_DOMAIN  # no domain: not listed
    deny = filters(("to_domain_filter", "deny", ("blocked.example",)))
    assert check_recipient("b@blocked.example", deny) == R550_RECIPIENT_DOMAIN
    assert check_recipient("postmaster", deny) is None
    assert check_sender("a@blocked.example", deny) is None  # recipient filters only at RCPT


def test_every_filter_must_pass() -> None:
    f = filters(("to_domain_filter", "allow", ("a.example", "b.example")),
                ("to_domain_filter", "deny", ("b.example",)))
    assert check_recipient("x@a.example", f) is None
    assert check_recipient("x@b.example", f) == R550_RECIPIENT_DOMAIN
    assert check_recipient("x@c.example", f) == R550_RECIPIENT_DOMAIN


# -- AUTH throttle -----------------------------------------------------------------------------


@pytest.mark.parametrize("ip, key", [
    ("192.0.2.1", "192.0.2.1"),
    ("::ffff:192.0.2.1", "192.0.2.1"),
    ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),  # the same /64: the same count
    ("fe80::1%eth0", "fe80::/64"),
    ("not an ip", "not an ip"),
])
def test_throttle_key(ip: str, key: str) -> None:
    assert throttle_key(ip) == key


def test_delay_grows_per_address_and_is_capped() -> None:
    t = AuthThrottle(step=0.25, max_delay=1.0)
    delays = [t.record_failure("192.0.2.1", now=100.0 + i) for i in range(6)]
    assert delays == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert t.record_failure("192.0.2.2", now=110.0) == 0.25  # other addresses are not slowed


def test_delay_survives_reconnecting() -> None:
    # The count is per address, not per session: a new connection starts where the last left off.
    t = AuthThrottle(step=0.5, max_delay=5.0)
    for i in range(3):
        t.record_failure("192.0.2.1", now=float(i))
    assert t.record_failure("192.0.2.1", now=3.0) == 2.0


def test_session_limit_and_address_limit() -> None:
    t = AuthThrottle(session_limit=10, address_limit=20)
    now = 1000.0
    assert not t.cut_off("192.0.2.1", session_failures=9, now=now)
    assert t.cut_off("192.0.2.1", session_failures=10, now=now)
    for i in range(19):
        t.record_failure("192.0.2.1", now + i)
    assert not t.blocked("192.0.2.1", now + 19)
    t.record_failure("192.0.2.1", now + 19)
    assert t.blocked("192.0.2.1", now + 19)
    assert t.cut_off("192.0.2.1", session_failures=1, now=now + 19)
    assert not t.blocked("192.0.2.9", now + 19)


def test_failures_expire() -> None:
    t = AuthThrottle(address_limit=3, window=600.0)
    for i in range(3):
        t.record_failure("192.0.2.1", now=float(i))
    assert t.blocked("192.0.2.1", now=599.0)
    assert t.recent("192.0.2.1", now=600.5) == 2  # the first has expired
    assert not t.blocked("192.0.2.1", now=600.5)
    assert t.recent("192.0.2.1", now=10_000.0) == 0
    assert len(t) == 0  # the entry itself is gone


def test_expiry_keeps_recent_addresses() -> None:
    t = AuthThrottle(window=100.0)
    t.record_failure("old", now=0.0)
    t.record_failure("new", now=90.0)
    t.record_failure("old", now=95.0)  # "old" failed again: it moves to the end
    assert t.recent("old", now=150.0) == 1 and t.recent("new", now=150.0) == 1
    assert len(t) == 2
    assert t.recent("new", now=191.0) == 0 and t.recent("old", now=191.0) == 1


def test_table_is_bounded() -> None:
    t = AuthThrottle(max_entries=100)
    for i in range(1000):
        t.record_failure(f"198.51.100.{i % 256}.{i}", now=float(i) / 1000)
    assert len(t) == 100
    assert t.recent("198.51.100.231.999", now=1.0) == 1  # the newest are kept
    assert t.recent("198.51.100.0.0", now=1.0) == 0


def test_defaults_cut_off_twenty_guesses_quickly_enough() -> None:
    # Twenty guesses from one address cost at most sum(min(0.25 * n, 3)) seconds of waiting,
    # spread over the sessions that make them; the 20th cuts the address off.
    t = AuthThrottle()
    total = sum(t.record_failure("192.0.2.1", now=float(i)) for i in range(20))
    assert total == pytest.approx(sum(min(policy.AUTH_DELAY_STEP * n, policy.AUTH_DELAY_MAX)
                                      for n in range(1, 21)))
    assert t.blocked("192.0.2.1", now=20.0)
