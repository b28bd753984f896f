"""Fixtures for the API tests: a controller and server on a real unix socket, whose VMs come
from strato's real builder with real devices (a raw disk, a tap when root, rng, a console)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.api.helpers import ApiEnv, close_api_env, make_api_env
from tests.taps import host_tap


@pytest.fixture(scope="session")
def api_tap() -> Iterator[str | None]:
    """A tap for the VMs' virtio-net (one VM at a time uses it); None when not root. It gets
    no IP address: the guest's frames go nowhere, and no namespace is needed."""
    if os.geteuid() != 0:
        yield None
        return
    with host_tap("stapi") as name:
        yield name


@pytest.fixture
def make_env(api_tap: str | None) -> Iterator[Callable[..., ApiEnv]]:
    made: list[ApiEnv] = []

    def make(*args: Any, **kwargs: Any) -> ApiEnv:
        kwargs.setdefault("tap", api_tap)
        env = make_api_env(*args, **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        close_api_env(env)


@pytest.fixture
def api_env(make_env: Callable[..., ApiEnv]) -> ApiEnv:
    """An API on the real builder (`env.builder` keeps the VMs it built)."""
    return make_env()
