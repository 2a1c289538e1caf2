"""Compaction of the spool on real temporary directories (spool.Spool.compact).

SPEC §4: disk use follows the live backlog, not history. Segments are made
small (SEGMENT_MAX, COMPACT_MIN_DEAD and COMPACT_BATCH lowered), most messages
finish, a few stay queued with delivery state; compaction copies those
forward so the old segments go. The crash windows are made on disk by putting
the old files back, and every reading of the spool must agree: a reopened
Spool, `hedwig queue` (queuetool.read_queue) and the tests' own parser
(tests/support/conservation.py).

gevent is used unpatched, as in test_spool.py.
"""

from __future__ import annotations

import os
import shutil
import time

import gevent
import pytest

from hedwig import queuetool
from hedwig import spool as sp
from hedwig.spool import Envelope, Spool, list_segments, load_journal, new_id
from tests.support.conservation import queued_ids

pytestmark = pytest.mark.timeout(60)

BODY = 1000  # bytes of each message: about a dozen records a 16 KiB segment


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(sp, "SEGMENT_MAX", 16 * 1024)
    monkeypatch.setattr(sp, "COMPACT_MIN_DEAD", 4 * 1024)
    monkeypatch.setattr(sp, "COMPACT_BATCH", 6 * 1024)  # several batches for one segment


def accept(spool: Spool, n: int) -> str:
    env = Envelope(msg_id=new_id(), sender=f"s{n}@example.test", recipients=("a@x.test", "b@y.test"),
                   received_at=1.0, client="127.0.0.1", helo="client.test")
    writer = spool.create(env)
    writer.write(body(n))
    spool.commit(writer)
    return writer.msg_id


def body(n: int) -> bytes:
    head = b"Subject: %d\r\n\r\n" % n
    return head + bytes((n + i) % 256 for i in range(BODY - len(head)))


def open_spool(base: str) -> Spool:
    s = Spool(base)
    s.open()
    return s


def segments(base: str) -> list[str]:
    return [path for _w, _s, path in list_segments(os.path.join(base, "log"))]


def seg_bytes(base: str) -> int:
    return sum(os.path.getsize(p) for p in segments(base))


def wait_until(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached: {what}"
        gevent.sleep(0.01)  # the committer deletes reclaimed segments in its own batch


def compact_all(s: Spool) -> int:
    rounds = 0
    while s.compact():
        rounds += 1
    return rounds


def restore(saved, path: str) -> None:
    """Put a segment and its journal back as `saved` holds them: a deletion a crash undid."""
    for name in (os.path.basename(path), os.path.basename(sp.journal_path(path))):
        if (saved / name).exists():
            shutil.copy2(saved / name, os.path.join(os.path.dirname(path), name))


def tear_body(loc: sp.Location) -> None:
    """Zeros over a page of a copy's body: its header reached the disk, that page did not."""
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + sp.HEADER.size + loc.meta_len + 100)
        f.write(b"\0" * 500)


def state(entry: sp.QueueEntry) -> tuple:
    return entry.attempts, entry.due, entry.pending, entry.bounced, entry.last_error


def tool_view(base: str) -> dict[str, tuple]:
    """What `hedwig queue` shows of the queued messages: (attempts, error, bounced, segment)."""
    return {m.msg_id: (m.attempts, m.last_error, m.bounced, m.loc.path if m.loc else None)
            for m in queuetool.read_queue(base) if m.state in ("queued", "deferred")}


def server_view(s: Spool) -> dict[str, tuple]:
    return {e.msg_id: (e.attempts, e.last_error, e.bounced, e.loc.path) for e in s.entries.values()}


def backlog(s: Spool, count: int = 100, keep_every: int = 10) -> tuple[list[str], list[str]]:
    """`count` messages over several segments; all but every `keep_every`th delivered. (kept, ids)"""
    ids = [accept(s, n) for n in range(count)]
    kept = ids[::keep_every]
    for i, msg_id in enumerate(kept[::2]):  # half of them deferred once or twice, with state
        entry = s.entries[msg_id]
        entry.attempts, entry.due, entry.pending = 1 + i % 2, 1e9 + i, ("b@y.test",)
        entry.bounced, entry.last_error = (("a@x.test", 550, "no such user"),), f"451 later {i}"
        s.record_state(entry)
    for msg_id in ids:
        if msg_id not in kept:
            s.finish(s.entries[msg_id], "delivered")
    return kept, ids


