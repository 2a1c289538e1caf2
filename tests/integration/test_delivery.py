"""Outbound delivery against a real Hedwig process, a real upstream (aiosmtpd) and real DNS (dnslib).

SPEC §5: routes, MX by preference with fallback, implicit and null MX, DNS
failures, one transaction per domain, per-recipient outcomes, retries and
bounces, byte-exact bodies, opportunistic STARTTLS, pooled connections,
`disable_outbound`; SPEC §4: a finished message leaves the queue and its
segment is reclaimed.

Mail goes in through a raw socket (exact bytes, dot-stuffed here), comes out at
a `Sink`; outcomes are read from the spool's journal and bounced/ files with
tests/support/proc.py's independent readers, and from the log where SPEC says
what it says. Timeouts and retry delays are second-scale so every wait is a
short polled deadline.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.certs import make_certs
from tests.support.dns import DnsServer
from tests.support.proc import (
    outcome,
    HOST,
    HOSTNAME,
    HedwigProcess,
    RawClient,
    Replace,
    bounced_paths,
    dot_stuff,
    journal_files,
    queued_id,
    read_journal,
    read_spool,
    segment_files,
    split_received,
    wait_until,
)
from tests.support.sink import Sink, closed_port

SENDER = "sender@client.test"

# -- helpers ---------------------------------------------------------------------------


def delivery_config(*, routes: dict[str, str] | None = None, port: int | None = None,
                    dns: DnsServer | None = None, **server: Any) -> dict[str, Any]:
    """Base config overrides for delivery: only `routes` (no "*"), quick timeouts and retries."""
    smtp: dict[str, Any] = {"connect_timeout": "2s", "command_timeout": "3s"}
    if port is not None:
        smtp["port"] = port
    if dns is not None:
        smtp["nameservers"] = [f"{HOST}:{dns.port}"]
    settings: dict[str, Any] = {
        "outbound_local": True,
        "retry_initial_delay": "1s",
        "retry_max_delay": "2s",
        "routes": Replace(routes or {}),
        "smtp": smtp,
    }
    settings.update(server)
    return {"server": settings}


def message(tag: str, body: bytes = b"") -> bytes:
    return (f"From: {SENDER}\r\nTo: someone\r\nSubject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n\r\n"
            .encode() + (body or f"body of {tag}\r\n".encode()))


def send(port: int, rcpts: list[str], data: bytes, sender: str = SENDER,
         client: RawClient | None = None) -> str:
    """One transaction with exactly these bytes (dot-stuffed here); returns the queue id."""
    own = client is None
    c = client or RawClient(port)
    try:
        if own:
            c.expect(220)
            c.cmd("EHLO client.test", 250)
        c.cmd(f"MAIL FROM:<{sender}> BODY=8BITMIME", 250)
        for rcpt in rcpts:
            c.cmd(f"RCPT TO:<{rcpt}>", 250)
        c.cmd("DATA", 354)
        c.send(dot_stuff(data) + b".\r\n")
        msg_id = queued_id(c.expect(250).text)
        if own:
            c.cmd("QUIT", 221)
        return msg_id
    finally:
        if own:
            c.close()


def log_lines(proc: HedwigProcess, msg_id: str) -> list[str]:
    return [line for line in proc.log_text().splitlines() if f"msg_id={msg_id} " in line]


def wait_log(proc: HedwigProcess, pattern: str, timeout: float = 10.0) -> re.Match[str]:
    found: list[re.Match[str]] = []

    def seen() -> bool:
        m = re.search(pattern, proc.last_log(), re.M)
        if m:
            found.append(m)
        return m is not None

    try:
        wait_until(seen, timeout, interval=0.05, what=f"log line /{pattern}/")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.log_text()}") from None
    return found[0]


def bounced(proc: HedwigProcess, msg_id: str) -> tuple[bytes, str]:
    """(kept message, reason text) of a bounced message; both files must exist."""
    eml, reason = bounced_paths(proc.spool, msg_id)
    assert eml.is_file() and reason.is_file(), f"{msg_id}: not in bounced/: {list(proc.spool.glob('bounced/**/*'))}"
    return eml.read_bytes(), reason.read_text()


def stored(proc: HedwigProcess, msg_id: str) -> bytes:
    """The message as the spool keeps it: our Received header, then the client's bytes."""
    return read_spool(proc.spool).one(msg_id)[1]


