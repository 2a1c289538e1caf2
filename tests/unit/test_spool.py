"""The spool on real temporary directories: group commit, recovery, damage detection.

gevent is used here unpatched (the spool's committer is a greenlet and syncs in
gevent's threadpool); nothing is monkey-patched in the pytest process.
"""

from __future__ import annotations

import os
import stat
import time
import zlib

import gevent
import pytest

from hedwig import spool as sp
from hedwig.spool import Envelope, Spool, SpoolError, iter_records, list_segments, new_id

pytestmark = pytest.mark.timeout(60)


def envelope(n: int = 0, rcpts: tuple[str, ...] = ("rcpt@example.test",)) -> Envelope:
    return Envelope(msg_id=new_id(), sender=f"s{n}@example.test", recipients=rcpts,
                    received_at=1.0, client="127.0.0.1", helo="client.test")


def accept(spool: Spool, body: bytes, n: int = 0) -> str:
    writer = spool.create(envelope(n))
    writer.write(body)
    spool.commit(writer)
    return writer.msg_id


@pytest.fixture
def spool(tmp_path):
    s = Spool(str(tmp_path / "spool"))
    s.open()
    yield s
    s.close()


def test_ids_are_time_ordered_and_unique():
    ids = [new_id(1000.0 + i / 1000) for i in range(200)]
    assert ids == sorted(ids)
    assert len(set(new_id() for _ in range(10000))) == 10000
    assert all(sp.is_id(i) for i in ids)


def test_accept_and_read_back_exactly(spool):
    body = b"Subject: x\r\n\r\n.dot\r\n\x00\xff 8-bit\r\n"
    msg_id = accept(spool, body)
    env, got = spool.read(msg_id)
    assert got == body
    assert env.msg_id == msg_id and env.recipients == ("rcpt@example.test",)


def test_envelope_json_reads_both_ways_across_versions():
    """No auth: no "auth" key (an older Hedwig reads the record); a key from a
    newer Hedwig is ignored (a rollback keeps its queue)."""
    env = Envelope(new_id(), "s@example.test", ("r@example.test",), 1.0)
    assert b'"auth"' not in env.to_json()
    newer = env.to_json()[:-1] + b',"from_the_future":1}'
    assert Envelope.from_json(newer) == env


def test_envelope_auth_round_trips_and_old_records_default_to_none():
    env = Envelope(new_id(), "s@example.test", ("r@example.test",), 1.0, auth="alice")
    assert Envelope.from_json(env.to_json()) == env
    # A record written before the field existed reads as "not authenticated".
    old = b'{"msg_id":"%s","sender":"s@x.test","recipients":["r@y.test"],"received_at":1.0,' \
          b'"client":"127.0.0.1","helo":"c.test","smtputf8":false,"body":""}' % new_id().encode()
    assert Envelope.from_json(old).auth == ""


