"""Identity-mapped page tables for entering the kernel in long mode.

PML4[0] -> PDPT, PDPT[0..3] -> four page directories of 2 MiB pages: virtual == physical for
the first 4 GiB, so the kernel, the boot structures and the 32-bit MMIO hole (LAPIC, IOAPIC,
ECAM) are all reachable before the kernel builds its own tables.
"""

from __future__ import annotations

import struct

from strato.boot.errors import BootError
from strato.boot.layout import LAYOUT, PAGE_SIZE, X86Layout
from strato.memory import GuestMemory

__all__ = ["IDENTITY_MAP_GIB", "identity_page_tables", "write_identity_page_tables"]

IDENTITY_MAP_GIB = 4
_PRESENT = 1 << 0
_WRITABLE = 1 << 1
_PAGE_SIZE_2M = 1 << 7
_ENTRIES = 512


def identity_page_tables(
    layout: X86Layout = LAYOUT, gib: int = IDENTITY_MAP_GIB
) -> list[tuple[int, bytes]]:
    """The pages to write: [(guest address, 4096 bytes)] for PML4, PDPT and `gib` PDs."""
    if not 1 <= gib <= _ENTRIES:
        raise BootError(f"identity map size must be 1..512 GiB, not {gib}")
    pml4 = [0] * _ENTRIES
    pml4[0] = layout.pdpte | _PRESENT | _WRITABLE
    pdpt = [0] * _ENTRIES
    pages = [(layout.pml4, struct.pack("<512Q", *pml4))]
    for i in range(gib):
        pd_addr = layout.pde + i * PAGE_SIZE
        pdpt[i] = pd_addr | _PRESENT | _WRITABLE
        pd = [
            ((i * _ENTRIES + j) << 21) | _PRESENT | _WRITABLE | _PAGE_SIZE_2M
            for j in range(_ENTRIES)
        ]
        pages.append((pd_addr, struct.pack("<512Q", *pd)))
    pages.insert(1, (layout.pdpte, struct.pack("<512Q", *pdpt)))
    return pages


def write_identity_page_tables(
    mem: GuestMemory, layout: X86Layout = LAYOUT, gib: int = IDENTITY_MAP_GIB
) -> int:
    """Write the tables into guest memory; returns the value for CR3 (the PML4 address)."""
    for addr, page in identity_page_tables(layout, gib):
        mem.write(addr, page)
    return layout.pml4
