"""outcome.py: reply codes and exceptions -> delivered / deferred / bounced (tables)."""

from __future__ import annotations

import smtplib
import socket
import ssl

import pytest

from hedwig.outcome import (
    BOUNCED,
    DEFERRED,
    DELIVERED,
    TEXT_LIMIT,
    Result,
    classify_error,
    classify_reply,
    describe_error,
    one_line,
)


@pytest.mark.parametrize(("code", "kind"), [
    (200, DELIVERED),
    (250, DELIVERED),
    (251, DELIVERED),  # user not local; will forward
    (299, DELIVERED),
    (421, DEFERRED),
    (450, DEFERRED),
    (451, DEFERRED),
    (452, DEFERRED),
    (499, DEFERRED),
    (500, BOUNCED),
    (550, BOUNCED),
    (552, BOUNCED),
    (554, BOUNCED),
    (599, BOUNCED),
    # no verdict: retry
    (354, DEFERRED),  # an intermediate reply where a final one belongs
    (199, DEFERRED),
    (0, DEFERRED),
    (-1, DEFERRED),  # smtplib: the reply line had no number
    (600, DEFERRED),
    (999, DEFERRED),
])
def test_classify_reply(code: int, kind: str) -> None:
    assert classify_reply(code) == kind


@pytest.mark.parametrize("exc", [
    TimeoutError("timed out"),
    socket.timeout("timed out"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    BrokenPipeError(32, "Broken pipe"),
    OSError(113, "No route to host"),
    socket.gaierror(-2, "Name or service not known"),
    ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number"),
    ssl.SSLCertVerificationError(1, "certificate verify failed"),
    smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
    smtplib.SMTPResponseException(500, "Line too long."),  # smtplib's own, not the server's
    smtplib.SMTPConnectError(554, b"no service"),
    smtplib.SMTPNotSupportedError("STARTTLS extension not supported by server."),
], ids=lambda e: type(e).__name__)
def test_classify_error_never_bounces(exc: BaseException) -> None:
    assert classify_error(exc) == DEFERRED


@pytest.mark.parametrize(("text", "expected"), [
    (b"2.0.0 OK", "2.0.0 OK"),
    ("2.0.0 OK", "2.0.0 OK"),
    (b"5.1.1 no such user\nsee https://x.test", "5.1.1 no such user; see https://x.test"),
    (b"  spaced  \r\n\r\nout ", "spaced; out"),
    (b"tab\there", "tab here"),
    (b"nul\x00and del\x7f", "nul and del "),
    (b"caf\xc3\xa9", "café"),
    (b"bad \xff byte", "bad \ufffd byte"),
    (b"", ""),
])
def test_one_line(text: bytes | str, expected: str) -> None:
    assert one_line(text) == expected


def test_one_line_is_bounded() -> None:
    text = one_line(b"x" * 5000)
    assert len(text) == TEXT_LIMIT
    assert text.endswith("…")
    assert one_line("y" * TEXT_LIMIT) == "y" * TEXT_LIMIT
    assert len(one_line("z" * 50, limit=10)) == 10


@pytest.mark.parametrize(("exc", "expected"), [
    (TimeoutError("timed out"), "timed out"),
    (TimeoutError(), "TimeoutError"),
    (ConnectionRefusedError(111, "Connection refused"),
     "ConnectionRefusedError: [Errno 111] Connection refused"),
    (smtplib.SMTPServerDisconnected("Connection unexpectedly closed"),
     "SMTPServerDisconnected: Connection unexpectedly closed"),
    (ValueError("named ValueError\nacross lines"), "named ValueError; across lines"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"),
     "SSLCertVerificationError: certificate verify failed"),
])
def test_describe_error(exc: BaseException, expected: str) -> None:
    assert describe_error(exc) == expected


def test_result_is_a_frozen_value() -> None:
    result = Result("a@x.test", DELIVERED, 250, "OK")
    assert result == Result("a@x.test", DELIVERED, 250, "OK")
    with pytest.raises(AttributeError):
        result.kind = BOUNCED  # type: ignore[misc]
