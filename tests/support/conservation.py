"""The conservation of messages: every acknowledged message is delivered, bounced, dropped or still queued.

Two independent ways to check it at a quiet moment (nothing in flight):

    report = conserved(acked, sink_tags, spool)      # from outside: clients, sink, files
    report.assert_nothing_lost()                     # raises with the missing tags listed
    report.duplicates                                # tag -> copies the sink got beyond the first

    metrics_conserved(scrape(port), queued_at_start(proc.last_log()))   # the server's counters (one run)

`acked` maps a tag (a unique Subject, Message-ID or similar the test put in
each message) to the queue id of the `250` the client read. `sink_tags` is
every tag the upstream received, in order, one entry per delivered copy
(so duplicates show). The spool side reads the on-disk contract
independently (tests/support/proc.py): a message is queued when its record
is intact and no journal says it is done; bounced when `bounced/<hh>/<id>.eml`
exists; quarantined when `quarantine/<id>.rec` exists. At-least-once means a
message may be delivered twice (a crash between the upstream's 250 and the
done line), never zero times.

The metric form holds within one server run (counters start at zero with
each start): received + queued at start = sent + bounced + dropped + queue
depth (+ deleted and quarantined messages, which these tests do not make
unless they say so; expired ones count as bounced). It is exact at a quiet
moment of a run nobody SIGKILLed. A SIGKILLed worker's counters stay in the
sum, and the kill may fall after a batch's write (the page cache outlives
the process, so the batch is kept) but before the counter increments of the
sessions (committed, not counted: its adopter counts it sent later) or of
the deliveries (done, not counted) waiting for that batch's fdatasync: the
sides then differ by at most what that worker had in those two windows
(tests/faults/test_kill.py says exactly what it asserts).

Must not: import gevent or hedwig.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.proc import read_journal, read_spool
from tests.support.scrape import Scrape


@dataclass
class Report:
    acked: int
    delivered: set[str] = field(default_factory=set)  # tags
    bounced: set[str] = field(default_factory=set)
    quarantined: set[str] = field(default_factory=set)
    queued: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    duplicates: dict[str, int] = field(default_factory=dict)
    unexpected: set[str] = field(default_factory=set)  # delivered tags nobody acknowledged

    def assert_nothing_lost(self) -> None:
        assert not self.missing, (
            f"{len(self.missing)} of {self.acked} acknowledged messages are neither delivered, bounced, "
            f"quarantined nor queued: {sorted(self.missing)[:10]}")

    def summary(self) -> str:
        return (f"acked={self.acked} delivered={len(self.delivered)} bounced={len(self.bounced)} "
                f"quarantined={len(self.quarantined)} queued={len(self.queued)} missing={len(self.missing)} "
                f"duplicated={len(self.duplicates)} (extra copies {sum(self.duplicates.values())})")


def queued_ids(spool: Path | str) -> set[str]:
    """Ids with an intact record in the spool and no done line in any journal."""
    _states, done = read_journal(spool)
    return {msg_id for msg_id in read_spool(spool).ids if msg_id not in done}


def kept_ids(spool: Path | str, directory: str, suffix: str) -> set[str]:
    root = Path(spool) / directory
    return {p.name[: -len(suffix)] for p in root.rglob(f"*{suffix}")} if root.is_dir() else set()


def conserved(acked: Mapping[str, str], sink_tags: Iterable[str], spool: Path | str) -> Report:
    """Where each acknowledged message is now; see the module docstring."""
    copies = Counter(sink_tags)
    by_id = {msg_id: tag for tag, msg_id in acked.items()}
    queued = queued_ids(spool)
    bounced = kept_ids(spool, "bounced", ".eml")
    quarantined = kept_ids(spool, "quarantine", ".rec")
    report = Report(acked=len(acked))
    report.delivered = {tag for tag in acked if copies[tag]}
    report.bounced = {by_id[i] for i in bounced if i in by_id}
    report.quarantined = {by_id[i] for i in quarantined if i in by_id}
    report.queued = {by_id[i] for i in queued if i in by_id}
    report.missing = set(acked) - report.delivered - report.bounced - report.quarantined - report.queued
    report.duplicates = {tag: n - 1 for tag, n in copies.items() if n > 1 and tag in acked}
    report.unexpected = set(copies) - set(acked)
    return report


def queued_at_start(log: str) -> int:
    """Queued messages one start's workers found (`log`: that start's log, e.g. `proc.last_log()`).

    Each worker's start line (`spool ...: N queued, ...`) counts its own writer's
    messages and what it adopted before it (the `adopted N queued messages` line
    just above); adoptions after its start line are logged alone.
    """
    found, started = 0, set()
    for line in log.splitlines():
        pid = re.search(r" pid=(\d+) ", line)
        start = re.search(r": (\d+) queued, \d+ unfinished removed", line)
        adopted = re.search(r"adopted (\d+) queued messages", line)
        if pid and start:
            found += int(start[1])
            started.add(pid[1])
        elif pid and adopted and pid[1] in started:
            found += int(adopted[1])
    return found


def metrics_conserved(m: Scrape, queued_at_start: int = 0) -> None:
    """received + queued at start = sent + bounced + dropped + queue depth, from one run's counters.

    `queued_at_start`: what this run found in the spool when it started
    (`queued_at_start(proc.last_log())`), which its counters never saw arrive.
    """
    received = m.value("hedwig_emails_received_total") + queued_at_start
    out = (m.value("hedwig_emails_sent_total") + m.value("hedwig_emails_bounced_total")
           + m.value("hedwig_emails_dropped_total") + m.value("hedwig_queue_depth"))
    assert received == out, (
        f"received {m.value('hedwig_emails_received_total')} + {queued_at_start} queued at start "
        f"!= sent {m.value('hedwig_emails_sent_total')} + bounced "
        f"{m.value('hedwig_emails_bounced_total')} + dropped {m.value('hedwig_emails_dropped_total')} "
        f"+ queued {m.value('hedwig_queue_depth')}")
