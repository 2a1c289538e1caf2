"""The queue tools' pieces on real temporary spools: the scheduler's hooks, the control protocol.

Spools are filled through hedwig.spool itself (gevent unpatched, as in
test_spool.py). The control protocol is exercised with the server's side
(`Control`) on this thread's hub and the tool's side (`control.request`) in a
real thread, talking only through files, as two processes would.
"""

from __future__ import annotations

import json
import os
import threading
import time

import gevent
import pytest

from hedwig import control
from hedwig.scheduler import Scheduler
from hedwig.spool import Envelope, Location, QueueEntry, Spool, journal_path, load_journal, new_id

pytestmark = pytest.mark.timeout(60)

SECRET = b"body-secret-do-not-print"


def accept(spool: Spool, rcpts: tuple[str, ...] = ("a@x.test",), subject: str = "hello") -> str:
    env = Envelope(msg_id=new_id(), sender="s@client.test", recipients=rcpts, received_at=time.time(),
                   client="127.0.0.1", helo="client.test")
    writer = spool.create(env)
    writer.write(f"Received: by mx.test\r\nSubject: {subject}\r\nFrom: s@client.test\r\n\r\n".encode()
                 + SECRET + b"\r\n")
    spool.commit(writer)
    return writer.msg_id


def defer(spool: Spool, msg_id: str, due: float, pending: tuple[str, ...] | None = None) -> None:
    entry = spool.entries[msg_id]
    entry.attempts, entry.due, entry.last_error = 1, due, "451 4.3.0 try later"
    entry.pending = pending
    spool.record_state(entry)


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"))
    s.open()
    yield s
    s.close()


# -- the scheduler's hooks ----------------------------------------------------------------------------


def entry(n: int, due: float = 0.0) -> QueueEntry:
    msg_id = f"{n:026d}"
    return QueueEntry(msg_id, Location("seg", n, ord("M"), msg_id, 0, 0, 0), due=due)


def test_discard_forgets_ready_waiting_and_backlog_but_not_claimed():
    now = [1000.0]
    s = Scheduler(window=2, clock=lambda: now[0])
    for e in (entry(1), entry(2), entry(3), entry(4, due=5000)):
        s.add(e)
    claimed = s.take(timeout=0)
    assert s.discard(claimed.msg_id) is None  # being delivered: the caller waits
    assert s.discard(entry(3).msg_id).msg_id == entry(3).msg_id  # from the backlog
    assert s.discard(entry(4).msg_id).msg_id == entry(4).msg_id  # from the timers
    assert s.discard(entry(4).msg_id) is None
    assert s.take(timeout=0).msg_id == entry(2).msg_id
    assert s.take(timeout=0) is None
    now[0] = 6000
    assert s.take(timeout=0) is None


def test_make_due_moves_one_or_all_waiting_messages():
    now = [1000.0]
    s = Scheduler(clock=lambda: now[0])
    for n in (1, 2, 3):
        s.add(entry(n, due=5000))
    s.add(entry(4))
    assert s.make_due(entry(2).msg_id).due == 1000.0
    assert s.make_due(entry(4).msg_id) is None  # due already
    assert [s.take(timeout=0).msg_id for _ in range(2)] == [entry(4).msg_id, entry(2).msg_id]
    assert s.take(timeout=0) is None
    assert sorted(e.msg_id for e in s.make_all_due()) == [entry(1).msg_id, entry(3).msg_id]
    assert s.make_all_due() == []
    assert {s.take(timeout=0).msg_id for _ in range(2)} == {entry(1).msg_id, entry(3).msg_id}


# -- the control protocol -----------------------------------------------------------------------------


def serve_while(thread_fn, spool: Spool, scheduler: Scheduler, budget: float = 20.0):
    """Run Control on this hub while `thread_fn` runs in a real thread; returns its result."""
    ctl = control.Control(spool, scheduler)
    ctl.start()
    result: list = []
    thread = threading.Thread(target=lambda: result.append(thread_fn()), daemon=True)
    thread.start()
    deadline = time.monotonic() + budget
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            gevent.sleep(0.02)
    finally:
        ctl.stop()
    assert not thread.is_alive(), "the tool did not return"
    return result[0]


def offline_must_not_run():
    raise AssertionError("went offline though a server holds the lock")


