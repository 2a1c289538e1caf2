"""The durable queue on disk: an append-only log of checksummed records, group-committed.

Layout under `base_path` (directories 0700, files 0600):

    log/<writer>-<seq>.seg   append-only segments; a writer (one per worker) appends
                             only to its newest segment and never touches the others
    log/<writer>.lock        a worker holds an exclusive flock on it for every writer
                             it owns: its own, and those of dead workers it adopted
    tmp/<writer>.<id>.part   a big message being received (spilled from memory);
                             junk once its writer has no live owner: the next owner
                             (or adopter) removes it
    quarantine/<id>.rec      a record that failed its checksum, with <id>.reason

A segment is a sequence of records. Each record is a fixed header followed by
a payload of `meta` (JSON) and `body` bytes:

    magic "HWR1" | type u8 | flags u8 | reserved u16 | msg_id 26 ASCII bytes
    | meta_len u32 | body_len u64 | header_crc u32 | payload_crc u32   (little-endian)

`header_crc` (CRC-32 of the 46 bytes before it) makes the lengths trustworthy,
so a scan can hop from header to header without reading bodies;
`payload_crc` covers meta and body and is checked whenever a body is read.
A torn record (a crash in the middle of an append) fails its header check or
runs past the end of the file, and the scan of that segment stops there; such
a record was never acknowledged. A header damaged in the middle of a segment
costs only its own record: the scan resumes at the next whole record and the
skipped bytes go to quarantine/ (iter_records, _keep_damage).

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

Compaction (SPEC §4: disk use follows the live backlog, not history): a
segment goes once nothing in it is queued, so one message deferred for hours
would keep its whole segment. compact() copies the queued records of a mostly
dead segment of the worker's own writer, verbatim (a header names no place),
to the end of the current segment, with their state lines in its journal,
through the committer like any append; the entries then point at the copies
and the old segment goes. So a message may have an older, shadowed copy in
an older segment of its writer (never another writer's): recovery takes the
newest copy whose payload checksum holds (drop_torn_copies), counts a done
line in any of the writer's journals, and takes the highest-versioned state
line in any of them (latest_states). A segment holding newer copies is
deleted only after the segments with the older ones.

Ownership (several workers, SPEC §9): each worker process owns a set of
writers, proven by holding the flock on `log/<writer>.lock`, and with them
every message in their segments: only the owner journals, delivers or
reclaims them. At open a worker takes the lowest free writer name (`w0`,
`w1`, ...) and loads its segments; `adopt_orphans()` then takes any writer
whose lock nobody holds (its worker died, or finished after a reload) and
loads those segments too. The kernel drops a dead process's flocks, so a
killed worker's messages are picked up by the next look of a live worker.

Must not: speak SMTP, build paths from client input (ids are ours), block
the hub on a write of many bytes or on a sync, or move a message to another
writer's segments.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

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
# Rotate after this many bytes. HEDWIG_TEST_SEGMENT_MAX is for tests only (an
# integration test makes segments small to watch compaction); never set it in production.
SEGMENT_MAX = max(int(os.environ.get("HEDWIG_TEST_SEGMENT_MAX") or 64 * 1024 * 1024), 16 * 1024)
# A segment of our own writer is compacted (its queued messages copied forward so
# it can go) once at least half of it, and at least this much, is dead.
COMPACT_MIN_DEAD = min(1024 * 1024, SEGMENT_MAX // 4)
COMPACT_BATCH = 4 * 1024 * 1024  # bytes copied per committer batch by compaction
SPILL_AT = 256 * 1024  # messages larger than this are received into tmp/
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_SEGMENT_NAME = re.compile(r"([a-z0-9]+)-([0-9a-f]{16})\.seg\Z")
_WRITER_NAME = re.compile(r"[a-z0-9]+")


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
    auth: str = ""  # the SMTP AUTH user of the submitting session, "" if none (never a password)

    def to_json(self) -> bytes:
        fields = {name: getattr(self, name) for name in self.__slots__}
        if not self.auth:
            del fields["auth"]  # as before it existed: an older Hedwig can still read the record
        return json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        """A record's envelope; fields added since it was written take their defaults,
        fields a newer Hedwig added are ignored (a rollback keeps its queue)."""
        fields = {k: v for k, v in json.loads(data).items() if k in cls.__slots__}
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


_FROM_CROCKFORD = bytes.maketrans(_CROCKFORD.encode("ascii"), b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567")


def id_time(msg_id: str) -> float:
    """When the message was received, read back from its id (epoch seconds)."""
    raw = base64.b32decode(msg_id.encode("ascii").translate(_FROM_CROCKFORD) + b"======")
    return int.from_bytes(raw[:6], "big") / 1000


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _CROCKFORD for c in text)


def pack_header(kind: int, msg_id: str, meta_len: int, body_len: int, payload_crc: int) -> bytes:
    head = struct.pack("<4sBBH26sIQ", MAGIC, kind, 0, 0, msg_id.encode("ascii"), meta_len, body_len)
    return head + struct.pack("<II", zlib.crc32(head), payload_crc)


def iter_records(path: str, on_damage: Callable[[int, int], None] | None = None) -> Iterator[Location]:
    """Every intact record header of one segment, in order.

    Reads headers only (one pread each), never payloads, while the records
    chain. A header with a good CRC whose record runs past the end of the file
    is a torn tail (a crash mid-append; never acknowledged): the scan ends.
    A header that fails its magic or CRC is either a torn tail too or damage in
    the middle (a flipped bit): the scan looks for the next offset holding a
    whole record whose header *and* payload check out, and goes on from there
    after telling `on_damage(start, end)` about the bytes it skipped; if there
    is none, that was the tail. Safe on a segment a running server appends to.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        offset = 0
        while offset + HEADER.size <= size:
            loc = _header_at(fd, path, offset)
            if loc is not None and loc.end <= size:
                yield loc
                offset = loc.end
                continue
            resume = None if loc is not None else _resync(fd, path, offset + 1, size)
            if resume is None:
                break
            log.error("segment %s: %d damaged bytes at offset %d skipped; the records after them are read",
                      os.path.basename(path), resume - offset, offset)
            if on_damage is not None:
                on_damage(offset, resume)
            offset = resume
        if offset != size:
            log.info("segment %s: %d bytes after offset %d are torn; ignored",
                     os.path.basename(path), size - offset, offset)
    finally:
        os.close(fd)


