"""Fixtures for the built-in guest tests, and a summary of boot times at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato.images.builtin import ensure_builtin_guest
from strato.images.errors import ImageError

# (test id, accelerator, seconds from QEMU start to DONE), printed after the run.
TIMINGS: list[tuple[str, str, float]] = []


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    try:
        return ensure_builtin_guest()
    except ImageError as e:
        pytest.fail(str(e))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("built-in guest: VMM start to DONE line")
    for test_id, accel, seconds in TIMINGS:
        terminalreporter.write_line(f"{seconds:7.2f} s  {accel:4s}  {test_id}")
