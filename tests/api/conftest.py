"""Fixtures for the API tests: a controller and server on a real unix socket."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.api.helpers import ApiEnv, FakeFactory, close_api_env, make_api_env


@pytest.fixture
def make_env() -> Iterator[Callable[..., ApiEnv]]:
    made: list[ApiEnv] = []

    def make(*args: Any, **kwargs: Any) -> ApiEnv:
        env = make_api_env(*args, **kwargs)
        made.append(env)
        return env

    yield make
    for env in made:
        close_api_env(env)


@pytest.fixture
def fake_env(make_env: Callable[..., ApiEnv]) -> tuple[ApiEnv, FakeFactory]:
    factory = FakeFactory()
    return make_env(factory), factory
