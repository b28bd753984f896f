"""Fixtures for strato.images tests: host tools and the (cached) default guest."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from strato.images import DebianKernel, DefaultGuest, ensure_debian_kernel, ensure_default_guest


def host_tool(command: str, package: str) -> str:
    """Path of ``command``, installing Debian's ``package`` first where we are root."""
    path = shutil.which(command)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", package],
            capture_output=True,
            check=False,
        )
        path = shutil.which(command)
    if path is None:
        pytest.skip(f"'{command}' is missing (Debian package {package}) and cannot be installed")
    return path


@pytest.fixture(scope="session")
def system_cpio() -> str:
    return host_tool("cpio", "cpio")


@pytest.fixture(scope="session")
def debian_kernel() -> DebianKernel:
    # The per-user cache: downloaded once per machine, not once per test run.
    return ensure_debian_kernel()


@pytest.fixture(scope="session")
def default_guest() -> DefaultGuest:
    return ensure_default_guest()