class Refuser:
    """A listener on another loopback address that counts connections and greets them 4xx.

    It stands for a second mail host on the same port as the sink (SPEC's
    `[server.smtp] port` is one port for every MX host).
    """

    def __init__(self, host: str, port: int, greeting: bytes = b"421 4.3.2 not now\r\n") -> None:
        self.greeting = greeting
        self.connections = 0
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, port))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name=f"refuser-{host}")
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            with conn:
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()
        assert not self._thread.is_alive()


@pytest.fixture
def sinks() -> Iterator[Callable[..., Sink]]:
    """Factory for sinks, all stopped at teardown."""
    made: list[Sink] = []

    def make(*args: Any, **kwargs: Any) -> Sink:
        made.append(Sink(*args, **kwargs))
        return made[-1]

    yield make
    for sink in made:
        sink.stop()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as server:
        yield server


# -- routes and DNS -----------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_static_route_delivers(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"routed.test": f"{HOST}:{sink.port}"}))
    data = message("routed")
    msg_id = send(proc.port, ["alice@routed.test", "bob@Routed.Test"], data)
    assert outcome(proc, msg_id) == "delivered"
    [got] = sink.messages
    assert got.mail_from == SENDER
    assert got.rcpt_tos == ["alice@routed.test", "bob@Routed.Test"]
    assert split_received(got.data)[1] == data
    assert sink.helos and set(sink.helos) == {HOSTNAME}  # helo_hostname defaults to hostname
    assert re.search(rf"msg_id={msg_id} delivered rcpts=2 attempts=1\b", proc.log_text())


@pytest.mark.timeout(30)
def test_a_route_to_a_host_name_is_resolved(hedwig, sinks, dns) -> None:
    sink = sinks()
    dns.zone["smarthost.test"] = {"A": [HOST]}
    proc = hedwig(delivery_config(routes={"*": f"smarthost.test:{sink.port}"}, dns=dns))
    msg_id = send(proc.port, ["olga@anywhere.test"], message("smarthost"))
    assert outcome(proc, msg_id) == "delivered"
    assert [m.rcpt_tos for m in sink.messages] == [["olga@anywhere.test"]]
    assert dns.queries[("smarthost.test", "A")] >= 1
    assert dns.queries[("anywhere.test", "MX")] == 0  # a route bypasses MX lookup


@pytest.mark.timeout(30)
def test_an_address_literal_recipient_goes_to_that_address(hedwig, sinks, dns) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(port=sink.port, dns=dns))
    msg_id = send(proc.port, ["lit@[127.0.0.1]"], message("literal"))
    assert outcome(proc, msg_id) == "delivered"
    assert [m.rcpt_tos for m in sink.messages] == [["lit@[127.0.0.1]"]]
    assert not dns.queries  # no DNS for an address literal


@pytest.mark.timeout(30)
def test_null_sender_is_delivered_as_null_sender(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"*": f"{HOST}:{sink.port}"}))
    msg_id = send(proc.port, ["postmaster@any.test"], message("dsn"), sender="")
    assert outcome(proc, msg_id) == "delivered"
    assert [(m.mail_from, m.rcpt_tos) for m in sink.messages] == [("<>", ["postmaster@any.test"])]


