"""SPEC §4: disk use follows the live backlog, not history -- with deferred mail in every segment.

Hedwig runs with 64 KiB segments (HEDWIG_TEST_SEGMENT_MAX, a knob for tests
only). Mail to fast.test is delivered at once; mail to slow.test, sent
alongside it, is deferred (451) and retried every second or two, so nearly
every segment written keeps a message or two queued. Compaction (every 10 s
in each worker) copies those forward: the log directory shrinks to about
the deferred backlog. Then slow.test accepts again and every acknowledged
message is delivered exactly once (tests/support/conservation.py). Once more
with a SIGKILL while segments are being compacted, and a restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.conservation import conserved, queued_ids
from tests.support.load import Load, sink_tags, tagged
from tests.support.proc import HOST, HedwigProcess, Replace, segment_files, wait_until
from tests.support.sink import Sink

SEGMENT = 64 * 1024
FAST, SLOW = 360, 60
FILLER = (b"y" * 76 + b"\r\n") * 40  # about 3 KiB a message: some 20 a segment


def big(tag: str) -> bytes:
    return tagged(tag) + FILLER


def log_bytes(spool: Path) -> int:
    total = 0
    for path in segment_files(spool):
        try:
            total += path.stat().st_size
        except FileNotFoundError:  # reclaimed meanwhile
            pass
    return total


def shrunk(proc: HedwigProcess) -> bool:
    """The log holds about the queued mail: its records and at most two segments more."""
    live = len(queued_ids(proc.spool)) * (len(big("slow-00")) + 1024)  # a record: body + envelope + header
    return log_bytes(proc.spool) <= live + 2 * SEGMENT


def wait_shrunk(proc: HedwigProcess) -> None:
    try:
        wait_until(lambda: shrunk(proc), 40, interval=0.2, what="the log shrinking to the live backlog")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {log_bytes(proc.spool)} bytes in {len(segment_files(proc.spool))} "
                             f"segments\n{proc.last_log()[-3000:]}") from None


@pytest.mark.timeout(150)
@pytest.mark.parametrize("crash", [False, True], ids=["running", "sigkill-mid-compaction"])
def test_deferred_mail_does_not_pin_segments_and_is_delivered_exactly_once(tmp_path: Path, crash: bool) -> None:
    """With `crash`, the server is SIGKILLed as soon as the first segment is compacted (the
    others are being moved) and started again: the copies and the old segments sort themselves out."""
    sink = Sink(rcpt_reply=lambda rcpt: "451 4.4.1 not now" if rcpt.endswith("@slow.test") else "250 OK")
    config = {"server": {
        "outbound_local": True, "max_retries": 1000, "retry_initial_delay": "1s", "retry_max_delay": "2s",
        "routes": Replace({"*": f"{HOST}:{sink.port}"}),
    }}
    proc = HedwigProcess(tmp_path / "hedwig", config, env={"HEDWIG_TEST_SEGMENT_MAX": str(SEGMENT)})
    try:
        proc.start().wait_ready()
        fast = Load(proc.port, FAST, threads=3, rcpt="r@fast.test", per_connection=20, prefix="fast",
                    content=big).start()
        slow = Load(proc.port, SLOW, threads=1, rcpt="r@slow.test", per_connection=20, prefix="slow",
                    content=big).start()
        fast.join()
        slow.join()
        acked = {**fast.acked, **slow.acked}
        assert len(acked) == FAST + SLOW, (fast.refused, slow.refused)
        written = len(acked) * len(big("fast-000"))
        wait_until(lambda: len(set(sink_tags(sink))) >= FAST, 30, interval=0.1, what="the fast mail delivered")
        if crash:
            wait_until(lambda: "compacted segment" in proc.last_log(), 30, interval=0.005, what="a compaction")
            proc.kill()
            proc.start().wait_ready()

        wait_shrunk(proc)
        assert "compacted segment" in proc.log_text()
        assert queued_ids(proc.spool) == set(slow.acked.values())  # nothing of it delivered yet
        assert log_bytes(proc.spool) * 4 < written
        print(f"\n{written} bytes written, {log_bytes(proc.spool)} in the log with {SLOW} deferred")

        sink.rcpt_reply = None  # slow.test accepts again
        wait_until(lambda: set(sink_tags(sink)) >= set(acked), 30, interval=0.1, what="every message delivered")
        deadline = time.monotonic() + 10
        while queued_ids(proc.spool) and time.monotonic() < deadline:  # the done lines
            time.sleep(0.1)
        assert proc.stop() == 0
        report = conserved(acked, sink_tags(sink), proc.spool)
        report.assert_nothing_lost()
        assert not report.duplicates and not report.queued and not report.unexpected, report.summary()
    finally:
        proc.close()
        sink.stop()
