"""The ACPI Generic Event Device's notification register, as Cloud Hypervisor's AcpiGedDevice.

A one-byte MMIO register. The VMM sets event bits and raises the GED interrupt (an edge,
active high, as the GED's _CRS declares); the DSDT's _EVT method reads the byte, which returns
the pending bits and clears them, and dispatches: bit 0 CPU hotplug scan, bit 1 memory hotplug
scan, bit 2 PCI hotplug scan, bit 3 Notify(\\_SB.PWRB, 0x80), the power button.
The register's address is allocated by the VMM from platform MMIO space.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from strato.devices.legacy._common import BYTE, open_bus, u8_field
from strato.interrupts import Trigger

GED_SIZE = 1

GED_CPU_DEVICES_CHANGED = 1 << 0
GED_MEMORY_DEVICES_CHANGED = 1 << 1
GED_PCI_DEVICES_CHANGED = 1 << 2
GED_POWER_BUTTON = 1 << 3


class AcpiGed:
    """The GED notification register on the MMIO bus (length GED_SIZE)."""

    def __init__(self, trigger: Trigger) -> None:
        self._trigger = trigger
        self._lock = threading.Lock()
        self.pending = 0

    def notify(self, flags: int) -> None:
        """Record events (GED_* bits) and raise the GED interrupt."""
        with self._lock:
            self.pending |= flags & 0xFF
            self._trigger.trigger()

    def power_button(self) -> None:
        """Press the power button: a well-behaved guest shuts down through S5."""
        self.notify(GED_POWER_BUTTON)

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or size != 1:
            return open_bus(size)
        with self._lock:
            value, self.pending = self.pending, 0
        return BYTE[value]

    def write(self, offset: int, data: bytes) -> None:
        pass  # the guest only reads

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"pending": self.pending}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load the pending bits; raise the interrupt again if any (an edge in flight is lost)."""
        pending = u8_field(state, "pending")
        with self._lock:
            self.pending = pending
            if pending:
                self._trigger.trigger()
