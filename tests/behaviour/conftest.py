"""Fixtures for the end-to-end behaviour tests: a scratch directory (`guest_elf` is suite-wide)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stb") as d:
        yield Path(d)
