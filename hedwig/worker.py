"""One worker process: opens the spool, starts the listeners, stops gracefully.

It wires the pieces together and owns the process's life: SIGTERM or SIGINT
stops accepting, tells idle sessions `421 4.3.2`, lets sessions in the middle
of a message finish (up to a grace period) and returns 0. Messages found in
the spool at start and messages accepted since go onto `accepted`, the queue
that delivery consumes.

Must not: parse SMTP or decide policy.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import ssl
import time

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.queue import Queue

from . import policy
from .config import Config, ConfigError
from .control import Control, SpoolLocked, hold_lock
from .listener import Listener, TlsSetupError, bind, load_tls_context
from .session import SessionContext, Shutdown
from .smtp.protocol import Limits
from .delivery import Delivery
from .ratelimit import make_limiter
from .resolver import Resolver
from .scheduler import Scheduler
from .signing import load_signer
from .spool import Spool
from .transport import Transport

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 8.0  # seconds for sessions mid-message once SIGTERM arrived


class StartupError(Exception):
    """The worker cannot start (port taken, spool unusable): one line for the operator.

    `code` is the exit status: 1 for a failure, 2 for a user error such as a
    certificate that cannot be loaded (SPEC §1).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Worker:
    def __init__(self, config: Config, sockets: list[socket.socket] | None = None) -> None:
        self.config = config
        server = config.server
        self.spool = Spool(config.storage.base_path, fsync=config.storage.fsync, disk_reserve=server.disk_reserve)
        self.accepted: Queue = Queue()
        self.ctx = SessionContext(
            server=server,
            spool=self.spool,
            accepted=self.accepted,
            limits=Limits(server.hostname, server.max_message_size, server.max_recipients),
            users={user.username: user.password for user in server.auth},
            filters=policy.Filters.compile(config.filters),
        )
        self.pool = Pool(server.max_connections)
        self.scheduler = Scheduler()
        smtp = server.smtp
        self.resolver = Resolver(smtp.nameservers, timeout=min(smtp.connect_timeout, 10.0))
        self.transport = Transport(
            helo_hostname=server.helo_hostname,
            tls="none" if server.outbound_local else smtp.tls,
            connect_timeout=smtp.connect_timeout,
            command_timeout=smtp.command_timeout,
            pool_size=server.pool_size,
        )
        try:
            # The DKIM key is loaded and checked here, once per worker: a bad one
            # stops the start with one line (exit 2) rather than deferring all mail.
            signer = load_signer(config)
        except ConfigError as exc:
            raise StartupError(str(exc), code=2) from None
        self.delivery = Delivery(config, self.spool, self.scheduler, self.resolver, self.transport,
                                 limiter=make_limiter(server.rate_limits), signer=signer)
        self.control = Control(self.spool, self.scheduler)  # `hedwig queue retry|delete`
        self._lock_fd = -1
        self._feeder: gevent.Greenlet | None = None
        self._sockets = sockets
        self.listeners: list[Listener] = []
        self._stop = Event()

    def start(self) -> None:
        server = self.config.server
        # Certificates are loaded once per worker, before anything else: a bad one
        # stops the start with one line rather than serving without TLS.
        tls_contexts: list[ssl.SSLContext | None] = []
        for i, lc in enumerate(server.listeners):
            if lc.tls is None:
                tls_contexts.append(None)
                continue
            try:
                tls_contexts.append(load_tls_context(lc.tls))
            except TlsSetupError as exc:
                raise StartupError(f"config: server.listeners[{i}].tls.{exc.key}: {exc}", code=2) from None
        if server.workers > 1:
            log.warning("workers = %d: pre-forked workers are not supported by this version yet; "
                        "running one process", server.workers)
        _raise_fd_limit(server.max_connections)
        try:
            # Held for the life of the process: queue tools see a server runs,
            # and a second server on this spool is refused.
            self._lock_fd = hold_lock(self.config.storage.base_path)
            self.spool.open()
        except SpoolLocked as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot open spool {self.config.storage.base_path}: {exc.strerror or exc}") from exc
        removed = self.spool.clean_tmp()
        queued = self.spool.scan()
        self.scheduler.add_all(self.spool.entries[msg_id] for msg_id in queued)
        log.info("spool %s: %d queued, %d unfinished removed", self.spool.base_path, len(queued), removed)
        self.delivery.start()
        self._feeder = gevent.spawn(self._feed)
        try:
            self.control.start()
        except OSError as exc:
            raise StartupError(f"cannot open spool {self.config.storage.base_path}: {exc.strerror or exc}") from exc
        sockets = self._sockets
        if sockets is None:
            sockets = []
            for lc in self.config.server.listeners:
                try:
                    sockets.append(bind(lc))
                except OSError as exc:
                    for s in sockets:
                        s.close()
                    raise StartupError(f"cannot listen on {lc.addr}: {exc.strerror or exc}") from exc
        for lc, sock, tls_context in zip(self.config.server.listeners, sockets, tls_contexts):
            self.listeners.append(Listener(lc, sock, self.ctx, self.pool, tls_context))
        for listener in self.listeners:
            listener.start()

    def _feed(self) -> None:
        """Newly accepted messages go to the scheduler as soon as they are durable."""
        for msg_id in self.accepted:
            entry = self.spool.entries.get(msg_id)
            if entry is not None:
                self.scheduler.add(entry)

    def request_stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> int:
        gevent.signal_handler(signal.SIGTERM, self.request_stop)
        gevent.signal_handler(signal.SIGINT, self.request_stop)
        self._stop.wait()
        self.stop()
        return 0

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        log.info("stopping: %d open sessions", len(self.ctx.sessions))
        self.ctx.stopping = True
        for listener in self.listeners:
            listener.stop_accepting()
        for session in list(self.ctx.sessions):
            if session.idle:
                session.greenlet.kill(Shutdown(), block=False)
        deadline = time.monotonic() + grace
        if not self.pool.join(timeout=grace):
            log.warning("grace period over: closing %d sessions", len(self.pool))
            self.pool.kill(timeout=1)
        if self._feeder is not None:
            self._feeder.kill()
        self.control.stop()
        self.delivery.stop(max(deadline - time.monotonic(), 0.5))
        self.transport.close()
        self.spool.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # only now may a queue tool change the journals itself
            self._lock_fd = -1
        log.info("stopped")



def _raise_fd_limit(max_connections: int) -> None:
    """Each session needs a descriptor: lift the soft limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        except (ValueError, OSError):
            new = soft
        if new < wanted:
            log.warning("open file limit %d is below max_connections + 256 = %d", new, wanted)
