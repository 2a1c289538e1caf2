"""Hedwig as a child process, plus independent readers of its on-disk contract.

`HedwigProcess` runs the real entry point (`python hedwig.py serve --config F`)
from the repository root on 127.0.0.1 with a free port, a spool in a tmp dir
and `fsync = true`, so patching, signals and durability are exercised as in
production. Readiness is a polled deadline on the listener's 220, never a
fixed sleep; teardown is SIGTERM, a bounded wait, then SIGKILL.

`read_spool()` parses the spool by the format documented at the top of
hedwig/spool.py (and ARCHITECTURE.md), written here independently: hedwig.spool
is deliberately not imported, so the tests check the on-disk contract, not the
implementation's own reading of it.

Must not: import gevent or hedwig (the pytest process is never patched).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import tomllib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
HOSTNAME = "mx.test"

# -- configuration ------------------------------------------------------------------


def free_port() -> int:
    """A port that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Replace(dict):
    """A table that replaces the base config's table of that name instead of merging into it.

    `{"server": {"routes": Replace({"a.test": "127.0.0.1:2525"})}}` drops the base
    config's `"*"` route; `Replace()` leaves an empty table.
    """


def deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """`extra` over `base`; tables merge recursively (unless `Replace`), anything else replaces."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Replace):
            out[key] = dict(value)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, Mapping) for v in value)


def to_toml(doc: Mapping[str, Any], _prefix: str = "") -> str:
    """Enough of a TOML writer for test configs: scalars, arrays, tables, arrays of tables."""
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for key, value in doc.items():
        if isinstance(value, Mapping) or _is_table_array(value):
            nested.append((key, value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in nested:
        path = f"{_prefix}.{_toml_key(key)}" if _prefix else _toml_key(key)
        if isinstance(value, Mapping):
            out += f"\n[{path}]\n" + to_toml(value, path)
        else:
            for item in value:
                out += f"\n[[{path}]]\n" + to_toml(item, path)
    return out


def base_config(port: int, spool: Path) -> dict[str, Any]:
    return {
        "log": {"level": "info"},
        "server": {
            "hostname": HOSTNAME,
            "disk_reserve": 0,
            "listeners": [{"addr": f"{HOST}:{port}"}],
            # Receiving tests keep their mail queued: every delivery attempt goes to
            # a closed loopback port (refused at once) and is retried only after an hour.
            "retry_initial_delay": "1h",
            "routes": {"*": f"{HOST}:1"},
        },
        "storage": {"base_path": str(spool), "fsync": True},
    }


# -- the process ---------------------------------------------------------------------


class HedwigProcess:
    """One Hedwig server: config in `tmp_dir`, spool at `tmp_dir/spool`, log at `tmp_dir/hedwig.log`.

    `config` overrides the base config: a dict (deep-merged) or TOML text (parsed,
    then deep-merged). `args` replaces the command line after `hedwig.py`
    (default `["serve", "--config", <config>]`). The child gets this process's
    environment without its HEDWIG_* variables, plus `env` (e.g. HEDWIG_LOG_LEVEL).
    """

    def __init__(
        self,
        tmp_dir: Path | str,
        config: Mapping[str, Any] | str | None = None,
        *,
        args: list[str] | None = None,
        umask: int = 0o022,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.umask = umask
        self.env = dict(env or {})
        self.tmp_dir = Path(tmp_dir)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.spool = self.tmp_dir / "spool"
        self.port = free_port()
        self.config_path = self.tmp_dir / "hedwig.toml"
        self.log_path = self.tmp_dir / "hedwig.log"
        overrides = tomllib.loads(config) if isinstance(config, str) else dict(config or {})
        self.config = deep_merge(base_config(self.port, self.spool), overrides)
        self.config_path.write_text(to_toml(self.config))
        # "{config}" in `args` stands for the written config file.
        args = args if args is not None else ["serve", "--config", "{config}"]
        self.args = [a.replace("{config}", str(self.config_path)) for a in args]
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        self.starts = 0

    # -- life ----------------------------------------------------------------------

    def start(self) -> HedwigProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("HEDWIG_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.env)
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")
        self._log_file.write(f"--- start {self.starts} ---\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "hedwig.py", *self.args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers die with it in kill()
            umask=self.umask,
        )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        """The master's children (its workers), from /proc."""
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except FileNotFoundError:
            return []
        return [int(p) for p in text.split()]

    def wait_workers(self, count: int, timeout: float = 10.0, exclude: tuple[int, ...] = ()) -> list[int]:
        """Poll until the master has `count` workers (none of them in `exclude`); their pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in self.worker_pids() if p not in exclude]
            if len(pids) == count and len(self.worker_pids()) == count:
                return pids
            time.sleep(0.05)
        raise TimeoutError(f"{count} workers not there after {timeout}s: {self.worker_pids()}\n{self.log_text()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 10.0) -> HedwigProcess:
        """Poll until the listener answers 220 (the probe session then QUITs and waits for EOF)."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"hedwig exited with {self.returncode()} before ready:\n{self.log_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=max(deadline - time.monotonic(), 0.1)) as s:
                    line = _read_line(s, deadline)
                    if line.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        try:  # 221, then the server's close: our probe is gone from its pool
                            while s.recv(4096):
                                pass
                        except OSError:
                            pass
                        return self
                    last = line
            except OSError as exc:
                last = exc
            time.sleep(0.05)  # poll interval, not a readiness guess
        raise TimeoutError(f"hedwig not ready after {timeout}s ({last!r}):\n{self.log_text()}")

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL the group. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._kill_group()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, at once (a crash)."""
        if self.proc is None:
            return
        self._kill_group()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def _kill_group(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session's group: leftover workers
        except (ProcessLookupError, PermissionError):
            pass

    def restart(self, timeout: float = 10.0) -> HedwigProcess:
        if self.running:
            self.stop()
        return self.start().wait_ready(timeout)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None

    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def last_log(self) -> str:
        """The log of the latest start only (after its `--- start N ---` marker)."""
        text = self.log_text()
        marker = f"--- start {self.starts - 1} ---\n"
        return text[text.rfind(marker) + len(marker):] if marker in text else text

    def __enter__(self) -> HedwigProcess:
        if not self.running:
            self.start().wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- the spool, read independently ---------------------------------------------------
#
# The on-disk format as documented in hedwig/spool.py and ARCHITECTURE.md, parsed
# here from that documentation (never by importing hedwig.spool): an append-only
# log of segments log/<writer>-<seq>.seg, each a sequence of records
#
#   magic "HWR1" | type u8 | flags u8 | reserved u16 | msg_id 26 ASCII | meta_len u32
#   | body_len u64 | header_crc u32 (CRC-32 of the 46 bytes before it)
#   | payload_crc u32 (CRC-32 of meta + body)                          little-endian
#
# followed by meta (the JSON envelope) and body (Received header + the client's
# un-stuffed bytes). A record whose header fails, or that runs past the end of
# the file, is a torn tail and ends the segment.

RECORD_MAGIC = b"HWR1"
RECORD_HEADER = struct.Struct("<4sBBH26sIQII")
RECORD_CRC_SPAN = RECORD_HEADER.size - 8
RECORD_MESSAGE = ord("M")
SEGMENT_NAME = re.compile(r"([a-z0-9]+)-([0-9a-f]{16})\.seg\Z")
assert RECORD_HEADER.size == 54 and RECORD_CRC_SPAN == 46


class DamagedFile(AssertionError):
    """A spool file that breaks the documented format."""


def segment_files(spool: Path | str) -> list[Path]:
    """Segments (log/<writer>-<seq>.seg), oldest first per writer."""
    found = []
    for p in Path(spool).glob("log/*.seg"):
        m = SEGMENT_NAME.match(p.name)
        if m:
            found.append((m[1], int(m[2], 16), p))
    return [p for _, _, p in sorted(found)]


def data_files(spool: Path | str) -> list[Path]:
    """Every file that holds queued mail."""
    return segment_files(spool)


def tmp_files(spool: Path | str) -> list[Path]:
    tmp = Path(spool) / "tmp"
    return sorted(tmp.iterdir()) if tmp.is_dir() else []


@dataclass
class Record:
    kind: int
    msg_id: str
    meta: bytes
    body: bytes
    offset: int


def parse_segment(data: bytes) -> tuple[list[Record], int]:
    """(intact records, bytes of torn tail) of one log segment.

    A record with a good header that runs past the end ends the segment: a torn
    append (never acknowledged). A header that fails its magic or CRC is damage
    if a whole record (header and payload CRCs good, within the file) starts at
    a later offset: the scan goes on from the first such offset; otherwise it is
    the torn tail. A record with a good header and length whose payload fails
    its CRC is damage: DamagedFile.
    """
    records: list[Record] = []
    offset = 0
    size = RECORD_HEADER.size
    while offset + size <= len(data):
        found = _record_at(data, offset)
        if found is None:
            resume = next((p for p in _magic_offsets(data, offset + 1) if _record_at(data, p, check=True)), None)
            if resume is None:
                break
            offset = resume
            continue
        if found == "torn":
            break
        rec, end = found
        records.append(rec)
        offset = end
    return records, len(data) - offset


def _magic_offsets(data: bytes, start: int):  # type: ignore[no-untyped-def]
    at = data.find(RECORD_MAGIC, start)
    while at >= 0:
        yield at
        at = data.find(RECORD_MAGIC, at + 1)


def _record_at(data: bytes, offset: int, check: bool = False):  # type: ignore[no-untyped-def]
    """(Record, end), "torn" (good header, runs past the end), or None (bad header)."""
    raw = data[offset:offset + RECORD_HEADER.size]
    if len(raw) < RECORD_HEADER.size:
        return None
    magic, kind, _flags, _res, raw_id, meta_len, body_len, header_crc, payload_crc = RECORD_HEADER.unpack(raw)
    if magic != RECORD_MAGIC or zlib.crc32(raw[:RECORD_CRC_SPAN]) != header_crc:
        return None
    end = offset + RECORD_HEADER.size + meta_len + body_len
    if end > len(data):
        return None if check else "torn"
    payload = data[offset + RECORD_HEADER.size:end]
    if zlib.crc32(payload) != payload_crc:
        if check:
            return None
        raise DamagedFile(f"record at {offset} ({raw_id!r}): payload CRC mismatch")
    return Record(kind, raw_id.decode("ascii"), payload[:meta_len], payload[meta_len:], offset), end


def read_segment(path: Path | str) -> tuple[list[Record], int]:
    return parse_segment(Path(path).read_bytes())


def pack_record_header(kind: int, msg_id: str, meta_len: int, body_len: int, payload_crc: int) -> bytes:
    """A record header as the documentation defines it (to plant torn records)."""
    head = struct.pack("<4sBBH26sIQ", RECORD_MAGIC, kind, 0, 0, msg_id.encode("ascii"), meta_len, body_len)
    return head + struct.pack("<II", zlib.crc32(head), payload_crc)


@dataclass
class SpoolSnapshot:
    """What a spool holds: every intact message, by id (a list, so duplicates show)."""

    messages: dict[str, list[tuple[dict[str, Any], bytes]]] = field(default_factory=dict)
    torn_tails: dict[str, int] = field(default_factory=dict)  # segment name -> torn bytes at its end

    @property
    def ids(self) -> set[str]:
        return set(self.messages)

    def count(self) -> int:
        return sum(len(v) for v in self.messages.values())

    def one(self, msg_id: str) -> tuple[dict[str, Any], bytes]:
        found = self.messages.get(msg_id, [])
        assert len(found) == 1, f"{msg_id}: {len(found)} copies in the spool"
        return found[0]


def read_spool(spool: Path | str) -> SpoolSnapshot:
    """Every queued message, each record checked against its checksums.

    Compaction copies a queued message forward into a newer segment of the
    same writer; until the old segment goes, the older copy is shadowed: a
    writer's message is its copy in its newest segment. Copies in two
    writers' segments both count (the server never makes them).
    """
    snap = SpoolSnapshot()
    newest: dict[tuple[str, str], tuple[dict[str, Any], bytes]] = {}
    for path in segment_files(spool):
        writer = SEGMENT_NAME.match(path.name)[1]  # type: ignore[index]
        records, torn = read_segment(path)
        if torn:
            snap.torn_tails[path.name] = torn
        for rec in records:
            if rec.kind != RECORD_MESSAGE:
                continue  # state records (delivery) are not messages
            envelope = json.loads(rec.meta)
            if envelope.get("msg_id") != rec.msg_id:
                raise DamagedFile(f"{path}@{rec.offset}: envelope id {envelope.get('msg_id')!r} != {rec.msg_id}")
            newest[(writer, rec.msg_id)] = (envelope, rec.body)
    for (_writer, msg_id), copy in newest.items():
        snap.messages.setdefault(msg_id, []).append(copy)
    return snap


def split_received(message: bytes) -> tuple[bytes, bytes]:
    """(the first header field if it is Received:, with its folded lines; the rest)."""
    if not message.startswith(b"Received:"):
        raise AssertionError(f"message does not start with a Received header: {message[:80]!r}")
    pos = message.index(b"\r\n") + 2
    while message[pos:pos + 1] in (b" ", b"\t"):
        pos = message.index(b"\r\n", pos) + 2
    return message[:pos], message[pos:]


def spool_modes(spool: Path | str) -> tuple[dict[str, int], dict[str, int]]:
    """({dir: mode}, {file: mode}) for everything under the spool, the root included."""
    root = Path(spool)
    dirs = {str(root): root.stat().st_mode & 0o7777}
    files: dict[str, int] = {}
    for here, dnames, fnames in os.walk(root):
        for d in dnames:
            dirs[os.path.join(here, d)] = os.stat(os.path.join(here, d)).st_mode & 0o7777
        for f in fnames:
            files[os.path.join(here, f)] = os.stat(os.path.join(here, f)).st_mode & 0o7777
    return dirs, files


# -- delivery state, read independently -------------------------------------------
#
# Beside each segment, log/<writer>-<seq>.state is its delivery journal (ARCHITECTURE.md):
# JSON lines, appended, a crash may tear the last one. {"id": ID, "s": {"attempts": N,
# "due": epoch, "pending": [...] | null, "bounced": [[rcpt, code, text], ...], "error": "..."}}
# records a deferral (the latest line wins, journals read oldest segment first, so a
# state line a compaction copied into a newer segment's journal wins over the old one);
# {"id": ID, "done": OUTCOME} in any journal says the message left the queue (delivered,
# bounced, dropped, expired, deleted). Bounced mail is kept
# as bounced/<last two id characters, lower-case>/<id>.eml (the message as stored) and
# <id>.reason (text).


def journal_files(spool: Path | str) -> list[Path]:
    return sorted(Path(spool).glob("log/*.state"))


def read_journal(spool: Path | str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """(latest deferral state by id, outcome by id) over every segment's journal."""
    states: dict[str, dict[str, Any]] = {}
    done: dict[str, str] = {}
    for path in journal_files(spool):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # reclaimed meanwhile
            continue
        for line in data[: data.rfind(b"\n") + 1].splitlines():
            entry = json.loads(line)
            if "done" in entry:
                done[entry["id"]] = entry["done"]
            elif "s" in entry:
                states[entry["id"]] = entry["s"]
    return states, done


