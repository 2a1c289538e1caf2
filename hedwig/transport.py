"""Pooled outbound SMTP over smtplib: connect, EHLO, STARTTLS policy, one transaction.

Owns the client side of SPEC §5: trying a domain's targets in order, EHLO with
`helo_hostname` (HELO if EHLO is refused), the `tls` policy, one MAIL/RCPT/DATA
transaction with per-recipient results (classified by outcome.py), and a pool
of open connections reused across messages (RSET between), at most
`pool_size` open at once.

Failover: a failure before MAIL FROM -- connect error or timeout, a non-220
greeting, EHLO and HELO refused, a TLS failure under `tls = "required"` --
moves on to the next target.  Once MAIL FROM is sent, the host has the
message's fate: replies are per recipient, and a disconnect or timeout defers
every recipient without a final reply (no second host in the same attempt; the
retry may pick another one).

TLS policy (RFC 3207):
  none           never STARTTLS (`outbound_local`; the caller maps it).
  opportunistic  STARTTLS when offered, certificates NOT verified: encryption
                 against passive eavesdropping without letting a self-signed
                 or mismatched certificate block delivery (RFC 7435, Postfix
                 `smtp_tls_security_level = may`).  If the server refuses the
                 STARTTLS command the session goes on in plaintext; if the
                 handshake itself fails, the same host is tried once more in
                 plaintext before the next target (Postfix does the same), since
                 a server whose TLS is broken would otherwise never get mail.
  required       STARTTLS must be offered and the certificate must verify for
                 the target's `name` (SNI and hostname check); otherwise that
                 target fails.  Verification uses `ssl_context` when given
                 (build it from `ssl.create_default_context()` to keep the
                 system CAs), else the system default context.

Concurrency: safe to call `send()` from many greenlets (or threads).  A
connection is used by one caller at a time; the pool counts open connections
(idle or busy) against `pool_size` and a caller waits at most `connect_timeout`
for a slot, evicting the least recently used idle connection when that makes
room.  Every network wait is bounded: `connect_timeout` for the TCP connect,
`command_timeout` for each command reply, the handshake and each send.

Pipelining (RFC 2920): to a server that offers PIPELINING, MAIL, every RCPT
and DATA go in one write, and so does the RSET a pooled connection needs
before its next transaction; the replies are then read in order. Two writes
and two waits a message instead of five: relaying spends most of its CPU on
the hub's round trips (bench/RESULTS.md, "outbound pipelining"). A pooled
connection whose pipelined RSET gets no 250 (the server dropped it while
idle) is closed and the message goes on a fresh one, as after a failed RSET
in lockstep: nothing was accepted on it. To other servers, lockstep.

Must not: import gevent -- the worker's monkey-patching makes `socket`, `ssl`
and `threading` (hence smtplib and the pool's Condition) cooperative, while
tests use the same code with native threads -- decide retries or bounces of a
message (that is delivery's job), or log message bodies.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from hedwig import metrics
from hedwig.outcome import (
    BOUNCED,
    DEFERRED,
    Result,
    classify_error,
    classify_reply,
    describe_error,
    one_line,
)

log = logging.getLogger(__name__)

TLS_MODES = ("opportunistic", "required", "none")

# QUIT is a courtesy: a server that does not answer it quickly is not waited for.
QUIT_TIMEOUT = 5.0

def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2: a line starting with "." gets another "." on the wire.

    Two replaces rather than a multiline regex: 0.13 ms instead of 0.73 ms per
    100 KiB (16% of a worker's time relaying 100 KiB messages).
    """
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\n.", b"\n..")
_BAD_ADDRESS_CHARS = re.compile(r"[\x00-\x1f\x7f<>]")


class TargetLike(Protocol):
    """What `send()` needs of a target: hedwig.routing.Target fits."""

    @property
    def host(self) -> str: ...  # IP address to connect to

    @property
    def port(self) -> int: ...

    @property
    def name(self) -> str: ...  # host name for logs, SNI and certificate checks