def _header_at(fd: int, path: str, offset: int) -> Location | None:
    """The record whose header at `offset` passes its magic and CRC, or None."""
    raw = os.pread(fd, HEADER.size, offset)
    if len(raw) < HEADER.size:
        return None
    magic, kind, _flags, _res, raw_id, meta_len, body_len, header_crc, payload_crc = HEADER.unpack(raw)
    if magic != MAGIC or zlib.crc32(raw[:HEADER_CRC_SPAN]) != header_crc:
        return None
    return Location(path, offset, kind, raw_id.decode("ascii", "replace"), meta_len, body_len, payload_crc)


RESYNC_CHUNK = 1 << 20


def _resync(fd: int, path: str, start: int, size: int) -> int | None:
    """The first offset >= start of a whole record (header and payload check out), or None.

    Only after a header that failed its CRC: a record's claimed span is never
    searched (its body may hold anything, records included).
    """
    pos = start
    while pos + HEADER.size <= size:
        chunk = os.pread(fd, RESYNC_CHUNK + len(MAGIC) - 1, pos)
        at = chunk.find(MAGIC)
        while at >= 0:
            loc = _header_at(fd, path, pos + at)
            if loc is not None and loc.end <= size and _payload_ok(fd, loc):
                return loc.offset
            at = chunk.find(MAGIC, at + 1)
        pos += RESYNC_CHUNK
    return None


def _payload_ok(fd: int, loc: Location) -> bool:
    crc, pos, left = 0, loc.offset + HEADER.size, loc.meta_len + loc.body_len
    while left > 0:
        data = os.pread(fd, min(left, RESYNC_CHUNK), pos)
        if not data:
            return False
        crc = zlib.crc32(data, crc)
        pos += len(data)
        left -= len(data)
    return crc == loc.payload_crc


def read_payload(loc: Location) -> tuple[bytes, bytes]:
    """(meta, body) of a record, after its checksum. Raises DamagedMessage."""
    # os.pread rather than open(): no buffered file object, seek or fstat per delivery.
    size = loc.meta_len + loc.body_len
    fd = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        payload = os.pread(fd, size, loc.offset + HEADER.size)
        while 0 < len(payload) < size:
            more = os.pread(fd, size - len(payload), loc.offset + HEADER.size + len(payload))
            if not more:
                break
            payload += more
    finally:
        os.close(fd)
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


def writer_of(segment_path: str) -> str:
    """The writer name a segment belongs to ("w0" for log/w0-000...1.seg)."""
    m = _SEGMENT_NAME.match(os.path.basename(segment_path))
    if m is None:
        raise ValueError(f"not a segment: {segment_path}")
    return m.group(1)


