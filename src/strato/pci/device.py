"""What the PCI root needs from a device function, and the bus adapter for its BARs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from strato.pci.configuration import BarKind, BarMove, BarSpec


@dataclass(frozen=True)
class BarRegion:
    """A BAR as placed in the guest address space."""

    index: int
    address: int
    size: int
    kind: BarKind
    prefetchable: bool = False


class PciDevice(Protocol):
    """One PCI function. Config accesses are 1, 2 or 4 bytes inside a dword of 4 KiB.

    The root serialises config accesses; BAR accesses come straight from vCPU threads through
    `BarWindow`, so an implementation guards its own state.
    """

    def config_read(self, offset: int, size: int) -> int:
        """Value of a guest config read (all-ones bits for a malformed access)."""
        ...

    def config_write(self, offset: int, data: bytes) -> list[BarMove]:
        """Apply a guest config write; return BAR moves the root must apply on the buses."""
        ...

    def bar_specs(self) -> list[BarSpec]:
        """The BARs this function declares (for allocation)."""
        ...

    def bars(self) -> list[BarRegion]:
        """The BARs as currently placed (what the root maps on the buses)."""
        ...

    def set_bar_address(self, index: int, address: int) -> None:
        """Host-side placement: initial allocation, restore, or rollback of a failed move."""
        ...

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        """Exactly `size` bytes; never raises on guest input."""
        ...

    def bar_write(self, index: int, offset: int, data: bytes) -> None: ...

    def bar_moved(self, index: int, old_base: int, new_base: int) -> None:
        """The root moved BAR `index` on the bus (the device re-registers ioeventfds etc.)."""
        ...


class BarWindow:
    """The BusDevice a BAR is inserted as: offsets are relative to the BAR's base."""

    def __init__(self, device: PciDevice, index: int) -> None:
        self.device = device
        self.index = index

    def read(self, offset: int, size: int) -> bytes:
        return self.device.bar_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.device.bar_write(self.index, offset, data)
