"""Fixtures shared by the device tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from strato.events import EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    """A device event loop, not started: tests run it with `run_once`."""
    lp = EventLoop()
    yield lp
    lp.close()
