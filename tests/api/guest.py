"""The small KVM guest of the API tests: tests/api/ticker.S, run by a real strato Vm.

`ticker_factory` is a VmConfig -> Vm factory for VmmController: it loads the config's kernel
(the flat ticker binary) at 0x1000 in real mode, and adds the ticker device, counters and a
power button (what the ACPI GED gives a Linux guest: the guest notices and powers off).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.kvm import bindings as b
from strato.vmm.config import VmConfig
from strato.vmm.machine import Machine
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import Vm

HERE = Path(__file__).parent
LOAD = 0x1000
TICKER_PORT = 0x500


def build_ticker(out_dir: Path) -> Path:
    """Assemble ticker.S into a flat binary linked at LOAD; returns its path."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) are not installed")
    obj = out_dir / "ticker.o"
    out = out_dir / "ticker.bin"
    subprocess.run(["as", "--64", "-o", str(obj), str(HERE / "ticker.S")], check=True)
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_x86_64",
            f"-Ttext={LOAD:#x}",
            "--oformat",
            "binary",
            "-o",
            str(out),
            str(obj),
        ],
        check=True,
    )
    return out


class Ticker:
    """Ports 0x500 (tick count, written), 0x501 (button, read), 0x502 (power off / reset)."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.ticks = 0
        self.reads = 0
        self.button = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self.button if offset == 1 else 0
            if offset == 1:
                self.reads += 1
                self.button = 0
        return bytes([value]) + bytes(size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 2:
            self.ticks = struct.unpack("<H", data)[0]
        elif offset == 2 and data[:1] == b"\x01":
            self.vm.request_stop(Stop(StopReason.POWEROFF, "the ticker guest powered off"))
        elif offset == 2 and data[:1] == b"\x02":
            self.vm.request_stop(Stop(StopReason.RESET, "the ticker guest reset"))

    def press(self, button: int) -> None:
        with self._lock:
            self.button = button


@dataclass(eq=False)
class TickerVm(Vm):
    ticker: Ticker | None = None

    def counters(self) -> dict[str, dict[str, int]]:
        assert self.ticker is not None
        return {"ticker": {"ticks": self.ticker.ticks, "button_reads": self.ticker.reads}}

    def power_button(self) -> None:
        assert self.ticker is not None
        self.ticker.press(1)

    def guest_reset(self) -> None:
        """Make the guest ask for a reset itself (as Linux does on `reboot`)."""
        assert self.ticker is not None
        self.ticker.press(2)


class TickerFactory:
    """VmConfig -> TickerVm; keeps every VM it built (tests look at the latest)."""

    def __init__(self) -> None:
        self.vms: list[TickerVm] = []

    def __call__(self, config: VmConfig) -> TickerVm:
        assert config.payload.kernel is not None
        code = Path(config.payload.kernel).read_bytes()
        m = Machine.create(config.memory.size, config.cpus.boot_vcpus)
        try:
            m.memory.write(LOAD, code)
            fd = m.vcpus[0]
            sregs = fd.get_sregs()
            sregs.cs.base = 0
            sregs.cs.selector = 0
            fd.set_sregs(sregs)
            fd.set_regs(b.kvm_regs(rip=LOAD, rflags=2))
            vm = TickerVm(m)
            vm.ticker = Ticker(vm)
            m.pio.insert(vm.ticker, TICKER_PORT, 3)
        except BaseException:
            m.close()
            raise
        self.vms.append(vm)
        return vm

    @property
    def latest(self) -> TickerVm:
        return self.vms[-1]
