"""The durable queue on disk: an append-only log of checksummed records, group-committed.

Layout under `base_path` (directories 0700, files 0600):

    log/<writer>-<seq>.seg   append-only segments; a writer (one per worker) appends
                             only to its newest segment and never touches the others
    tmp/<id>.part            a big message being received (spilled from memory);
                             leftovers at start are junk and removed

A segment is a sequence of records. Each record is a fixed header followed by
a payload of `meta` (JSON) and `body` bytes:

    magic "HWR1" | type u8 | flags u8 | reserved u16 | msg_id 26 ASCII bytes
    | meta_len u32 | body_len u64 | header_crc u32 | payload_crc u32   (little-endian)

`header_crc` (CRC-32 of the 46 bytes before it) makes the lengths trustworthy,
so a scan can hop from header to header without reading bodies;
`payload_crc` covers meta and body and is checked whenever a body is read.
A torn record (a crash in the middle of an append) fails its header check or
runs past the end of the file, and the scan of that segment stops there; such
a record was never acknowledged.

Record types: MESSAGE (meta = envelope, body = the message as it will be
delivered: our Received header, then the client's bytes). Delivery adds
state records with the delivery issue; unknown types are skipped.

Why a log and not a file per message: one fdatasync of the segment makes
every record appended before it durable, so concurrent sessions share it
(group commit), and no inode is created per message (on the disks we measured,
creating a file costs 10-350 µs of kernel time, more than everything else a
message costs). Big messages are received into tmp/ first, so memory use per
session stays bounded, and copied into the log at commit.

Durability (what a 250 means): at the final dot the session calls commit();
the committer greenlet takes every commit waiting at that moment as one batch
and, in the threadpool, appends their records and fdatasyncs the segment once.
Only then do the waiting sessions answer 250. Sessions that arrive while a
batch is syncing form the next batch. A failed write or sync is never retried
(the kernel may have dropped the dirty pages): the spool turns unhealthy and
refuses new mail until restart.

Must not: speak SMTP, build paths from client input (ids are ours), or block
the hub on a write of many bytes or on a sync.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import gevent
from gevent.event import AsyncResult, Event

from . import offload

log = logging.getLogger(__name__)

MAGIC = b"HWR1"
HEADER = struct.Struct("<4sBBH26sIQII")
HEADER_CRC_SPAN = HEADER.size - 8  # everything before the two CRCs
MESSAGE = ord("M")
FILE_MODE = 0o600
DIR_MODE = 0o700
SEGMENT_MAX = 64 * 1024 * 1024  # rotate after this many bytes
SPILL_AT = 256 * 1024  # messages larger than this are received into tmp/
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SEGMENT_NAME = re.compile(r"([a-z0-9]+)-([0-9a-f]{16})\.seg\Z")


class SpoolError(Exception):
    """The spool could not make a message durable; the client gets a 4xx."""


class SyncFailed(OSError):
    """A write could not be made durable: the spool must stop accepting."""


class DamagedMessage(SpoolError):
    """A record failed its checksum."""


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
        fields = {name: getattr(self, name) for name in self.__slots__}
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        fields = json.loads(data)
        fields["recipients"] = tuple(fields["recipients"])
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a record lives: segment file, offset of its header, payload lengths."""

    path: str
    offset: int
    kind: int
    msg_id: str
    meta_len: int
    body_len: int
    payload_crc: int

    @property
    def end(self) -> int:
        return self.offset + HEADER.size + self.meta_len + self.body_len


_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _CROCKFORD.encode("ascii"))


def new_id(now: float | None = None) -> str:
    """26 characters, Crockford base32 of 48 bits of milliseconds then 80 random bits.

    Like a ULID, ids sort by time; they never come from client input.
    """
    ms = int((time.time() if now is None else now) * 1000)
    raw = ms.to_bytes(6, "big") + secrets.token_bytes(10)
    return base64.b32encode(raw)[:26].translate(_TO_CROCKFORD).decode("ascii")


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _CROCKFORD for c in text)


def pack_header(kind: int, msg_id: str, meta_len: int, body_len: int, payload_crc: int) -> bytes:
    head = struct.pack("<4sBBH26sIQ", MAGIC, kind, 0, 0, msg_id.encode("ascii"), meta_len, body_len)
    return head + struct.pack("<II", zlib.crc32(head), payload_crc)