@dataclass(frozen=True, slots=True)
class Attempt:
    """One `send()`: where it went and what happened to each recipient."""

    host: str  # "name[ip]:port" actually used, or "" if none could be reached
    results: tuple[Result, ...]  # one per recipient, in order
    latency: float  # seconds spent in send() (monotonic), connects included


@dataclass(frozen=True, slots=True)
class _Failure:
    """A target that could not be used (before MAIL FROM)."""

    code: int  # reply code that refused us, or 0 for an error
    text: str
    tls_handshake: bool = False  # the TLS handshake failed: plaintext may still work
    final: bool = False  # no point trying further targets (no pool slot)


@dataclass(slots=True)
class _Pooled:
    conn: _Connection
    key: tuple[str, int, str]
    label: str
    idle_since: float = 0.0
    reused: bool = False  # taken from the pool: a transaction ran on it before


class _Stale(Exception):
    """A pooled connection did not answer its pipelined RSET: use another."""


class _Connection(smtplib.SMTP):
    """smtplib.SMTP with the two things the transport needs that it lacks.

    - The command timeout is applied to the socket right after the TCP connect,
      so the greeting, every reply and the TLS handshake are bounded by it,
      while the connect itself is bounded by `connect_timeout`.
    - `starttls()` sends SNI and checks the certificate against `self._host`,
      which smtplib sets only when the constructor connects; we connect later
      (to read a non-220 greeting as a value, not an exception), so it is set
      here to the target's name, not the IP address we connect to.
    """

    def __init__(self, *, name: str, helo_hostname: str, connect_timeout: float,
                 command_timeout: float) -> None:
        # local_hostname given: smtplib would otherwise call socket.getfqdn(), a DNS wait.
        super().__init__(local_hostname=helo_hostname, timeout=connect_timeout)
        self._host = name
        self.command_timeout = command_timeout

    def _get_socket(self, host: str, port: int, timeout: float) -> Any:
        sock = super()._get_socket(host, port, timeout)
        sock.settimeout(self.command_timeout)
        return sock


def _label(target: TargetLike) -> str:
    return f"{target.name}[{target.host}]:{target.port}"


