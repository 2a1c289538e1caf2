"""Who may do what: relay control as pure decisions returning a Reply or None.

None means "allowed"; a Reply is the refusal the client gets, and the
session goes on. AUTH and the domain filters join here with the security issue.

Must not: do I/O or keep state.
"""

from __future__ import annotations

import functools
import ipaddress

from .smtp.replies import Reply

R530_AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
R554_RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=4096)
def in_networks(client_ip: str, networks: tuple[Network, ...]) -> bool:
    """Is the client in one of `networks`? Cached: clients reconnect a lot."""
    try:
        addr = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr.version == net.version and addr in net for net in networks)


def check_relay(may_relay: bool, authenticated: bool, auth_offered: bool) -> Reply | None:
    """RCPT: relaying is for trusted networks and authenticated clients only (SPEC §3)."""
    if may_relay or authenticated:
        return None
    return R530_AUTH_REQUIRED if auth_offered else R554_RELAY_DENIED
