"""Disk faults: a full spool refuses new mail and keeps what it acknowledged; damage is quarantined.

- A spool on a 4 MiB tmpfs that the test fills (a filler file, then the load
  itself): clients get 452 (below `disk_reserve`) or 451 (a write failed),
  every acknowledged message is whole on disk and no refused one is, no
  journal line is torn; with the disk still full the upstream comes back and
  delivered messages whose done line finds no room are not sent again; the
  server does not crash, and once space returns new mail is accepted and
  everything is delivered exactly once.
- `disk_reserve` raised above the free space by a SIGHUP reload: 452; lowered
  again: accepted (this also covers the full-disk refusal where no tmpfs can
  be mounted).
- A queued message whose record is damaged (one byte of its body flipped,
  with the server stopped or running): that message is quarantined
  (quarantine/<id>.rec + .reason, a log line), the server keeps running and
  the rest of the queue is delivered. A flipped byte in a record's *header*
  costs that record alone: the scan resynchronises on the next whole record,
  and the skipped bytes are quarantined under the message's id.

Every scenario ends with the conservation check (tests/support/conservation.py)
at a quiet moment.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.faults.test_kill import quiet
from tests.faults.test_upstream import deferred_once, drain, faulty_relay, run_load, settle
from tests.integration.test_delivery import sinks  # noqa: F401 - fixture
from tests.support.conservation import conserved
from tests.support.load import Load, sink_tags, tagged
from tests.support.proc import (
    HOST,
    RECORD_HEADER,
    HedwigProcess,
    RawClient,
    free_port,
    journal_files,
    read_journal,
    read_spool,
    read_segment,
    segment_files,
    to_toml,
    wait_until,
)
from tests.support.scrape import Scrape
from tests.support.sink import closed_port

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]

DOMAIN = "disk.test"
RCPTS = (f"rcpt@{DOMAIN}",)
MIB = 1 << 20


def mail_reply(port: int) -> int:
    """The reply code to MAIL FROM on a fresh connection (452 when the spool is below its reserve)."""
    with RawClient(port, timeout=5) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        code = client.cmd("MAIL FROM:<probe@client.test>").code
        client.cmd("QUIT")
        return code


def free_space(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` mounted on `path` for the block (skips the test if mounting is not allowed)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=10)
        why = done.stderr.strip() or f"exit {done.returncode}" if done.returncode else ""
    except OSError as exc:  # no mount(8)
        why = str(exc)
    if why:
        pytest.skip(f"cannot mount a {size} tmpfs ({why}); the full-disk refusal is still covered by "
                    "test_disk_reserve_raised_by_a_reload_refuses_with_452_and_lowered_accepts_again")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=10)


def assert_whole_journals(spool: Path) -> None:
    """Every journal line up to the last newline is a whole JSON object (a failed append leaves none)."""
    for path in journal_files(spool):
        data = path.read_bytes()
        for n, line in enumerate(data[: data.rfind(b"\n") + 1].splitlines()):
            try:
                json.loads(line)
            except ValueError:
                raise AssertionError(f"{path.name} line {n + 1} is torn: {line[:120]!r}") from None


def padded(tag: str, size: int) -> bytes:
    """A tagged message of about `size` bytes (1000-byte lines)."""
    return tagged(tag) + (b"p" * 998 + b"\r\n") * max(1, size // 1000)


def fill_up(path: Path) -> None:
    """Write `path` until the filesystem has no block left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def on_disk_exactly(proc: HedwigProcess, acked: dict[str, str], delivered: set[str]) -> None:
    """Every acknowledged message not yet delivered is whole in the spool; no refused one is there;
    every journal line is whole."""
    assert_whole_journals(proc.spool)
    report = conserved(acked, delivered, proc.spool)
    assert report.queued >= set(acked) - delivered and not report.missing, report.summary()
    ghosts = read_spool(proc.spool).ids - set(acked.values())
    assert not ghosts, f"{len(ghosts)} records of refused messages in the spool: a restart would deliver them"