def test_compaction_frees_old_segments_and_a_reopen_sees_the_same_queue(tmp_path):
    base = str(tmp_path / "spool")
    s = open_spool(base)
    try:
        kept, ids = backlog(s)
        old = [p for p in segments(base) if p != s._seg_path]
        assert len(old) >= 5
        holding = {s.entries[m].loc.path for m in kept} - {s._seg_path}
        before = seg_bytes(base)
        states = {msg_id: state(s.entries[msg_id]) for msg_id in kept}
        assert compact_all(s) == len(holding)  # one segment a call
        wait_until(lambda: not any(os.path.exists(p) for p in old), "old segments deleted")
        assert not any(os.path.exists(sp.journal_path(p)) for p in old)
        after = seg_bytes(base)
        assert after < before / 3, (before, after)
        assert sorted(s.entries) == sorted(kept)
        assert {m: state(s.entries[m]) for m in kept} == states
        for n, msg_id in enumerate(ids):
            if msg_id in kept:
                assert s.read(msg_id)[1] == body(n)  # byte-exact, checksum checked
        assert tool_view(base) == server_view(s)
        assert queued_ids(base) == set(kept)
        assert s.compact() is False  # nothing worth it any more
    finally:
        s.close()
    again = open_spool(base)
    try:
        assert sorted(again.entries) == sorted(kept)
        assert {m: state(again.entries[m]) for m in kept} == states
        assert all(again.read(m)[1] == body(ids.index(m)) for m in kept)
        assert server_view(again) == tool_view(base)
    finally:
        again.close()


def test_crash_after_the_copies_before_the_old_segments_went(tmp_path):
    """(a) The copies are durable, the old segments are still there: no duplicates, the newest state."""
    base = str(tmp_path / "spool")
    saved = tmp_path / "saved"
    s = open_spool(base)
    try:
        kept, _ids = backlog(s)
        old = [p for p in segments(base) if p != s._seg_path]
        shutil.copytree(os.path.join(base, "log"), saved)
        compact_all(s)
        wait_until(lambda: not any(os.path.exists(p) for p in old), "old segments deleted")
        changed, finished = kept[1], kept[2]  # both moved
        assert s.entries[changed].loc.path not in old and s.entries[finished].loc.path not in old
        entry = s.entries[changed]
        entry.attempts, entry.last_error = 7, "451 newest"
        s.record_state(entry)  # journalled beside the new copy only
        s.finish(s.entries[finished], "delivered")
        expected = {m: state(s.entries[m]) for m in s.entries}
    finally:
        s.close()
    for path in old:  # as if the process died before deleting them
        restore(saved, path)
    assert any(os.path.exists(p) for p in old)
    assert queued_ids(base) == set(kept) - {finished}
    view = tool_view(base)
    assert set(view) == set(kept) - {finished} and view[changed][:2] == (7, "451 newest")
    again = open_spool(base)
    try:
        assert {m: state(e) for m, e in again.entries.items()} == expected
        assert server_view(again) == view
        assert not any(e.loc.path in old for e in again.entries.values())  # the newest copies
        # The old copies are shadowed: their segments go.
        wait_until(lambda: not any(os.path.exists(p) for p in old), "restored segments reclaimed")
    finally:
        again.close()
    final = open_spool(base)
    try:
        assert {m: state(e) for m, e in final.entries.items()} == expected
    finally:
        final.close()


