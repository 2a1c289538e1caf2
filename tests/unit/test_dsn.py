"""dsn.py: who gets a notification, RFC 3463 statuses, and the RFC 3464 message itself.

The notification is read back with the standard library's `email` parser, an
independent reader of MIME.
"""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest

from hedwig.dsn import (
    HEADERS_LIMIT,
    LINE_LIMIT,
    SUBJECT,
    Failure,
    build_report,
    header_section,
    status_of,
    wants_notification,
)

DSN_ID = "06H1C24AP0FX0AS2EEAMRJG6FW"
MSG_ID = "06H1C20000000000000000000A"
SENDER = "alice@client.test"
ORIGINAL = (
    b"Received: from client.test ([127.0.0.1])\r\n"
    b"\tby mx.test (Hedwig) with ESMTPA id 06H1C20000000000000000000A;\r\n"
    b"\tMon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: Alice <alice@client.test>\r\n"
    b"To: bob@far.test, carol@far.test\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Message-ID: <q1@client.test>\r\n"
    b"\r\n"
    b"SECRET BODY LINE one\r\n"
    b"From: not-a-header-of-the-message@body.test\r\n"
    b"SECRET BODY LINE two\r\n"
)
FAILURES = [
    Failure("bob@far.test", 550, "5.1.1 no such user here", "mx1.far.test"),
    Failure("carol@far.test", 450, "gave up after 5 attempts: 4.2.1 mailbox busy", "mx2.far.test"),
    Failure("dave@nullmx.test", 0, "5.1.10 domain accepts no mail (null MX)"),
    Failure("erin@far.test", 554, "transaction failed"),
]


def report(failures: list[Failure] = FAILURES, original: bytes = ORIGINAL, sender: str = SENDER) -> bytes:
    return build_report(reporting_mta="mx.test", dsn_id=DSN_ID, now=1_700_000_100.0, sender=sender,
                        msg_id=MSG_ID, arrival=1_700_000_000.0, failures=failures, original=original)


def parse(data: bytes) -> Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def recipient_blocks(status_part: Message) -> list[Message]:
    """message/delivery-status: the per-message block, then one block per recipient."""
    blocks = status_part.get_payload()
    assert isinstance(blocks, list)
    return blocks


@pytest.mark.parametrize(("sender", "auth", "wanted"), [
    (SENDER, "alice", True),
    (SENDER, "", False),  # not authenticated
    ("", "alice", False),  # the null sender: a DSN never causes another
    ("<>", "alice", False),
])
def test_who_gets_a_notification(sender: str, auth: str, wanted: bool) -> None:
    assert wants_notification(sender, auth) is wanted


@pytest.mark.parametrize(("code", "text", "status"), [
    (550, "5.1.1 no such user", "5.1.1"),  # the upstream's own enhanced code
    (552, "5.3.4 message too big", "5.3.4"),
    (550, "no such user", "5.0.0"),  # none given
    (550, "4.2.1 odd: a 4.x.x code in a 5xx reply", "5.0.0"),
    (554, "5.7.1234 not a status code", "5.0.0"),
    (450, "gave up after 5 attempts: 4.2.1 mailbox busy", "5.4.7"),  # retries ran out
    (0, "gave up after 3 attempts: connect: Connection refused", "5.4.7"),
    (0, "expired: queued longer than deferred_retention", "5.4.7"),
    (0, "5.1.10 domain accepts no mail (null MX)", "5.1.10"),  # delivery prefixes DNS reasons
    (0, "5.1.2 domain does not exist", "5.1.2"),
    (0, "invalid recipient address", "5.0.0"),
])
def test_status_from_the_reply(code: int, text: str, status: str) -> None:
    assert status_of(code, text) == status


