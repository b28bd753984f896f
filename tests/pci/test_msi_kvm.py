"""MSI routing against the real KVM: the routing table is accepted with the legacy irqchip
entries, and a vector raised through its irqfd lands in the target vCPU's LAPIC IRR; route
changes are coalesced into one KVM_SET_GSI_ROUTING per interrupt; the virtio-pci transport
registers its ioeventfds with a real VmFd."""

from __future__ import annotations

import ctypes
import os
import struct
import time
from collections.abc import Iterator, Sequence

import pytest

from strato.events import EventLoop
from strato.interrupts.msi import GsiRoute, MsiRoute, MsiRouting
from strato.kvm import Kvm, VcpuFd, VmFd
from strato.kvm import bindings as b
from strato.memory import GuestMemory
from strato.pci.msix import MSG_CTL_ENABLE, MSG_CTL_FUNCTION_MASK, VECTOR_CTL_MASKED, MsixTable
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
        _enable_lapic(vcpu)
        backend = KvmRouting(vm)
        routing = MsiRouting(backend)
        routing.commit()  # the legacy table alone is accepted
        group = routing.allocate_group(2)
        group.update(1, 0xFEE0_0000, 0x45)  # fixed delivery, vector 0x45, APIC id 0
        assert backend.sent == 2
        assert not _irr_bit(_regs(vcpu.get_lapic()), 0x45)
        group.trigger(1)
        _wait_irr(vcpu, 0x45)
        # the kernel consumed the eventfd: the irqfd is live
        with pytest.raises(BlockingIOError):
            os.eventfd_read(group.vectors[1].trigger.fileno())
        group.close()
    finally:
        vcpu.close()


def _wait_irr(vcpu: VcpuFd, vector: int) -> None:
    deadline = time.monotonic() + 5
    while not _irr_bit(_regs(vcpu.get_lapic()), vector):
        assert time.monotonic() < deadline, f"MSI vector {vector:#x} did not reach the LAPIC"
        time.sleep(0.001)  # polling the LAPIC: the irqfd is delivered by a kernel worker


def _enable_lapic(vcpu: VcpuFd) -> None:
    lapic = vcpu.get_lapic()
    regs = bytearray(_regs(lapic))
    svr = struct.unpack_from("<I", regs, APIC_SVR)[0]
    struct.pack_into("<I", regs, APIC_SVR, svr | 0x1FF)  # software enable
    ctypes.memmove(ctypes.addressof(lapic), bytes(regs), len(regs))
    vcpu.set_lapic(lapic)


def _write(table: MsixTable, vector: int, field: int, value: int) -> None:
    table.write_table(vector * 16 + field * 4, struct.pack("<I", value))


def _linux_programs(table: MsixTable, vectors: dict[int, int]) -> None:
    """What Linux (5.14 on) does to set up MSI-X: enable with the function masked, mask every
    entry, unmask the function; then per vector (request_irq) write the message while the
    entry is masked and unmask it."""
    table.set_message_control(MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK)
    for v in range(table.num_vectors):
        _write(table, v, 3, VECTOR_CTL_MASKED)
    table.set_message_control(MSG_CTL_ENABLE)
    for v, irq in vectors.items():
        _write(table, v, 0, 0xFEE0_0000)  # address: fixed delivery to APIC id 0
        _write(table, v, 1, 0)
        _write(table, v, 2, irq)  # data: the vector
        _write(table, v, 3, 0)  # unmask


@pytest.mark.parametrize("coalesce", [True, False])
def test_a_guest_programming_msix_sends_one_table_per_message(vm: VmFd, coalesce: bool) -> None:
    """Eight vectors set up the way Linux does (one table per unmask), then live entries
    rewritten field by field as kernels before 5.14 do on an affinity change: one table per
    rewritten message instead of one per changed field, and an address-only change sent with
    the next interrupt. Every interrupt arrives, with its newest message."""
    vcpu = vm.create_vcpu(0)
    try:
        _enable_lapic(vcpu)
        backend = KvmRouting(vm)
        routing = MsiRouting(backend, coalesce=coalesce)
        routing.commit()
        group = routing.allocate_group(8)
        table = MsixTable(8, group)
        _linux_programs(table, {v: 0x40 + v for v in range(8)})
        assert backend.sent == 1 + 8
        for v in range(8):
            assert table.fire(v)
            _wait_irr(vcpu, 0x40 + v)
        assert backend.sent == 1 + 8  # no route changed: no table sent
        # A live entry rewritten: new address (redirection hint) and new data.
        for field, value in ((0, 0xFEE0_0008), (1, 0), (2, 0x70)):
            _write(table, 3, field, value)
        assert backend.sent == 1 + 8 + (1 if coalesce else 2)
        assert table.fire(3)
        _wait_irr(vcpu, 0x70)
        # The address alone: sent with the next interrupt (when coalescing).
        _write(table, 5, 0, 0xFEE0_0008)
        assert backend.sent == 1 + 8 + (1 if coalesce else 3)
        assert routing.stale is coalesce
        table.fire(5)
        assert backend.sent == 1 + 8 + (2 if coalesce else 3) and not routing.stale
        msi = {r.gsi - group.gsi(0): r for r in routing.routes() if isinstance(r, MsiRoute)}
        assert (msi[3].address_lo, msi[3].data) == (0xFEE0_0008, 0x70)
        assert (msi[5].address_lo, msi[5].data) == (0xFEE0_0008, 0x45)
        sent = backend.sent
        group.close()  # the device goes away (teardown, reboot): one table for its 8 routes
        assert backend.sent == sent + 1
        assert not any(isinstance(r, MsiRoute) for r in routing.routes())
    finally:
        vcpu.close()


def test_a_failed_routing_update_is_sent_again_with_the_next_interrupt(vm: VmFd) -> None:
    backend = KvmRouting(vm)
    routing = MsiRouting(backend)
    group = routing.allocate_group(1)
    group.update(0, 0xFEE0_0000, 0x50)
    assert backend.sent == 1
    real = backend.set_gsi_routing
    fails = [OSError(22, "Invalid argument")]

    def flaky(entries: Sequence[GsiRoute]) -> None:
        if fails:
            raise fails.pop()
        real(entries)

    backend.set_gsi_routing = flaky  # type: ignore[method-assign]
    group.update(0, 0xFEE0_0008, 0x50)  # address only: left stale
    assert routing.stale
    with pytest.raises(OSError):
        group.trigger(0)  # the send fails: the interrupt is not raised with the old message
    assert routing.stale
    group.trigger(0)
    assert not routing.stale and backend.sent == 2
    group.close()


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
