"""The one door to gevent's threadpool.

Calls that block in the kernel for a noticeable time (fsync and syncfs, DKIM
signing of big messages, key loading) go through run(), so the hub keeps
serving sessions while a native thread waits. Nothing else in hedwig touches
the threadpool directly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import gevent

T = TypeVar("T")


def configure(size: int) -> None:
    """Size the hub's threadpool (per worker process, before first use)."""
    gevent.get_hub().threadpool.maxsize = size


def run(fn: Callable[..., T], *args: object) -> T:
    """Run fn(*args) in a native thread; the calling greenlet waits, the hub does not."""
    return gevent.get_hub().threadpool.apply(fn, args)
