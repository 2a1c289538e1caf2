"""SMTP replies as values, and the named catalogue the server sends.

A Reply is what the session decides and what the protocol serialises; names
carry the code (R250_OK, R503_BAD_SEQUENCE) so a reader sees the wire at the
call site. Enhanced status codes follow RFC 3463 / RFC 5248.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str  # "" when the reply carries no enhanced status code
    text: str
    _wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Serialised once: the catalogue's replies go out thousands of times a second.
        prefix = f"{self.enhanced} " if self.enhanced else ""
        lines = self.text.split("\n")
        out = [f"{self.code}-{prefix}{line}\r\n" for line in lines[:-1]]
        out.append(f"{self.code} {prefix}{lines[-1]}\r\n")
        object.__setattr__(self, "_wire", "".join(out).encode("utf-8"))

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def closes(self) -> bool:
        """421 and 221 end the session (RFC 5321 §3.8)."""
        return self.code in (221, 421)

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)

    def to_bytes(self) -> bytes:
        return self._wire


R221_BYE = Reply(221, "2.0.0", "Bye")
R250_OK = Reply(250, "2.0.0", "OK")
R250_SENDER_OK = Reply(250, "2.1.0", "Sender OK")
R250_RCPT_OK = Reply(250, "2.1.5", "Recipient OK")
R250_RESET = Reply(250, "2.0.0", "Reset")
R250_NOOP = Reply(250, "2.0.0", "OK")
R252_VRFY = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
R214_HELP = Reply(
    214, "2.0.0",
    "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
)
R354_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R220_TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")

R421_TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
R421_TIMEOUT = Reply(421, "4.4.2", "Timeout exceeded, closing connection")
R421_TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors, closing connection")
R421_SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
R421_SPOOL_UNHEALTHY = Reply(421, "4.3.0", "Queue unavailable, try again later")
R421_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
R454_TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
R451_LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
R452_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
R452_DISK_FULL = Reply(452, "4.3.1", "Insufficient system storage")

R500_UNKNOWN = Reply(500, "5.5.2", "Command not recognized")
R500_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
R500_BARE_EOL = Reply(500, "5.5.2", "Bare CR or LF in command not allowed")
R501_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R501_NUL = Reply(501, "5.5.4", "NUL byte in command not allowed")
R501_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R501_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R503_BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
R503_NEED_EHLO = Reply(503, "5.5.1", "Send EHLO/HELO first")
R503_NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
R503_NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command first")
R503_NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command first")
R555_UNKNOWN_PARAM = Reply(555, "5.5.4", "Unsupported MAIL/RCPT parameter")
R552_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
R552_LINE_TOO_LONG = Reply(552, "5.6.0", "Message line longer than 1000 octets")
R553_PATH_TOO_LONG = Reply(553, "5.1.0", "Address too long")
R554_BARE_EOL = Reply(554, "5.6.11", "Bare CR or LF in message not allowed")
R554_NUL = Reply(554, "5.6.0", "NUL byte in message not allowed")
R554_NO_VALID_RCPTS = Reply(554, "5.5.1", "No valid recipients")
R502_NOT_AVAILABLE = Reply(502, "5.5.1", "Command not available")
R553_NEED_SMTPUTF8 = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
