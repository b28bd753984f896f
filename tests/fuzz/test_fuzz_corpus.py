"""Replays the regression corpus (tests/fuzz/corpus/<target>/) through the byte-level
properties of the atheris targets, and smoke-runs atheris itself where it is installed."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fuzz._support import CORPUS, corpus_files, count
from tests.fuzz.atheris_fuzz import PROPERTIES

KNOWN_BUGS: dict[tuple[str, str], str] = {}  # every corpus input passes now


def _cases() -> list[object]:
    out: list[object] = []
    for target in sorted(PROPERTIES):
        for path in corpus_files(target):
            reason = KNOWN_BUGS.get((target, path.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            out.append(pytest.param(target, path, id=f"{target}/{path.name}", marks=marks))
    return out


@pytest.mark.parametrize(("target", "path"), _cases())
def test_corpus_input(target: str, path: Path) -> None:
    count(target)
    fn: Callable[[bytes], None] = PROPERTIES[target]
    fn(path.read_bytes())


def test_every_corpus_directory_has_a_target() -> None:
    dirs = {p.name for p in CORPUS.iterdir() if p.is_dir()}
    assert dirs <= set(PROPERTIES), dirs - set(PROPERTIES)


@pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris==3.0.0; 3.1.0 has no build here)",
)
def test_atheris_runs(tmp_path: Path) -> None:
    """A short coverage-guided run of one target: the runner works, nothing is found."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.atheris_fuzz", "cmdline", "-runs=3000", "-seed=1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Done 3000 runs" in proc.stderr
