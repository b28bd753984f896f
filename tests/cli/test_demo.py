"""The README's main job (`scripts/demo.sh` runs `python -m strato.cli.demo`) works."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


def test_demo_boots_the_builtin_guest_and_every_check_passes() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "strato.cli.demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "strato demo: every check passed" in p.stdout
    assert "DONE pass=" in p.stdout and " fail=0" in p.stdout
    assert "TEST blk-rw PASS" in p.stdout and "TEST console-rx PASS" in p.stdout
    if os.geteuid() == 0:
        assert "TEST net-tx PASS" in p.stdout
    assert "Traceback" not in p.stderr
