"""Assemble the ACPI tables and write them into guest memory.

The RSDP goes at LAYOUT.rsdp (inside the 0xE0000-0xFFFFF area a guest scans), the other tables
one after another from LAYOUT.acpi_tables: DSDT, FADT, MADT, MCFG, then the XSDT that lists
FADT, MADT and MCFG (the FADT points at the DSDT). The caller hands the RSDP address to the
guest through boot_params.acpi_rsdp_addr or hvm_start_info.rsdp_paddr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from strato.boot.acpi.constants import PCI_INTX_GSI_BASE, PCI_INTX_GSI_COUNT
from strato.boot.acpi.dsdt import NUM_PCI_SLOTS, dsdt
from strato.boot.acpi.tables import InterruptOverride, fadt, madt, mcfg, rsdp, xsdt
from strato.memory import GuestMemory, X86Layout

GiB = 1 << 30
DEFAULT_MMIO64_SIZE = 64 * GiB  # the same default as strato.pci.allocator
TABLE_ALIGN = 16


class AcpiError(ValueError):
    """The tables do not fit where the layout puts them."""


def default_slot_gsis() -> list[int]:
    """INTA# of slot s -> GSI 16 + s % 8 (the rule of strato.pci.bus.intx_gsi)."""
    return [PCI_INTX_GSI_BASE + s % PCI_INTX_GSI_COUNT for s in range(NUM_PCI_SLOTS)]


@dataclass
class AcpiTables:
    """The tables and where they go in guest memory."""

    rsdp_address: int
    rsdp: bytes
    tables: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # signature -> (addr, bytes)

    def end(self) -> int:
        return max(addr + len(data) for addr, data in self.tables.values())


def _align(value: int, align: int = TABLE_ALIGN) -> int:
    return (value + align - 1) & ~(align - 1)


def build_tables(
    layout: X86Layout,
    nr_vcpus: int,
    *,
    pci_mmio32: tuple[int, int] | None = None,
    pci_mmio64: tuple[int, int] | None = None,
    pci_slot_gsis: Sequence[int] | None = None,
    pci_end_bus: int = 0,
    serial: bool = True,
    pm_timer: bool = True,
    irq0_to_gsi2: bool = False,
    tables_limit: int = 0x100000,
) -> AcpiTables:
    """Build every table for a machine with `nr_vcpus` vCPUs (pure: no guest memory).

    pci_mmio32 / pci_mmio64 are the (base, size) windows of the PCI root bridge; they must be
    the windows strato.pci.allocator.PciAllocator hands BARs out of (its defaults are the
    defaults here). irq0_to_gsi2 adds the conventional IRQ0 -> GSI2 override; leave it off
    unless the GSI routing sends the PIT (GSI 0) to IOAPIC pin 2, which KVM's default table
    does not (strato.interrupts.msi.legacy_irqchip_routes(irq0_to_pin2=True) does).
    """
    mmio32 = pci_mmio32 or (layout.mmio32_start, layout.pci_ecam - layout.mmio32_start)
    mmio64 = pci_mmio64 or (layout.mmio64_start, DEFAULT_MMIO64_SIZE)
    slot_gsis = list(pci_slot_gsis) if pci_slot_gsis is not None else default_slot_gsis()
    if not 0 <= pci_end_bus <= 255:
        raise AcpiError("PCI end bus must be 0..255")
    overrides = [InterruptOverride(0, 2)] if irq0_to_gsi2 else []

    out = AcpiTables(layout.rsdp, b"")
    addr = layout.acpi_tables

    def place(sig: str, data: bytes) -> int:
        nonlocal addr
        at = _align(addr)
        out.tables[sig] = (at, data)
        addr = at + len(data)
        return at

    dsdt_addr = place("DSDT", dsdt(mmio32, mmio64, layout.pci_ecam, slot_gsis, pci_end_bus, serial))
    fadt_addr = place("FACP", fadt(dsdt_addr, pm_timer=pm_timer))
    madt_addr = place(
        "APIC",
        madt(
            layout.lapic,
            layout.ioapic,
            nr_vcpus,
            ioapic_id=min(nr_vcpus, 0xFE),
            overrides=overrides,
        ),
    )
    mcfg_addr = place("MCFG", mcfg(layout.pci_ecam, 0, 0, pci_end_bus))
    xsdt_addr = place("XSDT", xsdt([fadt_addr, madt_addr, mcfg_addr]))
    out.rsdp = rsdp(xsdt_addr)
    if out.end() > tables_limit:
        raise AcpiError(f"ACPI tables end at {out.end():#x}, past {tables_limit:#x}")
    if layout.rsdp + len(out.rsdp) > layout.acpi_tables:
        raise AcpiError("the RSDP overlaps the tables")
    return out


def write_tables(mem: GuestMemory, tables: AcpiTables) -> int:
    """Write the tables into guest memory; returns the RSDP address."""
    if not mem.check(tables.rsdp_address, len(tables.rsdp)):
        raise AcpiError(f"no guest memory for the RSDP at {tables.rsdp_address:#x}")
    for sig, (addr, data) in tables.tables.items():
        if not mem.check(addr, len(data)):
            raise AcpiError(f"no guest memory for the {sig} table at {addr:#x}")
    mem.write(tables.rsdp_address, tables.rsdp)
    for addr, data in tables.tables.values():
        mem.write(addr, data)
    return tables.rsdp_address


def build_acpi_tables(
    mem: GuestMemory,
    layout: X86Layout,
    nr_vcpus: int,
    *,
    pci_mmio32: tuple[int, int] | None = None,
    pci_mmio64: tuple[int, int] | None = None,
    pci_slot_gsis: Sequence[int] | None = None,
    pci_end_bus: int = 0,
    serial: bool = True,
    pm_timer: bool = True,
    irq0_to_gsi2: bool = False,
) -> int:
    """Build the tables and write them at layout.rsdp / layout.acpi_tables; returns the RSDP
    address."""
    tables = build_tables(
        layout,
        nr_vcpus,
        pci_mmio32=pci_mmio32,
        pci_mmio64=pci_mmio64,
        pci_slot_gsis=pci_slot_gsis,
        pci_end_bus=pci_end_bus,
        serial=serial,
        pm_timer=pm_timer,
        irq0_to_gsi2=irq0_to_gsi2,
    )
    return write_tables(mem, tables)
