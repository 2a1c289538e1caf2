"""`hedwig queue list | show | stats | retry | delete`: the queue as an operator sees it.

Reading (list, show, stats) takes no lock and changes nothing, so it is safe
next to a running server: segments are read header by header (a record being
appended looks torn and is simply not there yet), journals up to their last
whole line (a line being written is not there yet), and a writer's journals
are read *before* its records, so a segment reclaimed meanwhile shows nothing
rather than mail that was long delivered. A message that compaction copied
forward is read as the server reads it: its newest copy, done if any of its
writer's journals says so. Message bodies are never read, except by `show`
to check the record's checksum and print its header section.

States, as far as the disk tells them:

    queued        in a segment, no done line, never attempted (a wait for a
                  rate-limit token is not an attempt)
    deferred      in a segment, no done line, attempted at least once
    bounced       kept under bounced/<hh>/<id>.eml with <id>.reason
    quarantined   a damaged record copied to quarantine/<id>.rec with <id>.reason

"Being delivered right now" lives only in the server's memory and is not shown.

Changing (retry, delete) goes through control.request(): the running server
applies it, or, when no server runs, this module appends the journal line
itself while holding the spool lock (`delete_offline`, `retry_offline`).

Must not: print message bodies, or write anything outside ctl/ and the
journals (and those only under the lock).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from . import control
from .spool import (
    HEADER,
    MESSAGE,
    DamagedMessage,
    Envelope,
    Location,
    id_time,
    is_id,
    iter_records,
    journal_path,
    list_segments,
    drop_torn_copies,
    latest_states,
    load_journal,
    read_payload,
    writer_of,
)

STATES = ("queued", "deferred", "bounced", "quarantined")
HEADERS_SHOWN = 64 * 1024  # bytes of a header section `show` prints at most


class QueueToolError(Exception):
    """A user error: one line, exit 2."""


@dataclass(slots=True)
class Message:
    """One message as the spool's files describe it."""

    msg_id: str
    state: str
    attempts: int | None = None  # None: not known from disk (bounced, quarantined)
    recipients: tuple[str, ...] = ()  # still to deliver; for a bounce, the refused ones
    next_attempt: float | None = None  # epoch; None: never again
    last_error: str = ""
    sender: str | None = None
    size: int | None = None
    bounced: tuple[tuple[str, Any, str], ...] = ()  # (recipient, code, text) refused so far
    envelope: Envelope | None = None
    loc: Location | None = None  # queued and deferred: where the record is
    state_line: dict[str, Any] | None = None  # latest journalled state
    files: tuple[str, ...] = ()  # bounced and quarantined: the kept files
    reason: str = ""  # bounced and quarantined: the .reason text

    @property
    def received(self) -> float:
        return id_time(self.msg_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.msg_id,
            "state": self.state,
            "attempts": self.attempts,
            "recipients": list(self.recipients),
            "next_attempt": _iso(self.next_attempt),
            "last_error": self.last_error,
            "sender": self.sender,
            "received": _iso(self.received),
            "size": self.size,
        }


# -- reading -------------------------------------------------------------------------------


def _spool_dirs(base_path: str) -> tuple[str, str, str]:
    return (os.path.join(base_path, "log"), os.path.join(base_path, "bounced"),
            os.path.join(base_path, "quarantine"))


def read_queue(base_path: str, *, details: bool = True, only: str | None = None) -> list[Message]:
    """Every message the spool holds (or just `only`), oldest first.

    Without `details`, envelopes and .reason files are not read (enough to count states).
    """
    log_dir, bounced_dir, quarantine_dir = _spool_dirs(base_path)
    found: dict[str, Message] = {}
    writers: dict[str, list[str]] = {}
    for writer, _seq, path in list_segments(log_dir):
        writers.setdefault(writer, []).append(path)
    for paths in writers.values():
        for msg in _read_writer(paths, details, only):
            found.setdefault(msg.msg_id, msg)  # as the server's recovery: the first writer's wins
    # A bounce is kept before its done line is written: the files win.
    for msg in _read_kept(bounced_dir, "bounced", (".eml", ".reason"), details, only):
        found[msg.msg_id] = msg
    for msg in _read_kept(quarantine_dir, "quarantined", (".rec", ".reason"), details, only):
        found[msg.msg_id] = msg
    return [found[k] for k in sorted(found)]


