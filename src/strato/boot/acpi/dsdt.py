"""The DSDT: the PCI root bridge, COM1, the power button behind the Generic Event Device, _S5.

Everything a hardware-reduced x86 guest needs to find in the namespace:
- \\_SB.PCI0 (PNP0A08/PNP0A03) with its bus range, I/O ranges around the 0xCF8 config ports,
  the 32-bit and 64-bit MMIO windows, and a _PRT routing INTA# of every slot to an IOAPIC pin;
- \\_SB.MBRD (PNP0C02) reserving the ECAM and the GED register, so Linux trusts the MCFG;
- \\_SB.COM1 (PNP0501) at 0x3F8, IRQ 4;
- \\_SB.PWRB (PNP0C0C) and \\_SB.GED_ (ACPI0013): the GED's interrupt runs _EVT, which reads
  the GED register and notifies PWRB (0x80) when the power-button bit is set;
- \\_S5 with SLP_TYP 5, the value the sleep control register at port 0x600 turns into power off.
"""

from __future__ import annotations

from collections.abc import Sequence

from strato.boot.acpi import aml
from strato.boot.acpi.constants import (
    COM1_IRQ,
    COM1_PORT,
    COM1_PORT_LEN,
    ECAM_BYTES_PER_BUS,
    GED_IRQ,
    GED_MMIO_ADDRESS,
    GED_MMIO_SIZE,
    GED_POWER_BUTTON,
    PCI_CONFIG_IO_LEN,
    PCI_CONFIG_IO_PORT,
    S5_SLEEP_TYPE,
)
from strato.boot.acpi.tables import sdt

DSDT_REVISION = 2  # >= 2: 64-bit integers
NUM_PCI_SLOTS = 32


def pci_root_bridge(
    mmio32: tuple[int, int],
    mmio64: tuple[int, int],
    slot_gsis: Sequence[int],
    end_bus: int = 0,
) -> bytes:
    base32, size32 = mmio32
    base64, size64 = mmio64
    crs = [
        aml.word_bus_number(0, end_bus),
        aml.io(PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT, 1, PCI_CONFIG_IO_LEN),
        aml.word_io(0x0000, PCI_CONFIG_IO_PORT - 1),
        aml.word_io(0x0D00, 0xFFFF),
    ]
    if size32:
        crs.append(aml.dword_memory(base32, base32 + size32 - 1))
    if size64:
        crs.append(aml.qword_memory(base64, base64 + size64 - 1))
    prt = aml.package(
        *(
            aml.package(
                aml.integer(slot << 16 | 0xFFFF), aml.integer(0), aml.integer(0), aml.integer(gsi)
            )
            for slot, gsi in enumerate(slot_gsis)
        )
    )
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_ADR", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CCA", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(*crs)),
        aml.name("_PRT", prt),
    )


def motherboard_resources(ecam_base: int, end_bus: int) -> bytes:
    return aml.device(
        "MBRD",
        aml.name("_HID", aml.eisa_id("PNP0C02")),
        aml.name("_UID", aml.integer(0)),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.memory32_fixed(ecam_base, (end_bus + 1) * ECAM_BYTES_PER_BUS),
                aml.memory32_fixed(GED_MMIO_ADDRESS, GED_MMIO_SIZE),
            ),
        ),
    )


def com1() -> bytes:
    return aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_DDN", aml.string("COM1")),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io(COM1_PORT, COM1_PORT, 1, COM1_PORT_LEN), aml.irq_no_flags(COM1_IRQ)
            ),
        ),
    )


def power_button() -> bytes:
    return aml.device(
        "PWRB",
        aml.name("_HID", aml.eisa_id("PNP0C0C")),
        aml.name("_UID", aml.integer(0)),
    )


def generic_event_device() -> bytes:
    """ACPI0013 whose _EVT reads the GED register (read clears it) and dispatches the bits."""
    evt = aml.method(
        "_EVT",
        1,
        aml.store(aml.path("GDAT"), aml.local(0)),
        aml.if_(
            aml.lequal(
                aml.and_(aml.local(0), aml.integer(GED_POWER_BUTTON)),
                aml.integer(GED_POWER_BUTTON),
            ),
            aml.notify(aml.path("\\_SB_.PWRB"), aml.integer(0x80)),
        ),
        serialized=True,
    )
    return aml.device(
        "GED_",
        aml.name("_HID", aml.string("ACPI0013")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_CRS", aml.resource_template(aml.extended_interrupt(GED_IRQ))),
        aml.op_region("GDST", aml.SYSTEM_MEMORY, GED_MMIO_ADDRESS, GED_MMIO_SIZE),
        aml.field("GDST", [("GDAT", 8)], access=aml.ACCESS_BYTE, update=aml.UPDATE_WRITE_AS_ZEROS),
        evt,
    )


def sleep_state_s5() -> bytes:
    return aml.name(
        "_S5_",
        aml.package(
            aml.integer(S5_SLEEP_TYPE), aml.integer(S5_SLEEP_TYPE), aml.integer(0), aml.integer(0)
        ),
    )


def dsdt_aml(
    mmio32: tuple[int, int],
    mmio64: tuple[int, int],
    ecam_base: int,
    slot_gsis: Sequence[int],
    end_bus: int = 0,
    serial: bool = True,
) -> bytes:
    """The AML body of the DSDT (without the table header)."""
    devices = [
        pci_root_bridge(mmio32, mmio64, slot_gsis, end_bus),
        motherboard_resources(ecam_base, end_bus),
    ]
    if serial:
        devices.append(com1())
    devices += [power_button(), generic_event_device()]
    return aml.scope("\\_SB_", *devices) + sleep_state_s5()


def dsdt(
    mmio32: tuple[int, int],
    mmio64: tuple[int, int],
    ecam_base: int,
    slot_gsis: Sequence[int],
    end_bus: int = 0,
    serial: bool = True,
) -> bytes:
    return sdt(
        b"DSDT", DSDT_REVISION, dsdt_aml(mmio32, mmio64, ecam_base, slot_gsis, end_bus, serial)
    )
