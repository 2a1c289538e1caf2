"""A real upstream SMTP server for tests: aiosmtpd on 127.0.0.1 in its own thread.

    with Sink(rcpt_reply={"bad@x.test": "550 5.1.1 no such user"}) as sink:
        ... deliver to 127.0.0.1:sink.port ...
        sink.messages[0].data        # un-stuffed bytes, exactly as received

Records every transaction that reached the final dot in `messages`
(`Message(mail_from, rcpt_tos, data, peer, tls)`, a 5-tuple), and counts TCP
connections: `connections` (opened since start), `active` (open now),
`max_active` (most open at once), plus `rsets`, `helos` (EHLO/HELO names)
and `mail_options` (MAIL parameters, one list per MAIL).  Messages that reached the final dot
but were never answered (hang_after_data, close_before_reply) are in
`messages` and also in `unanswered`: the copies a client may send again.
The trigger
connection aiosmtpd's Controller makes at start-up is not counted.

Behaviour is scriptable, and may be changed between sends (plain attributes):
  mail_reply, rcpt_reply, data_reply  a reply string, a callable(address) ->
        reply (data_reply: callable(Message)), or for rcpt_reply a dict
        {address: reply} (others get "250 OK").  Only 2xx accepts.
  ehlo_reply        refuse EHLO with this reply (the client should fall back to HELO)
  greeting          send this instead of the 220 greeting and close ("421 go away")
  hang_after_data   never answer the final dot (the client must time out); True,
        or a callable(Message) -> bool deciding per message
  close_before_reply  take the whole message, then close the connection
        without answering the final dot (the client cannot know whether it
        arrived); True, or a callable(Message) -> bool deciding per message
  drop_in_data      close the connection after 354 and the first bytes of the message
  tls               (cert, key) or a server ssl.SSLContext: offer STARTTLS (not required)
  smtputf8          advertise SMTPUTF8 (default True)
  pipelining        advertise PIPELINING (default True, as real MTAs do; the
        client then sends RSET, MAIL, RCPT and DATA in one write)

`drop_connections()` closes every open connection from the server side (an
MTA dropping idle clients).  `stop()` is bounded; the sink is a context manager.

Must not: import gevent or hedwig (the pytest process is never patched).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

HOST = "127.0.0.1"
STOP_TIMEOUT = 5.0

ReplySpec = str | Callable[[str], str] | Mapping[str, str] | None


class Message(NamedTuple):
    mail_from: str  # "<>" for the null sender
    rcpt_tos: list[str]
    data: bytes  # as received, dot-stuffing undone
    peer: Any  # (ip, port)
    tls: bool  # STARTTLS was used on this connection


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _reply(spec: ReplySpec, arg: str, default: str = "250 OK") -> str:
    if spec is None:
        return default
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping):
        return spec.get(arg, default)
    return spec(arg)


def _decide(flag: bool | Callable[[Message], bool], message: Message) -> bool:
    return bool(flag(message)) if callable(flag) else bool(flag)


class _Handler:
    """aiosmtpd hooks: record, and reply as the sink is scripted to."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        self.sink.helos.append(hostname)
        if self.sink.ehlo_reply:
            return [self.sink.ehlo_reply]
        session.host_name = hostname
        if self.sink.pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str) -> str:
        self.sink.helos.append(hostname)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self.sink.mail_options.append(list(options))
        reply = _reply(self.sink.mail_reply, address)
        if reply.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(options)
        return reply

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = _reply(self.sink.rcpt_reply, address)
        if reply.startswith("2"):
            envelope.rcpt_tos.append(address)
        return reply

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.sink.rsets += 1
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        message = Message(str(envelope.mail_from), list(envelope.rcpt_tos),
                          bytes(envelope.original_content or b""), session.peer,
                          session.ssl is not None)
        self.sink.messages.append(message)
        if _decide(self.sink.close_before_reply, message):
            self.sink.unanswered.append(message)
            assert server.transport is not None
            server.transport.close()  # the message is here; the client never hears so
            await asyncio.sleep(3600)  # cancelled by the close
        if _decide(self.sink.hang_after_data, message):
            self.sink.unanswered.append(message)
            await asyncio.sleep(3600)  # cancelled when the client gives up and closes
        spec = self.sink.data_reply
        if spec is None:
            return "250 2.0.0 OK"
        return spec if isinstance(spec, str) else spec(message)


