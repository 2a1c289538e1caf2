"""Hostile input against a real Hedwig process that relays to a real upstream sink.

Every route (`"*"`) goes to an aiosmtpd sink (tests/support/sink.py) without TLS
(`outbound_local`), so "the upstream never sees two messages where one was sent"
is checked where it matters: on the next hop. What each attack must not do:

- bare LF / bare CR in commands and DATA, and the smuggling terminators `\\n.\\n`,
  `\\r\\n.\\n`, `\\n.\\r\\n`, `\\r.\\r`: never a line end, never a message boundary;
- NUL bytes, a 100 KB command line, a 10 MB header line: refused, session goes on,
  memory stays bounded;
- CRLF injected into addresses: never a second command;
- `<../../x@y>` addresses: no file outside the spool, spool names never from them;
- non-ASCII without SMTPUTF8: refused where RFC 6531 says so;
- 2,000 idle connections: a normal client still gets its mail through;
- DATA at one byte per second: cut off by the data deadline.

Everything on 127.0.0.1; every wait bounded.
"""

from __future__ import annotations

import os
import resource
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proc import (
    HOST,
    HedwigProcess,
    RawClient,
    dot_stuff,
    queued_id,
    read_spool,
    split_received,
    tmp_files,
    wait_until,
)
from tests.support.sink import Sink

GOOD = b"Subject: the good one\r\n\r\nonly this message may reach the sink\r\n"
SMUGGLED = (b"MAIL FROM:<smuggled@evil.example>\r\nRCPT TO:<victim@dest.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled body\r\n")


@pytest.fixture
def relay(hedwig, tmp_path: Path) -> Iterator[tuple[HedwigProcess, Sink]]:
    """Hedwig relaying everything to a sink, without TLS, retrying at once."""
    with Sink() as sink:
        proc = hedwig({"server": {
            "outbound_local": True,
            "routes": {"*": f"{HOST}:{sink.port}"},
            "retry_initial_delay": "1s",
            "data_timeout": "30s",
        }})
        yield proc, sink


def session(port: int) -> RawClient:
    c = RawClient(port)
    c.expect(220)
    c.cmd("EHLO client.test", 250)
    return c


def start_data(c: RawClient, sender: str = "a@client.test", rcpt: str = "b@dest.example") -> None:
    c.cmd(f"MAIL FROM:<{sender}>", 250)
    c.cmd(f"RCPT TO:<{rcpt}>", 250)
    c.cmd("DATA", 354)


def send_good(c: RawClient) -> str:
    start_data(c)
    c.send(GOOD + b".\r\n")
    return queued_id(c.expect(250, timeout=30).text)


def sink_gets_only_the_good_ones(sink: Sink, count: int) -> None:
    """Wait until the sink has `count` messages; each must be GOOD (after our Received)."""
    sink.wait(lambda: len(sink.messages) >= count, timeout=20, what=f"{count} message(s) at the sink")
    time.sleep(0.3)  # a smuggled second message would arrive with the first
    assert len(sink.messages) == count, [m.data[-120:] for m in sink.messages]
    for m in sink.messages:
        assert split_received(m.data)[1] == GOOD, m.data[-200:]
        assert m.mail_from == "a@client.test" and m.rcpt_tos == ["b@dest.example"], m


# -- bare CR and LF, smuggling ------------------------------------------------------------


@pytest.mark.parametrize("line", [
    b"MAIL FROM:<a@client.test>\nRCPT TO:<evil@far.example>\r\n",
    b"MAIL FROM:<a@client.test>\rRCPT TO:<evil@far.example>\r\n",
    b"MAIL FROM:<a@client.test>\r\rRCPT TO:<evil@far.example>\r\n",
    b"\nMAIL FROM:<a@client.test>\r\n",
], ids=["bare-lf", "bare-cr", "cr-cr", "leading-lf"])
def test_bare_line_ends_in_commands(relay, line: bytes) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        c.send(line)
        reply = c.expect(500)
        assert reply.text.startswith("5.5.2"), reply.raw
        assert c.nothing_for(0.2), "a second reply: part of the line was executed"
        c.cmd("RCPT TO:<b@dest.example>", 503)  # no MAIL was accepted
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b".\n"],
                         ids=["lf-dot-lf", "crlf-dot-lf", "lf-dot-crlf", "cr-dot-cr", "crlf-dot-cr", "dot-lf"])
