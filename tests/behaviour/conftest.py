"""Fixtures for the end-to-end behaviour tests: the built-in guest, a scratch directory."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.images.builtin import ensure_builtin_guest
from strato.images.errors import ImageError


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    try:
        return ensure_builtin_guest()
    except ImageError as e:
        pytest.fail(str(e))


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stb") as d:
        yield Path(d)