def bounced_paths(spool: Path | str, msg_id: str) -> tuple[Path, Path]:
    """(bounced/<hh>/<id>.eml, bounced/<hh>/<id>.reason) of a bounced message."""
    directory = Path(spool) / "bounced" / msg_id[-2:].lower()
    return directory / f"{msg_id}.eml", directory / f"{msg_id}.reason"


def bounced_files(spool: Path | str) -> list[Path]:
    return sorted(p for p in Path(spool).glob("bounced/*/*") if p.is_file())


# -- a raw SMTP client ---------------------------------------------------------------


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


class Reply(tuple):
    """(code, [lines without the code]) with the raw bytes in .raw."""

    raw: bytes

    @property
    def code(self) -> int:
        return self[0]

    @property
    def text(self) -> str:
        return "\n".join(self[1])


class RawClient:
    """An SMTP client over a plain socket that sends exactly the bytes it is given."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply before the deadline")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def read_reply(self, timeout: float | None = None) -> Reply:
        """One (possibly multi-line) reply; raises EOFError if the server closed first."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines: list[str] = []
        raw = b""
        while True:
            while b"\r\n" not in self._buf:
                if not self._fill(deadline):
                    raise EOFError(f"connection closed; partial {self._buf!r}, lines {lines}")
            line, self._buf = self._buf.split(b"\r\n", 1)
            raw += line + b"\r\n"
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b" ", b"-", b""):
                raise AssertionError(f"malformed reply line {line!r}")
            lines.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                reply = Reply((int(line[:3]), lines))
                reply.raw = raw
                return reply

    def expect(self, code: int, timeout: float | None = None) -> Reply:
        reply = self.read_reply(timeout)
        assert reply.code == code, f"expected {code}, got {reply.raw!r}"
        return reply

    def cmd(self, line: str | bytes, code: int | None = None) -> Reply:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.read_reply() if code is None else self.expect(code)

    def nothing_for(self, seconds: float) -> bool:
        """True if the server sends nothing (and does not close) for `seconds`."""
        if self._buf:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return True
        self._buf += chunk
        return False

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Read until the server closes; returns what came meanwhile. Raises TimeoutError."""
        deadline = time.monotonic() + timeout
        got, self._buf = self._buf, b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"server did not close; got {got!r}")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return got
            if not chunk:
                return got
            got += chunk

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dot_stuff(message: bytes) -> bytes:
    """RFC 5321 §4.5.2 as a client does it: a leading dot on every line gets another."""
    stuffed = b"\r\n".join((b"." + line if line.startswith(b".") else line) for line in message.split(b"\r\n"))
    return stuffed


QUEUED_RE = re.compile(r"^2\.0\.0 OK queued as ([0-9A-Z]{26})$")


def queued_id(text: str | bytes) -> str:
    """The id in `250 2.0.0 OK queued as <ID>` (reply text without the code)."""
    if isinstance(text, bytes):
        text = text.decode()
    m = QUEUED_RE.match(text.strip())
    assert m, f"not a queued reply: {text!r}"
    return m[1]


def wait_until(predicate: Any, timeout: float, interval: float = 0.02, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(interval)


def outcome(proc: HedwigProcess, msg_id: str, timeout: float = 10.0) -> str:
    """Wait until the journal says `msg_id` left the queue; returns how (delivered, bounced...)."""
    result: dict[str, str] = {}

    def done() -> bool:
        result.update(read_journal(proc.spool)[1])
        return msg_id in result

    try:
        wait_until(done, timeout, interval=0.05, what=f"{msg_id} to leave the queue")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.log_text()[-5000:]}") from None
    return result[msg_id]
