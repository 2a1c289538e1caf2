"""A bounded client load of tagged messages, and the tags an upstream sink received.

    load = Load(port, total=2000, threads=8, per_connection=50).start()
    wait_until(lambda: load.count() >= 500, 30)
    load.stop.set(); load.join()
    load.acked                 # tag -> queue id of every 250 a client read
    load.unsure                # tags whose final dot was sent but whose reply never came
    load.refused               # tag -> the code that refused it (MAIL, RCPT, DATA, the dot)
    sink_tags(sink)            # every tag the sink received, one entry per copy

Each message carries a unique tag as its Subject (and Message-ID), made by
`content(tag)` (default `tagged`: a short message; a bigger one must keep
that header section), one recipient (`rcpt`) or several (a sequence), and
goes out in one pipelined transaction (MAIL, RCPT..., DATA in one write). A thread keeps its connection for `per_connection` messages,
then opens a new one (1: a connection per message, so with several workers
every worker gets a share). A refused, cut or 4xx transaction costs that tag
only: it was never acknowledged, so nothing is owed for it; the thread
reconnects and goes on. `unsure` tags are the ones a crash may have caught
between the server's commit and the client reading its 250: the server may
hold (and deliver) them, the client was never told.

Must not: import gevent or hedwig, or run without a deadline.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tests.support.proc import RawClient, Reply, dot_stuff, queued_id

SENDER = "sender@client.test"
SUBJECT = re.compile(rb"^Subject: (\S+)\r$", re.M)


def tagged(tag: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: someone\r\nSubject: {tag}\r\nMessage-ID: <{tag}@client.test>\r\n\r\n"
            f"body of {tag}\r\n").encode()


def tag_of(data: bytes) -> str | None:
    hit = SUBJECT.search(data)
    return hit.group(1).decode() if hit else None


def sink_tags(sink: Any) -> list[str]:
    """Every tag the sink received, in order, one entry per delivered copy (duplicates show)."""
    return [t for t in (tag_of(m.data) for m in list(sink.messages)) if t is not None]


class Load:
    """Client threads sending tagged messages until `total` are issued or `stop` is set.

    Each thread gives up after `limit` seconds (a bounded load, never a hang).
    """

    def __init__(self, port: int, total: int, threads: int = 8, *, rcpt: str | Sequence[str] = "rcpt@sink.test",
                 per_connection: int = 1, prefix: str = "load", limit: float = 60.0,
                 content: Callable[[str], bytes] = tagged) -> None:
        self.port = port
        self.total = total
        self.rcpts = (rcpt,) if isinstance(rcpt, str) else tuple(rcpt)
        self.content = content
        self.per_connection = per_connection
        self.prefix = prefix
        self.limit = limit
        self.acked: dict[str, str] = {}  # tag -> queue id
        self.unsure: set[str] = set()
        self.refused: dict[str, int] = {}
        self.failures = 0
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self._next = 0
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def _tag(self) -> str | None:
        with self._lock:
            if self._next >= self.total or self.stop.is_set():
                return None
            self._next += 1
            return f"{self.prefix}-{self._next}"

    def _connect(self) -> RawClient:
        client = RawClient(self.port, timeout=20)
        try:
            client.expect(220)
            client.cmd("EHLO client.test", 250)
        except BaseException:
            client.close()
            raise
        return client

    def _send(self, client: RawClient, tag: str) -> str:
        """One transaction; the queue id of its 250 (anything else raises; a refusal is noted)."""
        rcpts = "".join(f"RCPT TO:<{rcpt}>\r\n" for rcpt in self.rcpts)
        client.send(f"MAIL FROM:<{SENDER}>\r\n{rcpts}DATA\r\n".encode())
        for want in (250, *(250 for _ in self.rcpts), 354):
            self._check(tag, client.read_reply(), want)
        reply = self._data(client, tag, self.content(tag))
        self._check(tag, reply, 250)
        return queued_id(reply.text)

    def _check(self, tag: str, reply: Reply, want: int) -> None:
        if reply.code != want:
            with self._lock:
                self.refused.setdefault(tag, reply.code)
            raise AssertionError(f"{tag}: expected {want}, got {reply.raw!r}")

    def _data(self, client: RawClient, tag: str, data: bytes) -> Reply:
        """After the 354: the message and its final dot, then the reply; no reply makes `tag` unsure."""
        client.send(dot_stuff(data) + b".\r\n")
        try:
            return client.read_reply()
        except BaseException:
            with self._lock:
                self.unsure.add(tag)
            raise

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        client: RawClient | None = None
        used = 0
        try:
            while time.monotonic() < deadline:
                tag = self._tag()
                if tag is None:
                    return
                try:
                    if client is None:
                        client, used = self._connect(), 0
                    msg_id = self._send(client, tag)
                except (OSError, AssertionError, EOFError, TimeoutError):
                    with self._lock:
                        self.failures += 1
                    if client is not None:
                        client.close()
                        client = None
                    time.sleep(0.02)
                    continue
                with self._lock:
                    self.acked[tag] = msg_id
                used += 1
                if used >= self.per_connection:
                    try:
                        client.cmd("QUIT", 221)
                    except (OSError, AssertionError, EOFError, TimeoutError):
                        pass
                    client.close()
                    client = None
        finally:
            if client is not None:
                client.close()

    def join(self, timeout: float = 60) -> None:
        for t in self._threads:
            t.join(timeout)
            assert not t.is_alive(), "a load thread hung"

    def count(self) -> int:
        with self._lock:
            return len(self.acked)

    def snapshot(self) -> tuple[dict[str, str], set[str]]:
        """(acked, unsure), copied under the lock."""
        with self._lock:
            return dict(self.acked), set(self.unsure)

