"""The pre-fork master (SPEC §9): binds, forks, watches, reloads, stops.

`hedwig serve` runs this process; it never runs a gevent hub or a thread (a
fork must not copy greenlets or a lock held by another thread), so it uses
the unpatched blocking primitives from `gevent.monkey.get_original` and one
select() loop. It:

- checks the configuration as `check-config` does (certificates, DKIM key),
  takes the spool lock (base_path/lock; the workers inherit it, so queue
  tools see a server for as long as any of its processes lives), binds every
  listener and the HTTP doors, then forks `workers` workers that inherit the
  sockets (worker.py; each one owns its own spool writer, spool.py).
- hears from each worker every second on a heartbeat pipe (one status byte:
  S starting, R ready, F spool full, U spool unhealthy, D stopping). A worker
  silent for `worker_timeout` is killed; a worker that dies is replaced after
  a backoff (0.1 s doubling to 10 s, reset once a worker lived 10 s). If
  workers keep dying before they are ready (BOOT_FAILURES in a row) the master
  gives up loudly and exits 1; a worker that exits 2 (a user error) at boot
  stops everything with 2. A dead worker's messages are adopted by a live
  worker within a second (its writer lock is free again).
- SIGHUP: reads the config again and checks it; if it is bad, logs one line
  and keeps running the old one. Otherwise binds new listeners (keeping the
  sockets of unchanged addresses, so nothing queued in their backlogs is lost),
  forks a new generation of workers (which load the certificates and key
  afresh) and sends SIGHUP to the old ones: they stop accepting and finish
  their open sessions and deliveries, then exit; their writers are adopted.
- SIGTERM / SIGINT: STOPPING, SIGTERM to every worker (stop accepting, 421 to
  idle sessions, finish what is mid-message and in flight), SIGKILL to any
  still alive after STOP_GRACE, then exit 0.
- serves GET /metrics (prometheus-client multiprocess files of every worker
  summed; dead workers are marked so their gauges leave the sum), /healthz
  (200; 503 while stopping or when a worker reports its spool unhealthy) and
  /readyz (200 once every worker of the current generation is listening and
  its spool writable) from health.py, between two looks at the pipes.
- tells systemd READY=1 / RELOADING=1 / STOPPING=1 when NOTIFY_SOCKET is set.

Workers get PR_SET_PDEATHSIG: if the master is killed, they die with it, as
a one-process server would (nothing acknowledged is lost by a kill).

Must not: run greenlets, open the spool's segments, or speak SMTP.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

import gevent
from gevent import monkey

from . import health, metrics
from . import log as logsetup
from .config import Config, ConfigError, HttpBind, ListenerConfig, load_config
from .control import SpoolLocked, hold_lock
from .listener import TlsSetupError, bind, load_tls_context
from .signing import load_signer
from .worker import StartupError, Worker

log = logging.getLogger(__name__)

_fork = monkey.get_original("os", "fork")
_waitpid = monkey.get_original("os", "waitpid")
_select = monkey.get_original("select", "select")
_signal = monkey.get_original("signal", "signal")
_Socket = monkey.get_original("socket", "socket")

TICK = 0.5  # seconds between looks when nothing happens
STOP_GRACE = 12.0  # after SIGTERM, workers still alive this much later are killed
BOOT_FAILURES = 5  # workers dying before they are ready, in a row, before the master gives up
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 10.0
STABLE_AFTER = 10.0  # a worker that lived this long resets the backoff
_PR_SET_PDEATHSIG = 1


def config_problem(config: Config) -> str | None:
    """Load every certificate and the DKIM key as a worker would: the first problem, or None."""
    for i, listener in enumerate(config.server.listeners):
        if listener.tls is not None:
            try:
                load_tls_context(listener.tls)
            except TlsSetupError as exc:
                return f"config: server.listeners[{i}].tls.{exc.key}: {exc}"
    try:
        load_signer(config)
    except ConfigError as exc:
        return str(exc)
    limits = config.server.rate_limits
    if limits.enabled and limits.backend == "redis":
        if importlib.util.find_spec("redis") is None:  # optional: this backend's dependency only
            return 'config: server.rate_limits.backend: "redis" needs the redis package (pip install redis)'
    return None


@dataclass(slots=True)
class Child:
    pid: int
    generation: int
    beat_fd: int  # read end of its heartbeat pipe; -1 once it hit EOF
    started: float
    last_beat: float
    status: bytes = b"S"
    ever_ready: bool = False
    retiring: bool = False  # sent SIGHUP after a reload
    killed: bool = False


class Master:
    def __init__(self, config: Config, config_path: str) -> None:
        self.config = config
        self.config_path = config_path
        self.pid = os.getpid()
        self.children: dict[int, Child] = {}
        self.generation = 0
        self.sockets: dict[str, socket.socket] = {}  # listener addr -> listening socket (unpatched)
        self.http: list[tuple[socket.socket, health.Routes]] = []
        self.metrics_dir: str | None = None
        self.stopping = False
        self.exit_code = 0
        self._stop_deadline = 0.0
        self._killed_stragglers = False
        self._signals: list[int] = []
        self._wake_r = self._wake_w = -1
        self._lock_fd = -1
        self._next_spawn = 0.0
        self._backoff = 0.0
        self._boot_failures = 0
        self._ready_told = False

    # -- start -------------------------------------------------------------------------

    def run(self) -> int:
        try:
            self._start()
        except StartupError as exc:
            print(exc, file=sys.stderr)
            self._close()
            return exc.code
        log.info("master pid=%d: %d worker%s", self.pid, self.config.server.workers,
                 "" if self.config.server.workers == 1 else "s")
        while self.children or not self.stopping:
            self._step()
        self._close()
        log.info("master stopped")
        return self.exit_code

    def _start(self) -> None:
        problem = config_problem(self.config)
        if problem:
            raise StartupError(problem, code=2)
        base = self.config.storage.base_path
        try:
            self._lock_fd = hold_lock(base)
        except SpoolLocked as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot open spool {base}: {exc.strerror or exc}") from exc
        server = self.config.server
        if server.metrics is not None:
            self.metrics_dir = os.path.join(base, "metrics")
            metrics.wipe(self.metrics_dir)
            metrics.init(self.metrics_dir)  # before the fork: every worker writes its own files
        for lc in server.listeners:
            self.sockets[lc.addr] = self._bind(lc)
        routes: dict[HttpBind, health.Routes] = {}  # one socket per address, all its paths
        if server.health is not None:
            routes.setdefault(server.health, {}).update({"/healthz": self._healthz, "/readyz": self._readyz})
        if server.metrics is not None:
            routes.setdefault(server.metrics, {})["/metrics"] = self._metrics
        for where, table in routes.items():
            try:
                self.http.append((health.bind_http(where), table))
            except OSError as exc:
                raise StartupError(f"cannot listen on {where.bind}: {exc.strerror or exc}") from exc
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        signal.set_wakeup_fd(self._wake_w)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            _signal(signum, self._on_signal)
        self._spawn_missing(time.monotonic())

    def _bind(self, lc: ListenerConfig) -> socket.socket:
        try:
            return bind(lc, _Socket)
        except OSError as exc:
            raise StartupError(f"cannot listen on {lc.addr}: {exc.strerror or exc}") from exc

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    # -- the loop ------------------------------------------------------------------------

    def _step(self) -> None:
        beats = {c.beat_fd: c for c in self.children.values() if c.beat_fd >= 0}
        doors = {s.fileno(): (s, routes) for s, routes in self.http}
        wait = TICK
        if not self.stopping and self._next_spawn:
            wait = min(wait, max(self._next_spawn - time.monotonic(), 0.0))
        try:
            ready, _, _ = _select([self._wake_r, *beats, *doors], [], [], wait)
        except InterruptedError:
            ready = []
        now = time.monotonic()
        if self._wake_r in ready:
            _drain(self._wake_r)
        while self._signals:
            self._handle_signal(self._signals.pop(0))
        for fd in ready:
            if fd in beats:
                self._read_beats(beats[fd], now)
        self._reap(now)
        self._watch(now)
        self._spawn_missing(now)
        for fd in ready:
            if fd in doors:
                health.serve_one(*doors[fd])

    def _handle_signal(self, signum: int) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            log.info("%s: stopping", signal.Signals(signum).name)
            self._begin_stop(0)
        elif signum == signal.SIGHUP:
            self._reload()

    def _read_beats(self, child: Child, now: float) -> None:
        try:
            data = os.read(child.beat_fd, 4096)
        except BlockingIOError:
            return
        if not data:  # the worker closed its end: it is exiting
            os.close(child.beat_fd)
            child.beat_fd = -1
            return
        child.status = data[-1:]
        child.last_beat = now
        if child.status == b"R" and not child.ever_ready:
            child.ever_ready = True
            self._boot_failures = 0
            log.info("worker pid=%d ready", child.pid)

    def _reap(self, now: float) -> None:
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            child = self.children.pop(pid, None)
            if child is None:
                continue
            if child.beat_fd >= 0:
                os.close(child.beat_fd)
            if self.metrics_dir is not None:
                metrics.mark_process_dead(pid, self.metrics_dir)
            self._exited(child, os.waitstatus_to_exitcode(status), now)

    def _exited(self, child: Child, code: int, now: float) -> None:
        how = f"exit {code}" if code >= 0 else signal.Signals(-code).name
        if self.stopping or child.retiring:
            log.info("worker pid=%d stopped (%s)", child.pid, how)
            return
        log.error("worker pid=%d died (%s); its messages go to a live worker, a new one starts",
                  child.pid, how)
        if not child.ever_ready:
            self._boot_failures += 1
            if code == 2:
                log.error("a worker cannot start (exit 2: a configuration problem): stopping")
                self._begin_stop(2)
                return
            if self._boot_failures >= BOOT_FAILURES:
                log.error("workers keep dying before they are ready (%d in a row): giving up",
                          self._boot_failures)
                self._begin_stop(1)
                return
        if now - child.started >= STABLE_AFTER:
            self._backoff = 0.0
        self._backoff = min(max(self._backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        self._next_spawn = now + self._backoff

    def _watch(self, now: float) -> None:
        timeout = self.config.server.worker_timeout
        for child in self.children.values():
            if child.killed or child.status == b"D":
                continue
            if now - child.last_beat > timeout:
                log.error("worker pid=%d sent no heartbeat for %.0fs: killing it", child.pid, timeout)
                _kill(child.pid, signal.SIGKILL)
                child.killed = True
        if self.stopping and not self._killed_stragglers and now >= self._stop_deadline:
            self._killed_stragglers = True
            for child in self.children.values():
                log.warning("worker pid=%d still running %.0fs after SIGTERM: killing it",
                            child.pid, STOP_GRACE)
                _kill(child.pid, signal.SIGKILL)

    def _spawn_missing(self, now: float) -> None:
        if self.stopping:
            return
        current = self._current()
        if len(current) < self.config.server.workers and now >= self._next_spawn:
            for _ in range(self.config.server.workers - len(current)):
                self._spawn(now)
            current = self._current()
        if not self._ready_told and len(current) == self.config.server.workers and all(
                c.status == b"R" for c in current):
            self._ready_told = True
            log.info("ready: %d worker%s listening", len(current), "" if len(current) == 1 else "s")
            notify("READY=1")

    # -- workers ---------------------------------------------------------------------------

    def _spawn(self, now: float) -> None:
        beat_r, beat_w = os.pipe()
        pid = _fork()
        if pid == 0:  # the child: never returns
            os.close(beat_r)
            self._become_worker(beat_w)
        os.close(beat_w)
        os.set_blocking(beat_r, False)
        self.children[pid] = Child(pid, self.generation, beat_r, now, now)

    def _become_worker(self, beat_w: int) -> None:
        code = 1
        try:
            _die_with(self.pid)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
                _signal(signum, signal.SIG_DFL)
            for fd in (self._wake_r, self._wake_w, *(c.beat_fd for c in self.children.values())):
                if fd >= 0:
                    os.close(fd)
            for sock, _routes in self.http:
                sock.close()
            os.environ.pop("NOTIFY_SOCKET", None)
            os.set_blocking(beat_w, False)
            gevent.reinit()
            inherited = [self.sockets[lc.addr] for lc in self.config.server.listeners]
            for sock in set(self.sockets.values()) - set(inherited):
                sock.close()
            # From here on gevent's socket class: the worker's hub waits on them.
            sockets = [socket.socket(fileno=s.detach()) for s in inherited]
            worker = Worker(self.config, sockets, heartbeat_fd=beat_w)
            worker.start()
            code = worker.serve_forever()
        except StartupError as exc:
            log.error("worker cannot start: %s", exc)
            code = exc.code
        except BaseException:  # noqa: BLE001 - whatever it was, the child must not return
            log.exception("worker failed")
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    # -- reload and stop ---------------------------------------------------------------------

    def _reload(self) -> None:
        if self.stopping:
            return
        log.info("SIGHUP: reloading %s", self.config_path)
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        problem = config_problem(config)
        if problem:
            log.error("reload refused, the running configuration stays: %s", problem)
            return
        if config.storage.base_path != self.config.storage.base_path:
            log.error("reload refused, the running configuration stays: "
                      "storage.base_path cannot change without a restart")
            return
        for key in ("metrics", "health"):
            if getattr(config.server, key) != getattr(self.config.server, key):
                log.warning("server.%s.bind changes only with a restart", key)
        sockets: dict[str, socket.socket] = {}
        try:
            for lc in config.server.listeners:
                sockets[lc.addr] = self.sockets.get(lc.addr) or self._bind(lc)
        except StartupError as exc:
            for addr, sock in sockets.items():
                if addr not in self.sockets:
                    sock.close()
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        logsetup.setup(config.log.level, config.log.format)
        for addr, sock in self.sockets.items():
            if addr not in sockets:
                sock.close()  # the retiring workers close their copies as they stop accepting
        self.config, self.sockets = config, sockets
        self.generation += 1
        self._ready_told = False
        self._boot_failures = 0
        self._next_spawn = 0.0
        for child in self.children.values():
            if not child.retiring:
                child.retiring = True
                _kill(child.pid, signal.SIGHUP)
        log.info("reloaded: generation %d, %d worker%s", self.generation, config.server.workers,
                 "" if config.server.workers == 1 else "s")

    def _begin_stop(self, code: int) -> None:
        if self.stopping:
            return
        self.stopping = True
        self.exit_code = code
        notify("STOPPING=1")
        for sock in self.sockets.values():
            sock.close()  # the ports are free once every worker closed its copy too
        self.sockets.clear()
        self._stop_deadline = time.monotonic() + STOP_GRACE
        for child in self.children.values():
            _kill(child.pid, signal.SIGTERM)

    def _close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        for sock, _routes in self.http:
            sock.close()
        self.sockets.clear()
        self.http.clear()
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = self._lock_fd = -1

    # -- HTTP -----------------------------------------------------------------------------------

    def _current(self) -> list[Child]:
        return [c for c in self.children.values() if c.generation == self.generation]

    def _healthz(self) -> health.Response:
        if self.stopping:
            return health.text(503, "stopping\n")
        if any(c.status == b"U" for c in self.children.values()):
            return health.text(503, "spool unhealthy\n")
        return health.text(200, "ok\n")

    def _readyz(self) -> health.Response:
        if self.stopping:
            return health.text(503, "stopping\n")
        current = self._current()
        if len(current) < self.config.server.workers or any(c.status == b"S" for c in current):
            return health.text(503, "starting\n")
        if any(c.status != b"R" for c in current):
            return health.text(503, "spool not writable\n")
        return health.text(200, "ready\n")

    def _metrics(self) -> health.Response:
        body, ctype = metrics.render(self.metrics_dir)
        return 200, ctype, body


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about READY / RELOADING / STOPPING, when it listens."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with _Socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _die_with(master_pid: int) -> None:
    """The kernel kills this worker when the master dies (however it dies)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the worker's tick notices a new parent instead
    if os.getppid() != master_pid:  # the master died before the line above took effect
        os._exit(1)
