"""transport.py against a real aiosmtpd sink over loopback sockets.

The pytest process is not monkey-patched: Transport runs on native threads
here (its pool uses `threading`, which gevent makes cooperative in a worker).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hedwig.outcome import BOUNCED, DEFERRED, DELIVERED
from hedwig.routing import Target
from hedwig.transport import Attempt, Transport
from tests.support.certs import CertSet, make_certs
from tests.support.sink import HOST, Sink, closed_port

pytestmark = pytest.mark.timeout(30)

SENDER = "sender@client.test"
MESSAGE = (b"From: a@client.test\r\nTo: b@sink.test\r\nSubject: hi\r\n\r\n"
           b"Hello.\r\n")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    return make_certs(Path(tmp_path_factory.mktemp("certs")))


@pytest.fixture(params=[True, False], ids=["pipelining", "lockstep"])
def sink(request: pytest.FixtureRequest) -> Iterator[Callable[..., Sink]]:
    """Factory: sink(**behaviour) -> a started Sink, stopped at teardown.

    Every test runs against a sink that offers PIPELINING and one that does not.
    """
    started: list[Sink] = []

    def start(*args: Any, **kwargs: Any) -> Sink:
        kwargs.setdefault("pipelining", request.param)
        s = Sink(*args, **kwargs)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def transport() -> Iterator[Callable[..., Transport]]:
    """Factory: transport(**overrides) -> a Transport, closed at teardown."""
    made: list[Transport] = []

    def make(**kwargs: Any) -> Transport:
        options: dict[str, Any] = dict(helo_hostname="client.test", tls="none",
                                       connect_timeout=5.0, command_timeout=5.0, pool_size=4)
        options.update(kwargs)
        t = Transport(**options)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def to(s: Sink | int, name: str = "localhost") -> Target:
    return Target(HOST, s if isinstance(s, int) else s.port, name)


def kinds(attempt: Attempt) -> list[str]:
    return [r.kind for r in attempt.results]


# --- one transaction ---------------------------------------------------------------


def test_delivers_byte_exact_with_dot_lines_and_8bit(sink, transport) -> None:
    s = sink()
    message = (b"From: a@client.test\r\nSubject: caf\xc3\xa9\r\n\r\n"
               b".leading dot\r\n..two dots\r\n.\r\n. \r\nmid.dle\r\n\xff\xfe raw 8-bit\r\n"
               b"\r\n.\r\nlast\r\n")
    attempt = transport().send([to(s)], SENDER, ["b@sink.test"], message)
    assert attempt.host == f"localhost[127.0.0.1]:{s.port}"
    assert kinds(attempt) == [DELIVERED]
    assert attempt.results[0].code == 250
    assert attempt.results[0].recipient == "b@sink.test"
    assert attempt.latency > 0
    [got] = s.messages
    assert got.data == message
    assert (got.mail_from, got.rcpt_tos, got.tls) == (SENDER, ["b@sink.test"], False)
    assert s.helos == ["client.test"]
    assert s.mail_options == [[f"SIZE={len(message)}", "BODY=8BITMIME"]]


def test_delivers_a_2mib_body(sink, transport) -> None:
    s = sink()
    line = b"".join(bytes([33 + (i % 90)]) for i in range(76)) + b"\r\n"
    body = b"Subject: big\r\n\r\n" + (line + b".dotted\r\n") * (2 * 1024 * 1024 // 86)
    assert len(body) > 2 * 1024 * 1024
    attempt = transport().send([to(s)], SENDER, ["b@sink.test"], body)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].data == body


def test_a_message_without_final_crlf_gets_one(sink, transport) -> None:
    s = sink()
    attempt = transport().send([to(s)], SENDER, ["b@sink.test"], b"Subject: x\r\n\r\nno end")
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].data == b"Subject: x\r\n\r\nno end\r\n"


@pytest.mark.parametrize("sender", ["", "<>"])
def test_null_sender_is_kept(sink, transport, sender: str) -> None:
    s = sink()
    attempt = transport().send([to(s)], sender, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].mail_from == "<>"


def test_per_recipient_results(sink, transport) -> None:
    s = sink(rcpt_reply={"gone@sink.test": "550 5.1.1 no such user",
                         "busy@sink.test": "450 4.2.0 busy"})
    rcpts = ["ok@sink.test", "gone@sink.test", "busy@sink.test", "ok2@sink.test"]
    attempt = transport().send([to(s)], SENDER, rcpts, MESSAGE)
    assert kinds(attempt) == [DELIVERED, BOUNCED, DEFERRED, DELIVERED]
    assert [r.recipient for r in attempt.results] == rcpts
    assert (attempt.results[1].code, attempt.results[1].text) == (550, "5.1.1 no such user")
    assert (attempt.results[2].code, attempt.results[2].text) == (450, "4.2.0 busy")
    assert s.messages[0].rcpt_tos == ["ok@sink.test", "ok2@sink.test"]


def test_no_data_when_every_recipient_is_refused(sink, transport) -> None:
    s = sink(rcpt_reply=lambda rcpt: "550 5.1.1 no such user")
    t = transport()
    attempt = t.send([to(s)], SENDER, ["x@sink.test", "y@sink.test"], MESSAGE)
    assert kinds(attempt) == [BOUNCED, BOUNCED]
    assert s.messages == []
    assert t.pooled == 1  # the connection is fine: kept


@pytest.mark.parametrize(("reply", "kind"), [("550 5.1.8 bad sender", BOUNCED),
                                              ("451 4.3.0 try later", DEFERRED)])
def test_mail_from_refusal_applies_to_everyone(sink, transport, reply: str, kind: str) -> None:
    s = sink(mail_reply=reply)
    attempt = transport().send([to(s)], SENDER, ["a@sink.test", "b@sink.test"], MESSAGE)
    assert kinds(attempt) == [kind, kind]
    code, _, text = reply.partition(" ")
    assert {(r.code, r.text) for r in attempt.results} == {(int(code), text)}
    assert s.messages == []


@pytest.mark.parametrize(("reply", "kind"), [("554 5.6.0 content rejected", BOUNCED),
                                              ("452 4.3.1 disk full", DEFERRED)])
def test_data_reply_applies_to_accepted_recipients(sink, transport, reply: str,
                                                   kind: str) -> None:
    s = sink(data_reply=reply, rcpt_reply={"gone@sink.test": "550 5.1.1 no such user"})
    attempt = transport().send([to(s)], SENDER, ["a@sink.test", "gone@sink.test"], MESSAGE)
    assert kinds(attempt) == [kind, BOUNCED]
    assert attempt.results[0].text == reply.partition(" ")[2]
    assert attempt.results[1].code == 550


def test_helo_when_ehlo_is_refused(sink, transport) -> None:
    s = sink(ehlo_reply="502 5.5.1 no EHLO here")
    attempt = transport().send([to(s)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.helos == ["client.test", "client.test"]
    assert s.mail_options == [[]]  # no extensions known after HELO: no SIZE, no BODY


def test_smtputf8_used_when_needed_and_offered(sink, transport) -> None:
    s = sink()
    attempt = transport().send([to(s)], "sénder@client.test", ["bö@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert "SMTPUTF8" in s.mail_options[0]
    assert (s.messages[0].mail_from, s.messages[0].rcpt_tos) == ("sénder@client.test",
                                                                ["bö@sink.test"])


def test_smtputf8_needed_but_not_offered_bounces(sink, transport) -> None:
    s = sink(smtputf8=False)
    t = transport()
    attempt = t.send([to(s)], SENDER, ["bö@sink.test", "plain@sink.test"], MESSAGE)
    assert kinds(attempt) == [BOUNCED, BOUNCED]
    assert attempt.results[0].text == f"SMTPUTF8 not supported by localhost[127.0.0.1]:{s.port}"
    assert s.mail_options == []
    # plain ASCII mail still goes through the same (pooled) connection
    assert kinds(t.send([to(s)], SENDER, ["plain@sink.test"], MESSAGE)) == [DELIVERED]
    assert s.connections == 1


# --- failover and failures -------------------------------------------------------------


def test_next_target_when_the_first_is_down(sink, transport) -> None:
    s = sink()
    down = closed_port()
    attempt = transport().send([to(down, "mx1.test"), to(s, "mx2.test")], SENDER,
                               ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert attempt.host == f"mx2.test[127.0.0.1]:{s.port}"


def test_next_target_after_a_421_greeting(sink, transport) -> None:
    grumpy = sink(greeting="421 4.3.2 go away")
    good = sink()
    attempt = transport().send([to(grumpy), to(good)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert attempt.host.endswith(f":{good.port}")
    assert grumpy.connections == 1 and grumpy.messages == []


def test_all_targets_down_defers_everyone_with_the_last_error(sink, transport) -> None:
    first, last = closed_port(), closed_port()
    attempt = transport().send([to(first, "mx1.test"), to(last, "mx2.test")], SENDER,
                               ["a@x.test", "b@x.test"], MESSAGE)
    assert attempt.host == ""
    assert kinds(attempt) == [DEFERRED, DEFERRED]
    for result in attempt.results:
        assert result.code == 0
        assert result.text.startswith(f"mx2.test[127.0.0.1]:{last}: connect: ")
        assert "refused" in result.text.lower()


def test_all_targets_refusing_the_greeting_defers_with_its_reply(sink, transport) -> None:
    s = sink(greeting="554 5.3.2 no service")
    attempt = transport().send([to(s)], SENDER, ["a@x.test"], MESSAGE)
    assert kinds(attempt) == [DEFERRED]  # connection-level: never bounces
    assert attempt.results[0].code == 554
    assert "greeting: 554 5.3.2 no service" in attempt.results[0].text


def test_no_targets_defers() -> None:
    t = Transport(helo_hostname="c.test", tls="none", connect_timeout=1, command_timeout=1,
                  pool_size=1)
    attempt = t.send([], SENDER, ["a@x.test"], MESSAGE)
    assert (attempt.host, kinds(attempt)) == ("", [DEFERRED])


def test_hang_after_data_times_out_and_defers(sink, transport) -> None:
    s = sink(hang_after_data=True)
    t = transport(command_timeout=1.0)
    started = time.monotonic()
    attempt = t.send([to(s)], SENDER, ["a@sink.test", "b@sink.test"], MESSAGE)
    assert time.monotonic() - started < 1.5
    assert kinds(attempt) == [DEFERRED, DEFERRED]
    assert attempt.results[0].text.startswith("end of data: ")
    assert "timed out" in attempt.results[0].text
    assert attempt.host.endswith(f":{s.port}")
    assert t.pooled == 0  # discarded


def test_drop_in_data_defers(sink, transport) -> None:
    s = sink(drop_in_data=True)
    t = transport()
    attempt = t.send([to(s)], SENDER, ["a@sink.test"], MESSAGE * 100)
    assert kinds(attempt) == [DEFERRED]
    assert attempt.results[0].code == 0
    assert t.pooled == 0
    s.drop_in_data = False  # the next send opens a fresh connection
    assert kinds(t.send([to(s)], SENDER, ["a@sink.test"], MESSAGE)) == [DELIVERED]
    assert s.connections == 2


def test_a_bounced_recipient_stays_bounced_when_the_connection_breaks(sink, transport) -> None:
    s = sink(hang_after_data=True, rcpt_reply={"gone@sink.test": "550 5.1.1 no such user"})
    attempt = transport(command_timeout=0.5).send([to(s)], SENDER,
                                                  ["gone@sink.test", "a@sink.test"], MESSAGE)
    assert kinds(attempt) == [BOUNCED, DEFERRED]


# --- TLS -------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["good", "bad"])
def test_opportunistic_uses_starttls_even_with_a_bad_certificate(sink, transport, certs,
                                                                 which: str) -> None:
    s = sink(tls=getattr(certs, which))
    attempt = transport(tls="opportunistic").send([to(s)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].tls is True
    assert s.helos == ["client.test", "client.test"]  # EHLO again after STARTTLS


def test_opportunistic_without_starttls_is_plaintext(sink, transport) -> None:
    s = sink()
    attempt = transport(tls="opportunistic").send([to(s)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].tls is False


def test_opportunistic_falls_back_to_plaintext_when_the_handshake_fails(sink, transport,
                                                                        certs) -> None:
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certs.good)
    context.set_ciphers("aNULL")  # nothing a client would accept: the handshake fails
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    s = sink(tls=context)
    attempt = transport(tls="opportunistic").send([to(s)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].tls is False
    assert s.connections == 2


def test_none_never_uses_starttls(sink, transport, certs) -> None:
    s = sink(tls=certs.good)
    attempt = transport(tls="none").send([to(s)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].tls is False


def test_required_with_a_good_certificate(sink, transport, certs) -> None:
    s = sink(tls=certs.good)
    t = transport(tls="required", ssl_context=certs.client_context())
    attempt = t.send([to(s, "localhost")], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert s.messages[0].tls is True
    # the IP address is in the certificate too
    assert kinds(t.send([to(s, "127.0.0.1")], SENDER, ["b@sink.test"], MESSAGE)) == [DELIVERED]


def test_required_without_starttls_tries_the_next_target(sink, transport, certs) -> None:
    plain = sink()
    secure = sink(tls=certs.good)
    t = transport(tls="required", ssl_context=certs.client_context())
    attempt = t.send([to(plain)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DEFERRED]
    assert "STARTTLS not offered" in attempt.results[0].text
    attempt = t.send([to(plain), to(secure)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DELIVERED]
    assert plain.messages == [] and secure.messages[0].tls is True


@pytest.mark.parametrize(("which", "name", "context"), [
    ("bad", "localhost", True),  # self-signed, wrong name
    ("good", "mx.other.test", True),  # trusted, but not for this name
    ("good", "localhost", False),  # system CAs only: the test CA is unknown
])
def test_required_refuses_an_unverifiable_certificate(sink, transport, certs, which: str,
                                                      name: str, context: bool) -> None:
    s = sink(tls=getattr(certs, which))
    t = transport(tls="required", ssl_context=certs.client_context() if context else None)
    attempt = t.send([to(s, name)], SENDER, ["b@sink.test"], MESSAGE)
    assert kinds(attempt) == [DEFERRED]
    assert attempt.host == ""
    assert "STARTTLS" in attempt.results[0].text and "certificate" in attempt.results[0].text
    assert s.messages == []
    assert s.connections == 1  # no plaintext retry under "required"


# --- the pool ------------------------------------------------------------------------------


def test_sequential_sends_reuse_one_connection_with_rset(sink, transport) -> None:
    s = sink()
    t = transport()
    for i in range(20):
        attempt = t.send([to(s)], SENDER, [f"r{i}@sink.test"], MESSAGE)
        assert kinds(attempt) == [DELIVERED]
    assert len(s.messages) == 20
    assert s.connections == 1
    assert s.rsets == 19
    assert t.pooled == 1


def test_pool_size_bounds_concurrent_connections(sink, transport) -> None:
    s = sink()
    t = transport(pool_size=2)
    failures: list[Any] = []

    def sender(n: int) -> None:
        for i in range(4):
            attempt = t.send([to(s)], SENDER, [f"t{n}-{i}@sink.test"], MESSAGE)
            if kinds(attempt) != [DELIVERED]:
                failures.append(attempt)

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert failures == []
    assert len(s.messages) == 20
    assert s.max_active <= 2
    assert s.connections <= 2
    assert t.pooled <= 2


def test_a_connection_dropped_while_idle_is_replaced(sink, transport) -> None:
    s = sink()
    t = transport()
    assert kinds(t.send([to(s)], SENDER, ["a@sink.test"], MESSAGE)) == [DELIVERED]
    s.drop_connections()
    assert kinds(t.send([to(s)], SENDER, ["b@sink.test"], MESSAGE)) == [DELIVERED]
    assert s.connections == 2
    assert len(s.messages) == 2


def test_idle_connections_expire(sink, transport) -> None:
    s = sink()
    t = transport(idle_timeout=0.2)
    t.send([to(s)], SENDER, ["a@sink.test"], MESSAGE)
    time.sleep(0.3)
    assert kinds(t.send([to(s)], SENDER, ["b@sink.test"], MESSAGE)) == [DELIVERED]
    assert s.connections == 2
    s.wait(lambda: s.active == 1, what="the expired connection to be closed")
    assert t.pooled == 1


def test_a_full_pool_evicts_the_least_recently_used_idle_connection(sink, transport) -> None:
    a, b = sink(), sink()
    t = transport(pool_size=1)
    for s in (a, b, a, b):
        assert kinds(t.send([to(s)], SENDER, ["x@sink.test"], MESSAGE)) == [DELIVERED]
        assert t.pooled == 1
    assert (a.connections, b.connections) == (2, 2)
    assert a.max_active == 1 and b.max_active == 1
    assert a.active + b.active <= 1


def test_waiting_for_a_slot_is_bounded_by_the_connect_timeout(sink, transport) -> None:
    slow, other = sink(hang_after_data=True), sink()
    t = transport(pool_size=1, connect_timeout=0.5, command_timeout=1.5)
    busy = threading.Thread(target=t.send, args=([to(slow)], SENDER, ["a@x.test"], MESSAGE))
    busy.start()
    slow.wait(lambda: len(slow.messages) == 1, what="the slow transaction to reach the dot")
    started = time.monotonic()
    attempt = t.send([to(other)], SENDER, ["b@x.test"], MESSAGE)
    assert 0.4 < time.monotonic() - started < 1.5
    assert kinds(attempt) == [DEFERRED]
    assert "no free connection" in attempt.results[0].text
    assert other.connections == 0
    busy.join(10)
    # the slot is free again once the slow transaction has timed out
    assert kinds(t.send([to(other)], SENDER, ["b@x.test"], MESSAGE)) == [DELIVERED]


def test_close_quits_pooled_connections(sink, transport) -> None:
    s = sink()
    t = transport()
    t.send([to(s)], SENDER, ["a@sink.test"], MESSAGE)
    assert s.active == 1 and t.pooled == 1
    t.close()
    assert t.pooled == 0
    s.wait(lambda: s.active == 0, what="the pooled connection to be closed")


# --- pipelining (RFC 2920) ------------------------------------------------------------

def test_refusals_leave_a_connection_usable(sink, transport) -> None:
    """MAIL refused, then every RCPT refused (pipelined: the replies still due are
    read first): the next message still goes over the same connection."""
    s = sink(mail_reply="550 5.1.8 bad sender")
    t = transport()
    assert kinds(t.send([to(s)], SENDER, ["a@sink.test", "b@sink.test"], MESSAGE)) == [BOUNCED, BOUNCED]
    s.mail_reply = None
    s.rcpt_reply = lambda rcpt: "550 5.1.1 no such user"
    assert kinds(t.send([to(s)], SENDER, ["c@sink.test"], MESSAGE)) == [BOUNCED]
    s.rcpt_reply = None
    assert kinds(t.send([to(s)], SENDER, ["d@sink.test"], MESSAGE)) == [DELIVERED]
    assert s.connections == 1
    assert [m.rcpt_tos for m in s.messages] == [["d@sink.test"]]


class _ScriptedServer:
    """A raw SMTP server offering PIPELINING that answers nothing until a whole group arrived.

    A lockstep client would wait for the MAIL reply forever, so each group
    received proves the commands came together. `groups` keeps them;
    `rset_reply` answers the RSET heading a group.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.groups: list[list[bytes]] = []
        self.connections = 0
        self.rset_reply = b"250 2.0.0 reset\r\n"
        self.data_reply = b"354 go\r\n"
        self.dot_reply = b"250 2.0.0 queued\r\n"
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(10)
        try:
            while True:
                conn, _ = self.listener.accept()
                self.connections += 1
                threading.Thread(target=self._session, args=(conn,), daemon=True).start()
        except OSError:
            pass

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        buf = b""

        def until(marker: bytes) -> bytes:
            nonlocal buf
            while marker not in buf:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buf += chunk
            head, _, buf = buf.partition(marker)
            return head + marker

        try:
            conn.sendall(b"220 scripted\r\n")
            until(b"\r\n")  # EHLO
            conn.sendall(b"250-scripted\r\n250 PIPELINING\r\n")
            while True:
                group = until(b"DATA\r\n").split(b"\r\n")[:-1]
                self.groups.append(group)
                replies = b""
                if group[0] == b"RSET":
                    replies += self.rset_reply
                    if not self.rset_reply.startswith(b"250"):
                        conn.sendall(replies)
                        return
                replies += b"250 2.1.0 ok\r\n" * (len(group) - 1 - (group[0] == b"RSET")) + self.data_reply
                conn.sendall(replies)
                if self.data_reply.startswith(b"354"):
                    until(b"\r\n.\r\n")
                    conn.sendall(self.dot_reply)
        except (OSError, EOFError) as exc:
            self.errors.append(repr(exc))
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()