@pytest.mark.timeout(30)
def test_mx_by_preference_falls_back_when_first_host_is_down(hedwig, sinks, dns) -> None:
    sink = sinks()
    # fallback.test: the preferred MX's address has nothing listening on the port;
    # greylist.test: the preferred MX (another loopback address, same port) greets 421.
    refuser = Refuser("127.0.0.3", sink.port)
    try:
        dns.zone.update({
            "fallback.test": {"MX": [(20, "mx2.fallback.test"), (10, "mx1.fallback.test")]},
            "mx1.fallback.test": {"A": ["127.0.0.2"]},
            "mx2.fallback.test": {"A": [HOST]},
            "greylist.test": {"MX": [(5, "busy.greylist.test"), (50, "ok.greylist.test")]},
            "busy.greylist.test": {"A": ["127.0.0.3"]},
            "ok.greylist.test": {"A": [HOST]},
            "preferred.test": {"MX": [(10, "good.preferred.test"), (20, "other.preferred.test")]},
            "good.preferred.test": {"A": [HOST]},
            "other.preferred.test": {"A": ["127.0.0.3"]},
        })
        proc = hedwig(delivery_config(port=sink.port, dns=dns))
        first = send(proc.port, ["a@preferred.test"], message("preferred"))
        assert outcome(proc, first) == "delivered"
        assert refuser.connections == 0, "the less preferred MX was tried though the first one works"

        ids = {send(proc.port, [f"b@{domain}"], message(domain)): domain
               for domain in ("fallback.test", "greylist.test")}
        for msg_id in ids:
            assert outcome(proc, msg_id) == "delivered"
            # delivered by the first attempt, through the second host
            assert re.search(rf"msg_id={msg_id} delivered rcpts=1 attempts=1\b", proc.log_text())
        assert refuser.connections == 1, "the preferred MX that greets 421 was tried once, first"
        assert sorted(m.rcpt_tos[0] for m in sink.messages) == [
            "a@preferred.test", "b@fallback.test", "b@greylist.test"]
        assert dns.queries[("fallback.test", "MX")] >= 1
    finally:
        refuser.stop()


@pytest.mark.timeout(30)
def test_implicit_mx_delivers_to_the_domains_address(hedwig, sinks, dns) -> None:
    sink = sinks()
    dns.zone["implicit.test"] = {"A": [HOST]}  # no MX: the domain itself is the mail host
    proc = hedwig(delivery_config(port=sink.port, dns=dns))
    msg_id = send(proc.port, ["carol@implicit.test"], message("implicit"))
    assert outcome(proc, msg_id) == "delivered"
    assert [m.rcpt_tos for m in sink.messages] == [["carol@implicit.test"]]
    assert dns.queries[("implicit.test", "MX")] >= 1 and dns.queries[("implicit.test", "A")] >= 1


@pytest.mark.timeout(30)
def test_null_mx_and_nxdomain_bounce_without_an_attempt(hedwig, sinks, dns) -> None:
    sink = sinks()
    dns.zone.update({
        "nullmx.test": {"MX": [(0, ".")], "A": [HOST]},  # the A record must not be used
        # "nowhere.test" is not in the zone: NXDOMAIN
    })
    proc = hedwig(delivery_config(port=sink.port, dns=dns))
    cases = {"null MX": "dave@nullmx.test", "does not exist": "erin@nowhere.test"}
    ids = {send(proc.port, [rcpt], message(why.replace(" ", "-"))): (why, rcpt)
           for why, rcpt in cases.items()}
    for msg_id, (why, rcpt) in ids.items():
        assert outcome(proc, msg_id) == "bounced"
        eml, reason = bounced(proc, msg_id)
        assert eml == stored(proc, msg_id), "bounced/ must keep the original message"
        assert f"<{rcpt}>" in reason and why in reason, reason
        assert msg_id in reason
        states, _ = read_journal(proc.spool)
        assert msg_id not in states, "a permanent DNS failure is not retried"
    assert sink.connections == 0 and sink.messages == []
    assert dns.queries[("nullmx.test", "A")] == 0


