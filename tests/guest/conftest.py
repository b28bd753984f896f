"""A summary of built-in guest boot times at the end of the run (`guest_elf` is suite-wide)."""

from __future__ import annotations

import pytest

# (test id, accelerator, seconds from QEMU start to DONE), printed after the run.
TIMINGS: list[tuple[str, str, float]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("built-in guest: VMM start to DONE line")
    for test_id, accel, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:7.2f} s  {accel:4s}  {test_id}")
