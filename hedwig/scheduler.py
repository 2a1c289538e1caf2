"""When each queued message is due: a ready queue, a timer heap and claims.

The scheduler knows ids, due times and which messages are being delivered
(claims). At most `window` messages are ready or being delivered at once; the
rest of a due backlog waits in arrival order and is admitted as room frees.
Messages deferred to a later time wait in a timer heap outside the window, so
a large deferred backlog never starves fresh mail. Delivery
greenlets call take(), which blocks until a message is due.

Backoff is a pure function (`retry_delay`), tested without sleeping.

Must not: read message bodies, speak SMTP or touch files.
"""

from __future__ import annotations

import heapq
import random
import time
from collections import deque
from collections.abc import Callable, Iterable

import gevent
from gevent.event import Event

from .spool import QueueEntry


def retry_delay(failed_attempts: int, initial: float, cap: float, rng: random.Random) -> float:
    """Seconds until the next attempt: initial × 2^(failed-1), ±20 % jitter, capped."""
    base = initial * (2 ** max(failed_attempts - 1, 0))
    return min(cap, base * rng.uniform(0.8, 1.2))


class Scheduler:
    def __init__(self, window: int = 10000, clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.clock = clock
        self._ready: deque[QueueEntry] = deque()
        self._timers: list[tuple[float, int, QueueEntry]] = []
        self._seq = 0
        self._waiting: deque[QueueEntry] = deque()  # admitted later, as room frees
        self.claimed: dict[str, QueueEntry] = {}
        self._known: set[str] = set()  # ids in the window (ready, timers or claimed)
        self._wakeup = Event()
        self.stopping = False

    def __len__(self) -> int:
        """Messages the scheduler is responsible for, window and backlog."""
        return len(self._known) + len(self._waiting)

    def add(self, entry: QueueEntry) -> None:
        if entry.msg_id in self._known:
            return
        if entry.due <= self.clock() and self._busy() >= self.window:
            self._waiting.append(entry)
            return
        self._admit(entry)

    def _busy(self) -> int:
        """Messages ready or being delivered: what the window bounds.

        Messages waiting for a later attempt sit in the timer heap outside the
        window, so a long backlog of deferred mail never holds fresh mail back.
        """
        return len(self._ready) + len(self.claimed)

    def add_all(self, entries: Iterable[QueueEntry]) -> None:
        for entry in entries:
            self.add(entry)

    def _admit(self, entry: QueueEntry) -> None:
        self._known.add(entry.msg_id)
        if entry.due <= self.clock():
            self._ready.append(entry)
        else:
            self._seq += 1
            heapq.heappush(self._timers, (entry.due, self._seq, entry))
        self._wakeup.set()

    def _fill(self) -> None:
        while self._waiting and self._busy() < self.window:
            self._admit(self._waiting.popleft())

    def _release_due(self) -> float | None:
        """Move due timers to the ready queue; seconds until the next one, or None."""
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            self._ready.append(heapq.heappop(self._timers)[2])
        return self._timers[0][0] - now if self._timers else None

    def take(self, timeout: float | None = None) -> QueueEntry | None:
        """The next due message, claimed for the caller; None on timeout or stop."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.stopping:
            next_in = self._release_due()
            if self._ready:
                entry = self._ready.popleft()
                self.claimed[entry.msg_id] = entry
                return entry
            wait = next_in
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = left if wait is None else min(wait, left)
            self._wakeup.clear()
            self._wakeup.wait(wait)
        return None

    def release(self, entry: QueueEntry, requeue: bool) -> None:
        """Delivery is done with `entry`: requeue it at entry.due, or forget it."""
        self.claimed.pop(entry.msg_id, None)
        self._known.discard(entry.msg_id)
        if requeue:
            self._admit(entry)
        self._fill()

    def expire_older_than(self, cutoff: float, received_at: Callable[[QueueEntry], float]) -> int:
        """Make waiting messages received before `cutoff` due now (cleanup bounces them)."""
        moved = 0
        keep = []
        for item in self._timers:
            if received_at(item[2]) < cutoff:
                self._ready.append(item[2])
                moved += 1
            else:
                keep.append(item)
        if moved:
            heapq.heapify(keep)
            self._timers = keep
            self._wakeup.set()
        return moved

    def discard(self, msg_id: str) -> QueueEntry | None:
        """Forget a message that is not being delivered (`hedwig queue delete`).

        Returns the entry, or None if it is claimed (the caller waits for the
        attempt to end) or unknown.
        """
        if msg_id in self.claimed:
            return None
        found = self._remove(msg_id)
        if found is not None:
            self._known.discard(msg_id)
            self._fill()
        return found

    def make_due(self, msg_id: str) -> QueueEntry | None:
        """A message waiting for a later attempt becomes due now (`hedwig queue retry`).

        Returns the entry moved, or None if it was not waiting (already due,
        being delivered or unknown).
        """
        entry = self._pop_timer(msg_id)
        return None if entry is None else self._make_ready([entry])[0]

    def make_all_due(self) -> list[QueueEntry]:
        """Every message waiting for a later attempt becomes due now."""
        entries = [item[2] for item in self._timers]
        self._timers = []
        return self._make_ready(entries)

    def _make_ready(self, entries: list[QueueEntry]) -> list[QueueEntry]:
        now = self.clock()
        for entry in entries:
            entry.due = now
            self._ready.append(entry)
        if entries:
            self._wakeup.set()
        return entries

    def _remove(self, msg_id: str) -> QueueEntry | None:
        for queue in (self._ready, self._waiting):
            for entry in queue:
                if entry.msg_id == msg_id:
                    queue.remove(entry)
                    return entry
        return self._pop_timer(msg_id)

    def _pop_timer(self, msg_id: str) -> QueueEntry | None:
        for i, item in enumerate(self._timers):
            if item[2].msg_id == msg_id:
                self._timers[i] = self._timers[-1]
                self._timers.pop()
                heapq.heapify(self._timers)
                return item[2]
        return None

    def stop(self) -> None:
        self.stopping = True
        self._wakeup.set()
        gevent.idle()
