"""The durable queue on disk: one file per message, committed in groups.

Layout under `base_path` (directories 0700, files 0600):

    tmp/<id>.msg          being received; leftovers at start are junk and removed
    queue/<hh>/<id>.msg   accepted: envelope header + message + checksummed trailer
    quarantine/<id>.msg   found damaged; kept for a human, never delivered

`<hh>` is the last two characters of the id (random bits), so no directory
holds more than ~1/1024 of the backlog.

A message file is

    b"HEDWIG/1 " + 8 hex digits (length of the JSON envelope) + b"\\n"
    JSON envelope + b"\\n"
    the message as delivered (our Received header, then the client's bytes)
    trailer: b"\\nHEDWIG-END " + 16 hex (bytes before the trailer) + b" " + 8 hex (CRC-32 of them) + b"\\n"

so a reader finds the envelope without reading the body, and a torn or damaged
file is recognised by its trailer.

Durability (what a 250 means): the session streams the message into tmp/
with plain writes, then commit() hands it to the committer. The committer
takes every commit waiting at that moment as one batch and, in the threadpool:
syncs the filesystem (syncfs(2): one journal commit makes all the batch's
bytes durable), renames each file into queue/, and syncs again so the renames
are durable. Only then do the waiting sessions answer 250. Sessions that
arrive while a batch is syncing form the next batch: this is the group commit
that lets one sync cover many messages. Where syncfs is missing the same
steps run with fdatasync per file and fsync per directory.

A failed sync is never retried (the kernel may have dropped the dirty pages):
the spool turns unhealthy and refuses new mail until restart.

Must not: speak SMTP, parse client input into paths (ids are ours), or block
the hub on a sync.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import gevent
from gevent.event import AsyncResult, Event

from . import offload

log = logging.getLogger(__name__)

MAGIC = b"HEDWIG/1 "
HEADER_PREFIX_LEN = len(MAGIC) + 8 + 1
TRAILER_TAG = b"\nHEDWIG-END "
TRAILER_LEN = len(TRAILER_TAG) + 16 + 1 + 8 + 1
FILE_MODE = 0o600
DIR_MODE = 0o700
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class SpoolError(Exception):
    """The spool could not make a message durable; the client gets a 4xx."""


class DamagedMessage(SpoolError):
    """A queue file failed its trailer check."""


@dataclass(frozen=True, slots=True)
class Envelope:
    msg_id: str
    sender: str
    recipients: tuple[str, ...]
    received_at: float
    client: str = ""  # peer address
    helo: str = ""
    smtputf8: bool = False
    body: str = ""  # "8BITMIME", "7BIT" or "" (not declared)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        fields = json.loads(data)
        fields["recipients"] = tuple(fields["recipients"])
        return cls(**fields)


def new_id(now: float | None = None) -> str:
    """26 characters, Crockford base32: 48 bits of milliseconds then 80 random bits (ULID)."""
    ms = int((time.time() if now is None else now) * 1000)
    value = (ms << 80) | secrets.randbits(80)
    out = []
    for _ in range(26):
        out.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(out))


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _CROCKFORD for c in text)


def _load_syncfs():  # type: ignore[no-untyped-def]
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MessageWriter:
    """One message being received into tmp/. Plain writes; durability comes at commit."""

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.envelope = envelope
        self.msg_id = envelope.msg_id
        self.tmp_path = os.path.join(spool.tmp_dir, self.msg_id + ".msg")
        self.final_dir = spool.queue_dir_for(self.msg_id)
        self.final_path = os.path.join(self.final_dir, self.msg_id + ".msg")
        self.fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        self._crc = 0
        self._length = 0
        self._parts: list[bytes] = []
        self._buffered = 0
        self.size = 0  # message bytes so far, envelope header not included
        env = envelope.to_json()
        self._parts.append(MAGIC + b"%08x\n" % len(env) + env + b"\n")

    def write(self, data: bytes) -> None:
        # Small pieces are gathered so a 1 KiB message costs one write(2).
        self.size += len(data)
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered >= 65536:
            self._flush()

    def _flush(self) -> None:
        data = b"".join(self._parts)
        self._parts.clear()
        self._buffered = 0
        self._crc = zlib.crc32(data, self._crc)
        self._length += len(data)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def finish(self) -> None:
        """Write the trailer. The file is complete but not yet durable."""
        self._flush()
        trailer = TRAILER_TAG + b"%016x %08x\n" % (self._length, self._crc)
        os.write(self.fd, trailer)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()
        try:
            os.unlink(self.tmp_path)
        except FileNotFoundError:
            pass


class Spool:
    def __init__(self, base_path: str, *, fsync: bool = True, disk_reserve: int = 0) -> None:
        self.base_path = base_path
        self.fsync = fsync
        self.disk_reserve = disk_reserve
        self.tmp_dir = os.path.join(base_path, "tmp")
        self.queue_dir = os.path.join(base_path, "queue")
        self.quarantine_dir = os.path.join(base_path, "quarantine")
        self.healthy = True
        self._room_checked = 0.0
        self._has_room = True
        self._made_dirs: set[str] = set()
        self._pending: list[tuple[MessageWriter, AsyncResult]] = []
        self._wakeup = Event()
        self._committer: gevent.Greenlet | None = None
        self._sync_fd = -1

    # -- setup -----------------------------------------------------------------

    def open(self) -> None:
        """Create the layout (or check it) and start the committer. Raises OSError."""
        for path in (self.base_path, self.tmp_dir, self.queue_dir, self.quarantine_dir):
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        os.chmod(self.base_path, DIR_MODE)
        # Held open so syncfs reports writeback errors that happen from now on.
        self._sync_fd = os.open(self.base_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._committer = gevent.spawn(self._run_committer)

    def close(self) -> None:
        if self._committer is not None:
            self._committer.kill()
            self._committer = None
        if self._sync_fd >= 0:
            os.close(self._sync_fd)
            self._sync_fd = -1

    def queue_dir_for(self, msg_id: str) -> str:
        return os.path.join(self.queue_dir, msg_id[-2:].lower())

    def path_for(self, msg_id: str) -> str:
        return os.path.join(self.queue_dir_for(msg_id), msg_id + ".msg")

    # -- accepting -------------------------------------------------------------

    def has_room(self) -> bool:
        """Free space above disk_reserve? Checked at most once a second."""
        now = time.monotonic()
        if now - self._room_checked >= 1.0:
            st = os.statvfs(self.base_path)
            self._has_room = st.f_bavail * st.f_frsize >= self.disk_reserve
            self._room_checked = now
        return self._has_room

    def create(self, envelope: Envelope) -> MessageWriter:
        return MessageWriter(self, envelope)

    def commit(self, writer: MessageWriter) -> None:
        """Make the message durable and queued; returns only when it is. Raises SpoolError."""
        if not self.healthy:
            writer.abort()
            raise SpoolError("spool is unhealthy")
        try:
            writer.finish()
        except OSError as exc:
            writer.abort()
            raise SpoolError(f"write failed: {exc}") from exc
        result: AsyncResult = AsyncResult()
        self._pending.append((writer, result))
        self._wakeup.set()
        result.get()

    def _run_committer(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            try:
                failed = offload.run(self._commit_batch, [w for w, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                if isinstance(exc, gevent.GreenletExit):
                    for _, result in batch:
                        result.set_exception(SpoolError("spool closed"))
                    raise
                log.error("spool sync failed, refusing new mail until restart: %s", exc)
                self.healthy = False
                for writer, result in batch:
                    writer.abort()
                    result.set_exception(SpoolError(f"sync failed: {exc}"))
                continue
            for writer, result in batch:
                error = failed.get(writer.msg_id)
                if error is None:
                    result.set(None)
                else:
                    result.set_exception(SpoolError(error))

    def _sync(self, fds: list[int], dirs: set[str]) -> None:
        if _syncfs is not None:
            if _syncfs(self._sync_fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
            return
        for fd in fds:
            os.fdatasync(fd)
        for path in dirs:
            _fsync_dir(path)

    def _commit_batch(self, writers: list[MessageWriter]) -> dict[str, str]:
        """In a native thread: sync, rename, sync. Returns {msg_id: error} for failures."""
        failed: dict[str, str] = {}
        try:
            if self.fsync:
                self._sync([w.fd for w in writers], set())
        finally:
            for w in writers:
                w.close()
        dirs: set[str] = set()
        for w in writers:
            try:
                if w.final_dir not in self._made_dirs:
                    os.makedirs(w.final_dir, mode=DIR_MODE, exist_ok=True)
                    self._made_dirs.add(w.final_dir)
                os.rename(w.tmp_path, w.final_path)
                dirs.add(w.final_dir)
            except OSError as exc:
                failed[w.msg_id] = f"rename failed: {exc}"
                w.abort()
        if self.fsync and dirs:
            self._sync([], dirs)
        return failed

    # -- reading ---------------------------------------------------------------

    def clean_tmp(self) -> int:
        """Remove messages whose receipt never finished (never acknowledged)."""
        removed = 0
        for name in os.listdir(self.tmp_dir):
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def scan(self) -> Iterator[str]:
        """Ids of every queued message, oldest first within each directory; reads no file."""
        try:
            subdirs = sorted(os.listdir(self.queue_dir))
        except FileNotFoundError:
            return
        for sub in subdirs:
            path = os.path.join(self.queue_dir, sub)
            try:
                names = sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for name in names:
                if name.endswith(".msg") and is_id(name[:-4]):
                    yield name[:-4]

    def read_envelope(self, msg_id: str) -> Envelope:
        """The envelope alone: reads the header, never the body."""
        with open(self.path_for(msg_id), "rb") as f:
            prefix = f.read(HEADER_PREFIX_LEN)
            if not prefix.startswith(MAGIC) or len(prefix) != HEADER_PREFIX_LEN:
                raise DamagedMessage(f"{msg_id}: bad header")
            size = int(prefix[len(MAGIC):-1], 16)
            return Envelope.from_json(f.read(size))

    def read(self, msg_id: str) -> tuple[Envelope, bytes]:
        """Envelope and message bytes, after checking the trailer. Raises DamagedMessage."""
        with open(self.path_for(msg_id), "rb") as f:
            data = f.read()
        return parse_message_file(msg_id, data)

    def quarantine(self, msg_id: str, reason: str) -> None:
        log.error("msg_id=%s quarantined: %s", msg_id, reason)
        os.rename(self.path_for(msg_id), os.path.join(self.quarantine_dir, msg_id + ".msg"))


def parse_message_file(msg_id: str, data: bytes) -> tuple[Envelope, bytes]:
    if len(data) < HEADER_PREFIX_LEN + TRAILER_LEN or not data.startswith(MAGIC):
        raise DamagedMessage(f"{msg_id}: truncated or not a message file")
    trailer = data[-TRAILER_LEN:]
    if not trailer.startswith(TRAILER_TAG):
        raise DamagedMessage(f"{msg_id}: no trailer (truncated)")
    try:
        length = int(trailer[len(TRAILER_TAG):len(TRAILER_TAG) + 16], 16)
        crc = int(trailer[-9:-1], 16)
        env_len = int(data[len(MAGIC):HEADER_PREFIX_LEN - 1], 16)
    except ValueError:
        raise DamagedMessage(f"{msg_id}: unreadable header or trailer") from None
    content = memoryview(data)[:-TRAILER_LEN]
    if length != len(content) or zlib.crc32(content) != crc:
        raise DamagedMessage(f"{msg_id}: checksum mismatch")
    body_start = HEADER_PREFIX_LEN + env_len + 1
    envelope = Envelope.from_json(bytes(content[HEADER_PREFIX_LEN:body_start - 1]))
    return envelope, bytes(content[body_start:])
