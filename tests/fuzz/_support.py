"""What every fuzz target shares: sizes, case counting, the regression corpus, guarded memory.

Sizes. Each target names the number of examples it runs in CI (kept small: the whole of
tests/fuzz runs in about a minute on two cores). Longer runs, on demand:
- `STRATO_FUZZ_EXAMPLES=100000 pytest tests/fuzz` runs every target that many examples;
- `pytest tests/fuzz --hypothesis-profile=fuzz-long` runs every target the profile's count.
Under CI (CI=true) the examples are derandomized, so a red CI is reproducible; elsewhere they
are random and hypothesis keeps what failed in its database.

Counting. `count(target)` is called once per executed case (explicit examples, generated
examples, shrinking steps and corpus files alike); conftest.py prints the totals at the end of
the session and writes them to /tmp/strato-fuzz-summary.json (or $STRATO_FUZZ_SUMMARY).

Regressions. An input that once failed stays: `@example(...)` on the hypothesis test for
structured inputs, a file under tests/fuzz/corpus/<target>/ for byte inputs (replayed by a
test of that target, and the seeds of the atheris runner).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, settings

from strato.memory import GuestMemory

CORPUS = Path(__file__).parent / "corpus"
LONG_PROFILE = "fuzz-long"
settings.register_profile(LONG_PROFILE, max_examples=20_000, deadline=None)

CASES: Counter[str] = Counter()


def count(target: str) -> None:
    CASES[target] += 1


def examples(ci: int) -> int:
    """How many examples a target runs: `ci` unless a longer run was asked for."""
    forced = os.environ.get("STRATO_FUZZ_EXAMPLES")
    if forced:
        return max(1, int(forced))
    if settings.get_current_profile_name() == LONG_PROFILE:
        return max(ci, int(settings.get_profile(LONG_PROFILE).max_examples))
    return ci


def fuzz_settings(ci: int, **overrides: Any) -> settings:
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    base: dict[str, Any] = {
        "max_examples": examples(ci),
        "deadline": None,
        "suppress_health_check": list(HealthCheck),
        "derandomize": in_ci,
        "phases": [p for p in Phase if p is not Phase.explain],
    }
    if in_ci:
        base["database"] = None
    base.update(overrides)
    return settings(**base)


# -- the regression corpus -------------------------------------------------------------------
def corpus_files(target: str) -> list[Path]:
    d = CORPUS / target
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def corpus_params(target: str, known_bugs: dict[str, str] | None = None) -> list[Any]:
    """pytest params, one per corpus file; a file in `known_bugs` is xfail(strict) with the
    reason given (a bug in code this suite may not change, reported to its owner)."""
    out = []
    for p in corpus_files(target):
        reason = (known_bugs or {}).get(p.name)
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        out.append(pytest.param(p.read_bytes(), id=p.name, marks=marks))
    return out


# -- internal errors ---------------------------------------------------------------------------
class _ExcInfoRecorder(logging.Handler):
    """Records log records that carry a traceback: strato logs those only on its "this is a
    bug or a host failure" paths, which guest or client input must never reach."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@contextmanager
def no_internal_errors(logger: str = "strato") -> Iterator[None]:
    recorder = _ExcInfoRecorder()
    log = logging.getLogger(logger)
    log.addHandler(recorder)
    try:
        yield
    finally:
        log.removeHandler(recorder)
    assert not recorder.records, [
        f"{r.name}: {r.getMessage()}: {r.exc_info[1]!r}" for r in recorder.records if r.exc_info
    ]


# -- guest memory with a guard region ------------------------------------------------------------
RAM = (0, 0x100000)
HOLE = (0x100000, 0x100000)  # no memory here
GUARD = (0x200000, 0x1000)  # a second region past the hole, filled with a canary pattern
CANARY = b"\xa5\x5a"


def guarded_memory() -> GuestMemory:
    """1 MiB of RAM, a 1 MiB hole, then a 4 KiB guard region holding a canary pattern."""
    mem = GuestMemory.anonymous([RAM, GUARD])
    mem.write(GUARD[0], CANARY * (GUARD[1] // 2))
    return mem


def snapshot(mem: GuestMemory) -> list[bytes]:
    return [bytes(r.view) for r in mem.regions]


def changed_outside(
    mem: GuestMemory, before: list[bytes], allowed: list[tuple[int, int]]
) -> list[int]:
    """Guest addresses whose byte changed since `before` and that no allowed range covers."""
    bad: list[int] = []
    for region, old in zip(mem.regions, before, strict=True):
        new = bytes(region.view)
        if new == old:
            continue
        for page in range(0, len(new), 4096):
            if new[page : page + 4096] == old[page : page + 4096]:
                continue
            for off in range(page, min(page + 4096, len(new))):
                if new[off] != old[off]:
                    addr = region.start + off
                    if not any(a <= addr < a + n for a, n in allowed):
                        bad.append(addr)
    return bad