@pytest.mark.timeout(30)
def test_dns_servfail_defers(hedwig, sinks, dns) -> None:
    sink = sinks()
    dns.zone.update({
        "servfail.test": "SERVFAIL",  # the MX lookup fails
        "mxservfail.test": {"MX": [(10, "mx.mxservfail.test")]},
        "mx.mxservfail.test": {"A": "SERVFAIL", "AAAA": "SERVFAIL"},  # the MX host's address fails
        "silent.test": "TIMEOUT",  # no answer at all (the resolver gives up after 2 s)
    })
    proc = hedwig(delivery_config(port=sink.port, dns=dns, retry_initial_delay="1h",
                                  retry_max_delay="1h"))
    ids = {domain: send(proc.port, [f"frank@{domain}"], message(domain))
           for domain in ("servfail.test", "mxservfail.test", "silent.test")}
    for domain, msg_id in ids.items():
        line = wait_log(proc, rf"msg_id={msg_id} attempt domain={re.escape(domain)} .*outcome=deferred.*$").group(0)
        assert ("timed out" if domain == "silent.test" else "SERVFAIL") in line, line

    def deferred() -> bool:
        states = read_journal(proc.spool)[0]
        return all(states.get(msg_id, {}).get("attempts") == 1 for msg_id in ids.values())

    wait_until(deferred, 5, what="the deferrals to be journalled")
    states, done = read_journal(proc.spool)
    assert not done
    for msg_id in ids.values():
        assert states[msg_id]["due"] > time.time() + 600  # the next try is an hour away
    assert set(ids.values()) <= read_spool(proc.spool).ids  # still queued
    assert not list(proc.spool.glob("bounced/*/*"))
    assert sink.connections == 0
    # ... and still queued after a restart
    proc.restart()
    wait_log(proc, r"spool .*: 3 queued")


# -- transactions and per-recipient outcomes ---------------------------------------------------


@pytest.mark.timeout(30)
def test_one_transaction_per_domain_with_exactly_its_recipients(hedwig, sinks) -> None:
    one, two = sinks(), sinks()
    proc = hedwig(delivery_config(routes={"one.test": f"{HOST}:{one.port}",
                                          "two.test": f"{HOST}:{two.port}"}))
    rcpts = ["a@one.test", "x@two.test", "b@one.test", "y@two.test", "c@one.test"]
    data = message("two-domains")
    msg_id = send(proc.port, rcpts, data)
    assert outcome(proc, msg_id) == "delivered"
    assert [m.rcpt_tos for m in one.messages] == [["a@one.test", "b@one.test", "c@one.test"]]
    assert [m.rcpt_tos for m in two.messages] == [["x@two.test", "y@two.test"]]
    assert one.connections == 1 and two.connections == 1
    for sink in (one, two):
        assert sink.messages[0].mail_from == SENDER
        assert split_received(sink.messages[0].data)[1] == data


@pytest.mark.timeout(30)
def test_5xx_bounces_that_recipient_only(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply={"bad@five.test": "550 5.1.1 no such user here"})
    proc = hedwig(delivery_config(routes={"five.test": f"{HOST}:{sink.port}"}))
    data = message("five-hundred")
    msg_id = send(proc.port, ["good1@five.test", "bad@five.test", "good2@five.test"], data)
    assert outcome(proc, msg_id) == "bounced"
    [got] = sink.messages
    assert got.rcpt_tos == ["good1@five.test", "good2@five.test"]
    eml, reason = bounced(proc, msg_id)
    assert eml == got.data == stored(proc, msg_id)
    [line] = [ln for ln in reason.splitlines() if "@five.test" in ln]
    assert line.startswith("<bad@five.test>:") and "550" in line and "5.1.1 no such user here" in line
    assert sink.connections == 1  # bounced without a retry


@pytest.mark.timeout(30)
def test_4xx_is_retried_after_the_initial_delay_and_delivered(hedwig, sinks) -> None:
    tries: list[float] = []

    def rcpt_reply(address: str) -> str:
        tries.append(time.monotonic())
        return "451 4.3.0 try again later" if len(tries) == 1 else "250 OK"

    sink = sinks(rcpt_reply=rcpt_reply)
    proc = hedwig(delivery_config(routes={"four.test": f"{HOST}:{sink.port}"}))
    msg_id = send(proc.port, ["greg@four.test"], message("four-hundred"))
    assert outcome(proc, msg_id) == "delivered"
    assert len(tries) == 2 and len(sink.messages) == 1
    gap = tries[1] - tries[0]
    assert 0.75 <= gap <= 3.0, f"retry after {gap:.2f}s; retry_initial_delay is 1s ±20 %"
    lines = log_lines(proc, msg_id)
    assert any("outcome=deferred" in ln and "451" in ln for ln in lines), lines
    assert any(re.search(r"delivered rcpts=1 attempts=2\b", ln) for ln in lines), lines


