"""A guest that crashes: a clean stop, the crash exit status, one line that says why.

The small assembled guests already cover the mechanics (tests/vmm/test_small_guests.py:
test_triple_fault_exit_status_and_one_line, test_triple_fault_in_process,
test_emulation_failure_exit_status_and_instruction_bytes). Here the built-in guest crashes
from C code with devices attached and running: a CPU exception (`fault=ud`, `fault=pf`) that it
reports on its console, then its deliberate triple fault.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.faults.guestrun import crash_status, strato_args, strato_command
from tests.guest.harness import run_guest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

_STOP_LINE = re.compile(r"strato: ERROR: VM stopped: .*\(vCPU 0\)")


@pytest.mark.parametrize(("fault", "vector"), [("ud", 6), ("pf", 14)])
def test_guest_exception_stops_cleanly_with_the_crash_status(
    guest_elf: Path, tmp_path: Path, fault: str, vector: int
) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    args = strato_args(guest_elf, f"fault={fault} tests=serial", disk=f"path={disk}", rng=True)
    r = run_guest(strato_command(args), timeout=60, exit_grace=15)
    assert r.returncode == crash_status(), r.stderr
    fatal = r.output.fatal[0].message
    assert fatal.startswith(f"exception vector={vector} "), r.output.text()
    assert r.output.done is not None and r.output.done.failed == 1
    stops = [line for line in r.stderr.splitlines() if "VM stopped" in line]
    assert len(stops) == 1 and _STOP_LINE.fullmatch(stops[0]), r.stderr
    assert "Traceback" not in r.stderr