def test_full_spool_filesystem_refuses_mail_keeps_what_it_acked_and_recovers(
        tmp_path: Path, sinks, fault_report) -> None:
    """Promise (SPEC §2 disk_reserve, §4): on a spool filesystem that fills up, clients get 452
    (below disk_reserve) or 451 (a write failed) and never a 250 for a message that is not whole
    on disk: every acknowledged message is in the spool, intact, and nothing refused is (a failed
    append leaves no record and no torn journal line behind). While the disk stays full the
    upstream comes back: deliveries whose outcome cannot be journalled are not sent again and
    again. The server does not crash (same worker throughout). When space returns, new mail is
    accepted again and every acknowledged message is delivered exactly once (conservation from
    outside and from the counters)."""
    started = time.monotonic()
    down = closed_port()  # the upstream is down while the disk fills: everything stays queued
    metrics_port = free_port()
    proc = HedwigProcess(tmp_path / "hedwig", faulty_relay({DOMAIN: f"{HOST}:{down}"}, metrics_port,
                                                           disk_reserve="1MiB"))
    with tmpfs(proc.spool, "4m"):
        try:
            proc.start().wait_ready()
            [worker] = proc.wait_workers(1)
            filler = proc.spool / "filler"
            filler.write_bytes(b"\0" * (free_space(proc.spool) - int(2.5 * MIB)))
            assert 2 * MIB < free_space(proc.spool) < 3 * MIB
            # 32 KiB messages, every 8th 300 KiB (received through tmp/, copied into the log)
            sizes = {f"full-{i}": 300_000 if i % 8 == 0 else 32_000 for i in range(1, 151)}
            load = Load(proc.port, len(sizes), 4, rcpt=RCPTS, prefix="full", per_connection=150,
                        content=lambda tag: padded(tag, sizes[tag])).start()
            load.join()
            acked, refused = dict(load.acked), dict(load.refused)
            codes = sorted(set(refused.values()))
            assert acked and refused and set(codes) <= {451, 452}, (len(acked), refused, load.failures)
            assert not load.unsure and len(acked) + len(refused) == len(sizes), (load.failures, load.unsure)
            on_disk_exactly(proc, acked, set())
            # The reserve is checked at most once a second: a burst may fill the disk first (451).
            wait_until(lambda: mail_reply(proc.port) == 452, 5, interval=0.2, what="452 below the reserve")

            # Not one block left, and the upstream comes back: for 3 s deliveries succeed while
            # their outcome (and every deferral) may find no room in the journal.
            fill_up(proc.spool / "filler2")
            sink = sinks(port=down)
            time.sleep(3)  # the fault's duration, not a readiness guess
            full_copies = len(sink.messages)
            on_disk_exactly(proc, acked, set(sink_tags(sink)))
            assert proc.running and proc.worker_pids() == [worker], proc.last_log()[-3000:]

            filler.unlink()
            (proc.spool / "filler2").unlink()
            wait_until(lambda: mail_reply(proc.port) == 250, 5, interval=0.2, what="mail accepted again")
            acked.update(run_load(proc.port, 20, rcpts=RCPTS, prefix="after"))
            report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
            assert report.delivered == set(acked) and not report.bounced, report.summary()
            assert not report.duplicates, f"{report.summary()}: {sorted(report.duplicates.items())[:10]}"
            assert proc.worker_pids() == [worker], "the worker was replaced: it crashed"
            unrecorded = proc.log_text().count("not recorded")
            fault_report(f"{report.summary()} refused={len(refused)} with {codes}; delivered while full="
                         f"{full_copies}, outcomes waiting for room={unrecorded} in {time.monotonic() - started:.1f}s")
        finally:
            proc.close()


def reload_with(proc: HedwigProcess, **server: object) -> int:
    """Rewrite the config with these server keys, SIGHUP, wait for the new worker alone; its pid."""
    old = proc.worker_pids()
    proc.config["server"].update(server)
    proc.config_path.write_text(to_toml(proc.config))
    proc.signal(signal.SIGHUP)
    [new] = proc.wait_workers(1, exclude=tuple(old), timeout=15)
    return new


