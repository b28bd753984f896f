"""An Intel MultiProcessor Specification 1.4 table, so the guest finds every vCPU and the IOAPIC.

The floating pointer ("_MP_") sits at layout.mptable, the top KiB of base memory that Linux
scans, and the configuration table ("PCMP") follows it. Entries as in Firecracker's
mptable.rs: one processor per vCPU (APIC IDs 0..n-1, BSP 0), an ISA bus, the IOAPIC (ID n),
ISA IRQs 0-15 routed to IOAPIC pins 0-15, LINT0 ExtINT and LINT1 NMI.
"""

from __future__ import annotations

import struct

from strato.boot.cpuid import MAX_VCPUS
from strato.boot.errors import BootError
from strato.boot.layout import LAYOUT, X86Layout, mptable_limit
from strato.memory import GuestMemory

__all__ = ["ISA_IRQS", "build_mptable", "mptable_size", "write_mptable"]

ISA_IRQS = 16
_SPEC_REV = 4  # MP spec 1.4
_APIC_VERSION = 0x14
_CPU_ENABLED = 1
_CPU_BOOTPROCESSOR = 2
_CPU_STEPPING = 0x600  # family 6
_CPU_FEATURE_FPU = 1 << 0
_CPU_FEATURE_APIC = 1 << 9
_IOAPIC_USABLE = 1
_MP_PROCESSOR, _MP_BUS, _MP_IOAPIC, _MP_INTSRC, _MP_LINTSRC = range(5)
_MP_INT, _MP_NMI, _MP_SMI, _MP_EXTINT = range(4)
_ALL_APICS = 0xFF

_FLOATING = struct.Struct("<4sIBBBBBBBB")  # mpf_intel, 16 bytes
_HEADER = struct.Struct("<4sHBB8s12sIHHII")  # mpc_table, 44 bytes
_CPU = struct.Struct("<BBBBII8x")  # mpc_cpu, 20 bytes
_BUS = struct.Struct("<BB6s")  # mpc_bus
_IOAPIC = struct.Struct("<BBBBI")  # mpc_ioapic
_INTSRC = struct.Struct("<BBHBBBB")  # mpc_intsrc and mpc_lintsrc


def _checksum(data: bytes) -> int:
    """The byte that makes `data` (with it) sum to zero."""
    return (-sum(data)) & 0xFF


def mptable_size(nr_vcpus: int) -> int:
    return (
        _FLOATING.size
        + _HEADER.size
        + nr_vcpus * _CPU.size
        + _BUS.size
        + _IOAPIC.size
        + (ISA_IRQS + 2) * _INTSRC.size
    )


def build_mptable(nr_vcpus: int, layout: X86Layout = LAYOUT) -> bytes:
    """The floating pointer followed by the configuration table, for placing at layout.mptable."""
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise BootError(f"the MP table describes 1..{MAX_VCPUS} vCPUs, not {nr_vcpus}")
    end = layout.mptable + mptable_size(nr_vcpus)
    if end > mptable_limit(layout):
        raise BootError(
            f"the MP table for {nr_vcpus} vCPUs ends at {end:#x}, past {mptable_limit(layout):#x}"
        )
    ioapic_id = nr_vcpus
    entries = bytearray()
    for cpu in range(nr_vcpus):
        flags = _CPU_ENABLED | (_CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries += _CPU.pack(_MP_PROCESSOR, cpu, _APIC_VERSION, flags, _CPU_STEPPING,
                             _CPU_FEATURE_APIC | _CPU_FEATURE_FPU)  # fmt: skip
    entries += _BUS.pack(_MP_BUS, 0, b"ISA   ")
    entries += _IOAPIC.pack(_MP_IOAPIC, ioapic_id, _APIC_VERSION, _IOAPIC_USABLE, layout.ioapic)
    for irq in range(ISA_IRQS):
        entries += _INTSRC.pack(_MP_INTSRC, _MP_INT, 0, 0, irq, ioapic_id, irq)
    entries += _INTSRC.pack(_MP_LINTSRC, _MP_EXTINT, 0, 0, 0, 0, 0)
    entries += _INTSRC.pack(_MP_LINTSRC, _MP_NMI, 0, 0, 0, _ALL_APICS, 1)
    count = nr_vcpus + 1 + 1 + ISA_IRQS + 2

    def header(checksum: int) -> bytes:
        return _HEADER.pack(b"PCMP", _HEADER.size + len(entries), _SPEC_REV, checksum,
                            b"STRATO  ", b"STRATO VM   ", 0, 0, count, layout.lapic, 0)  # fmt: skip

    table = header(_checksum(header(0) + entries)) + entries
    config_addr = layout.mptable + _FLOATING.size

    def floating(checksum: int) -> bytes:
        return _FLOATING.pack(b"_MP_", config_addr, 1, _SPEC_REV, checksum, 0, 0, 0, 0, 0)

    return floating(_checksum(floating(0))) + table


def write_mptable(mem: GuestMemory, nr_vcpus: int, layout: X86Layout = LAYOUT) -> int:
    """Write the MP table at layout.mptable; returns its size in bytes."""
    data = build_mptable(nr_vcpus, layout)
    if not mem.check(layout.mptable, len(data)):
        raise BootError(f"guest memory does not cover the MP table at {layout.mptable:#x}")
    mem.write(layout.mptable, data)
    return len(data)
