"""Fuzzing ServerProtocol with seeded random SMTP-ish byte soup (no hypothesis needed).

h11's invariant (STYLE §9): whatever bytes arrive, in whatever chunks, the protocol
returns replies and nothing else. Here, for every input:

- receive_data()/events()/reply()/data_to_send() never raise;
- the output is well-framed replies, every line matching ^\\d{3}[ -] and ending in CRLF;
- the session either closed or still answers: after a final "\\r\\n.\\r\\nNOOP\\r\\n"
  (which ends any DATA or partial line), the last reply is NOOP's 250;
- with a decider that depends only on the event, feeding the same bytes whole and in
  random chunks gives the same replies (the differential half).

A failure message carries the seed and the input, so a case can be replayed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from hedwig.smtp import replies as R
from hedwig.smtp.protocol import (
    AuthResponse,
    AuthStart,
    DataEnd,
    Event,
    Limits,
    MailFrom,
    RcptTo,
    ServerProtocol,
    StartTls,
)
from hedwig.smtp.replies import Reply

from .test_protocol import assert_same, feed, random_chunks, split_replies

LIMITS = Limits(hostname="mx.test", max_message_size=3000, max_recipients=3, max_errors=20)
ITERATIONS = 3000
BUDGET_SECONDS = 5.0

VERBS: list[bytes] = [
    b"EHLO x.test", b"HELO x.test", b"ehlo", b"MAIL FROM:<a@b.example>", b"MAIL FROM:<>",
    b"mail from:<bad@refused.example>", b"MAIL FROM:<a@b.example> SIZE=99999",
    b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME SMTPUTF8", "MAIL FROM:<ü@b.example>".encode(),
    b"MAIL FROM:<a@b.example>", b"MAIL FROM:<a@b.example>",
    b"RCPT TO:<c@d.example>", b"RCPT TO:<c@d.example>", b"RCPT TO:<postmaster>",
    b"RCPT TO:<x@refused.example>", b"rcpt to:<@r.example:c@d.example>", b"DATA", b"DATA", b"data",
    b"RSET", b"NOOP", b"QUIT", b"VRFY x", b"HELP", b"STARTTLS", b"AUTH PLAIN", b"BDAT 10", b"",
]
# Spliced into command lines: parameters, punctuation, CR/LF/NUL, non-ASCII and non-UTF-8.
TOKENS: list[bytes] = [
    b" SIZE=", b" SIZE=1", b" BODY=", b" SMTPUTF8", b" X=1", b"FROM:", b"TO:", b"<", b">", b"<>", b"@",
    b":", b" ", b"\t", b"=", b"\r", b"\n", b".", b"..", b"\0", b"\xff", b"\xc3", b"\xc3\xa9",
    b"\xed\xa0\x80", b"\xc2\xb2", b"\xd9\xa1", "ı".encode(), "ſ".encode(), b"[IPv6:::1]", b"\"q\"",
]
# ESMTP parameters appended to a line; the values are the classic troublemakers.
VALUES: list[bytes] = [b"1", b"0", b"", b"-1", b"9" * 25, b"\xc2\xb2", b"\xd9\xa1\xd9\xa2", b"\xef\xbc\x91",
                       b"8BITMIME", b"7bit", b"=", b"\xff"]
PARAMS: list[bytes] = [b"SIZE", b"BODY", b"SMTPUTF8", b"NOTIFY", b"X"]
# Whole pieces of DATA-ish text: dots, terminators real and fake.
TEXT: list[bytes] = [
    b"\r\n", b".\r\n", b"..\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n",
    b"Subject: x\r\n", b"body line\r\n",
]
RUN_LENGTHS = [1, 2, 100, 500, 510, 511, 512, 513, 997, 998, 999, 1000, 1001, 2500]
ENDINGS = [b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b""]
RECOVER = b"\r\n.\r\nNOOP\r\n"


def soup(rng: random.Random) -> bytes:
    parts: list[bytes] = []
    for _ in range(rng.randint(1, 30)):
        roll = rng.random()
        if roll < 0.6:
            line = rng.choice(VERBS)
            while rng.random() < 0.3:
                line += b" " + rng.choice(PARAMS) + (b"=" + rng.choice(VALUES) if rng.random() < 0.7 else b"")
            while rng.random() < 0.25:
                at = rng.randint(0, len(line))
                line = line[:at] + rng.choice(TOKENS) + line[at:]
            parts.append(line + rng.choice(ENDINGS))
        elif roll < 0.75:
            parts.append(rng.choice(TEXT))
        elif roll < 0.85:
            parts.append(rng.choice([b"x", b".", b"\r", b"\n", b"\0", b"A\r\n"]) * rng.choice(RUN_LENGTHS))
        elif roll < 0.92:
            parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 16))))
        else:
            # A whole transaction start, so DATA is reached often.
            parts.append(b"EHLO a\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
    return b"".join(parts)


def random_decider(rng: random.Random) -> Callable[[Event], Reply]:
    """Mostly yes; sometimes no, a temporary failure, or a closing 421."""
    # AUTH: a 334 to start, then 235 or 535 (never a second 334, so RECOVER's NOOP
    # is always read as a command again).
    yes = {MailFrom: R.R250_SENDER_OK, RcptTo: R.R250_RCPT_OK,
           DataEnd: Reply(250, "2.0.0", "OK queued as X"), StartTls: Reply(220, "2.0.0", "Go ahead"),
           AuthStart: Reply(334, "", ""), AuthResponse: Reply(235, "2.7.0", "OK")}
    no = [Reply(550, "5.7.1", "No"), R.R451_LOCAL_ERROR, R.R452_DISK_FULL, Reply(454, "4.7.0", "No TLS"),
          Reply(535, "5.7.8", "No"), Reply(501, "5.5.2", "Cannot decode")]

    def decide(event: Event) -> Reply:
        roll = rng.random()
        if roll < 0.01:
            return R.R421_SPOOL_UNHEALTHY
        if roll < 0.8:
            return yes[type(event)]
        return rng.choice(no)

    return decide


def pure_decider(event: Event) -> Reply:
    """A decision that depends on the event alone, so chunkings can be compared."""
    if isinstance(event, MailFrom):
        return Reply(550, "5.7.1", "No") if "refused" in event.address else R.R250_SENDER_OK
    if isinstance(event, RcptTo):
        return Reply(550, "5.1.1", "No") if "refused" in event.address else R.R250_RCPT_OK
    if isinstance(event, DataEnd):
        return Reply(250, "2.0.0", "OK queued as X")
    if isinstance(event, StartTls):
        return Reply(454, "4.7.0", "No TLS")
    if isinstance(event, AuthStart):
        return Reply(334, "", "") if event.mechanism == "PLAIN" else Reply(504, "5.5.4", "No")
    if isinstance(event, AuthResponse):
        return Reply(535, "5.7.8", "No")
    raise AssertionError(event)


def run_random(data: bytes, rng: random.Random) -> tuple[ServerProtocol, bytes]:
    """Random chunks, random decisions, STARTTLS sometimes taken, then RECOVER."""
    proto = ServerProtocol(LIMITS, starttls_offered=rng.random() < 0.5,
                           auth_mechanisms=("PLAIN",) if rng.random() < 0.2 else ())
    decide = random_decider(rng)
    out = b""
    chunks = random_chunks(data, rng) + [RECOVER]
    while chunks:
        chunk = chunks.pop(0)
        proto.receive_data(chunk)
        tls = False
        for event in proto.events():
            if event.needs_reply:
                reply = decide(event)
                proto.reply(event, reply)
                tls = tls or (isinstance(event, StartTls) and reply.code == 220)
        out += proto.data_to_send()
        if tls:
            proto.tls_started()
            if not chunks:  # STARTTLS was in RECOVER, whose rest TLS threw away
                chunks.append(RECOVER)
    return proto, out


def test_fuzz_never_raises_and_always_answers() -> None:
    started = time.monotonic()
    for seed in range(ITERATIONS):
        rng = random.Random(seed)
        data = soup(rng)
        try:
            proto, out = run_random(data, rng)
            replies = split_replies(out)
        except Exception as exc:  # the point: nothing escapes
            raise AssertionError(f"seed {seed}: {exc!r} on input {data!r}") from exc
        if not proto.closed:
            assert replies and replies[-1] == R.R250_NOOP.to_bytes(), f"seed {seed}: {data!r} -> {replies[-3:]!r}"
        else:
            assert replies and replies[-1][:3] in (b"221", b"421"), f"seed {seed}: {data!r}"
        if seed % 100 == 0:
            assert time.monotonic() - started < BUDGET_SECONDS, f"fuzz too slow at seed {seed}"


def test_fuzz_chunking_does_not_change_the_replies() -> None:
    started = time.monotonic()
    for seed in range(ITERATIONS // 3):
        rng = random.Random(10_000 + seed)
        data = soup(rng) + RECOVER
        try:
            whole = feed([data], decider=pure_decider, limits=LIMITS)
            for _ in range(2):
                assert_same(whole, feed(random_chunks(data, rng), decider=pure_decider, limits=LIMITS), "random")
            if seed % 10 == 0:
                one = feed([data[i:i + 1] for i in range(len(data))], decider=pure_decider, limits=LIMITS)
                assert_same(whole, one, "one byte at a time")
        except Exception as exc:
            raise AssertionError(f"seed {10_000 + seed}: {exc!r} on input {data!r}") from exc
        if seed % 100 == 0:
            assert time.monotonic() - started < BUDGET_SECONDS, f"fuzz too slow at seed {seed}"


def _data_oracle(body: bytes) -> tuple[Reply | None, bytes]:
    """What the final dot after `body` must get: (refusal or None, un-stuffed message)."""
    lines = (body + b"\r\n").split(b"\r\n")[:-1]
    unstuffed = b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n" for line in lines)
    if any(b"\r" in line or b"\n" in line for line in lines):
        return R.R554_BARE_EOL, unstuffed
    if b"\0" in body:
        return R.R554_NUL, unstuffed
    if any(len(line) > 998 for line in lines):
        return R.R552_LINE_TOO_LONG, unstuffed
    if len(unstuffed) > LIMITS.max_message_size:
        return R.R552_TOO_BIG, unstuffed
    return None, unstuffed


def test_fuzz_data_stream() -> None:
    """Only DATA content (dots, CR, LF, NUL, long lines) against an independent oracle."""
    pieces = [b"a", b"\r\n", b"\r\n", b".", b"..", b"\r", b"\n", b"\0", b"\r\n.\r", b"\r\n.\n",
              b"\n.\r\n", b"x" * 997, b"x" * 998, b"x" * 999, b"\xff"]
    prelude = b"EHLO a\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    queued = Reply(250, "2.0.0", "OK queued as X")
    tested = 0
    for seed in range(600):
        rng = random.Random(20_000 + seed)
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        framed = b"\r\n" + body + b"\r\n.\r\n"
        if framed.find(b"\r\n.\r\n") != len(framed) - 5:
            continue  # the body would end the message early; the oracle assumes it does not
        tested += 1
        data = prelude + body + b"\r\n.\r\nNOOP\r\n"
        whole = feed([data], decider=pure_decider, limits=LIMITS)
        for _ in range(3):
            assert_same(whole, feed(random_chunks(data, rng), decider=pure_decider, limits=LIMITS),
                        f"seed {20_000 + seed}")
        error, unstuffed = _data_oracle(body)
        assert whole.replies[-2:] == [(error or queued).to_bytes(), R.R250_NOOP.to_bytes()], (seed, body)
        assert whole.messages[-1][1] == DataEnd(error), (seed, body)
        if error is None:
            assert whole.messages[-1][0] == unstuffed, (seed, body)
        else:
            assert unstuffed.startswith(whole.messages[-1][0]), (seed, body)
    assert tested > 200
