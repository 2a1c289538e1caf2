"""One worker process: opens the spool, serves the inherited listeners, stops gracefully.

The master (master.py) binds the sockets, holds the spool lock and forks the
workers; each runs one of these. It wires the pieces together and owns the
process's life:

- SIGTERM or SIGINT: stop accepting, tell idle sessions `421 4.3.2`, let
  sessions in the middle of a message finish (up to a grace period), let
  deliveries in flight end, return 0.
- SIGHUP (the master retiring this worker after a reload): stop accepting and
  let every open session run to its end (at most RETIRE_LIMIT), delivering
  meanwhile; then stop as above. New workers serve the listeners already.

Every TICK it tells the master it lives (one status byte on the heartbeat
pipe: S starting, R ready, F spool full, U spool unhealthy, D stopping), adopts
the spool writers of workers that died (spool.py, "Ownership") and sets the
queue depth gauge; now and then it compacts its own writer's segments
(spool.py, "Compaction"). Messages found in the spool at start, adopted later and
accepted since go onto the scheduler that delivery consumes.

Must not: parse SMTP, decide policy, or fork.
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

from . import metrics, policy
from .config import Config, ConfigError
from .control import Control
from .listener import Listener, TlsSetupError, load_tls_context
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
RETIRE_LIMIT = 600.0  # seconds a retired worker's open sessions may still run
TICK = 1.0  # seconds between heartbeats (and looks for orphaned writers)
COMPACT_EVERY = 10.0  # seconds between looks for segments worth compacting (spool.compact)


class StartupError(Exception):
    """The worker cannot start (port taken, spool unusable): one line for the operator.

    `code` is the exit status: 1 for a failure, 2 for a user error such as a
    certificate that cannot be loaded (SPEC §1).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Worker:
    def __init__(self, config: Config, sockets: list[socket.socket], heartbeat_fd: int = -1) -> None:
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
        # With N workers each enforces limit / N (SPEC §7: the limits hold in total).
        limiter = make_limiter(server.rate_limits, workers=server.workers)
        self.delivery = Delivery(config, self.spool, self.scheduler, self.resolver, self.transport,
                                 limiter=limiter, signer=signer)
        self.control = Control(self.spool, self.scheduler)  # `hedwig queue retry|delete`
        self._feeder: gevent.Greenlet | None = None
        self._tender: gevent.Greenlet | None = None
        self._compactor: gevent.Greenlet | None = None
        self._sockets = sockets
        self._heartbeat_fd = heartbeat_fd
        self._master_pid = os.getppid()
        self._status = b"S"
        self.listeners: list[Listener] = []
        self._stop = Event()
        self._retire = Event()

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
        _raise_fd_limit(server.max_connections)
        try:
            # The master holds base_path/lock; this process takes a writer of its
            # own and then whatever writers dead workers left behind.
            self.spool.open()
            self.spool.adopt_orphans()
        except OSError as exc:
            raise StartupError(f"cannot open spool {self.config.storage.base_path}: {exc.strerror or exc}") from exc
        removed = self.spool.clean_tmp()
        queued = self.spool.scan()
        self.scheduler.add_all(self.spool.entries[msg_id] for msg_id in queued)
        log.info("spool %s: %d queued, %d unfinished removed; writer %s",
                 self.spool.base_path, len(queued), removed, self.spool.writer)
        self.delivery.start()
        self._feeder = gevent.spawn(self._feed)
        try:
            self.control.start()
        except OSError as exc:
            raise StartupError(f"cannot open spool {self.config.storage.base_path}: {exc.strerror or exc}") from exc
        for lc, sock, tls_context in zip(self.config.server.listeners, self._sockets, tls_contexts):
            self.listeners.append(Listener(lc, sock, self.ctx, self.pool, tls_context))
        for listener in self.listeners:
            listener.start()
        self._status = b"R"
        self._tender = gevent.spawn(self._tend)

    def _feed(self) -> None:
        """Newly accepted messages go to the scheduler as soon as they are durable."""
        for msg_id in self.accepted:
            entry = self.spool.entries.get(msg_id)
            if entry is not None:
                self.scheduler.add(entry)

    def _tend(self) -> None:
        """Every TICK: heartbeat, adopt orphaned writers, queue depth; leave if the master died.

        Every COMPACT_EVERY it starts a compaction of the spool in a greenlet of
        its own (unless one still runs): copying never holds up the heartbeat.
        """
        compacted = time.monotonic()
        while True:
            if os.getppid() != self._master_pid:
                log.error("the master is gone: stopping")
                self.request_stop()
            adopted = self.spool.adopt_orphans()
            if adopted:
                self.scheduler.add_all(adopted)
                self.spool.clean_tmp()
            if self._status in b"RFU":
                self._status = b"U" if not self.spool.healthy else b"R" if self.spool.has_room() else b"F"
            self._beat()
            metrics.queue_depth.set(len(self.spool.entries))
            if time.monotonic() - compacted >= COMPACT_EVERY and (self._compactor is None or self._compactor.dead):
                compacted = time.monotonic()
                self._compactor = gevent.spawn(self._compact)
            gevent.sleep(TICK)

    def _compact(self) -> None:
        """Compact one segment after another until none is worth it (spool.compact)."""
        while self.spool.compact():
            pass

    def _beat(self) -> None:
        if self._heartbeat_fd < 0:
            return
        try:
            os.write(self._heartbeat_fd, self._status)
        except BlockingIOError:
            pass  # the master is busy; it reads the next one
        except OSError:
            self._heartbeat_fd = -1

    def request_stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> int:
        gevent.signal_handler(signal.SIGTERM, self.request_stop)
        gevent.signal_handler(signal.SIGINT, self.request_stop)
        gevent.signal_handler(signal.SIGHUP, self._retire.set)
        self._beat()
        gevent.wait([self._stop, self._retire], count=1)
        if self._retire.is_set() and not self._stop.is_set():
            self.retire()
        self.stop()
        return 0

    def retire(self) -> None:
        """Replaced after a reload: serve no new connections, let the open ones end by themselves."""
        log.info("retiring: %d open sessions may finish", len(self.ctx.sessions))
        for listener in self.listeners:
            listener.stop_accepting()
        deadline = time.monotonic() + RETIRE_LIMIT
        while len(self.pool) and not self._stop.is_set() and time.monotonic() < deadline:
            self._stop.wait(timeout=0.2)

    def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        log.info("stopping: %d open sessions", len(self.ctx.sessions))
        self._status = b"D"
        self._beat()
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
        for greenlet in (self._feeder, self._tender, self._compactor):
            if greenlet is not None:
                greenlet.kill()  # a move the committer has taken is still finished and applied
        self.control.stop()
        self.delivery.stop(max(deadline - time.monotonic(), 0.5))
        self.transport.close()
        self.spool.close()  # our writers go to whichever worker looks next
        metrics.queue_depth.set(0)
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
