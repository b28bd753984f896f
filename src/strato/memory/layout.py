"""The x86_64 guest physical address map strato uses (close to Cloud Hypervisor's)."""

from __future__ import annotations

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
