"""kill -9 under load: every message that got its 250 survives, whole, and restart tidies up.

SPEC §4: a 250 is sent only after the message is durable, and a crash at any
instant leaves either the whole message or nothing. Sixteen client threads
send small messages as fast as the server takes them; at a seeded random
moment the server is SIGKILLed. Every id that was acknowledged must then be
in the spool once, with intact checksums and the exact bytes. Then the kind of
debris a crash leaves is planted (a torn temporary file, a torn record at the
end of the newest segment), the server restarts, and: tmp/ is empty, the
queue count it reports is right, old segments are never written again
(ARCHITECTURE.md invariant 3), and new mail lands beside the old.
"""

from __future__ import annotations

import json
import random
import re
import smtplib
import threading
import time
import zlib

import pytest

from tests.support.proc import (
    HOST,
    RECORD_MESSAGE,
    pack_record_header,
    queued_id,
    read_spool,
    segment_files,
    split_received,
    tmp_files,
)

THREADS = 16
TORN_ID = "01ZZZZZZZZZZZZZZZZZZZZZZZZ"


def sender_thread(port: int, t: int, acked: dict[str, bytes], go: threading.Barrier, lock: threading.Lock) -> None:
    """Send until the connection dies; record every id acknowledged with 250."""
    try:
        client = smtplib.SMTP(HOST, port, local_hostname="client.test", timeout=20)
        client.ehlo()
    except (OSError, smtplib.SMTPException):
        go.abort()
        raise
    go.wait(10)
    i = 0
    try:
        while True:
            message = f"Subject: crash {t}-{i}\r\n\r\nbody of {t}-{i}\r\n{'.' * (i % 3)}tail\r\n".encode()
            client.mail(f"s{t}@client.test")
            client.rcpt(f"r{t}-{i}@dest.test")
            code, text = client.data(message)
            if code != 250:
                return
            with lock:
                acked[queued_id(text)] = message
            i += 1
    except (OSError, smtplib.SMTPException):
        return  # the server was killed
    finally:
        client.close()


def check_acked(spool, acked: dict[str, bytes]) -> int:
    """Every acknowledged message is queued once with its exact bytes; returns the queued count."""
    snap = read_spool(spool)  # checks every record against its checksums
    missing = sorted(set(acked) - snap.ids)
    assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {missing[:3]}"
    for msg_id in snap.ids:
        envelope, stored = snap.one(msg_id)
        if msg_id in acked:
            assert split_received(stored)[1] == acked[msg_id], msg_id
    return snap.count()


def torn_record(variant: int) -> bytes:
    """What a crash in the middle of an append leaves at the end of a segment."""
    meta = json.dumps({"msg_id": TORN_ID, "sender": "x@client.test", "recipients": ["y@dest.test"]}).encode()
    body = b"Subject: torn\r\n\r\n" + b"never acknowledged\r\n" * 50
    header = pack_record_header(RECORD_MESSAGE, TORN_ID, len(meta), len(body), zlib.crc32(meta + body))
    if variant == 0:
        return header[:30]  # cut inside the header
    if variant == 1:
        return header + meta + body[:100]  # a good header, the payload runs past the end
    return header[:-8] + b"\0\0\0\0" + header[-4:] + meta + body  # whole, but the header CRC is wrong


@pytest.mark.timeout(45)
@pytest.mark.parametrize(("seed", "fsync"), [(0, True), (1, True), (2, True), (3, False)],
                         ids=["seed0", "seed1", "seed2", "seed3-nofsync"])
def test_sigkill_under_load_loses_nothing_acknowledged(hedwig, seed, fsync):
    """fsync = false must still survive a process crash (the page cache outlives the process)."""
    rng = random.Random(seed)
    server = hedwig({"storage": {"fsync": fsync}})
    acked: dict[str, bytes] = {}
    lock = threading.Lock()
    go = threading.Barrier(THREADS + 1)
    threads = [threading.Thread(target=sender_thread, args=(server.port, t, acked, go, lock), daemon=True)
               for t in range(THREADS)]
    for thread in threads:
        thread.start()
    go.wait(10)
    time.sleep(rng.uniform(0.5, 1.0))  # the moment of the crash (deliberately random, seeded)
    deadline = time.monotonic() + 15  # on a loaded machine, wait for enough load to mean something
    while len(acked) <= THREADS and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    with lock:
        acked = dict(acked)  # what clients had been told before the kill
    for thread in threads:
        thread.join(20)
        assert not thread.is_alive()
    assert len(acked) > THREADS, f"load too light to mean anything: {len(acked)} acknowledged"

    queued_before = check_acked(server.spool, acked)

    # Debris of a crash: a torn temporary file (the kill may have left real ones too)...
    torn = server.spool / "tmp" / f"{TORN_ID}.part"
    torn.write_bytes(b"Received: from client.test\r\n\tby mx.test; half a mess")
    torn.chmod(0o600)
    leftovers = len(tmp_files(server.spool))
    # ...and a torn append at the end of the newest segment.
    segments = segment_files(server.spool)
    assert segments, "no segment written"
    with open(segments[-1], "ab") as f:
        f.write(torn_record(seed % 3))
    snap = read_spool(server.spool)
    assert TORN_ID not in snap.ids and snap.torn_tails.get(segments[-1].name)
    old = {p: p.read_bytes() for p in segments}

    server.start().wait_ready()
    assert tmp_files(server.spool) == [], "tmp/ not cleaned at start"
    log = server.log_text().rsplit("--- start", 1)[-1]
    m = re.search(r"(\d+) queued, (\d+) unfinished removed", log)
    assert m, log
    assert (int(m[1]), int(m[2])) == (queued_before, leftovers), log
    assert check_acked(server.spool, acked) == queued_before

    # The restarted server takes new mail beside the old, in a new segment.
    with smtplib.SMTP(HOST, server.port, local_hostname="client.test", timeout=20) as client:
        client.ehlo()
        for i in range(5):
            message = f"Subject: after the crash {i}\r\n\r\nhello\r\n".encode()
            client.mail("after@client.test")
            client.rcpt("r@dest.test")
            code, text = client.data(message)
            assert code == 250, text
            acked[queued_id(text)] = message
    assert check_acked(server.spool, acked) == queued_before + 5
    assert server.stop() == 0
    assert {p: p.read_bytes() for p in old} == old, "an old segment was written after restart"
    assert len(segment_files(server.spool)) > len(segments)
