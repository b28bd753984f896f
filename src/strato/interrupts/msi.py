"""MSI routing: MSI-X vectors become KVM GSIs with an irqfd each, without importing strato.kvm.

Each vector owns a GSI (allocated from 24 up, above the IOAPIC pins) and an `EventFdTrigger`
registered as an irqfd on that GSI, so raising it is one eventfd write that the kernel turns into
the MSI. The message (address, data) lives in the GSI routing table. KVM_SET_GSI_ROUTING
replaces the whole table, so every change re-sends all of it: the legacy irqchip entries for
GSIs 0..23 (which must stay) plus one MSI entry per routed vector.

Coalescing (`MsiRouting(coalesce=True)`, what the VMM's KVM backend asks for): a guest that
rewrites a live entry writes it field by field (address low, address high, data: Linux before
5.14 on every affinity change), and each write used to send the whole table, two of them with
a half-written message (new address, old data). A change of the address alone now only marks
the table stale; the data write that follows sends it once, with the whole message. A table
left stale (a guest that changed only the address) is sent right before the next interrupt
raised through `MsiVectorGroup.trigger`, which every interrupt on these GSIs goes through
(MsixTable.fire, pending vectors delivered at unmask): the kernel reads a route only when an
irqfd is written, and nothing else writes these irqfds. A new route (a vector unmasked), a
data change and a cleared route are sent at once: deferring those to the first interrupt was
tried, and it delays that interrupt by the ioctl (1-10 ms on a nested host), which the built-in
guest's `irq` check sees as a missing interrupt.

The backend is a small protocol the VMM implements on its VmFd (converting these dataclasses
into `kvm_irq_routing_entry`s); tests use a recording fake.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from strato.interrupts.trigger import EventFdTrigger

log = logging.getLogger(__name__)

# KVM_IRQ_ROUTING_IRQCHIP chips
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

IOAPIC_PINS = 24
FIRST_MSI_GSI = 24
MAX_GSI = 4095  # KVM_MAX_IRQ_ROUTES on x86 is 4096


@dataclass(frozen=True)
class IrqchipRoute:
    """KVM_IRQ_ROUTING_IRQCHIP: GSI -> a pin of the PIC master (0), slave (1) or IOAPIC (2)."""

    gsi: int
    irqchip: int
    pin: int


@dataclass(frozen=True)
class MsiRoute:
    """KVM_IRQ_ROUTING_MSI: GSI -> an MSI message (flags 0, no device id on x86)."""

    gsi: int
    address_lo: int
    address_hi: int
    data: int


GsiRoute = IrqchipRoute | MsiRoute


class GsiRoutingBackend(Protocol):
    """What the VMM provides (implemented over VmFd: KVM_SET_GSI_ROUTING and KVM_IRQFD). A
    backend may have `coalesce = True`: MsiRouting then coalesces by default (see above)."""

    def set_gsi_routing(self, entries: list[GsiRoute]) -> None: ...

    def register_irqfd(self, eventfd_fd: int, gsi: int) -> None: ...

    def unregister_irqfd(self, eventfd_fd: int, gsi: int) -> None: ...


def legacy_irqchip_routes(irq0_to_pin2: bool = False) -> list[IrqchipRoute]:
    """The table KVM_CREATE_IRQCHIP starts with: GSI 0..15 on the PICs, 0..23 on the IOAPIC.

    The PIC master has pins 0-7 (GSI 0-7), the slave pins 0-7 (GSI 8-15, pin = GSI - 8); the
    IOAPIC pin equals the GSI. With `irq0_to_pin2` GSI 0 (the PIT) goes to IOAPIC pin 2 instead
    and GSI 2 has no IOAPIC pin, as QEMU routes it; use it together with an IRQ0 -> GSI2
    interrupt source override in the MADT (strato.boot.acpi's `irq0_to_gsi2`), never alone.
    """
    routes: list[IrqchipRoute] = []
    for gsi in range(IOAPIC_PINS):
        if gsi < 8:
            routes.append(IrqchipRoute(gsi, IRQCHIP_PIC_MASTER, gsi))
        elif gsi < 16:
            routes.append(IrqchipRoute(gsi, IRQCHIP_PIC_SLAVE, gsi - 8))
        if irq0_to_pin2 and gsi == 0:
            routes.append(IrqchipRoute(0, IRQCHIP_IOAPIC, 2))
        elif not (irq0_to_pin2 and gsi == 2):
            routes.append(IrqchipRoute(gsi, IRQCHIP_IOAPIC, gsi))
    return routes


class MsiRouting:
    """Owns GSIs >= 24 and the routing table of one VM. Thread-safe.

    `coalesce` (default: the backend's `coalesce` attribute, else False): an address-only
    change of a routed GSI is sent with the next change or interrupt (see the module doc)."""

    def __init__(
        self,
        backend: GsiRoutingBackend,
        legacy_routes: Sequence[IrqchipRoute] | None = None,
        first_gsi: int = FIRST_MSI_GSI,
        max_gsi: int = MAX_GSI,
        coalesce: bool | None = None,
    ) -> None:
        self.backend = backend
        self.coalesce = bool(getattr(backend, "coalesce", False)) if coalesce is None else coalesce
        self._stale = False  # routes changed since the table was last sent (coalesce mode)
        self.legacy_routes = list(
            legacy_routes if legacy_routes is not None else legacy_irqchip_routes()
        )
        self.first_gsi = first_gsi
        self.max_gsi = max_gsi
        self._free_gsis: list[int] = []
        self._next_gsi = first_gsi
        self._msi_routes: dict[int, MsiRoute] = {}
        self._lock = threading.RLock()

    def allocate_gsi(self) -> int:
        with self._lock:
            if self._free_gsis:
                return self._free_gsis.pop(0)
            if self._next_gsi > self.max_gsi:
                raise RuntimeError("no GSI left for MSI vectors")
            gsi = self._next_gsi
            self._next_gsi += 1
            return gsi

    def release_gsi(self, gsi: int) -> None:
        self.release_gsis([gsi])

    def release_gsis(self, gsis: Sequence[int]) -> None:
        """Drop the routes of `gsis` (one table sent for all of them) and free the GSIs."""
        with self._lock:
            routed = [self._msi_routes.pop(gsi, None) for gsi in gsis]
            if any(r is not None for r in routed):
                self._commit()
            self._free_gsis.extend(gsis)
            self._free_gsis.sort()

    def allocate_group(self, count: int) -> MsiVectorGroup:
        """`count` vectors, each with its own GSI and irqfd (not routed until `update`)."""
        return MsiVectorGroup(self, count)

    def set_route(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` to the MSI message; the table is re-sent only if it changed (an
        address-only change, when coalescing, with the next send or `flush`)."""
        route = MsiRoute(
            gsi, address & 0xFFFF_FFFF, (address >> 32) & 0xFFFF_FFFF, data & 0xFFFF_FFFF
        )
        with self._lock:
            if self._msi_routes.get(gsi) == route:
                return
            old = self._msi_routes.get(gsi)
            self._msi_routes[gsi] = route
            if self.coalesce and old is not None and old.data == route.data:
                self._stale = True  # the address of a live entry: its data write follows
            else:
                self._commit()

    @property
    def stale(self) -> bool:
        """Routes changed that KVM does not have yet (coalesce mode)."""
        return self._stale

    def flush(self) -> None:
        """Send the table if a route changed since it was last sent. Called before every
        interrupt; the common case (nothing changed) takes no lock."""
        if not self._stale:
            return
        with self._lock:
            if self._stale:
                self._commit()

    def clear_route(self, gsi: int) -> None:
        with self._lock:
            if self._msi_routes.pop(gsi, None) is not None:
                self._commit()

    def routes(self) -> list[GsiRoute]:
        """The whole table as it is sent to KVM."""
        with self._lock:
            table: list[GsiRoute] = list(self.legacy_routes)
            table.extend(self._msi_routes[g] for g in sorted(self._msi_routes))
            return table

    def commit(self) -> None:
        """Send the table now (e.g. once at VM creation, so it is in force from the start)."""
        with self._lock:
            self._commit()

    def _commit(self) -> None:
        self.backend.set_gsi_routing(self.routes())
        self._stale = False  # only once KVM took it: a failed send is retried by the next flush


class MsiVector:
    """One vector: a GSI and the irqfd trigger registered on it."""

    def __init__(self, gsi: int, trigger: EventFdTrigger) -> None:
        self.gsi = gsi
        self.trigger = trigger


class MsiVectorGroup:
    """The vectors of one device; an `MsixVectorSink` for `strato.pci.msix.MsixTable`."""

    def __init__(self, routing: MsiRouting, count: int) -> None:
        self.routing = routing
        self.vectors: list[MsiVector] = []
        try:
            for _ in range(count):
                gsi = routing.allocate_gsi()
                trigger = EventFdTrigger()
                try:
                    routing.backend.register_irqfd(trigger.fileno(), gsi)
                except BaseException:
                    trigger.eventfd.close()
                    routing.release_gsi(gsi)
                    raise
                self.vectors.append(MsiVector(gsi, trigger))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.vectors)

    def update(self, vector: int, address: int, data: int) -> None:
        if 0 <= vector < len(self.vectors):
            self.routing.set_route(self.vectors[vector].gsi, address, data)

    def trigger(self, vector: int) -> None:
        if 0 <= vector < len(self.vectors):
            self.routing.flush()  # a coalesced route change reaches KVM before the message
            self.vectors[vector].trigger.trigger()

    def gsi(self, vector: int) -> int:
        return self.vectors[vector].gsi

    def close(self) -> None:
        """Unregister the irqfds, drop the routes (one table sent for the whole group) and give
        the GSIs back."""
        for v in self.vectors:
            try:
                self.routing.backend.unregister_irqfd(v.trigger.fileno(), v.gsi)
            except Exception:
                log.exception("unregistering irqfd for GSI %d failed", v.gsi)
        try:
            self.routing.release_gsis([v.gsi for v in self.vectors])
        finally:
            for v in self.vectors:
                v.trigger.eventfd.close()
            self.vectors = []