def test_disk_reserve_raised_by_a_reload_refuses_with_452_and_lowered_accepts_again(
        hedwig, sinks, fault_report) -> None:
    """Promise (SPEC §2, §9): disk_reserve raised above the spool's free space by a SIGHUP reload
    makes new mail get 452 4.3.1 at MAIL (nothing acknowledged, nothing queued); lowered again by
    another reload, mail is accepted. Mail acknowledged before, between and after is all
    delivered, and the master's counters balance across the worker generations."""
    started = time.monotonic()
    sink = sinks()
    metrics_port = free_port()
    proc = hedwig(faulty_relay({DOMAIN: f"{HOST}:{sink.port}"}, metrics_port, disk_reserve=0))
    acked = run_load(proc.port, 40, rcpts=RCPTS, prefix="before")

    reload_with(proc, disk_reserve=free_space(proc.spool) + 1024 * MIB)
    refused = Load(proc.port, 40, 4, rcpt=RCPTS, prefix="over", per_connection=40).start()
    refused.join()
    assert not refused.acked and set(refused.refused.values()) == {452}, (refused.acked, refused.refused)
    with RawClient(proc.port) as client:
        client.expect(220)
        client.cmd("EHLO client.test", 250)
        reply = client.cmd("MAIL FROM:<probe@client.test>", 452)
        assert reply.text.startswith("4.3.1"), reply.raw

    reload_with(proc, disk_reserve=0)
    acked.update(run_load(proc.port, 40, rcpts=RCPTS, prefix="after"))
    report = settle(proc, acked, lambda: sink_tags(sink), metrics_port)
    assert report.delivered == set(acked) and not report.bounced and not report.duplicates, report.summary()
    assert not set(refused.refused) & set(sink_tags(sink))
    fault_report(f"{report.summary()} refused while over the reserve={len(refused.refused)} (452) "
                 f"in {time.monotonic() - started:.1f}s")


# -- damaged records -------------------------------------------------------------------------------------


def corrupt_body_byte(spool: Path, msg_id: str, rng: random.Random) -> Path:
    """Flip one byte in the body of `msg_id`'s record (headers and lengths intact); its segment."""
    for path in segment_files(spool):
        records, _torn = read_segment(path)
        for rec in records:
            if rec.msg_id == msg_id:
                at = rec.offset + RECORD_HEADER.size + len(rec.meta) + rng.randrange(len(rec.body))
                with open(path, "r+b") as f:
                    f.seek(at)
                    byte = f.read(1)
                    f.seek(at)
                    f.write(bytes([byte[0] ^ 0x5A]))
                return path
    raise AssertionError(f"{msg_id} not in any segment")


def quarantined(proc: HedwigProcess, msg_id: str) -> str:
    """Wait for the quarantine files and the log line of `msg_id`; the reason text."""
    rec, reason = proc.spool / "quarantine" / f"{msg_id}.rec", proc.spool / "quarantine" / f"{msg_id}.reason"
    try:
        wait_until(lambda: reason.is_file() and re.search(rf"msg_id={msg_id} damaged: quarantined", proc.log_text()),
                   15, interval=0.1, what=f"{msg_id} quarantined")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.last_log()[-3000:]}") from None
    assert rec.is_file() and rec.stat().st_mode & 0o777 == 0o600
    return reason.read_text()


def counted_with_quarantine(m: Scrape, queued_at_start: int, quarantined_count: int) -> None:
    """The metric form of conservation when messages were quarantined (counted in none of the totals)."""
    received = m.value("hedwig_emails_received_total") + queued_at_start
    out = (m.value("hedwig_emails_sent_total") + m.value("hedwig_emails_bounced_total")
           + m.value("hedwig_emails_dropped_total") + m.value("hedwig_queue_depth"))
    assert received == out + quarantined_count, m.text


