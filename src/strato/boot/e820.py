"""The guest's physical memory map, as e820 entries (zero page) or PVH memmap entries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum

from strato.boot.errors import BootError
from strato.boot.layout import EBDA_END, LAYOUT, X86Layout
from strato.memory import GuestMemory

__all__ = ["E820Entry", "E820Type", "build_e820", "low_ram_end"]


class E820Type(IntEnum):
    RAM = 1
    RESERVED = 2
    ACPI = 3
    NVS = 4
    UNUSABLE = 5
    PMEM = 7


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: E820Type

    @property
    def end(self) -> int:
        return self.addr + self.size


def low_ram_end(mem: GuestMemory, layout: X86Layout = LAYOUT) -> int:
    """End of the RAM that starts at address 0, capped at the 32-bit MMIO hole.

    The boot code needs at least the first MiB (zero page, page tables, command line, MP table).
    """
    if not mem.check(0, layout.high_ram):
        raise BootError(
            "guest memory must start at address 0 and be at least "
            f"{layout.high_ram // 1024} KiB long to hold the boot structures"
        )
    return min(mem.region_of(0).end, layout.mmio32_start)


def _subtract(ranges: list[tuple[int, int]], cut_start: int, cut_end: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if cut_end <= start or end <= cut_start:
            out.append((start, end))
            continue
        if start < cut_start:
            out.append((start, cut_start))
        if cut_end < end:
            out.append((cut_end, end))
    return out


def build_e820(
    mem: GuestMemory,
    layout: X86Layout = LAYOUT,
    reserved: Iterable[tuple[int, int]] = (),
) -> list[E820Entry]:
    """The memory map strato tells the guest about, sorted by address.

    RAM below the EBDA is usable, the EBDA (ebda_start..640 KiB) is reserved, the legacy
    video/BIOS hole up to 1 MiB is left out (the kernel treats it as reserved), RAM from 1 MiB
    to the MMIO hole and RAM above 4 GiB is usable. `reserved` is extra (start, size) ranges
    the VMM wants kept away from the guest's allocator; they are cut out of any RAM entry.
    """
    usable_windows = [(0, layout.ebda_start), (layout.high_ram, layout.mmio32_start)]
    ram: list[tuple[int, int]] = []
    reserved_ranges: list[tuple[int, int]] = []
    for region in mem:
        for lo, hi in usable_windows:
            start, end = max(region.start, lo), min(region.end, hi)
            if start < end:
                ram.append((start, end))
        start = max(region.start, layout.mmio32_end)
        if start < region.end:
            ram.append((start, region.end))
        start, end = max(region.start, layout.ebda_start), min(region.end, EBDA_END)
        if start < end:
            reserved_ranges.append((start, end))
    for start, size in reserved:
        if size <= 0 or start < 0:
            raise BootError(f"reserved memory range at {start:#x} has a bad size {size:#x}")
        ram = _subtract(ram, start, start + size)
        reserved_ranges = _subtract(reserved_ranges, start, start + size)
        reserved_ranges.append((start, start + size))
    entries = [E820Entry(s, e - s, E820Type.RAM) for s, e in ram]
    entries += [E820Entry(s, e - s, E820Type.RESERVED) for s, e in reserved_ranges]
    entries.sort(key=lambda entry: entry.addr)
    return entries
