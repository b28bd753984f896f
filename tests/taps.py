"""Host tap interfaces for tests that need a real one (root only)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def create_tap(name: str, *, quiet_ipv6: bool = True, wait_up: bool = False) -> None:
    """`ip tuntap add` + link up. `quiet_ipv6` turns IPv6 off on it (no router solicitations
    or MLD frames on the test's wire); `wait_up` waits until the kernel reports it up."""
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    try:
        ipv6 = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
        if quiet_ipv6 and ipv6.exists():
            ipv6.write_text("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
    except BaseException:
        delete_tap(name)
        raise


def wait_until_up(name: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/sys/class/net/{name}/operstate").read_text().strip() != "up":
        assert time.monotonic() < deadline, f"{name} never came up"
        time.sleep(0.01)


def delete_tap(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@contextmanager
def host_tap(prefix: str, *, quiet_ipv6: bool = True) -> Iterator[str]:
    """A tap named `prefix` + this process's pid, deleted afterwards."""
    name = f"{prefix}{os.getpid() % 100000}"
    create_tap(name, quiet_ipv6=quiet_ipv6)
    try:
        yield name
    finally:
        delete_tap(name)
