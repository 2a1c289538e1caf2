"""Inbound SMTP against a real Hedwig process: what clients see, and what lands in the spool.

Clients are smtplib (in plain threads; this process is never patched) and raw
sockets that send exactly the bytes a test gives them. The spool is read with
tests/support/proc.py's independent parser of the documented file format.
"""

from __future__ import annotations

import json
import random
import re
import signal
import smtplib
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.proc import (
    HOST,
    HOSTNAME,
    RawClient,
    SpoolSnapshot,
    data_files,
    dot_stuff,
    queued_id,
    read_spool,
    split_received,
    spool_modes,
    tmp_files,
    wait_until,
)

THREADS = 16


# -- helpers ---------------------------------------------------------------------------


def smtp(port: int, timeout: float = 30.0) -> smtplib.SMTP:
    client = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=timeout)
    code, _ = client.ehlo()
    assert code == 250
    return client


def send(client: smtplib.SMTP, sender: str, rcpts: list[str], message: bytes,
         mail_options: tuple[str, ...] = ()) -> tuple[int, str]:
    """One transaction; returns the DATA reply (code, text). smtplib dot-stuffs on send."""
    code, text = client.mail(sender, list(mail_options))
    assert code == 250, (code, text)
    for rcpt in rcpts:
        code, text = client.rcpt(rcpt)
        assert code == 250, (code, text)
    code, text = client.data(message)
    return code, text.decode()


