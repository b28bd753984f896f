"""The KVM-level machine: a VM with memory, the in-kernel irqchip and PIT, buses and vCPU fds.

This is the part of the boot recipe that every guest needs whatever it boots; `builder.py`
loads a payload into it and adds devices.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from strato._sys.eventfd import EventFd
from strato.bus import Bus
from strato.events import EventLoop
from strato.interrupts import EventFdTrigger
from strato.kvm import Kvm, VcpuFd, VmFd
from strato.kvm import ioctls as k
from strato.memory import GuestMemory, ram_ranges
from strato.memory.layout import LAYOUT
from strato.vmm.config import ConfigError

log = logging.getLogger(__name__)

REQUIRED_CAPS = {
    k.KVM_CAP_IRQCHIP: "in-kernel irqchip",
    k.KVM_CAP_USER_MEMORY: "user memory regions",
    k.KVM_CAP_SET_TSS_ADDR: "KVM_SET_TSS_ADDR",
    k.KVM_CAP_EXT_CPUID: "KVM_GET_SUPPORTED_CPUID",
    k.KVM_CAP_IOEVENTFD: "ioeventfd",
    k.KVM_CAP_IRQFD: "irqfd",
    k.KVM_CAP_PIT2: "in-kernel PIT",
    k.KVM_CAP_IRQ_ROUTING: "GSI routing",
}


@dataclass(eq=False)
class Machine:
    kvm: Kvm
    vm: VmFd
    memory: GuestMemory
    vcpus: list[VcpuFd]
    pio: Bus = field(default_factory=lambda: Bus("pio"))
    mmio: Bus = field(default_factory=lambda: Bus("mmio"))
    loop: EventLoop = field(default_factory=EventLoop)
    _irqfds: list[tuple[EventFd, int]] = field(default_factory=list)

    @classmethod
    def create(cls, memory_size: int, nr_vcpus: int, shared_memory: bool = False) -> Machine:
        kvm = Kvm()
        for cap, what in REQUIRED_CAPS.items():
            if not kvm.check_extension(cap):
                kvm.close()
                raise ConfigError(f"this host's KVM lacks {what} (capability {cap})")
        max_vcpus = kvm.max_vcpus()
        if nr_vcpus > max_vcpus:
            kvm.close()
            raise ConfigError(f"--cpus boot={nr_vcpus}: this host's KVM allows at most {max_vcpus}")
        vm = kvm.create_vm()
        vm.set_tss_address(LAYOUT.tss)
        vm.set_identity_map_address(LAYOUT.identity_map)
        vm.create_irqchip()
        vm.create_pit2()
        ranges = ram_ranges(memory_size)
        memory = GuestMemory.shared(ranges) if shared_memory else GuestMemory.anonymous(ranges)
        for slot, region in enumerate(memory):
            vm.set_user_memory_region(slot, region.start, region.size, region.host_address)
        vcpus = [vm.create_vcpu(i) for i in range(nr_vcpus)]
        return cls(kvm, vm, memory, vcpus)

    def irqfd_trigger(self, gsi: int) -> EventFdTrigger:
        """An edge trigger on a GSI of the in-kernel PIC/IOAPIC, delivered through an irqfd."""
        efd = EventFd()
        self.vm.register_irqfd(efd.fd, gsi)
        self._irqfds.append((efd, gsi))
        return EventFdTrigger(efd)

    def close(self) -> None:
        self.loop.close()
        for efd, gsi in self._irqfds:
            try:
                self.vm.unregister_irqfd(efd.fd, gsi)
            except OSError:
                pass
            efd.close()
        for v in self.vcpus:
            v.close()
        self.vm.close()
        self.kvm.close()
        self.memory.close()