@pytest.mark.timeout(30)
def test_a_retry_goes_only_to_the_recipients_still_pending(hedwig, sinks) -> None:
    replies = {"later@part.test": "452 4.2.2 mailbox full"}
    sink = sinks(rcpt_reply=lambda a: replies.get(a, "250 OK"))
    proc = hedwig(delivery_config(routes={"part.test": f"{HOST}:{sink.port}"}))
    msg_id = send(proc.port, ["now@part.test", "later@part.test"], message("partial"))
    sink.wait(lambda: len(sink.messages) == 1, what="the first delivery")
    replies.clear()
    assert outcome(proc, msg_id) == "delivered"
    assert [m.rcpt_tos for m in sink.messages] == [["now@part.test"], ["later@part.test"]]


@pytest.mark.timeout(30)
def test_max_retries_exhausted_bounces_with_the_reply(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply="450 4.2.1 mailbox busy, come back")
    proc = hedwig(delivery_config(routes={"busy.test": f"{HOST}:{sink.port}"}, max_retries=2))
    msg_id = send(proc.port, ["hank@busy.test"], message("busy"))
    assert outcome(proc, msg_id) == "bounced"
    eml, reason = bounced(proc, msg_id)
    assert eml == stored(proc, msg_id)
    [line] = [ln for ln in reason.splitlines() if ln.startswith("<hank@busy.test>")]
    assert "450" in line and "4.2.1 mailbox busy, come back" in line, line
    assert "2 attempts" in line, line
    assert sink.messages == []


# -- what goes over the wire ------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_body_is_delivered_byte_identical_after_our_received_header(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"bytes.test": f"{HOST}:{sink.port}"}))
    body = (
        b".leading dot\r\n"
        b"..two dots\r\n"
        b".\r\n"  # a line that is only a dot (stuffed on the wire both ways)
        b"...\r\n"
        b"caf\xc3\xa9 na\xefve \xff\xfe 8-bit bytes, not all UTF-8\r\n"
        b"trailing spaces   \r\n"
        b"\ttab-led line\r\n"
        b"\r\n"
        b"x" * 990 + b"\r\n"
        b"end.\r\n"
    )
    data = message("bytes", body)
    msg_id = send(proc.port, ["ivy@bytes.test"], data)
    assert outcome(proc, msg_id) == "delivered"
    [got] = sink.messages
    received, rest = split_received(got.data)
    assert rest == data
    assert got.data == stored(proc, msg_id)
    assert f"id {msg_id}".encode() in received and f"by {HOSTNAME}".encode() in received
    assert ["BODY=8BITMIME"] == [o for o in sink.mail_options[0] if o.startswith("BODY")]


@pytest.mark.timeout(30)
def test_big_message_is_delivered_byte_identical(hedwig, sinks) -> None:
    """Over 1 MiB: received through tmp/, read back off the hub, still exact."""
    sink = sinks()
    proc = hedwig(delivery_config(routes={"big.test": f"{HOST}:{sink.port}"}))
    rng = random.Random(7)
    alphabet = bytes(b for b in range(256) if b not in b"\r\n\0")
    lines = []
    for i in range(20000):
        line = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 120)))
        lines.append(b"." + line if i % 7 == 0 else line)
    data = message("big", b"\r\n".join(lines) + b"\r\n")
    assert len(data) > 1 << 20
    msg_id = send(proc.port, ["kim@big.test"], data)
    assert outcome(proc, msg_id, timeout=20) == "delivered"
    [got] = sink.messages
    assert split_received(got.data)[1] == data