def test_fake_terminators_never_split_a_message(relay, fake_end: bytes) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        start_data(c)
        # A message with a fake end and a whole second transaction hidden behind it.
        c.send(b"Subject: one\r\n\r\nfirst part" + fake_end + SMUGGLED + b".\r\n")
        reply = c.expect(554, timeout=30)  # bare CR/LF: refused whole, at the real end
        assert reply.text.startswith("5.6.11"), reply.raw
        assert c.nothing_for(0.3), "more replies: something after the fake end ran"
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)
    assert not any(b"smuggled" in m.data for m in sink.messages)


def test_bare_cr_and_lf_inside_data_lines(relay) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        for body in (b"Subject: x\r\n\r\nline\rmore\r\n", b"Subject: x\r\n\r\nline\nmore\r\n",
                     b"Subject: x\nBcc: injected@far.example\r\n\r\nbody\r\n"):
            start_data(c)
            c.send(body + b".\r\n")
            assert c.expect(554).text.startswith("5.6.11")
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)


def test_dot_lines_reach_the_sink_as_one_message(relay) -> None:
    # The legal look-alikes: lines that are just ".", ".." and ". x" are dot-stuffed and
    # come out the other side as one message, byte for byte.
    proc, sink = relay
    message = b"Subject: dots\r\n\r\n.\r\n..\r\n. x\r\n\r\n.\r\nend\r\n"
    with session(proc.port) as c:
        start_data(c)
        c.send(dot_stuff(message) + b".\r\n")
        c.expect(250)
        c.cmd("QUIT", 221)
    sink.wait(lambda: len(sink.messages) >= 1, timeout=20, what="the message at the sink")
    time.sleep(0.3)
    assert len(sink.messages) == 1
    assert split_received(sink.messages[0].data)[1] == message


# -- NUL, long lines --------------------------------------------------------------------------


def test_nul_bytes(relay) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        assert c.cmd(b"NO\0OP").code == 501
        assert c.cmd(b"MAIL FROM:<a\0@client.test>").code == 501
        start_data(c)
        c.send(b"Subject: nul\r\n\r\nbefore\0after\r\n.\r\n")
        assert c.expect(554).text.startswith("5.6.0")
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)


def test_100kb_command_line(relay) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        c.send(b"MAIL FROM:<" + b"a" * 100_000 + b"@client.test>\r\n")
        assert c.expect(500).text.startswith("5.5.2")
        assert c.nothing_for(0.3)
        c.send(b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n")
        assert c.expect(500).text.startswith("5.5.2")
        c.expect(250)
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_10mb_header_line(relay) -> None:
    proc, sink = relay
    worker, = proc.wait_workers(1)  # the process that receives the line
    before = _peak_rss_kib(worker)
    with session(proc.port) as c:
        start_data(c)
        chunk = b"a" * 65536
        c.send(b"X-Long: ")
        for _ in range(10 * 1024 * 1024 // len(chunk)):
            c.send(chunk)
        c.send(b"\r\n\r\nbody\r\n.\r\n")
        reply = c.expect(552, timeout=30)
        assert reply.text.startswith("5.6.0"), reply.raw
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)
    grown = _peak_rss_kib(worker) - before
    assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB for a 10 MB line"
    wait_until(lambda: tmp_files(proc.spool) == [], 5, what="tmp/ empty")


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mail_first, attack", [
    (False, b"MAIL FROM:<a@client.test\r\nRCPT TO:<evil@far.example>>\r\n"),
    (False, b"MAIL FROM:<a@client.test> SIZE=10\nRCPT TO:<evil@far.example>\r\n"),
    (False, b"MAIL FROM:<a@client.test>\rRCPT TO:<evil@far.example>\r\n"),
    (True, b"RCPT TO:<b@dest.example\r\nDATA>\r\n"),
    (True, b"RCPT TO:<b@dest.example>\nRCPT TO:<evil@far.example>\r\n"),
], ids=["mail-crlf", "param-lf", "mail-cr", "rcpt-crlf", "rcpt-lf"])
def test_crlf_injection_in_addresses(relay, mail_first: bool, attack: bytes) -> None:
    """What a client library that passes user input into an address would send."""
    proc, sink = relay
    with session(proc.port) as c:
        if mail_first:
            c.cmd("MAIL FROM:<a@client.test>", 250)
        c.send(attack)
        # Neither half is accepted: the injected "command" is never a command.
        replies = [c.read_reply()]
        while not c.nothing_for(0.3):
            replies.append(c.read_reply())
        assert all(r.code >= 500 for r in replies), [r.raw for r in replies]
        if mail_first:
            c.cmd("DATA", 503)  # no recipient was accepted
        c.cmd("RSET", 250)
        msg_id = send_good(c)
        c.cmd("QUIT", 221)
    envelope, _ = read_spool(proc.spool).one(msg_id)
    assert envelope["recipients"] == ["b@dest.example"]
    sink_gets_only_the_good_ones(sink, 1)


