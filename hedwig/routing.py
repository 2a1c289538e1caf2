"""Where a domain's mail goes: [server.routes], MX, implicit MX, null MX -> a Plan.

Owns the pure decisions of SPEC §5 (RFC 5321 §5.1, RFC 7505): which static
route applies, the order of MX hosts (preference ascending, random among
equals), and the plan for one destination domain -- either `Deliver` with the
addresses to try, in order, or `Fail` (permanent: bounce without an attempt;
temporary: defer).  DNS answers come in as values (`Records`, `NoData`,
`NxDomain`, `TempFail`); `resolver.py` produces them, tests build them by hand.

Must not: do I/O, import gevent or dnspython, read a clock, or keep state.
The only randomness is the `random.Random` passed in.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

# A hostile (or broken) zone must not make one delivery try, or look up,
# an unbounded number of hosts: Postfix's smtp_mx_address_limit plays the same
# role.  At most MAX_TARGETS addresses are tried per plan, and at most
# MAX_EXCHANGES MX hosts are consulted (each may cost an address lookup).
MAX_TARGETS = 10
MAX_EXCHANGES = 10

# RFC 3463 enhanced status codes carried by Fail, for bounce records and DSNs.
STATUS_NULL_MX = "5.1.10"  # RFC 7505 §4.2: recipient address has null MX
STATUS_NO_DOMAIN = "5.1.2"  # bad destination system address
STATUS_NO_ROUTE = "5.4.4"  # unable to route
STATUS_DNS_TEMPFAIL = "4.4.3"  # directory (DNS) server failure
STATUS_NO_ROUTE_YET = "4.4.4"  # unable to route, for now


@dataclass(frozen=True, slots=True)
class Target:
    """One host to try, in order."""

    host: str  # IP address to connect to
    port: int
    name: str  # MX exchange name (or route host) for logs and TLS SNI/verification


# --- DNS answers as values ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Records:
    """Records of the asked type.

    MX: ((preference, exchange), ...) with the exchange lower-case, without the
    trailing dot (the null MX "." is ""); A/AAAA: IP address strings, A first.
    """

    values: tuple[tuple[int, str], ...] | tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NoData:
    """The name exists but has no records of the asked type."""


@dataclass(frozen=True, slots=True)
class NxDomain:
    """The name does not exist."""


@dataclass(frozen=True, slots=True)
class TempFail:
    """No usable answer now: SERVFAIL, REFUSED, timeout, truncated and TCP failed..."""

    reason: str


Answer = Records | NoData | NxDomain | TempFail


# --- plans -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Deliver:
    targets: tuple[Target, ...]  # never empty


@dataclass(frozen=True, slots=True)
class Fail:
    permanent: bool  # True: bounce with no attempt; False: defer
    reason: str
    status: str = ""  # RFC 3463 enhanced status code, e.g. "5.1.10"


Plan = Deliver | Fail


# --- decisions -----------------------------------------------------------------------


def normalize(name: str) -> str:
    """A DNS name as we compare and key it: lower-case, no trailing dot."""
    return name.strip().lower().removesuffix(".")


def static_route(domain: str, routes: Mapping[str, tuple[str, int]]) -> tuple[str, int] | None:
    """The [server.routes] entry for `domain`: the exact domain first, then "*".

    Route keys are lower-cased by config.py; the domain is compared the same way.
    """
    route = routes.get(normalize(domain))
    return route if route is not None else routes.get("*")


def order_mx(records: tuple[tuple[int, str], ...], rng: random.Random) -> list[str]:
    """Exchanges by preference ascending, shuffled among equal preferences (RFC 5321 §5.1).

    A name listed twice keeps its best (lowest) preference and appears once.
    Names are normalized; the null MX target "." becomes "".
    """
    best: dict[str, int] = {}
    for preference, exchange in records:
        name = normalize(exchange)
        if name not in best or preference < best[name]:
            best[name] = preference
    groups: dict[int, list[str]] = {}
    for name, preference in sorted(best.items(), key=lambda item: item[1]):
        groups.setdefault(preference, []).append(name)
    ordered: list[str] = []
    for preference in sorted(groups):
        group = groups[preference]
        rng.shuffle(group)  # RFC 5321 §5.1: spread load among equal preferences
        ordered.extend(group)
    return ordered


def is_null_mx(records: tuple[tuple[int, str], ...]) -> bool:
    """RFC 7505: the domain publishes exactly one MX, whose exchange is the root "."."""
    return len(records) == 1 and normalize(records[0][1]) == ""


def ip_literal(host: str) -> str | None:
    """`host` as a canonical IP address string if it is one ("[...]" allowed), else None."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":  # RFC 5321 §4.1.3 address literal tag
        text = text[5:]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def plan(
    domain: str,
    mx: Answer,
    addresses: Mapping[str, Answer],
    port: int,
    rng: random.Random,
) -> Plan:
    """The plan for mail to `domain`, given its MX answer (SPEC §5).

    `addresses` maps a host name (normalized) to its A+AAAA answer.  It is read
    lazily, in MX order, and no further than needed (MAX_TARGETS addresses,
    MAX_EXCHANGES hosts), so the resolver can pass a mapping that looks names
    up on access.  A name missing from it counts as a temporary failure: we
    defer rather than bounce on an answer we do not have.
    """
    if domain.startswith("["):
        # RFC 5321 §4.1.3: user@[192.0.2.1] names the host itself; no DNS involved.
        literal = ip_literal(domain)
        if literal is None:
            return Fail(True, "bad address literal", STATUS_NO_DOMAIN)
        return Deliver((Target(literal, port, literal),))
    domain = normalize(domain)
    if isinstance(mx, NxDomain):
        return Fail(True, "domain does not exist", STATUS_NO_DOMAIN)
    if isinstance(mx, TempFail):
        return Fail(False, f"MX lookup failed: {mx.reason}", STATUS_DNS_TEMPFAIL)
    if isinstance(mx, Records) and mx.values:
        records = cast(tuple[tuple[int, str], ...], mx.values)
        if is_null_mx(records):
            return Fail(True, "domain accepts no mail (null MX)", STATUS_NULL_MX)
        return _plan_mx(records, addresses, port, rng)
    # RFC 5321 §5.1: no MX records -> the domain itself is an implicit MX (preference 0).
    answer = _lookup(addresses, domain)
    if isinstance(answer, Records):
        targets = _targets(domain, answer, port, [], set())
        if targets:
            return Deliver(tuple(targets))
        return Fail(True, "domain has no MX and no usable address", STATUS_NO_ROUTE)
    if isinstance(answer, TempFail):
        return Fail(False, f"address lookup failed: {answer.reason}", STATUS_DNS_TEMPFAIL)
    if isinstance(answer, NxDomain):
        return Fail(True, "domain does not exist", STATUS_NO_DOMAIN)
    return Fail(True, "domain has no MX and no address records", STATUS_NO_ROUTE)


