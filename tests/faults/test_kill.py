"""Processes killed under load: nothing acknowledged is lost; duplicates are counted and bounded.

The real server relays a 2,000-message load (8 client threads, pipelined
transactions, a new connection every 50 messages) to a real aiosmtpd sink,
and is killed or stopped at a seeded random moment of it. Each message's
Subject is a unique tag, so "delivered" means the sink holds that tag and
"acknowledged" means a client read the 250 naming its queue id
(tests/support/load.py). Conservation is checked from outside
(tests/support/conservation.py: every acknowledged tag is at the sink or its
id is queued in the spool, read by the independent format reader) and from
the server's own counters.

At-least-once (ARCHITECTURE.md): a message can reach the upstream twice only
if a process died between the upstream's 250 and the durable done line, so
every duplicate is a message a delivery greenlet of the killed process held:
at most `delivery_concurrency` per killed worker, each copied at most once
per kill. A graceful stop (SIGTERM) lets deliveries in flight finish and
journal their outcome, so it makes no duplicate at all.

Every round's numbers go to the "fault injection" section of the terminal
summary (tests/faults/conftest.py).
"""

from __future__ import annotations

import os
import random
import re
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_delivery import delivery_config, sinks  # noqa: F401 - fixture
from tests.support.conservation import conserved, metrics_conserved, queued_at_start, queued_ids
from tests.support.load import Load, sink_tags, tag_of
from tests.support.proc import HOST, HedwigProcess, RawClient, free_port, read_spool, wait_until
from tests.support.scrape import Scrape, scrape, scrape_until

pytestmark = pytest.mark.faults

DOMAIN = "sink.test"
TOTAL = 2000
THREADS = 8
PER_CONNECTION = 50
CONCURRENCY = 16  # delivery_concurrency (and pool_size) per worker: the duplicate bound's unit
STOP_LIMIT = {1: 10.0, 2: 15.0}  # SPEC §10: every process gone this soon after SIGTERM
COUNTERS = ("hedwig_emails_received_total", "hedwig_emails_sent_total", "hedwig_emails_bounced_total",
            "hedwig_emails_dropped_total", "hedwig_queue_depth")


def relay(sink_port: int, workers: int, metrics_port: int, concurrency: int = CONCURRENCY) -> dict[str, Any]:
    config = delivery_config(routes={DOMAIN: f"{HOST}:{sink_port}"}, workers=workers,
                             delivery_concurrency=concurrency, pool_size=concurrency)
    config["server"]["metrics"] = {"bind": f"{HOST}:{metrics_port}"}
    return config