@pytest.mark.parametrize("when", ["stopped", "running"])
def test_a_damaged_record_is_quarantined_and_the_rest_delivered(hedwig, sinks, fault_report, when: str) -> None:
    """Promise (ARCHITECTURE: quarantine): a queued message whose record fails its checksum -- one
    byte of its body flipped while the server is stopped, or while it runs -- is never delivered
    damaged and never blocks the queue: it is moved to quarantine/<id>.rec with a .reason and an
    error log line, the server keeps running (same worker), the other 39 messages and mail sent
    afterwards are delivered, and conservation counts the damaged one as quarantined."""
    started = time.monotonic()
    rng = random.Random(f"damage-{when}")
    down = closed_port()
    metrics_port = free_port()
    proc = hedwig(faulty_relay({DOMAIN: f"{HOST}:{down}"}, metrics_port))
    acked = run_load(proc.port, 40, rcpts=RCPTS, prefix=f"damage-{when}")
    deferred_once(proc, acked)
    victim_tag = rng.choice(sorted(acked))
    victim = acked[victim_tag]
    if when == "stopped":
        assert proc.stop() == 0
        segment = corrupt_body_byte(proc.spool, victim, rng)
        proc.start().wait_ready()
    else:
        segment = corrupt_body_byte(proc.spool, victim, rng)
    [worker] = proc.wait_workers(1)
    sink = sinks(port=down)  # the upstream comes up: the next attempt reads every body

    reason = quarantined(proc, victim)
    assert victim in reason and "checksum" in reason, reason
    assert read_journal(proc.spool)[1].get(victim) == "quarantined"
    later = run_load(proc.port, 10, rcpts=RCPTS, prefix=f"later-{when}")  # the server still takes and delivers mail
    others = (set(acked) - {victim_tag}) | set(later)
    sink.wait(lambda: others <= set(sink_tags(sink)), 20, "the rest of the queue delivered")
    assert victim_tag not in sink_tags(sink), "a damaged message was delivered"
    m = quiet(metrics_port)
    counted_with_quarantine(m, 0 if when == "running" else len(acked), 1)
    assert proc.worker_pids() == [worker], "the worker was replaced: it crashed"

    # The damaged record's segment goes once nothing in it is queued; a segment still being
    # appended to stays until the next start, which never appends to it again.
    if when == "running":
        proc.restart()
    wait_until(lambda: not segment.exists(), 10, what=f"{segment.name} reclaimed")
    acked.update(later)
    report = drain(proc, acked, lambda: sink_tags(sink))
    assert report.quarantined == {victim_tag} and report.delivered == set(acked) - {victim_tag}, report.summary()
    assert not report.duplicates and not report.bounced, report.summary()
    fault_report(f"{report.summary()} in {time.monotonic() - started:.1f}s")


def corrupt_header_byte(spool: Path, msg_id: str) -> Path:
    """Flip one byte of `msg_id`'s record header (its flags byte: the header CRC then fails)."""
    for path in segment_files(spool):
        for rec in read_segment(path)[0]:
            if rec.msg_id == msg_id:
                with open(path, "r+b") as f:
                    f.seek(rec.offset + 5)
                    f.write(b"\x01")
                return path
    raise AssertionError(f"{msg_id} not in any segment")


def test_a_damaged_record_header_hides_no_later_message(hedwig, sinks, fault_report) -> None:
    """Promise (the issue: a damaged queue file is quarantined, never blocking the rest): one
    flipped byte in the header of the 5th of 20 queued messages (server stopped) costs at most
    that message: after the start every other one is found again and delivered, and the damaged
    one is quarantined -- none silently disappears with its segment."""
    down = closed_port()
    metrics_port = free_port()
    proc = hedwig(faulty_relay({DOMAIN: f"{HOST}:{down}"}, metrics_port))
    acked = run_load(proc.port, 20, rcpts=RCPTS, prefix="header", threads=1)
    deferred_once(proc, acked)
    order = [rec.msg_id for path in segment_files(proc.spool) for rec in read_segment(path)[0]]
    victim = order[4]
    assert proc.stop() == 0
    corrupt_header_byte(proc.spool, victim)
    sink = sinks(port=down)
    proc.start().wait_ready()
    found = int(re.search(r": (\d+) queued, ", proc.last_log())[1])
    assert found >= len(acked) - 1, f"only {found} of {len(acked)} queued messages found after the damage"
    report = drain(proc, acked, lambda: sink_tags(sink), timeout=10)
    assert report.delivered | report.quarantined == set(acked), report.summary()
