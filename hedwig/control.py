"""Steering a running server's queue from outside: the spool lock and the control directory.

Two files under `base_path` carry it:

    lock                  the server holds an exclusive flock on it for its whole life
                          (the kernel drops it when the process dies, however it dies)
    ctl/<uuid>.<writer>.req
                          a request from `hedwig queue retry|delete` for the messages of
                          one writer: {"op": "delete"|"retry", "id": ID | null, "deadline": epoch}
    ctl/<uuid>.done       the answer: {"ok": bool, "status": ..., "message": ..., "count": n}

A tool that wants to change the queue first tries the lock without waiting.
If it gets it, no server runs and the tool changes the journal itself while
holding the lock (a server starting meanwhile waits for it). If not, it writes
a request (tmp + rename, so the server never reads half of one) and waits for
the answer. A request is addressed to the writer whose segment holds the
message (`--all`: one request per writer), because with several workers each
message belongs to exactly one of them (spool.py, "Ownership"). Each worker's
`Control` greenlet polls ctl/ every POLL seconds, claims the requests for the
writers it owns by unlinking them, applies them to its in-memory scheduler
and spool (the only writer of those journals) and writes the answer.

- delete: if the message is being delivered right now, wait for that attempt
  to end (until shortly before the request's deadline); then, if it is still
  queued, take it out of the scheduler and journal it done ("deleted") through
  `Spool.finish`. The answer is written only after that line is durable, so
  once the tool says "deleted" the message is never attempted again, not even
  after a restart.
- retry: a message waiting for a later attempt becomes due now (`--all`: every
  waiting message); the new due time is journalled.

A request the server finds past its deadline is dropped unanswered: the tool
has given up on it, and an old request must not act hours later.

Must not: deliver, read message bodies, or decide what the tool prints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import gevent
from gevent import monkey
from gevent.pool import Group

from .scheduler import Scheduler
from .spool import DIR_MODE, FILE_MODE, QueueEntry, Spool, SpoolError, is_id

log = logging.getLogger(__name__)

LOCK_NAME = "lock"
CTL_DIR = "ctl"
POLL = 0.2  # seconds between looks at ctl/ (server) and at the answer (tool: a quarter of it)
ANSWER_MARGIN = 1.0  # the server answers this long before a request's deadline
STALE_AFTER = 60.0  # leftover answers and temporary files older than this are removed
_REQUEST_NAME = re.compile(r"([0-9a-f]{32})\.([a-z0-9]+)\.req\Z")

Answer = dict[str, Any]


# The master waits for the lock before any hub exists, and must not start one.
_blocking_sleep = monkey.get_original("time", "sleep")


class SpoolLocked(Exception):
    """Another process holds the spool lock."""


# -- the lock -------------------------------------------------------------------------------


def _open_lock(base_path: str) -> int:
    fd = os.open(os.path.join(base_path, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    _own_like(fd, base_path)
    return fd


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise
    return True


def hold_lock(base_path: str, wait: float = 5.0) -> int:
    """The server's side: take the spool lock for the life of the process; returns its fd.

    Waits up to `wait` seconds (a queue tool holds it for a moment while it
    changes the journal). Raises SpoolLocked if another process keeps it, OSError.
    """
    os.makedirs(base_path, mode=DIR_MODE, exist_ok=True)
    fd = _open_lock(base_path)
    deadline = time.monotonic() + wait
    while not _try_flock(fd):
        if time.monotonic() >= deadline:
            os.close(fd)
            raise SpoolLocked(f"spool {base_path} is in use by another process (another hedwig on it?)")
        _blocking_sleep(0.05)
    return fd


def _own_like(fd: int, base_path: str) -> None:
    """Run as root against a server's spool: give new files to the spool's owner, who must use them."""
    if os.geteuid() != 0:
        return
    st = os.stat(base_path)
    if st.st_uid != 0:
        os.fchown(fd, st.st_uid, st.st_gid)


# -- the tool's side -----------------------------------------------------------------------


def _write_file(path: str, data: bytes, base_path: str) -> None:
    """tmp + rename, 0600, owned like the spool: a reader sees all of it or nothing."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        _own_like(fd, base_path)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _read_answer(path: str) -> Answer | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        answer = json.loads(data)
    except ValueError:
        return {"ok": False, "status": "failed", "message": "the server's answer is unreadable"}
    return answer if isinstance(answer, dict) else {"ok": False, "status": "failed",
                                                       "message": "the server's answer is unreadable"}


