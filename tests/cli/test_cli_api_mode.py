"""`strato --api-socket` driven by `strato-remote`, as processes (real socket, real KVM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strato.images.builtin import ensure_builtin_guest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


def remote(sock: Path, *verb: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strato.cli.remote", "--api-socket", str(sock), *verb],
        capture_output=True,
        text=True,
        timeout=30,
    )


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_vm_created_over_the_api_boots_and_shuts_down(tmp_path: Path) -> None:
    elf = ensure_builtin_guest()
    sock = tmp_path / "api.sock"
    serial = tmp_path / "serial.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "strato.cli.main", "--api-socket", f"path={sock}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(sock)
        assert json.loads(remote(sock, "ping").stdout)["version"]
        # Without a VM the VM endpoints answer with Cloud Hypervisor's errors.
        r = remote(sock, "info")
        assert r.returncode != 0 and "not created" in r.stderr.lower()
        cfg = {
            "payload": {"kernel": str(elf), "cmdline": "tests=serial,rng"},
            "memory": {"size": 64 << 20},
            "serial": {"mode": "File", "file": str(serial)},
            "console": {"mode": "Off"},
            "rng": {"src": "/dev/urandom"},
        }
        cfg_file = tmp_path / "vm.json"
        cfg_file.write_text(json.dumps(cfg))
        assert remote(sock, "create", str(cfg_file)).returncode == 0
        assert json.loads(remote(sock, "info").stdout)["state"] == "Created"
        assert remote(sock, "boot").returncode == 0
        deadline = time.monotonic() + 30
        while b"DONE pass=2 fail=0" not in (serial.read_bytes() if serial.exists() else b""):
            assert time.monotonic() < deadline, serial.read_text() if serial.exists() else ""
            time.sleep(0.05)
        # The guest resets when done; without --no-reboot strato boots it again, so it runs.
        assert remote(sock, "shutdown-vmm").returncode == 0
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert b"Traceback" not in proc.stderr.read() if proc.stderr else True
