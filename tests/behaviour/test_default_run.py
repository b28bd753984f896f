"""The built-in guest run the way a user first runs it: default consoles, no command line.

`strato --kernel strato-guest.elf --disk path=... --rng src=/dev/urandom` has the serial port
off (null) and the virtio console on strato's standard input and output. The guest must not
wait for console input nobody knows about (the checks that wait for the host only run with
host=1 or when named), must say on the console it writes to how the run went, and must end:
a passing run with no command line powers off (strato reboots on a reset by default, which
would run the checks again forever), so strato exits 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_OK

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]


def test_the_default_command_line_passes_and_exits_0(guest_elf: Path, workdir: Path) -> None:
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    command = [
        sys.executable, "-m", "strato.cli.main", "-v", "--kernel", str(guest_elf),
        "--disk", f"path={disk}", "--rng", "src=/dev/urandom",
    ]  # fmt: skip
    # stdin a pipe nobody writes to: what the guest would wait for never comes. The bound is
    # far above a normal run (~1 s) and below the old 20 s wait plus a reboot loop.
    p = subprocess.run(command, input=b"", capture_output=True, timeout=60)
    console = p.stdout.decode("utf-8", "replace")
    assert p.returncode == EXIT_OK, (p.returncode, p.stderr.decode()[-2000:], console)
    # The console (strato's stdout) says what ran and that nothing failed, once: no reboot.
    assert console.count("STRATO-CONSOLE-TX hello from strato-guest\n") == 1, console
    summary = [line for line in console.splitlines() if line.startswith("strato-guest: DONE")]
    assert len(summary) == 1, console
    assert " fail=0 " in summary[0] and " pass=0 " not in summary[0], summary
    # Nobody was asked to type: console-rx is skipped, and says how to run it.
    assert "console-rx" not in console
    stderr = p.stderr.decode("utf-8", "replace")
    assert not [line for line in stderr.splitlines() if "ERROR" in line], stderr
    assert "VM stopped: the guest powered off" in stderr, stderr  # -v logs the stop reason


def test_the_default_run_prints_skip_lines_for_checks_that_wait_for_the_host(
    guest_elf: Path, workdir: Path
) -> None:
    """With the serial port on, the run lists what it did not run and how to run it."""
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    serial = workdir / "serial.out"
    command = [
        sys.executable, "-m", "strato.cli.main", "-v", "--kernel", str(guest_elf),
        "--disk", f"path={disk}", "--rng", "src=/dev/urandom", "--serial", f"file={serial}",
    ]  # fmt: skip
    p = subprocess.run(command, input=b"", capture_output=True, timeout=60)
    assert p.returncode == EXIT_OK, p.stderr.decode()[-2000:]
    from tests.guest.harness import GuestOutput

    out = GuestOutput.parse(serial.read_text())
    out.check(["serial", "pci", "blk-id", "blk-rw", "rng", "console-tx", "irq"])
    (skip,) = out.skipped
    assert skip.name == "console-rx"
    assert "host=1" in skip.detail and "tests=console-rx" in skip.detail
    assert out.done is not None and out.done.skipped == 1