def try_lock(path: str) -> int:
    """An fd holding an exclusive flock on `path` (created 0600), or -1 if another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return -1
        raise
    return fd


def _apply_state(entry: QueueEntry, state: dict) -> None:
    entry.attempts = int(state.get("attempts", 0))
    entry.due = float(state.get("due", 0.0))
    pending = state.get("pending")
    entry.pending = tuple(pending) if pending is not None else None
    entry.bounced = tuple(tuple(b) for b in state.get("bounced", ()))  # type: ignore[misc]
    entry.last_error = str(state.get("error", ""))
    entry.version = int(state.get("v", 0))


def latest_states(journals: list[dict[str, dict]]) -> dict[str, dict]:
    """Each message's state across one writer's journals (oldest segment first): the highest version.

    A state line is versioned (QueueEntry.version), so the latest one wins
    wherever it was written: beside the old copy after a move failed to
    become durable, or beside the new one. Lines older than versions count as
    version 0; among equal versions the newer journal's (the same state, copied).
    """
    best: dict[str, dict] = {}
    for states in journals:
        for msg_id, state in states.items():
            held = best.get(msg_id)
            if held is None or int(state.get("v", 0)) >= int(held.get("v", 0)):
                best[msg_id] = state
    return best


def drop_torn_copies(segments: list[tuple[str, list[Location]]]) -> list[Location]:
    """A message with copies in several segments (compaction): drop newer copies whose payload is not whole.

    After a power loss a moved copy's header may be on disk without all of its
    body: it must not shadow the whole copy it was made from (which would then
    be deleted). The newest copy that passes its checksum stands; the oldest
    is never dropped (delivery checks it, as for any message). Reads only
    messages with more than one copy, so a normal start reads no body.
    Returns the dropped copies.
    """
    dropped: list[Location] = []
    copies: dict[str, list[tuple[int, Location]]] = {}
    for i, (_path, locs) in enumerate(segments):
        for loc in locs:
            if loc.kind == MESSAGE:
                copies.setdefault(loc.msg_id, []).append((i, loc))
    for found in copies.values():
        for i, loc in reversed(found[1:]):
            try:
                fd = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    whole = _payload_ok(fd, loc)
                finally:
                    os.close(fd)
            except OSError:
                whole = False
            if whole:
                break
            log.warning("msg_id=%s: the copy in %s is not whole; an older copy stands",
                        loc.msg_id, os.path.basename(loc.path))
            segments[i][1].remove(loc)
            dropped.append(loc)
    return dropped


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
            self.spill_path = self.spool.tmp_path(self.msg_id + ".part")
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


def _batches(entries: list[QueueEntry], limit: int) -> Iterator[list[QueueEntry]]:
    """Consecutive runs of entries whose records add up to at most `limit` bytes (at least one each)."""
    chunk: list[QueueEntry] = []
    span = 0
    for entry in entries:
        size = entry.loc.end - entry.loc.offset
        if chunk and span + size > limit:
            yield chunk
            chunk, span = [], 0
        chunk.append(entry)
        span += size
    if chunk:
        yield chunk


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclass(slots=True)
class QueueEntry:
    """A queued message and its delivery state (the state lives in the segment's journal)."""

    msg_id: str
    loc: Location
    attempts: int = 0
    due: float = 0.0  # epoch seconds of the next attempt; 0 = now
    pending: tuple[str, ...] | None = None  # recipients still to deliver; None = all of them
    bounced: tuple[tuple[str, int, str], ...] = ()  # (recipient, code, text) refused so far
    last_error: str = ""
    domains: tuple[str, ...] = ()  # destination domains still pending, once known (not journalled)
    outcome: str = ""  # set by finish(): it is leaving the queue, compaction leaves it where it is
    version: int = 0  # of its journalled state: +1 per record_state(); the highest line wins at load

    def state_line(self) -> bytes:
        state = {"attempts": self.attempts, "due": self.due, "pending": self.pending,
                 "bounced": self.bounced, "error": self.last_error, "v": self.version}
        return _journal_line({"id": self.msg_id, "s": state})

    def stateful(self) -> bool:
        """Has it anything to journal? (A message never attempted has no state line.)"""
        return bool(self.attempts or self.due or self.pending is not None or self.bounced or self.last_error)


DONE_OUTCOMES = ("delivered", "bounced", "dropped", "expired", "deleted", "quarantined")


def _journal_line(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def journal_path(segment_path: str) -> str:
    return segment_path[: -len(".seg")] + ".state"


def load_journal(path: str, *, repair: bool = False) -> tuple[dict[str, dict], dict[str, str]]:
    """(latest state by id, outcome by id) from a segment's journal.

    A line torn by a crash is ignored; with `repair` it is cut off so that
    later appends start on a line of their own.
    """
    states: dict[str, dict] = {}
    done: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return states, done
    end = data.rfind(b"\n") + 1
    if end != len(data) and repair:
        with open(path, "r+b") as f:
            f.truncate(end)
    for line in data[:end].splitlines():
        try:
            entry = json.loads(line)
            msg_id = entry["id"]
        except (ValueError, KeyError, TypeError):
            log.warning("journal %s: unreadable line skipped", os.path.basename(path))
            continue
        if "done" in entry:
            done[msg_id] = entry["done"]
        elif "s" in entry:
            states[msg_id] = entry["s"]
    return states, done


@dataclass(slots=True)
class _Move:
    """A queued message for compaction to copy, with what the committer's thread may read of it."""

    entry: QueueEntry  # touched on the hub only
    loc: Location  # where it is now
    line: bytes  # its state line for the new journal, b"" if it has none


@dataclass(slots=True)
class _Job:
    """One thing for the committer: a message to append, a journal line to add, or messages to move."""

    result: AsyncResult
    writer: MessageWriter | None = None
    journal: str = ""  # journal path for `line`
    line: bytes = b""
    moves: list[_Move] | None = None
    moved: Event | None = None  # set once the moves are applied (or failed): see Spool._settle


class Spool:
    def __init__(self, base_path: str, *, fsync: bool = True, disk_reserve: int = 0) -> None:
        self.base_path = base_path
        self.fsync = fsync
        self.disk_reserve = disk_reserve
        self.writer = ""  # this process's own writer name, chosen at open()
        self.owned: dict[str, int] = {}  # writer -> fd of its held lock (own and adopted)
        self.log_dir = os.path.join(base_path, "log")
        self.tmp_dir = os.path.join(base_path, "tmp")
        self.bounced_dir = os.path.join(base_path, "bounced")
        self.quarantine_dir = os.path.join(base_path, "quarantine")
        self.healthy = True
        self.entries: dict[str, QueueEntry] = {}  # every queued message of this spool
        self._live: dict[str, int] = {}  # segment path -> queued messages in it
        self._room_checked = 0.0
        self._has_room = True
        self._pending: list[_Job] = []
        self._wakeup = Event()
        self._committer: gevent.Greenlet | None = None
        self._busy = False  # a batch is being written and synced
        self._seg_fd = -1
        self._seg_path = ""
        self._seg_size = 0
        self._seg_seq = 0
        self._journal_fds: dict[str, int] = {}
        self._reclaim: list[str] = []  # segments with nothing queued, to delete
        self._retired: list[str] = []  # segments the writer moved on from (set in the thread)
        self._live_bytes: dict[str, int] = {}  # segment path -> bytes of its queued records
        # Compaction (see compact()): a segment holding a message's newer copy -> the
        # older segments still holding older copies; it is deleted only after them.
        self._shadows: dict[str, set[str]] = {}
        self._blocked: set[str] = set()  # idle segments waiting for their shadows to go
        self._moving: dict[str, Event] = {}  # msg_id -> set when its move is applied or failed
        self._compacted: set[str] = set()  # segments compaction is done with (what stays is unmovable)
        self._keep_segments = False  # a move's sync failed: delete nothing until restart

    # -- setup -----------------------------------------------------------------

    def open(self) -> None:
        """Create or check the layout, take a writer, find its queued messages, start the committer.

        Raises OSError. Reads record headers and journals only, never message bodies.
        Writers left by dead workers are not loaded here: see adopt_orphans().
        """
        for path in (self.base_path, self.log_dir, self.tmp_dir, self.bounced_dir, self.quarantine_dir):
            os.makedirs(path, mode=DIR_MODE, exist_ok=True)
        os.chmod(self.base_path, DIR_MODE)
        for i in range(10_000):
            fd = try_lock(os.path.join(self.log_dir, f"w{i}.lock"))
            if fd >= 0:
                self.writer = f"w{i}"
                self.owned[self.writer] = fd
                break
        else:
            raise OSError(errno.EBUSY, "every writer name is taken")
        self._load(self.writer)
        self._committer = gevent.spawn(self._run_committer)
        if self._reclaim:
            self._wakeup.set()

    def adopt_orphans(self) -> list[QueueEntry]:
        """Take every writer with segments that no live process owns; returns their queued messages.

        A worker calls this at start and then every second or so. Adopted
        writers whose segments are all gone are let go again, so their names
        are free for new workers and the number of lock files stays bounded.
        Never reads bodies.
        """
        on_disk = {w for w, _seq, _path in list_segments(self.log_dir)}
        for writer in [w for w in self.owned if w != self.writer and w not in on_disk]:
            os.close(self.owned.pop(writer))
        found: list[QueueEntry] = []
        for writer in sorted(on_disk - set(self.owned)):
            fd = try_lock(os.path.join(self.log_dir, f"{writer}.lock"))
            if fd < 0:
                continue
            self.owned[writer] = fd
            found += self._load(writer)
        if found:
            log.info("adopted %d queued messages from writers nobody owned", len(found))
        if self._reclaim:
            self._wakeup.set()
        return found

    def _load(self, writer: str) -> list[QueueEntry]:
        """Take in the segments of a writer this process now owns: their queued messages.

        The reading (journals, record headers, a damaged region's copy) runs in
        the threadpool: adopting a dead worker's backlog at run time must not
        stall the sessions on this hub. The entries are made here, on the hub.

        Compaction may have left a message in several of the writer's segments:
        its record is the copy in the newest one whose payload is whole
        (drop_torn_copies, in _read_writer); it is done if any journal says so;
        its state is the highest-versioned line in any journal (latest_states).
        Older copies are shadowed: they keep no segment alive, and a segment
        holding a newer copy is deleted only after the older ones are gone
        (else an older copy, with no done line beside it, would come back).
        """
        segments, torn = offload.run(self._read_writer, writer)
        done: dict[str, str] = {}
        newest: dict[str, tuple[int, Location]] = {}
        holders: dict[str, dict[str, None]] = {}  # msg_id -> segments holding a copy, oldest first
        for i, (seq, path, locs, _states, outcomes) in enumerate(segments):
            if writer == self.writer:
                self._seg_seq = max(self._seg_seq, seq)
            done.update(outcomes)
            for loc in locs:
                if loc.kind == MESSAGE:
                    newest[loc.msg_id] = (i, loc)
                    holders.setdefault(loc.msg_id, {})[path] = None
        for paths in holders.values():
            older = list(paths)
            for k in range(1, len(older)):
                self._shadows.setdefault(older[k], set()).update(older[:k])
        for loc in torn:
            # A torn copy outlives the whole one it failed to replace only if the
            # whole one's segment waits for it: else, once that segment goes (with
            # the message's done line), the torn copy would be its only copy at the
            # next start. Skipped if it would make two segments wait for each other.
            chosen = newest[loc.msg_id][1].path
            if chosen != loc.path and chosen not in self._shadows.get(loc.path, ()):
                self._shadows.setdefault(chosen, set()).add(loc.path)
        states = latest_states([journalled for _seq, _path, _locs, journalled, _done in segments])
        found = []
        for msg_id, (_i, loc) in newest.items():
            if msg_id in done or msg_id in self.entries:
                continue
            entry = QueueEntry(msg_id, loc)
            if states.get(msg_id):
                _apply_state(entry, states[msg_id])
            self.entries[msg_id] = entry
            self._count(loc, 1)
            found.append(entry)
        for _seq, path, _locs, _states, _done in segments:
            if path not in self._live:
                self._drop(path)
        return found

    def close(self) -> None:
        """Stop the committer once the jobs already waiting are durable."""
        if self._committer is not None:
            while self._pending or self._busy:
                gevent.sleep(0.01)
            self._committer.kill()
            self._committer = None
        for fd in [self._seg_fd, *self._journal_fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._seg_fd = -1
        self._journal_fds.clear()
        for fd in self.owned.values():  # last: our writers go to whoever looks next
            os.close(fd)
        self.owned.clear()

    def tmp_path(self, name: str) -> str:
        """A scratch file of this process's under tmp/ (its writer's name first)."""
        return os.path.join(self.tmp_dir, f"{self.writer}.{name}")

    def clean_tmp(self) -> int:
        """Remove files of receipts that never finished (never acknowledged) and other scratch.

        Only files of writers this process owns, and files that name no writer
        (left by older versions); another live worker's files are its own.
        """
        removed = 0
        for name in os.listdir(self.tmp_dir):
            writer, dot, rest = name.partition(".")
            if _WRITER_NAME.fullmatch(writer) and "." in rest and writer not in self.owned:
                continue
            try:
                os.unlink(os.path.join(self.tmp_dir, name))
                removed += 1
            except FileNotFoundError:
                pass
        return removed

    def scan(self) -> list[str]:
        """Ids of every queued message, oldest first."""
        return sorted(self.entries)

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
        self._submit(_Job(AsyncResult(), writer=writer))

    # -- delivery state ----------------------------------------------------------

    def record_state(self, entry: QueueEntry) -> None:
        """Durably note attempts, due time, pending recipients. Never touches the body."""
        self._settle(entry)
        entry.version += 1
        self._submit(_Job(AsyncResult(), journal=journal_path(entry.loc.path), line=entry.state_line()))

    def finish(self, entry: QueueEntry, outcome: str) -> None:
        """The message leaves the queue (delivered, bounced, ...); its segment may be reclaimed."""
        assert outcome in DONE_OUTCOMES
        entry.outcome = outcome  # from here on compaction does not move it
        line = _journal_line({"id": entry.msg_id, "done": outcome})
        try:
            self._settle(entry)
            self._submit(_Job(AsyncResult(), journal=journal_path(entry.loc.path), line=line))
        except BaseException:
            entry.outcome = ""  # still queued (the caller offers it again, or puts it back)
            raise
        if self.entries.pop(entry.msg_id, None) is not None:
            self._count(entry.loc, -1)

    def _settle(self, entry: QueueEntry) -> None:
        """A message compaction is moving: wait (one batch) until it is at its new place.

        Its journal lines then go to the journal beside its new copy, so the
        copy the recovery will pick always has them: no line can land in the
        old journal while the move is in flight and be lost with the old segment.
        """
        while (moving := self._moving.get(entry.msg_id)) is not None:
            moving.wait()

    def _count(self, loc: Location, n: int) -> None:
        """On the hub: `n` queued messages more (or fewer) in loc's segment; one left empty may go."""
        path = loc.path
        self._live_bytes[path] = self._live_bytes.get(path, 0) + n * (loc.end - loc.offset)
        live = self._live.get(path, 0) + n
        if live:
            self._live[path] = live
            return
        self._live.pop(path, None)
        self._live_bytes.pop(path, None)
        if path != self._seg_path:
            self._drop(path)

    def _drop(self, path: str) -> None:
        """On the hub: nothing in `path` is queued and nothing is appended to it: delete it.

        Not while an older segment still holds an older copy of one of its
        messages (compaction): that copy would be queued again at the next start,
        its done line gone with this segment. Then it waits for them (_gone).
        """
        if self._keep_segments:
            return
        if self._shadows.get(path):
            self._blocked.add(path)
            return
        self._shadows.pop(path, None)
        self._reclaim.append(path)
        self._wakeup.set()

    def _gone(self, deleted: list[str]) -> None:
        """On the hub: these segments are deleted; segments that waited for them may go now."""
        for path in deleted:
            for newer, older in list(self._shadows.items()):
                older.discard(path)
                if not older and newer in self._blocked:
                    self._blocked.discard(newer)
                    self._drop(newer)

    # -- compaction ---------------------------------------------------------------

    def compact(self) -> bool:
        """Copy the queued messages out of one mostly dead segment of our own writer, so it can go.

        SPEC §4, disk use follows the live backlog: one message deferred for
        hours would otherwise keep its whole segment. Picks the segment of
        `self.writer` (not the one being appended to; adopted writers' are
        left alone, so every copy of a message stays within one writer) with
        the most dead bytes, if at least half of it and COMPACT_MIN_DEAD are
        dead. Its queued records are copied byte for byte to the current
        segment through the committer (COMPACT_BATCH bytes a batch, synced with
        everything else), each with its state line in the new journal; then
        the entries point at the copies and the old segment goes like any
        other once nothing in it is queued. A record that fails its checksum
        stays where it is (delivery quarantines it). A crash at any moment is
        safe: recovery takes a message's newest whole copy, and a done line in any
        journal (see _load).

        Runs on the hub in a greenlet of its own and waits for the batches;
        returns whether a segment was compacted (the caller may call again).
        """
        if not self.healthy or self._committer is None or self._keep_segments or not self.has_room():
            # Copying first needs room (not at the disk reserve), and is pointless
            # while no segment may be deleted (until a restart).
            return False
        self._compacted &= self._live.keys()
        picked = self._pick_compaction()
        if picked is None:
            return False
        path, size = picked
        self._compacted.add(path)
        queued = sorted((e for e in self.entries.values() if e.loc.path == path), key=lambda e: e.loc.offset)
        moved = copied = 0
        for chunk in _batches(queued, COMPACT_BATCH):
            # Those finished (or finishing) meanwhile stay: their done line goes beside the old copy.
            moves = [_Move(e, e.loc, e.state_line() if e.stateful() else b"") for e in chunk
                     if self.entries.get(e.msg_id) is e and not e.outcome and e.loc.path == path]
            if not moves:
                continue
            if self._committer is None:  # closed meanwhile
                return False
            try:
                new = self._move(moves)
            except SpoolError as exc:
                self._compacted.discard(path)  # try again later
                log.warning("compaction of segment %s stopped: %s", os.path.basename(path), exc)
                return False
            moved += sum(1 for loc in new if loc is not None)
            copied += sum(loc.end - loc.offset for loc in new if loc is not None)
        freed = size - copied if path not in self._live else 0
        log.info("compacted segment %s: %d messages moved (%d bytes), %d bytes freed%s",
                 os.path.basename(path), moved, copied, freed,
                 "" if freed else "; it stays while damaged or finishing messages are in it")
        return True

    def _pick_compaction(self) -> tuple[str, int] | None:
        """(path, size) of our own segment with the most dead bytes, if worth compacting."""
        best: tuple[str, int] | None = None
        best_dead = 0
        prefix = os.path.join(self.log_dir, self.writer + "-")
        for path, live in self._live_bytes.items():
            if not path.startswith(prefix) or path == self._seg_path or path in self._compacted:
                continue
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            dead = size - live
            if dead >= COMPACT_MIN_DEAD and 2 * dead >= size and dead > best_dead:
                best, best_dead = (path, size), dead
        return best

    def _move(self, moves: list[_Move]) -> list[Location | None]:
        """One committer batch copies these records forward; the new places (None: not moved)."""
        moved = Event()
        for move in moves:
            self._moving[move.entry.msg_id] = moved
        return cast("list[Location | None]", self._submit(_Job(AsyncResult(), moves=moves, moved=moved)))

    def _end_moves(self, job: _Job) -> None:
        """On the hub: the messages of this move job may be journalled again."""
        assert job.moves is not None and job.moved is not None
        for move in job.moves:
            if self._moving.get(move.entry.msg_id) is job.moved:
                del self._moving[move.entry.msg_id]
        job.moved.set()

    def _apply_moves(self, job: _Job, new: list[Location | None]) -> None:
        """On the hub, after the batch that made the copies durable: entries point at them."""
        assert job.moves is not None
        for move, loc in zip(job.moves, new):
            if loc is None:
                continue  # failed its checksum: left where it is
            self._shadows.setdefault(loc.path, set()).add(move.loc.path)
            entry = move.entry
            if self.entries.get(entry.msg_id) is entry and entry.loc == move.loc:
                entry.loc = loc
                self._count(loc, 1)
                self._count(move.loc, -1)
            elif entry.outcome:
                # Not expected (finish() waits for a move before it journals), but
                # should it happen the done line went to the old journal: say it
                # beside the new copy too, or that copy could outlive it.
                log.error("msg_id=%s finished while being moved; its done line is repeated", entry.msg_id)
                line = _journal_line({"id": entry.msg_id, "done": entry.outcome})
                self._pending.append(_Job(AsyncResult(), journal=journal_path(loc.path), line=line))
                self._wakeup.set()
        self._end_moves(job)

    def write_bounced(self, entry: QueueEntry, body: bytes, reasons: str) -> str:
        """Keep a bounced message as readable files: bounced/<hh>/<id>.eml and .reason."""
        return offload.run(self._write_bounced, entry.msg_id, body, reasons)

    def _write_bounced(self, msg_id: str, body: bytes, reasons: str) -> str:
        directory = os.path.join(self.bounced_dir, msg_id[-2:].lower())
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        for suffix, data in ((".eml", body), (".reason", reasons.encode("utf-8"))):
            self._write_file(os.path.join(directory, msg_id + suffix), data)
        if self.fsync:
            _fsync_dir(directory)
        return os.path.join(directory, msg_id + ".eml")

    def _write_file(self, path: str, data: bytes) -> None:
        """A whole file, 0600, synced when fsync is on: written under tmp/, then renamed in."""
        tmp = self.tmp_path(os.path.basename(path))
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)

    def quarantine(self, entry: QueueEntry, reason: str) -> str:
        """A record that fails its checksum: copy its bytes out for a human, then drop it.

        It can never be delivered as it is; keeping it in the queue would retry it
        forever and pin its segment.
        """
        self._settle(entry)
        path = offload.run(self._write_quarantine, entry.loc, reason)
        self.finish(entry, "quarantined")
        return path

    def _write_quarantine(self, loc: Location, reason: str) -> str:
        with open(loc.path, "rb") as f:
            f.seek(loc.offset)
            raw = f.read(loc.end - loc.offset)
        target = os.path.join(self.quarantine_dir, loc.msg_id + ".rec")
        for path, data in ((target, raw), (target[:-4] + ".reason", reason.encode("utf-8") + b"\n")):
            self._write_file(path, data)
        if self.fsync:
            _fsync_dir(self.quarantine_dir)
        return target

    def _read_writer(self, writer: str) -> tuple[list[tuple[int, str, list[Location], dict[str, dict],
                                                                  dict[str, str]]], list[Location]]:
        """In a native thread: (seq, path, record headers, states, outcomes) of each of `writer`'s
        segments, and the torn copies left out of them (drop_torn_copies)."""
        out = []
        for name, seq, path in list_segments(self.log_dir):
            if name == writer:
                states, done = load_journal(journal_path(path), repair=True)
                damage = lambda start, end, path=path: self._keep_damage(path, start, end)  # noqa: E731
                out.append((seq, path, list(iter_records(path, on_damage=damage)), states, done))
        torn = drop_torn_copies([(path, locs) for _seq, path, locs, _states, _done in out])
        return out, torn

    def _keep_damage(self, segment: str, start: int, end: int) -> None:
        """Bytes the scan skipped in the middle of a segment: a copy for a human, before the segment can go.

        Named after the message if its id can still be read (its envelope
        follows the header), else after the segment and offset. Written once:
        a later start finds the copy there already.
        """
        with open(segment, "rb") as f:
            f.seek(start)
            raw = f.read(end - start)
        m = re.search(rb'"msg_id":"([0-9A-Z]{26})"', raw[:4096])
        name = m.group(1).decode() if m and is_id(m.group(1).decode()) else \
            f"{os.path.basename(segment)[:-4]}-{start:x}"
        target = os.path.join(self.quarantine_dir, name + ".rec")
        if os.path.exists(target):
            return
        reason = (f"damaged record header in {os.path.basename(segment)} at offset {start}: "
                  f"{end - start} bytes skipped by the scan, kept here as found\n")
        for path, data in ((target, raw), (target[:-4] + ".reason", reason.encode())):
            self._write_file(path, data)
        if self.fsync:
            _fsync_dir(self.quarantine_dir)
        log.error("segment %s: damaged bytes at offset %d quarantined as %s",
                  os.path.basename(segment), start, target)

    def remove_bounced_older_than(self, cutoff: float) -> int:
        """Cleanup: delete kept bounces whose files are older than `cutoff` (epoch seconds)."""
        removed = 0
        for sub in os.listdir(self.bounced_dir):
            directory = os.path.join(self.bounced_dir, sub)
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                try:
                    if os.stat(path).st_mtime < cutoff:
                        os.unlink(path)
                        removed += 1
                except FileNotFoundError:
                    pass
        return removed

    # -- the committer -------------------------------------------------------------

    def _submit(self, job: _Job) -> object:
        """Hand a job to the committer and wait until it is durable; its result (see _write_batch)."""
        self._pending.append(job)
        self._wakeup.set()
        try:
            return job.result.get()
        except BaseException:
            # Killed while waiting (shutdown): if the committer has not taken the
            # job yet, withdraw it; otherwise the committer owns the writer
            # until its batch is done and cleans up after it.
            if job in self._pending:
                self._pending.remove(job)
                if job.writer is not None:
                    job.writer.abort()
                if job.moves is not None:
                    self._end_moves(job)
            raise

    def _run_committer(self) -> None:
        while True:
            self._wakeup.wait()
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            reclaim, self._reclaim = self._reclaim, []
            if not batch and not reclaim:
                continue
            self._busy = True
            try:
                big = any(j.moves or (j.writer is not None and j.writer.spill_fd >= 0) for j in batch)
                if self.fsync or big or reclaim:
                    results, deleted = offload.run(self._write_batch, batch, reclaim)
                else:  # a few small writes to the page cache: cheaper than a thread hop
                    results, deleted = self._write_batch(batch, reclaim)
            except Exception as exc:  # noqa: BLE001 - every waiter must hear of it
                if isinstance(exc, SyncFailed):
                    log.error("spool sync failed, refusing new mail until restart: %s", exc)
                    self.healthy = False
                    if any(j.moves for j in batch):
                        # Copies the hub knows nothing of may be on disk; deleting an
                        # old segment could leave one without its done line. Recovery
                        # at the next start sorts them out (newest whole copy, any done
                        # line, the highest-versioned state).
                        self._keep_segments = True
                else:
                    log.error("spool write failed for %d jobs: %s", len(batch), exc)
                for job in batch:
                    if job.moves is not None:
                        self._end_moves(job)
                    job.result.set_exception(SpoolError(str(exc)))
                self._reclaim[:0] = reclaim  # not deleted yet: the next batch tries again
                continue
            finally:
                self._busy = False
                for job in batch:
                    if job.writer is not None:
                        job.writer.abort()  # frees memory and the spill file; the record is in the log
            for job, result in zip(batch, results):
                if job.writer is not None and isinstance(result, Location):
                    self.entries[job.writer.msg_id] = QueueEntry(job.writer.msg_id, result)
                    self._count(result, 1)
                elif job.moves is not None and isinstance(result, list):
                    self._apply_moves(job, result)
                job.result.set(result)
            self._reclaim[:0] = [path for path in reclaim if path not in deleted]
            self._gone(deleted)
            self._reclaim_retired()

    def _reclaim_retired(self) -> None:
        """On the hub: a segment the writer left behind goes once nothing in it is queued.

        `finish()` handles segments that empty later; this catches one that was
        already empty when the writer moved on. Both run on the hub, so `_live`
        and `_reclaim` are only ever touched from there.
        """
        retired, self._retired = self._retired, []
        for path in retired:
            if self._live.get(path, 0) == 0:
                self._live.pop(path, None)
                self._drop(path)

    def _new_segment(self) -> None:
        if self._seg_fd >= 0:
            os.close(self._seg_fd)
            # Runs in the committer's thread: the hub decides about reclaiming it.
            self._retired.append(self._seg_path)
        self._seg_seq += 1
        self._seg_path = os.path.join(self.log_dir, f"{self.writer}-{self._seg_seq:016x}.seg")
        self._seg_fd = os.open(
            self._seg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE
        )
        self._seg_size = 0
        if self.fsync:
            _fsync_dir(self.log_dir)  # the new name must survive a crash too

    def _journal_fd(self, path: str) -> int:
        fd = self._journal_fds.get(path)
        if fd is None:
            created = not os.path.exists(path)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, FILE_MODE)
            self._journal_fds[path] = fd
            if created and self.fsync:
                _fsync_dir(self.log_dir)  # its lines (done marks) must not vanish with its name
        return fd

    def _write_batch(self, batch: list[_Job], reclaim: list[str]) -> tuple[list[object], list[str]]:
        """In a native thread: append records, moved copies and journal lines, then one sync per file.

        Returns each job's result (a commit: its Location; a move job: the new
        Location of each record, None for one left behind; else None) and the
        segments of `reclaim` it deleted, after the sync.

        A failed append (e.g. ENOSPC) is undone: the segment is cut back to where
        the batch began, so no torn record sits before later ones, and every
        journal the batch touched is cut back to its size before it, so no torn
        line swallows the next one appended (nor a line the batch's callers
        were told failed stays). It fails this batch only; a failed sync, or an
        undo that fails, raises SyncFailed and the spool stops accepting.
        """
        writers = [j.writer for j in batch if j.writer is not None]
        movers = [j for j in batch if j.moves is not None]
        records: list[Location] = []
        moved: list[list[Location | None]] = []
        appending = bool(writers or movers)
        if appending and (self._seg_fd < 0 or self._seg_size >= SEGMENT_MAX):
            self._new_segment()
        start = self._seg_size
        lines: dict[str, list[bytes]] = {}
        for job in batch:
            if job.line:
                lines.setdefault(job.journal, []).append(job.line)
        sizes: dict[int, int] = {}  # journal fd -> its size before this batch
        try:
            if writers:
                records = self._write_records(writers)
            for job in movers:
                assert job.moves is not None
                moved.append(self._copy_records(job.moves))
                for move, loc in zip(job.moves, moved[-1]):
                    if loc is not None and move.line:
                        lines.setdefault(journal_path(loc.path), []).append(move.line)
            for path, chunk in lines.items():
                fd = self._journal_fd(path)
                sizes[fd] = os.fstat(fd).st_size
                _write_all(fd, b"".join(chunk))
        except OSError:
            try:
                if appending:
                    os.ftruncate(self._seg_fd, start)
                    os.lseek(self._seg_fd, start, os.SEEK_SET)
                    self._seg_size = start
                for fd, size in sizes.items():
                    os.ftruncate(fd, size)  # O_APPEND: the next line starts there
            except OSError as exc:
                raise SyncFailed(f"cannot undo a failed append: {exc}") from exc
            raise
        if self.fsync:
            try:
                if appending:
                    os.fdatasync(self._seg_fd)
                for path in lines:
                    os.fdatasync(self._journal_fds[path])
            except OSError as exc:
                raise SyncFailed(str(exc)) from exc
        deleted = []
        for path in reclaim:
            try:
                self._delete_segment(path)
                deleted.append(path)
            except OSError as exc:  # the records of this batch are durable: they must not fail
                log.error("cannot delete segment %s (tried again later): %s", os.path.basename(path), exc)
        if deleted and self.fsync:
            # Gone for good before a segment holding newer copies of their messages goes (_drop).
            try:
                _fsync_dir(self.log_dir)
            except OSError as exc:
                # The batch itself is durable: do not fail it. The deletions might not
                # outlast a power loss, so delete nothing more until a restart has
                # looked again (a segment with newer copies must never go first).
                self._keep_segments = True
                log.error("log directory sync failed after deleting segments; keeping all from now on: %s", exc)
        records_of, moved_of = iter(records), iter(moved)
        results: list[object] = []
        for job in batch:
            if job.writer is not None:
                results.append(next(records_of))
            else:
                results.append(next(moved_of) if job.moves is not None else None)
        return results, deleted

    def _copy_records(self, moves: list[_Move]) -> list[Location | None]:
        """In the thread: copy whole records (header and payload, verbatim) to the end of the segment.

        A header names no place, so the bytes are valid anywhere. A record whose
        payload fails its checksum, or cannot be read, is not copied (None).
        """
        out: list[Location | None] = []
        for move in moves:
            loc = move.loc
            try:
                src = os.open(loc.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                log.error("msg_id=%s not moved: %s", loc.msg_id, exc)
                out.append(None)
                continue
            try:
                try:
                    whole = _payload_ok(src, loc)
                except OSError as exc:
                    log.error("msg_id=%s not moved: %s", loc.msg_id, exc)
                    whole = False
                if not whole:
                    log.warning("msg_id=%s fails its checksum: not moved (delivery quarantines it)", loc.msg_id)
                    out.append(None)
                    continue
                size, copied = loc.end - loc.offset, 0
                while copied < size:
                    n = os.copy_file_range(src, self._seg_fd, size - copied, loc.offset + copied)
                    if n <= 0:
                        raise OSError(f"short copy of {loc.msg_id}")
                    copied += n
            finally:
                os.close(src)
            out.append(Location(self._seg_path, self._seg_size, loc.kind, loc.msg_id,
                                loc.meta_len, loc.body_len, loc.payload_crc))
            self._seg_size += size
        return out

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

    def _delete_segment(self, path: str) -> None:
        """Nothing in this segment is queued any more: its record and journal go."""
        journal = journal_path(path)
        fd = self._journal_fds.pop(journal, None)
        if fd is not None:
            os.close(fd)
        for victim in (path, journal):
            try:
                os.unlink(victim)
            except FileNotFoundError:
                pass

    # -- reading ---------------------------------------------------------------

    def read(self, msg_id: str) -> tuple[Envelope, bytes]:
        """Envelope and message bytes, after the checksum. Raises KeyError, DamagedMessage."""
        loc = self.entries[msg_id].loc
        try:
            meta, body = read_payload(loc)
        except FileNotFoundError:
            # Compaction moved it and its old segment went in between: read the copy.
            again = self.entries[msg_id].loc
            if again == loc:
                raise
            meta, body = read_payload(again)
        return Envelope.from_json(meta), body

    def read_envelope(self, msg_id: str) -> Envelope:
        return self.read(msg_id)[0]
