"""The adapter between strato.interrupts.msi (plain route records) and KVM's routing table."""

from __future__ import annotations

from collections.abc import Sequence

from strato.interrupts.msi import GsiRoute, MsiRoute
from strato.kvm import VmFd, msi_route
from strato.kvm import bindings as b
from strato.kvm import ioctls as k


class KvmRouting:
    """KVM_SET_GSI_ROUTING and KVM_IRQFD on a VmFd. Each table sent costs the kernel an RCU
    grace period, so MsiRouting coalesces route changes over this backend (`coalesce`)."""

    coalesce = True

    def __init__(self, vm: VmFd) -> None:
        self.vm = vm
        self.sent = 0  # routing tables sent to KVM (each one replaces the whole table)

    def set_gsi_routing(self, entries: Sequence[GsiRoute]) -> None:
        out = []
        for e in entries:
            if isinstance(e, MsiRoute):
                out.append(msi_route(e.gsi, e.address_hi << 32 | e.address_lo, e.data))
            else:
                r = b.kvm_irq_routing_entry(gsi=e.gsi, type=k.KVM_IRQ_ROUTING_IRQCHIP)
                r.u.irqchip.irqchip = e.irqchip
                r.u.irqchip.pin = e.pin
                out.append(r)
        self.vm.set_gsi_routing(out)
        self.sent += 1

    def register_irqfd(self, eventfd_fd: int, gsi: int) -> None:
        self.vm.register_irqfd(eventfd_fd, gsi)

    def unregister_irqfd(self, eventfd_fd: int, gsi: int) -> None:
        self.vm.unregister_irqfd(eventfd_fd, gsi)