def test_a_done_line_in_the_old_journal_alone_still_ends_the_message(tmp_path):
    """(b) Finished after the move with its done line only beside the old copy: done."""
    base = str(tmp_path / "spool")
    saved = tmp_path / "saved"
    s = open_spool(base)
    try:
        kept, _ids = backlog(s)
        victim = kept[0]
        old_path = s.entries[victim].loc.path
        shutil.copytree(os.path.join(base, "log"), saved)
        compact_all(s)
        wait_until(lambda: not os.path.exists(old_path), "old segment deleted")
        assert s.entries[victim].loc.path != old_path
    finally:
        s.close()
    restore(saved, old_path)
    with open(sp.journal_path(old_path), "ab") as f:
        f.write(b'{"id":"%s","done":"delivered"}\n' % victim.encode())
    assert victim not in tool_view(base) and victim not in queued_ids(base)
    again = open_spool(base)
    try:
        assert sorted(again.entries) == sorted(set(kept) - {victim})
        assert server_view(again) == tool_view(base)
        wait_until(lambda: not os.path.exists(old_path), "restored segment reclaimed")
    finally:
        again.close()


def test_a_copy_torn_by_a_crash_leaves_the_old_copy_and_its_journal_in_charge(tmp_path):
    """The move's state line made it to the new journal, its record did not: the line is not the state."""
    base = str(tmp_path / "spool")
    saved = tmp_path / "saved"
    s = open_spool(base)
    try:
        kept, _ids = backlog(s)
        shutil.copytree(os.path.join(base, "log"), saved)
        compact_all(s)
        with_state = kept[::2]  # backlog() journalled a state (version 1) for these
        newest = max(with_state,
                     key=lambda m: s.entries[m].loc.offset if s.entries[m].loc.path == s._seg_path else -1)
        victim = s.entries[newest]
    finally:
        s.close()
    old_name = next(n for n in os.listdir(saved) if n.endswith(".seg") and newest.encode() in (saved / n).read_bytes())
    old_path = os.path.join(base, "log", old_name)
    assert old_path != victim.loc.path
    # A line in the new journal that is older than the old journal's (version 0 < 1):
    # what a move left there if its copy never became whole and the message went on.
    with open(sp.journal_path(victim.loc.path), "ab") as f:
        f.write(b'{"id":"%s","s":{"attempts":1,"due":5.0,"pending":null,"bounced":[],"error":"stale"}}\n'
                % newest.encode())
    os.truncate(victim.loc.path, victim.loc.offset + 60)  # its copy torn
    restore(saved, old_path)
    again = open_spool(base)
    try:
        entry = again.entries[newest]
        assert entry.loc.path == old_path and entry.last_error != "stale"  # the old copy and its journal
        entry.attempts, entry.last_error = 2, "451 newer"
        again.record_state(entry)  # beside its copy: the old segment's journal
    finally:
        again.close()
    assert tool_view(base)[newest][:2] == (2, "451 newer")
    final = open_spool(base)
    try:
        assert state(final.entries[newest])[0::4] == (2, "451 newer")
    finally:
        final.close()


def test_a_damaged_record_is_not_moved_and_keeps_the_newer_copies_segment_until_it_goes(tmp_path):
    """(c) A record failing its checksum stays (delivery quarantines it); while its segment is there,
    the segment holding newer copies of that segment's messages is not deleted either."""
    base = str(tmp_path / "spool")
    s = open_spool(base)
    try:
        kept, _ids = backlog(s)
        damaged = kept[1]
        loc = s.entries[damaged].loc
        with open(loc.path, "r+b") as f:  # a flipped byte in the body
            f.seek(loc.end - 5)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
        compact_all(s)
        assert s.entries[damaged].loc == loc  # not moved
        moved = [m for m in kept if m != damaged and s.entries[m].loc.path != loc.path]
        assert moved
        newer = {s.entries[m].loc.path for m in moved}
        with pytest.raises(sp.DamagedMessage):
            s.read(damaged)
        # The segment with the copies fills up and the writer moves on; every message in it ends.
        while s._seg_path in newer:
            s.finish(s.entries[accept(s, 0)], "delivered")
        for m in kept:
            if m != damaged:
                s.finish(s.entries[m], "delivered")
        gevent.sleep(0.3)  # what the committer would have deleted by now, it has
        assert os.path.exists(loc.path)
        assert all(os.path.exists(p) for p in newer)  # shadows the damaged one's segment
        assert sorted(s.entries) == [damaged]
    finally:
        s.close()
    assert set(tool_view(base)) == {damaged}
    again = open_spool(base)
    try:
        assert sorted(again.entries) == [damaged] and again.entries[damaged].loc.path == loc.path
        gevent.sleep(0.3)
        assert all(os.path.exists(p) for p in newer)
        again.quarantine(again.entries[damaged], "checksum mismatch")
        wait_until(lambda: not os.path.exists(loc.path) and not any(os.path.exists(p) for p in newer),
                   "both segments deleted, the older first")
        assert again.entries == {}
    finally:
        again.close()


