"""A real `Vm` on a real KVM machine whose guest is two real-mode instructions (`hlt; jmp $-1`):
a running vCPU sleeps in the kernel instead of spinning. Optionally with strato's ACPI devices
(the GED that `power_button` raises)."""

from __future__ import annotations

import time
from collections.abc import Callable

from strato.kvm import bindings as b
from strato.vmm.device_manager import DeviceManager
from strato.vmm.machine import Machine
from strato.vmm.vm import Vm

LOAD = 0x1000
HLT_LOOP = b"\xf4\xeb\xfd"  # hlt; jmp back to the hlt


def poll(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def hlt_machine(nr_vcpus: int = 1) -> Machine:
    m = Machine.create(16 << 20, nr_vcpus)
    m.memory.write(LOAD, HLT_LOOP)
    for fd in m.vcpus:
        sregs = fd.get_sregs()
        sregs.cs.base = 0
        sregs.cs.selector = 0
        fd.set_sregs(sregs)
        fd.set_regs(b.kvm_regs(rip=LOAD, rflags=2))
    return m


def hlt_vm(*, acpi: bool = False, nr_vcpus: int = 1) -> Vm:
    m = hlt_machine(nr_vcpus)
    dm = None
    if acpi:
        dm = DeviceManager.create(m)
        dm.add_acpi_devices(on_poweroff=lambda: None, on_reset=lambda: None)
    return Vm(m, device_manager=dm)
