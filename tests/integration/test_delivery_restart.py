"""Delivery across a crash, and the queue's clean-up with second-scale retentions.

SPEC §4: on start every queued and deferred message is found again, attempts
and due times survive, in-flight ones are redelivered (at-least-once).  Here
500 messages are accepted while the upstream refuses connections, the server
is SIGKILLed, the upstream comes up, the server restarts: every message must
arrive (a loss fails the test; duplicates are counted and printed -- none are
expected, since nothing reached the upstream before the kill).

Killed mid-DATA instead, every unacknowledged message is sent again
(at-least-once); killed between attempts, attempts and pending recipients
carry over, so `max_retries` counts across restarts.

SPEC §2 `[storage.cleanup]`: deferred mail older than `deferred_retention` is
given up (bounced, reason "expired"); bounced files older than
`bounced_retention` are deleted.

Every wait is a polled deadline; the one exception is the damaged-message test,
which must observe that *nothing more* happens over a bounded quiet period.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.proc import (
    outcome,
    HOST,
    HedwigProcess,
    RawClient,
    Replace,
    bounced_files,
    bounced_paths,
    dot_stuff,
    queued_id,
    read_journal,
    segment_files,
    wait_until,
)
from tests.support.sink import Sink, closed_port

SENDER = "sender@client.test"
MESSAGES = 500
THREADS = 10


def config(route: str, command_timeout: str = "3s", **server: Any) -> dict[str, Any]:
    """Overrides for the base config: every domain routed to `route`, quick timeouts and retries."""
    settings: dict[str, Any] = {
        "outbound_local": True,
        "retry_initial_delay": "1s",
        "retry_max_delay": "2s",
        "routes": Replace({"*": route}),
        "smtp": {"connect_timeout": "2s", "command_timeout": command_timeout},
    }
    settings.update(server)
    return {"server": settings}


def message(tag: str) -> bytes:
    return f"From: {SENDER}\r\nSubject: {tag}\r\n\r\nbody of {tag}\r\n.dot line\r\n".encode()


def send_many(port: int, tags: list[str], ids: dict[str, str], lock: threading.Lock) -> None:
    """One connection, one transaction per tag; records tag -> queue id."""
    with RawClient(port, timeout=20) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        for tag in tags:
            client.cmd(f"MAIL FROM:<{SENDER}>", 250)
            client.cmd(f"RCPT TO:<{tag}@dest.test>", 250)
            client.cmd("DATA", 354)
            client.send(dot_stuff(message(tag)) + b".\r\n")
            msg_id = queued_id(client.expect(250).text)
            with lock:
                ids[tag] = msg_id
        client.cmd("QUIT", 221)


def wait_log(proc: HedwigProcess, pattern: str, timeout: float = 10.0) -> None:
    try:
        wait_until(lambda: re.search(pattern, proc.last_log(), re.M) is not None, timeout,
                   interval=0.05, what=f"log line /{pattern}/")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.log_text()[-5000:]}") from None


@pytest.fixture
def sinks() -> Iterator[Callable[..., Sink]]:
    made: list[Sink] = []

    def make(*args: Any, **kwargs: Any) -> Sink:
        made.append(Sink(*args, **kwargs))
        return made[-1]

    yield make
    for sink in made:
        sink.stop()


@pytest.mark.timeout(60)
def test_500_messages_queued_while_upstream_is_down_survive_sigkill(hedwig, sinks) -> None:
    down = closed_port()
    proc = hedwig(config(f"{HOST}:{down}", max_retries=1000))
    tags = [f"m{i:03d}" for i in range(MESSAGES)]
    ids: dict[str, str] = {}
    lock = threading.Lock()
    errors: list[BaseException] = []

    def run(chunk: list[str]) -> None:
        try:
            send_many(proc.port, chunk, ids, lock)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(tags[t::THREADS],)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert len(ids) == MESSAGES and len(set(ids.values())) == MESSAGES
    # Every message has failed at least once: deferrals (attempts, due) are journalled.
    wait_until(lambda: len(read_journal(proc.spool)[0]) >= MESSAGES, 15, interval=0.1,
               what="every message to be deferred once")
    assert read_journal(proc.spool)[1] == {}, "nothing can have left the queue"

    proc.kill()  # SIGKILL: no goodbye, mid-retry
    sink = sinks(port=down)  # the upstream comes up on the routed port
    started = time.monotonic()
    proc.start().wait_ready()
    wait_log(proc, rf"spool .*: {MESSAGES} queued")

    def arrived() -> Counter[str]:
        return Counter(re.search(rb"^Subject: (\S+)", m.data, re.M)[1].decode() for m in list(sink.messages))

    try:
        wait_until(lambda: len(arrived()) >= MESSAGES, 30, interval=0.1, what="every message")
    except TimeoutError:
        pass
    got = arrived()
    lost = sorted(set(tags) - set(got))
    assert not lost, f"{len(lost)} of {MESSAGES} messages lost, e.g. {lost[:5]}\n{proc.last_log()[-3000:]}"
    elapsed = time.monotonic() - started
    # Let every delivery record its outcome, so a late duplicate would be seen too. (Not
    # from the journals: the old segment and its journal go once all of it is done.)
    delivered_ids: set[str] = set()

    def all_delivered() -> bool:
        delivered_ids.update(re.findall(r"msg_id=(\S+) delivered rcpts=1 ", proc.last_log()))
        return len(delivered_ids) >= MESSAGES

    wait_until(all_delivered, 15, interval=0.1, what="every delivery to be logged")
    got = arrived()
    duplicated = sum(n - 1 for n in got.values())
    print(f"\n{MESSAGES} messages delivered after SIGKILL + restart in {elapsed:.1f}s: "
          f"{duplicated} duplicated, {len(lost)} lost, {sink.connections} connections")
    assert set(got) == set(tags)
    assert delivered_ids == set(ids.values())

    # Everything is done: a clean restart finds nothing queued and reclaims every segment.
    proc.restart()
    wait_log(proc, r"spool .*: 0 queued")
    wait_until(lambda: segment_files(proc.spool) == [], 5, what="the segments to be reclaimed")


@pytest.mark.timeout(40)
def test_sigkill_mid_delivery_redelivers_every_unacknowledged_message(hedwig, sinks) -> None:
    """Killed while every message is past DATA without a final reply: each is sent again."""
    sink = sinks(hang_after_data=True)
    proc = hedwig(config(f"{HOST}:{sink.port}", command_timeout="20s"))
    count = 20
    tags = [f"h{i:02d}" for i in range(count)]
    ids: dict[str, str] = {}
    send_many(proc.port, tags, ids, threading.Lock())
    sink.wait(lambda: len(sink.messages) >= count, timeout=10, what="every message in flight")
    proc.kill()
    sink.hang_after_data = False
    proc.start().wait_ready()
    wait_log(proc, rf"spool .*: {count} queued")
    delivered_ids: set[str] = set()

    def all_delivered() -> bool:
        delivered_ids.update(re.findall(r"msg_id=(\S+) delivered rcpts=1 ", proc.last_log()))
        return len(delivered_ids) >= count

    wait_until(all_delivered, 15, interval=0.1, what="every message to be delivered again")
    got = Counter(re.search(rb"^Subject: (\S+)", m.data, re.M)[1].decode() for m in list(sink.messages))
    print(f"\n{count} messages killed mid-DATA: {sum(got.values()) - count} sent twice (expected {count})")
    assert delivered_ids == set(ids.values())
    assert got == Counter({tag: 2 for tag in tags}), "at-least-once: each unacknowledged message once more"


@pytest.mark.timeout(30)
def test_attempts_and_pending_recipients_survive_sigkill(hedwig, sinks) -> None:
    tried: list[str] = []

    def rcpt_reply(address: str) -> str:
        tried.append(address)
        return "450 4.2.1 mailbox busy" if address.startswith("later@") else "250 OK"

    sink = sinks(rcpt_reply=rcpt_reply)
    proc = hedwig(config(f"{HOST}:{sink.port}", max_retries=2))
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        client.cmd(f"MAIL FROM:<{SENDER}>", 250)
        client.cmd("RCPT TO:<now@dest.test>", 250)
        client.cmd("RCPT TO:<later@dest.test>", 250)
        client.cmd("DATA", 354)
        client.send(dot_stuff(message("partial")) + b".\r\n")
        msg_id = queued_id(client.expect(250).text)
    wait_until(lambda: msg_id in read_journal(proc.spool)[0], 10, what="the first attempt's state")
    state = read_journal(proc.spool)[0][msg_id]
    assert state["attempts"] == 1 and state["pending"] == ["later@dest.test"], state
    proc.kill()
    proc.start().wait_ready()
    wait_log(proc, r"spool .*: 1 queued")
    # The second attempt (after the restart) is the last one: max_retries = 2 survived as attempts.
    wait_log(proc, rf"msg_id={msg_id} bounced rcpts=1 ")
    assert tried == ["now@dest.test", "later@dest.test", "later@dest.test"], tried
    assert [m.rcpt_tos for m in sink.messages] == [["now@dest.test"]]
    eml, reason = bounced_paths(proc.spool, msg_id)
    text = reason.read_text()
    assert "<later@dest.test>: 450" in text and "2 attempts" in text and "now@dest.test" not in text, text


@pytest.mark.timeout(30)
def test_deferred_mail_older_than_deferred_retention_expires(hedwig, sinks) -> None:
    sink_rcpts: list[str] = []

    def busy(address: str) -> str:
        sink_rcpts.append(address)
        return "450 4.2.1 not now"

    sink = sinks(rcpt_reply=busy)
    # The next attempt is an hour away: only the cleanup task can notice the age.
    proc = hedwig(config(f"{HOST}:{sink.port}", retry_initial_delay="1h", retry_max_delay="1h") | {
        "storage": {"cleanup": {"deferred_retention": "2s", "interval": "1s"}}})
    sent = time.monotonic()
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        client.cmd(f"MAIL FROM:<{SENDER}>", 250)
        client.cmd("RCPT TO:<old@dest.test>", 250)
        client.cmd("DATA", 354)
        client.send(dot_stuff(message("old")) + b".\r\n")
        msg_id = queued_id(client.expect(250).text)
    how = outcome(proc, msg_id, timeout=10)
    elapsed = time.monotonic() - sent
    assert how == "expired", how
    assert 1.9 <= elapsed <= 6.0, f"expired after {elapsed:.1f}s with deferred_retention = 2s"
    eml, reason = bounced_paths(proc.spool, msg_id)
    assert eml.is_file() and reason.is_file()
    text = reason.read_text()
    assert "<old@dest.test>" in text and "expired" in text, text
    assert sink.messages == []
    assert len(sink_rcpts) == 1, "one attempt, then expired by the cleanup task"


@pytest.mark.timeout(30)
def test_bounced_files_older_than_bounced_retention_are_deleted(hedwig, sinks) -> None:
    sink = sinks(rcpt_reply="550 5.1.1 no such user")
    proc = hedwig(config(f"{HOST}:{sink.port}") | {
        "storage": {"cleanup": {"bounced_retention": "2s", "interval": "1s"}}})
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        client.cmd(f"MAIL FROM:<{SENDER}>", 250)
        client.cmd("RCPT TO:<gone@dest.test>", 250)
        client.cmd("DATA", 354)
        client.send(dot_stuff(message("gone")) + b".\r\n")
        msg_id = queued_id(client.expect(250).text)
    assert outcome(proc, msg_id, timeout=10) == "bounced"
    bounced_at = time.monotonic()
    eml, reason = bounced_paths(proc.spool, msg_id)
    assert eml.is_file() and reason.is_file()
    wait_until(lambda: not eml.exists() and not reason.exists(), 6, interval=0.1,
               what="the bounced files to be deleted")
    assert time.monotonic() - bounced_at >= 1.0, "deleted before bounced_retention passed"
    assert bounced_files(proc.spool) == []


@pytest.mark.timeout(30)
def test_a_damaged_message_is_not_retried_forever(hedwig, sinks) -> None:
    """A body that fails its checksum can never be delivered; max_retries must still end it."""
    down = closed_port()
    proc = hedwig(config(f"{HOST}:{down}", max_retries=2))
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        client.cmd(f"MAIL FROM:<{SENDER}>", 250)
        client.cmd("RCPT TO:<rot@dest.test>", 250)
        client.cmd("DATA", 354)
        client.send(dot_stuff(message("rot")) + b".\r\n")
        msg_id = queued_id(client.expect(250).text)
    wait_until(lambda: msg_id in read_journal(proc.spool)[0], 5, what="the first attempt (refused)")
    proc.kill()  # before the second attempt (0.8 s later at the earliest)
    [segment] = segment_files(proc.spool)
    data = bytearray(segment.read_bytes())
    data[-10] ^= 0xFF  # a bit flip in the body: the header is intact, the payload CRC is not
    segment.write_bytes(bytes(data))
    sink = sinks(port=down)
    proc.start().wait_ready()
    wait_log(proc, r"spool .*: 1 queued")
    wait_log(proc, rf"msg_id={msg_id} ", timeout=5)  # the second attempt has read it, whatever it did

    def mentions() -> int:
        return sum(msg_id in line for line in proc.last_log().splitlines())

    time.sleep(2.5)  # observing that nothing more happens: a bounded quiet period, not readiness
    settled = mentions()
    time.sleep(2.5)
    assert mentions() == settled, (
        f"still retried: {mentions() - settled} more log lines about {msg_id} in 2.5 s\n"
        f"{proc.last_log()[-2000:]}")
    assert sink.messages == []
    # Kept for a human, with the reason, and out of the queue.
    kept = Path(proc.spool) / "quarantine"
    assert (kept / f"{msg_id}.rec").stat().st_size > 0
    assert "checksum" in (kept / f"{msg_id}.reason").read_text()
    assert not segment.exists()  # nothing else was queued in it: reclaimed with its journal