def test_journal_lines_during_a_move_go_beside_the_new_copy(tmp_path):
    """A delivery that ends while its message is being moved waits one batch, then journals at the new place."""
    base = str(tmp_path / "spool")
    s = open_spool(base)
    try:
        kept, _ids = backlog(s, keep_every=3)  # several moves a batch
        entries = {m: s.entries[m] for m in kept}
        old = {m: e.loc.path for m, e in entries.items()}
        compactor = gevent.spawn(compact_all, s)
        deadline = time.monotonic() + 5
        while not s._moving:
            assert time.monotonic() < deadline, "no move started"
            gevent.sleep(0)
        done_id, state_id = list(s._moving)[:2]
        done_entry, state_entry = entries[done_id], entries[state_id]
        state_entry.attempts, state_entry.last_error = 9, "451 during the move"
        recorder = gevent.spawn(s.record_state, state_entry)
        s.finish(done_entry, "bounced")
        recorder.get(timeout=5)
        compactor.get(timeout=10)
        new_done = done_entry.loc.path
        assert new_done != old[done_id] and state_entry.loc.path != old[state_id]
        assert load_journal(sp.journal_path(new_done))[1].get(done_id) == "bounced"
        states, _done = load_journal(sp.journal_path(state_entry.loc.path))
        assert states[state_id]["attempts"] == 9
    finally:
        s.close()
    again = open_spool(base)
    try:
        assert done_id not in again.entries
        assert state(again.entries[state_id])[0] == 9
    finally:
        again.close()


def test_a_read_racing_the_deletion_of_the_old_segment_reads_the_copy(tmp_path, monkeypatch):
    base = str(tmp_path / "spool")
    s = open_spool(base)
    try:
        kept, ids = backlog(s)
        victim = kept[0]
        old_path = s.entries[victim].loc.path
        real = sp.read_payload

        def racing(loc):
            if loc.path == old_path:  # between the lookup and the open, compaction moves it
                compact_all(s)
                wait_until(lambda: not os.path.exists(old_path), "old segment deleted")
            return real(loc)

        monkeypatch.setattr(sp, "read_payload", racing)
        assert s.read(victim)[1] == body(ids.index(victim))
        assert s.entries[victim].loc.path != old_path
    finally:
        s.close()


def test_what_is_not_compacted(tmp_path):
    """A segment less than half dead; and another writer's segments (adopted ones stay as they are)."""
    base = str(tmp_path / "spool")
    first = open_spool(base)
    ids = [accept(first, n) for n in range(40)]
    for msg_id in ids[::3]:  # a third delivered: no segment is half dead
        first.finish(first.entries[msg_id], "delivered")
    assert first.compact() is False
    for msg_id in ids:
        if msg_id in first.entries and ids.index(msg_id) % 6 != 1:  # now mostly dead
            first.finish(first.entries[msg_id], "delivered")
    theirs = {p: os.path.getsize(p) for p in segments(base)}
    second = open_spool(base)  # w1; w0 is still held
    try:
        first.close()  # its worker dies: w0 is adopted
        adopted = second.adopt_orphans()
        assert adopted and second.compact() is False
        assert {p: os.path.getsize(p) for p in segments(base) if p in theirs} == theirs
    finally:
        second.close()
    owner = open_spool(base)  # w0 again, its own writer now: compacted
    try:
        assert owner.writer == "w0" and owner.compact() is True
    finally:
        owner.close()


