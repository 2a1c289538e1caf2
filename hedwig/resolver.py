"""DNS for delivery: MX and A/AAAA lookups with dnspython, a TTL cache, and plans.

Owns talking to the configured nameservers (`[server.smtp] nameservers`, else
the system's /etc/resolv.conf) with a bounded `timeout`, turning every outcome
into a `routing.Answer` value (Records / NoData / NxDomain / TempFail -- never
an exception), and caching those answers for their TTL.  `Resolver.plan()`
joins `[server.routes]`, the MX answer and address lookups into a
`routing.Plan`; the decisions themselves are `routing`'s, which stays pure.

Cache policy (all times from the injected clock, so tests need no sleep):
  - keyed by (name, type), names lower-case without the trailing dot;
  - positive answers for their TTL (the smallest along a CNAME chain), at
    most MAX_TTL; a TTL of 0 is not cached;
  - negative answers (NXDOMAIN, NODATA) for the SOA's negative TTL
    (RFC 2308 §5: min(SOA TTL, SOA minimum)), or NEGATIVE_TTL without an SOA,
    at most MAX_NEGATIVE_TTL;
  - TempFail for TEMPFAIL_TTL (5 s): long enough that a burst of deliveries
    to a domain whose DNS is down costs one timeout, not one per message;
    short enough that the next retry (minutes later) asks again;
  - at most `max_entries`, least recently used evicted first.

Under gevent the server process is monkey-patched before dnspython is
imported, so its sockets are cooperative.  Concurrent lookups of the same
name are not coalesced (each may query; the cache keeps the last answer).

Must not: import gevent (or dnslib, a test dependency), raise on DNS errors,
or wait longer than `timeout` per query.
"""

from __future__ import annotations

import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver

from . import routing
from .routing import Answer, NoData, NxDomain, Plan, Records, TempFail

log = logging.getLogger(__name__)

MAX_TTL = 86400.0  # a zone's huge TTL must not pin an answer for weeks
NEGATIVE_TTL = 60.0  # NXDOMAIN/NODATA without an SOA in the authority section
MAX_NEGATIVE_TTL = 3600.0
TEMPFAIL_TTL = 5.0
PER_TRY_TIMEOUT = 2.0  # one query to one server; `timeout` bounds the whole lookup
EDNS_PAYLOAD = 1232  # DNS flag day 2020: avoids fragmented UDP; larger answers go TCP


