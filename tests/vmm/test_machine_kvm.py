"""The KVM machine and the vCPU loop with small real-mode guests (real /dev/kvm)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strato.kvm import bindings as b
from strato.vmm.machine import Machine
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import Vm
from tests.guests.asm import build_flat

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")

LOAD = 0x1000


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


class ResetPort:
    def __init__(self, vm: Vm) -> None:
        self.vm = vm

    def read(self, offset: int, size: int) -> bytes:
        return b"\x00" * size

    def write(self, offset: int, data: bytes) -> None:
        if data[:1] == b"\xfe":
            self.vm.request_stop(Stop(StopReason.RESET, "i8042 reset"))


def boot_real_mode(code: bytes) -> tuple[Machine, Vm]:
    m = Machine.create(64 << 20, 1)
    m.memory.write(LOAD, code)
    fd = m.vcpus[0]
    sregs = fd.get_sregs()
    sregs.cs.base = 0
    sregs.cs.selector = 0
    fd.set_sregs(sregs)
    regs = b.kvm_regs(rip=LOAD, rflags=2)
    fd.set_regs(regs)
    return m, Vm(m)


@pytest.mark.kvm
def test_real_mode_port_io_and_reset(tmp_path: Path) -> None:
    code = build_flat("realmode_hello", tmp_path, LOAD)
    m, vm = boot_real_mode(code)
    rec = Recorder()
    m.pio.insert(rec, 0x3F8, 8)
    m.pio.insert(ResetPort(vm), 0x64, 1)
    vm.start()
    stop = vm.wait(timeout=30)
    vm.shutdown()
    assert stop is not None and stop.reason is StopReason.RESET
    assert rec.writes == [(0, b"H"), (0, b"i"), (1, b"\xff")]
