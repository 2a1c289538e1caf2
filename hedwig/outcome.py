"""What one delivery attempt did to each recipient: delivered, deferred or bounced.

Owns the pure decisions of SPEC §5 "per-recipient outcome": a reply code or an
exception in, a kind out, plus the `Result` value that carries it (with the
reply text made safe to store and log: decoded, one line, bounded).

The rule that shapes everything here: only a server's 5xx reply (or a decision
the caller makes deliberately, like "SMTPUTF8 needed but not offered") may
bounce.  An exception means no verdict was reached -- the connection broke,
timed out, failed TLS, or the server spoke gibberish -- so it always defers; a
retry is cheap and `max_retries` bounds it.

Must not: do I/O, import gevent or any other hedwig module, read a clock.
"""

from __future__ import annotations

from dataclasses import dataclass

DELIVERED = "delivered"
DEFERRED = "deferred"
BOUNCED = "bounced"

TEXT_LIMIT = 300  # characters of reply/error text kept per recipient


@dataclass(frozen=True, slots=True)
class Result:
    """What happened to one recipient in one attempt."""

    recipient: str
    kind: str  # DELIVERED | DEFERRED | BOUNCED
    code: int  # SMTP reply code, or 0 for a connection/timeout/TLS error
    text: str  # reply text or error description: one line, <= TEXT_LIMIT chars


def classify_reply(code: int) -> str:
    """RFC 5321 §4.2.1: 2yz delivered, 5yz bounced; 4yz and anything odd deferred.

    "Anything odd" includes smtplib's -1 for an unparsable reply line, 1yz/3yz
    where they do not belong, and codes outside 100..599: no verdict, so retry.
    """
    if 200 <= code <= 299:
        return DELIVERED
    if 500 <= code <= 599:
        return BOUNCED
    return DEFERRED


def classify_error(exc: BaseException) -> str:
    """An exception during an attempt: always deferred (connection-level errors never bounce).

    Covers timeouts (`TimeoutError`/`socket.timeout`), refused or reset
    connections (`OSError`), DNS failures inside connect (`socket.gaierror`),
    TLS handshake and certificate failures (`ssl.SSLError`,
    `ssl.CertificateError`), `smtplib.SMTPServerDisconnected`, and even
    `smtplib.SMTPResponseException` that smtplib raises itself -- e.g.
    `(500, "Line too long.")` for an over-long reply line, which is a broken
    server, not a refusal of this recipient.  A server's own 5xx verdict
    arrives as a reply and goes through `classify_reply`.
    """
    del exc  # the kind does not depend on it; the signature documents the decision
    return DEFERRED


def one_line(text: bytes | str, limit: int = TEXT_LIMIT) -> str:
    """Reply or error text made storable: decoded, control characters as spaces, bounded.

    smtplib joins multi-line replies with "\\n"; those become "; " so the
    whole reply survives on one line of a log or envelope file.
    """
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = "; ".join(part.strip() for part in text.splitlines() if part.strip())
    text = "".join(" " if ord(c) < 32 or ord(c) == 127 else c for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_error(exc: BaseException) -> str:
    """A short description of an exception for `Result.text` (one line)."""
    detail = str(exc).strip()
    name = type(exc).__name__
    if not detail:
        return name
    if isinstance(exc, TimeoutError) and detail == "timed out":
        return "timed out"
    return one_line(detail if name in detail else f"{name}: {detail}")
