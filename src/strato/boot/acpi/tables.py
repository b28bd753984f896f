"""Byte builders for the static ACPI tables: RSDP, XSDT, FADT, MADT, MCFG (and the SDT header).

Layouts follow ACPI 6.5 chapter 5.2. Every builder returns the complete table with its length
and checksum filled in, so the bytes can be written to guest memory as they are.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from strato.boot.acpi.constants import (
    ACPI_PM_TIMER_PORT,
    CREATOR_ID,
    CREATOR_REVISION,
    HYPERVISOR_VENDOR,
    OEM_ID,
    OEM_REVISION,
    OEM_TABLE_ID_PREFIX,
    RESET_REG_PORT,
    RESET_VALUE,
    SLEEP_CONTROL_REG_PORT,
    SLEEP_STATUS_REG_PORT,
)

HEADER_SIZE = 36
_HEADER = struct.Struct("<4sIBB6s8sI4sI")
assert _HEADER.size == HEADER_SIZE


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (with this byte in it as 0) sum to 0 mod 256."""
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes, oem_table_id: bytes | None = None) -> bytes:
    """A System Description Table: the 36-byte header (length, checksum) then `body`."""
    if len(signature) != 4:
        raise ValueError("an ACPI signature has 4 characters")
    table_id = oem_table_id or (OEM_TABLE_ID_PREFIX + signature).ljust(8)
    header = _HEADER.pack(
        signature,
        HEADER_SIZE + len(body),
        revision,
        0,
        OEM_ID.ljust(6)[:6],
        table_id.ljust(8)[:8],
        OEM_REVISION,
        CREATOR_ID.ljust(4)[:4],
        CREATOR_REVISION,
    )
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


# -- Generic Address Structure (5.2.3.2) --
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3
ACCESS_QWORD = 4
_GAS = struct.Struct("<BBBBQ")


def gas(space: int, bit_width: int, address: int, access_size: int, bit_offset: int = 0) -> bytes:
    return _GAS.pack(space, bit_width, bit_offset, access_size, address)


def io_port_gas(port: int, bit_width: int = 8) -> bytes:
    access = {8: ACCESS_BYTE, 16: ACCESS_WORD, 32: ACCESS_DWORD}[bit_width]
    return gas(GAS_SYSTEM_IO, bit_width, port, access)


# -- RSDP (5.2.5) --
RSDP_SIZE = 36


def rsdp(xsdt_address: int) -> bytes:
    """Revision 2 RSDP pointing at the XSDT (no RSDT)."""
    raw = bytearray(
        struct.pack(
            "<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID.ljust(6)[:6], 2, 0, RSDP_SIZE, xsdt_address, 0
        )
    )
    raw[8] = checksum(raw[:20])
    raw[32] = checksum(raw)
    return bytes(raw)


# -- XSDT (5.2.8) --
def xsdt(table_addresses: Sequence[int]) -> bytes:
    return sdt(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in table_addresses))


# -- FADT (5.2.9) --
FADT_SIZE = 276
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_FLAG_TMR_VAL_EXT = 1 << 8
FADT_FLAG_RESET_REG_SUP = 1 << 10
FADT_FLAG_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
IAPC_BOOT_ARCH_VGA_NOT_PRESENT = 1 << 2
IAPC_BOOT_ARCH_MSI_NOT_SUPPORTED = 1 << 3

# byte offsets inside the FADT
FADT_DSDT = 40
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_DSDT = 140
FADT_X_PM_TMR_BLK = 208
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268


def fadt(
    dsdt_address: int, pm_timer: bool = False, iapc_boot_arch: int = IAPC_BOOT_ARCH_VGA_NOT_PRESENT
) -> bytes:
    """A hardware-reduced revision 6 FADT with Cloud Hypervisor's power-management registers.

    No FACS, SCI or PM1 blocks: sleep control/status are the 8-bit register at port 0x600, the
    reset register the same port with value 1.
    """
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, data: bytes) -> None:
        body[offset - HEADER_SIZE : offset - HEADER_SIZE + len(data)] = data

    flags = FADT_FLAG_HW_REDUCED_ACPI | FADT_FLAG_RESET_REG_SUP
    if pm_timer:
        flags |= FADT_FLAG_TMR_VAL_EXT
        put(FADT_X_PM_TMR_BLK, io_port_gas(ACPI_PM_TIMER_PORT, 32))
    put(FADT_IAPC_BOOT_ARCH, struct.pack("<H", iapc_boot_arch))
    put(FADT_FLAGS, struct.pack("<I", flags))
    put(FADT_RESET_REG, io_port_gas(RESET_REG_PORT))
    put(FADT_RESET_VALUE, bytes([RESET_VALUE]))
    put(FADT_MINOR_VERSION, bytes([FADT_MINOR_REVISION]))
    put(FADT_X_DSDT, struct.pack("<Q", dsdt_address))
    put(FADT_SLEEP_CONTROL_REG, io_port_gas(SLEEP_CONTROL_REG_PORT))
    put(FADT_SLEEP_STATUS_REG, io_port_gas(SLEEP_STATUS_REG_PORT))
    put(FADT_HYPERVISOR_VENDOR, HYPERVISOR_VENDOR.ljust(8)[:8])
    return sdt(b"FACP", FADT_REVISION, bytes(body))


# -- MADT (5.2.12) --
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LOCAL_X2APIC = 9
LAPIC_ENABLED = 1


@dataclass(frozen=True)
class InterruptOverride:
    """An ISA IRQ that is not identity-mapped to a GSI (flags: MPS INTI polarity/trigger)."""

    source: int
    gsi: int
    flags: int = 0


def madt(
    lapic_address: int,
    ioapic_address: int,
    nr_vcpus: int,
    ioapic_id: int = 0,
    overrides: Sequence[InterruptOverride] = (),
) -> bytes:
    """One enabled Local APIC per vCPU (APIC id = index), the IOAPIC at GSI base 0, the
    interrupt source overrides, and LINT1 as NMI on every processor.
    """
    if nr_vcpus < 1:
        raise ValueError("at least one vCPU")
    body = bytearray(struct.pack("<II", lapic_address, MADT_PCAT_COMPAT))
    for cpu in range(nr_vcpus):
        if cpu < 0xFF:
            body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, LAPIC_ENABLED)
        else:
            body += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, cpu, LAPIC_ENABLED, cpu)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id & 0xFF, 0, ioapic_address, 0)
    for o in overrides:
        body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, o.source, o.gsi, o.flags)
    # all processors (UID 0xFF), flags 0 (conforms to the bus: edge, active high), LINT1
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)
    return sdt(b"APIC", MADT_REVISION, bytes(body))


# -- MCFG (PCI Firmware 3.2, 4.1.2) --
def mcfg(ecam_base: int, segment: int = 0, start_bus: int = 0, end_bus: int = 0) -> bytes:
    body = bytes(8) + struct.pack("<QHBB4x", ecam_base, segment, start_bus, end_bus)
    return sdt(b"MCFG", 1, body)
