"""hedwig.smtp.protocol: the sans-I/O server state machine, driven with bytes only.

Every dialogue goes through `drive()`, which feeds the same bytes whole, one byte at
a time and in seeded random chunkings, answers the events with a default decider and
checks that all of them give the same replies and the same events (STYLE §9, h11's
"any chunking, same result"). No sockets, no gevent.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pytest

from hedwig.smtp import auth as A
from hedwig.smtp import replies as R
from hedwig.smtp.address import MailParams
from hedwig.smtp.protocol import (
    MAX_COMMAND_LINE,
    MAX_TEXT_LINE,
    AuthResponse,
    AuthStart,
    DataChunk,
    DataEnd,
    DataStart,
    Ehlo,
    Event,
    Limits,
    MailFrom,
    RcptTo,
    Reset,
    ServerProtocol,
    StartTls,
)
from hedwig.smtp.replies import Reply

# -- the driver ------------------------------------------------------------------

LIMITS = Limits(hostname="mx.test", max_message_size=10_000, max_recipients=5)
QUEUED = Reply(250, "2.0.0", "OK queued as X")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
# Addresses in this domain are refused by the default decider, so pipelines with
# refusals need no decider of their own.
REFUSED_DOMAIN = "refused.example"
R550_SENDER = Reply(550, "5.7.1", "Sender refused")
R550_RCPT = Reply(550, "5.1.1", "No such user")

Decider = Callable[[Event], Reply]

# The one credential the default decider takes (PLAIN, "\0alice\0secret" in base64).
GOOD_PLAIN = "AGFsaWNlAHNlY3JldA=="


def decide(event: Event) -> Reply:
    """MAIL -> 250 2.1.0, RCPT -> 250 2.1.5, the final dot -> 250 queued, STARTTLS -> 220.

    AUTH: without an initial response 334, then GOOD_PLAIN -> 235, "*" -> 501, else 535.
    """
    if isinstance(event, AuthStart):
        if event.initial is None:
            return A.R334_EMPTY
        return A.R235_AUTH_OK if event.initial == GOOD_PLAIN else A.R535_AUTH_FAILED
    if isinstance(event, AuthResponse):
        if event.line == "*":
            return A.R501_AUTH_CANCELLED
        return A.R235_AUTH_OK if event.line == GOOD_PLAIN else A.R535_AUTH_FAILED
    if isinstance(event, MailFrom):
        return R550_SENDER if event.address.endswith("@" + REFUSED_DOMAIN) else R.R250_SENDER_OK
    if isinstance(event, RcptTo):
        return R550_RCPT if event.address.endswith("@" + REFUSED_DOMAIN) else R.R250_RCPT_OK
    if isinstance(event, DataEnd):
        return QUEUED
    if isinstance(event, StartTls):
        return TLS_READY
    raise AssertionError(f"no decision for {event!r}")


_REPLY_LINE = re.compile(rb"\d{3}[ -]")


def split_replies(out: bytes) -> list[bytes]:
    """Reply bytes -> one item per (possibly multi-line) reply; checks the framing."""
    assert out == b"" or out.endswith(b"\r\n"), out[-80:]
    replies: list[bytes] = []
    current = b""
    for line in out.split(b"\r\n")[:-1]:
        assert _REPLY_LINE.match(line), line
        assert b"\r" not in line and b"\n" not in line, line
        current += line + b"\r\n"
        if line[3:4] == b" ":
            replies.append(current)
            current = b""
    assert current == b"", f"unterminated multi-line reply {current!r}"
    return replies


@dataclass
class Result:
    proto: ServerProtocol
    out: bytes
    events: list[Event]

    @property
    def replies(self) -> list[bytes]:
        return split_replies(self.out)

    @property
    def codes(self) -> list[int]:
        return [int(reply[:3]) for reply in self.replies]

    @property
    def commands(self) -> list[Event]:
        """Every event except DataChunk (whose boundaries depend on the chunking)."""
        return [e for e in self.events if not isinstance(e, DataChunk)]

    @property
    def messages(self) -> list[tuple[bytes, DataEnd | None]]:
        """(concatenated DataChunk data, DataEnd or None if unfinished) per DATA."""
        out: list[tuple[bytes, DataEnd | None]] = []
        data: bytes | None = None
        for event in self.events:
            if isinstance(event, DataStart):
                data = b""
            elif isinstance(event, DataChunk):
                assert data is not None, "DataChunk outside DATA"
                data += event.data
            elif isinstance(event, DataEnd):
                assert data is not None, "DataEnd outside DATA"
                out.append((data, event))
                data = None
        if data is not None:
            out.append((data, None))
        return out

    @property
    def data(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))


def feed(
    chunks: Iterable[bytes],
    *,
    decider: Decider = decide,
    limits: Limits = LIMITS,
    **kwargs: Any,
) -> Result:
    """Feed chunks as a session would: receive, drain events, answer, collect output."""
    proto = ServerProtocol(limits, **kwargs)
    events: list[Event] = []
    out = b""
    for chunk in chunks:
        assert chunk, "an empty chunk would mean EOF"
        proto.receive_data(chunk)
        tls = False
        for event in proto.events():
            events.append(event)
            if isinstance(event, DataChunk):
                assert event.data and event.data.endswith(b"\r\n"), event
            if event.needs_reply:
                reply = decider(event)
                proto.reply(event, reply)
                tls = tls or (isinstance(event, StartTls) and reply.code == 220)
        out += proto.data_to_send()
        if tls:
            proto.tls_started()
    return Result(proto, out, events)


_CHUNK_SIZES = (1, 2, 3, 5, 7, 13, 64, 511, 512, 999, 1000, 1001, 4096)


def random_chunks(data: bytes, rng: random.Random) -> list[bytes]:
    chunks = []
    i = 0
    while i < len(data):
        n = rng.choice(_CHUNK_SIZES) if rng.random() < 0.7 else rng.randint(1, 2 * len(data))
        chunks.append(data[i:i + n])
        i += n
    return chunks


def assert_same(a: Result, b: Result, how: str) -> None:
    assert b.out == a.out, f"replies differ when fed {how}"
    assert b.commands == a.commands, f"events differ when fed {how}"
    assert b.proto.closed == a.proto.closed, how
    assert len(b.messages) == len(a.messages), how
    for (data_a, end_a), (data_b, end_b) in zip(a.messages, b.messages):
        if end_a is not None and end_a.error is None:
            assert data_b == data_a, f"message data differs when fed {how}"
        else:
            # A refused message streams data only until the rule break is seen, and
            # where that is seen depends on the chunking: both must be prefixes of
            # the same un-stuffed stream.
            assert data_a.startswith(data_b) or data_b.startswith(data_a), how


def drive(
    data: bytes,
    *,
    seeds: Iterable[int] = (1, 2, 3),
    bytewise: bool = True,
    **kwargs: Any,
) -> Result:
    """Feed `data` whole, byte by byte and in seeded random chunks; all must agree."""
    whole = feed([data], **kwargs)
    if bytewise:
        one = feed([data[i:i + 1] for i in range(len(data))], **kwargs)
        assert_same(whole, one, "one byte at a time")
    for seed in seeds:
        rng = random.Random(seed)
        other = feed(random_chunks(data, rng), **kwargs)
        assert_same(whole, other, f"in random chunks (seed {seed})")
    return whole


def replies(*items: Reply | bytes) -> list[bytes]:
    return [item.to_bytes() if isinstance(item, Reply) else item for item in items]


# -- dialogue pieces ---------------------------------------------------------------

CRLF = b"\r\n"
EHLO = b"EHLO client.test\r\n"
HELO = b"HELO client.test\r\n"
MAIL = b"MAIL FROM:<alice@example.org>\r\n"
RCPT = b"RCPT TO:<bob@example.net>\r\n"
RCPT2 = b"RCPT TO:<carol@example.net>\r\n"
RCPT_REFUSED = b"RCPT TO:<nobody@refused.example>\r\n"
DATA = b"DATA\r\n"
DOT = b".\r\n"
QUIT = b"QUIT\r\n"
NOOP = b"NOOP\r\n"
PRELUDE = EHLO + MAIL + RCPT + DATA  # up to and including DATA

EHLO_REPLY = (
    b"250-mx.test\r\n"
    b"250-PIPELINING\r\n"
    b"250-SIZE 10000\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250 SMTPUTF8\r\n"
)
PRELUDE_REPLIES = replies(EHLO_REPLY, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA)


def message(body: bytes, **kwargs: Any) -> Result:
    """One transaction carrying `body` (wire form, without the final dot), then NOOP."""
    return drive(PRELUDE + body + DOT + NOOP, **kwargs)


# -- greeting and the driver itself --------------------------------------------------


def test_greeting() -> None:
    proto = ServerProtocol(LIMITS)
    assert proto.greeting() == b"220 mx.test ESMTP Hedwig\r\n"
    assert proto.data_to_send() == b""
    assert not proto.closed and not proto.in_data and not proto.in_transaction


def test_split_replies_groups_multiline_and_checks_framing() -> None:
    assert split_replies(EHLO_REPLY + b"221 2.0.0 Bye\r\n") == [EHLO_REPLY, b"221 2.0.0 Bye\r\n"]
    with pytest.raises(AssertionError):
        split_replies(b"250-unfinished\r\n")
    with pytest.raises(AssertionError):
        split_replies(b"hello\r\n")


# -- EHLO / HELO ----------------------------------------------------------------------


def test_ehlo_advertises_extensions() -> None:
    r = drive(EHLO)
    assert r.replies == [EHLO_REPLY]
    assert r.events == [Ehlo("client.test", True)]
    assert r.proto.helo == "client.test" and r.proto.extended


def test_ehlo_starttls_only_when_offered() -> None:
    assert b"STARTTLS" not in drive(EHLO).out
    r = drive(EHLO, starttls_offered=True)
    assert r.replies == [EHLO_REPLY.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 STARTTLS")]


def test_ehlo_auth_line_when_mechanisms() -> None:
    r = drive(EHLO, starttls_offered=True, auth_mechanisms=("PLAIN", "LOGIN"))
    lines = r.out.split(b"\r\n")[:-1]
    assert lines[-2:] == [b"250-STARTTLS", b"250 AUTH PLAIN LOGIN"]
    assert b"AUTH" not in drive(EHLO).out


def test_ehlo_size_is_the_limit() -> None:
    limits = Limits(hostname="big.test", max_message_size=52_428_800, max_recipients=5)
    r = drive(EHLO, limits=limits)
    assert r.out.startswith(b"250-big.test\r\n")
    assert b"250-SIZE 52428800\r\n" in r.out


def test_ehlo_takes_first_word_and_literals() -> None:
    r = drive(b"EHLO [127.0.0.1] extra words\r\nEHLO [IPv6:::1]\r\n")
    assert r.events == [Ehlo("[127.0.0.1]", True), Ehlo("[IPv6:::1]", True)]
    assert r.replies == [EHLO_REPLY, EHLO_REPLY]


@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_ehlo_without_name_is_501(verb: bytes) -> None:
    r = drive(verb + b"\r\n" + verb + b"   \r\n" + MAIL)
    syntax = R.R501_SYNTAX.with_text(f"Syntax: {verb.decode()} hostname")
    assert r.replies == replies(syntax, syntax, R.R503_NEED_EHLO)
    assert r.events == []
    assert r.proto.errors == 3


def test_helo_single_line_no_extensions() -> None:
    r = drive(HELO + MAIL + RCPT)
    assert r.replies == replies(b"250 mx.test\r\n", R.R250_SENDER_OK, R.R250_RCPT_OK)
    assert r.events[0] == Ehlo("client.test", False)
    assert not r.proto.extended and r.proto.helo == "client.test"


def test_helo_then_starttls_needs_ehlo() -> None:
    r = drive(HELO + b"STARTTLS\r\n", starttls_offered=True)
    assert r.replies[1:] == replies(R.R503_NEED_EHLO)


def test_ehlo_resets_transaction() -> None:
    r = drive(EHLO + MAIL + RCPT + EHLO + RCPT + DATA + MAIL)
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R.R250_RCPT_OK,
        EHLO_REPLY, R.R503_NEED_MAIL, R.R503_NEED_MAIL, R.R250_SENDER_OK,
    )
    # The Ehlo event itself tells the session the transaction is gone.
    assert [type(e) for e in r.events] == [Ehlo, MailFrom, RcptTo, Ehlo, MailFrom]


# -- MAIL ---------------------------------------------------------------------------


def test_mail_accepted() -> None:
    r = drive(EHLO + MAIL)
    assert r.replies[1:] == replies(R.R250_SENDER_OK)
    assert r.events[1] == MailFrom("alice@example.org", MailParams())
    assert r.proto.in_transaction


def test_mail_null_path() -> None:
    r = drive(EHLO + b"MAIL FROM:<>\r\n" + RCPT + DATA + DOT)
    assert r.events[1] == MailFrom("", MailParams())
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED)


def test_mail_params_reach_the_event() -> None:
    r = drive(EHLO + b"MAIL FROM:<a@example.org> SIZE=10000 BODY=8BITMIME\r\n")
    assert r.events[1] == MailFrom("a@example.org", MailParams(size=10000, body="8BITMIME"))


def test_mail_size_over_limit_is_552_and_session_goes_on() -> None:
    r = drive(EHLO + b"MAIL FROM:<a@example.org> SIZE=10001\r\n" + MAIL + RCPT)
    assert r.replies[1:] == replies(R.R552_TOO_BIG, R.R250_SENDER_OK, R.R250_RCPT_OK)
    assert r.replies[1].startswith(b"552 5.3.4 ")
    assert [type(e) for e in r.events] == [Ehlo, MailFrom, RcptTo]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL\r\n", R.R501_SYNTAX),
        (b"MAIL FROM alice@example.org\r\n", R.R501_SYNTAX),
        (b"MAIL TO:<alice@example.org>\r\n", R.R501_SYNTAX),
        (b"MAIL FROM:alice@example.org\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<alice@example.org\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<alice>\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<alice@example.org>junk\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<a b@example.org>\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<@relay.example:>\r\n", R.R501_BAD_SENDER),
        (b"MAIL FROM:<a@example.org> SIZE=big\r\n", R.R501_SYNTAX),
        (b"MAIL FROM:<a@example.org> SIZE=\xc2\xb2\r\n", R.R501_SYNTAX),  # "²".isdigit()
        (b"MAIL FROM:<a@example.org> BODY=BINARYMIME\r\n", R.R501_SYNTAX),
        (b"MAIL FROM:<a@example.org> =x\r\n", R.R501_SYNTAX),
        (b"MAIL FROM:<a@example.org> FOO=bar\r\n", R.R555_UNKNOWN_PARAM),
        (b"MAIL FROM:<a@example.org> AUTH=<>\r\n", R.R555_UNKNOWN_PARAM),
        ("MAIL FROM:<jörg@example.org>\r\n".encode(), R.R553_NEED_SMTPUTF8),
        (b"MAIL FROM:<" + b"a" * 65 + b"@example.org>\r\n", R.R553_PATH_TOO_LONG),
        (b"MAIL FROM:<a@" + b"b" * 300 + b".org>\r\n", R.R553_PATH_TOO_LONG),
    ],
)
def test_mail_refused_by_protocol(line: bytes, reply: Reply) -> None:
    r = drive(EHLO + line + MAIL)
    assert r.replies[1:] == replies(reply, R.R250_SENDER_OK)
    assert [type(e) for e in r.events] == [Ehlo, MailFrom]
    assert r.proto.errors == 1


def test_mail_error_codes_on_the_wire() -> None:
    assert R.R552_TOO_BIG.to_bytes().startswith(b"552 5.3.4 ")
    assert R.R501_SYNTAX.to_bytes().startswith(b"501 5.5.4 ")
    assert R.R501_BAD_SENDER.to_bytes().startswith(b"501 5.1.7 ")
    assert R.R555_UNKNOWN_PARAM.to_bytes().startswith(b"555 5.5.4 ")
    assert R.R553_NEED_SMTPUTF8.to_bytes().startswith(b"553 5.6.7 ")
    assert R.R553_PATH_TOO_LONG.to_bytes().startswith(b"553 5.1.0 ")


def test_mail_smtputf8_allows_non_ascii() -> None:
    r = drive(EHLO + "MAIL FROM:<jörg@bücher.example> SMTPUTF8\r\n".encode()
              + "RCPT TO:<zoë@example.net>\r\n".encode())
    assert r.events[1] == MailFrom("jörg@bücher.example", MailParams(smtputf8=True))
    assert r.events[2] == RcptTo("zoë@example.net")
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R250_RCPT_OK)


def test_rcpt_non_ascii_needs_smtputf8_on_mail() -> None:
    r = drive(EHLO + MAIL + "RCPT TO:<zoë@example.net>\r\n".encode())
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R553_NEED_SMTPUTF8)


def test_nested_mail_is_503() -> None:
    r = drive(EHLO + MAIL + MAIL)
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R503_NESTED_MAIL)
    assert r.replies[2].startswith(b"503 5.5.1 ")


def test_mail_before_ehlo_is_503() -> None:
    r = drive(MAIL + RCPT + EHLO + MAIL)
    assert r.replies == replies(R.R503_NEED_EHLO, R.R503_NEED_MAIL, EHLO_REPLY, R.R250_SENDER_OK)


def test_refused_mail_starts_no_transaction() -> None:
    r = drive(EHLO + b"MAIL FROM:<spam@refused.example>\r\n" + RCPT + MAIL + RCPT)
    assert r.replies[1:] == replies(R550_SENDER, R.R503_NEED_MAIL, R.R250_SENDER_OK, R.R250_RCPT_OK)
    # A refusal by the session is a decision, not a client error.
    assert r.proto.errors == 1


def test_mail_verb_must_be_ascii() -> None:
    # "ma\u0131l".upper() == "MAIL" in Python; SMTP verbs are ASCII.
    r = drive(EHLO + "maıl FROM:<a@example.org>\r\n".encode() + "rſet\r\n".encode())
    assert r.replies[1:] == replies(R.R500_UNKNOWN, R.R500_UNKNOWN)
    assert r.events == [Ehlo("client.test", True)]


# -- RCPT ---------------------------------------------------------------------------


def test_rcpt_before_mail_is_503() -> None:
    r = drive(EHLO + RCPT)
    assert r.replies[1:] == replies(R.R503_NEED_MAIL)


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT\r\n", R.R501_SYNTAX),
        (b"RCPT FROM:<bob@example.net>\r\n", R.R501_SYNTAX),
        (b"RCPT TO:bob@example.net\r\n", R.R501_BAD_RCPT),
        (b"RCPT TO:<bob>\r\n", R.R501_BAD_RCPT),
        (b"RCPT TO:<>\r\n", R.R501_BAD_RCPT),
        (b"RCPT TO:<bob@>\r\n", R.R501_BAD_RCPT),
        (b"RCPT TO:<bob@example.net> NOTIFY=NEVER\r\n", R.R555_UNKNOWN_PARAM),
        (b"RCPT TO:<" + b"b" * 65 + b"@example.net>\r\n", R.R553_PATH_TOO_LONG),
    ],
)
def test_rcpt_refused_by_protocol(line: bytes, reply: Reply) -> None:
    r = drive(EHLO + MAIL + line + RCPT)
    assert r.replies[1:] == replies(R.R250_SENDER_OK, reply, R.R250_RCPT_OK)
    assert r.proto.errors == 1


def test_rcpt_bad_is_501_5_1_3() -> None:
    assert R.R501_BAD_RCPT.to_bytes().startswith(b"501 5.1.3 ")


def test_rcpt_postmaster_without_domain() -> None:
    r = drive(EHLO + MAIL + b"RCPT TO:<postmaster>\r\nRCPT TO:<PostMaster>\r\n")
    assert r.events[2:] == [RcptTo("postmaster"), RcptTo("PostMaster")]
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R250_RCPT_OK, R.R250_RCPT_OK)


def test_rcpt_source_route_and_space_after_colon() -> None:
    r = drive(EHLO + MAIL + b"RCPT TO: <@a.example,@b.example:bob@example.net>\r\n")
    assert r.events[2] == RcptTo("bob@example.net")


def test_max_recipients_is_452() -> None:
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(7))
    r = drive(EHLO + MAIL + rcpts + DATA + DOT)
    assert r.replies[1:] == replies(
        R.R250_SENDER_OK, *[R.R250_RCPT_OK] * 5, R.R452_TOO_MANY_RCPTS, R.R452_TOO_MANY_RCPTS,
        R.R354_DATA, QUEUED,
    )
    assert r.replies[7].startswith(b"452 4.5.3 ")
    assert sum(isinstance(e, RcptTo) for e in r.events) == 5
    # 452 is a limit, not a client error (RFC 5321 §4.5.3.1.10).
    assert r.proto.errors == 0


def test_refused_recipients_do_not_count_against_the_limit() -> None:
    refused = RCPT_REFUSED * 6
    rcpts = b"".join(b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(6))
    r = drive(EHLO + MAIL + refused + rcpts)
    assert r.codes[1:] == [250] + [550] * 6 + [250] * 5 + [452]


# -- DATA command -------------------------------------------------------------------


def test_data_before_mail_and_before_rcpt() -> None:
    r = drive(EHLO + DATA + MAIL + DATA + RCPT + DATA + DOT)
    assert r.replies[1:] == replies(
        R.R503_NEED_MAIL, R.R250_SENDER_OK, R.R503_NEED_RCPT, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
    )
    assert r.replies[3].startswith(b"503 5.5.1 ")


def test_data_when_every_rcpt_refused_is_554() -> None:
    r = drive(EHLO + MAIL + RCPT_REFUSED + RCPT_REFUSED + DATA + RCPT + DATA + DOT)
    assert r.replies[1:] == replies(
        R.R250_SENDER_OK, R550_RCPT, R550_RCPT, R.R554_NO_VALID_RCPTS,
        R.R250_RCPT_OK, R.R354_DATA, QUEUED,
    )
    assert r.replies[4].startswith(b"554 5.5.1 ")


def test_data_with_argument_is_501() -> None:
    r = drive(EHLO + MAIL + RCPT + b"DATA now\r\n" + DATA + DOT)
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R250_RCPT_OK, R.R501_SYNTAX, R.R354_DATA, QUEUED)


def test_data_starts_message() -> None:
    r = drive(PRELUDE)
    assert r.replies == PRELUDE_REPLIES
    assert R.R354_DATA.to_bytes() == b"354 End data with <CR><LF>.<CR><LF>\r\n"
    assert isinstance(r.events[-1], DataStart)
    assert r.proto.in_data


# -- RSET NOOP QUIT VRFY HELP STARTTLS AUTH unknown ------------------------------------


def test_rset_emits_reset_only_with_a_transaction() -> None:
    r = drive(EHLO + b"RSET\r\n" + MAIL + RCPT + b"RSET\r\n" + RCPT + b"RSET x\r\n")
    assert r.replies[1:] == replies(
        R.R250_RESET, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R250_RESET, R.R503_NEED_MAIL, R.R501_SYNTAX,
    )
    assert [type(e) for e in r.events] == [Ehlo, MailFrom, RcptTo, Reset]
    assert not r.proto.in_transaction
    assert R.R250_RESET.to_bytes().startswith(b"250 2.0.0 ")


def test_rset_before_ehlo() -> None:
    assert drive(b"RSET\r\n").replies == replies(R.R250_RESET)


def test_noop() -> None:
    r = drive(NOOP + b"NOOP with args\r\n")
    assert r.replies == replies(R.R250_NOOP, R.R250_NOOP)
    assert r.out.startswith(b"250 2.0.0 OK\r\n")
    assert r.events == []


def test_quit_closes_and_ignores_the_rest() -> None:
    r = drive(EHLO + QUIT + NOOP + MAIL)
    assert r.replies == replies(EHLO_REPLY, R.R221_BYE)
    assert r.replies[1] == b"221 2.0.0 Bye\r\n"
    assert r.proto.closed
    r.proto.receive_data(NOOP)
    assert list(r.proto.events()) == [] and r.proto.data_to_send() == b""


def test_quit_with_argument_is_501() -> None:
    r = drive(b"QUIT now\r\n" + QUIT)
    assert r.replies == replies(R.R501_SYNTAX, R.R221_BYE)


def test_quit_mid_transaction() -> None:
    r = drive(EHLO + MAIL + RCPT + QUIT)
    assert r.codes == [250, 250, 250, 221] and r.proto.closed


def test_vrfy() -> None:
    r = drive(b"VRFY bob\r\nVRFY\r\n")
    assert r.replies == replies(R.R252_VRFY, R.R501_SYNTAX)
    assert r.replies[0].startswith(b"252 2.5.0 ")


def test_help() -> None:
    r = drive(b"HELP\r\nHELP MAIL\r\n")
    assert r.replies == replies(R.R214_HELP, R.R214_HELP)
    assert r.replies[0].startswith(b"214 2.0.0 ")


def test_starttls_not_offered_is_502() -> None:
    r = drive(EHLO + b"STARTTLS\r\n" + MAIL)
    assert r.replies[1:] == replies(R.R502_NOT_AVAILABLE, R.R250_SENDER_OK)
    assert r.replies[1].startswith(b"502 5.5.1 ")


def test_starttls_with_argument_is_501() -> None:
    r = drive(EHLO + b"STARTTLS now\r\n", starttls_offered=True)
    assert r.replies[1:] == replies(R.R501_SYNTAX)


def test_starttls_discards_pipelined_plaintext_and_starts_over() -> None:
    proto = ServerProtocol(LIMITS, starttls_offered=True)
    proto.receive_data(EHLO + MAIL + b"STARTTLS\r\n" + b"MAIL FROM:<smuggled@example.org>\r\n")
    events = []
    for event in proto.events():
        events.append(event)
        if event.needs_reply:
            proto.reply(event, decide(event))
    assert [type(e) for e in events] == [Ehlo, MailFrom, StartTls]
    assert split_replies(proto.data_to_send()) == replies(EHLO_REPLY.replace(
        b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 STARTTLS"), R.R250_SENDER_OK, TLS_READY)
    # Until tls_started() nothing more is read, even if more plaintext arrives.
    proto.receive_data(NOOP)
    assert list(proto.events()) == [] and proto.data_to_send() == b""
    proto.tls_started()
    assert not proto.in_transaction and proto.helo is None
    proto.receive_data(MAIL + EHLO + b"STARTTLS\r\n")
    assert [type(e) for e in proto.events()] == [Ehlo]
    assert split_replies(proto.data_to_send()) == replies(R.R503_NEED_EHLO, EHLO_REPLY, R.R502_NOT_AVAILABLE)


def test_starttls_refused_by_session_goes_on() -> None:
    def no_tls(event: Event) -> Reply:
        return Reply(454, "4.7.0", "TLS not available") if isinstance(event, StartTls) else decide(event)

    r = drive(EHLO + b"STARTTLS\r\n" + MAIL, starttls_offered=True, decider=no_tls)
    assert r.codes == [250, 454, 250]


# -- AUTH ------------------------------------------------------------------------------

MECHS = ("PLAIN", "LOGIN")
AUTH_GOOD = f"AUTH PLAIN {GOOD_PLAIN}\r\n".encode()
EHLO_AUTH_REPLY = EHLO_REPLY.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN")


def test_auth_not_available_without_users() -> None:
    r = drive(EHLO + b"AUTH PLAIN\r\nAUTH\r\n")
    assert r.replies[1:] == replies(R.R502_NOT_AVAILABLE, R.R502_NOT_AVAILABLE)
    assert r.events == [Ehlo("client.test", True)]


def test_auth_with_initial_response() -> None:
    r = drive(EHLO + AUTH_GOOD + MAIL, auth_mechanisms=MECHS)
    assert r.replies == replies(EHLO_AUTH_REPLY, A.R235_AUTH_OK, R.R250_SENDER_OK)
    assert r.events[1] == AuthStart("PLAIN", GOOD_PLAIN)
    assert r.proto.authenticated and not r.proto.in_auth


def test_auth_in_two_steps() -> None:
    r = drive(EHLO + b"auth plain\r\n" + GOOD_PLAIN.encode() + CRLF + NOOP, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(A.R334_EMPTY, A.R235_AUTH_OK, R.R250_NOOP)
    assert r.replies[1] == b"334 \r\n"
    assert r.events[1:] == [AuthStart("PLAIN", None), AuthResponse(GOOD_PLAIN)]
    assert r.proto.authenticated


def test_lines_after_334_are_responses_not_commands() -> None:
    # A client that pipelines commands behind AUTH must not get them executed as
    # commands while the exchange waits for its response.
    r = drive(EHLO + b"AUTH PLAIN\r\n" + MAIL + MAIL, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(A.R334_EMPTY, A.R535_AUTH_FAILED, R.R250_SENDER_OK)
    assert r.events[2] == AuthResponse(MAIL[:-2].decode())
    assert not r.proto.authenticated and r.proto.errors == 0


def test_auth_cancel_is_501_and_an_error() -> None:
    r = drive(EHLO + b"AUTH PLAIN\r\n*\r\n" + NOOP, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(A.R334_EMPTY, A.R501_AUTH_CANCELLED, R.R250_NOOP)
    assert r.proto.errors == 1 and not r.proto.authenticated


def test_wrong_credentials_are_not_protocol_errors() -> None:
    # 535 is the session's to count and throttle; the protocol's error limit is for syntax.
    r = drive(EHLO + b"AUTH PLAIN eA==\r\n" * 25 + NOOP, auth_mechanisms=MECHS)
    assert r.codes == [250] + [535] * 25 + [250]
    assert r.proto.errors == 0 and not r.proto.closed


def test_auth_before_ehlo_or_after_helo_is_503() -> None:
    r = drive(AUTH_GOOD + HELO + AUTH_GOOD, auth_mechanisms=MECHS)
    assert r.replies == replies(R.R503_NEED_EHLO, b"250 mx.test\r\n", R.R503_NEED_EHLO)
    assert not r.proto.authenticated


def test_second_auth_is_503() -> None:
    r = drive(EHLO + AUTH_GOOD + AUTH_GOOD + EHLO + AUTH_GOOD, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(A.R235_AUTH_OK, A.R503_ALREADY_AUTH, EHLO_AUTH_REPLY, A.R503_ALREADY_AUTH)
    assert r.proto.authenticated  # EHLO does not forget it; only STARTTLS does


def test_auth_inside_a_transaction_is_503() -> None:
    r = drive(EHLO + MAIL + AUTH_GOOD + b"RSET\r\n" + AUTH_GOOD, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(R.R250_SENDER_OK, R.R503_BAD_SEQUENCE, R.R250_RESET, A.R235_AUTH_OK)


@pytest.mark.parametrize("line", [b"AUTH\r\n", b"AUTH PLAIN a b\r\n", "AUTH PLÄIN\r\n".encode()])
def test_auth_syntax_is_501(line: bytes) -> None:
    r = drive(EHLO + line + NOOP, auth_mechanisms=MECHS)
    assert r.replies[1:] == replies(A.R501_AUTH_SYNTAX, R.R250_NOOP)
    assert r.events == [Ehlo("client.test", True)]


def test_auth_needs_tls_is_538_and_not_advertised() -> None:
    r = drive(EHLO + AUTH_GOOD + MAIL, auth_mechanisms=MECHS, auth_needs_tls=True)
    assert r.replies == replies(EHLO_REPLY, A.R538_ENCRYPTION_REQUIRED, R.R250_SENDER_OK)
    assert r.replies[1].startswith(b"538 5.7.11 ")
    assert not r.proto.auth_offered
    r = drive(EHLO + AUTH_GOOD, auth_mechanisms=MECHS, auth_needs_tls=True, encrypted=True)
    assert r.replies == replies(EHLO_AUTH_REPLY, A.R235_AUTH_OK)


def test_auth_after_starttls() -> None:
    r = feed([EHLO + b"STARTTLS\r\n" + AUTH_GOOD], starttls_offered=True, auth_mechanisms=MECHS,
             auth_needs_tls=True)
    assert r.replies == replies(EHLO_REPLY.replace(b"250 SMTPUTF8", b"250-SMTPUTF8\r\n250 STARTTLS"), TLS_READY)
    proto = r.proto  # tls_started() was called by feed(): the pipelined AUTH is gone
    assert proto.encrypted and proto.helo is None
    proto.receive_data(AUTH_GOOD + EHLO + AUTH_GOOD)
    for event in proto.events():
        if event.needs_reply:
            proto.reply(event, decide(event))
    assert split_replies(proto.data_to_send()) == replies(R.R503_NEED_EHLO, EHLO_AUTH_REPLY, A.R235_AUTH_OK)
    assert proto.authenticated


def test_tls_started_forgets_auth() -> None:
    r = feed([EHLO + AUTH_GOOD + b"STARTTLS\r\n"], starttls_offered=True, auth_mechanisms=MECHS)
    assert r.codes == [250, 235, 220]
    assert not r.proto.authenticated


def test_broken_line_ends_the_exchange() -> None:
    for bad, reply in [(b"AGFs\naWNl\r\n", R.R500_BARE_EOL), (b"AG\0Fs\r\n", R.R501_NUL),
                       (b"A" * 600 + b"\r\n", R.R500_LINE_TOO_LONG)]:
        r = drive(EHLO + b"AUTH PLAIN\r\n" + bad + NOOP, auth_mechanisms=MECHS)
        assert r.replies[1:] == replies(A.R334_EMPTY, reply, R.R250_NOOP), bad
        assert not r.proto.in_auth and not r.proto.authenticated


def test_non_ascii_response_reaches_the_exchange() -> None:
    r = drive(EHLO + b"AUTH PLAIN\r\n\xff\xfe\r\n", auth_mechanisms=MECHS)
    assert r.codes == [250, 334, 535]
    assert isinstance(r.events[-1], AuthResponse) and not r.events[-1].line.isascii()


def test_auth_events_hide_credentials_in_repr() -> None:
    assert GOOD_PLAIN not in repr(AuthStart("PLAIN", GOOD_PLAIN))
    assert GOOD_PLAIN not in repr(AuthResponse(GOOD_PLAIN))


@pytest.mark.parametrize("line", [b"FOO\r\n", b"\r\n", b" NOOP\r\n", b"NOOP\tx\r\n", b"MAILFROM:<a@b.example>\r\n"])
def test_unknown_command_is_500(line: bytes) -> None:
    r = drive(line + NOOP)
    assert r.replies == replies(R.R500_UNKNOWN, R.R250_NOOP)
    assert r.replies[0].startswith(b"500 5.5.2 ")


def test_lower_and_mixed_case_verbs() -> None:
    r = drive(
        b"ehlo client.test\r\nmail from:<alice@example.org>\r\nRcPt To:<bob@example.net>\r\n"
        b"data\r\nhi\r\n.\r\nrset\r\nnoop\r\nvrfy x\r\nhelp\r\nquit\r\n"
    )
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
        R.R250_RESET, R.R250_NOOP, R.R252_VRFY, R.R214_HELP, R.R221_BYE,
    )
    assert r.data == b"hi\r\n"


def test_non_utf8_command_is_501() -> None:
    r = drive(b"NOOP \xff\xfe\r\n" + NOOP)
    assert r.replies == replies(R.R501_SYNTAX, R.R250_NOOP)


# -- pipelining -------------------------------------------------------------------------


def test_pipelined_batch_answered_in_order() -> None:
    body = b"Subject: hi\r\n\r\nhello\r\n"
    r = drive(EHLO + MAIL + RCPT + RCPT2 + DATA + body + DOT + QUIT)
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED, R.R221_BYE,
    )
    assert r.commands == [
        Ehlo("client.test", True),
        MailFrom("alice@example.org", MailParams()),
        RcptTo("bob@example.net"),
        RcptTo("carol@example.net"),
        DataStart(),
        DataEnd(None),
    ]
    assert r.data == body
    assert r.proto.closed


def test_events_wait_for_the_reply() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(EHLO + MAIL + RCPT + DATA + b"hi\r\n.\r\n")
    it = proto.events()
    assert next(it) == Ehlo("client.test", True)
    mail = next(it)
    assert isinstance(mail, MailFrom) and mail.needs_reply
    # RCPT is not looked at before MAIL has been answered.
    assert proto.data_to_send() == EHLO_REPLY
    with pytest.raises(RuntimeError):
        next(it)
    with pytest.raises(RuntimeError):
        next(proto.events())
    proto.reply(mail, R.R250_SENDER_OK)
    with pytest.raises(RuntimeError):
        proto.reply(mail, R.R250_SENDER_OK)  # answered already
    it = proto.events()
    rcpt = next(it)
    assert rcpt == RcptTo("bob@example.net")
    assert proto.data_to_send() == R.R250_SENDER_OK.to_bytes()
    proto.reply(rcpt, R.R250_RCPT_OK)
    assert next(it) == DataStart()
    assert next(it) == DataChunk(b"hi\r\n")
    end = next(it)
    assert end == DataEnd(None) and end.needs_reply
    with pytest.raises(RuntimeError):
        next(it)
    proto.reply(end, QUEUED)
    assert list(proto.events()) == []
    assert split_replies(proto.data_to_send()) == replies(R.R250_RCPT_OK, R.R354_DATA, QUEUED)


def test_reply_refuses_events_that_need_none() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(EHLO + MAIL)
    it = proto.events()
    ehlo = next(it)
    with pytest.raises(RuntimeError):
        proto.reply(ehlo, R.R250_OK)
    mail = next(it)
    with pytest.raises(RuntimeError):
        proto.reply(MailFrom("alice@example.org", MailParams()), R.R250_SENDER_OK)  # equal, not the same
    proto.reply(mail, R.R250_SENDER_OK)


def test_pipelined_rejected_rcpt_then_data() -> None:
    r = drive(EHLO + MAIL + RCPT_REFUSED + RCPT + DATA + b"hi\r\n" + DOT)
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R550_RCPT, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
    )
    assert r.data == b"hi\r\n"


def test_pipelined_content_after_refused_data_is_read_as_commands() -> None:
    # RFC 2920 §3.1: a client waits for 354 before sending content; if it does not,
    # the content is commands. Here: "hi" and "." are unknown, QUIT ends the session.
    r = drive(EHLO + MAIL + RCPT_REFUSED + DATA + b"hi\r\n" + DOT + QUIT)
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R550_RCPT, R.R554_NO_VALID_RCPTS,
        R.R500_UNKNOWN, R.R500_UNKNOWN, R.R221_BYE,
    )
    assert not any(isinstance(e, (DataStart, DataChunk, DataEnd)) for e in r.events)


def test_two_messages_back_to_back() -> None:
    one = b"Subject: one\r\n\r\nfirst\r\n"
    two = b"Subject: two\r\n\r\n..second\r\n"
    batch = EHLO + MAIL + RCPT + DATA + one + DOT + MAIL + RCPT2 + DATA + two + DOT + QUIT
    r = drive(batch)
    assert r.replies == replies(
        EHLO_REPLY, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
        R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED, R.R221_BYE,
    )
    assert r.messages == [(one, DataEnd(None)), (two.replace(b"..", b"."), DataEnd(None))]


def test_bytes_after_354_are_content() -> None:
    body = b"QUIT\r\nRSET\r\nMAIL FROM:<x@example.org>\r\nDATA\r\n"
    r = message(body)
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R250_NOOP)
    assert r.data == body
    assert [type(e) for e in r.commands] == [Ehlo, MailFrom, RcptTo, DataStart, DataEnd]
    assert not r.proto.closed


def test_session_decides_451_at_the_dot_and_goes_on() -> None:
    def local_error(event: Event) -> Reply:
        return R.R451_LOCAL_ERROR if isinstance(event, DataEnd) else decide(event)

    r = drive(PRELUDE + b"x\r\n" + DOT + RCPT + MAIL, decider=local_error)
    assert r.replies == PRELUDE_REPLIES + replies(R.R451_LOCAL_ERROR, R.R503_NEED_MAIL, R.R250_SENDER_OK)


def test_accepted_message_ends_the_transaction() -> None:
    r = drive(PRELUDE + DOT + RCPT + DATA + MAIL)
    assert r.replies == PRELUDE_REPLIES + replies(
        QUEUED, R.R503_NEED_MAIL, R.R503_NEED_MAIL, R.R250_SENDER_OK)


def test_session_421_reply_closes() -> None:
    def unhealthy(event: Event) -> Reply:
        return R.R421_SPOOL_UNHEALTHY if isinstance(event, MailFrom) else decide(event)

    r = drive(EHLO + MAIL + RCPT + NOOP, decider=unhealthy)
    assert r.replies == replies(EHLO_REPLY, R.R421_SPOOL_UNHEALTHY)
    assert r.proto.closed


# -- command line hygiene -----------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [b"NOOP\n\r\n", b"\n\r\n", b"NO\rOP\r\n", b"NOOP\r\r\n", b"NOOP\r \r\n", b"MAIL FROM:<a@b.example>\rRCPT TO:<c@d.example>\r\n"],
)
def test_bare_cr_or_lf_in_command_is_500(line: bytes) -> None:
    r = drive(EHLO + line + MAIL + NOOP)
    assert r.replies[1:] == replies(R.R500_BARE_EOL, R.R250_SENDER_OK, R.R250_NOOP)
    assert r.replies[1].startswith(b"500 5.5.2 ")
    assert [type(e) for e in r.events] == [Ehlo, MailFrom]


def test_text_after_a_bare_lf_is_never_executed() -> None:
    # SPEC §3: a bare LF is never a line end. The client hears 500 at once, and
    # everything up to the next CRLF belongs to the refused line: QUIT never runs.
    r = drive(b"NOOP\nQUIT\r\n" + NOOP)
    assert r.replies == replies(R.R500_BARE_EOL, R.R250_NOOP)
    assert not r.proto.closed
    assert r.proto.errors == 1


def test_nul_in_command_is_501() -> None:
    r = drive(b"NO\0OP\r\n" + EHLO + b"MAIL FROM:<a@example.org>\0\r\n" + NOOP)
    assert r.replies == replies(R.R501_NUL, EHLO_REPLY, R.R501_NUL, R.R250_NOOP)
    assert r.replies[0].startswith(b"501 5.5.4 ")


def _noop_line(total: int) -> bytes:
    line = b"NOOP " + b"x" * (total - 7) + b"\r\n"
    assert len(line) == total
    return line


def test_command_line_of_512_octets_is_accepted() -> None:
    r = drive(_noop_line(MAX_COMMAND_LINE) + NOOP)
    assert r.replies == replies(R.R250_NOOP, R.R250_NOOP)


def test_command_line_of_513_octets_is_500_and_session_goes_on() -> None:
    r = drive(_noop_line(MAX_COMMAND_LINE + 1) + EHLO + MAIL)
    assert r.replies == replies(R.R500_LINE_TOO_LONG, EHLO_REPLY, R.R250_SENDER_OK)
    assert r.replies[0] == b"500 5.5.2 Line too long\r\n"


@pytest.mark.parametrize("size", [513, 600, 1024, 5000, 100_000])
def test_long_command_line_in_pieces(size: int) -> None:
    line = _noop_line(size)
    proto = ServerProtocol(LIMITS)
    out = b""
    for i in range(0, len(line), 100):
        proto.receive_data(line[i:i + 100])
        assert list(proto.events()) == []
        out += proto.data_to_send()
        # The protocol never holds more than one command line of an over-long line.
        assert len(proto._buf) <= MAX_COMMAND_LINE + 100
    proto.receive_data(EHLO + NOOP)
    assert [type(e) for e in proto.events()] == [Ehlo]
    out += proto.data_to_send()
    assert split_replies(out) == replies(R.R500_LINE_TOO_LONG, EHLO_REPLY, R.R250_NOOP)
    assert proto.errors == 1


def test_long_command_line_ending_in_bare_lf() -> None:
    # The bare LF does not end the over-long line either: the first NOOP is part of it.
    r = drive(b"x" * 600 + b"\n" + NOOP + NOOP, seeds=(4, 5))
    assert r.replies == replies(R.R500_LINE_TOO_LONG, R.R250_NOOP)


def test_long_command_split_at_cr() -> None:
    # 511 octets then CR fills 512 without LF: too long whatever follows.
    r = drive(b"N" * 511 + b"\r" + b"\n" + NOOP)
    assert r.replies == replies(R.R500_LINE_TOO_LONG, R.R250_NOOP)


# -- DATA content -----------------------------------------------------------------------


def test_dot_unstuffing() -> None:
    body = b"..leading dot\r\nplain\r\n...\r\n..\r\n.x\r\n. \r\n"
    r = message(body)
    assert r.data == b".leading dot\r\nplain\r\n..\r\n.\r\nx\r\n \r\n"
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R250_NOOP)


def test_leading_dot_line_first_in_message() -> None:
    r = message(b".hidden\r\n")
    assert r.data == b"hidden\r\n"


def test_empty_message() -> None:
    r = drive(PRELUDE + DOT + QUIT)
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R221_BYE)
    assert r.messages == [(b"", DataEnd(None))]
    assert not any(isinstance(e, DataChunk) for e in r.events)


def test_message_with_empty_lines_only() -> None:
    r = message(b"\r\n\r\n")
    assert r.data == b"\r\n\r\n"


def test_eight_bit_bytes_are_preserved() -> None:
    body = b"Subject: caf\xc3\xa9\r\n\r\n\xff\xfe\x80\x7f binary-ish\r\n\x1b[0m\r\n"
    r = message(body)
    assert r.data == body
    assert r.replies[-2:] == replies(QUEUED, R.R250_NOOP)


def test_only_crlf_dot_crlf_ends_data() -> None:
    # ". " and ".x" and "\r\n..\r\n" are not the end.
    body = b". \r\n..\r\n.x\r\nend\r\n"
    r = message(body)
    assert r.data == b" \r\n.\r\nx\r\nend\r\n"


SMUGGLING = [b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r", b"\r.\n"]


@pytest.mark.parametrize("fake", SMUGGLING, ids=repr)
def test_bare_eol_dot_is_never_a_boundary(fake: bytes) -> None:
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nevil\r\n"
    body = b"Subject: hi\r\n\r\nhello" + fake + smuggled
    r = drive(PRELUDE + body + DOT + NOOP + MAIL)
    assert r.replies == PRELUDE_REPLIES + replies(R.R554_BARE_EOL, R.R250_NOOP, R.R250_SENDER_OK)
    assert r.replies[-3].startswith(b"554 5.6.11 ")
    ends = [e for e in r.events if isinstance(e, DataEnd)]
    assert ends == [DataEnd(R.R554_BARE_EOL)]
    assert not ends[0].needs_reply
    # Only the first MAIL/RCPT and the last MAIL are commands; nothing smuggled.
    assert [e.address for e in r.events if isinstance(e, (MailFrom, RcptTo))] == [
        "alice@example.org", "bob@example.net", "alice@example.org"]
    # Nothing of the message after the rule break was streamed, in any chunking.
    assert b"evil" not in r.data
    assert b"evil" not in feed([PRELUDE + body[:20], body[20:] + DOT]).data
    assert b"evil" not in feed([bytes([c]) for c in PRELUDE + body + DOT]).data


def test_bare_lf_in_message_is_refused_even_without_a_dot() -> None:
    r = message(b"line one\nline two\r\n")
    assert r.replies == PRELUDE_REPLIES + replies(R.R554_BARE_EOL, R.R250_NOOP)


def test_bare_cr_before_the_terminator() -> None:
    # "\r\r\n.\r\n": the CRLF before the dot is real, so this is the end; the lone CR is bare.
    r = message(b"text\r\r\n")
    assert r.replies == PRELUDE_REPLIES + replies(R.R554_BARE_EOL, R.R250_NOOP)


def test_refused_message_resets_transaction_without_reply_from_session() -> None:
    r = drive(PRELUDE + b"a\nb\r\n" + DOT + RCPT + MAIL + RCPT + DATA + b"ok\r\n" + DOT)
    assert r.replies == PRELUDE_REPLIES + replies(
        R.R554_BARE_EOL, R.R503_NEED_MAIL, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
    )
    assert r.messages[-1] == (b"ok\r\n", DataEnd(None))
    # Rule breaks in DATA are refusals of the message, not command errors.
    assert r.proto.errors == 1


def test_reply_to_a_refused_message_is_refused() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(PRELUDE + b"a\0b\r\n" + DOT)
    end = None
    for event in proto.events():
        if event.needs_reply:
            proto.reply(event, decide(event))
        if isinstance(event, DataEnd):
            end = event
    assert end == DataEnd(R.R554_NUL)
    with pytest.raises(RuntimeError):
        proto.reply(end, QUEUED)


def test_nul_in_message_is_554() -> None:
    r = message(b"Subject: x\r\n\r\nnul\0here\r\n")
    assert r.replies == PRELUDE_REPLIES + replies(R.R554_NUL, R.R250_NOOP)
    assert r.replies[-2].startswith(b"554 5.6.0 ")
    assert r.messages[0][1] == DataEnd(R.R554_NUL)


def test_text_line_of_1000_octets_is_accepted() -> None:
    line = b"y" * (MAX_TEXT_LINE - 2) + CRLF
    r = message(b"short\r\n" + line + line)
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R250_NOOP)
    assert r.data == b"short\r\n" + line + line


@pytest.mark.parametrize("length", [MAX_TEXT_LINE + 1, MAX_TEXT_LINE + 2, 2 * MAX_TEXT_LINE, 5000])
def test_text_line_over_1000_octets_is_552(length: int) -> None:
    line = b"y" * (length - 2) + CRLF
    r = message(b"short\r\n" + line + b"after\r\n")
    assert r.replies == PRELUDE_REPLIES + replies(R.R552_LINE_TOO_LONG, R.R250_NOOP)
    assert r.replies[-2].startswith(b"552 5.6.0 ")
    assert r.messages[0][1] == DataEnd(R.R552_LINE_TOO_LONG)


def test_long_text_line_ending_at_the_terminator() -> None:
    # The long line's CRLF is the first half of the terminator.
    r = message(b"y" * 1200 + CRLF)
    assert r.replies == PRELUDE_REPLIES + replies(R.R552_LINE_TOO_LONG, R.R250_NOOP)


@pytest.mark.parametrize("tail", [b"", b"\r", b"\r\r"])
def test_long_text_line_cut_near_a_cr(tail: bytes) -> None:
    r = message(b"y" * 1001 + tail + CRLF)
    expected = R.R554_BARE_EOL if tail else R.R552_LINE_TOO_LONG
    assert r.replies == PRELUDE_REPLIES + replies(expected, R.R250_NOOP)


def test_text_line_longer_than_the_receive_buffer() -> None:
    recv = 65536
    stream = PRELUDE + b"z" * (3 * recv + 17) + CRLF + b"more\r\n" + DOT + MAIL
    proto = ServerProtocol(LIMITS)
    out = b""
    for i in range(0, len(stream), recv):
        proto.receive_data(stream[i:i + recv])
        for event in proto.events():
            assert not isinstance(event, DataChunk)
            if event.needs_reply:
                proto.reply(event, decide(event))
        out += proto.data_to_send()
        # STYLE §3: the protocol never holds a whole message.
        assert len(proto._buf) <= MAX_TEXT_LINE + 1
    assert split_replies(out) == PRELUDE_REPLIES + replies(R.R552_LINE_TOO_LONG, R.R250_SENDER_OK)
    # And the same through the driver (random chunkings; one byte at a time is slow here).
    r = drive(stream, bytewise=False, seeds=(7,))
    assert r.out == out


def test_long_line_one_byte_at_a_time() -> None:
    r = drive(PRELUDE + b"z" * 20_000 + CRLF + DOT + NOOP, seeds=())
    assert r.replies == PRELUDE_REPLIES + replies(R.R552_LINE_TOO_LONG, R.R250_NOOP)


def _body_of(size: int, stuffed: bool = False) -> bytes:
    """Un-stuffed size `size`: lines of 100 octets; with `stuffed`, each starts with a dot."""
    assert size % 100 == 0
    line = (b"." + b"x" * 97 + CRLF) if stuffed else (b"x" * 98 + CRLF)
    return line * (size // 100)


def test_message_of_exactly_max_size_is_accepted() -> None:
    body = _body_of(LIMITS.max_message_size)
    r = message(body)
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R250_NOOP)
    assert r.data == body


def test_size_counts_unstuffed_octets() -> None:
    body = _body_of(LIMITS.max_message_size, stuffed=True).replace(b"\r\n.", b"\r\n..")
    body = b"." + body  # the first line too
    assert len(body) > LIMITS.max_message_size
    r = message(body)
    assert r.replies == PRELUDE_REPLIES + replies(QUEUED, R.R250_NOOP)
    assert len(r.data) == LIMITS.max_message_size


def test_message_over_max_size_is_552_at_the_dot_and_session_goes_on() -> None:
    body = _body_of(LIMITS.max_message_size) + b"!\r\n"
    proto = ServerProtocol(LIMITS)
    proto.receive_data(PRELUDE + body)
    for event in proto.events():
        if event.needs_reply:
            proto.reply(event, decide(event))
    # Read to the final dot before answering: nothing but the 354 so far.
    assert split_replies(proto.data_to_send()) == PRELUDE_REPLIES
    r = drive(PRELUDE + body + DOT + MAIL + RCPT + DATA + b"small\r\n" + DOT)
    assert r.replies == PRELUDE_REPLIES + replies(
        R.R552_TOO_BIG, R.R250_SENDER_OK, R.R250_RCPT_OK, R.R354_DATA, QUEUED,
    )
    assert r.replies[4].startswith(b"552 5.3.4 ")
    assert r.messages[0][1] == DataEnd(R.R552_TOO_BIG)
    assert r.messages[1] == (b"small\r\n", DataEnd(None))
    # The over-size message was streamed at most up to the limit, then nothing more.
    assert len(r.messages[0][0]) <= LIMITS.max_message_size
    assert r.proto.errors == 0


def test_several_rule_breaks_give_one_reply_whatever_the_chunking() -> None:
    # Bare EOL outranks NUL outranks a long line outranks size, however TCP cut it.
    cases = [
        (b"a\0\r\nb\nc\r\n", R.R554_BARE_EOL),
        (b"a\n" + b"x" * 1200 + CRLF, R.R554_BARE_EOL),
        (b"x" * 600 + b"\0" + b"x" * 600 + CRLF, R.R554_NUL),
        (b"x" * 600 + b"\n" + b"x" * 600 + CRLF, R.R554_BARE_EOL),
        (b"x" * 1100 + b"\r" + b"x" * 10 + CRLF, R.R554_BARE_EOL),
        (_body_of(LIMITS.max_message_size) + b"y" * 1200 + CRLF, R.R552_LINE_TOO_LONG),
        (b"y" * 1200 + CRLF + _body_of(LIMITS.max_message_size) + b"\0\r\n", R.R554_NUL),
    ]
    for body, error in cases:
        r = message(body, seeds=(1, 2, 3, 4, 5, 6))
        assert r.replies == PRELUDE_REPLIES + replies(error, R.R250_NOOP), body[:40]


def test_terminator_split_at_every_position() -> None:
    stream = PRELUDE + b"line one\r\n..two\r\n" + DOT + QUIT
    whole = feed([stream])
    assert whole.replies == PRELUDE_REPLIES + replies(QUEUED, R.R221_BYE)
    assert whole.data == b"line one\r\n.two\r\n"
    start = len(PRELUDE)
    for i in range(1, len(stream)):
        assert_same(whole, feed([stream[:i], stream[i:]]), f"split at {i}")
    for i in range(start, len(stream) - 1):
        for j in range(i + 1, min(i + 8, len(stream))):
            assert_same(whole, feed([stream[:i], stream[i:j], stream[j:]]), f"split at {i}, {j}")


def test_terminator_split_after_the_dot_of_a_stuffed_line() -> None:
    # "\r\n." then ".\r\n" in the next chunk is a stuffed dot line, not the end.
    r = feed([PRELUDE + b"a\r\n.", b".\r\n.", b"\r\n"])
    assert r.data == b"a\r\n.\r\n"
    assert r.replies[-1] == QUEUED.to_bytes()


def test_data_chunks_are_whole_lines_and_streamed() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(PRELUDE)
    for event in proto.events():
        if event.needs_reply:
            proto.reply(event, decide(event))
    proto.receive_data(b"first line\r\nsecond ha")
    assert list(proto.events()) == [DataChunk(b"first line\r\n")]
    proto.receive_data(b"lf\r\nthird")
    assert list(proto.events()) == [DataChunk(b"second half\r\n")]
    proto.receive_data(b"\r\n.\r\n")
    it = proto.events()
    assert next(it) == DataChunk(b"third\r\n")
    end = next(it)
    assert end == DataEnd(None)
    proto.reply(end, QUEUED)
    assert list(it) == []


# -- error limit, send, EOF ------------------------------------------------------------


def test_twenty_errors_close_with_421() -> None:
    r = drive(b"BOGUS\r\n" * 25 + NOOP)
    assert r.replies == replies(*[R.R500_UNKNOWN] * 20, R.R421_TOO_MANY_ERRORS)
    assert r.replies[-1] == b"421 4.7.0 Too many errors, closing connection\r\n"
    assert r.proto.closed and r.proto.errors == 20


def test_nineteen_errors_keep_the_session() -> None:
    r = drive(b"BOGUS\r\n" * 19 + EHLO + MAIL)
    assert r.replies == replies(*[R.R500_UNKNOWN] * 19, EHLO_REPLY, R.R250_SENDER_OK)
    assert not r.proto.closed


def test_every_kind_of_client_error_counts() -> None:
    bad = [
        b"BOGUS\r\n", b"NOOP\n\r\n", b"NO\0OP\r\n", _noop_line(600), b"VRFY\r\n", RCPT, DATA,
        b"MAIL FROM:<x>\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", b"\xff\r\n",
    ]
    stream = b"".join(bad[i % len(bad)] for i in range(20)) + NOOP
    r = drive(stream)
    assert len(r.replies) == 21
    assert r.replies[-1] == R.R421_TOO_MANY_ERRORS.to_bytes()
    assert r.proto.closed


def test_refusals_by_the_session_are_not_errors() -> None:
    r = drive(EHLO + b"MAIL FROM:<spam@refused.example>\r\n" * 30 + NOOP)
    assert r.codes == [250] + [550] * 30 + [250]
    assert not r.proto.closed and r.proto.errors == 0


def test_error_limit_is_configurable() -> None:
    limits = Limits(hostname="mx.test", max_message_size=10_000, max_recipients=5, max_errors=3)
    r = drive(b"A\r\nB\r\nC\r\nD\r\n", limits=limits)
    assert r.replies == replies(R.R500_UNKNOWN, R.R500_UNKNOWN, R.R500_UNKNOWN, R.R421_TOO_MANY_ERRORS)


def test_send_421_timeout_closes() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(EHLO)
    list(proto.events())
    proto.send(R.R421_TIMEOUT)
    assert proto.closed
    assert proto.data_to_send() == EHLO_REPLY + b"421 4.4.2 Timeout exceeded, closing connection\r\n"
    proto.receive_data(NOOP)
    assert list(proto.events()) == [] and proto.data_to_send() == b""


def test_send_non_closing_reply_keeps_session() -> None:
    proto = ServerProtocol(LIMITS)
    proto.send(R.R250_OK)
    assert not proto.closed and proto.data_to_send() == b"250 2.0.0 OK\r\n"


def test_eof_closes() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(EHLO + b"NOO")
    proto.receive_data(b"")
    assert proto.closed
    assert list(proto.events()) == []
    assert proto.data_to_send() == b""


def test_eof_mid_data_gives_no_data_end() -> None:
    proto = ServerProtocol(LIMITS)
    proto.receive_data(PRELUDE + b"partial\r\n")
    events = []
    for event in proto.events():
        events.append(event)
        if event.needs_reply:
            proto.reply(event, decide(event))
    proto.receive_data(b"")
    events += list(proto.events())
    assert proto.closed
    assert events[-1] == DataChunk(b"partial\r\n")
    assert not any(isinstance(e, DataEnd) for e in events)


# -- every reply the protocol can send ----------------------------------------------------

# Replies the protocol never sends by itself: the session's decisions and shutdowns.
NOT_FROM_PROTOCOL = {
    "R250_OK", "R250_SENDER_OK", "R250_RCPT_OK",
    "R421_TOO_MANY_CONNECTIONS", "R421_TIMEOUT", "R421_SHUTTING_DOWN", "R421_SPOOL_UNHEALTHY",
    "R451_LOCAL_ERROR", "R452_DISK_FULL", "R503_BAD_SEQUENCE",
    "R220_TLS_READY", "R454_TLS_UNAVAILABLE", "R421_AUTH_FAILURES",
}

TRIGGERS: dict[str, bytes] = {
    "R221_BYE": QUIT,
    "R250_RESET": b"RSET\r\n",
    "R250_NOOP": NOOP,
    "R252_VRFY": b"VRFY bob\r\n",
    "R214_HELP": b"HELP\r\n",
    "R354_DATA": PRELUDE,
    "R421_TOO_MANY_ERRORS": b"?\r\n" * 20,
    "R452_TOO_MANY_RCPTS": EHLO + MAIL + RCPT * 6,
    "R500_UNKNOWN": b"BOGUS\r\n",
    "R500_LINE_TOO_LONG": _noop_line(513),
    "R500_BARE_EOL": b"NOOP\n",
    "R501_SYNTAX": b"VRFY\r\n",
    "R501_NUL": b"NOOP\0\r\n",
    "R501_BAD_SENDER": EHLO + b"MAIL FROM:<alice>\r\n",
    "R501_BAD_RCPT": EHLO + MAIL + b"RCPT TO:<bob>\r\n",
    "R503_NEED_EHLO": MAIL,
    "R503_NESTED_MAIL": EHLO + MAIL + MAIL,
    "R503_NEED_MAIL": EHLO + RCPT,
    "R503_NEED_RCPT": EHLO + MAIL + DATA,
    "R555_UNKNOWN_PARAM": EHLO + b"MAIL FROM:<a@example.org> X=1\r\n",
    "R552_TOO_BIG": EHLO + b"MAIL FROM:<a@example.org> SIZE=99999\r\n",
    "R552_LINE_TOO_LONG": PRELUDE + b"y" * 1001 + CRLF + DOT,
    "R553_PATH_TOO_LONG": EHLO + b"MAIL FROM:<" + b"a" * 65 + b"@example.org>\r\n",
    "R554_BARE_EOL": PRELUDE + b"a\nb\r\n" + DOT,
    "R554_NUL": PRELUDE + b"a\0b\r\n" + DOT,
    "R554_NO_VALID_RCPTS": EHLO + MAIL + RCPT_REFUSED + DATA,
    "R502_NOT_AVAILABLE": b"STARTTLS\r\n",
    "R553_NEED_SMTPUTF8": EHLO + "MAIL FROM:<jörg@example.org>\r\n".encode(),
}


def _catalogue() -> dict[str, Reply]:
    return {name: value for name, value in vars(R).items() if isinstance(value, Reply)}


def test_every_reply_is_triggered_or_known_to_be_the_sessions() -> None:
    names = set(_catalogue())
    assert not (set(TRIGGERS) & NOT_FROM_PROTOCOL)
    assert set(TRIGGERS) | NOT_FROM_PROTOCOL == names, "a new reply needs a trigger here"


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_protocol_sends(name: str) -> None:
    reply = _catalogue()[name]
    r = drive(TRIGGERS[name])
    assert reply.to_bytes() in r.replies
    # The name says the wire: R552_TOO_BIG is "552 ...".
    assert name.startswith(f"R{reply.code}_")
    prefix = f"{reply.code} {reply.enhanced} " if reply.enhanced else f"{reply.code} "
    assert reply.to_bytes().startswith(prefix.encode())


@pytest.mark.parametrize("name", sorted(set(_catalogue()) - {"R354_DATA"}))
def test_enhanced_codes_match_the_class(name: str) -> None:
    # RFC 3463: the enhanced code's class is the reply's first digit.
    reply = _catalogue()[name]
    assert re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", reply.enhanced), name
    assert reply.enhanced[0] == str(reply.code)[0], name