def _tree(root: Path, skip: Path) -> set[str]:
    found = set()
    for here, dirs, files in os.walk(root):
        if Path(here) == skip:
            dirs.clear()
            continue
        for name in files + dirs:
            found.add(os.path.relpath(os.path.join(here, name), root))
    return found


def test_path_like_addresses(hedwig, tmp_path: Path) -> None:
    proc = hedwig()  # mail stays queued (every delivery goes to a closed port, retried in an hour)
    outside = _tree(tmp_path, proc.spool)
    with session(proc.port) as c:
        assert c.cmd("MAIL FROM:<../../x@y.example>").code == 501
        assert c.cmd("MAIL FROM:<x@../../y>").code == 501
        assert c.cmd("MAIL FROM:</etc/passwd>").code == 501
        # Quoted local parts may hold anything printable: valid, and just text.
        c.cmd('MAIL FROM:<"../../x"@y.example>', 250)
        c.cmd('RCPT TO:<"../../../../tmp/evil"@dest.example>', 250)
        c.cmd("RCPT TO:<../x@dest.example>", 501)
        c.cmd("DATA", 354)
        c.send(GOOD + b".\r\n")
        msg_id = queued_id(c.expect(250).text)
        c.cmd("QUIT", 221)
    envelope, _ = read_spool(proc.spool).one(msg_id)
    assert envelope["sender"] == '"../../x"@y.example'
    assert envelope["recipients"] == ['"../../../../tmp/evil"@dest.example']
    # Nothing new outside the spool but the server's own log; nothing in it named after an address.
    assert _tree(tmp_path, proc.spool) - outside <= {"hedwig0/hedwig.log"}, _tree(tmp_path, proc.spool) - outside
    assert not Path("/tmp/evil").exists()
    for here, dirs, files in os.walk(proc.spool):
        for name in dirs + files:
            assert ".." not in name and "evil" not in name and '"' not in name, os.path.join(here, name)


def test_non_ascii_without_smtputf8(relay) -> None:
    proc, sink = relay
    with session(proc.port) as c:
        reply = c.cmd("MAIL FROM:<jörg@client.test>".encode(), 553)
        assert reply.text.startswith("5.6.7"), reply.raw
        c.cmd("MAIL FROM:<a@client.test>", 250)
        c.cmd("RCPT TO:<zoë@dest.example>".encode(), 553)
        c.cmd("RCPT TO:<b@dést.example>".encode(), 553)
        c.cmd(b"RCPT TO:<b@dest.example\xff>", 501)  # not even UTF-8
        c.cmd("RSET", 250)
        c.cmd("EHLO clïent.test".encode(), 250)  # a liberal EHLO: still one session
        send_good(c)
        c.cmd("QUIT", 221)
    sink_gets_only_the_good_ones(sink, 1)


# -- many connections, slow clients -------------------------------------------------------------


@pytest.mark.timeout(60)
def test_2000_idle_connections_and_mail_still_flows(relay) -> None:
    proc, sink = relay
    wanted = 2000 + 200
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"open file hard limit {hard} < {wanted}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    started = time.monotonic()
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection((HOST, proc.port), timeout=10))
        for s in idle:  # every one of them was served its greeting
            got = b""
            while not got.endswith(b"\r\n"):
                chunk = s.recv(512)
                assert chunk, "closed by the server"
                got += chunk
            assert got.startswith(b"220 "), got
        opened = time.monotonic() - started
        with smtplib.SMTP(HOST, proc.port, local_hostname="client.test", timeout=10) as c:
            assert c.sendmail("a@client.test", ["b@dest.example"], GOOD) == {}  # nobody refused
        sink_gets_only_the_good_ones(sink, 1)
        assert proc.running
        assert time.monotonic() - started < 20, (opened, time.monotonic() - started)
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_data_at_one_byte_per_second_is_cut_off(hedwig) -> None:
    proc = hedwig({"server": {"data_timeout": "3s"}})
    with session(proc.port) as c:
        start_data(c)
        started = time.monotonic()
        got = b""
        closed = False
        c.sock.settimeout(0.05)
        next_byte = started
        while time.monotonic() - started < 8:
            if time.monotonic() >= next_byte:
                next_byte += 1.0
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
        elapsed = time.monotonic() - started
    assert got.startswith(b"421 4.4.2"), got
    assert closed and 2.5 <= elapsed <= 5.0, (closed, elapsed)
    assert read_spool(proc.spool).count() == 0
    wait_until(lambda: tmp_files(proc.spool) == [], 5, what="tmp/ empty")
