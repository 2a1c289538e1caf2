"""The server side of SMTP as a state machine: bytes in, events and reply bytes out.

Modelled on h11: the caller owns the socket, the clock and concurrency.

    proto = ServerProtocol(limits)
    out = proto.greeting()
    proto.receive_data(data)          # b"" means the peer closed
    for event in proto.events():
        if event.needs_reply:
            proto.reply(event, decide(event))
    sock.sendall(proto.data_to_send())

Syntax and sequence errors (500/501/503/555, line too long, bare CR or LF, NUL)
are answered here and never become events. Decisions that need the outside
world (accept this sender? this recipient? is the message safely queued?)
become events that the caller must answer with a Reply before the next event
is produced, so a pipelined batch is answered strictly in order and nothing
after DATA is read as a command until DATA has been answered.

AUTH (RFC 4954) is sequenced here and exchanged by the caller: `AUTH mech [initial]`
becomes AuthStart once the rules allow it (after EHLO, outside a transaction, not
already authenticated, encrypted unless cleartext AUTH is allowed: else 503/538),
and while the caller's reply is a 334, each next line is an AuthResponse rather
than a command. The caller runs the SASL exchange (hedwig.smtp.auth), because
checking a password hash is too slow for whoever owns the event loop.

DATA is framed here: the caller receives un-stuffed DataChunk events and one
DataEnd. A message that breaks a rule (too big, bare CR/LF, NUL, a line over
1000 octets) is read to its final dot and then refused once, by the protocol
itself (DataEnd.error), so the client and server stay in step.

Must not: touch sockets, gevent, clocks or files; import from outside hedwig.smtp.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import ClassVar

from . import auth as A
from . import replies as R
from .address import MailParams, ProtocolError, parse_mail, parse_rcpt
from .replies import Reply

CRLF = b"\r\n"
MAX_COMMAND_LINE = 512  # RFC 5321 §4.5.3.1.4, including CRLF
MAX_TEXT_LINE = 1000  # RFC 5321 §4.5.3.1.6, including CRLF
MAX_ERRORS = 20  # client errors before 421, as Postfix's smtpd_hard_error_limit

# A line starting with 999 octets that are not CR or LF is longer than 1000 with its
# CRLF. Anchored at line starts (re.M) so the scan stays linear in the chunk size.
_LONG_LINE = re.compile(rb"^[^\r\n]{%d}" % (MAX_TEXT_LINE - 1), re.M)
_BLOCK = MAX_TEXT_LINE // 2  # a run of MAX_TEXT_LINE - 1 bytes without CR/LF covers a whole aligned block
assert 2 * _BLOCK - 1 <= MAX_TEXT_LINE - 1


def _has_long_line(body: bytes) -> bool:
    """`_LONG_LINE.search(body)`, without running the regex over ordinary mail.

    Measured: the regex cost ~1.1 ms per 100 KiB (70% of a worker's time in
    100 KiB ingest); a find() of LF per 500-byte block costs ~35 µs. Only a
    block with no LF at all can be part of a long line, and then the regex
    decides, so the answer is always the regex's.
    """
    for start in range(0, len(body) - _BLOCK + 1, _BLOCK):
        if body.find(b"\n", start, start + _BLOCK) < 0:
            return _LONG_LINE.search(body) is not None
    return False

# A message may break several rules; the refusal must not depend on how the stream
# was cut into chunks, so the most serious break wins, not the first one seen.
_DATA_ERROR_RANK = {R.R554_BARE_EOL: 0, R.R554_NUL: 1, R.R552_LINE_TOO_LONG: 2, R.R552_TOO_BIG: 3}


@dataclass(frozen=True, slots=True)
class Limits:
    hostname: str
    max_message_size: int
    max_recipients: int
    max_errors: int = MAX_ERRORS


# -- events ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    needs_reply: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Ehlo(Event):
    name: str
    extended: bool  # False for HELO


@dataclass(frozen=True, slots=True)
class MailFrom(Event):
    needs_reply: ClassVar[bool] = True
    address: str  # "" for the null reverse-path
    params: MailParams


@dataclass(frozen=True, slots=True)
class RcptTo(Event):
    needs_reply: ClassVar[bool] = True
    address: str


@dataclass(frozen=True, slots=True)
class DataStart(Event):
    """354 has been sent; DataChunk events follow, then DataEnd."""


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    data: bytes  # un-stuffed message bytes, whole lines ending in CRLF


@dataclass(frozen=True, slots=True)
class DataEnd(Event):
    """The final dot. With `error` set, the protocol has refused the message itself."""

    error: Reply | None = None

    @property
    def needs_reply(self) -> bool:  # type: ignore[override]
        return self.error is None


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """The transaction in progress was abandoned (RSET, EHLO, a refused message...)."""


@dataclass(frozen=True, slots=True)
class StartTls(Event):
    needs_reply: ClassVar[bool] = True


@dataclass(frozen=True, slots=True)
class AuthStart(Event):
    """`AUTH mechanism [initial-response]`; answer 334 to go on, 235, or a refusal."""

    needs_reply: ClassVar[bool] = True
    mechanism: str  # upper-cased
    initial: str | None = field(default=None, repr=False)  # a credential: never in reprs


@dataclass(frozen=True, slots=True)
class AuthResponse(Event):
    """The client's line after a 334 (base64, or "*" to cancel); answered like AuthStart."""

    needs_reply: ClassVar[bool] = True
    line: str = field(repr=False)