class _SinkSMTP(SMTP):
    """aiosmtpd's SMTP plus connection counting and the misbehaviours."""

    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None  # called again on STARTTLS with the TLS transport
        super().connection_made(transport)
        probe = transport.get_extra_info("peername") == self._sink._probe_peer
        if first and not self._counted and not probe:
            self._counted = True
            self._sink._opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:  # aiosmtpd may call this twice after a failed handshake
            self._counted = False
            self._sink._closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        greeting = self._sink.greeting
        if greeting is None:
            await super()._handle_client()
            return
        await self.push(greeting)
        assert self.transport is not None
        self.transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        if not (self._sink.drop_in_data and self.envelope and self.envelope.rcpt_tos):
            await super().smtp_DATA(arg)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        await self._reader.read(1)  # some of the message has arrived
        assert self.transport is not None
        self.transport.close()


class _Controller(Controller):
    """Controller serving on a socket bound up front (port 0 works), with our SMTP."""

    def __init__(self, sink: Sink, sock: socket.socket, **smtp_kwargs: Any) -> None:
        super().__init__(_Handler(sink), hostname=HOST, port=sock.getsockname()[1],
                         **smtp_kwargs)
        self._sink = sink
        self._sock = sock

    def factory(self) -> SMTP:
        return _SinkSMTP(self._sink, self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self._sock)

    def _trigger_server(self) -> None:
        """aiosmtpd's start-up probe, from an address the sink knows, so it is never counted.

        Clients may connect at once (a relay retrying a port that was down): the
        probe cannot be told from them by timing, only by its address.
        """
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((HOST, 0))
            self._sink._probe_peer = probe.getsockname()
            probe.settimeout(1.0)
            probe.connect((HOST, self.port))
            probe.recv(1024)


class Sink:
    def __init__(self, port: int = 0, tls: tuple[str, str] | ssl.SSLContext | None = None, *,
                 mail_reply: ReplySpec = None, rcpt_reply: ReplySpec = None,
                 data_reply: str | Callable[[Message], str] | None = None,
                 ehlo_reply: str | None = None, greeting: str | None = None,
                 hang_after_data: bool | Callable[[Message], bool] = False,
                 drop_in_data: bool = False,
                 close_before_reply: bool | Callable[[Message], bool] = False,
                 smtputf8: bool = True, pipelining: bool = True,
                 hostname: str = "sink.test") -> None:
        self.mail_reply = mail_reply
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.ehlo_reply = ehlo_reply
        self.pipelining = pipelining
        self.greeting = greeting
        self.hang_after_data = hang_after_data
        self.drop_in_data = drop_in_data
        self.close_before_reply = close_before_reply
        self.messages: list[Message] = []
        self.unanswered: list[Message] = []
        self.helos: list[str] = []
        self.mail_options: list[list[str]] = []
        self.rsets = 0
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self._live: set[_SinkSMTP] = set()
        self._lock = threading.Lock()

        tls_context: ssl.SSLContext | None = None
        if isinstance(tls, ssl.SSLContext):
            tls_context = tls
        elif tls is not None:
            tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_context.load_cert_chain(*tls)

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, port))
        sock.listen(128)
        self.port: int = sock.getsockname()[1]
        self._controller = _Controller(
            self, sock, server_hostname=hostname, decode_data=False,
            enable_SMTPUTF8=smtputf8, tls_context=tls_context, require_starttls=False,
            data_size_limit=64 * 1024 * 1024, ready_timeout=STOP_TIMEOUT)
        self._probe_peer: Any = None  # the Controller's start-up probe: not counted
        self._controller.start()
        self._stopped = False

    # -- called on the sink's loop thread ---------------------------------------------

    def _opened(self, proto: _SinkSMTP) -> None:
        with self._lock:
            self._live.add(proto)
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    def _closed(self, proto: _SinkSMTP) -> None:
        with self._lock:
            self._live.discard(proto)
            self.active -= 1

    # -- the test's side -----------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
        """Poll `predicate` until true; AssertionError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"sink: timed out waiting for {what or predicate}")
            time.sleep(0.01)

    def drop_connections(self, timeout: float = 5.0) -> None:
        """Close every open connection from the server side, and wait until they are gone."""

        def close_all() -> None:
            for proto in list(self._live):
                if proto.transport is not None:
                    proto.transport.close()

        self._controller.loop.call_soon_threadsafe(close_all)
        self.wait(lambda: self.active == 0, timeout, "connections to close")

    def stop(self) -> None:
        """Stop serving (bounded: STOP_TIMEOUT seconds, else AssertionError)."""
        if self._stopped:
            return
        self._stopped = True
        stopper = threading.Thread(target=self._controller.stop, daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT)
        if stopper.is_alive():
            raise AssertionError(f"sink did not stop within {STOP_TIMEOUT}s")

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
