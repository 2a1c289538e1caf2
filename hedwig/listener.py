"""One gevent StreamServer per configured listener, with the worker's connection cap.

All listeners of a worker share one Pool of `max_connections` session
greenlets. A connection beyond the cap is accepted only to be told
`421 4.7.0` and closed, rather than left waiting in the kernel's backlog.
TLS contexts join here with the security issue.

Must not: speak SMTP beyond that one 421 line.
"""

from __future__ import annotations

import logging
import socket

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from .config import ListenerConfig
from .session import Session, SessionContext
from .smtp.replies import R421_TOO_MANY_CONNECTIONS

log = logging.getLogger(__name__)


def bind(listener: ListenerConfig, backlog: int = 1024) -> socket.socket:
    """A listening socket for `listener` (the master binds, workers inherit)."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
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


class Listener:
    def __init__(self, config: ListenerConfig, sock: socket.socket, ctx: SessionContext, pool: Pool) -> None:
        self.config = config
        self.ctx = ctx
        self.pool = pool
        self.server = StreamServer(sock, self._handle, spawn=self._spawn)

    def _spawn(self, func, handle, close, args):  # type: ignore[no-untyped-def]
        # StreamServer calls spawn(func, handle, close, (client, address)).
        if self.pool.full() or self.ctx.stopping:
            gevent.spawn(_refuse, args[0])
            return None
        return self.pool.spawn(func, handle, close, args)

    def _handle(self, client: socket.socket, address: tuple) -> None:
        Session(client, address, self.ctx, self.config).run()

    def start(self) -> None:
        self.server.start()
        log.info("listening on %s", self.config.addr)

    def stop_accepting(self) -> None:
        self.server.close()
