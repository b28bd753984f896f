"""MSI routing against the real KVM: the routing table is accepted with the legacy irqchip
entries, and a vector raised through its irqfd lands in the target vCPU's LAPIC IRR; the
virtio-pci transport registers its ioeventfds with a real VmFd."""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Iterator

import pytest

from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting
from strato.kvm import Kvm, VmFd
from strato.kvm import bindings as b
from strato.memory import GuestMemory
from strato.virtio.pci import NOTIFY_OFFSET, VirtioPciDevice
from strato.vmm.routing import KvmRouting

from .helpers import FakeVirtioDevice

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

APIC_SVR = 0xF0
APIC_IRR = 0x200


@pytest.fixture
def vm() -> Iterator[VmFd]:
    kvm = Kvm()
    vm = kvm.create_vm()
    vm.create_irqchip()
    yield vm
    vm.close()
    kvm.close()


def _regs(lapic: b.kvm_lapic_state) -> bytes:
    # (the c_char array attribute stops at the first NUL byte: copy the raw 1 KiB instead)
    return ctypes.string_at(ctypes.addressof(lapic), ctypes.sizeof(lapic))


def _irr_bit(regs: bytes, vector: int) -> bool:
    word = struct.unpack_from("<I", regs, APIC_IRR + 0x10 * (vector // 32))[0]
    return bool(word >> (vector % 32) & 1)


def test_msi_vector_reaches_the_lapic(vm: VmFd) -> None:
    vcpu = vm.create_vcpu(0)
    try:
        lapic = vcpu.get_lapic()
        regs = bytearray(_regs(lapic))
        svr = struct.unpack_from("<I", regs, APIC_SVR)[0]
        struct.pack_into("<I", regs, APIC_SVR, svr | 0x1FF)  # software enable
        ctypes.memmove(ctypes.addressof(lapic), bytes(regs), len(regs))
        vcpu.set_lapic(lapic)

        backend = KvmRouting(vm)
        routing = MsiRouting(backend)
        routing.commit()  # the legacy table alone is accepted
        group = routing.allocate_group(2)
        group.update(1, 0xFEE0_0000, 0x45)  # fixed delivery, vector 0x45, APIC id 0
        assert backend.sent == 2
        assert not _irr_bit(_regs(vcpu.get_lapic()), 0x45)
        group.trigger(1)
        deadline = time.monotonic() + 5
        while not _irr_bit(_regs(vcpu.get_lapic()), 0x45):
            assert time.monotonic() < deadline, "MSI did not reach the LAPIC"
            time.sleep(0.001)
        # the kernel consumed the eventfd: the irqfd is live
        with pytest.raises(BlockingIOError):
            os.eventfd_read(group.vectors[1].trigger.fileno())
        group.close()
    finally:
        vcpu.close()


def test_transport_registers_ioeventfds_with_kvm(vm: VmFd) -> None:
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    loop = EventLoop()
    transport = VirtioPciDevice(FakeVirtioDevice(), MsiRouting(KvmRouting(vm)), mem, loop, vm)
    try:
        base = 1 << 40
        transport.set_bar_address(0, base)
        assert transport.notify_address(1) == base + NOTIFY_OFFSET + 4
        transport.bar_moved(0, base, base + 0x80000)  # unregister + register again
        transport.set_bar_address(0, base)
    finally:
        transport.close()
        loop.close()
        mem.close()
