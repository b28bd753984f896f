"""The x86_64 guest physical address map strato uses (close to Cloud Hypervisor's)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class X86Layout:
    """Fixed addresses of the x86_64 machine strato builds."""

    # Low memory (below 1 MiB) used by the boot code.
    zero_page: int = 0x7000  # struct boot_params for the bzImage protocol
    pvh_info: int = 0x6000  # struct hvm_start_info (+ module list and memmap after it)
    boot_gdt: int = 0x500
    boot_idt: int = 0x520
    pml4: int = 0x9000
    pdpte: int = 0xA000
    pde: int = 0xB000  # 4 page directories follow (identity map of the first 4 GiB)
    cmdline: int = 0x20000
    cmdline_max: int = 0x10000
    mptable: int = 0x9FC00  # inside the EBDA, where an MP-aware kernel searches
    ebda_start: int = 0x9FC00
    rsdp: int = 0xE0000  # the BIOS read-only area where ACPI's RSDP is searched
    acpi_tables: int = 0xE1000
    high_ram: int = 1 * MiB  # kernels load here
    # The 32-bit MMIO hole: PCI devices, ECAM, LAPIC, IOAPIC live here.
    mmio32_start: int = 3 * GiB
    mmio32_end: int = 4 * GiB
    pci_ecam: int = 0xE800_0000  # 256 MiB of ECAM for buses 0..255
    pci_ecam_size: int = 0x1000_0000
    ioapic: int = 0xFEC0_0000
    lapic: int = 0xFEE0_0000
    tss: int = 0xFFFB_D000  # KVM_SET_TSS_ADDR (3 pages) and the identity map page after it
    identity_map: int = 0xFFFB_C000
    mmio64_start: int = 1 << 40  # 64-bit BARs above guest RAM


LAYOUT = X86Layout()


def ram_ranges(size: int, layout: X86Layout = LAYOUT) -> list[tuple[int, int]]:
    """Split `size` bytes of RAM around the 32-bit MMIO hole: [(start, size), ...]."""
    if size <= 0:
        raise ValueError("memory size must be positive")
    if size <= layout.mmio32_start:
        return [(0, size)]
    return [(0, layout.mmio32_start), (layout.mmio32_end, size - layout.mmio32_start)]


# The top of the guest physical address space a VMM may use, for a host with `bits` physical
# address bits: less 64 KiB, as Cloud Hypervisor (mmio_address_space_size) and Linux want it.
def address_space_end(bits: int) -> int:
    return (1 << bits) - (1 << 16)


def ram_end(size: int, layout: X86Layout = LAYOUT) -> int:
    """The first guest physical address above `size` bytes of RAM."""
    start, length = ram_ranges(size, layout)[-1]
    return start + length


def max_ram_size(layout: X86Layout = LAYOUT) -> int:
    """The most RAM that ends at or below the 64-bit PCI window (1 TiB - 1 GiB here)."""
    return layout.mmio64_start - (layout.mmio32_end - layout.mmio32_start)


@functools.cache
def host_phys_bits() -> int | None:
    """The host CPU's physical address bits (/proc/cpuinfo "address sizes"), None if unknown.
    Cached: read once, before landlock would hide /proc."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("address sizes"):
                    return int(line.split(":", 1)[1].split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return None


def ram_size_error(size: int, phys_bits: int | None, layout: X86Layout = LAYOUT) -> str | None:
    """Why `size` bytes of RAM cannot be placed, or None. Guest RAM must end at or below the
    64-bit PCI window (else the guest reads RAM where a BAR is) and inside the guest physical
    address space (the host's physical address bits, which the guest's CPUID reports).
    Cloud Hypervisor fails the same cases with MemoryRangeAllocation ("Failed to allocate a
    memory range"): it reserves the RAM ranges in an address space of 2^phys_bits - 64 KiB."""
    if size <= 0:
        return "memory size must be positive"
    end = ram_end(size, layout)
    limit = max_ram_size(layout)
    if size > limit:
        return (
            f"Failed to allocate a memory range: guest RAM would end at {end:#x}, past the "
            f"64-bit PCI window at {layout.mmio64_start:#x}; at most {limit} bytes "
            f"({limit >> 30} GiB) fit"
        )
    if phys_bits is not None and end > address_space_end(phys_bits):
        most = size - (end - address_space_end(phys_bits))
        return (
            f"Failed to allocate a memory range: guest RAM would end at {end:#x}, past the "
            f"host's {phys_bits}-bit physical address space; at most {most} bytes fit"
        )
    return None
