"""One client connection: socket <-> ServerProtocol, timeouts, policy, spool.

The session greenlet reads bytes, feeds the protocol, answers its events
(MAIL and RCPT through policy, DATA into the spool) and writes the replies a
batch at a time, so a pipelined group costs one write. A 250 for a message is
written only after Spool.commit() returned, i.e. after the message is durable.

Must not: parse SMTP itself (that is smtp/protocol.py) or decide relay rules
(policy.py).
"""

from __future__ import annotations

import email.utils
import itertools
import logging
import socket
import time
from dataclasses import dataclass, field

import gevent
from gevent.queue import Queue

from . import policy
from .config import ListenerConfig, ServerConfig
from .smtp import replies as R
from .smtp.protocol import (
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
)
from .smtp.replies import Reply
from .spool import Envelope, MessageWriter, Spool, SpoolError, new_id

log = logging.getLogger(__name__)

_session_ids = itertools.count(1)


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


@dataclass
class SessionContext:
    """What every session of one worker shares."""

    server: ServerConfig
    spool: Spool
    accepted: Queue  # ids of newly accepted messages, for the scheduler
    limits: Limits
    sessions: set[Session] = field(default_factory=set)
    stopping: bool = False


@dataclass(slots=True)
class _Transaction:
    sender: str = ""
    smtputf8: bool = False
    body: str = ""
    recipients: list[str] = field(default_factory=list)
    writer: MessageWriter | None = None
    write_error: str = ""


class Session:
    def __init__(self, sock: socket.socket, address: tuple, ctx: SessionContext, listener: ListenerConfig) -> None:
        self.sock = sock
        self.ctx = ctx
        self.listener = listener
        self.session_id = f"{next(_session_ids):x}"
        self.client_ip = str(address[0]) if address else ""
        self.may_relay = policy.in_networks(self.client_ip, ctx.server.relay_networks)
        self.idle = False  # blocked waiting for a command: safe to interrupt
        self.proto = ServerProtocol(ctx.limits)
        self.tx = _Transaction()
        self._data_deadline = 0.0

    # -- the loop ------------------------------------------------------------------

    def run(self) -> None:
        self.greenlet = gevent.getcurrent()
        self.ctx.sessions.add(self)
        try:
            self._write(self.proto.greeting())
            while not self.proto.closed:
                data = self._read()
                if data is None:
                    break
                self.proto.receive_data(data)
                for event in self.proto.events():
                    self._handle(event)
                self._write(self.proto.data_to_send())
        except Shutdown:
            self._last_words(R.R421_SHUTTING_DOWN)
        except OSError as exc:
            log.debug("session_id=%s client=%s connection error: %s", self.session_id, self.client_ip, exc)
        except Exception:  # noqa: BLE001 - one broken session must not take the worker down
            log.exception("session_id=%s client=%s session failed", self.session_id, self.client_ip)
            self._last_words(R.R451_LOCAL_ERROR)
        finally:
            self._abort_data()
            self.ctx.sessions.discard(self)
            try:
                self.sock.close()
            except OSError:
                pass

    def _read(self) -> bytes | None:
        """The next bytes from the client, or None after a timeout reply was queued."""
        if self.proto.in_data:
            self.sock.settimeout(max(self._data_deadline - time.monotonic(), 0.001))
        else:
            # Between messages a stopping worker may close the session; inside a
            # transaction the client gets to finish it (within the grace period).
            between_messages = not self.proto.in_transaction
            if self.ctx.stopping and between_messages:
                raise Shutdown()
            self.sock.settimeout(self.ctx.server.cmd_timeout)
            self.idle = between_messages
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            self._write(R.R421_TIMEOUT.to_bytes())
            log.info("session_id=%s client=%s timeout", self.session_id, self.client_ip)
            return None
        finally:
            self.idle = False

    def _last_words(self, reply: Reply) -> None:
        try:
            self._write(self.proto.data_to_send() + reply.to_bytes())
        except OSError:
            pass

    def _write(self, data: bytes) -> None:
        if data:
            # Replies are small: one send() nearly always takes them whole, and
            # skips sendall's chunking machinery on the hot path.
            sent = self.sock.send(data)
            if sent < len(data):
                self.sock.sendall(data[sent:])

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
        self.tx = _Transaction(
            sender=event.address,
            smtputf8=event.params.smtputf8,
            body=event.params.body or "",
        )
        return R.R250_SENDER_OK

    def _on_rcpt(self, event: RcptTo) -> Reply:
        refusal = policy.check_relay(self.may_relay, authenticated=False, auth_offered=False)
        if refusal is not None:
            return refusal
        self.tx.recipients.append(event.address)
        return R.R250_RCPT_OK

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
            log.error("session_id=%s cannot spool message: %s", self.session_id, tx.write_error)
            return R.R451_LOCAL_ERROR
        try:
            self.ctx.spool.commit(writer)
        except SpoolError as exc:
            log.error("session_id=%s msg_id=%s not queued: %s", self.session_id, writer.msg_id, exc)
            return R.R451_LOCAL_ERROR
        env = writer.envelope
        self.ctx.accepted.put(writer.msg_id)
        log.info(
            "session_id=%s msg_id=%s accepted client=%s from=<%s> rcpts=%d size=%d",
            self.session_id, writer.msg_id, self.client_ip, env.sender, len(env.recipients), writer.size,
        )
        return Reply(250, "2.0.0", f"OK queued as {writer.msg_id}")

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
        rcpt = f"\r\n\tfor <{env.recipients[0]}>" if len(env.recipients) == 1 else ""
        date = _date_header(env.received_at)
        header = (
            f"Received: from {helo} ([{env.client}])\r\n"
            f"\tby {self.ctx.limits.hostname} (Hedwig) with {protocol} id {env.msg_id}{rcpt};\r\n"
            f"\t{date}\r\n"
        )
        return header.encode("utf-8")