def test_permissions(spool, tmp_path):
    accept(spool, b"x\r\n")
    base = tmp_path / "spool"
    for d in (base, base / "log", base / "tmp", base / "bounced"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for _, _, path in list_segments(str(base / "log")):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_concurrent_commits_share_syncs(spool, monkeypatch):
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(sp.os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    ids = gevent.joinall([gevent.spawn(accept, spool, b"m%d\r\n" % i, i) for i in range(200)], raise_error=True)
    assert len({g.value for g in ids}) == 200
    assert 1 <= len(syncs) < 200  # group commit: many messages per fdatasync
    for g in ids:
        assert spool.read(g.value)[1].startswith(b"m")


def test_restart_finds_every_message_without_bodies(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    ids = [accept(s, b"body %d\r\n" % i, i) for i in range(50)]
    s.close()
    again = Spool(base)
    again.open()
    try:
        assert again.scan() == sorted(ids)
        assert again.read(ids[7])[1] == b"body 7\r\n"
        # a new process appends to a new segment, never to an old one
        accept(again, b"later\r\n")
        assert len(list_segments(again.log_dir)) == 2
    finally:
        again.close()


def test_torn_tail_is_ignored_and_earlier_records_survive(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    ids = [accept(s, b"x" * 100, i) for i in range(5)]
    s.close()
    (_, _, path), = list_segments(os.path.join(base, "log"))
    size = os.path.getsize(path)
    with open(path, "ab") as f:  # half a record, as a crash mid-append leaves it
        f.write(sp.pack_header(sp.MESSAGE, new_id(), 10, 1000, 0) + b"partial")
    again = Spool(base)
    again.open()
    try:
        assert again.scan() == sorted(ids)
    finally:
        again.close()
    assert os.path.getsize(path) > size


def test_damaged_body_is_detected(spool):
    msg_id = accept(spool, b"precious\r\n")
    loc = spool.entries[msg_id].loc
    with open(loc.path, "r+b") as f:
        f.seek(loc.end - 3)
        f.write(b"X")
    with pytest.raises(sp.DamagedMessage):
        spool.read(msg_id)


def test_a_damaged_header_costs_only_its_record_which_is_quarantined(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    ids = [accept(s, b"y" * 10, i) for i in range(5)]
    loc = s.entries[ids[1]].loc
    s.close()
    with open(loc.path, "r+b") as f:
        f.seek(loc.offset + 10)  # inside the id field: the header CRC fails
        f.write(b"!")
    skipped = []
    found = [r.msg_id for r in iter_records(loc.path, on_damage=lambda a, b: skipped.append((a, b)))]
    assert found == ids[:1] + ids[2:]  # the scan resynchronises on the next whole record
    assert skipped == [(loc.offset, loc.end)]
    again = Spool(base)
    again.open()
    try:
        assert sorted(again.entries) == sorted(ids[:1] + ids[2:])
        kept = os.path.join(again.quarantine_dir, ids[1] + ".rec")  # named by the id in its envelope
        with open(kept, "rb") as f:
            assert f.read() == open(loc.path, "rb").read()[loc.offset:loc.end]
        assert "damaged record header" in open(kept[:-4] + ".reason").read()
    finally:
        again.close()


def test_a_torn_tail_is_not_searched_for_records(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    ids = [accept(s, b"z" * 10, i) for i in range(2)]
    path = s.entries[ids[0]].loc.path
    s.close()
    # A record whose body holds a whole record image, cut short: the image must not come alive.
    inner_meta = Envelope(new_id(), "evil@x.test", ("victim@y.test",), 0.0).to_json()
    inner = sp.pack_header(sp.MESSAGE, new_id(), len(inner_meta), 4, zlib.crc32(inner_meta + b"evil")) + \
        inner_meta + b"evil"
    outer_body = b"x" * 10 + inner + b"y" * 100
    head = sp.pack_header(sp.MESSAGE, new_id(), 2, len(outer_body), zlib.crc32(b"{}" + outer_body))
    with open(path, "ab") as f:
        f.write(head + b"{}" + outer_body[:-50])  # torn: its good header says it runs past the end
    assert [r.msg_id for r in iter_records(path)] == ids


def test_big_message_spills_to_tmp_and_round_trips(spool):
    body = os.urandom(3 * sp.SPILL_AT + 17)
    writer = spool.create(envelope())
    for i in range(0, len(body), 65536):
        writer.write(body[i:i + 65536])
    assert writer.spill_fd >= 0 and os.path.exists(writer.spill_path)
    spool.commit(writer)
    assert not os.listdir(spool.tmp_dir)
    assert spool.read(writer.msg_id)[1] == body


def test_aborted_message_leaves_nothing(spool):
    writer = spool.create(envelope())
    writer.write(b"z" * (2 * sp.SPILL_AT))
    writer.abort()
    assert not os.listdir(spool.tmp_dir)
    assert writer.msg_id not in spool.entries


def test_clean_tmp_removes_leftovers(spool):
    with open(os.path.join(spool.tmp_dir, "junk.part"), "wb") as f:
        f.write(b"torn")
    assert spool.clean_tmp() == 1
    assert not os.listdir(spool.tmp_dir)


def test_failed_sync_makes_the_spool_unhealthy(spool, monkeypatch):
    accept(spool, b"fine\r\n")

    def broken(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sp.os, "fdatasync", broken)
    with pytest.raises(SpoolError):
        accept(spool, b"lost?\r\n")
    assert not spool.healthy
    monkeypatch.undo()
    with pytest.raises(SpoolError):  # never retried: refused until restart
        accept(spool, b"after\r\n")


def test_failed_write_is_cut_back_and_later_records_stay_readable(spool, monkeypatch):
    first = accept(spool, b"first\r\n")
    real = sp._write_all
    calls = {"n": 0}

    def flaky(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            os.write(fd, data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(sp, "_write_all", flaky)
    with pytest.raises(SpoolError):
        accept(spool, b"second\r\n")
    assert spool.healthy
    third = accept(spool, b"third\r\n")
    paths = {r.msg_id for _, _, p in list_segments(spool.log_dir) for r in iter_records(p)}
    assert paths == {first, third}


def test_fsync_off_still_durable_against_process_crash(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base, fsync=False)
    s.open()
    msg_id = accept(s, b"no fsync\r\n")
    s.close()
    again = Spool(base)
    again.open()
    try:
        assert again.read(msg_id)[1] == b"no fsync\r\n"
    finally:
        again.close()


def test_disk_reserve(tmp_path):
    s = Spool(str(tmp_path / "spool"), disk_reserve=1 << 60)
    s.open()
    try:
        assert not s.has_room()
    finally:
        s.close()


# -- delivery state: journal, done marks, reclaiming segments ---------------------------


def test_state_survives_restart_without_touching_the_body(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    msg_id = accept(s, b"keep me\r\n")
    entry = s.entries[msg_id]
    seg_before = open(entry.loc.path, "rb").read()
    entry.attempts, entry.due, entry.pending = 2, 12345.0, ("b@x.test",)
    entry.bounced, entry.last_error = (("c@y.test", 550, "no such user"),), "451 try later"
    s.record_state(entry)
    s.close()
    assert open(entry.loc.path, "rb").read() == seg_before  # the body is never rewritten
    again = Spool(base)
    again.open()
    try:
        got = again.entries[msg_id]
        assert (got.attempts, got.due, got.pending, got.last_error) == (2, 12345.0, ("b@x.test",), "451 try later")
        assert got.bounced == (("c@y.test", 550, "no such user"),)
        assert again.read(msg_id)[1] == b"keep me\r\n"
    finally:
        again.close()


def test_finished_messages_are_gone_after_restart_and_segments_reclaimed(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    ids = [accept(s, b"m\r\n", i) for i in range(4)]
    first_segment = s.entries[ids[0]].loc.path
    for msg_id in ids[:3]:
        s.finish(s.entries[msg_id], "delivered")
    s.close()
    again = Spool(base)
    again.open()
    try:
        assert again.scan() == [ids[3]]
        again.finish(again.entries[ids[3]], "bounced")
        accept(again, b"new\r\n")  # the committer runs: old, empty segments are deleted
        assert not os.path.exists(first_segment)
        assert not os.path.exists(sp.journal_path(first_segment))
    finally:
        again.close()


def test_torn_journal_line_is_cut_and_later_lines_stay_readable(tmp_path):
    base = str(tmp_path / "spool")
    s = Spool(base)
    s.open()
    a, b = accept(s, b"a\r\n"), accept(s, b"b\r\n")
    journal = sp.journal_path(s.entries[a].loc.path)
    s.close()
    with open(journal, "ab") as f:
        f.write(b'{"id":"' + a.encode() + b'","do')  # a crash mid-append
    again = Spool(base)
    again.open()
    try:
        again.finish(again.entries[b], "delivered")
        again.close()
        states, done = sp.load_journal(journal)
        assert done == {b: "delivered"}
    finally:
        again.close()


def test_bounced_message_kept_as_readable_files(spool):
    msg_id = accept(spool, b"Subject: lost\r\n\r\nbody\r\n")
    entry = spool.entries[msg_id]
    path = spool.write_bounced(entry, spool.read(msg_id)[1], "<x@y.test>: 550 no such user\n")
    assert open(path, "rb").read() == b"Subject: lost\r\n\r\nbody\r\n"
    assert open(path[:-4] + ".reason").read() == "<x@y.test>: 550 no such user\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


# -- ownership: several workers on one spool -----------------------------------------------


def test_each_open_spool_takes_its_own_writer_and_adopts_a_closed_ones_messages(tmp_path):
    base = str(tmp_path / "spool")
    first, second = Spool(base), Spool(base)
    first.open()
    second.open()
    try:
        assert (first.writer, second.writer) == ("w0", "w1")  # flock: one owner per name
        mine = [accept(second, b"second's\r\n", i) for i in range(3)]
        theirs = [accept(first, b"first's\r\n", i) for i in range(5)]
        assert second.adopt_orphans() == []  # w0 is held: nothing to take
        spill = os.path.join(first.tmp_dir, "w0.junk.part")
        open(spill, "wb").close()
        first.close()  # as a worker's death drops its flocks
        adopted = second.adopt_orphans()
        assert sorted(e.msg_id for e in adopted) == sorted(theirs)
        assert set(second.owned) == {"w0", "w1"} and second.writer == "w1"
        assert sorted(second.entries) == sorted(mine + theirs)
        assert second.clean_tmp() == 1 and not os.path.exists(spill)
        # Once everything adopted is done, its segment goes and the name is let go.
        for entry in adopted:
            second.finish(entry, "delivered")
        deadline = time.monotonic() + 5
        while any(w == "w0" for w, _s, _p in list_segments(second.log_dir)) and time.monotonic() < deadline:
            gevent.sleep(0.02)
        assert second.adopt_orphans() == [] and set(second.owned) == {"w1"}
        third = Spool(base)
        third.open()
        try:
            assert third.writer == "w0" and third.entries == {}  # a free name, nothing in it
        finally:
            third.close()
    finally:
        second.close()


def test_tmp_files_of_another_live_writer_are_left_alone(tmp_path):
    base = str(tmp_path / "spool")
    first, second = Spool(base), Spool(base)
    first.open()
    second.open()
    try:
        theirs = os.path.join(first.tmp_dir, "w0.06H1C2HNWGTK9PX37FBTSP723C.part")
        legacy = os.path.join(first.tmp_dir, "06H1C2HNWGTK9PX37FBTSP723C.part")
        for path in (theirs, legacy):
            open(path, "wb").close()
        assert second.clean_tmp() == 1  # the legacy one; w0's belongs to a live worker
        assert os.path.exists(theirs) and not os.path.exists(legacy)
    finally:
        first.close()
        second.close()
