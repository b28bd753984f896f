"""The FADT's sleep control and reset registers, written by a small guest (real KVM): S5
powers the VM off (exit 0), the reset register reboots it (or ends strato under --no-reboot)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strato.vmm.config import ConsoleConfig, ConsoleMode, MemoryConfig, PayloadConfig, VmConfig
from strato.vmm.runner import run
from strato.vmm.stop import StopReason
from strato.vmm.vm import Vm
from tests.guests.asm import build_elf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


@pytest.fixture(scope="module")
def elf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_elf("pvh_acpi", tmp_path_factory.mktemp("acpi"))


def test_s5_powers_off_and_strato_exits_0(elf: Path, tmp_path: Path) -> None:
    serial = tmp_path / "serial.log"
    p = subprocess.run(
        [sys.executable, "-m", "strato.cli.main", "--kernel", str(elf), "--cmdline", "s",
         "--memory", "size=32M", "--serial", f"file={serial}", "--console", "off"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    text = serial.read_text()
    assert "ACPI s" in text and "STILL RUNNING" not in text


def test_reset_register_reboots_the_guest(elf: Path) -> None:
    boots: list[Vm] = []

    def started(vm: Vm) -> None:
        boots.append(vm)
        if len(boots) == 3:
            raise KeyboardInterrupt  # enough: the guest was rebooted twice

    cfg = VmConfig(
        payload=PayloadConfig(kernel=elf, cmdline="r"),
        memory=MemoryConfig(size=32 << 20),
        serial=ConsoleConfig(ConsoleMode.NULL),
        console=ConsoleConfig(ConsoleMode.OFF),
    )
    with pytest.raises(KeyboardInterrupt):
        run(cfg, on_started=started, timeout=60)
    assert len(boots) == 3


def test_reset_register_under_no_reboot_ends_strato(elf: Path) -> None:
    cfg = VmConfig(
        payload=PayloadConfig(kernel=elf, cmdline="r"),
        memory=MemoryConfig(size=32 << 20),
        serial=ConsoleConfig(ConsoleMode.NULL),
        console=ConsoleConfig(ConsoleMode.OFF),
        no_reboot=True,
    )
    stop = run(cfg, timeout=60)
    assert stop.reason is StopReason.RESET and stop.exit_status == 0
    assert "ACPI" in stop.message