@pytest.mark.timeout(30)
def test_a_pooled_connection_the_upstream_dropped_is_replaced(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"drop.test": f"{HOST}:{sink.port}"}))
    first = send(proc.port, ["p1@drop.test"], message("before-drop"))
    assert outcome(proc, first) == "delivered"
    sink.wait(lambda: sink.active == 1, what="the pooled connection")
    sink.drop_connections()  # an upstream closing idle clients
    second = send(proc.port, ["p2@drop.test"], message("after-drop"))
    assert outcome(proc, second) == "delivered"
    assert re.search(rf"msg_id={second} delivered rcpts=1 attempts=1\b", proc.log_text()), \
        "a stale pooled connection cost a delivery attempt"
    assert len(sink.messages) == 2 and sink.connections == 2


@pytest.mark.timeout(30)
def test_starttls_is_used_when_the_upstream_offers_it(hedwig, sinks, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    sink = sinks(tls=certs.good)
    proc = hedwig(delivery_config(routes={"tls.test": f"{HOST}:{sink.port}"}, outbound_local=False))
    data = [message("tls-1"), message("tls-2")]
    for i, d in enumerate(data):
        msg_id = send(proc.port, [f"judy{i}@tls.test"], d)
        assert outcome(proc, msg_id) == "delivered"
    assert [m.tls for m in sink.messages] == [True, True], \
        "delivered in plaintext though the upstream offered STARTTLS"
    assert [split_received(m.data)[1] for m in sink.messages] == data
    assert sink.connections == 1  # the TLS connection was pooled and reused


@pytest.mark.timeout(30)
def test_outbound_local_never_uses_starttls(hedwig, sinks, tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    sink = sinks(tls=certs.good)
    proc = hedwig(delivery_config(routes={"tls.test": f"{HOST}:{sink.port}"}))  # outbound_local
    msg_id = send(proc.port, ["judy@tls.test"], message("plain"))
    assert outcome(proc, msg_id) == "delivered"
    assert [m.tls for m in sink.messages] == [False]


@pytest.mark.timeout(40)
def test_connections_are_reused_across_messages(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"pool.test": f"{HOST}:{sink.port}"}, pool_size=4))
    count = 50
    ids = []
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        for i in range(count):
            ids.append(send(proc.port, [f"u{i}@pool.test"], message(f"pool-{i}"), client=client))
        client.cmd("QUIT", 221)
    sink.wait(lambda: len(sink.messages) >= count, timeout=20, what=f"{count} messages")
    for msg_id in ids:
        assert outcome(proc, msg_id) == "delivered"
    assert len(sink.messages) == count
    assert sink.max_active <= 4, f"{sink.max_active} connections open at once with pool_size = 4"
    assert sink.connections <= 4, f"{sink.connections} connections for {count} messages"
    assert sink.rsets >= count - sink.connections  # RSET before each reuse


@pytest.mark.timeout(30)
def test_a_pool_of_one_serves_two_hosts_by_eviction(hedwig, sinks) -> None:
    one, two = sinks(), sinks()
    proc = hedwig(delivery_config(routes={"one.test": f"{HOST}:{one.port}",
                                          "two.test": f"{HOST}:{two.port}"},
                                  pool_size=1, delivery_concurrency=4))
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        ids = [send(proc.port, [f"q{i}@{('one', 'two')[i % 2]}.test"], message(f"evict-{i}"), client=client)
               for i in range(12)]
    for msg_id in ids:
        assert outcome(proc, msg_id) == "delivered"
    assert len(one.messages) == 6 and len(two.messages) == 6
    assert one.max_active == 1 and two.max_active == 1


