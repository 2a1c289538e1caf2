"""The scheduler with a fake clock: due order, window, claims, backoff. No sleeping."""

from __future__ import annotations

import random

import pytest

from hedwig.scheduler import Scheduler, retry_delay
from hedwig.spool import Location, QueueEntry

pytestmark = pytest.mark.timeout(30)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def entry(n: int, due: float = 0.0) -> QueueEntry:
    msg_id = f"{n:026d}"
    return QueueEntry(msg_id, Location("seg", n, ord("M"), msg_id, 0, 0, 0), due=due)


def test_due_now_in_arrival_order():
    s = Scheduler(clock=Clock())
    for n in range(3):
        s.add(entry(n))
    assert [s.take(timeout=0).msg_id for _ in range(3)] == [entry(n).msg_id for n in range(3)]
    assert s.take(timeout=0) is None


def test_future_entries_wait_for_their_time():
    clock = Clock()
    s = Scheduler(clock=clock)
    s.add(entry(1, due=1010))
    s.add(entry(2, due=1005))
    assert s.take(timeout=0) is None
    clock.now = 1006
    assert s.take(timeout=0).msg_id == entry(2).msg_id
    clock.now = 1011
    assert s.take(timeout=0).msg_id == entry(1).msg_id


def test_claims_prevent_double_delivery_and_release_requeues():
    clock = Clock()
    s = Scheduler(clock=clock)
    e = entry(1)
    s.add(e)
    taken = s.take(timeout=0)
    s.add(e)  # seen again (e.g. a rescan): ignored while claimed
    assert s.take(timeout=0) is None
    assert e.msg_id in s.claimed
    taken.due = clock.now + 5
    s.release(taken, requeue=True)
    assert s.take(timeout=0) is None
    clock.now += 5
    assert s.take(timeout=0) is taken
    s.release(taken, requeue=False)
    assert len(s) == 0


def test_window_bounds_memory_and_admits_as_room_frees():
    s = Scheduler(window=2, clock=Clock())
    for n in range(5):
        s.add(entry(n))
    assert len(s) == 5
    first = s.take(timeout=0)
    second = s.take(timeout=0)
    assert s.take(timeout=0) is None  # the rest wait outside the window
    s.release(first, requeue=False)
    third = s.take(timeout=0)
    assert third.msg_id == entry(2).msg_id
    s.release(second, requeue=False)
    s.release(third, requeue=False)
    assert [s.take(timeout=0).msg_id for _ in range(2)] == [entry(3).msg_id, entry(4).msg_id]


def test_expire_makes_old_waiting_messages_due():
    clock = Clock()
    s = Scheduler(clock=clock)
    s.add(entry(1, due=5000))
    s.add(entry(2, due=5000))
    moved = s.expire_older_than(2, received_at=lambda e: int(e.msg_id))
    assert moved == 1
    assert s.take(timeout=0).msg_id == entry(1).msg_id
    assert s.take(timeout=0) is None


def test_stop_wakes_takers():
    s = Scheduler(clock=Clock())
    s.stop()
    assert s.take() is None


@pytest.mark.parametrize(("failed", "low", "high"), [(1, 48, 72), (2, 96, 144), (3, 192, 288), (20, 3600, 3600)])
def test_retry_delay_doubles_with_jitter_and_cap(failed, low, high):
    rng = random.Random(7)
    delays = [retry_delay(failed, 60, 3600, rng) for _ in range(200)]
    assert low <= min(delays) and max(delays) <= high
    if low != high:
        assert max(delays) - min(delays) > (high - low) / 4  # jitter is real


def test_deferred_backlog_does_not_starve_fresh_mail():
    clock = Clock()
    s = Scheduler(window=2, clock=clock)
    for n in range(10):
        s.add(entry(n, due=clock.now + 3600))  # a long outage's worth of deferred mail
    s.add(entry(99))
    assert s.take(timeout=0).msg_id == entry(99).msg_id