# -- the state machine -------------------------------------------------------


@dataclass(slots=True)
class _Transaction:
    sender: str | None = None  # set once MAIL was accepted
    params: MailParams = field(default_factory=MailParams)
    accepted: int = 0  # recipients accepted
    attempted: int = 0  # RCPT commands that reached a decision


class ServerProtocol:
    def __init__(
        self,
        limits: Limits,
        *,
        starttls_offered: bool = False,
        auth_mechanisms: tuple[str, ...] = (),
        auth_needs_tls: bool = False,
        encrypted: bool = False,
    ) -> None:
        self.limits = limits
        self.starttls_offered = starttls_offered
        # Empty: no users, AUTH is 502. With auth_needs_tls, AUTH is neither advertised
        # nor accepted (538) until the connection is encrypted (RFC 4954 §4, RFC 8314).
        self.auth_mechanisms = auth_mechanisms
        self.auth_needs_tls = auth_needs_tls
        self.encrypted = encrypted  # TLS from the first byte, or after STARTTLS
        self.authenticated = False
        self.helo: str | None = None
        self.extended = False
        self.closed = False
        self.errors = 0
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._tx = _Transaction()
        self._awaiting: Event | None = None  # an event whose reply has not come yet
        self._in_data = False
        self._tls_pending = False
        self._sasl = False  # a 334 was sent: the next line is an AuthResponse
        self._discarding = False  # inside an over-long command line
        # DATA state
        self._mid_line = False  # the buffer does not start at a line start
        self._size = 0
        self._data_error: Reply | None = None

    # -- public API ----------------------------------------------------------

    @property
    def in_data(self) -> bool:
        return self._in_data

    @property
    def in_transaction(self) -> bool:
        return self._tx.sender is not None

    @property
    def in_auth(self) -> bool:
        """An AUTH exchange is under way (a 334 was the last word)."""
        return self._sasl

    @property
    def auth_offered(self) -> bool:
        """AUTH would be advertised and accepted now."""
        return bool(self.auth_mechanisms) and (self.encrypted or not self.auth_needs_tls)

    def greeting(self) -> bytes:
        return _greeting(self.limits.hostname)

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            return
        if not data:
            self.closed = True
            return
        self._buf += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def send(self, reply: Reply) -> None:
        """Send an unsolicited reply (a timeout's or shutdown's 421); 421 closes."""
        self._out.append(reply.to_bytes())
        if reply.closes:
            self.closed = True

    def reply(self, event: Event, reply: Reply) -> None:
        if event is not self._awaiting:
            raise RuntimeError(f"no reply is due for {event!r}")
        self._awaiting = None
        if isinstance(event, MailFrom):
            if reply.is_positive:
                self._tx = _Transaction(sender=event.address, params=event.params)
        elif isinstance(event, RcptTo):
            self._tx.attempted += 1
            if reply.is_positive:
                self._tx.accepted += 1
        elif isinstance(event, DataEnd):
            self._tx = _Transaction()
        elif isinstance(event, StartTls):
            if reply.code == 220:
                self._tls_pending = True
        elif isinstance(event, (AuthStart, AuthResponse)):
            self._sasl = reply.code == 334
            if reply.code == 235:
                self.authenticated = True
            elif reply.code in (501, 504):
                # A malformed exchange is a client error like a bad command; 535 is
                # the caller's to count (it throttles credential failures itself).
                self._error(reply)
                return
        self.send(reply)

    def tls_started(self) -> None:
        """The socket is now TLS: forget plaintext that followed STARTTLS, start over."""
        # RFC 3207 §4.2: discard all knowledge obtained from the client before TLS.
        self._tls_pending = False
        self._buf.clear()
        self._discarding = False
        self.helo = None
        self.extended = False
        self.starttls_offered = False
        self.encrypted = True
        self.authenticated = False
        self._sasl = False
        self._tx = _Transaction()

    def events(self) -> Iterator[Event]:
        while not self.closed and not self._tls_pending:
            if self._awaiting is not None:
                raise RuntimeError(f"reply to {self._awaiting!r} before asking for more")
            event = self._next_data_event() if self._in_data else self._next_command_event()
            if event is None:
                return
            if event.needs_reply:
                self._awaiting = event
            yield event

    # -- commands ------------------------------------------------------------

    def _error(self, reply: Reply) -> None:
        self._sasl = False  # a broken line inside an AUTH exchange ends the exchange
        self.send(reply)
        self.errors += 1
        if self.errors >= self.limits.max_errors and not self.closed:
            self.send(R.R421_TOO_MANY_ERRORS)

    def _next_command_event(self) -> Event | None:
        while not self.closed:
            buf = self._buf
            end = buf.find(b"\n")
            if end < 0:
                if len(buf) >= MAX_COMMAND_LINE:
                    if not self._discarding:
                        self._error(R.R500_LINE_TOO_LONG)
                        self._discarding = True
                    # keep a trailing CR: it may pair with the next LF
                    del buf[: len(buf) - 1]
                return None
            bare_lf = end == 0 or buf[end - 1] != 13
            line = bytes(buf[: end + 1])
            del buf[: end + 1]
            if self._discarding:
                # Inside a refused line: only a real CRLF ends it.
                self._discarding = bare_lf
                continue
            if len(line) > MAX_COMMAND_LINE:
                self._error(R.R500_LINE_TOO_LONG)
                self._discarding = bare_lf
                continue
            if bare_lf:
                # RFC 5321 §2.3.8: a bare LF is not a line end. Everything up to
                # the next CRLF belongs to this bad line and is never executed;
                # the client hears 500 now rather than waiting in silence.
                self._error(R.R500_BARE_EOL)
                self._discarding = True
                continue
            text = line[:-2]
            if b"\r" in text:
                self._error(R.R500_BARE_EOL)
                continue
            if b"\0" in text:
                self._error(R.R501_NUL)
                continue
            if self._sasl:
                # Base64 is ASCII; anything else fails to decode in the exchange.
                return AuthResponse(text.decode("ascii", "replace"))
            event = self._command(text)
            if event is not None:
                return event
        return None

    def _command(self, line: bytes) -> Event | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R.R501_SYNTAX)
            return None
        verb, _, arg = text.partition(" ")
        # Verbs are ASCII: "ma\u0131l".upper() == "MAIL" must not be read as MAIL.
        handler = self._VERBS.get(verb.upper()) if verb.isascii() else None
        if handler is None:
            self._error(R.R500_UNKNOWN)
            return None
        try:
            return handler(self, arg.strip(" "))
        except ProtocolError as exc:
            self._error(exc.reply)
            return None

    def _ehlo(self, arg: str, extended: bool) -> Event:
        # Liberal in what we accept (RFC 5321 §4.1.4): clients send all sorts of names here.
        if not arg or not arg.isprintable():
            raise ProtocolError(R.R501_SYNTAX.with_text(f"Syntax: {'EHLO' if extended else 'HELO'} hostname"))
        arg = arg.split(" ", 1)[0]
        event: Event = Ehlo(arg, extended)
        self._reset_transaction()
        self.helo = arg
        self.extended = extended
        host = self.limits.hostname
        if not extended:
            self._out.append(_helo_reply(host))
            return event
        auth = tuple(self.auth_mechanisms) if self.auth_offered else ()
        self._out.append(_ehlo_reply(host, self.limits.max_message_size, self.starttls_offered, auth))
        return event

    def _cmd_ehlo(self, arg: str) -> Event:
        return self._ehlo(arg, True)

    def _cmd_helo(self, arg: str) -> Event:
        return self._ehlo(arg, False)

    def _cmd_mail(self, arg: str) -> Event:
        if self.helo is None:
            raise ProtocolError(R.R503_NEED_EHLO)
        if self._tx.sender is not None:
            raise ProtocolError(R.R503_NESTED_MAIL)
        address, params = parse_mail(arg)
        if params.size is not None and params.size > self.limits.max_message_size:
            raise ProtocolError(R.R552_TOO_BIG)
        return MailFrom(address, params)

    def _cmd_rcpt(self, arg: str) -> Event:
        if self._tx.sender is None:
            raise ProtocolError(R.R503_NEED_MAIL)
        address = parse_rcpt(arg, self._tx.params.smtputf8)
        if self._tx.accepted >= self.limits.max_recipients:
            # RFC 5321 §4.5.3.1.10: 452 and the client sends the rest later.
            self.send(R.R452_TOO_MANY_RCPTS)
            return None  # type: ignore[return-value]
        return RcptTo(address)

    def _cmd_data(self, arg: str) -> Event:
        if arg:
            raise ProtocolError(R.R501_SYNTAX)
        if self._tx.sender is None:
            raise ProtocolError(R.R503_NEED_MAIL)
        if self._tx.accepted == 0:
            raise ProtocolError(R.R554_NO_VALID_RCPTS if self._tx.attempted else R.R503_NEED_RCPT)
        self.send(R.R354_DATA)
        self._in_data = True
        self._mid_line = False
        self._size = 0
        self._data_error = None
        return DataStart()

    def _reset_transaction(self) -> bool:
        active = self._tx.sender is not None
        self._tx = _Transaction()
        return active

    def _cmd_rset(self, arg: str) -> Event | None:
        if arg:
            raise ProtocolError(R.R501_SYNTAX)
        self.send(R.R250_RESET)
        return Reset() if self._reset_transaction() else None

    def _cmd_noop(self, arg: str) -> None:
        self.send(R.R250_NOOP)

    def _cmd_quit(self, arg: str) -> None:
        if arg:
            raise ProtocolError(R.R501_SYNTAX)
        self.send(R.R221_BYE)
        self.closed = True

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg:
            raise ProtocolError(R.R501_SYNTAX)
        self.send(R.R252_VRFY)

    def _cmd_help(self, arg: str) -> None:
        self.send(R.R214_HELP)

    def _cmd_starttls(self, arg: str) -> Event:
        if not self.starttls_offered:
            raise ProtocolError(R.R502_NOT_AVAILABLE)
        if arg:
            raise ProtocolError(R.R501_SYNTAX)
        if self.helo is None or not self.extended:
            raise ProtocolError(R.R503_NEED_EHLO)
        self._reset_transaction()
        return StartTls()

    def _cmd_auth(self, arg: str) -> Event:
        if not self.auth_mechanisms:
            raise ProtocolError(R.R502_NOT_AVAILABLE)  # no users: no AUTH
        # RFC 4954 §4: only after EHLO, once per session, never inside a transaction.
        if self.helo is None or not self.extended:
            raise ProtocolError(R.R503_NEED_EHLO)
        if self.authenticated:
            raise ProtocolError(A.R503_ALREADY_AUTH)
        if self._tx.sender is not None:
            raise ProtocolError(R.R503_BAD_SEQUENCE)
        if not self.auth_offered:
            raise ProtocolError(A.R538_ENCRYPTION_REQUIRED)
        mechanism, initial = A.parse_auth(arg)
        return AuthStart(mechanism, initial)

    _VERBS = {
        "EHLO": _cmd_ehlo,
        "HELO": _cmd_helo,
        "MAIL": _cmd_mail,
        "RCPT": _cmd_rcpt,
        "DATA": _cmd_data,
        "RSET": _cmd_rset,
        "NOOP": _cmd_noop,
        "QUIT": _cmd_quit,
        "VRFY": _cmd_vrfy,
        "HELP": _cmd_help,
        "STARTTLS": _cmd_starttls,
        "AUTH": _cmd_auth,
    }

    # -- DATA ------------------------------------------------------------------

    def _next_data_event(self) -> Event | None:
        """Frame DATA at C speed: whole lines are checked and un-stuffed per chunk.

        Invariant: unless _mid_line, the buffer starts at the start of a line, so
        the terminator is either a leading ".\\r\\n" or "\\r\\n.\\r\\n" inside.
        """
        buf = self._buf
        if not buf:
            return None
        end = -1
        if not self._mid_line and buf.startswith(b".\r\n"):
            end = 0
            body = b""
        else:
            found = buf.find(b"\r\n.\r\n")
            if found >= 0:
                end = found + 2
                body = bytes(buf[:end])
            else:
                last = buf.rfind(CRLF)
                if last < 0:
                    self._check_partial_line(buf)
                    return None
                body = bytes(buf[: last + 2])
        consumed = len(body) + (3 if end >= 0 else 0)
        del buf[:consumed]
        chunk = self._check_lines(body) if body else b""
        self._mid_line = False
        if end < 0:
            self._check_partial_line(buf)
            return DataChunk(chunk) if chunk else self._next_data_event()
        if chunk:
            # Hand out the last chunk first; the terminator stays as a sentinel.
            self._buf[:0] = b".\r\n"
            return DataChunk(chunk)
        self._in_data = False
        error = self._data_error
        if error is not None:
            self._tx = _Transaction()
            self.send(error)
        return DataEnd(error)

    def _flag(self, error: Reply) -> None:
        current = self._data_error
        if current is None or _DATA_ERROR_RANK[error] < _DATA_ERROR_RANK[current]:
            self._data_error = error

    def _check_partial_line(self, buf: bytearray) -> None:
        """A line with no CRLF yet: once longer than any legal line, judge it and drop it."""
        if len(buf) > MAX_TEXT_LINE:
            keep = 1 if buf.endswith(b"\r") else 0
            # The dropped bytes are never seen again: judge them as _check_lines would.
            # The buffer holds no CRLF, so every CR or LF in them is bare.
            dropped = buf[: len(buf) - keep]
            if b"\r" in dropped or b"\n" in dropped:
                self._flag(R.R554_BARE_EOL)
            if b"\0" in dropped:
                self._flag(R.R554_NUL)
            self._flag(R.R552_LINE_TOO_LONG)
            del buf[: len(buf) - keep]
            self._mid_line = True

    def _check_lines(self, body: bytes) -> bytes:
        """Whole CRLF-terminated lines -> un-stuffed bytes; rule breaks recorded, not raised."""
        crlf = body.count(CRLF)
        if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
            # SMTP smuggling defence: a bare CR or LF is never a line end (RFC 5321 §2.3.8).
            self._flag(R.R554_BARE_EOL)
        if b"\0" in body:
            self._flag(R.R554_NUL)
        if _has_long_line(body):
            self._flag(R.R552_LINE_TOO_LONG)
        # RFC 5321 §4.5.2: remove the leading dot of every line that has one.
        if not self._mid_line and body.startswith(b"."):
            body = body[1:]
        if b"\r\n." in body:
            body = body.replace(b"\r\n.", b"\r\n")
        self._size += len(body)
        if self._size > self.limits.max_message_size:
            self._flag(R.R552_TOO_BIG)
        return b"" if self._data_error else body


# The greeting, HELO and EHLO replies depend on a few settings only: built once each.

@functools.lru_cache(maxsize=64)
def _greeting(hostname: str) -> bytes:
    return Reply(220, "", f"{hostname} ESMTP Hedwig").to_bytes()


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, max_size: int, starttls: bool, auth: tuple[str, ...]) -> bytes:
    lines = [hostname, "PIPELINING", f"SIZE {max_size}", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH " + " ".join(auth))
    return Reply(250, "", "\n".join(lines)).to_bytes()


@functools.lru_cache(maxsize=64)
def _helo_reply(hostname: str) -> bytes:
    return Reply(250, "", hostname).to_bytes()
