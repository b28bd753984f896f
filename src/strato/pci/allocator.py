"""Address allocation for BARs: the 32-bit window below the ECAM and the 64-bit window.

First fit over a sorted list of allocated ranges, aligned; BARs are naturally aligned to their
size (the PCI rule that lets a guest size them). The windows here must match the ones the ACPI
DSDT advertises for the root bridge (`strato.boot.acpi` takes them as parameters).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from strato.memory.layout import LAYOUT, X86Layout
from strato.pci.configuration import BarKind, BarSpec

GiB = 1 << 30
DEFAULT_MMIO64_SIZE = 64 * GiB


class AllocationError(ValueError):
    """No room left, a misaligned request, or a range outside the window."""


class AddressAllocator:
    """Allocates aligned ranges inside [base, base+size)."""

    def __init__(self, base: int, size: int, name: str = "mmio") -> None:
        if size <= 0 or base < 0:
            raise AllocationError(f"{name}: empty window")
        self.base = base
        self.size = size
        self.name = name
        self._starts: list[int] = []
        self._ranges: list[tuple[int, int]] = []  # (start, end) sorted
        self._lock = threading.Lock()

    @property
    def end(self) -> int:
        return self.base + self.size

    def allocate(self, size: int, align: int | None = None) -> int:
        """Lowest free address aligned to `align` (default: `size` rounded up to a power of 2)."""
        if size <= 0:
            raise AllocationError(f"{self.name}: empty allocation")
        if align is None:
            align = 1 << (size - 1).bit_length()
        if align <= 0 or align & (align - 1):
            raise AllocationError(f"{self.name}: alignment {align:#x} is not a power of two")
        with self._lock:
            candidate = _align_up(self.base, align)
            for start, end in self._ranges:
                if candidate + size <= start:
                    break
                if end > candidate:
                    candidate = _align_up(end, align)
            if candidate + size > self.end:
                raise AllocationError(
                    f"{self.name}: no room for {size:#x} bytes aligned to {align:#x}"
                )
            self._insert(candidate, candidate + size)
            return candidate

    def reserve(self, address: int, size: int) -> None:
        """Take a fixed range (restore, fixed devices); it must be free and in the window."""
        if size <= 0 or address < self.base or address + size > self.end:
            raise AllocationError(
                f"{self.name}: [{address:#x}, {address + size:#x}) outside the window"
            )
        with self._lock:
            i = bisect.bisect_left(self._starts, address)
            if i > 0 and self._ranges[i - 1][1] > address:
                raise AllocationError(f"{self.name}: {address:#x} already allocated")
            if i < len(self._ranges) and self._ranges[i][0] < address + size:
                raise AllocationError(f"{self.name}: {address:#x} overlaps an allocation")
            self._insert(address, address + size)

    def free(self, address: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, address)
            if i >= len(self._starts) or self._starts[i] != address:
                raise AllocationError(f"{self.name}: nothing allocated at {address:#x}")
            del self._starts[i]
            del self._ranges[i]

    def contains(self, address: int, size: int) -> bool:
        return self.base <= address and address + size <= self.end

    def allocations(self) -> list[tuple[int, int]]:
        """(start, size) of every allocation."""
        return [(s, e - s) for s, e in self._ranges]

    def _insert(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        self._starts.insert(i, start)
        self._ranges.insert(i, (start, end))

    def state(self) -> dict[str, Any]:
        return {"allocations": [list(r) for r in self.allocations()]}

    def restore(self, state: dict[str, Any]) -> None:
        with self._lock:
            self._starts, self._ranges = [], []
        for start, size in state["allocations"]:
            self.reserve(start, size)


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


class PciAllocator:
    """The two PCI MMIO windows (and the I/O port window for I/O BARs)."""

    def __init__(
        self,
        mmio32: tuple[int, int],
        mmio64: tuple[int, int],
        io: tuple[int, int] = (0x1000, 0xF000),
    ) -> None:
        self.mmio32 = AddressAllocator(*mmio32, name="pci-mmio32")
        self.mmio64 = AddressAllocator(*mmio64, name="pci-mmio64")
        self.io = AddressAllocator(*io, name="pci-io")

    @classmethod
    def from_layout(
        cls, layout: X86Layout = LAYOUT, mmio64_size: int = DEFAULT_MMIO64_SIZE
    ) -> PciAllocator:
        """32-bit window [mmio32_start, pci_ecam), 64-bit window from mmio64_start."""
        return cls(
            (layout.mmio32_start, layout.pci_ecam - layout.mmio32_start),
            (layout.mmio64_start, mmio64_size),
        )

    def window_for(self, kind: BarKind) -> AddressAllocator:
        if kind is BarKind.IO:
            return self.io
        return self.mmio64 if kind is BarKind.MEM64 else self.mmio32

    def allocate_bar(self, spec: BarSpec) -> int:
        """A naturally aligned address; a 64-bit BAR falls back to the 32-bit window if full."""
        try:
            return self.window_for(spec.kind).allocate(spec.size, spec.size)
        except AllocationError:
            if spec.kind is BarKind.MEM64 and spec.size <= 1 << 31:
                return self.mmio32.allocate(spec.size, spec.size)
            raise

    def _owner(self, kind: BarKind, address: int, size: int) -> AddressAllocator:
        window = self.window_for(kind)
        if kind is BarKind.MEM64 and not window.contains(address, size):
            return self.mmio32
        return window

    def reserve_bar(self, kind: BarKind, address: int, size: int) -> None:
        """Track a BAR placed elsewhere (restore); one outside every window is not tracked."""
        owner = self._owner(kind, address, size)
        if owner.contains(address, size):
            owner.reserve(address, size)

    def free_bar(self, kind: BarKind, address: int, size: int) -> None:
        self._owner(kind, address, size).free(address)

    def move_bar(self, kind: BarKind, old: int, new: int, size: int) -> None:
        """Follow a guest move: free the old range, take the new one if it is in a window.

        A guest may place a BAR anywhere; a range outside our windows is simply not tracked.
        """
        try:
            self.free_bar(kind, old, size)
        except AllocationError:
            pass
        for window in (self.window_for(kind), self.mmio32):
            if window.contains(new, size):
                try:
                    window.reserve(new, size)
                except AllocationError:
                    pass
                return