def request(base_path: str, op: str, msg_id: str | None, writers: list[str],
            offline: Callable[[], Answer], timeout: float = 10.0) -> Answer:
    """Apply `op` through the running server, or call `offline()` under the lock if none runs.

    One request goes to each of `writers` (the owners of the messages concerned);
    their answers are combined. `offline` is also the way out when the server
    stops while the tool waits: the requests are withdrawn (or were taken: both
    operations are idempotent) and the tool applies the change itself. Returns
    the answer; never waits much past `timeout`.
    """
    fd = _open_lock(base_path)
    try:
        if _try_flock(fd):
            return offline()
        ctl = os.path.join(base_path, CTL_DIR)
        os.makedirs(ctl, mode=DIR_MODE, exist_ok=True)
        deadline = time.time() + timeout
        body = json.dumps({"op": op, "id": msg_id, "deadline": deadline}).encode()
        waiting: dict[str, str] = {}  # writer -> uuid of its request
        for writer in writers:
            name = uuid.uuid4().hex
            _write_file(os.path.join(ctl, f"{name}.{writer}.req"), body, base_path)
            waiting[writer] = name
        answers: list[Answer] = []
        log_dir = os.path.join(base_path, "log")
        while waiting and time.time() < deadline + ANSWER_MARGIN:
            for writer, name in list(waiting.items()):
                answer = _read_answer(os.path.join(ctl, name + ".done"))
                if answer is None and not _has_segments(log_dir, writer):
                    # Its messages are all gone and nobody may be left to answer.
                    if _unlink(os.path.join(ctl, f"{name}.{writer}.req")):
                        answer = {"ok": msg_id is None, "status": "due" if msg_id is None else "not-queued",
                                  "count": 0, "message": "not in the queue"}
                if answer is not None:
                    answers.append(answer)
                    del waiting[writer]
            if waiting and _try_flock(fd):  # the server is gone; whatever it did or not, finish here
                for writer, name in waiting.items():
                    _unlink(os.path.join(ctl, f"{name}.{writer}.req"))
                return offline()
            if waiting:
                time.sleep(POLL / 4)
        if not waiting:
            return _combine(answers, msg_id)
        taken = [not _unlink(os.path.join(ctl, f"{name}.{writer}.req")) for writer, name in waiting.items()]
        what = "took the request but did not answer" if any(taken) else "did not take the request"
        return {"ok": False, "status": "no-answer",
                "message": f"the server {what} within {timeout:g}s"
                           + ("" if any(taken) or answers else "; nothing was changed")}
    finally:
        os.close(fd)  # releases the lock if we held it


def _has_segments(log_dir: str, writer: str) -> bool:
    prefix = writer + "-"
    try:
        return any(n.startswith(prefix) and n.endswith(".seg") for n in os.listdir(log_dir))
    except FileNotFoundError:
        return False


def _combine(answers: list[Answer], msg_id: str | None) -> Answer:
    """One answer from the answers of each writer's owner."""
    if msg_id is not None or len(answers) == 1:
        return answers[0] if answers else {"ok": False, "status": "not-queued", "message": "not in the queue"}
    failed = [a for a in answers if not a.get("ok")]
    if failed:
        return failed[0]
    count = sum(int(a.get("count", 0)) for a in answers)
    return {"ok": True, "status": "due", "count": count, "message": made_due(count)}


def made_due(count: int) -> str:
    return f"{count} message{'' if count == 1 else 's'} made due now"


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


# -- the server's side ------------------------------------------------------------------------


