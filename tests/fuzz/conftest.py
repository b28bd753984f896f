"""The fuzz suite's summary: cases run per target, printed and written as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fuzz._support import CASES

SUMMARY_PATH = Path(os.environ.get("STRATO_FUZZ_SUMMARY", "/tmp/strato-fuzz-summary.json"))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not CASES:
        return
    terminalreporter.section("strato fuzz: cases run per target")
    for target, n in sorted(CASES.items()):
        terminalreporter.write_line(f"{target:<24} {n:>8}")
    terminalreporter.write_line(f"{'total':<24} {sum(CASES.values()):>8}")
    try:
        SUMMARY_PATH.write_text(json.dumps(dict(sorted(CASES.items())), indent=1) + "\n")
        terminalreporter.write_line(f"(written to {SUMMARY_PATH})")
    except OSError as e:
        terminalreporter.write_line(f"(cannot write {SUMMARY_PATH}: {e})")