def test_requests_to_a_running_server_delete_and_retry(spool):
    base = spool.base_path
    lock = control.hold_lock(base)
    try:
        scheduler = Scheduler()
        keep, gone = accept(spool), accept(spool)
        defer(spool, keep, time.time() + 3600)
        defer(spool, gone, time.time() + 3600)
        scheduler.add_all([spool.entries[keep], spool.entries[gone]])

        answer = serve_while(lambda: control.request(base, "delete", gone, offline_must_not_run), spool, scheduler)
        assert answer["status"] == "deleted"
        assert gone not in spool.entries and load_journal(journal_path(spool.entries[keep].loc.path))[1] == {
            gone: "deleted"}

        answer = serve_while(lambda: control.request(base, "delete", gone, offline_must_not_run), spool, scheduler)
        assert answer["status"] == "not-queued"

        answer = serve_while(lambda: control.request(base, "retry", keep, offline_must_not_run), spool, scheduler)
        assert answer["status"] == "due"
        assert scheduler.take(timeout=0).msg_id == keep and scheduler.take(timeout=0) is None
        states, _done = load_journal(journal_path(spool.entries[keep].loc.path))
        assert states[keep]["due"] <= time.time()  # journalled
        assert os.listdir(os.path.join(base, control.CTL_DIR)) == []  # nothing left behind
    finally:
        os.close(lock)


def test_delete_waits_for_the_attempt_in_flight(spool):
    base = spool.base_path
    lock = control.hold_lock(base)
    try:
        scheduler = Scheduler()
        msg_id = accept(spool)
        scheduler.add(spool.entries[msg_id])
        claimed = scheduler.take(timeout=0)

        def attempt_ends_deferred() -> None:
            gevent.sleep(0.8)
            claimed.attempts, claimed.due = 1, time.time() + 3600
            scheduler.release(claimed, requeue=True)

        gevent.spawn(attempt_ends_deferred)
        started = time.monotonic()
        answer = serve_while(lambda: control.request(base, "delete", msg_id, offline_must_not_run),
                             spool, scheduler)
        assert answer["status"] == "deleted" and time.monotonic() - started >= 0.7
        assert msg_id not in spool.entries and len(scheduler) == 0
    finally:
        os.close(lock)


def test_an_attempt_that_outlasts_the_request_is_not_cut_off_and_nothing_is_deleted(spool):
    base = spool.base_path
    lock = control.hold_lock(base)
    try:
        scheduler = Scheduler()
        msg_id = accept(spool)
        scheduler.add(spool.entries[msg_id])
        scheduler.take(timeout=0)  # and never released
        answer = serve_while(lambda: control.request(base, "delete", msg_id, offline_must_not_run, timeout=2),
                             spool, scheduler)
        assert answer["ok"] is False and answer["status"] == "busy"
        assert msg_id in spool.entries and msg_id in scheduler.claimed
    finally:
        os.close(lock)


def test_a_request_past_its_deadline_is_dropped(spool):
    ctl_dir = os.path.join(spool.base_path, control.CTL_DIR)
    scheduler = Scheduler()
    msg_id = accept(spool)
    scheduler.add(spool.entries[msg_id])
    ctl = control.Control(spool, scheduler)
    ctl.start()
    try:
        with open(os.path.join(ctl_dir, "0" * 32 + ".req"), "w") as f:
            json.dump({"op": "delete", "id": msg_id, "deadline": time.time() - 1}, f)
        deadline = time.monotonic() + 5
        while os.listdir(ctl_dir) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert os.listdir(ctl_dir) == [] and msg_id in spool.entries
    finally:
        ctl.stop()


def test_with_no_server_the_tool_works_offline_under_the_lock(tmp_path):
    base = str(tmp_path / "spool")
    os.makedirs(base)
    seen = []

    def offline():
        seen.append(True)
        with pytest.raises(control.SpoolLocked):  # a server starting now waits for the tool
            control.hold_lock(base, wait=0.2)
        return {"ok": True, "status": "deleted"}

    assert control.request(base, "delete", new_id(), offline)["status"] == "deleted"
    assert seen == [True]
    os.close(control.hold_lock(base, wait=0))  # released afterwards


def test_a_server_holding_the_lock_keeps_a_second_one_out(tmp_path):
    base = str(tmp_path / "spool")
    fd = control.hold_lock(base)
    try:
        assert oct(os.stat(os.path.join(base, control.LOCK_NAME)).st_mode & 0o777) == "0o600"
        with pytest.raises(control.SpoolLocked):
            control.hold_lock(base, wait=0.1)
    finally:
        os.close(fd)


def test_a_tool_whose_server_goes_away_finishes_offline(tmp_path):
    base = str(tmp_path / "spool")
    fd = control.hold_lock(base)
    threading.Timer(0.5, os.close, (fd,)).start()  # the server dies without answering
    started = time.monotonic()
    answer = control.request(base, "retry", None, lambda: {"ok": True, "status": "offline"}, timeout=10)
    assert answer["status"] == "offline" and time.monotonic() - started < 3
    assert [n for n in os.listdir(os.path.join(base, control.CTL_DIR)) if n.endswith(".req")] == []
