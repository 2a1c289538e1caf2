"""Property-based tests of hedwig.smtp.protocol with hypothesis: arbitrary bytes, arbitrary chunks.

Three properties (the issue's "done when"):

1. Whatever bytes arrive, cut however, with whatever options and decisions, the
   protocol never raises and every byte it sends is part of a well-formed reply:
   lines `^[2-5]\\d\\d[ -]` ending in CRLF, no other CR or LF, one code per
   multi-line reply, nothing after a closing 221/421.
2. Inside DATA, a message ends exactly at the first `<CRLF>.<CRLF>` (counting the
   CRLF before the body) and nowhere else: bare CR/LF, `\\n.\\n`, `\\r.\\r` and the
   like never end it; and an accepted message's data is the un-stuffed body.
3. A message of arbitrary legal lines, dot-stuffed, comes out byte for byte, as one
   message, however the stream is cut.

Bounded: derandomized, a fixed number of examples, no example database, so the
module runs in a few seconds and the same way every time.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hedwig.smtp import auth as A
from hedwig.smtp import replies as R
from hedwig.smtp.protocol import (
    AuthResponse,
    AuthStart,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Limits,
    MailFrom,
    RcptTo,
    ServerProtocol,
    StartTls,
)
from hedwig.smtp.replies import Reply

LIMITS = Limits(hostname="mx.test", max_message_size=4000, max_recipients=3, max_errors=20)
PRELUDE = b"EHLO a.test\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"

BOUNDED = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies ----------------------------------------------------------------------------

TOKENS = [
    b"EHLO a.test\r\n", b"HELO a.test\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"RCPT TO:<c@d.example>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"QUIT\r\n", b"VRFY x\r\n",
    b"HELP\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"AUTH PLAIN AGEAYg==\r\n", b"AUTH LOGIN\r\n",
    b"AUTH CRAM-MD5\r\n", b"*\r\n", b"AGEAYg==\r\n", b"MAIL FROM:<a@b.example> SIZE=99999\r\n",
    b"\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r", b"\n",
    b"\0", b".", b"x" * 600, b"y" * 1200, b"\xff\xfe", "ü".encode(), PRELUDE,
]
stream_parts = st.one_of(st.sampled_from(TOKENS), st.binary(max_size=40))
streams = st.lists(stream_parts, max_size=40).map(b"".join)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` split at the given positions (mod its length), empty pieces dropped."""
    if not data:
        return []
    points = sorted({c % len(data) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:]) if b > a]


cut_points = st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=30)

REPLY_LINE = re.compile(rb"[2-5]\d\d[ -][^\r\n]*\Z")


def check_replies(out: bytes) -> list[bytes]:
    """Every line a reply line; multi-line replies keep one code; returns the replies."""
    assert out == b"" or out.endswith(b"\r\n"), out[-60:]
    replies: list[bytes] = []
    current: list[bytes] = []
    for line in out.split(b"\r\n")[:-1]:
        assert REPLY_LINE.match(line), line
        if current:
            assert line[:3] == current[0][:3], (current, line)
        current.append(line)
        if line[3:4] == b" ":
            replies.append(b"\r\n".join(current) + b"\r\n")
            current = []
    assert not current, f"unterminated multi-line reply {current!r}"
    return replies


# Decisions drawn from the test's own data: any reply a session could give.
CHOICES: dict[type, list[Reply]] = {
    MailFrom: [R.R250_SENDER_OK, Reply(550, "5.7.1", "No"), R.R452_DISK_FULL, R.R421_SPOOL_UNHEALTHY],
    RcptTo: [R.R250_RCPT_OK, Reply(550, "5.7.1", "No"), Reply(530, "5.7.0", "Authentication required")],
    DataEnd: [Reply(250, "2.0.0", "OK queued as X"), R.R451_LOCAL_ERROR],
    StartTls: [R.R220_TLS_READY, R.R454_TLS_UNAVAILABLE],
    AuthStart: [A.R334_EMPTY, A.R235_AUTH_OK, A.R535_AUTH_FAILED, A.R504_AUTH_MECH, A.R501_AUTH_DECODE,
                R.R421_AUTH_FAILURES],
    AuthResponse: [A.R334_PASSWORD, A.R235_AUTH_OK, A.R535_AUTH_FAILED, A.R501_AUTH_CANCELLED],
}


# -- 1. never raises, replies well-formed ----------------------------------------------------------


@BOUNDED
@given(data=streams, cuts=cut_points, starttls=st.booleans(), users=st.booleans(),
       needs_tls=st.booleans(), encrypted=st.booleans(), decisions=st.data())
