"""The ACPI power button through the GED, to the built-in guest (`tests=power`).

The guest finds the GED in the DSDT, routes its interrupt through the IOAPIC, prints
`READY power`, and waits; the host presses the button; the guest reads the GED's event
register (power-button bit), prints its TEST line and powers off through the FADT's sleep
control register (S5), as Linux's ACPI button driver would. strato exits 0: stop reason
poweroff.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_OK, StopReason
from tests.behaviour.vmrun import Boot, boot
from tests.guest.harness import Event, GuestOutput, Ready

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]

ARGS = ["--memory", "size=64M", "--console", "off", "--serial", "null"]


def test_power_button_through_the_python_api(guest_elf: Path) -> None:
    def press(event: Event, boot_: Boot) -> None:
        if isinstance(event, Ready) and event.what == "power":
            boot_.vm.power_button()

    args = ["--kernel", str(guest_elf), "--cmdline", "tests=power host-timeout=20000", *ARGS]
    run = boot(args, timeout=60, on_event=press)
    assert not run.errors, run.errors
    out = run.output
    out.check(["power"])
    line = out.result("power")
    assert line.fields["events"] == "0x08", line  # the power-button bit, nothing else
    assert int(line.fields["irqs"]) == 1, line  # one edge, one interrupt
    assert (line.fields["ged"], line.fields["irq"]) == ("0xfe000000", "5")  # from the DSDT
    assert line.fields["sleep"] == "sleep-control@0x600" and line.fields["s5"] == "5"
    assert len(run.boots) == 1
    assert run.stop.reason is StopReason.POWEROFF, run.stop
    assert run.stop.exit_status == EXIT_OK


def test_no_press_no_power_off(guest_elf: Path) -> None:
    """Without a press the guest times out waiting and fails its check: it is the button, not
    the guest's own end of run, that the first test saw."""
    args = ["--kernel", str(guest_elf), "--cmdline", "tests=power host-timeout=300", *ARGS]
    run = boot(args, timeout=60)
    (failed,) = run.output.failures()
    assert failed.name == "power" and failed.fields["irqs"] == "0", failed
    assert failed.fields["events"] == "0x00"
    assert run.stop.reason is not StopReason.POWEROFF, run.stop


def test_power_button_through_the_rest_api(guest_elf: Path, workdir: Path) -> None:
    """The `strato` command with an API socket; `PUT /api/v1/vm.power-button` presses it."""
    sock = workdir / "api.sock"
    serial = workdir / "serial.out"
    command = [
        sys.executable, "-m", "strato.cli.main", "-v", "--kernel", str(guest_elf),
        "--cmdline", "tests=power host-timeout=30000", "--memory", "size=64M",
        "--console", "off", "--serial", f"file={serial}", "--api-socket", f"path={sock}",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while "READY power" not in (serial.read_text() if serial.exists() else ""):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no READY power line"
            time.sleep(0.02)  # polling a file: the interval, not a correctness wait
        status = _put(sock, "/api/v1/vm.power-button")
        assert status == 204, status
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_OK, stderr.decode()[-2000:]
    out = GuestOutput.parse(serial.read_text())
    out.check(["power"])
    assert out.result("power").fields["events"] == "0x08"
    # -v logs the stop reason (StopReason.POWEROFF's message).
    assert "VM stopped: the guest powered off" in stderr.decode(), stderr.decode()[-2000:]


def _put(sock: Path, path: str) -> int:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(f"PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n".encode())
        reply = s.recv(4096).decode("latin-1")
    return int(reply.split()[1])