def gone(pid: int) -> bool:
    """The process is dead (no /proc entry, or a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def tags_of(spool: Path, ids: set[str]) -> set[str]:
    """The tags of these queued messages, read from their records."""
    snap = read_spool(spool)
    return {tag_of(snap.one(i)[1]) or f"?{i}" for i in ids}


def counters(m: Scrape) -> tuple[float, ...]:
    return tuple(m.value(name) for name in COUNTERS)


def all_started(proc: HedwigProcess) -> None:
    """Every worker of this start has logged its start line (one answering 220 is not all)."""
    wait_until(lambda: " ready: " in proc.last_log(), 10, what="the master's ready line")


def quiet(port: int, timeout: float = 20.0) -> Scrape:
    """A scrape with queue depth 0 whose counters stay the same over two worker ticks (1 s each)."""
    deadline = time.monotonic() + timeout
    last = scrape_until(port, lambda m: m.value("hedwig_queue_depth") == 0, timeout, what="queue depth 0")
    while True:
        time.sleep(1.1)  # a stability window (every worker sets its depth once a second), not a readiness guess
        now = scrape(port)
        if counters(now) == counters(last) and now.value("hedwig_queue_depth") == 0:
            return now
        assert time.monotonic() < deadline, f"never quiet; last scrape:\n{now.text}"
        last = now


def kill_moment(rng: random.Random) -> int:
    """How many acknowledgements into the load the fault strikes (seeded)."""
    return rng.randrange(TOTAL // 20, TOTAL * 19 // 20)


def wait_acked(load: Load, count: int) -> None:
    wait_until(lambda: load.count() >= count or load.stop.is_set(), 60, interval=0.002,
               what=f"{count} messages acknowledged")


def check_duplicates(copies: Counter[str], acked: dict[str, str], unsure: set[str], candidates: set[str],
                     bound: int) -> int:
    """The promise about duplicates after one kill; returns the number of extra copies."""
    duplicated = {tag: n for tag, n in copies.items() if n > 1}
    extra = sum(n - 1 for n in duplicated.values())
    assert extra <= bound, f"{extra} extra copies, more than the {bound} deliveries that can be in flight"
    assert all(n == 2 for n in duplicated.values()), f"a message delivered 3+ times after one kill: {duplicated}"
    # Only a message the client was told about (or whose 250 the kill cut off) ...
    assert set(duplicated) <= set(acked) | unsure, sorted(set(duplicated) - set(acked) - unsure)
    # ... and only one the killed process held, with no done line: in flight at the kill.
    assert set(duplicated) <= candidates, sorted(set(duplicated) - candidates)
    return extra


# -- SIGKILL of the whole server ---------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(10), ids=[f"seed{s}" for s in range(10)])
def test_sigkill_of_the_server_then_restart_delivers_everything_acknowledged(
        hedwig, sinks, fault_report, seed: int) -> None:
    """Promise: a 250 is a promise kept through a crash. SIGKILL of the master (its workers die
    with it, PR_SET_PDEATHSIG) at a random moment of a 2,000-message load; right after the kill
    every acknowledged message is at the upstream or queued in the spool; a restart on the same
    spool finds exactly the queued ones (its log, its counters) and delivers them all. Duplicates
    are only messages in flight at the kill: at most delivery_concurrency x workers, each twice,
    each found queued at restart. Odd seeds run 2 workers, even seeds 1."""
    started = time.monotonic()
    rng = random.Random(seed)
    workers = 1 + seed % 2
    sink = sinks()
    metrics_port = free_port()
    proc = hedwig(relay(sink.port, workers, metrics_port))
    pids = proc.wait_workers(workers)
    load = Load(proc.port, TOTAL, THREADS, rcpt=f"rcpt@{DOMAIN}", per_connection=PER_CONNECTION).start()
    kill_at = kill_moment(rng)
    wait_acked(load, kill_at)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(5) == -signal.SIGKILL
    wait_until(lambda: all(gone(p) for p in pids), 5, what="the workers to die with their master")
    load.stop.set()
    load.join()
    acked, unsure = load.snapshot()
    delivered_before = len(sink.messages)

    at_kill = conserved(acked, sink_tags(sink), proc.spool)
    at_kill.assert_nothing_lost()
    queued = queued_ids(proc.spool)
    queued_tags = tags_of(proc.spool, queued)

    proc.start().wait_ready()
    all_started(proc)
    assert queued_at_start(proc.last_log()) == len(queued), proc.last_log()
    sink.wait(lambda: set(acked) | queued_tags <= set(sink_tags(sink)), 30, "everything queued delivered")
    m = quiet(metrics_port)
    metrics_conserved(m, queued_at_start=len(queued))
    assert m.value("hedwig_emails_received_total") == 0 and m.value("hedwig_emails_sent_total") == len(queued)
    assert proc.stop() == 0

    copies = Counter(sink_tags(sink))
    after = conserved(acked, copies.elements(), proc.spool)
    after.assert_nothing_lost()
    assert not after.queued and not after.bounced and not after.quarantined, after.summary()
    assert after.delivered == set(acked)
    extra = check_duplicates(copies, acked, unsure, queued_tags, CONCURRENCY * workers)
    fault_report(f"workers={workers} killed after {kill_at} acks: acked={len(acked)} unsure={len(unsure)} "
                 f"delivered before the kill={delivered_before} queued at restart={len(queued)} "
                 f"duplicates={extra} (bound {CONCURRENCY * workers}) in {time.monotonic() - started:.1f}s")


# -- SIGKILL of one worker -----------------------------------------------------------------------


def accepted_by(proc: HedwigProcess, pid: int) -> set[str]:
    return set(re.findall(rf" pid={pid} session_id=\S+ msg_id=(\w+) accepted ", proc.last_log()))


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(3), ids=[f"seed{s}" for s in range(3)])
def test_sigkill_of_one_worker_loses_nothing_and_needs_no_restart(hedwig, sinks, fault_report, seed: int) -> None:
    """Promise: with workers = 2, a worker SIGKILLed at a random moment of a 2,000-message load
    costs at most the transactions it was in: the master replaces it, a live worker (or the
    replacement, taking its writer name) adopts its messages, the load goes on, and every
    acknowledged message is delivered without a restart. Duplicates are only messages the dead
    worker held in flight: at most delivery_concurrency, each twice, each accepted by it.

    The counters at the quiet end (depth 0, nothing changing): the dead worker's counters stay in
    the sum, its gauge leaves it. A 250 is written only after hedwig_emails_received_total counts
    it, so received >= acknowledged, and a message counted but not acknowledged had its reply cut
    by the kill, so received <= acknowledged + unsure. A message is counted sent only after its
    done line is durable, so never delivered again: sent <= distinct messages at the sink. The kill
    can fall between a batch's fdatasync and the counter increments of what that batch woke:
    sessions (committed, not counted; adopted and counted sent later: at most one per client
    connection) and deliveries (done, not counted: at most delivery_concurrency). That window is
    the whole fdatasync: the batch's bytes are written first, and the page cache outlives the
    process, so a kill during the sync keeps them. So
    -delivery_concurrency <= sent + bounced + dropped + depth - received <= client threads, and
    sent >= distinct delivered - delivery_concurrency; exact equality is the usual case, and the
    difference is reported."""
    started = time.monotonic()
    rng = random.Random(100 + seed)
    sink = sinks()
    metrics_port = free_port()
    proc = hedwig(relay(sink.port, 2, metrics_port))
    pids = proc.wait_workers(2)
    victim = rng.choice(sorted(pids))
    load = Load(proc.port, TOTAL, THREADS, rcpt=f"rcpt@{DOMAIN}", per_connection=PER_CONNECTION).start()
    kill_at = kill_moment(rng)
    wait_acked(load, kill_at)
    os.kill(victim, signal.SIGKILL)
    replaced = proc.wait_workers(2, exclude=(victim,))
    load.join()
    acked, unsure = load.snapshot()
    assert len(acked) >= TOTAL - 2 * THREADS, f"mail stopped flowing: {len(acked)} acked, {load.failures} failed"
    assert proc.running and re.search(rf"worker pid={victim} died \(SIGKILL\)", proc.log_text())

    sink.wait(lambda: set(acked) <= set(sink_tags(sink)), 30, "every acknowledged message delivered")
    m = quiet(metrics_port)
    copies = Counter(sink_tags(sink))
    received, sent, bounced, dropped, depth = counters(m)
    difference = sent + bounced + dropped + depth - received
    assert depth == 0 and bounced == 0 and dropped == 0, m.text
    assert len(acked) <= received <= len(acked) + len(unsure), (received, len(acked), len(unsure))
    assert len(copies) - CONCURRENCY <= sent <= len(copies), (sent, len(copies))
    assert -CONCURRENCY <= difference <= THREADS, m.text
    victim_ids = accepted_by(proc, victim)
    assert proc.stop() == 0

    after = conserved(acked, copies.elements(), proc.spool)
    after.assert_nothing_lost()
    assert not after.queued and after.delivered == set(acked), after.summary()
    victim_tags = {tag for tag, msg_id in acked.items() if msg_id in victim_ids}
    extra = check_duplicates(copies, acked, unsure, victim_tags | unsure, CONCURRENCY)
    fault_report(f"killed worker {victim} after {kill_at} acks (replacement {sorted(set(replaced) - set(pids))}): "
                 f"acked={len(acked)} failed={load.failures} unsure={len(unsure)} accepted by the victim="
                 f"{len(victim_ids)} duplicates={extra} (bound {CONCURRENCY}) counters received={received:.0f} "
                 f"sent={sent:.0f} (out - received = {difference:+.0f}) in {time.monotonic() - started:.1f}s")


# -- SIGTERM ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_sigterm_mid_load_exits_0_loses_nothing_and_duplicates_nothing(
        hedwig, sinks, fault_report, workers: int) -> None:
    """Promise (SPEC §9, §10): SIGTERM in the middle of a 2,000-message load stops the server
    with exit 0 within 10 s (one worker) or 15 s (two), the port free; every acknowledged message
    is at the upstream or queued in the spool, and none reached the upstream twice (deliveries in
    flight finish and journal their outcome). A restart delivers the rest, counted exactly
    (received + queued at start = sent), and still nothing arrives twice."""
    started = time.monotonic()
    rng = random.Random(200 + workers)
    sink = sinks()
    metrics_port = free_port()
    # Two delivery greenlets per worker fall behind the load, so the stop leaves a queue to restart with.
    proc = hedwig(relay(sink.port, workers, metrics_port, concurrency=2))
    pids = proc.wait_workers(workers)
    load = Load(proc.port, TOTAL, THREADS, rcpt=f"rcpt@{DOMAIN}", per_connection=PER_CONNECTION).start()
    stop_at = kill_moment(rng)
    wait_acked(load, stop_at)
    signalled = time.monotonic()
    proc.signal(signal.SIGTERM)
    assert proc.wait(STOP_LIMIT[workers]) == 0
    took = time.monotonic() - signalled
    assert all(gone(p) for p in pids)
    with pytest.raises(OSError):
        RawClient(proc.port, timeout=2)
    load.stop.set()
    load.join()
    acked, unsure = load.snapshot()

    at_stop = conserved(acked, sink_tags(sink), proc.spool)
    at_stop.assert_nothing_lost()
    assert not at_stop.duplicates and max(Counter(sink_tags(sink)).values(), default=1) == 1, at_stop.summary()
    queued = queued_ids(proc.spool)

    proc.start().wait_ready()
    all_started(proc)
    assert queued_at_start(proc.last_log()) == len(queued), proc.last_log()
    sink.wait(lambda: set(acked) <= set(sink_tags(sink)), 30, "the rest delivered after the restart")
    m = quiet(metrics_port)
    metrics_conserved(m, queued_at_start=len(queued))
    assert m.value("hedwig_emails_sent_total") == len(queued), m.text
    assert proc.stop() == 0

    copies = Counter(sink_tags(sink))
    after = conserved(acked, copies.elements(), proc.spool)
    after.assert_nothing_lost()
    assert not after.queued and after.delivered == set(acked), after.summary()
    assert max(copies.values()) == 1, {t: n for t, n in copies.items() if n > 1}
    fault_report(f"workers={workers} SIGTERM after {stop_at} acks: exit 0 in {took:.2f}s "
                 f"(limit {STOP_LIMIT[workers]:.0f}s) acked={len(acked)} unsure={len(unsure)} "
                 f"queued at restart={len(queued)} duplicates=0 in {time.monotonic() - started:.1f}s")