@pytest.mark.timeout(30)
def test_smtputf8_mail_needs_an_upstream_that_offers_it(hedwig, sinks) -> None:
    utf8, ascii_only = sinks(), sinks(smtputf8=False)
    proc = hedwig(delivery_config(routes={"utf8.test": f"{HOST}:{utf8.port}",
                                          "ascii.test": f"{HOST}:{ascii_only.port}"}))
    ids = {}
    for domain in ("utf8.test", "ascii.test"):
        with RawClient(proc.port) as c:
            c.expect(220)
            c.cmd("EHLO client.test", 250)
            c.cmd(f"MAIL FROM:<{SENDER}> SMTPUTF8", 250)
            c.cmd(f"RCPT TO:<jos\u00e9@{domain}>".encode(), 250)
            c.cmd("DATA", 354)
            c.send(dot_stuff(message(domain)) + b".\r\n")
            ids[domain] = queued_id(c.expect(250).text)
    assert outcome(proc, ids["utf8.test"]) == "delivered"
    assert [m.rcpt_tos for m in utf8.messages] == [["jos\u00e9@utf8.test"]]
    assert "SMTPUTF8" in utf8.mail_options[0]
    assert outcome(proc, ids["ascii.test"]) == "bounced"  # RFC 6531 §3.4: no way to name it
    _, reason = bounced(proc, ids["ascii.test"])
    assert "SMTPUTF8" in reason, reason
    assert ascii_only.messages == []


@pytest.mark.timeout(30)
def test_disable_outbound_drops_accepted_mail(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"*": f"{HOST}:{sink.port}"}, disable_outbound=True))
    ids = [send(proc.port, [f"k{i}@dropped.test"], message(f"drop-{i}")) for i in range(3)]
    for msg_id in ids:
        assert outcome(proc, msg_id) == "dropped"
        assert any("dropped" in ln for ln in log_lines(proc, msg_id))
    assert sink.connections == 0 and sink.messages == []
    assert not list(proc.spool.glob("bounced/*/*"))
    proc.restart()
    wait_log(proc, r"spool .*: 0 queued")


# -- leaving the queue ------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_delivered_mail_leaves_the_queue_and_its_segment_is_reclaimed(hedwig, sinks) -> None:
    sink = sinks()
    proc = hedwig(delivery_config(routes={"done.test": f"{HOST}:{sink.port}"}))
    ids = [send(proc.port, [f"l{i}@done.test"], message(f"done-{i}")) for i in range(3)]
    for msg_id in ids:
        assert outcome(proc, msg_id) == "delivered"
    [old] = segment_files(proc.spool)
    assert journal_files(proc.spool) == [old.with_suffix(".state")]

    proc.restart()
    wait_log(proc, r"spool .*: 0 queued")
    # Everything in the old segment is done and the new process never appends to it.
    wait_until(lambda: not old.exists() and not old.with_suffix(".state").exists(), 5,
               what=f"{old.name} and its journal to be reclaimed")

    new_id = send(proc.port, ["m@done.test"], message("after-restart"))
    assert outcome(proc, new_id) == "delivered"
    [new] = segment_files(proc.spool)
    assert new != old
    assert len(sink.messages) == 4  # nothing delivered twice
    proc.restart()
    wait_log(proc, r"spool .*: 0 queued")
    wait_until(lambda: segment_files(proc.spool) == [], 5, what=f"{new.name} to be reclaimed")


@pytest.mark.timeout(30)
def test_an_old_segment_is_reclaimed_when_its_last_message_is_delivered(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(delivery_config(routes={"late.test": f"{HOST}:{down}"}, max_retries=100))
    msg_id = send(proc.port, ["n@late.test"], message("late"))
    wait_until(lambda: msg_id in read_journal(proc.spool)[0], 10, what="the first attempt to fail")
    [old] = segment_files(proc.spool)
    proc.stop()
    sink = sinks(port=down)  # the upstream is back, on the routed port
    proc.start().wait_ready()
    wait_log(proc, r"spool .*: 1 queued")
    fresh = send(proc.port, ["o@late.test"], message("fresh"))  # goes to a newer segment
    assert outcome(proc, fresh) == "delivered"
    wait_log(proc, rf"msg_id={msg_id} delivered rcpts=1 attempts=[2-9]")
    # The old segment held only that message: once it is done, segment and journal go,
    # while the process keeps running.
    wait_until(lambda: not old.exists() and not old.with_suffix(".state").exists(), 5,
               what=f"{old.name} to be reclaimed")
    assert [m.rcpt_tos for m in sorted(sink.messages, key=lambda m: m.rcpt_tos)] == [
        ["n@late.test"], ["o@late.test"]]
    assert len(segment_files(proc.spool)) == 1