def test_the_report_is_multipart_report_with_three_parts() -> None:
    data = report()
    msg = parse(data)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@mx.test>"
    assert msg["To"] == f"<{SENDER}>"
    assert msg["Subject"] == SUBJECT
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] == f"<{DSN_ID}.dsn@mx.test>"
    assert email.utils.parsedate_to_datetime(msg["Date"]).timestamp() == 1_700_000_100
    assert msg["MIME-Version"] == "1.0"
    parts = msg.get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts[0].get_payload(decode=True).decode()
    for f in FAILURES:
        assert f"<{f.recipient}>" in human
    assert "<bob@far.test>: 550 5.1.1 no such user here" in human
    assert "<carol@far.test>: gave up after 5 attempts: 450 4.2.1 mailbox busy" in human
    assert "<dave@nullmx.test>: 5.1.10 domain accepts no mail (null MX)" in human
    assert MSG_ID in human


def test_per_message_and_per_recipient_fields() -> None:
    status_part = parse(report()).get_payload()[1]
    per_message, *per_rcpt = recipient_blocks(status_part)
    assert per_message["Reporting-MTA"] == "dns; mx.test"
    assert email.utils.parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == 1_700_000_000
    got = [(b["Final-Recipient"], b["Action"], b["Status"], b["Remote-MTA"], b["Diagnostic-Code"])
           for b in per_rcpt]
    assert got == [
        ("rfc822; bob@far.test", "failed", "5.1.1", "dns; mx1.far.test", "smtp; 550 5.1.1 no such user here"),
        ("rfc822; carol@far.test", "failed", "5.4.7", "dns; mx2.far.test", "smtp; 450 4.2.1 mailbox busy"),
        ("rfc822; dave@nullmx.test", "failed", "5.1.10", None,
         "X-Hedwig; 5.1.10 domain accepts no mail (null MX)"),
        ("rfc822; erin@far.test", "failed", "5.0.0", None, "smtp; 554 transaction failed"),
    ]


def test_only_the_header_section_of_the_original_is_attached() -> None:
    data = report()
    assert b"SECRET BODY" not in data and b"not-a-header" not in data
    headers_part = parse(data).get_payload()[2]
    attached = headers_part.get_payload()
    assert isinstance(attached, str)
    head = ORIGINAL.split(b"\r\n\r\n")[0].decode()
    assert attached.replace("\r\n", "\n").rstrip("\n") == head.replace("\r\n", "\n")
    assert "Subject: quarterly numbers" in attached


def test_crlf_line_ends_and_no_line_over_998() -> None:
    long_reply = "5.1.1 " + "x" * 2000
    long_header = b"X-Long: " + b"y" * 3000 + b"\r\n"
    data = report(FAILURES + [Failure("frank@far.test", 550, long_reply)],
                  original=long_header + ORIGINAL)
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= LINE_LIMIT
    parse(data)  # still parses


def test_header_section_without_a_blank_line_stops_at_the_first_non_header() -> None:
    message = b"Subject: no separator\r\n folded on\r\nthis is body text\r\nX-After: body\r\n"
    assert header_section(message) == b"Subject: no separator\r\n folded on\r\n"
    assert header_section(b"\r\nbody only\r\n") == b""
    assert header_section(b"Subject: unterminated") == b"Subject: unterminated\r\n"


def test_header_section_is_bounded_in_whole_lines() -> None:
    message = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"z" * 80) for i in range(2000)) + b"\r\nbody\r\n"
    head = header_section(message)
    assert len(head) <= HEADERS_LIMIT
    assert head.endswith(b"\r\n") and head.startswith(b"X-Filler-00000:")
    assert all(line.startswith(b"X-Filler-") for line in head.split(b"\r\n")[:-1])


def test_non_ascii_uses_the_rfc_6533_types() -> None:
    data = report([Failure("jürgen@bücher.test", 550, "5.1.1 unbekannt")],
                  original=b"Subject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n", sender="zoë@client.test")
    parts = email.message_from_bytes(data, policy=email.policy.SMTPUTF8).get_payload()
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    assert "Final-Recipient: utf-8; jürgen@bücher.test" in data.decode("utf-8")
    assert max(len(line) for line in data.split(b"\r\n")) <= LINE_LIMIT


def test_control_characters_in_reasons_cannot_add_lines() -> None:
    data = report([Failure("bob@far.test", 550, "5.1.1 a\r\nBcc: evil@x.test\r\n\r\nbody")])
    assert b"\r\nBcc:" not in data
    parse(data)