def test_a_copy_whose_body_did_not_reach_the_disk_never_shadows_the_whole_one(tmp_path):
    """Power loss in a move: the copy's header page is on disk, part of its body is not.
    The older, whole copy stays the message (and its segment stays); nothing is lost."""
    base = str(tmp_path / "spool")
    saved = tmp_path / "saved"
    saved.mkdir()
    s = open_spool(base)
    try:
        ids = [accept(s, n) for n in range(30)]
        x = ids[0]
        for m in ids[1:]:
            s.finish(s.entries[m], "delivered")
        old = s.entries[x].loc.path
        shutil.copy2(old, saved)
        compact_all(s)
        new = s.entries[x].loc
        assert new.path != old
        wait_until(lambda: not os.path.exists(old), "the old segment deleted")
    finally:
        s.close()
    restore(saved, old)  # the deletion never reached the disk either
    tear_body(new)
    again = open_spool(base)
    try:
        assert again.entries[x].loc.path == old
        assert again.read(x)[1] == body(0)
        assert queuetool.find(base, x).loc.path == old
        gevent.sleep(0.2)
        assert os.path.exists(old)
    finally:
        again.close()


def test_the_highest_versioned_state_wins_wherever_it_was_journalled(tmp_path):
    """A move's state line in a newer journal (its copy lost) must not beat a later
    state journalled beside the old copy: state lines carry a version."""
    base = str(tmp_path / "spool")
    s = open_spool(base)
    try:
        kept, _ids = backlog(s)
        x = kept[0]
        entry = s.entries[x]
        entry.attempts, entry.last_error = 5, "451 the latest"
        s.record_state(entry)
        assert entry.version == 2
        old = entry.loc.path
    finally:
        s.close()
    # A newer segment's journal holding an older line for x (version 1), as a move whose
    # copy never became whole would leave it.
    newer = max(segments(base))
    with open(sp.journal_path(newer), "ab") as f:
        f.write(b'{"id":"%s","s":{"attempts":1,"due":0,"pending":null,"bounced":[],"error":"old","v":1}}\n'
                % x.encode())
    again = open_spool(base)
    try:
        assert again.entries[x].loc.path == old
        assert (again.entries[x].attempts, again.entries[x].last_error, again.entries[x].version) == \
            (5, "451 the latest", 2)
    finally:
        again.close()
    assert tool_view(base)[x][:2] == (5, "451 the latest")


def test_a_torn_copy_never_outlives_the_whole_one_it_failed_to_replace(tmp_path):
    """The torn copy's segment holds other queued mail, so it stays: the whole copy's
    segment (with the message's done line) must wait for it, or at the next start
    the torn copy would be the message's only copy, queued again."""
    base = str(tmp_path / "spool")
    saved = tmp_path / "saved"
    saved.mkdir()
    s = open_spool(base)
    try:
        ids = [accept(s, n) for n in range(30)]
        x, y = ids[0], ids[-1]
        for m in ids[1:-1]:
            s.finish(s.entries[m], "delivered")
        old = s.entries[x].loc.path
        shutil.copy2(old, saved)
        shutil.copy2(sp.journal_path(old), saved)
        compact_all(s)
        new = s.entries[x].loc
        assert s.entries[y].loc.path == new.path  # y keeps the new segment alive
        wait_until(lambda: not os.path.exists(old), "the old segment deleted")
    finally:
        s.close()
    restore(saved, old)
    tear_body(new)
    again = open_spool(base)
    try:
        assert again.entries[x].loc.path == old
        again.finish(again.entries[x], "delivered")
        gevent.sleep(0.3)
        assert os.path.exists(old), "the whole copy's segment went before the torn copy's"
    finally:
        again.close()
    last = open_spool(base)
    try:
        assert x not in last.entries and y in last.entries
    finally:
        last.close()
    assert x not in {m.msg_id for m in queuetool.read_queue(base)}