class Control:
    """The running server's end: polls ctl/ and applies requests to the scheduler and spool."""

    def __init__(self, spool: Spool, scheduler: Scheduler) -> None:
        self.spool = spool
        self.scheduler = scheduler
        self.ctl_dir = os.path.join(spool.base_path, CTL_DIR)
        self._runner: gevent.Greenlet | None = None
        self._handlers = Group()
        self._deleting: set[str] = set()
        self._swept = 0.0

    def start(self) -> None:
        os.makedirs(self.ctl_dir, mode=DIR_MODE, exist_ok=True)
        self._runner = gevent.spawn(self._run)

    def stop(self) -> None:
        """Unanswered requests stay behind; their tools notice the lock go and finish offline."""
        if self._runner is not None:
            self._runner.kill()
            self._runner = None
        self._handlers.kill(timeout=1)

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except OSError as exc:
                log.error("control directory %s: %s", self.ctl_dir, exc)
            gevent.sleep(POLL)

    def poll(self) -> None:
        """Take every request waiting in ctl/ and start handling it."""
        now = time.time()
        if now - self._swept > STALE_AFTER:
            self._sweep(now)
        try:
            names = sorted(os.listdir(self.ctl_dir))
        except FileNotFoundError:  # removed by hand: tools need it back
            os.makedirs(self.ctl_dir, mode=DIR_MODE, exist_ok=True)
            return
        for name in names:
            m = _REQUEST_NAME.match(name)
            if not m or m.group(2) not in self.spool.owned:
                continue  # another worker's (or nobody's yet: the one adopting it answers)
            path = os.path.join(self.ctl_dir, name)
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            if not _unlink(path):
                continue  # withdrawn by its tool
            self._handlers.spawn(self._handle, m.group(1), data)

    def _handle(self, name: str, data: bytes) -> None:
        try:
            req = json.loads(data)
            op, msg_id, deadline = req["op"], req.get("id"), float(req["deadline"])
            if msg_id is not None and not (isinstance(msg_id, str) and is_id(msg_id)):
                raise TypeError("id")
        except (ValueError, KeyError, TypeError):
            log.warning("control: unreadable request %s ignored", name)
            return
        if time.time() > deadline:
            log.warning("control: request %s (%s %s) arrived after its deadline; ignored", name, op, msg_id)
            return
        if op == "delete" and msg_id is not None:
            answer = self.delete(msg_id, deadline - ANSWER_MARGIN)
        elif op == "retry":
            answer = self.retry(msg_id)
        else:
            answer = {"ok": False, "status": "failed", "message": f"unknown request {op!r}"}
        log.info("control: %s %s -> %s", op, msg_id or "all", answer["status"])
        try:
            _write_file(os.path.join(self.ctl_dir, name + ".done"), json.dumps(answer).encode(),
                        self.spool.base_path)
        except OSError as exc:
            log.error("control: cannot answer request %s: %s", name, exc)

    def delete(self, msg_id: str, give_up_at: float) -> Answer:
        """No attempt of `msg_id` starts after this returns "deleted"."""
        while msg_id in self.scheduler.claimed or msg_id in self._deleting:
            if time.time() >= give_up_at:
                return {"ok": False, "status": "busy",
                        "message": "it is being delivered right now and the attempt did not end in time; "
                                   "try again"}
            gevent.sleep(0.05)
        entry = self.spool.entries.get(msg_id)
        if entry is None:
            return {"ok": False, "status": "not-queued", "message": "not in the queue"}
        # Out of the scheduler first, with no yield in between: from here on no
        # delivery greenlet can claim it, while the done line is being made durable.
        self.scheduler.discard(msg_id)
        self._deleting.add(msg_id)
        try:
            self.spool.finish(entry, "deleted")
        except SpoolError as exc:
            self.scheduler.add(entry)
            return {"ok": False, "status": "failed", "message": f"could not journal the deletion: {exc}"}
        finally:
            self._deleting.discard(msg_id)
        return {"ok": True, "status": "deleted", "message": "deleted"}

    def retry(self, msg_id: str | None) -> Answer:
        """Messages waiting for a later attempt become due now; the new due time is journalled."""
        if msg_id is None:
            moved = self.scheduler.make_all_due()
            self._journal(moved)
            return {"ok": True, "status": "due", "count": len(moved), "message": made_due(len(moved))}
        if msg_id not in self.spool.entries or msg_id in self._deleting:
            return {"ok": False, "status": "not-queued", "message": "not in the queue"}
        if msg_id in self.scheduler.claimed:
            return {"ok": True, "status": "delivering", "message": "being delivered right now"}
        entry = self.scheduler.make_due(msg_id)
        if entry is None:
            return {"ok": True, "status": "already-due", "message": "already due"}
        self._journal([entry])
        return {"ok": True, "status": "due", "count": 1, "message": "due now"}

    def _journal(self, entries: list[QueueEntry]) -> None:
        """Note the new due times, concurrently (one group commit covers them)."""
        def note(entry: QueueEntry) -> None:
            # A delivery that took it meanwhile journals its own outcome.
            if entry.msg_id in self.spool.entries and entry.msg_id not in self.scheduler.claimed:
                try:
                    self.spool.record_state(entry)
                except SpoolError as exc:
                    log.warning("msg_id=%s retry not journalled: %s", entry.msg_id, exc)

        for start in range(0, len(entries), 1000):
            gevent.joinall([gevent.spawn(note, e) for e in entries[start:start + 1000]])

    def _sweep(self, now: float) -> None:
        """Answers nobody collected and temporary files of tools that died."""
        self._swept = now
        for name in os.listdir(self.ctl_dir):
            if name.endswith((".done", ".tmp")):
                path = os.path.join(self.ctl_dir, name)
                try:
                    if os.stat(path).st_mtime < now - STALE_AFTER:
                        os.unlink(path)
                except FileNotFoundError:
                    pass
