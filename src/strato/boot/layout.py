"""Boot-time addresses that only the boot code uses, on top of `strato.memory.layout`.

They are derived from an `X86Layout`, so a VMM that moves `pvh_info` moves them too.
"""

from __future__ import annotations

from strato.memory.layout import LAYOUT, MiB, X86Layout

__all__ = [
    "BOOT_STACK_POINTER",
    "EBDA_END",
    "LAYOUT",
    "PAGE_SIZE",
    "PVH_INFO_AREA_SIZE",
    "PVH_MEMMAP_OFFSET",
    "PVH_MODLIST_OFFSET",
    "MiB",
    "X86Layout",
    "mptable_limit",
    "pvh_memmap_addr",
    "pvh_memmap_capacity",
    "pvh_modlist_addr",
]

PAGE_SIZE = 0x1000
# The initial stack (RSP/RBP) of the boot vCPU: the top of the page below the PML4.
BOOT_STACK_POINTER = 0x8FF0
# Where the legacy "base memory" ends (640 KiB); 0x9fc00..0xa0000 is the EBDA.
EBDA_END = 0xA0000

# Within the page at layout.pvh_info: hvm_start_info (56 bytes), then the module list
# (one 32-byte entry for the initramfs), then the memory map.
PVH_INFO_AREA_SIZE = 0x1000
PVH_MODLIST_OFFSET = 0x40
PVH_MEMMAP_OFFSET = 0x80
_MEMMAP_ENTRY_SIZE = 24


def pvh_modlist_addr(layout: X86Layout = LAYOUT) -> int:
    return layout.pvh_info + PVH_MODLIST_OFFSET


def pvh_memmap_addr(layout: X86Layout = LAYOUT) -> int:
    return layout.pvh_info + PVH_MEMMAP_OFFSET


def pvh_memmap_capacity() -> int:
    """How many hvm_memmap_table_entry records fit in the PVH info page."""
    return (PVH_INFO_AREA_SIZE - PVH_MEMMAP_OFFSET) // _MEMMAP_ENTRY_SIZE


def mptable_limit(layout: X86Layout = LAYOUT) -> int:
    """The MP table starts in the EBDA and must end before the ACPI area (RSDP)."""
    return layout.rsdp
