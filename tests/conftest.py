"""Shared fixtures. The pytest process never imports gevent or hedwig's entry module.

Every test is time-bounded: a test without its own `timeout` marker gets
DEFAULT_TIMEOUT seconds (pytest-timeout), so a hung server fails one test
instead of stalling the run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.proc import HedwigProcess

DEFAULT_TIMEOUT = 60


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


@pytest.fixture
def hedwig(tmp_path: Path) -> Iterator[Callable[..., HedwigProcess]]:
    """Factory: hedwig(config=None, *, ready=True, args=None, umask=0o022) -> a started HedwigProcess.

    Every process started through it is stopped (SIGTERM, bounded wait, SIGKILL)
    at teardown, whatever the test did.
    """
    import socket

    # The servers under test patch themselves; this process must stay unpatched.
    assert socket.socket.__module__ == "socket", "the pytest process was monkey-patched"
    started: list[HedwigProcess] = []

    def start(config: dict[str, Any] | str | None = None, *, ready: bool = True,
              args: list[str] | None = None, umask: int = 0o022) -> HedwigProcess:
        proc = HedwigProcess(tmp_path / f"hedwig{len(started)}", config, args=args, umask=umask)
        started.append(proc)
        proc.start()
        if ready:
            proc.wait_ready()
        return proc

    yield start
    for proc in started:
        proc.close()