def test_any_input_gives_only_well_formed_replies(data: bytes, cuts: list[int], starttls: bool, users: bool,
                                                  needs_tls: bool, encrypted: bool, decisions: st.DataObject) -> None:
    proto = ServerProtocol(LIMITS, starttls_offered=starttls, auth_mechanisms=("PLAIN", "LOGIN") if users else (),
                           auth_needs_tls=needs_tls, encrypted=encrypted)
    out = proto.greeting()
    for chunk in cut(data, cuts) + [b"\r\n.\r\nNOOP\r\n"]:
        proto.receive_data(chunk)
        upgrade = False
        for event in proto.events():
            assert isinstance(event, Event)
            if isinstance(event, DataChunk):
                assert event.data.endswith(b"\r\n")
            if event.needs_reply:
                reply = decisions.draw(st.sampled_from(CHOICES[type(event)]), label=type(event).__name__)
                proto.reply(event, reply)
                upgrade = upgrade or (isinstance(event, StartTls) and reply.code == 220)
        out += proto.data_to_send()
        if upgrade:
            proto.tls_started()
    proto.receive_data(b"")
    assert list(proto.events()) == []
    replies = check_replies(out)
    closing = [i for i, r in enumerate(replies) if r[:3] in (b"221", b"421")]
    if closing:
        assert closing[0] == len(replies) - 1, "replies after the session closed"
        assert proto.closed


# -- 2. the message ends at the first CRLF.CRLF and nowhere else ---------------------------------


def unstuff(body: bytes) -> bytes:
    lines = body.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


def accept_all(event: Event) -> Reply:
    return {MailFrom: R.R250_SENDER_OK, RcptTo: R.R250_RCPT_OK,
            DataEnd: Reply(250, "2.0.0", "OK queued as X")}[type(event)]


def run(chunks: list[bytes]) -> tuple[ServerProtocol, list[Event], bytes]:
    proto = ServerProtocol(LIMITS)
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        proto.receive_data(chunk)
        for event in proto.events():
            events.append(event)
            if event.needs_reply:
                proto.reply(event, accept_all(event))
        out += proto.data_to_send()
    return proto, events, out


body_parts = st.one_of(
    st.sampled_from([b"\r\n", b".", b"..", b"\r", b"\n", b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n",
                     b".\r\n", b"\r\n.\r", b"x", b"Subject: s\r\n", b"\0", b"\xff", b"z" * 300]),
    st.binary(max_size=12),
)
bodies = st.lists(body_parts, max_size=40).map(b"".join)


@BOUNDED
@given(body=bodies, cuts=cut_points)
def test_message_ends_only_at_crlf_dot_crlf(body: bytes, cuts: list[int]) -> None:
    framed = b"\r\n" + body  # the CRLF that ended DATA's line starts the first body line
    boundary = framed.find(b"\r\n.\r\n")
    proto, events, out = run(cut(PRELUDE + body, cuts))
    starts = sum(isinstance(e, DataStart) for e in events)
    ends = [e for e in events if isinstance(e, DataEnd)]
    assert starts == 1
    check_replies(out)
    if boundary < 0:
        # No CRLF.CRLF anywhere: whatever bare CRs, LFs and dots came, still inside the message.
        assert ends == [] and proto.in_data, (body, events)
        return
    assert len(ends) == 1, (body, events)
    first = events.index(ends[0])
    data = b"".join(e.data for e in events[:first] if isinstance(e, DataChunk))
    message = framed[2:boundary + 2]  # the body up to and including the CRLF before the dot
    if ends[0].error is None:
        assert data == unstuff(message), (body, data)
    else:
        assert unstuff(message).startswith(data), (body, data)


# -- 3. legal lines round-trip as one message ----------------------------------------------------

legal_lines = st.lists(
    st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\0", b"")),
    max_size=30,
).map(lambda lines: [b"." * (i % 3) + line if i % 4 == 0 else line for i, line in enumerate(lines)])


@BOUNDED
@given(lines=legal_lines, cuts=cut_points)
def test_stuffed_lines_come_out_as_one_message(lines: list[bytes], cuts: list[int]) -> None:
    message = b"".join(line + b"\r\n" for line in lines)
    stuffed = b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)
    proto, events, out = run(cut(PRELUDE + stuffed + b".\r\nNOOP\r\n", cuts))
    ends = [e for e in events if isinstance(e, DataEnd)]
    assert ends == [DataEnd(None)], events
    assert b"".join(e.data for e in events if isinstance(e, DataChunk)) == message
    assert check_replies(out)[-2:] == [b"250 2.0.0 OK queued as X\r\n", R.R250_NOOP.to_bytes()]
    assert not proto.in_data