def iter_records(path: str) -> Iterator[Location]:
    """Every intact record header of one segment, in order; stops at a torn or damaged one.

    Reads headers only (one pread each), never payloads. Safe on a segment that
    a running server is appending to: a half-written tail looks torn and ends the scan.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset + HEADER.size <= size:
            raw = os.pread(fd, HEADER.size, offset)
            magic, kind, _flags, _res, raw_id, meta_len, body_len, header_crc, payload_crc = HEADER.unpack(raw)
            if magic != MAGIC or zlib.crc32(raw[:HEADER_CRC_SPAN]) != header_crc:
                break
            loc = Location(path, offset, kind, raw_id.decode("ascii", "replace"), meta_len, body_len, payload_crc)
            if loc.end > size:
                break
            yield loc
            offset = loc.end
        if offset != size:
            log.info("segment %s: %d bytes after offset %d are torn or damaged; ignored",
                     os.path.basename(path), size - offset, offset)
    finally:
        os.close(fd)


def read_payload(loc: Location) -> tuple[bytes, bytes]:
    """(meta, body) of a record, after its checksum. Raises DamagedMessage."""
    with open(loc.path, "rb") as f:
        f.seek(loc.offset + HEADER.size)
        payload = f.read(loc.meta_len + loc.body_len)
    if len(payload) != loc.meta_len + loc.body_len or zlib.crc32(payload) != loc.payload_crc:
        raise DamagedMessage(f"{loc.msg_id}: checksum mismatch in {os.path.basename(loc.path)}@{loc.offset}")
    return payload[: loc.meta_len], payload[loc.meta_len:]


def list_segments(log_dir: str) -> list[tuple[str, int, str]]:
    """(writer, seq, path) of every segment, oldest first per writer."""
    out = []
    try:
        names = os.listdir(log_dir)
    except FileNotFoundError:
        return []
    for name in names:
        m = _SEGMENT_NAME.match(name)
        if m:
            out.append((m.group(1), int(m.group(2), 16), os.path.join(log_dir, name)))
    out.sort()
    return out


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MessageWriter:
    """One message being received: in memory, or in tmp/ once it is big."""

    def __init__(self, spool: Spool, envelope: Envelope) -> None:
        self.spool = spool
        self.envelope = envelope
        self.msg_id = envelope.msg_id
        self.meta = envelope.to_json()
        self.size = 0  # message bytes so far
        self._crc = zlib.crc32(self.meta)
        self._parts: list[bytes] = []
        self.spill_fd = -1
        self.spill_path = ""

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._crc = zlib.crc32(data, self._crc)
        if self.spill_fd >= 0:
            _write_all(self.spill_fd, data)
            return
        self._parts.append(data)
        if self.size > SPILL_AT:
            self.spill_path = os.path.join(self.spool.tmp_dir, self.msg_id + ".part")
            self.spill_fd = os.open(self.spill_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            _write_all(self.spill_fd, b"".join(self._parts))
            self._parts.clear()

    def record_head(self) -> bytes:
        return pack_header(MESSAGE, self.msg_id, len(self.meta), self.size, self._crc) + self.meta

    def body_in_memory(self) -> bytes:
        return b"".join(self._parts)

    def abort(self) -> None:
        self._parts.clear()
        if self.spill_fd >= 0:
            os.close(self.spill_fd)
            self.spill_fd = -1
            try:
                os.unlink(self.spill_path)
            except FileNotFoundError:
                pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Spool:
    def __init__(self, base_path: str, *, fsync: bool = True, disk_reserve: int = 0, writer: str = "w0") -> None:
        self.base_path = base_path
        self.fsync = fsync
        self.disk_reserve = disk_reserve
        self.writer = writer
        self.log_dir = os.path.join(base_path, "log")
        self.tmp_dir = os.path.join(base_path, "tmp")
        self.healthy = True
        self.index: dict[str, Location] = {}  # every queued message of this spool
        self._room_checked = 0.0
        self._has_room = True
        self._pending: list[tuple[MessageWriter, AsyncResult]] = []
        self._wakeup = Event()
        self._committer: gevent.Greenlet | None = None
        self._busy = False  # a batch is being written and synced
        self._seg_fd = -1
        self._seg_path = ""
        self._seg_size = 0
        self._seg_seq = 0

    # -- setup -----------------------------------------------------------------

    def open(self) -> None:
        """Create or check the layout, find every queued message, start the committer.

        Raises OSError. Reads record headers only, never message bodies.
        """
        for path in (self.base_path, self.log_dir, self.tmp_dir):
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        os.chmod(self.base_path, DIR_MODE)
        for writer, seq, path in list_segments(self.log_dir):
            if writer == self.writer:
                self._seg_seq = max(self._seg_seq, seq)
            for loc in iter_records(path):
                if loc.kind == MESSAGE:
                    self.index[loc.msg_id] = loc
        self._committer = gevent.spawn(self._run_committer)

    def close(self) -> None:
        """Stop the committer once the commits already waiting are durable."""
        if self._committer is not None:
            while self._pending or self._busy:
                gevent.sleep(0.01)
            self._committer.kill()
            self._committer = None
        if self._seg_fd >= 0:
            os.close(self._seg_fd)
            self._seg_fd = -1

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

    def scan(self) -> list[str]:
        """Ids of every queued message, oldest first."""
        return sorted(self.index)

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
        """Append the message and make it durable; returns only when it is. Raises SpoolError."""
        if not self.healthy or self._committer is None:
            writer.abort()
            raise SpoolError("spool is unhealthy")
        entry = (writer, AsyncResult())
        self._pending.append(entry)
        self._wakeup.set()
        try:
            entry[1].get()
        except BaseException:
            # Killed while waiting (shutdown): if the committer has not taken the
            # message yet, withdraw it; otherwise the committer owns the writer
            # until its batch is done and cleans up after it.
            if entry in self._pending:
                self._pending.remove(entry)
                writer.abort()
            raise

    def _run_committer(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            if not batch:
                continue
            self._busy = True
            try:
                writers = [w for w, _ in batch]
                if self.fsync or any(w.spill_fd >= 0 for w in writers):
                    locations = offload.run(self._append_batch, writers)
                else:  # a few small writes to the page cache: cheaper than a thread hop
                    locations = self._append_batch(writers)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                if isinstance(exc, SyncFailed):
                    log.error("spool sync failed, refusing new mail until restart: %s", exc)
                    self.healthy = False
                else:
                    log.error("spool write failed for %d messages: %s", len(batch), exc)
                for _, result in batch:
                    result.set_exception(SpoolError(str(exc)))
                continue
            finally:
                self._busy = False
                for writer, _ in batch:
                    writer.abort()  # frees memory and the spill file; the record is in the log
            for (writer, result), loc in zip(batch, locations):
                self.index[writer.msg_id] = loc
                result.set(None)

    def _new_segment(self) -> None:
        if self._seg_fd >= 0:
            os.close(self._seg_fd)
        self._seg_seq += 1
        self._seg_path = os.path.join(self.log_dir, f"{self.writer}-{self._seg_seq:016x}.seg")
        self._seg_fd = os.open(
            self._seg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
        )
        self._seg_size = 0
        if self.fsync:
            _fsync_dir(self.log_dir)  # the new name must survive a crash too

    def _append_batch(self, writers: list[MessageWriter]) -> list[Location]:
        """In a native thread: append every record, then one fdatasync for all of them.

        A failed write is undone (the segment is cut back to where the batch
        began, so no torn record sits before later ones) and fails this batch
        only; a failed sync raises SyncFailed and the spool stops accepting.
        """
        if self._seg_fd < 0 or self._seg_size >= SEGMENT_MAX:
            self._new_segment()
        start = self._seg_size
        try:
            locations = self._write_records(writers)
        except OSError:
            try:
                os.ftruncate(self._seg_fd, start)
                os.lseek(self._seg_fd, start, os.SEEK_SET)
            except OSError as exc:
                raise SyncFailed(f"cannot undo a failed append: {exc}") from exc
            self._seg_size = start
            raise
        if self.fsync:
            try:
                os.fdatasync(self._seg_fd)
            except OSError as exc:
                raise SyncFailed(str(exc)) from exc
        return locations

    def _write_records(self, writers: list[MessageWriter]) -> list[Location]:
        locations = []
        small: list[bytes] = []
        offset = self._seg_size
        for w in writers:
            head = w.record_head()
            crc = struct.unpack_from("<I", head, HEADER.size - 4)[0]
            loc = Location(self._seg_path, offset, MESSAGE, w.msg_id, len(w.meta), w.size, crc)
            locations.append(loc)
            offset = loc.end
            if w.spill_fd < 0:
                small += (head, w.body_in_memory())
                continue
            _write_all(self._seg_fd, b"".join(small) + head)
            small.clear()
            copied = 0
            while copied < w.size:
                n = os.copy_file_range(w.spill_fd, self._seg_fd, w.size - copied, copied)
                if n <= 0:
                    raise OSError(f"short copy of {w.msg_id}")
                copied += n
        if small:
            _write_all(self._seg_fd, b"".join(small))
        self._seg_size = offset
        return locations

    # -- reading ---------------------------------------------------------------

    def read(self, msg_id: str) -> tuple[Envelope, bytes]:
        """Envelope and message bytes, after the checksum. Raises KeyError, DamagedMessage."""
        meta, body = read_payload(self.index[msg_id])
        return Envelope.from_json(meta), body

    def read_envelope(self, msg_id: str) -> Envelope:
        return self.read(msg_id)[0]