def find(base_path: str, msg_id: str) -> Message | None:
    found = read_queue(base_path, only=msg_id)
    return found[0] if found else None


def _read_writer(paths: list[str], details: bool, only: str | None) -> Iterator[Message]:
    """The queued messages of one writer's segments (`paths`, oldest first), by the server's rules.

    Compaction may have left older copies of a message in older segments: the
    newest whole copy is the message, a done line in any journal ends it, and
    its state is the highest-versioned line in any journal (spool.Spool._load).
    """
    # Every journal first: if a segment is reclaimed between the two reads, its
    # records are gone too, rather than showing as queued with no done lines.
    journals = [load_journal(journal_path(path)) for path in paths]
    done = {msg_id: outcome for _states, outcomes in journals for msg_id, outcome in outcomes.items()}
    states = latest_states([journalled for journalled, _done in journals])
    segments = [(path, [loc for loc in iter_records(path)  # a segment gone meanwhile yields nothing
                        if loc.kind == MESSAGE and (only is None or loc.msg_id == only)]) for path in paths]
    drop_torn_copies(segments)
    newest = {loc.msg_id: loc for _path, locs in segments for loc in locs}  # oldest first: the last wins
    queued: dict[str, list[Location]] = {}  # segment -> its queued copies, so each is opened once
    for msg_id, loc in newest.items():
        if msg_id not in done:
            queued.setdefault(loc.path, []).append(loc)
    for path, locs in queued.items():
        fd = -1
        if details:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                pass  # reclaimed since the scan: shown without its envelope
        try:
            for loc in locs:
                yield _queued(loc, states.get(loc.msg_id), _read_envelope(fd, loc) if fd >= 0 else None)
        finally:
            if fd >= 0:
                os.close(fd)


def _read_envelope(fd: int, loc: Location) -> Envelope | None:
    """The record's JSON envelope, without reading (or checksumming) the body."""
    try:
        meta = os.pread(fd, loc.meta_len, loc.offset + HEADER.size)
        return Envelope.from_json(meta)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _queued(loc: Location, state: dict[str, Any] | None, env: Envelope | None) -> Message:
    state = state or {}
    attempts = int(state.get("attempts", 0))
    pending = state.get("pending")
    if pending is not None:
        recipients = tuple(pending)
    else:
        recipients = env.recipients if env is not None else ()
    due = float(state.get("due", 0.0))
    return Message(
        msg_id=loc.msg_id,
        state="deferred" if attempts > 0 else "queued",
        attempts=attempts,
        recipients=recipients,
        next_attempt=max(due, id_time(loc.msg_id)),
        last_error=str(state.get("error", "")),
        sender=env.sender if env is not None else None,
        size=loc.body_len,
        bounced=tuple(tuple(b) for b in state.get("bounced", ())),  # type: ignore[misc]
        envelope=env,
        loc=loc,
        state_line=state or None,
    )


def _read_kept(directory: str, state: str, suffixes: tuple[str, str], details: bool,
               only: str | None) -> Iterator[Message]:
    """bounced/<hh>/<id>.* or quarantine/<id>.*: one Message per id."""
    files: dict[str, list[str]] = {}
    for here, _dirs, names in os.walk(directory):
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if dot and "." + suffix in suffixes and is_id(stem) and (only is None or stem == only):
                files.setdefault(stem, []).append(os.path.join(here, name))
    for msg_id, paths in files.items():
        msg = Message(msg_id, state, files=tuple(sorted(paths)))
        data_path = next((p for p in paths if p.endswith(suffixes[0])), None)
        reason_path = next((p for p in paths if p.endswith(".reason")), None)
        if data_path is not None:
            try:
                msg.size = os.stat(data_path).st_size
            except FileNotFoundError:  # removed by cleanup meanwhile
                pass
        if details and reason_path is not None:
            msg.reason = _read_text(reason_path)
            if state == "bounced":
                _parse_bounce_report(msg)
            else:
                msg.last_error = msg.reason.strip().splitlines()[0] if msg.reason.strip() else ""
        if details and state == "quarantined" and data_path is not None:
            _parse_quarantined(msg, data_path)
        yield msg


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _parse_bounce_report(msg: Message) -> None:
    """The report delivery.bounce_report() writes: "Sender: <s>" and "<rcpt>: code text" lines."""
    rcpts = []
    for line in msg.reason.splitlines():
        if line.startswith("Sender: <") and line.endswith(">"):
            msg.sender = line[len("Sender: <"):-1]
        elif line.startswith("<") and ">: " in line:
            rcpt, text = line[1:].split(">: ", 1)
            rcpts.append(rcpt)
            if not msg.last_error:
                msg.last_error = text.strip()
    msg.recipients = tuple(rcpts)


