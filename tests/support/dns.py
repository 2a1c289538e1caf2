"""A small authoritative DNS server for tests (dnslib), on 127.0.0.1, UDP and TCP.

    zone = {
        "example.test": {"MX": [(10, "mx1.example.test"), (20, "mx2.example.test")]},
        "mx1.example.test": {"A": ["127.0.0.1"], "AAAA": ["::1"], "TTL": 60},
        "nullmx.test": {"MX": [(0, ".")]},
        "servfail.test": "SERVFAIL",        # also "REFUSED", "NXDOMAIN"
        "slow.test": "TIMEOUT",             # never answers
        "trunc.test": {"TRUNCATE": True, "MX": [...]},   # TC over UDP, full answer over TCP
    }
    with DnsServer(zone) as server:        # server.port: same number on UDP and TCP
        ...                                # server.zone["x.test"] = {...} changes answers live
        server.queries[("example.test", "MX")]  # queries received, UDP and TCP

Names are case-insensitive, with or without the trailing dot.  Per name:
record sets under "MX" ([(preference, exchange)]), "A", "AAAA" (lists of
addresses) and "CNAME" (a name); "TTL" is an int for every set of the name or
a dict {"MX": 5, ...} (default 300); "NEG_TTL" overrides the negative TTL.
A record set may instead be a behaviour: {"A": "SERVFAIL", "AAAA": ["::1"]}.
"TRUNCATE": True sets TC on UDP answers (dnspython retries over TCP, which
answers in full); "TRUNCATE": "NOTCP" also closes TCP connections unanswered.
Answers larger than the client's UDP size (512, or its EDNS payload size) are
truncated too, as a real server does.

Unknown names get NXDOMAIN; a known name without the asked type gets NOERROR
with no answer (NODATA).  Both carry an SOA in the authority section whose
minimum is `negative_ttl` (default 30 s; None: no SOA at all).

Must not: import gevent or hedwig (the pytest process is never patched), bind
anything but 127.0.0.1, or wait unboundedly: the threads poll a stop flag and
stop() joins them with a timeout.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections import Counter
from types import TracebackType
from typing import Any, Self

from dnslib import (  # type: ignore[import-untyped]
    AAAA,
    CNAME,
    MX,
    QTYPE,
    RCODE,
    RR,
    SOA,
    A,
    DNSRecord,
)

HOST = "127.0.0.1"
POLL = 0.05  # seconds between stop-flag checks in the serving loops
DEFAULT_TTL = 300
_BEHAVIOURS = ("SERVFAIL", "REFUSED", "NXDOMAIN", "TIMEOUT")


class DnsServer:
    def __init__(self, zone: dict[str, Any] | None = None, *,
                 negative_ttl: int | None = 30) -> None:
        self.zone: dict[str, Any] = zone if zone is not None else {}
        self.negative_ttl = negative_ttl
        self.queries: Counter[tuple[str, str]] = Counter()  # (name, type) -> count
        self.tcp_queries: Counter[tuple[str, str]] = Counter()
        self.port = 0
        self._stop = threading.Event()
        self._loops: list[threading.Thread] = []  # the UDP and the TCP accept loop
        self._conns: list[threading.Thread] = []  # one per TCP connection
        self._lock = threading.Lock()
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> Self:
        self._udp, self._tcp = _bind_pair()
        self.port = self._udp.getsockname()[1]
        for target, name in ((self._serve_udp, "udp"), (self._serve_tcp, "tcp")):
            thread = threading.Thread(target=target, name=f"dns-{name}-{self.port}", daemon=True)
            thread.start()
            self._loops.append(thread)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for thread in self._loops:  # the accept loop first: no connection starts after it
            thread.join(timeout)
        with self._lock:
            threads = self._loops + self._conns
        for thread in self._conns:
            thread.join(timeout)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        alive = [t.name for t in threads if t.is_alive()]
        assert not alive, f"DNS server threads did not stop: {alive}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def nameserver(self) -> tuple[str, int]:
        """For hedwig's Resolver / `[server.smtp] nameservers` ("127.0.0.1:PORT")."""
        return (HOST, self.port)

    def reset_counts(self) -> None:
        self.queries.clear()
        self.tcp_queries.clear()

    # --- serving --------------------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        self._udp.settimeout(POLL)
        while not self._stop.is_set():
            try:
                data, peer = self._udp.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self._answer(data, tcp=False)
            if reply is not None:
                try:
                    self._udp.sendto(reply, peer)
                except OSError:
                    pass

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        self._tcp.settimeout(POLL)
        while not self._stop.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True,
                                      name=f"dns-tcp-conn-{self.port}")
            with self._lock:
                self._conns = [t for t in self._conns if t.is_alive()] + [thread]
            thread.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(POLL)
        with conn:
            buf = b""
            idle = 0.0
            while not self._stop.is_set() and idle < 5.0:  # idle connections end after 5 s
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    idle += POLL
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                idle = 0.0
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    size = struct.unpack("!H", buf[:2])[0]
                    data, buf = buf[2:2 + size], buf[2 + size:]
                    reply = self._answer(data, tcp=True)
                    if reply is None:
                        return  # TIMEOUT / NOTCP: close without an answer
                    try:
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                    except OSError:
                        return

    # --- answering -------------------------------------------------------------------

    def _answer(self, data: bytes, *, tcp: bool) -> bytes | None:
        """The wire reply to one query, or None to stay silent."""
        try:
            request = DNSRecord.parse(data)
        except Exception:  # noqa: BLE001 - garbage in: no answer, like a real server
            return None
        if not request.questions:
            return None
        qname = str(request.q.qname).lower().rstrip(".")
        qtype = QTYPE.get(request.q.qtype, str(request.q.qtype))
        with self._lock:
            self.queries[(qname, qtype)] += 1
            if tcp:
                self.tcp_queries[(qname, qtype)] += 1
        entry = self._entry(qname)
        reply = request.reply()  # QR, AA, RD, RA, the question and the id
        if isinstance(entry, str):
            return self._behave(reply, qname, entry)
        if entry is None:
            reply.header.rcode = RCODE.NXDOMAIN
            self._add_soa(reply, qname, None)
            return bytes(reply.pack())
        truncate = entry.get("TRUNCATE", False)
        if tcp and truncate == "NOTCP":
            return None
        if not tcp and truncate:
            reply.header.tc = 1
            return bytes(reply.pack())
        behaviour = entry.get(qtype)
        if isinstance(behaviour, str) and qtype != "CNAME":  # {"A": "SERVFAIL", ...}
            return self._behave(reply, qname, behaviour)
        for rr in self._records(qname, qtype, entry):
            reply.add_answer(rr)
        if not reply.rr:
            self._add_soa(reply, qname, entry)
        wire = bytes(reply.pack())
        if not tcp and len(wire) > _udp_size(request):
            truncated = request.reply()
            truncated.header.tc = 1
            wire = bytes(truncated.pack())
        return wire

    def _behave(self, reply: DNSRecord, qname: str, behaviour: str) -> bytes | None:
        if behaviour not in _BEHAVIOURS:
            raise ValueError(f"zone[{qname!r}]: unknown behaviour {behaviour!r}")
        if behaviour == "TIMEOUT":
            return None
        reply.header.rcode = getattr(RCODE, behaviour)
        if behaviour == "NXDOMAIN":
            self._add_soa(reply, qname, None)
        return bytes(reply.pack())

    def _entry(self, qname: str) -> Any:
        for name, entry in list(self.zone.items()):
            if name.lower().rstrip(".") == qname:
                return entry
        return None

    def _records(self, qname: str, qtype: str, entry: dict[str, Any]) -> list[RR]:
        out: list[RR] = []
        if "CNAME" in entry and qtype != "CNAME":
            target = str(entry["CNAME"]).rstrip(".")
            out.append(RR(qname, QTYPE.CNAME, ttl=_ttl(entry, "CNAME"), rdata=CNAME(target)))
            target_entry = self._entry(target.lower())
            if isinstance(target_entry, dict):
                out += self._records(target.lower(), qtype, target_entry)
            return out
        ttl = _ttl(entry, qtype)
        for value in entry.get(qtype, ()):
            if qtype == "MX":
                preference, exchange = value
                out.append(RR(qname, QTYPE.MX, ttl=ttl, rdata=MX(exchange, preference)))
            elif qtype == "A":
                out.append(RR(qname, QTYPE.A, ttl=ttl, rdata=A(value)))
            elif qtype == "AAAA":
                out.append(RR(qname, QTYPE.AAAA, ttl=ttl, rdata=AAAA(value)))
            elif qtype == "CNAME":
                out.append(RR(qname, QTYPE.CNAME, ttl=ttl, rdata=CNAME(value)))
        return out

    def _add_soa(self, reply: DNSRecord, qname: str, entry: dict[str, Any] | None) -> None:
        minimum = entry.get("NEG_TTL", self.negative_ttl) if entry else self.negative_ttl
        if minimum is None:
            return
        apex = qname.rsplit(".", 1)[-1] or "."  # the TLD: a superdomain of every test name
        times = (1, 3600, 600, 86400, minimum)
        soa = SOA(f"ns.{apex}", f"hostmaster.{apex}", times)
        reply.add_auth(RR(apex, QTYPE.SOA, ttl=minimum, rdata=soa))


def _ttl(entry: dict[str, Any], qtype: str) -> int:
    ttl = entry.get("TTL", DEFAULT_TTL)
    return int(ttl.get(qtype, DEFAULT_TTL) if isinstance(ttl, dict) else ttl)


def _udp_size(request: DNSRecord) -> int:
    for rr in request.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, int(rr.rclass))
    return 512


def _bind_pair(attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same free port of 127.0.0.1."""
    for _ in range(attempts):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((HOST, 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((HOST, port))
        except OSError:
            udp.close()
            tcp.close()
            continue
        tcp.listen(16)
        return udp, tcp
    raise RuntimeError(f"no free port for both UDP and TCP after {attempts} attempts")
