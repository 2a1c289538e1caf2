"""Shared by the fault-injection suite: a report of what each scenario saw.

    def test_x(fault_report):
        fault_report("seed=3 acked=2000 duplicates=4 (bound 32)")

Every line is printed in pytest's terminal summary under "fault injection",
prefixed with the test's id, so duplicates counted, timings and the like are
visible in CI output even when every test passes.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

_LINES: list[str] = []


@pytest.fixture
def fault_report(request: pytest.FixtureRequest) -> Callable[[str], None]:
    def report(line: str) -> None:
        _LINES.append(f"{request.node.name}: {line}")
        print(line)

    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _LINES:
        terminalreporter.section("fault injection")
        for line in _LINES:
            terminalreporter.write_line(line)
