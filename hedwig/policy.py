"""Who may do what: relay control, domain filters and AUTH throttling as decisions.

The checks return None for "allowed" or the Reply the client gets; the session
sends it and goes on (a refused sender or recipient never ends the session).

- Relay (RCPT): a client may give recipients if its address is in
  `relay_networks` or it authenticated; otherwise `530 5.7.0` when AUTH users
  exist, else `554 5.7.1` (SPEC §3). Hedwig is never an open relay by default:
  `relay_networks` defaults to loopback without users and to nothing with them.
- Filters (`[[filters]]`): `from_domain_filter` at MAIL, `to_domain_filter` at
  RCPT. `allow` lets only the listed domains through, `deny` refuses them. Each
  filter is a condition of its own, so several filters of one type must all
  pass. Domains match exactly and case-insensitively: `example.com` does not
  cover `mail.example.com` (list subdomains you mean). The null sender `<>` has
  no domain and is never refused by a from_domain_filter, so bounces still flow;
  a recipient without a domain (`<postmaster>`) passes deny lists and fails allow
  lists. Refusal: `550 5.7.1`.
- AUTH throttling: AuthThrottle counts failed AUTH attempts per client address
  (IPv4 address or IPv6 /64, see throttle_key) across sessions (a worker's
  table, fed an explicit clock): each failure waits a little longer before its
  535, and past a limit the client is cut off.

Must not: do I/O, sleep or read a clock. AuthThrottle is the one piece with state;
the worker owns it and passes `now` in.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from .config import FilterConfig
from .smtp.replies import Reply

R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R554_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
R550_SENDER_DOMAIN = Reply(550, "5.7.1", "Sender domain not allowed")
R550_RECIPIENT_DOMAIN = Reply(550, "5.7.1", "Recipient domain not allowed")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def in_networks(client_ip: str, networks: tuple[Network, ...]) -> bool:
    """Is the client in one of `networks`?"""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


def check_relay(may_relay: bool, authenticated: bool, auth_offered: bool) -> Reply | None:
    """RCPT: relaying is for trusted networks and authenticated clients only (SPEC §3).

    `auth_offered` means AUTH users exist: the client is told to authenticate
    rather than that relaying is impossible.
    """
    if may_relay or authenticated:
        return None
    return R530_AUTH_REQUIRED if auth_offered else R554_RELAY_DENIED


# -- domain filters ------------------------------------------------------------------


def domain_of(address: str) -> str:
    """The lower-cased domain of a mailbox ("" for `postmaster` or the null sender)."""
    at = address.rfind("@")
    return address[at + 1:].lower() if at >= 0 else ""


@dataclass(frozen=True, slots=True)
class DomainFilter:
    domains: frozenset[str]  # lower-cased
    allow: bool

    def passes(self, domain: str) -> bool:
        return (domain in self.domains) == self.allow


@dataclass(frozen=True, slots=True)
class Filters:
    senders: tuple[DomainFilter, ...] = ()
    recipients: tuple[DomainFilter, ...] = ()

    @classmethod
    def compile(cls, configs: Iterable[FilterConfig]) -> Filters:
        senders: list[DomainFilter] = []
        recipients: list[DomainFilter] = []
        for f in configs:
            compiled = DomainFilter(frozenset(d.lower() for d in f.domains), f.action == "allow")
            (senders if f.type == "from_domain_filter" else recipients).append(compiled)
        return cls(tuple(senders), tuple(recipients))


def check_sender(address: str, filters: Filters) -> Reply | None:
    """MAIL: every from_domain_filter must pass; the null sender always does."""
    if not address or not filters.senders:
        return None
    domain = domain_of(address)
    if all(f.passes(domain) for f in filters.senders):
        return None
    return R550_SENDER_DOMAIN


def check_recipient(address: str, filters: Filters) -> Reply | None:
    """RCPT (after relay control): every to_domain_filter must pass."""
    if not filters.recipients:
        return None
    domain = domain_of(address)
    if all(f.passes(domain) for f in filters.recipients):
        return None
    return R550_RECIPIENT_DOMAIN


# -- AUTH throttling -------------------------------------------------------------------

def throttle_key(client_ip: str) -> str:
    """Who a failure is counted against: the IPv4 address, or the IPv6 /64.

    One IPv6 host usually holds a whole /64 and could otherwise rotate through
    it to start every guess afresh.
    """
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return client_ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


AUTH_DELAY_STEP = 0.25  # seconds more before each 535, per recent failure from the address
AUTH_DELAY_MAX = 3.0
AUTH_SESSION_LIMIT = 10  # failures in one session: 535, then 421 and close
AUTH_ADDRESS_LIMIT = 20  # failures from one address within AUTH_WINDOW: cut off
AUTH_WINDOW = 600.0  # seconds a failure is remembered
AUTH_TABLE_SIZE = 10_000  # addresses remembered at most (oldest forgotten first)


class AuthThrottle:
    """Failed AUTH attempts per client address, forgotten after `window` seconds.

    The delay grows with the address's recent failures, not the session's, so
    reconnecting does not reset it; the session limit bounds one connection and
    the address limit bounds them all. Success does not clear an address's
    failures: one known account must not buy unlimited guesses at the others.
    The table is bounded: beyond `max_entries` addresses the least recently
    failing is dropped, so a spread-out attack costs memory only up to the bound.
    """

    def __init__(
        self,
        *,
        step: float = AUTH_DELAY_STEP,
        max_delay: float = AUTH_DELAY_MAX,
        session_limit: int = AUTH_SESSION_LIMIT,
        address_limit: int = AUTH_ADDRESS_LIMIT,
        window: float = AUTH_WINDOW,
        max_entries: int = AUTH_TABLE_SIZE,
    ) -> None:
        self.step = step
        self.max_delay = max_delay
        self.session_limit = session_limit
        self.address_limit = address_limit
        self.window = window
        self.max_entries = max_entries
        # address -> failure times, oldest first; the dict is ordered by latest failure
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def _expire(self, now: float) -> None:
        horizon = now - self.window
        table = self._failures
        while table:
            address, times = next(iter(table.items()))
            while times and times[0] <= horizon:
                times.popleft()
            if times:
                break  # the rest failed more recently than this one
            del table[address]

    def recent(self, address: str, now: float) -> int:
        """Failures from `address` within the window."""
        self._expire(now)
        times = self._failures.get(address)
        if not times:
            return 0
        horizon = now - self.window
        return sum(1 for t in times if t > horizon)

    def blocked(self, address: str, now: float) -> bool:
        """Is the address cut off (further AUTH gets 421 without being tried)?"""
        return self.recent(address, now) >= self.address_limit

    def record_failure(self, address: str, now: float) -> float:
        """Count a failure; returns how long to wait before answering it."""
        self._expire(now)
        times = self._failures.pop(address, None)
        if times is None:
            times = deque(maxlen=self.address_limit)
            while len(self._failures) >= self.max_entries:
                self._failures.popitem(last=False)
        times.append(now)
        self._failures[address] = times  # now the most recent
        return min(self.step * len(times), self.max_delay)

    def cut_off(self, address: str, session_failures: int, now: float) -> bool:
        """After a failure: must this session end (session or address limit reached)?"""
        return session_failures >= self.session_limit or self.blocked(address, now)
