"""The REST API driving strato's real builder (the controller's default factory) with the
built-in guest: virtio-rng on virtio-pci, the 16550, the guest resetting itself."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.api.helpers import KVM, ApiEnv, poll

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not KVM, reason="needs /dev/kvm")]


def test_builtin_guest_through_the_api(make_env: Callable[..., ApiEnv], guest_elf: Path) -> None:
    env = make_env(default_factory=True)  # the controller's own VmBuilder
    serial = env.dir / "serial.out"
    api = env.client
    api.create(
        {
            "payload": {"kernel": str(guest_elf), "cmdline": "tests=rng"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64 << 20},
            "serial": {"mode": "File", "file": str(serial)},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"},
        }
    )
    api.boot()
    tree = api.info()["device_tree"]
    assert "__serial" in tree and tree["__rng"]["pci_bdf"].startswith("0000:00:")

    def output() -> str:
        return serial.read_text(errors="replace") if serial.exists() else ""

    assert poll(lambda: "DONE" in output(), timeout=60), output()
    assert "TEST rng PASS" in output()
    # After DONE the guest resets the machine: the VMM reboots it (Cloud Hypervisor's reset
    # handling), and the serial file goes on (one sink for every boot of this config).
    assert poll(lambda: output().count("BOOT strato-guest") >= 2, timeout=60), output()
    assert ("vm", "rebooted") in env.events()
    api.pause()
    assert api.info()["state"] == "Paused"
    assert set(api.counters()["__rng"]) >= {"read_bytes", "read_ops"}
    api.resume()
    api.shutdown()
    assert api.info()["state"] == "Shutdown"
    api.delete()
