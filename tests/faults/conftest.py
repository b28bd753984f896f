"""Fixtures for the fault tests: the built-in guest, built once per session."""

from __future__ import annotations

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