def _parse_quarantined(msg: Message, path: str) -> None:
    """A damaged record: its header may still name the envelope; best effort."""
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER.size)
            magic, _kind, _fl, _res, _id, meta_len, _body_len, _hcrc, _pcrc = HEADER.unpack(head)
            if magic == b"HWR1" and meta_len < (1 << 20):
                env = Envelope.from_json(f.read(meta_len))
                msg.envelope, msg.sender, msg.recipients = env, env.sender, env.recipients
    except Exception:  # noqa: BLE001 - it is damaged; whatever can be read is a bonus
        pass


def count_states(messages: Iterable[Message]) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    for msg in messages:
        counts[msg.state] = counts.get(msg.state, 0) + 1
    return counts


def header_section(message: bytes) -> tuple[bytes, int]:
    """(the header section, bytes of it not shown): everything before the first empty line."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    return head[:HEADERS_SHOWN], max(len(head) - HEADERS_SHOWN, 0)


# -- changing, with no server running (the caller holds the spool lock) ----------------------------


def _append_lines(base_path: str, lines: dict[str, list[dict[str, Any]]], fsync: bool) -> None:
    """Append whole JSON lines to journals, after cutting a torn last line (as recovery does)."""
    for path, objs in lines.items():
        load_journal(path, repair=True)
        data = b"".join(json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
                        for o in objs)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            control._own_like(fd, base_path)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)


def _not_queued(base_path: str, msg_id: str) -> control.Answer:
    return {"ok": False, "status": "not-queued", "message": not_queued_reason(base_path, msg_id)}


def not_queued_reason(base_path: str, msg_id: str) -> str:
    """Why an id is not in the queue, as far as the files tell."""
    _log, bounced_dir, quarantine_dir = _spool_dirs(base_path)
    if os.path.exists(os.path.join(bounced_dir, msg_id[-2:].lower(), msg_id + ".reason")):
        return "not in the queue (bounced already)"
    if os.path.exists(os.path.join(quarantine_dir, msg_id + ".reason")):
        return "not in the queue (quarantined)"
    for _w, _s, path in list_segments(os.path.join(base_path, "log")):
        outcome = load_journal(journal_path(path))[1].get(msg_id)
        if outcome:
            return f"not in the queue ({outcome} already)"
    return "not in the queue"


def delete_offline(base_path: str, msg_id: str, fsync: bool) -> control.Answer:
    msg = find(base_path, msg_id)
    if msg is None or msg.loc is None:
        return _not_queued(base_path, msg_id)
    _append_lines(base_path, {journal_path(msg.loc.path): [{"id": msg_id, "done": "deleted"}]}, fsync)
    return {"ok": True, "status": "deleted", "message": "deleted"}


def retry_offline(base_path: str, msg_id: str | None, fsync: bool) -> control.Answer:
    now = time.time()
    queued = [m for m in read_queue(base_path, details=False) if m.loc is not None]
    if msg_id is not None:
        queued = [m for m in queued if m.msg_id == msg_id]
        if not queued:
            return _not_queued(base_path, msg_id)
    lines: dict[str, list[dict[str, Any]]] = {}
    for msg in queued:
        if msg.state_line is None or float(msg.state_line.get("due", 0.0)) <= now:
            continue  # due already
        assert msg.loc is not None
        lines.setdefault(journal_path(msg.loc.path), []).append(
            # A new version: it must beat every line of the old state, wherever it is.
            {"id": msg.msg_id, "s": {**msg.state_line, "due": now, "v": int(msg.state_line.get("v", 0)) + 1}})
    _append_lines(base_path, lines, fsync)
    count = sum(len(v) for v in lines.values())
    if msg_id is None:
        return {"ok": True, "status": "due", "count": count, "message": control.made_due(count)}
    if count:
        return {"ok": True, "status": "due", "count": 1, "message": "due now"}
    return {"ok": True, "status": "already-due", "message": "already due"}


# -- printing ---------------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _printable(text: str) -> str:
    """Client-supplied text for a terminal: control characters as escapes."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text)


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    left = t - now
    if left <= 0:
        return "now"
    for unit, seconds in (("d", 86400), ("h", 3600), ("m", 60)):
        if left >= seconds:
            return f"in {left / seconds:.0f}{unit}"
    return f"in {left:.0f}s"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_table(messages: list[Message], now: float) -> str:
    header = ("ID", "STATE", "TRIES", "NEXT", "SIZE", "SENDER", "RECIPIENTS", "LAST ERROR")
    rows = [header]
    for m in messages:
        rcpts = m.recipients[0] if m.recipients else "-"
        if len(m.recipients) > 1:
            rcpts += f" +{len(m.recipients) - 1}"
        sender = "-" if m.sender is None else f"<{m.sender}>"
        rows.append((m.msg_id, m.state, "-" if m.attempts is None else str(m.attempts),
                     _when(m.next_attempt, now), _size(m.size), _cut(_printable(sender), 32),
                     _cut(_printable(rcpts), 32), _cut(_printable(m.last_error), 60) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
    right = {2, 4}
    out = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells + [row[-1]]).rstrip())
    return "\n".join(out) + "\n"


