"""The queue tools' pieces on real temporary spools: reading, offline changes, the control protocol.

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

from hedwig import control, queuetool
from hedwig.delivery import bounce_report
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


def files_of(base: str) -> dict[str, tuple[int, bytes]]:
    out = {}
    for here, _dirs, names in os.walk(base):
        for name in names:
            path = os.path.join(here, name)
            with open(path, "rb") as f:
                out[path] = (os.stat(path).st_mode, f.read())
    return out


# -- reading ----------------------------------------------------------------------------------


def test_states_from_segments_journals_and_kept_files(spool):
    base = spool.base_path
    queued = accept(spool, ("q1@x.test", "q2@y.test"))
    deferred = accept(spool, ("d1@x.test", "d2@x.test"))
    defer(spool, deferred, time.time() + 3600, pending=("d2@x.test",))
    delivered = accept(spool)
    spool.finish(spool.entries[delivered], "delivered")
    bounced = accept(spool, ("b@x.test",))
    entry = spool.entries[bounced]
    env, body = spool.read(bounced)
    spool.write_bounced(entry, body, bounce_report(env, [("b@x.test", 550, "5.1.1 no such user")]))
    spool.finish(entry, "bounced")
    damaged = accept(spool)
    spool.quarantine(spool.entries[damaged], "checksum mismatch")

    got = {m.msg_id: m for m in queuetool.read_queue(base)}
    assert set(got) == {queued, deferred, bounced, damaged}
    assert [m.msg_id for m in queuetool.read_queue(base)] == sorted(got)  # oldest first

    q = got[queued]
    assert (q.state, q.attempts, q.recipients, q.sender, q.last_error) == (
        "queued", 0, ("q1@x.test", "q2@y.test"), "s@client.test", "")
    assert q.next_attempt == pytest.approx(q.received, abs=0.01)

    d = got[deferred]
    assert (d.state, d.attempts, d.recipients, d.last_error) == ("deferred", 1, ("d2@x.test",), "451 4.3.0 try later")
    assert d.next_attempt > time.time() + 3500

    b = got[bounced]
    assert (b.state, b.attempts, b.recipients, b.next_attempt) == ("bounced", None, ("b@x.test",), None)
    assert b.sender == "s@client.test" and "5.1.1 no such user" in b.last_error
    assert b.size == len(body)

    z = got[damaged]
    assert z.state == "quarantined" and z.last_error == "checksum mismatch"
    assert queuetool.count_states(got.values()) == {"queued": 1, "deferred": 1, "bounced": 1, "quarantined": 1}


def test_a_bounce_whose_done_line_is_not_written_yet_counts_once_as_bounced(spool):
    msg_id = accept(spool)
    entry = spool.entries[msg_id]
    spool.write_bounced(entry, spool.read(msg_id)[1], "<a@x.test>: 550 no\n")  # the done line comes next
    [m] = queuetool.read_queue(spool.base_path)
    assert (m.msg_id, m.state) == (msg_id, "bounced")


def test_json_entries_have_the_documented_fields(spool):
    msg_id = accept(spool)
    [m] = queuetool.read_queue(spool.base_path)
    doc = json.loads(json.dumps(m.to_json()))
    assert {"id", "state", "attempts", "recipients", "next_attempt", "last_error"} <= set(doc)
    assert doc["id"] == msg_id and doc["state"] == "queued" and doc["attempts"] == 0
    assert doc["recipients"] == ["a@x.test"] and doc["last_error"] == ""
    assert time.strptime(doc["next_attempt"], "%Y-%m-%dT%H:%M:%SZ")


def test_reading_changes_nothing_and_skips_torn_tails(spool):
    base = spool.base_path
    ok = accept(spool)
    defer(spool, ok, time.time() + 60)
    seg = spool.entries[ok].loc.path
    spool.close()
    with open(seg, "ab") as f:  # a record being appended: header only
        f.write(b"HWR1" + b"\0" * 20)
    with open(journal_path(seg), "ab") as f:  # a journal line being written
        f.write(b'{"id":"' + ok.encode() + b'","done":"deliv')
    before = files_of(base)
    [m] = queuetool.read_queue(base)
    assert (m.msg_id, m.state) == (ok, "deferred")
    assert queuetool.find(base, ok).state == "deferred"
    assert files_of(base) == before, "a read-only command changed the spool"


def test_a_spool_that_does_not_exist_is_empty_and_is_not_created(tmp_path):
    base = str(tmp_path / "never")
    assert queuetool.read_queue(base) == []
    assert queuetool.count_states([]) == {"queued": 0, "deferred": 0, "bounced": 0, "quarantined": 0}
    assert not os.path.exists(base)


def test_show_prints_envelope_state_and_headers_never_the_body(spool):
    msg_id = accept(spool, ("a@x.test",), subject="status \x1b[31mreport")
    defer(spool, msg_id, time.time() + 600)
    msg = queuetool.find(spool.base_path, msg_id)
    text = queuetool.format_show(msg, spool.base_path, time.time())
    assert SECRET.decode() not in text
    for needle in (msg_id, "deferred", "<s@client.test>", "a@x.test", "451 4.3.0 try later",
                   "Subject: status \\x1b[31mreport", "From: s@client.test", "attempts:", "size:"):
        assert needle in text, (needle, text)
    assert "\x1b" not in text  # control characters from the client are escaped


def test_header_section_stops_at_the_empty_line_and_is_capped():
    assert queuetool.header_section(b"A: 1\r\nB: 2\r\n\r\nbody\r\n") == (b"A: 1\r\nB: 2\r\n", 0)
    huge = b"X: " + b"y" * (queuetool.HEADERS_SHOWN + 10) + b"\r\n\r\nbody"
    head, more = queuetool.header_section(huge)
    assert len(head) == queuetool.HEADERS_SHOWN and more == 15


def test_table_has_one_row_per_message(spool):
    ids = [accept(spool) for _ in range(3)]
    text = queuetool.format_table(queuetool.read_queue(spool.base_path), time.time())
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["ID", "STATE", "TRIES"]
    assert sorted(ln.split()[0] for ln in lines[1:]) == sorted(ids)  # ids minted in one ms need not sort in order


# -- changing without a server --------------------------------------------------------------------


def test_offline_delete_and_retry_are_what_the_next_start_finds(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    gone, later, other = accept(s), accept(s), accept(s)
    for msg_id in (later, other):
        defer(s, msg_id, time.time() + 3600)
    journal = journal_path(s.entries[gone].loc.path)
    s.close()
    with open(journal, "ab") as f:
        f.write(b'{"id":"torn')  # a crash mid-append: cut before appending, as recovery does

    assert queuetool.delete_offline(base, gone, fsync=True)["status"] == "deleted"
    assert queuetool.delete_offline(base, gone, fsync=True) == {
        "ok": False, "status": "not-queued", "message": "not in the queue (deleted already)"}
    assert queuetool.retry_offline(base, later, fsync=True)["status"] == "due"
    assert queuetool.retry_offline(base, later, fsync=True)["status"] == "already-due"
    assert queuetool.retry_offline(base, new_id(), fsync=True)["status"] == "not-queued"
    assert load_journal(journal)[1] == {gone: "deleted"}

    again = Spool(base)
    again.open()
    try:
        assert sorted(again.entries) == sorted([later, other])
        assert again.entries[later].due <= time.time() and again.entries[later].attempts == 1
        assert again.entries[later].last_error == "451 4.3.0 try later"
        assert again.entries[other].due > time.time() + 3000
    finally:
        again.close()
    assert queuetool.retry_offline(base, None, fsync=False) == {
        "ok": True, "status": "due", "count": 1, "message": "1 message made due now"}


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

        answer = serve_while(lambda: control.request(base, "delete", gone, [spool.writer], offline_must_not_run), spool, scheduler)
        assert answer["status"] == "deleted"
        assert gone not in spool.entries and load_journal(journal_path(spool.entries[keep].loc.path))[1] == {
            gone: "deleted"}

        answer = serve_while(lambda: control.request(base, "delete", gone, [spool.writer], offline_must_not_run), spool, scheduler)
        assert answer["status"] == "not-queued"

        answer = serve_while(lambda: control.request(base, "retry", keep, [spool.writer], offline_must_not_run), spool, scheduler)
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
        answer = serve_while(lambda: control.request(base, "delete", msg_id, [spool.writer], offline_must_not_run),
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
        answer = serve_while(lambda: control.request(base, "delete", msg_id, [spool.writer], offline_must_not_run, timeout=2),
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
        with open(os.path.join(ctl_dir, "0" * 32 + f".{spool.writer}.req"), "w") as f:
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

    assert control.request(base, "delete", new_id(), ["w0"], offline)["status"] == "deleted"
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
    os.makedirs(os.path.join(base, "log"))
    open(os.path.join(base, "log", "w0-0000000000000001.seg"), "wb").close()  # w0 has messages
    threading.Timer(0.5, os.close, (fd,)).start()  # the server dies without answering
    started = time.monotonic()
    answer = control.request(base, "retry", None, ["w0"], lambda: {"ok": True, "status": "offline"}, timeout=10)
    assert answer["status"] == "offline" and time.monotonic() - started < 3
    assert [n for n in os.listdir(os.path.join(base, control.CTL_DIR)) if n.endswith(".req")] == []


def test_a_request_for_another_workers_writer_is_left_for_it(spool):
    ctl_dir = os.path.join(spool.base_path, control.CTL_DIR)
    scheduler = Scheduler()
    msg_id = accept(spool)
    scheduler.add(spool.entries[msg_id])
    ctl = control.Control(spool, scheduler)
    ctl.start()
    try:
        name = os.path.join(ctl_dir, "1" * 32 + ".w7.req")
        with open(name, "w") as f:
            json.dump({"op": "delete", "id": msg_id, "deadline": time.time() + 10}, f)
        gevent.sleep(3 * control.POLL)
        assert os.path.exists(name) and msg_id in spool.entries  # w7's owner answers it, not us
    finally:
        ctl.stop()
