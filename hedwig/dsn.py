"""Delivery status notifications (RFC 3464): the message that tells a sender its mail bounced.

Owns the pure part of `server.bounce_notifications` (SPEC §5): who gets a
notification (`wants_notification`), the RFC 3463 status of each failed
recipient (`status_of`), the header section of the original message
(`header_section`), and the notification itself (`build_report`): a
multipart/report of a human-readable explanation, a message/delivery-status
part and the original's header section only, never its body. CRLF line ends,
no line longer than 998 octets (RFC 5322 §2.1.1).

delivery.py decides when to send one and queues it through the spool like
accepted mail (`MAIL FROM:<>`, so a notification never causes another).

Must not: do I/O, read a clock (the caller passes `now`), import gevent or
another hedwig module.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from dataclasses import dataclass

SUBJECT = "Undelivered Mail Returned to Sender"
HEADERS_LIMIT = 64 * 1024  # octets of the original header section kept (whole lines)
LINE_LIMIT = 998  # RFC 5322 §2.1.1, without the CRLF

# "5.1.1 no such user": an enhanced status code opening a reply's text (RFC 2034 §4).
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
# delivery._conclude's wording for recipients it gave up on rather than saw refused.
_GAVE_UP = re.compile(r"(?:gave up after \d+ attempts|expired): ?")
# RFC 5322 §3.6.8: a field name is printable ASCII but ":", followed by ":".
_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient the message could not be delivered to."""

    recipient: str
    code: int  # the refusing reply's code, 0 when no server answered (DNS, local decision)
    text: str  # reply text or reason, as delivery recorded it (one line)
    remote_mta: str = ""  # host name of the server that answered, when known


def wants_notification(sender: str, auth: str) -> bool:
    """Notify only a sender who authenticated when submitting it, and never the null sender.

    The null sender is what notifications themselves use (RFC 5321 §4.5.5), so a
    notification that bounces causes no other.
    """
    return bool(auth) and sender not in ("", "<>")


def split_reason(text: str) -> tuple[str, str]:
    """(the "gave up after N attempts: " or "expired: " preamble or "", the reply text after it)."""
    m = _GAVE_UP.match(text)
    return (m[0], text[m.end():]) if m else ("", text)


def status_of(code: int, text: str) -> str:
    """The RFC 3463 status of a failed recipient; always class 5 (RFC 3464 `Action: failed`).

    A 5xx reply (or a reason delivery prefixed with a code, as for a permanent
    DNS failure) keeps its own 5.x.x when it has one, else 5.0.0. A recipient
    given up on after retries, or expired, gets 5.4.7 (delivery time expired),
    whatever its last temporary reply said.
    """
    gave_up, reply = split_reason(text)
    if gave_up or 400 <= code <= 499:
        return "5.4.7"
    m = _ENHANCED.match(reply)
    if m and m[1] == "5":
        return m[0]
    return "5.0.0"


def header_section(message: bytes, limit: int = HEADERS_LIMIT) -> bytes:
    """The message's header fields, CRLF-terminated: up to the blank line, never the body.

    Stops early at a line that is neither a field nor a folded continuation
    (a message without the blank line must not give its body away), keeps at
    most `limit` octets of whole lines, and cuts a line longer than LINE_LIMIT.
    """
    end = message.find(b"\r\n\r\n", 0, limit + 2)
    head = message[: end + 2] if end >= 0 else message[: limit + 2]
    out: list[bytes] = []
    size = 0
    for line in head.split(b"\r\n"):
        if not line or not (_FIELD.match(line) or (out and line[:1] in (b" ", b"\t"))):
            break
        line = line[:LINE_LIMIT]
        if size + len(line) + 2 > limit:
            break
        out.append(line + b"\r\n")
        size += len(line) + 2
    return b"".join(out)


def _one_line(text: str) -> str:
    """A line of ours: no CR, LF or other controls, at most LINE_LIMIT octets in UTF-8."""
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    raw = text.encode("utf-8")
    return text if len(raw) <= LINE_LIMIT else raw[:LINE_LIMIT].decode("utf-8", "ignore")


def _address_type(address: str) -> str:
    return "rfc822" if address.isascii() else "utf-8"  # RFC 6533 §3 for UTF-8 addresses


def build_report(*, reporting_mta: str, dsn_id: str, now: float, sender: str, msg_id: str,
                 arrival: float, failures: Sequence[Failure], original: bytes) -> bytes:
    """The notification to `sender` about message `msg_id`: a whole RFC 5322 message, CRLF.

    `reporting_mta` names this server (From: MAILER-DAEMON@ it, Reporting-MTA);
    `dsn_id` is the notification's own queue id (Message-ID and MIME boundary);
    `original` the bounced message as queued, of which only the header section
    is attached. With non-ASCII addresses or headers the parts are RFC 6533's
    message/global-* types.
    """
    host = _one_line(reporting_mta)
    boundary = f"{dsn_id}/report"  # our id: no original header line can be it
    headers = header_section(original)
    utf8 = not (sender.isascii() and headers.isascii() and all(f.recipient.isascii() for f in failures))
    cte = "8bit" if utf8 else "7bit"
    sender = _one_line(sender)

    human = [
        f"This is the mail system at {host}.",
        "",
        "Your message could not be delivered to one or more recipients.",
        f"It was received on {email.utils.formatdate(arrival)} (queue id {msg_id}).",
        "Its header section is attached below.",
        "",
    ]
    for f in failures:
        preamble, reply = split_reason(f.text)
        human.append(_one_line(f"<{f.recipient}>: {preamble}{f.code or ''} {reply}".replace("  ", " ")))

    status = [
        f"Reporting-MTA: dns; {host}",
        f"X-Hedwig-Queue-ID: {msg_id}",
        f"Arrival-Date: {email.utils.formatdate(arrival)}",
    ]
    for f in failures:
        reply = split_reason(f.text)[1]
        status += [
            "",
            _one_line(f"Final-Recipient: {_address_type(f.recipient)}; {f.recipient}"),
            "Action: failed",
            f"Status: {status_of(f.code, f.text)}",
        ]
        if f.remote_mta:
            status.append(_one_line(f"Remote-MTA: dns; {f.remote_mta}"))
        if f.code:
            status.append(_one_line(f"Diagnostic-Code: smtp; {f.code} {reply}"))
        else:  # no server's reply: our own reason (RFC 3464 §2.3.6 allows an X- type)
            status.append(_one_line(f"Diagnostic-Code: X-Hedwig; {f.text}"))

    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{host}>",
        f"To: <{sender}>",
        f"Subject: {SUBJECT}",
        f"Date: {email.utils.formatdate(now)}",
        f"Message-ID: <{dsn_id}.dsn@{host}>",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message (RFC 3464 delivery status notification).",
        "",
        f"--{boundary}",
        f"Content-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}",
        f"Content-Transfer-Encoding: {cte}",
        "Content-Description: Notification",
        "",
        *human,
        "",
        f"--{boundary}",
        f"Content-Type: message/{'global-' if utf8 else ''}delivery-status",
        f"Content-Transfer-Encoding: {cte}",
        "Content-Description: Delivery report",
        "",
        *status,
        "",
        f"--{boundary}",
        f"Content-Type: {'message/global-headers' if utf8 else 'text/rfc822-headers'}",
        f"Content-Transfer-Encoding: {cte}",
        "Content-Description: Undelivered message headers",
        "",
    ]
    text = "\r\n".join(top).encode("utf-8") + b"\r\n"
    return text + headers + f"\r\n--{boundary}--\r\n".encode("ascii")