class Resolver:
    """MX and address lookups, answered as values and cached by TTL."""

    def __init__(
        self,
        nameservers: tuple[tuple[str, int], ...],
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = 10000,
    ) -> None:
        self._timeout = timeout
        self._clock = clock
        self._max_entries = max(1, max_entries)
        self._cache: OrderedDict[tuple[str, str], tuple[float, Answer]] = OrderedDict()
        self._rng = random.Random()
        self._dns: dns.resolver.Resolver | None = None
        self._unconfigured = ""
        try:
            if nameservers:
                res = dns.resolver.Resolver(configure=False)
                res.nameservers = [dns.nameserver.Do53Nameserver(ip, port)
                                   for ip, port in nameservers]
            else:
                res = dns.resolver.Resolver(configure=True)
        except dns.exception.DNSException as e:
            # No usable system configuration.  Static routes by IP still work,
            # so this is not fatal: every lookup defers with the reason.
            self._unconfigured = f"no DNS configuration: {e}"
            log.warning("resolver: %s", self._unconfigured)
        else:
            res.lifetime = timeout
            res.timeout = min(PER_TRY_TIMEOUT, timeout)
            res.use_edns(0, 0, EDNS_PAYLOAD)
            res.cache = None  # ours, on the injected clock
            res.search = []  # names are absolute; no search-list surprises
            self._dns = res

    # --- lookups ------------------------------------------------------------------

    def mx(self, domain: str) -> Answer:
        """MX records ((preference, exchange), ...) as given; exchanges normalized."""
        return self._cached(routing.normalize(domain), "MX")

    def addresses(self, name: str) -> Answer:
        """A and AAAA combined: Records of IP strings, IPv4 first.

        NxDomain if the name does not exist; NoData only if both types are
        NoData; TempFail if either failed and there are no records at all.
        An IP address is its own answer (no query).
        """
        literal = routing.ip_literal(name)
        if literal is not None:
            return Records((literal,))
        name = routing.normalize(name)
        a = self._cached(name, "A")
        if isinstance(a, NxDomain):
            return a  # the name does not exist for AAAA either: save the query
        aaaa = self._cached(name, "AAAA")
        values: tuple[str, ...] = ()
        for answer in (a, aaaa):
            if isinstance(answer, Records):
                values += cast(tuple[str, ...], answer.values)
        if values:
            return Records(values)
        for answer in (a, aaaa):
            if isinstance(answer, TempFail):
                return answer
        if isinstance(aaaa, NxDomain):
            return aaaa
        return NoData()

    def plan(
        self,
        domain: str,
        routes: Mapping[str, tuple[str, int]],
        port: int,
        rng: random.Random | None = None,
    ) -> Plan:
        """Where mail for `domain` goes: a static route, else MX (SPEC §5)."""
        lazy = _LazyAddresses(self)
        route = routing.static_route(domain, routes)
        if route is not None:
            return routing.plan_route(route[0], route[1], lazy)
        mx = routing.NoData() if domain.startswith("[") else self.mx(domain)
        return routing.plan(domain, mx, lazy, port, rng or self._rng)

    # --- the cache ------------------------------------------------------------------

    def _cached(self, name: str, rdtype: str) -> Answer:
        key = (name, rdtype)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None:
            if hit[0] > now:
                self._cache.move_to_end(key)
                return hit[1]
            del self._cache[key]
        answer, ttl = self._query(name, rdtype)
        if ttl > 0:
            self._cache[key] = (now + ttl, answer)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return answer

    # --- dnspython ----------------------------------------------------------------

    def _query(self, name: str, rdtype: str) -> tuple[Answer, float]:
        """One lookup as (answer, seconds to cache it)."""
        what = f"{rdtype} {name}"
        if self._dns is None:
            return TempFail(f"{what}: {self._unconfigured}"), TEMPFAIL_TTL
        try:
            qname = dns.name.from_text(name)  # absolute; IDNA-encodes U-labels
        except dns.exception.DNSException:
            return NxDomain(), NEGATIVE_TTL  # not a name DNS can hold (empty label, too long...)
        try:
            result = self._dns.resolve(qname, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as e:
            return NxDomain(), _negative_ttl(dict(e.kwargs.get("responses") or {}).values())
        except dns.resolver.NoAnswer as e:  # not raised with raise_on_no_answer=False; be safe
            response = e.kwargs.get("response")
            return NoData(), _negative_ttl([response] if response is not None else [])
        except dns.resolver.NoNameservers as e:  # SERVFAIL/REFUSED/bad TC from every server
            return TempFail(f"{what}: {_errors(e)}"), TEMPFAIL_TTL
        except dns.exception.Timeout:  # LifetimeTimeout: `timeout` spent
            return TempFail(f"{what}: timed out after {self._timeout:g}s"), TEMPFAIL_TTL
        except (dns.exception.DNSException, OSError) as e:  # YXDOMAIN, socket errors...
            return TempFail(f"{what}: {type(e).__name__}: {e}"), TEMPFAIL_TTL
        if result.rrset is None or len(result.rrset) == 0:
            return NoData(), _negative_ttl([result.response])
        ttl = min(float(result.chaining_result.minimum_ttl), MAX_TTL)
        if rdtype == "MX":
            mx = tuple((int(rd.preference), routing.normalize(rd.exchange.to_text()))
                       for rd in result.rrset)
            return Records(mx), ttl
        return Records(tuple(str(rd.address) for rd in result.rrset)), ttl


class _LazyAddresses(Mapping[str, Answer]):
    """routing.plan's `addresses`, looked up on first access (and only then)."""

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._seen: dict[str, Answer] = {}

    def __getitem__(self, name: str) -> Answer:
        if name not in self._seen:
            self._seen[name] = self._resolver.addresses(name)
        return self._seen[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._seen)

    def __len__(self) -> int:
        return len(self._seen)


def _negative_ttl(responses: Iterable[dns.message.Message | None]) -> float:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) from the authority section, else NEGATIVE_TTL."""
    ttls = [
        min(rrset.ttl, rrset[0].minimum)
        for response in responses
        if response is not None
        for rrset in response.authority
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset)
    ]
    return float(min(min(ttls), MAX_NEGATIVE_TTL)) if ttls else NEGATIVE_TTL


def _errors(e: dns.resolver.NoNameservers) -> str:
    """"127.0.0.1@5353 SERVFAIL; ..." from dnspython's per-server error list."""
    parts = []
    for error in e.kwargs.get("errors") or ():
        server, tcp, why = str(error[0]).removeprefix("Do53:"), error[1], error[3]
        text = str(why) or type(why).__name__  # dns.message.Truncated has no text
        parts.append(f"{server}{'/tcp' if tcp else ''} {text}")
    return "; ".join(parts) or "no nameserver answered"
