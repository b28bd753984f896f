"""Settings and fixtures for the whole test suite.

`guest_elf`: the built-in guest, built once per session (a build failure fails the test).
`netns`: a network namespace of the test's own (`strato-t-<random>`), deleted afterwards: where
a tap that gets an IP address must live.

Hypothesis: in CI (`CI` set, as CI services do) every property test runs derandomized: the
same examples on every run, so a red build is the code's doing and replays locally with
`CI=true`; a failure prints its reproduction blob. The deadline is a bound for a loaded 2-core
machine (10x above a normal example), not a timing check. Tests that set their own
`@settings` keep them; this profile fills in the rest. `HYPOTHESIS_PROFILE=ci` selects the
profile outside CI too.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from strato.images.builtin import ensure_builtin_guest
from strato.images.errors import ImageError

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,  # derandomized runs neither need nor write an example database
    deadline=timedelta(seconds=5),
    print_blob=True,
    max_examples=100,  # Hypothesis' default, stated: the CI time of the property tests
    suppress_health_check=[HealthCheck.too_slow],  # generation is slow on a loaded machine
)

_in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
_profile = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _in_ci else None)
if _profile is not None:
    settings.load_profile(_profile)


@pytest.fixture(scope="session")
def guest_elf() -> Path:
    try:
        return ensure_builtin_guest()
    except ImageError as e:
        pytest.fail(str(e))


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"strato-t-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