def format_stats(counts: dict[str, int]) -> str:
    width = max(len(k) for k in counts)
    lines = [f"{k.ljust(width)}  {v}" for k, v in counts.items()]
    lines.append(f"{'total'.ljust(width)}  {sum(counts.values())}")
    return "\n".join(lines) + "\n"


def format_show(msg: Message, base_path: str, now: float) -> str:
    """Envelope, state and the header section; never the body."""
    lines: list[tuple[str, str]] = [("id", msg.msg_id), ("state", msg.state)]
    env = msg.envelope
    received = _iso(msg.received) or ""
    if env is not None and (env.client or env.helo):
        received += f" from {env.client or '?'} (helo {env.helo or '?'})"
    lines.append(("received", received))
    lines.append(("sender", "-" if msg.sender is None else f"<{msg.sender}>"))
    if env is not None:
        lines.append(("recipients", ", ".join(env.recipients)))
    if msg.state in ("queued", "deferred"):
        lines.append(("pending", ", ".join(msg.recipients) or "-"))
    elif msg.state == "bounced" and msg.recipients:
        lines.append(("refused", ", ".join(msg.recipients)))
    for rcpt, code, text in msg.bounced:
        lines.append(("bounced", f"{rcpt}: {code or ''} {text}".replace("  ", " ")))
    lines.append(("attempts", "-" if msg.attempts is None else str(msg.attempts)))
    if msg.next_attempt is not None:
        lines.append(("next attempt", f"{_iso(msg.next_attempt)} ({_when(msg.next_attempt, now)})"))
    if msg.last_error:
        lines.append(("last error", msg.last_error))
    lines.append(("size", "-" if msg.size is None else f"{msg.size} bytes"))
    if msg.loc is not None:
        lines.append(("stored in", f"{os.path.relpath(msg.loc.path, base_path)} @ {msg.loc.offset}"))
    for path in msg.files:
        lines.append(("file", path))
    width = max(len(k) for k, _ in lines) + 1
    out = [f"{(k + ':').ljust(width)} {_printable(v)}" for k, v in lines]
    if msg.reason:
        out += ["", "reason:"] + [f"  {_printable(ln)}" for ln in msg.reason.splitlines()]
    head, more = _headers(msg)
    if head is not None:
        out += ["", "headers:"]
        text = head.decode("utf-8", "backslashreplace")
        out += [f"  {_printable(ln)}" for ln in text.split("\r\n") if ln]
        if more:
            out.append(f"  ... {more} more bytes of headers not shown")
    elif msg.state in ("queued", "deferred", "bounced"):
        out += ["", "headers: unreadable (the record failed its checksum or is gone)"]
    return "\n".join(out) + "\n"


def _headers(msg: Message) -> tuple[bytes | None, int]:
    try:
        if msg.loc is not None:
            _meta, body = read_payload(msg.loc)
        elif msg.state == "bounced":
            eml = next((p for p in msg.files if p.endswith(".eml")), None)
            if eml is None:
                return None, 0
            with open(eml, "rb") as f:
                body = f.read()
        else:
            return None, 0
    except (OSError, DamagedMessage):
        return None, 0
    return header_section(body)


