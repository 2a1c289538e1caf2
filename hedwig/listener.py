"""One gevent StreamServer per configured listener, with the worker's connection cap.

All listeners of a worker share one Pool of `max_connections` session
greenlets. A connection beyond the cap is accepted only to be told
`421 4.7.0` and closed, rather than left waiting in the kernel's backlog
(an implicit-TLS connection is just closed: it could not read a plaintext line).

TLS listeners get a server SSLContext made once per worker by
load_tls_context(): TLS 1.2 or later, the ssl module's modern defaults
(forward-secret AEAD ciphers, no compression, server cipher preference), no
renegotiation. The session does the handshake, bounded in time, so a client
that never finishes one holds nothing but its own greenlet.

Must not: speak SMTP beyond that one 421 line.
"""

from __future__ import annotations

import logging
import socket
import ssl

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from .config import ListenerConfig, TlsConfig
from .session import Session, SessionContext
from .smtp.replies import R421_TOO_MANY_CONNECTIONS

log = logging.getLogger(__name__)


class TlsSetupError(Exception):
    """A certificate or key that cannot be used; str() is one line, naming the file."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key  # "cert_path" or "key_path"
        self.message = message

    def __str__(self) -> str:
        return self.message


class _EncryptedKey(Exception):
    pass


def _no_passphrase() -> bytes:
    # Without this, OpenSSL would prompt on the terminal for an encrypted key's passphrase.
    raise _EncryptedKey()


def load_tls_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context for `tls`'s certificate chain and key; raises TlsSetupError."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        context.load_cert_chain(tls.cert_path, tls.key_path, password=_no_passphrase)
    except _EncryptedKey:
        raise TlsSetupError("key_path", f"{tls.key_path}: the key is encrypted; a passphrase-less key is needed") from None
    except ssl.SSLError as exc:
        reason = exc.reason or ""
        if reason == "KEY_VALUES_MISMATCH":
            why = f"{tls.key_path} is not the key of the certificate in {tls.cert_path}"
            raise TlsSetupError("key_path", why) from None
        # OpenSSL's "PEM lib" does not say which file: try the certificate alone.
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(tls.cert_path)
        except (ssl.SSLError, OSError):
            raise TlsSetupError("cert_path", f"{tls.cert_path}: not a PEM certificate") from None
        raise TlsSetupError("key_path", f"{tls.key_path}: not a usable PEM private key ({reason or exc})") from None
    except OSError as exc:
        which = "cert_path" if exc.filename in (None, tls.cert_path) else "key_path"
        raise TlsSetupError(which, f"cannot read {exc.filename or tls.cert_path}: {exc.strerror or exc}") from None
    return context


def bind(listener: ListenerConfig, socket_class: type = socket.socket, backlog: int = 1024) -> socket.socket:
    """A listening socket for `listener` (the master binds, with the unpatched class; workers inherit)."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket_class(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    # Replies go out as soon as they are written (no Nagle delay); Linux copies
    # this option to every accepted socket, which saves a syscall per connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((listener.host, listener.port))
    sock.listen(backlog)
    return sock


def _refuse(sock: socket.socket) -> None:
    try:
        sock.sendall(R421_TOO_MANY_CONNECTIONS.to_bytes())
    except OSError:
        pass
    finally:
        sock.close()


def _close(sock: socket.socket) -> None:
    sock.close()


class Listener:
    def __init__(
        self,
        config: ListenerConfig,
        sock: socket.socket,
        ctx: SessionContext,
        pool: Pool,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if (config.tls is None) != (tls_context is None):
            raise ValueError(f"{config.addr}: a TLS listener needs a TLS context, a plain one none")
        self.config = config
        self.ctx = ctx
        self.pool = pool
        self.tls_context = tls_context
        implicit = config.tls is not None and config.tls.mode == "implicit"
        self._refuse = _close if implicit else _refuse
        # The handshake is the session's (bounded, after accept), not StreamServer's.
        self.server = StreamServer(sock, self._handle, spawn=self._spawn)

    def _spawn(self, func, handle, close, args):  # type: ignore[no-untyped-def]
        # StreamServer calls spawn(func, handle, close, (client, address)).
        if self.pool.full() or self.ctx.stopping:
            gevent.spawn(self._refuse, args[0])
            return None
        return self.pool.spawn(func, handle, close, args)

    def _handle(self, client: socket.socket, address: tuple) -> None:
        Session(client, address, self.ctx, self.config, self.tls_context).run()

    def start(self) -> None:
        self.server.start()
        tls = self.config.tls
        log.info("listening on %s%s", self.config.addr, f" (tls {tls.mode})" if tls else "")

    def stop_accepting(self) -> None:
        self.server.close()