def test_the_envelope_goes_in_one_write_and_rset_with_it(transport) -> None:
    server = _ScriptedServer()
    try:
        t = transport()
        target = Target(HOST, server.port, "scripted.test")
        rcpts = ["a@sink.test", "b@sink.test"]
        assert kinds(t.send([target], SENDER, rcpts, MESSAGE)) == [DELIVERED, DELIVERED]
        assert kinds(t.send([target], SENDER, ["c@sink.test"], MESSAGE)) == [DELIVERED]
        assert server.groups == [
            [b"MAIL FROM:<sender@client.test>", b"RCPT TO:<a@sink.test>", b"RCPT TO:<b@sink.test>", b"DATA"],
            [b"RSET", b"MAIL FROM:<sender@client.test>", b"RCPT TO:<c@sink.test>", b"DATA"],
        ]
        assert server.connections == 1
        # A pooled connection whose RSET is refused is closed; the message goes on a new one.
        server.rset_reply = b"421 4.3.2 closing\r\n"
        assert kinds(t.send([target], SENDER, ["d@sink.test"], MESSAGE)) == [DELIVERED]
        assert server.connections == 2
        assert server.groups[-1] == [b"MAIL FROM:<sender@client.test>", b"RCPT TO:<d@sink.test>", b"DATA"]
    finally:
        server.close()


@pytest.mark.parametrize("trouble", ["250 to DATA", "an extra reply after the dot"])
def test_a_reply_out_of_step_never_counts_as_delivered(transport, trouble: str) -> None:
    """Only 354 sends the message: a 250 where 354 belongs (a broken server, or
    every reply read one step late after an unsolicited one) defers, and the
    connection is not used again."""
    server = _ScriptedServer()
    try:
        t = transport()
        target = Target(HOST, server.port, "scripted.test")
        if trouble == "250 to DATA":
            server.data_reply = b"250 2.0.0 fine\r\n"
        else:
            server.dot_reply = b"250 2.0.0 queued\r\n250 2.0.0 extra\r\n"
            assert kinds(t.send([target], SENDER, ["a@sink.test"], MESSAGE)) == [DELIVERED]
        attempt = t.send([target], SENDER, ["b@sink.test"], MESSAGE)
        assert kinds(attempt) == [DEFERRED], attempt
        assert "unexpected reply" in attempt.results[0].text
        assert t.pooled == 0
    finally:
        server.close()