def plan_route(host: str, port: int, addresses: Mapping[str, Answer]) -> Plan:
    """The plan for a static route (host may be an IP address or a name).

    A route is the operator's word: when its name does not resolve we defer
    (the operator can fix the name or the DNS) instead of bouncing the mail,
    as Postfix does for an unresolvable relayhost.
    """
    literal = ip_literal(host)
    if literal is not None:
        return Deliver((Target(literal, port, literal),))
    name = normalize(host)
    answer = _lookup(addresses, name)
    if isinstance(answer, Records):
        targets = _targets(name, answer, port, [], set())
        if targets:
            return Deliver(tuple(targets))
        why = "has no usable address"
    elif isinstance(answer, TempFail):
        why = f"lookup failed: {answer.reason}"
    elif isinstance(answer, NxDomain):
        why = "does not exist"
    else:
        why = "has no address records"
    return Fail(False, f"route host {name} {why}", STATUS_DNS_TEMPFAIL)


def _plan_mx(
    records: tuple[tuple[int, str], ...],
    addresses: Mapping[str, Answer],
    port: int,
    rng: random.Random,
) -> Plan:
    targets: list[Target] = []
    seen: set[str] = set()
    tempfail: str | None = None
    for exchange in order_mx(records, rng)[:MAX_EXCHANGES]:
        if len(targets) >= MAX_TARGETS:
            break
        if exchange == "":  # a "." among other MX records (RFC 7505 §3 forbids it): unusable
            continue
        answer: Answer
        literal = ip_literal(exchange)
        if literal is not None:  # not allowed by RFC 5321, but seen; use it as is
            exchange, answer = literal, Records((literal,))
        else:
            answer = _lookup(addresses, exchange)
        if isinstance(answer, Records):
            _targets(exchange, answer, port, targets, seen)
        elif isinstance(answer, TempFail) and tempfail is None:
            tempfail = f"{exchange}: {answer.reason}"
        # NxDomain / NoData: this exchange is skipped for good
    if targets:
        return Deliver(tuple(targets))
    if tempfail is not None:
        return Fail(False, f"no MX host address available ({tempfail})", STATUS_DNS_TEMPFAIL)
    # Deferred, not bounced (unlike Postfix's default): MX records naming hosts
    # without addresses are most often a zone in the middle of a change, and
    # max_retries still bounces the mail if it never gets fixed.
    return Fail(False, "MX hosts have no addresses", STATUS_NO_ROUTE_YET)


def _lookup(addresses: Mapping[str, Answer], name: str) -> Answer:
    answer = addresses.get(name)
    return answer if answer is not None else TempFail(f"no address lookup for {name}")


def _targets(
    name: str, answer: Records, port: int, targets: list[Target], seen: set[str]
) -> list[Target]:
    """Append `name`'s addresses (as given, A before AAAA) to `targets`, up to the cap.

    An address already in the list (two MX names on one host) is tried once;
    anything that is not an IP address is ignored.
    """
    for value in answer.values:
        if len(targets) >= MAX_TARGETS:
            break
        host = ip_literal(value) if isinstance(value, str) else None
        if host is None or host in seen:
            continue
        seen.add(host)
        targets.append(Target(host, port, name))
    return targets
