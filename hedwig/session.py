"""One client connection: socket <-> ServerProtocol, TLS, AUTH, timeouts, policy, spool.

The session greenlet reads bytes, feeds the protocol, answers its events
(MAIL and RCPT through policy, DATA into the spool) and writes the replies a
batch at a time, so a pipelined group costs one write. A 250 for a message is
written only after Spool.commit() returned, i.e. after the message is durable.

TLS: on an implicit listener the handshake comes before the greeting; on
STARTTLS the 220 goes out, the socket is wrapped in place and the protocol
forgets everything (tls_started), including plaintext pipelined after the
command. Both handshakes are bounded by HANDSHAKE_TIMEOUT (at most cmd_timeout).

Timeouts: a read or write that blocks carries a deadline (cmd_timeout, or the
end of data_timeout inside DATA) and one reaper greenlet per worker ends the
calls that pass theirs (SessionContext._reap), instead of a gevent Timeout per
recv(): starting and cancelling a Timeout cost ~3.7 µs of CPU a call, ~6 calls
a message (bench/RESULTS.md, "timeouts without a Timeout per call").

AUTH: the session runs the SASL exchange the protocol's AuthStart/AuthResponse
events drive; steps go through offload.run because an scrypt check costs ~50 ms
of CPU. Failed credentials wait (policy.AuthThrottle, per client address, on
this greenlet only) before their 535, and past the limits the session gets 421.
Credentials, AUTH arguments and SASL lines are never logged.

Must not: parse SMTP itself (that is smtp/protocol.py) or decide relay rules
(policy.py).
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import gevent
import gevent.socket
from gevent.queue import Queue

from . import metrics, offload, policy
from .config import ListenerConfig, ServerConfig
from .log import fields
from .smtp import auth
from .smtp import replies as R
from .smtp.protocol import (
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
from .smtp.replies import Reply
from .spool import Envelope, MessageWriter, Spool, SpoolError, new_id

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)

HANDSHAKE_TIMEOUT = 30.0  # seconds for a TLS handshake (cmd_timeout if shorter)

# Waiting for readability before recv() uses gevent's private per-socket wait
# (see Session._read); without it (another gevent), recv() simply goes first.
_WAIT_FIRST = hasattr(gevent.socket.socket, "_wait") and hasattr(gevent.socket.socket, "_read_event")


_date_cache: tuple[int, str] = (0, "")


def _date_header(when: float) -> str:
    """RFC 5322 date of `when`, formatted once per second."""
    global _date_cache
    second = int(when)
    if _date_cache[0] != second:
        _date_cache = (second, email.utils.formatdate(second, localtime=True))
    return _date_cache[1]


class Shutdown(Exception):
    """Raised into idle sessions when the worker stops."""


class Expired(TimeoutError):
    """Raised into a session whose read or write passed its deadline (SessionContext._reap)."""


@dataclass
class SessionContext:
    """What every session of one worker shares."""

    server: ServerConfig
    spool: Spool
    accepted: Queue  # ids of newly accepted messages, for the scheduler
    limits: Limits
    users: Mapping[str, str] = field(default_factory=dict)  # username -> stored password
    filters: policy.Filters = field(default_factory=policy.Filters)
    throttle: policy.AuthThrottle = field(default_factory=policy.AuthThrottle)
    sessions: set[Session] = field(default_factory=set)
    stopping: bool = False
    auth_mechanisms: tuple[str, ...] = field(init=False)
    _reaper: gevent.Greenlet | None = field(default=None, init=False, repr=False)
    _clients: dict[str, tuple[bool, str]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.auth_mechanisms = auth.mechanisms_for(self.users) if self.users else ()

    def client(self, client_ip: str) -> tuple[bool, str]:
        """(may relay, AUTH throttle key) of an address: parsed once, clients reconnect a lot."""
        known = self._clients.get(client_ip)
        if known is None:
            if len(self._clients) >= 4096:
                self._clients.clear()
            known = (policy.in_networks(client_ip, self.server.relay_networks), policy.throttle_key(client_ip))
            self._clients[client_ip] = known
        return known

    def enter(self, session: Session) -> None:
        self.sessions.add(session)
        if self._reaper is None or self._reaper.dead:
            self._reaper = gevent.spawn(self._reap)

    def _reap(self) -> None:
        """While there are sessions: every tick, end the reads and writes past their deadline.

        The tick is an eighth of the shorter timeout, between 50 ms and 1 s, so
        a timeout fires at most that late. The check runs again on the hub just
        before the throw: a session that got its bytes meanwhile is left alone.
        """
        shortest = min(self.server.cmd_timeout, self.server.data_timeout)
        tick = min(1.0, max(0.05, shortest / 8))
        loop = gevent.get_hub().loop
        try:
            while self.sessions:
                gevent.sleep(tick)
                now = time.monotonic()
                for session in self.sessions:
                    if 0.0 < session.deadline <= now:
                        loop.run_callback(session.expire)
        finally:
            if self._reaper is gevent.getcurrent():
                self._reaper = None


@dataclass(slots=True)
class _Transaction:
    sender: str = ""
    smtputf8: bool = False
    body: str = ""
    recipients: list[str] = field(default_factory=list)
    writer: MessageWriter | None = None
    write_error: str = ""


class Session:
    def __init__(
        self,
        sock: socket.socket,
        address: tuple,
        ctx: SessionContext,
        listener: ListenerConfig,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.sock = sock
        self.ctx = ctx
        self.listener = listener
        self.session_id = f"{next(_session_ids):x}"
        self.client_ip = str(address[0]) if address else ""
        self.may_relay, self.throttle_key = ctx.client(self.client_ip)
        self.idle = False  # blocked waiting for a command: safe to interrupt
        mode = listener.tls.mode if listener.tls is not None and tls_context is not None else None
        self.tls_context = tls_context
        self.implicit_tls = mode == "implicit"
        self.proto = ServerProtocol(
            ctx.limits,
            starttls_offered=mode == "starttls",
            auth_mechanisms=ctx.auth_mechanisms,
            auth_needs_tls=not listener.allow_cleartext_auth,
        )
        self.tx = _Transaction()
        self.tls: tuple[str, str, int] | None = None  # (version, cipher, bits) once encrypted
        self.user: str | None = None  # authenticated as
        self._sasl: auth.SaslExchange | None = None
        self._auth_failures = 0
        self._upgrade = False  # STARTTLS answered 220: wrap the socket after writing it
        self._data_deadline = 0.0
        self.deadline = 0.0  # while blocked in a read or write: when it expires (monotonic)
        self._answered = False  # a reply went out since the last read: the client has to act first

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        self.greenlet = gevent.getcurrent()
        self.ctx.enter(self)
        self.sock.settimeout(None)  # deadlines are the reaper's (see the module docstring)
        try:
            if self.implicit_tls and not self._handshake():
                return
            self._write(self.proto.greeting())
            while not self.proto.closed:
                data = self._read()
                if data is None:
                    break
                self.proto.receive_data(data)
                for event in self.proto.events():
                    self._handle(event)
                self._write(self.proto.data_to_send())
                if self._upgrade:
                    self._upgrade = False
                    if not self._handshake():
                        break
                    self._tls_started()
        except Shutdown:
            self._last_words(R.R421_SHUTTING_DOWN)
        except OSError as exc:
            log.debug("connection error", extra=self._fields(error=str(exc)))
        except Exception:  # noqa: BLE001 - one broken session must not take the worker down
            log.exception("session failed", extra=self._fields())
            self._last_words(R.R451_LOCAL_ERROR)
        finally:
            self._abort_data()
            self.ctx.sessions.discard(self)
            self._close()

    def _close(self) -> None:
        if self.tls is not None:
            # Say close_notify (RFC 8446 §6.1) so clients can tell our close from a
            # truncation; never wait for theirs (timeout 0: one non-blocking attempt).
            try:
                self.sock.settimeout(0.0)
                self.sock.unwrap()  # type: ignore[attr-defined]
            except (OSError, ValueError):
                pass
        try:
            self.sock.close()
        except OSError:
            pass

    def _read(self) -> bytes | None:
        """The next bytes from the client, or None after a timeout reply was queued."""
        if self.proto.in_data:
            self.deadline = self._data_deadline
        else:
            # Between messages a stopping worker may close the session; inside a
            # transaction the client gets to finish it (within the grace period).
            between_messages = not self.proto.in_transaction
            if self.ctx.stopping and between_messages:
                raise Shutdown()
            self.deadline = time.monotonic() + self.ctx.server.cmd_timeout
            self.idle = between_messages
        try:
            if self._answered and self.tls is None and _WAIT_FIRST:
                # The client is still reading our reply, so a recv() now would
                # only fail with EAGAIN (a syscall and an exception): wait until
                # the socket is readable first. gevent's own wait, the one its
                # recv() uses after an EAGAIN; saves ~1.3 µs of CPU a read
                # (bench/RESULTS.md). Not with TLS: the SSL object may hold
                # bytes already decrypted while the socket has none.
                self.sock._wait(self.sock._read_event)  # type: ignore[attr-defined]
            self._answered = False
            return self.sock.recv(65536)
        except TimeoutError:
            self.deadline = 0.0
            self._write(R.R421_TIMEOUT.to_bytes())
            log.info("timeout", extra=self._fields())
            return None
        finally:
            self.idle = False
            self.deadline = 0.0

    def expire(self) -> None:
        """On the hub: end the read or write this session is blocked in, if past its deadline."""
        if 0.0 < self.deadline <= time.monotonic() and not self.greenlet.dead:
            self.greenlet.throw(Expired())

    # -- TLS -----------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Wrap the socket in TLS, bounded in time; False (logged) if it failed."""
        assert self.tls_context is not None
        timeout = min(HANDSHAKE_TIMEOUT, self.ctx.server.cmd_timeout)
        # Nothing is in progress during a handshake: a stopping worker may end it at once
        # (no 421: there is no channel to say it on).
        if self.ctx.stopping:
            return False
        self.idle = True
        try:
            self.sock.settimeout(timeout)
            self.sock = self.tls_context.wrap_socket(
                self.sock, server_side=True, do_handshake_on_connect=False)
            self.sock.do_handshake()
        except Shutdown:
            return False
        except (OSError, ValueError) as exc:  # ssl.SSLError, TimeoutError, resets
            log.info("tls handshake failed", extra=self._fields(error=str(exc)))
            return False
        finally:
            self.idle = False
        self.sock.settimeout(None)
        cipher = self.sock.cipher()  # type: ignore[attr-defined]
        version = self.sock.version() or ""  # type: ignore[attr-defined]
        self.tls = (version, cipher[0] if cipher else "", cipher[2] if cipher else 0)
        self.proto.encrypted = True
        log.debug("tls", extra=self._fields(version=version, cipher=self.tls[1]))
        return True

    def _tls_started(self) -> None:
        """RFC 3207 §4.2: after STARTTLS the client starts over, with nothing remembered."""
        self.proto.tls_started()
        self._abort_data()
        self.tx = _Transaction()
        self.user = None
        self._sasl = None

    def _last_words(self, reply: Reply) -> None:
        try:
            self._write(self.proto.data_to_send() + reply.to_bytes())
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        if data:
            # Replies are small: one send() nearly always takes them whole, and
            # skips sendall's chunking machinery on the hot path.
            self._answered = True
            self.deadline = time.monotonic() + self.ctx.server.cmd_timeout
            try:
                sent = self.sock.send(data)
                if sent < len(data):
                    self.sock.sendall(data[sent:])
            finally:
                self.deadline = 0.0

    # -- events ----------------------------------------------------------------------

    def _handle(self, event: Event) -> None:
        if isinstance(event, DataChunk):
            self._on_data_chunk(event.data)
        elif isinstance(event, RcptTo):
            self.proto.reply(event, self._on_rcpt(event))
        elif isinstance(event, MailFrom):
            self.proto.reply(event, self._on_mail(event))
        elif isinstance(event, DataStart):
            self._on_data_start()
        elif isinstance(event, DataEnd):
            if event.error is None:
                self.proto.reply(event, self._on_data_end())
            else:
                self._abort_data()
                self.tx = _Transaction()
        elif isinstance(event, (AuthStart, AuthResponse)):
            self._on_auth(event)
        elif isinstance(event, StartTls):
            self._abort_data()
            self.tx = _Transaction()
            if self.tls_context is None:
                self.proto.reply(event, R.R454_TLS_UNAVAILABLE)
            else:
                self.proto.reply(event, R.R220_TLS_READY)
                self._upgrade = True
        elif isinstance(event, (Ehlo, Reset)):
            self._abort_data()
            self.tx = _Transaction()

    def _on_mail(self, event: MailFrom) -> Reply:
        spool = self.ctx.spool
        if not spool.healthy:
            return R.R421_SPOOL_UNHEALTHY
        if self.ctx.stopping:
            return R.R421_SHUTTING_DOWN
        if not spool.has_room():
            return R.R452_DISK_FULL
        refusal = policy.check_sender(event.address, self.ctx.filters)
        if refusal is not None:
            log.info("sender refused by filter", extra=self._fields(sender=event.address))
            return refusal
        self.tx = _Transaction(
            sender=event.address,
            smtputf8=event.params.smtputf8,
            body=event.params.body or "",
        )
        return R.R250_SENDER_OK

    def _on_rcpt(self, event: RcptTo) -> Reply:
        refusal = policy.check_relay(
            self.may_relay, authenticated=self.user is not None, auth_offered=bool(self.ctx.users))
        if refusal is None:
            refusal = policy.check_recipient(event.address, self.ctx.filters)
        if refusal is not None:
            log.info("recipient refused", extra=self._fields(rcpt=event.address, reply=refusal.code))
            return refusal
        self.tx.recipients.append(event.address)
        return R.R250_RCPT_OK

    # -- AUTH ------------------------------------------------------------------------

    def _on_auth(self, event: AuthStart | AuthResponse) -> None:
        throttle = self.ctx.throttle
        if isinstance(event, AuthStart):
            if throttle.blocked(self.throttle_key, time.monotonic()):
                log.warning("auth refused: too many failures from this address", extra=self._fields())
                self.proto.reply(event, R.R421_AUTH_FAILURES)
                return
            nonce = auth.cram_nonce(secrets.randbits(48), int(time.time()))
            exchange = auth.SaslExchange(event.mechanism, event.initial, self.ctx.users,
                                         hostname=self.ctx.limits.hostname, challenge_nonce=nonce)
            self._sasl = exchange
            # The step may check an scrypt hash (~50 ms of CPU): never on the hub.
            step = offload.run(exchange.start)
        else:
            exchange = self._sasl
            if exchange is None or exchange.finished:  # the protocol and we disagree: refuse
                self.proto.reply(event, R.R503_BAD_SEQUENCE)
                return
            step = offload.run(exchange.respond, event.line)
        if isinstance(step, auth.Challenge):
            self.proto.reply(event, step.reply)
            return
        self._sasl = None
        # An unknown "mechanism" may be a client's credentials in the wrong place.
        mechanism = exchange.mechanism if exchange.mechanism in self.ctx.auth_mechanisms else "other"
        if isinstance(step, auth.Done):
            self.user = step.username
            log.info("auth ok", extra=self._fields(mechanism=mechanism, user=step.username))
            self.proto.reply(event, step.reply)
            return
        if step.reply.code != 535:  # 501/504: a malformed exchange, not a guess
            self.proto.reply(event, step.reply)
            return
        # A wrong guess. Never log the username: it is often a mistyped password.
        self._auth_failures += 1
        delay = throttle.record_failure(self.throttle_key, time.monotonic())
        log.warning("auth failed", extra=self._fields(mechanism=mechanism, failures=self._auth_failures))
        gevent.sleep(delay)  # this session waits; the hub does not
        self.proto.reply(event, step.reply)
        if throttle.cut_off(self.throttle_key, self._auth_failures, time.monotonic()):
            log.warning("too many auth failures: closing", extra=self._fields())
            self.proto.send(R.R421_AUTH_FAILURES)

    def _on_data_start(self) -> None:
        tx = self.tx
        envelope = Envelope(
            msg_id=new_id(),
            sender=tx.sender,
            recipients=tuple(tx.recipients),
            received_at=time.time(),
            client=self.client_ip,
            helo=self.proto.helo or "",
            smtputf8=tx.smtputf8,
            body=tx.body,
            auth=self.user or "",  # server.bounce_notifications: only these senders get DSNs
        )
        self._data_deadline = time.monotonic() + self.ctx.server.data_timeout
        try:
            tx.writer = self.ctx.spool.create(envelope)
            tx.writer.write(self._received_header(envelope))
        except OSError as exc:
            self._fail_write(exc)

    def _on_data_chunk(self, data: bytes) -> None:
        writer = self.tx.writer
        if writer is None:
            return
        try:
            writer.write(data)
        except OSError as exc:
            self._fail_write(exc)

    def _on_data_end(self) -> Reply:
        tx, self.tx = self.tx, _Transaction()
        writer = tx.writer
        if writer is None:
            log.error("cannot spool message", extra=self._fields(error=tx.write_error))
            return R.R451_LOCAL_ERROR
        try:
            self.ctx.spool.commit(writer)
        except SpoolError as exc:
            log.error("not queued", extra=self._fields(msg_id=writer.msg_id, error=str(exc)))
            return R.R451_LOCAL_ERROR
        env = writer.envelope
        self.ctx.accepted.put(writer.msg_id)
        # SPEC §8: one line per accepted message (never its body).
        log.info("accepted", extra=self._fields(msg_id=writer.msg_id, sender=env.sender,
                                                rcpts=len(env.recipients), size=writer.size))
        metrics.emails_received.inc()
        return Reply(250, "2.0.0", f"OK queued as {writer.msg_id}")

    def _fields(self, **more: object) -> dict[str, dict[str, object]]:
        """`extra=` for this session's log lines: session_id and client, then `more`."""
        return fields(session_id=self.session_id, client=self.client_ip, **more)

    def _fail_write(self, exc: OSError) -> None:
        """Keep reading the message (the client is mid-DATA) and answer 451 at the dot."""
        self.tx.write_error = str(exc)
        if self.tx.writer is not None:
            self.tx.writer.abort()
            self.tx.writer = None

    def _abort_data(self) -> None:
        if self.tx.writer is not None:
            self.tx.writer.abort()
            self.tx.writer = None

    def _received_header(self, env: Envelope) -> bytes:
        # RFC 5321 §4.4: trace information at the top of the message.
        helo = env.helo.encode("ascii", "replace").decode("ascii")
        protocol = "UTF8SMTP" if env.smtputf8 else ("ESMTP" if self.proto.extended else "SMTP")
        if protocol != "SMTP":
            # RFC 3848 / RFC 6531: ESMTPS, ESMTPA, ESMTPSA (and UTF8SMTP likewise).
            protocol += ("S" if self.tls else "") + ("A" if self.user is not None else "")
        rcpt = f"\r\n\tfor <{env.recipients[0]}>" if len(env.recipients) == 1 else ""
        date = _date_header(env.received_at)
        tls = ""
        if self.tls is not None:
            version, cipher, bits = self.tls
            tls = f"\t(using {version} with cipher {cipher} ({bits} bits))\r\n"
        header = (
            f"Received: from {helo} ([{env.client}])\r\n{tls}"
            f"\tby {self.ctx.limits.hostname} (Hedwig) with {protocol} id {env.msg_id}{rcpt};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8")