def make_message(t: int, i: int, rng: random.Random) -> tuple[str, list[str], bytes]:
    sender = f"sender{t}@client.test"
    rcpts = [f"rcpt{t}-{i}-{k}@dest{k}.test" for k in range(1 + (i % 3))]
    lines = [f"line {n} of message {t}-{i} " + "x" * rng.randrange(0, 120) for n in range(rng.randrange(1, 40))]
    if i % 5 == 0:
        lines[len(lines) // 2] = ".a line that smtplib dot-stuffs"
    body = "\r\n".join(lines)
    message = (
        f"From: <{sender}>\r\nTo: <{rcpts[0]}>\r\nSubject: test {t}-{i}\r\n"
        f"Message-ID: <{t}.{i}@client.test>\r\n\r\n{body}\r\n"
    ).encode()
    return sender, rcpts, message


def load(port: int, total: int, threads: int = THREADS, seed: int = 1) -> list[tuple[str, str, list[str], bytes]]:
    """`total` messages over `threads` connections at once; returns (id, sender, rcpts, message) per 250."""
    counts = [total // threads + (1 if t < total % threads else 0) for t in range(threads)]
    counts = [c for c in counts if c]
    start = threading.Barrier(len(counts))

    def worker(t: int) -> list[tuple[str, str, list[str], bytes]]:
        rng = random.Random(seed * 1000 + t)
        out = []
        client = smtp(port)
        try:
            start.wait(10)
            for i in range(counts[t]):
                sender, rcpts, message = make_message(t, i, rng)
                code, text = send(client, sender, rcpts, message)
                assert code == 250, (code, text)
                out.append((queued_id(text), sender, rcpts, message))
            client.quit()
        finally:
            client.close()
        return out

    with ThreadPoolExecutor(len(counts)) as pool:
        results = list(pool.map(worker, range(len(counts))))
    return [item for result in results for item in result]


def assert_spooled(spool: Path | SpoolSnapshot, msg_id: str, sender: str, rcpts: list[str],
                   message: bytes) -> dict:
    """`msg_id` is in the spool once, intact, holding Received + exactly `message`."""
    snap = spool if isinstance(spool, SpoolSnapshot) else read_spool(spool)
    envelope, stored = snap.one(msg_id)
    received, rest = split_received(stored)
    assert rest == message, f"{msg_id}: message bytes differ"
    assert envelope["msg_id"] == msg_id
    assert envelope["sender"] == sender
    assert list(envelope["recipients"]) == rcpts
    assert f"by {HOSTNAME} ".encode() in received and msg_id.encode() in received, received
    return envelope


def assert_modes(spool: Path) -> None:
    dirs, files = spool_modes(spool)
    bad_dirs = {p: oct(m) for p, m in dirs.items() if m != 0o700}
    bad_files = {p: oct(m) for p, m in files.items() if m != 0o600}
    assert not bad_dirs, f"directories not 0700: {bad_dirs}"
    assert not bad_files, f"files not 0600: {bad_files}"


def session(port: int, helo: bytes = b"EHLO client.test") -> RawClient:
    c = RawClient(port)
    c.expect(220)
    c.send(helo + b"\r\n")
    c.expect(250)
    return c


def raw_message(c: RawClient, sender: str, rcpt: str, stuffed_body: bytes, mail_params: str = "") -> object:
    c.cmd(f"MAIL FROM:<{sender}>{mail_params}", 250)
    c.cmd(f"RCPT TO:<{rcpt}>", 250)
    c.cmd("DATA", 354)
    c.send(stuffed_body + b".\r\n")
    return c.read_reply(30)


def nothing_spooled(spool: Path) -> None:
    assert read_spool(spool).count() == 0
    # The session removes its temporary file as it answers; allow the hub a moment.
    wait_until(lambda: tmp_files(spool) == [], 5, what="tmp/ empty")


# -- volume and integrity -----------------------------------------------------------------


@pytest.mark.parametrize("total", [1, 100, 1000])
def test_concurrent_messages_are_spooled_exactly(hedwig, total):
    server = hedwig()
    sent = load(server.port, total)
    ids = [item[0] for item in sent]
    assert len(ids) == total
    assert len(set(ids)) == total, "ids not unique"
    snap = read_spool(server.spool)
    assert snap.count() == total
    assert snap.ids == set(ids)
    for msg_id, sender, rcpts, message in sent:
        assert_spooled(snap, msg_id, sender, rcpts, message)
    assert tmp_files(server.spool) == []
    assert_modes(server.spool)


DOT_BODY = (
    b".\r\n"  # the message starts with a dot-line
    b"Subject: dots\r\n"
    b"\r\n"
    b".\r\n"
    b"..\r\n"
    b".x\r\n"
    b"...three\r\n"
    b" .not at line start\r\n"
    b"end.\r\n"
    b".\r\n"  # ...and ends with one
)


def test_dot_lines_round_trip_smtplib(hedwig):
    server = hedwig()
    client = smtp(server.port)
    code, text = send(client, "a@client.test", ["b@dest.test"], DOT_BODY)
    client.quit()
    assert code == 250, text
    assert_spooled(server.spool, queued_id(text), "a@client.test", ["b@dest.test"], DOT_BODY)


def test_dot_lines_and_8bit_round_trip_raw(hedwig):
    server = hedwig()
    eight_bit = bytes(range(0x80, 0x100))
    message = DOT_BODY + b"8bit: " + eight_bit + b"\r\n." + eight_bit + b"\r\n"
    with session(server.port) as c:
        reply = raw_message(c, "a@client.test", "b@dest.test", dot_stuff(message), " BODY=8BITMIME")
        assert reply.code == 250, reply.raw
        envelope = assert_spooled(server.spool, queued_id(reply.text), "a@client.test", ["b@dest.test"], message)
        assert envelope["body"] == "8BITMIME"
        c.cmd("QUIT", 221)


def test_8bit_with_smtplib_bytes(hedwig):
    server = hedwig()
    message = "Subject: caf\u00e9\r\n\r\nna\u00efve \u2014 \u65e5\u672c\u8a9e\r\n".encode() + bytes([0xFF, 0xFE, 0x80]) + b"\r\n"
    client = smtp(server.port)
    code, text = send(client, "a@client.test", ["b@dest.test"], message, ("BODY=8BITMIME",))
    client.quit()
    assert code == 250, text
    envelope = assert_spooled(server.spool, queued_id(text), "a@client.test", ["b@dest.test"], message)
    assert envelope["body"] == "8BITMIME"


def big_message(size: int, seed: int) -> bytes:
    """~`size` bytes of 76-octet lines; every 7th starts with a dot (stuffing across chunk edges)."""
    rng = random.Random(seed)
    alphabet = bytes(range(0x21, 0x7F))
    table = bytes(alphabet[i % len(alphabet)] for i in range(256))
    raw = rng.randbytes(size).translate(table)
    lines = [raw[i:i + 76] for i in range(0, size, 76)]
    for n in range(0, len(lines), 7):
        lines[n] = b"." + lines[n][1:]
    return b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"


@pytest.mark.timeout(90)
def test_20mib_message_round_trips(hedwig):
    server = hedwig()
    message = big_message(20 * 1024 * 1024, seed=20)
    client = smtp(server.port, timeout=60)
    code, text = send(client, "big@client.test", ["b@dest.test"], message)
    client.quit()
    assert code == 250, text
    assert_spooled(server.spool, queued_id(text), "big@client.test", ["b@dest.test"], message)


def test_sizes_around_the_spill_threshold_and_empty(hedwig):
    """Messages kept in memory and spilled to tmp/ (ARCHITECTURE: beyond 256 KiB) round-trip alike."""
    server = hedwig()
    client = smtp(server.port)
    sent = []
    for size in (1, 256 * 1024 - 600, 256 * 1024 - 300, 256 * 1024, 256 * 1024 + 1, 256 * 1024 + 300, 600_000):
        message = big_message(max(size - 18, 1), seed=size)
        code, text = send(client, "a@client.test", ["b@dest.test"], message)
        assert code == 250, (size, code, text)
        sent.append((queued_id(text), message))
    client.quit()
    with session(server.port) as c:  # an empty message: DATA, then the final dot at once
        reply = raw_message(c, "a@client.test", "b@dest.test", b"")
        assert reply.code == 250, reply.raw
        sent.append((queued_id(reply.text), b""))
        c.cmd("QUIT", 221)
    snap = read_spool(server.spool)
    for msg_id, message in sent:
        assert_spooled(snap, msg_id, "a@client.test", ["b@dest.test"], message)
    assert tmp_files(server.spool) == []


# -- size limits ------------------------------------------------------------------------

SMALL = {"server": {"max_message_size": 100000}}


def test_size_parameter_over_limit_is_refused_at_mail(hedwig):
    server = hedwig(SMALL)
    with session(server.port) as c:
        ehlo = c.cmd("EHLO client.test", 250)
        assert "SIZE 100000" in ehlo[1]
        reply = c.cmd("MAIL FROM:<a@client.test> SIZE=100001", 552)
        assert reply.text.startswith("5.3.4"), reply.raw
        c.cmd("MAIL FROM:<a@client.test> SIZE=100000", 250)
        c.cmd("QUIT", 221)
    assert read_spool(server.spool).count() == 0


def sized(n: int) -> bytes:
    head = b"Subject: sized\r\n\r\n"
    line = b"y" * 98 + b"\r\n"
    body = line * ((n - len(head)) // len(line))
    body += b"z" * (n - len(head) - len(body) - 2) + b"\r\n"
    message = head + body
    assert len(message) == n
    return message


def test_body_over_limit_is_refused_after_dot_and_session_goes_on(hedwig):
    server = hedwig(SMALL)
    client = smtp(server.port)
    code, text = send(client, "a@client.test", ["b@dest.test"], sized(150000))
    assert code == 552 and text.startswith("5.3.4"), (code, text)
    nothing_spooled(server.spool)
    code, text = send(client, "a@client.test", ["b@dest.test"], sized(100001))
    assert code == 552, (code, text)
    nothing_spooled(server.spool)
    # The same session goes on: a message of exactly the limit is accepted.
    exact = sized(100000)
    code, text = send(client, "a@client.test", ["c@dest.test"], exact)
    assert code == 250, (code, text)
    client.quit()
    assert read_spool(server.spool).ids == {queued_id(text)}
    assert_spooled(server.spool, queued_id(text), "a@client.test", ["c@dest.test"], exact)


# -- raw protocol over a real socket --------------------------------------------------------


def test_pipelined_batch_in_one_send(hedwig):
    server = hedwig()
    message = b"Subject: piped\r\n\r\n.dot\r\nbody\r\n"
    with RawClient(server.port) as c:
        c.expect(220)
        c.send(
            b"EHLO client.test\r\n"
            b"MAIL FROM:<a@client.test>\r\n"
            b"RCPT TO:<b@dest.test>\r\n"
            b"RCPT TO:<c@dest.test>\r\n"
            b"DATA\r\n" + dot_stuff(message) + b".\r\n"
            b"RSET\r\n"
            b"MAIL FROM:<d@client.test>\r\n"
            b"RCPT TO:<bad address>\r\n"
            b"NOOP\r\n"
            b"QUIT\r\n"
        )
        expected = [(250, None), (250, "2.1.0"), (250, "2.1.5"), (250, "2.1.5"), (354, None),
                    (250, "2.0.0 OK queued as"), (250, None), (250, "2.1.0"), (501, "5.1.3"),
                    (250, None), (221, None)]
        replies = [c.read_reply() for _ in expected]
        for (code, prefix), reply in zip(expected, replies):
            assert reply.code == code, [r.raw for r in replies]
            if prefix:
                assert reply.text.startswith(prefix), reply.raw
        assert c.wait_closed() == b""
    assert_spooled(server.spool, queued_id(replies[5].text), "a@client.test",
                   ["b@dest.test", "c@dest.test"], message)


def test_bare_lf_in_command_is_refused_and_session_goes_on(hedwig):
    """A bare LF never ends a command: the line, up to the next CRLF, is refused once, never run."""
    server = hedwig()
    with session(server.port) as c:
        c.send(b"NOOP\nMAIL FROM:<a@client.test>\r\n")
        reply = c.expect(500)
        assert reply.text.startswith("5.5.2"), reply.raw
        assert c.nothing_for(0.3), "more than one reply to one bad line"
        reply = c.cmd("RCPT TO:<b@dest.test>", 503)  # the MAIL was not smuggled in
        c.cmd("NOOP", 250)
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("QUIT", 221)
    assert read_spool(server.spool).count() == 0


def test_lf_dot_lf_does_not_end_data(hedwig):
    server = hedwig()
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: smuggle\r\n\r\nhello\n.\nMAIL FROM:<evil@client.test>\n")
        assert c.nothing_for(0.5), "server answered before <CRLF>.<CRLF>"
        c.send(b"\r\n.\r\n")
        reply = c.expect(554)
        assert reply.text.startswith("5.6.11"), reply.raw
        nothing_spooled(server.spool)
        c.cmd("NOOP", 250)
        c.cmd("QUIT", 221)


def test_connection_limit(hedwig):
    server = hedwig({"server": {"max_connections": 3}})
    clients: list[RawClient] = []
    try:
        deadline = time.monotonic() + 5
        while len(clients) < 3:  # the readiness probe may still hold a slot for an instant
            c = RawClient(server.port)
            if c.read_reply().code == 220:
                clients.append(c)
                continue
            c.close()
            assert time.monotonic() < deadline, "could not open 3 sessions"
        with RawClient(server.port) as fourth:
            reply = fourth.expect(421)
            assert reply.text.startswith("4.7.0"), reply.raw
            assert fourth.wait_closed() == b""
        for c in clients:  # the three sessions still work
            c.cmd("NOOP", 250)
        clients[0].cmd("QUIT", 221)
        clients[0].wait_closed()
        clients.pop(0).close()
        deadline = time.monotonic() + 5
        while True:  # the freed slot comes back once the session's greenlet has ended
            c = RawClient(server.port)
            code = c.read_reply().code
            if code == 220:
                clients.append(c)
                break
            c.close()
            assert code == 421 and time.monotonic() < deadline, code
        clients[-1].cmd("EHLO client.test", 250)
    finally:
        for c in clients:
            c.close()


def test_idle_command_timeout(hedwig):
    server = hedwig('[server]\ncmd_timeout = "1s"\n')  # overrides as TOML text
    with RawClient(server.port) as c:
        c.expect(220)
        c.cmd("EHLO client.test", 250)
        start = time.monotonic()
        reply = c.read_reply(timeout=5)
        elapsed = time.monotonic() - start
        assert reply.code == 421 and reply.text.startswith("4.4.2"), reply.raw
        assert 0.8 <= elapsed <= 2.5, elapsed
        assert c.wait_closed() == b""


def test_a_client_that_never_reads_is_cut_off(hedwig):
    """Replies pile up unread: the blocked write ends after cmd_timeout and the
    connection closes, while other clients are served."""
    server = hedwig('[server]\ncmd_timeout = "1s"\n')
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((HOST, server.port))
    sock.setblocking(False)
    noop = b"NOOP\r\n" * 1000
    sent = 0
    stalled = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # until both directions are full for 0.5 s
        try:
            sent += sock.send(noop)
            stalled = None
        except BlockingIOError:
            stalled = stalled or time.monotonic()
            if time.monotonic() - stalled > 0.5:
                break
            time.sleep(0.01)
    assert stalled is not None, "the server kept reading"
    with RawClient(server.port) as other:  # the worker is not stuck
        other.expect(220)
        other.cmd("QUIT", 221)
    time.sleep(3)  # cmd_timeout is 1 s
    sock.settimeout(5)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    # Cut off, it answers a small part of what was sent (not cut off: all of it).
    assert got.count(b"250 ") < sent // len(b"NOOP\r\n") // 2, (got.count(b"250 "), sent)


def test_data_timeout_cuts_off_a_trickling_client(hedwig):
    server = hedwig({"server": {"data_timeout": "2s"}})
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        c.cmd("DATA", 354)
        start = time.monotonic()
        next_byte = start
        got = b""
        closed = False
        c.sock.settimeout(0.05)
        while time.monotonic() - start < 5:
            if time.monotonic() >= next_byte:  # a byte every 0.3 s: never idle, never done
                next_byte += 0.3
                try:
                    c.send(b"x")
                except OSError:
                    closed = True
                    break
            try:
                chunk = c.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            got += chunk
        elapsed = time.monotonic() - start
        assert got.startswith(b"421 4.4.2"), got
        assert closed, "server did not close"
        assert 1.8 <= elapsed <= 3.0, elapsed
    nothing_spooled(server.spool)


def test_loopback_may_relay(hedwig):
    server = hedwig()
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        reply = c.cmd("RCPT TO:<someone@far-away.example>", 250)
        assert reply.text.startswith("2.1.5"), reply.raw
        c.cmd("QUIT", 221)


def test_twenty_bad_commands_close_the_session(hedwig):
    server = hedwig()
    with session(server.port) as c:
        for _ in range(19):
            assert c.cmd("XYZZY").code == 500
        c.cmd("NOOP", 250)  # 19 errors: the session is still usable
        c.send(b"XYZZY\r\n")
        assert c.expect(500)
        reply = c.expect(421)
        assert reply.text.startswith("4.7.0"), reply.raw
        assert c.wait_closed() == b""


def test_disk_reserve_refuses_mail(hedwig):
    server = hedwig({"server": {"disk_reserve": "1000TiB"}})
    with session(server.port) as c:
        reply = c.cmd("MAIL FROM:<a@client.test>", 452)
        assert reply.text.startswith("4.3.1"), reply.raw
        c.cmd("QUIT", 221)
    assert read_spool(server.spool).count() == 0


def test_protocol_limits_over_the_wire(hedwig):
    """Command lines up to 512 octets and text lines up to 1000 (both with CRLF), not one more."""
    server = hedwig()
    with session(server.port) as c:
        c.cmd(b"NOOP " + b"x" * (512 - 7), 250)
        reply = c.cmd(b"NOOP " + b"x" * (512 - 6), 500)
        assert reply.text.startswith("5.5.2"), reply.raw
        c.cmd("NOOP", 250)  # the session goes on
        longest = b"y" * 998 + b"\r\n"
        reply = raw_message(c, "a@client.test", "b@dest.test", b"Subject: long\r\n\r\n" + longest)
        assert reply.code == 250, reply.raw
        assert_spooled(server.spool, queued_id(reply.text), "a@client.test", ["b@dest.test"],
                       b"Subject: long\r\n\r\n" + longest)
        reply = raw_message(c, "a@client.test", "b@dest.test", b"Subject: longer\r\n\r\ny" + longest)
        assert reply.code in (500, 552), reply.raw  # SPEC §3: refused after DATA
        c.cmd("QUIT", 221)
    assert read_spool(server.spool).count() == 1


def test_bare_cr_nul_in_data_and_nul_in_command(hedwig):
    server = hedwig()
    with session(server.port) as c:
        reply = raw_message(c, "a@client.test", "b@dest.test", b"Subject: cr\r\n\r\nbare\rcr\r\n")
        assert reply.code == 554 and reply.text.startswith("5.6.11"), reply.raw
        reply = raw_message(c, "a@client.test", "b@dest.test", b"Subject: nul\r\n\r\nnul\0byte\r\n")
        assert reply.code == 554, reply.raw
        reply = c.cmd(b"NOOP \0", 501)
        assert reply.text.startswith("5.5.4"), reply.raw
        c.cmd("QUIT", 221)
    nothing_spooled(server.spool)


def test_replies_do_not_depend_on_how_bytes_arrive(hedwig):
    """The same dialogue sent whole and one byte at a time gets the same replies and message."""
    server = hedwig()
    message = b"Subject: bytes\r\n\r\n.lead\r\nx\r\n"
    dialogue = (b"EHLO client.test\r\nFROB\r\n" + b"MAIL FROM:<a@client.test>\r\nRCPT TO:<b@dest.test>\r\n"
                b"DATA\r\n" + dot_stuff(message) + b".\r\nRSET\r\nQUIT\r\n")
    transcripts = []
    for whole in (True, False):
        with RawClient(server.port) as c:
            c.expect(220)
            if whole:
                c.send(dialogue)
            else:
                c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for i in range(len(dialogue)):
                    c.send(dialogue[i:i + 1])
            replies = []
            while not replies or replies[-1].code != 221:
                replies.append(c.read_reply())
            transcripts.append([(r.code, re.sub(r"queued as \w+", "queued as ID", r.text)) for r in replies])
    assert transcripts[0] == transcripts[1]
    assert [code for code, _ in transcripts[0]] == [250, 500, 250, 250, 354, 250, 250, 221]
    snap = read_spool(server.spool)
    assert snap.count() == 2
    for msg_id in snap.ids:
        assert split_received(snap.one(msg_id)[1])[1] == message


def test_command_set_smoke(hedwig):
    server = hedwig()
    with RawClient(server.port) as c:
        greeting = c.expect(220)
        assert greeting.text == f"{HOSTNAME} ESMTP Hedwig"
        assert c.cmd("MAIL FROM:<a@client.test>", 503).text.startswith("5.5.1")
        helo = c.cmd("HELO client.test", 250)
        assert helo[1] == [HOSTNAME]  # no extensions after HELO
        ehlo = c.cmd("EHLO client.test", 250)
        for ext in ("PIPELINING", "SIZE 26214400", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
            assert ext in ehlo[1], ehlo.raw
        assert c.cmd("VRFY someone", 252).text.startswith("2.5.0")
        c.cmd("HELP", 214)
        c.cmd("NOOP", 250)
        assert c.cmd("FROB", 500).text.startswith("5.5.2")
        assert c.cmd("RCPT TO:<b@dest.test>", 503).text.startswith("5.5.1")
        assert c.cmd("DATA", 503).text.startswith("5.5.1")
        assert c.cmd("MAIL FROM:a@client.test", 501).text.startswith("5.")
        assert c.cmd("MAIL FROM:<a@client.test> FOO=BAR", 555).text.startswith("5.5.4")
        c.cmd("MAIL FROM:<a@client.test>", 250)
        assert c.cmd("MAIL FROM:<a@client.test>", 503).text.startswith("5.5.1")
        c.cmd("RSET", 250)
        c.cmd("QUIT", 221)
        assert c.wait_closed() == b""


def test_null_sender_is_kept(hedwig):
    server = hedwig()
    message = b"Subject: bounce\r\n\r\nnull sender\r\n"
    with session(server.port) as c:
        reply = raw_message(c, "", "b@dest.test", message)
        assert reply.code == 250, reply.raw
        envelope = assert_spooled(server.spool, queued_id(reply.text), "", ["b@dest.test"], message)
        assert envelope["sender"] == ""
        c.cmd("QUIT", 221)


def test_smtputf8(hedwig):
    server = hedwig()
    sender, rcpt = "d\u00e9j\u00e0@exampl\u00e9.test", "\u7528\u6237@\u4f8b\u5b50.test"
    message = "Subject: \u00fcnic\u00f6de\r\n\r\n\u65e5\u672c\r\n".encode()
    with session(server.port) as c:
        reply = c.cmd(f"MAIL FROM:<{sender}>".encode(), 553)
        assert reply.text.startswith("5.6.7"), reply.raw
        c.cmd(f"MAIL FROM:<{sender}> SMTPUTF8 BODY=8BITMIME".encode(), 250)
        c.cmd(f"RCPT TO:<{rcpt}>".encode(), 250)
        c.cmd("DATA", 354)
        c.send(message + b".\r\n")
        reply = c.expect(250)
        envelope = assert_spooled(server.spool, queued_id(reply.text), sender, [rcpt], message)
        assert envelope["smtputf8"] is True
        received = split_received(read_spool(server.spool).one(queued_id(reply.text))[1])[0]
        assert b"UTF8SMTP" in received
        c.cmd("QUIT", 221)


def test_recipient_limit(hedwig):
    server = hedwig({"server": {"max_recipients": 3}})
    message = b"Subject: many\r\n\r\nx\r\n"
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        for i in range(3):
            c.cmd(f"RCPT TO:<r{i}@dest.test>", 250)
        reply = c.cmd("RCPT TO:<r3@dest.test>", 452)
        assert reply.text.startswith("4.5.3"), reply.raw
        c.cmd("DATA", 354)
        c.send(message + b".\r\n")
        reply = c.expect(250)
        assert_spooled(server.spool, queued_id(reply.text), "a@client.test",
                       [f"r{i}@dest.test" for i in range(3)], message)
        c.cmd("QUIT", 221)


def test_relay_denied_outside_relay_networks(hedwig):
    server = hedwig({"server": {"relay_networks": ["10.0.0.0/8"]}})
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        reply = c.cmd("RCPT TO:<someone@far-away.example>", 554)
        assert reply.text.startswith("5.7.1"), reply.raw
        assert c.cmd("DATA", 554).code == 554  # no valid recipients
        c.cmd("QUIT", 221)
    nothing_spooled(server.spool)


def test_client_vanishing_mid_data_leaves_nothing(hedwig):
    server = hedwig()
    for size in (10_000, 3 * 1024 * 1024):  # kept in memory / spilled to tmp/
        c = session(server.port)
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        c.cmd("DATA", 354)
        c.send(big_message(size, seed=size))
        wait_until(lambda: size < 100_000 or tmp_files(server.spool), 5, what="message spilled to tmp/")
        c.close()
        nothing_spooled(server.spool)
    with session(server.port) as c:  # the server is fine
        c.cmd("QUIT", 221)


def test_spool_modes_with_permissive_umask(hedwig):
    server = hedwig(umask=0)
    sent = load(server.port, 20, threads=4)
    snap = read_spool(server.spool)
    for msg_id, sender, rcpts, message in sent:
        assert_spooled(snap, msg_id, sender, rcpts, message)
    assert_modes(server.spool)


# -- process life ------------------------------------------------------------------------


def assert_port_free(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((HOST, port))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_tells_idle_session_and_exits_0(hedwig, sig):
    server = hedwig()
    with session(server.port) as c:
        start = time.monotonic()
        server.signal(sig)
        reply = c.read_reply(timeout=10)
        assert reply.code == 421 and reply.text.startswith("4.3.2"), reply.raw
        assert c.wait_closed() == b""
        assert server.wait(10 - (time.monotonic() - start)) == 0, server.log_text()
    assert_port_free(server.port)
    assert "Traceback" not in server.log_text()


def test_sigterm_lets_a_message_in_progress_finish(hedwig):
    server = hedwig()
    message = b"Subject: late\r\n\r\nfinished after SIGTERM\r\n"
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        c.cmd("DATA", 354)
        c.send(message[:20])
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in server.log_text(), 5, what="worker stopping")
        assert server.running
        c.send(message[20:] + b".\r\n")
        reply = c.expect(250)
        assert_spooled(server.spool, queued_id(reply.text), "a@client.test", ["b@dest.test"], message)
        reply = c.read_reply()  # then the session is told the server is going away
        assert reply.code == 421 and reply.text.startswith("4.3.2"), reply.raw
        assert c.wait_closed() == b""
    assert server.wait(10) == 0


def test_sigterm_lets_an_open_transaction_finish(hedwig):
    server = hedwig()
    message = b"Subject: envelope first\r\n\r\nsent after SIGTERM\r\n"
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        server.signal(signal.SIGTERM)
        wait_until(lambda: "stopping" in server.log_text(), 5, what="worker stopping")
        c.cmd("DATA", 354)
        c.send(message + b".\r\n")
        reply = c.expect(250)
        assert_spooled(server.spool, queued_id(reply.text), "a@client.test", ["b@dest.test"], message)
        assert c.read_reply().code == 421
    assert server.wait(10) == 0


@pytest.mark.timeout(30)
def test_sigterm_with_a_stalled_client_mid_data_exits_within_10s(hedwig):
    """A client that stops sending mid-message cannot hold the server past its grace period."""
    server = hedwig()
    with session(server.port) as c:
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<b@dest.test>", 250)
        c.cmd("DATA", 354)
        c.send(big_message(400 * 1024, seed=4)[:-2])  # big enough to be spilled to tmp/, unfinished
        wait_until(lambda: tmp_files(server.spool), 5, what="message spilled to tmp/")
        start = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.wait(10) == 0, server.log_text()
        assert time.monotonic() - start < 10
        got = c.wait_closed(2)
        assert got in (b"", b"421 4.3.2 Service shutting down, closing connection\r\n"), got
    nothing_spooled(server.spool)
    assert_port_free(server.port)


def test_json_log_lines_and_no_message_bodies_in_logs(hedwig):
    server = hedwig({"log": {"format": "json"}})
    secret = "body-marker-3f1c9a"
    client = smtp(server.port)
    code, text = send(client, "a@client.test", ["b@dest.test"], f"Subject: {secret}\r\n\r\n{secret}\r\n".encode())
    client.quit()
    assert code == 250, text
    msg_id = queued_id(text)
    assert server.stop() == 0
    log = server.log_text()
    assert secret not in log
    entries = [json.loads(line) for line in log.splitlines() if line and not line.startswith("--- start")]
    assert entries and all({"level", "msg"} <= set(e) for e in entries), entries
    assert any(e.get("msg_id") == msg_id and e["msg"] == "accepted" for e in entries), \
        "no log line for the accepted message"


@pytest.mark.timeout(60)
def test_sigterm_under_load_exits_0_and_loses_nothing(hedwig):
    server = hedwig()
    acked: dict[str, tuple[str, list[str], bytes]] = {}
    lock = threading.Lock()
    go = threading.Barrier(THREADS + 1)
    refusals: list[str] = []

    def client(t: int) -> None:
        """Send until refused; a refusal at any step must be the shutdown's 421 4.3.2."""
        rng = random.Random(t)
        c = smtp(server.port)
        go.wait(10)
        try:
            for i in range(100_000):
                sender, rcpts, message = make_message(t, i, rng)
                steps = [lambda: c.mail(sender)] + [lambda r=r: c.rcpt(r) for r in rcpts] + [lambda: c.data(message)]
                for step in steps:
                    code, text = step()
                    if code not in (250, 354):
                        refusals.append(f"{code} {text.decode()}")
                        return
                with lock:
                    acked[queued_id(text.decode())] = (sender, rcpts, message)
        except smtplib.SMTPServerDisconnected:
            refusals.append("disconnected")
        except smtplib.SMTPResponseException as exc:
            refusals.append(f"{exc.smtp_code} {exc.smtp_error.decode()}")
        finally:
            c.close()

    threads = [threading.Thread(target=client, args=(t,), daemon=True) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    go.wait(10)
    wait_until(lambda: len(acked) >= 200, 20, what="200 messages accepted")
    start = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0, server.log_text()
    assert time.monotonic() - start < 10
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()
    assert len(refusals) == THREADS and all(r.startswith("421 4.3.2") for r in refusals), refusals
    snap = read_spool(server.spool)
    assert not snap.torn_tails, f"a clean stop left torn records: {snap.torn_tails}"
    assert tmp_files(server.spool) == []
    assert snap.ids >= set(acked)
    for msg_id, (sender, rcpts, message) in acked.items():
        assert_spooled(snap, msg_id, sender, rcpts, message)
    assert "Traceback" not in server.log_text()


def _last_start(log: str) -> str:
    return log.rsplit("--- start", 1)[-1]


def test_restart_keeps_the_queue(hedwig):
    server = hedwig()
    sent = load(server.port, 20, threads=4)
    big = big_message(2 * 1024 * 1024, seed=7)  # received through tmp/, copied into the log
    client = smtp(server.port)
    code, text = send(client, "big@client.test", ["b@dest.test"], big)
    client.quit()
    assert code == 250, text
    sent.append((queued_id(text), "big@client.test", ["b@dest.test"], big))
    assert read_spool(server.spool).count() == 21
    before = {p: p.read_bytes() for p in data_files(server.spool)}
    assert server.stop() == 0
    server.start().wait_ready()
    m = re.search(r"(\d+) queued", _last_start(server.log_text()))
    assert m and int(m[1]) == 21, server.log_text()
    snap = read_spool(server.spool)
    for msg_id, sender, rcpts, message in sent:
        assert_spooled(snap, msg_id, sender, rcpts, message)
    # ...and the restarted server takes new mail beside the old, never rewriting old files.
    more = load(server.port, 3, threads=1, seed=2)
    snap = read_spool(server.spool)
    assert snap.count() == 24
    assert snap.ids == {i for i, *_ in sent} | {i for i, *_ in more}
    assert {p: p.read_bytes() for p in before} == before