# -- the commands ---------------------------------------------------------------------------------


def _msg_id(args: dict[str, Any], command: str) -> str:
    raw = args["ID"] or ""
    msg_id = raw.strip().upper()
    if not is_id(msg_id):
        raise QueueToolError(f'queue {command}: "{_printable(raw)}" is not a message id '
                             "(26 characters, as in the server's 250 reply)")
    return msg_id


def main(config: Any, args: dict[str, Any]) -> int:
    """Run one `hedwig queue ...` command; returns the exit status (0, 1, 2)."""
    base_path = config.storage.base_path
    try:
        if args["list"]:
            return _list(base_path, args["--state"], args["--json"])
        if args["stats"]:
            return _stats(base_path, args["--json"])
        if args["show"]:
            return _show(base_path, _msg_id(args, "show"))
        if args["retry"]:
            msg_id = None if args["--all"] else _msg_id(args, "retry")
            return _change(base_path, "retry", msg_id, config.storage.fsync)
        if args["delete"]:
            return _change(base_path, "delete", _msg_id(args, "delete"), config.storage.fsync)
    except QueueToolError as exc:
        return _fail(str(exc), 2)
    except PermissionError as exc:
        return _fail(f"queue: cannot use the spool {base_path}: {exc.strerror} ({exc.filename})", 2)
    except OSError as exc:
        return _fail(f"queue: spool {base_path}: {exc.strerror or exc}", 1)
    return _fail("queue: unknown command", 2)


def _fail(message: str, code: int) -> int:
    print(f"hedwig: {message}", file=sys.stderr)
    return code


def _list(base_path: str, state: str | None, as_json: bool) -> int:
    if state is not None and state not in STATES:
        raise QueueToolError(f'queue list: --state: expected one of {", ".join(STATES)}, got "{_printable(state)}"')
    messages = [m for m in read_queue(base_path) if state is None or m.state == state]
    if as_json:
        json.dump([m.to_json() for m in messages], sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif messages:
        sys.stdout.write(format_table(messages, time.time()))
    else:
        print(f"no {state} messages" if state else "the queue is empty")
    return 0


def _stats(base_path: str, as_json: bool) -> int:
    counts = count_states(read_queue(base_path, details=False))
    if as_json:
        print(json.dumps(counts))
    else:
        sys.stdout.write(format_stats(counts))
    return 0


def _show(base_path: str, msg_id: str) -> int:
    msg = find(base_path, msg_id)
    if msg is None:
        raise QueueToolError(f"queue show: {msg_id}: {not_queued_reason(base_path, msg_id)}")
    sys.stdout.write(format_show(msg, base_path, time.time()))
    return 0


def _change(base_path: str, op: str, msg_id: str | None, fsync: bool) -> int:
    command = f"queue {op}"
    if not os.path.isdir(os.path.join(base_path, "log")):  # never started: nothing is queued
        if msg_id is None:
            print(control.made_due(0))
            return 0
        raise QueueToolError(f"{command}: {msg_id}: not in the queue")
    # Each message belongs to the worker owning its segment's writer: ask that one.
    if msg_id is None:
        writers = sorted({writer for writer, _seq, _path in list_segments(os.path.join(base_path, "log"))})
    else:
        msg = find(base_path, msg_id)
        writers = [writer_of(msg.loc.path)] if msg is not None and msg.loc is not None else []
    if op == "delete":
        assert msg_id is not None
        answer = control.request(base_path, op, msg_id, writers, lambda: delete_offline(base_path, msg_id, fsync))
    else:
        answer = control.request(base_path, op, msg_id, writers, lambda: retry_offline(base_path, msg_id, fsync))
    message = str(answer.get("message") or answer.get("status"))
    if answer.get("ok"):
        print(message if msg_id is None else f"{msg_id}: {message}")
        return 0
    if answer.get("status") == "not-queued":
        assert msg_id is not None
        if message == "not in the queue":  # the server knows less than the files
            message = not_queued_reason(base_path, msg_id)
        raise QueueToolError(f"{command}: {msg_id}: {message}")
    return _fail(f"{command}: {msg_id or 'all'}: {message}", 1)