def _unverified_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Transport:
    """Outbound SMTP connections for one worker process (see the module docstring)."""

    def __init__(self, *, helo_hostname: str, tls: str, connect_timeout: float,
                 command_timeout: float, pool_size: int, idle_timeout: float = 60.0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        self.helo_hostname = helo_hostname
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self._tls_context: ssl.SSLContext | None = None
        if tls == "opportunistic":
            self._tls_context = _unverified_context()
        elif tls == "required":
            self._tls_context = ssl_context or ssl.create_default_context()
        # One lock for the pool's state; waiters for a slot sleep on it.
        self._cond = threading.Condition()
        self._idle: dict[tuple[str, int, str], list[_Pooled]] = {}  # most recent last
        self._open = 0  # connections counted against pool_size (idle + busy + closing)
        self._closed = False

    @property
    def pooled(self) -> int:
        """Idle connections currently cached (the hedwig_connection_pool_entries gauge)."""
        with self._cond:
            return self._count_idle()

    def _count_idle(self) -> int:
        """Under the lock, after the idle set changed: how many, also told to the gauge."""
        count = sum(len(entries) for entries in self._idle.values())
        metrics.connection_pool_entries.set(count)
        return count

    def close(self) -> None:
        """QUIT and close every pooled connection; busy ones are closed when returned."""
        with self._cond:
            self._closed = True
            entries = [e for idle in self._idle.values() for e in idle]
            self._idle.clear()
            self._count_idle()
        for entry in entries:
            self._quit(entry.conn)
            self._release()

    def send(self, targets: Sequence[TargetLike], sender: str, recipients: Sequence[str],
             message: bytes) -> Attempt:
        """Deliver `message` (CRLF line ends, not dot-stuffed) to `recipients` via `targets`.

        `sender` "" (or "<>") is the null reverse-path.  Never raises for
        anything the network or the server does; every recipient gets a Result.
        """
        start = time.monotonic()
        recipients = tuple(recipients)
        if not recipients:
            return Attempt("", (), 0.0)
        failure = _Failure(0, "no hosts to try")
        where = ""
        for target in targets:
            got = self._attempt(target, sender, recipients, message, start)
            if isinstance(got, _Failure):
                failure, where = got, _label(target)
                log.debug("smtp out host=%s unusable code=%d error=%s",
                          where, got.code, got.text)
                if got.final:
                    break
                continue
            label, results = got
            return Attempt(label, results, time.monotonic() - start)
        text = one_line(f"{where}: {failure.text}" if where else failure.text)
        results = tuple(Result(r, DEFERRED, failure.code, text) for r in recipients)
        return Attempt("", results, time.monotonic() - start)

    def _attempt(self, target: TargetLike, sender: str, recipients: tuple[str, ...], message: bytes,
                 start: float) -> tuple[str, tuple[Result, ...]] | _Failure:
        """One target: a connection (pooled or new) and the transaction on it."""
        while True:
            got = self._checkout(target)
            if isinstance(got, _Failure):
                return got
            try:
                return got.label, self._transaction(got, sender, recipients, message, start)
            except _Stale:
                # Nothing was accepted on it. Each stale connection is closed and a
                # new one is never stale, so this ends.
                continue

    # --- one transaction ------------------------------------------------------------

    def _transaction(self, entry: _Pooled, sender: str, recipients: tuple[str, ...],
                     message: bytes, start: float) -> tuple[Result, ...]:
        conn = entry.conn
        final: dict[int, Result] = {}
        accepted: list[int] = []
        codes: list[str] = []  # for the debug line
        reusable = True
        stage = "MAIL FROM"
        path = "" if sender in ("", "<>") else sender

        def every_open(kind: str, code: int, text: str | bytes) -> None:
            for i, rcpt in enumerate(recipients):
                final.setdefault(i, Result(rcpt, kind, code, one_line(text)))

        try:
            if _BAD_ADDRESS_CHARS.search(path):
                every_open(BOUNCED, 0, "invalid sender address")
                return self._finish(entry, recipients, final, codes, True, start)
            for i, rcpt in enumerate(recipients):
                if not rcpt or _BAD_ADDRESS_CHARS.search(rcpt):
                    final[i] = Result(rcpt, BOUNCED, 0, "invalid recipient address")
            if len(final) == len(recipients):
                return self._finish(entry, recipients, final, codes, True, start)
            needs_utf8 = not (path.isascii() and all(r.isascii() for r in recipients))
            if needs_utf8 and not conn.has_extn("smtputf8"):
                # RFC 6531 §3.4: no SMTPUTF8, no way to name these mailboxes here.
                every_open(BOUNCED, 0, f"SMTPUTF8 not supported by {entry.label}")
                return self._finish(entry, recipients, final, codes, True, start)
            options = []
            if conn.has_extn("size"):
                options.append(f" SIZE={len(message)}")  # RFC 1870
            if conn.has_extn("8bitmime"):
                options.append(" BODY=8BITMIME")  # RFC 6152
            if needs_utf8:
                options.append(" SMTPUTF8")
                conn.command_encoding = "utf-8"
            mail = f"FROM:<{path}>{''.join(options)}"
            todo = [i for i in range(len(recipients)) if i not in final]

            pipelined = conn.has_extn("pipelining")
            if pipelined:
                # RFC 2920: the whole envelope in one write, replies read in order.
                group = ["RSET"] if entry.reused else []
                group += [f"MAIL {mail}"] + [f"RCPT TO:<{recipients[i]}>" for i in todo] + ["DATA"]
                self._pipeline(entry, group)

            def ask(verb: str, args: str = "") -> tuple[int, bytes]:
                return conn.getreply() if pipelined else conn.docmd(verb, args)

            code, reply = ask("MAIL", mail)
            codes.append(f"mail={code}")
            if not 200 <= code <= 299:
                every_open(classify_reply(code), code, reply)
                fit = code != 421 and (not pipelined or self._drain(conn, len(todo) + 1))
                # Not fit and pipelined: replies may still be due, so no QUIT.
                return self._finish(entry, recipients, final, codes, fit, start, polite=fit or not pipelined)

            stage = "RCPT TO"
            for n, i in enumerate(todo):
                rcpt = recipients[i]
                code, reply = ask("RCPT", f"TO:<{rcpt}>")
                codes.append(f"rcpt={code}")
                if 200 <= code <= 299:
                    accepted.append(i)
                else:
                    final[i] = Result(rcpt, classify_reply(code), code, one_line(reply))
                if code == 421:  # RFC 5321 §3.8: the server is closing the channel
                    every_open(DEFERRED, code, reply)
                    # Pipelined, more replies are due: a QUIT would read one of them.
                    return self._finish(entry, recipients, final, codes, False, start,
                                        polite=not pipelined)
            if not accepted:
                fit = not pipelined or self._drain(conn, 1)  # DATA's reply
                return self._finish(entry, recipients, final, codes, fit, start, polite=fit)

            stage = "DATA"
            code, reply = ask("DATA")
            codes.append(f"data={code}")
            if code != 354 and code < 400:
                # Only 354 invites the message: any other positive reply is out of
                # step (an extra reply earlier, or a broken server) and must not
                # count as delivered when no byte of the message was sent.
                every_open(DEFERRED, code, f"DATA: unexpected reply {code} {one_line(reply)}")
                return self._finish(entry, recipients, final, codes, False, start, polite=False)
            if code == 354:
                stage = "sending message"
                stuffed = dot_stuff(message)
                ending = b".\r\n" if not stuffed or stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
                # The socket directly, not conn.send(): smtplib turns every send
                # error into "Server not connected" and loses the reason.
                conn.sock.sendall(stuffed + ending)
                stage = "end of data"
                code, reply = conn.getreply()
                codes.append(f"dot={code}")
            kind = classify_reply(code)
            for i in accepted:
                final[i] = Result(recipients[i], kind, code, one_line(reply))
            reusable = code != 421
        except OSError as exc:  # smtplib's errors, socket errors, timeouts, ssl errors
            # Postfix's wording: after the final dot the message may have arrived.
            text = f"{stage}: {describe_error(exc)}"
            if stage in ("sending message", "end of data"):
                text += " (the message may be delivered twice)"
            every_open(classify_error(exc), 0, text)
            codes.append(f"error={stage.replace(' ', '_')}")
            # No QUIT: after a timeout mid-DATA it would be read as message text.
            return self._finish(entry, recipients, final, codes, False, start, polite=False)
        return self._finish(entry, recipients, final, codes, reusable, start)

    def _pipeline(self, entry: _Pooled, group: list[str]) -> None:
        """Send a pipelined group; on a reused connection, the RSET at its head must say 250.

        Raises _Stale (the connection closed) when a reused connection fails
        before its RSET is answered with 250, OSError otherwise.
        """
        conn = entry.conn
        try:
            conn.sock.sendall("".join(line + "\r\n" for line in group).encode(conn.command_encoding))
            if entry.reused:
                code, _ = conn.getreply()
        except OSError:
            if not entry.reused:
                raise
            code = 0
        if entry.reused and code != 250:
            self._discard(entry, polite=False)  # MAIL, RCPT and DATA may be pending: no QUIT
            raise _Stale()

    def _drain(self, conn: _Connection, replies: int) -> bool:
        """Read the replies still due for a pipelined group cut short: True if the connection is fit for reuse.

        Bounded by QUIT_TIMEOUT: a server that dropped the rest of the group
        costs seconds, not command_timeout. If DATA was accepted after all, the
        connection is closed rather than ended with RFC 2920 §3.1's lone dot: a
        server that ignored the refusals might take that for an empty message.
        """
        try:
            conn.sock.settimeout(min(self.command_timeout, QUIT_TIMEOUT))
            code = 0
            for _ in range(replies):
                code, _ = conn.getreply()
            conn.sock.settimeout(self.command_timeout)
        except OSError:
            return False
        return code not in (354, 421)

    def _finish(self, entry: _Pooled, recipients: tuple[str, ...], final: dict[int, Result],
                codes: list[str], reusable: bool, start: float,
                polite: bool = True) -> tuple[Result, ...]:
        entry.conn.command_encoding = "ascii"
        if reusable and entry.conn.sock is not None:
            self._checkin(entry)
        else:
            self._discard(entry, polite=polite)
        log.debug("smtp out host=%s %s rcpts=%d latency=%.3f", entry.label, " ".join(codes),
                  len(recipients), time.monotonic() - start)
        return tuple(final[i] for i in range(len(recipients)))

    # --- connections ----------------------------------------------------------------------

    def _checkout(self, target: TargetLike) -> _Pooled | _Failure:
        """A ready connection to `target` (after EHLO and STARTTLS), pooled or new."""
        key = (target.host, target.port, target.name)
        deadline = time.monotonic() + self.connect_timeout
        while True:
            reuse, to_close, slot = self._take(key, deadline)
            for entry in to_close:
                self._quit(entry.conn)
                self._release()
            if reuse is not None:
                reuse.reused = True
                if reuse.conn.has_extn("pipelining") or self._reset(reuse.conn):
                    return reuse  # with PIPELINING, RSET goes in the transaction's first write
                self._discard(reuse)  # dropped while idle, or RSET refused: open another
                continue
            if not slot:
                if to_close:
                    continue
                why = (f"no free connection within {self.connect_timeout:g}s"
                       f" (pool_size={self.pool_size})")
                return _Failure(0, why, final=True)
            try:
                got = self._connect(target, starttls=self.tls != "none")
                if (isinstance(got, _Failure) and got.tls_handshake
                        and self.tls == "opportunistic"):
                    log.debug("smtp out host=%s TLS handshake failed (%s), retrying in plaintext",
                              _label(target), got.text)
                    got = self._connect(target, starttls=False)
            except BaseException:
                self._release()
                raise
            if isinstance(got, _Failure):
                self._release()
                return got
            return _Pooled(got, key, _label(target))

    def _take(self, key: tuple[str, int, str],
              deadline: float) -> tuple[_Pooled | None, list[_Pooled], bool]:
        """Under the lock: (idle connection to reuse, connections to close, slot granted).

        Connections to close still count against the pool; the caller closes
        each and then releases its slot.  When the pool is full of idle
        connections to other hosts, the least recently used one is evicted and
        a slot granted at once (it is closed before the new one is opened).
        """
        with self._cond:
            while True:
                now = time.monotonic()
                stale = self._expire(now)
                if stale:
                    return None, stale, False
                idle = self._idle.get(key)
                if idle:
                    reuse = idle.pop()
                    if not idle:
                        del self._idle[key]
                    self._count_idle()
                    return reuse, [], False
                if self._open < self.pool_size:
                    self._open += 1
                    return None, [], True
                victim = self._evict()
                if victim is not None:
                    self._open += 1
                    return None, [victim], True
                if now >= deadline:
                    return None, [], False
                self._cond.wait(deadline - now)

    def _expire(self, now: float) -> list[_Pooled]:
        """Under the lock: take out idle connections older than idle_timeout."""
        stale: list[_Pooled] = []
        for key in list(self._idle):
            keep = [e for e in self._idle[key] if now - e.idle_since < self.idle_timeout]
            stale += [e for e in self._idle[key] if now - e.idle_since >= self.idle_timeout]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if stale:
            self._count_idle()
        return stale

    def _evict(self) -> _Pooled | None:
        """Under the lock: take out the least recently used idle connection, if any."""
        oldest: _Pooled | None = None
        for entries in self._idle.values():
            if oldest is None or entries[0].idle_since < oldest.idle_since:
                oldest = entries[0]
        if oldest is not None:
            entries = self._idle[oldest.key]
            entries.pop(0)
            if not entries:
                del self._idle[oldest.key]
            self._count_idle()
        return oldest

    def _checkin(self, entry: _Pooled) -> None:
        with self._cond:
            if not self._closed:
                entry.idle_since = time.monotonic()
                self._idle.setdefault(entry.key, []).append(entry)
                self._count_idle()
                self._cond.notify()
                return
        self._discard(entry)

    def _discard(self, entry: _Pooled, *, polite: bool = True) -> None:
        if polite:
            self._quit(entry.conn)
        else:
            entry.conn.close()
        self._release()

    def _release(self) -> None:
        with self._cond:
            self._open -= 1
            self._cond.notify()

    def _connect(self, target: TargetLike, *, starttls: bool) -> _Connection | _Failure:
        """TCP connect, greeting, EHLO/HELO and the TLS policy: a connection ready for MAIL."""
        conn = _Connection(name=target.name, helo_hostname=self.helo_hostname,
                           connect_timeout=self.connect_timeout,
                           command_timeout=self.command_timeout)
        stage = "connect"
        try:
            code, reply = conn.connect(target.host, target.port)
            if code != 220:
                self._quit(conn)
                return _Failure(code, f"greeting: {code} {one_line(reply)}")
            stage = "EHLO"
            failure = self._hello(conn)
            if failure is not None:
                return failure
            if not starttls:
                return conn
            if not conn.has_extn("starttls"):
                if self.tls == "required":
                    self._quit(conn)
                    return _Failure(0, "STARTTLS not offered (tls = required)")
                return conn
            stage = "STARTTLS"
            try:
                conn.starttls(context=self._tls_context)
            except smtplib.SMTPResponseException as exc:  # the command refused; still plaintext
                if self.tls == "required":
                    self._quit(conn)
                    return _Failure(exc.smtp_code, f"STARTTLS: {exc.smtp_code} "
                                                   f"{one_line(exc.smtp_error)}")
                return conn
            except ssl.SSLError as exc:  # handshake or certificate: the connection is unusable
                conn.close()
                return _Failure(0, f"STARTTLS: {describe_error(exc)}", tls_handshake=True)
            stage = "EHLO after STARTTLS"
            failure = self._hello(conn)  # RFC 3207 §4.2: forget what was learnt before TLS
            return conn if failure is None else failure
        except OSError as exc:  # refused, unreachable, timed out, disconnected
            conn.close()
            return _Failure(0, f"{stage}: {describe_error(exc)}")

    def _hello(self, conn: _Connection) -> _Failure | None:
        code, reply = conn.ehlo(self.helo_hostname)
        if code == 250:
            return None
        code, reply = conn.helo(self.helo_hostname)  # RFC 5321 §3.2: fall back to HELO
        if code == 250:
            return None
        self._quit(conn)
        return _Failure(code, f"EHLO/HELO: {code} {one_line(reply)}")

    def _reset(self, conn: _Connection) -> bool:
        """RSET on a connection taken from the pool: True if it is still good."""
        try:
            code, _ = conn.rset()
        except OSError:
            return False
        return code == 250

    def _quit(self, conn: _Connection) -> None:
        """QUIT politely (bounded by QUIT_TIMEOUT) and close, whatever happens."""
        try:
            if conn.sock is not None:
                conn.sock.settimeout(min(self.command_timeout, QUIT_TIMEOUT))
                conn.quit()
        except OSError:
            pass
        finally:
            conn.close()
