"""The ACPI tables: parsed back in Python (signatures, lengths, checksums, pointers, MADT
entries), disassembled by ACPICA's iasl without errors, and found in guest memory the way a
guest finds them."""

from __future__ import annotations

import itertools
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from strato.boot.acpi import AcpiError, build_acpi_tables, build_tables, default_slot_gsis
from strato.boot.acpi.constants import (
    ACPI_PM_TIMER_PORT,
    ACPI_SHUTDOWN_PORT,
    GED_IRQ,
    GED_MMIO_ADDRESS,
    RESET_VALUE,
    S5_SHUTDOWN_VALUE,
)
from strato.boot.acpi.tables import checksum
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT
from strato.pci.allocator import PciAllocator
from strato.pci.bus import intx_gsi

IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not installed (Debian package acpica-tools)"
)


def header(table: bytes) -> tuple[bytes, int, int]:
    sig, length, revision = struct.unpack_from("<4sIB", table)
    return sig, length, revision


def madt_entries(table: bytes) -> list[tuple[int, bytes]]:
    out = []
    off = 44
    while off < len(table):
        etype, elen = table[off], table[off + 1]
        assert elen >= 2 and off + elen <= len(table)
        out.append((etype, table[off : off + elen]))
        off += elen
    assert off == len(table)
    return out


@pytest.mark.parametrize("nr_vcpus", [1, 4, 255, 300])
def test_tables_parse_back(nr_vcpus: int) -> None:
    t = build_tables(LAYOUT, nr_vcpus)
    assert set(t.tables) == {"DSDT", "FACP", "APIC", "MCFG", "XSDT"}
    for sig, (addr, data) in t.tables.items():
        s, length, _ = header(data)
        assert s.decode() == sig and length == len(data)
        assert sum(data) & 0xFF == 0, f"{sig} checksum"
        assert addr % 16 == 0 and addr >= LAYOUT.acpi_tables
    # tables do not overlap
    spans = sorted((a, a + len(d)) for a, d in t.tables.values())
    assert all(e <= s for (_, e), (s, _) in itertools.pairwise(spans))

    # RSDP -> XSDT -> FADT, MADT, MCFG; FADT -> DSDT
    r = t.rsdp
    assert len(r) == 36 and r[:8] == b"RSD PTR " and r[15] == 2
    assert sum(r[:20]) & 0xFF == 0 and sum(r) & 0xFF == 0
    assert struct.unpack_from("<I", r, 20)[0] == 36
    xsdt_addr = struct.unpack_from("<Q", r, 24)[0]
    assert t.tables["XSDT"][0] == xsdt_addr
    xsdt = t.tables["XSDT"][1]
    pointers = struct.unpack_from("<3Q", xsdt, 36)
    assert len(xsdt) == 36 + 24
    by_addr = {a: sig for sig, (a, _) in t.tables.items()}
    assert [by_addr[p] for p in pointers] == ["FACP", "APIC", "MCFG"]

    # MADT: a LAPIC per vCPU, one IOAPIC at GSI 0, LINT1 NMI
    madt = t.tables["APIC"][1]
    assert header(madt)[2] == 5
    assert struct.unpack_from("<II", madt, 36) == (LAYOUT.lapic, 1)
    entries = madt_entries(madt)
    lapics = [e for ty, e in entries if ty == 0]
    x2apics = [e for ty, e in entries if ty == 9]
    assert len(lapics) + len(x2apics) == nr_vcpus
    assert len(lapics) == min(nr_vcpus, 255)
    ids = [e[3] for e in lapics] + [struct.unpack_from("<I", e, 4)[0] for e in x2apics]
    assert ids == list(range(nr_vcpus))
    assert all(struct.unpack_from("<I", e, 4)[0] == 1 for e in lapics)  # enabled
    ioapics = [e for ty, e in entries if ty == 1]
    assert len(ioapics) == 1
    assert struct.unpack_from("<II", ioapics[0], 4) == (LAYOUT.ioapic, 0)
    nmis = [e for ty, e in entries if ty == 4]
    assert len(nmis) == 1 and nmis[0][2] == 0xFF and nmis[0][5] == 1
    assert len(entries) == nr_vcpus + 2  # no overrides by default

    # FADT
    fadt = t.tables["FACP"][1]
    assert header(fadt)[1:] == (276, 6)
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags & (1 << 20) and flags & (1 << 10)  # HW_REDUCED_ACPI, RESET_REG_SUP
    assert struct.unpack_from("<Q", fadt, 140)[0] == t.tables["DSDT"][0]
    io_gas = struct.pack("<BBBBQ", 1, 8, 0, 1, ACPI_SHUTDOWN_PORT)
    assert fadt[116:128] == io_gas and fadt[128] == RESET_VALUE
    assert fadt[244:256] == io_gas and fadt[256:268] == io_gas
    assert fadt[208:220] == struct.pack("<BBBBQ", 1, 32, 0, 3, ACPI_PM_TIMER_PORT)

    # MCFG: ECAM for bus 0
    mcfg = t.tables["MCFG"][1]
    assert struct.unpack_from("<QHBB", mcfg, 44) == (LAYOUT.pci_ecam, 0, 0, 0)


def test_interrupt_override_option() -> None:
    t = build_tables(LAYOUT, 2, irq0_to_gsi2=True)
    isos = [e for ty, e in madt_entries(t.tables["APIC"][1]) if ty == 2]
    assert len(isos) == 1
    assert struct.unpack_from("<BBIH", isos[0], 2) == (0, 0, 2, 0)


def test_acpi_windows_match_the_pci_allocator() -> None:
    alloc = PciAllocator.from_layout()
    dsdt = build_tables(LAYOUT, 1).tables["DSDT"][1]
    dword = (
        b"\x87"
        + struct.pack("<H", 23)
        + bytes([0, 0x0C, 0x01])
        + struct.pack("<5I", 0, alloc.mmio32.base, alloc.mmio32.end - 1, 0, alloc.mmio32.size)
    )
    qword = (
        b"\x8a"
        + struct.pack("<H", 43)
        + bytes([0, 0x0C, 0x01])
        + struct.pack("<5Q", 0, alloc.mmio64.base, alloc.mmio64.end - 1, 0, alloc.mmio64.size)
    )
    assert dword in dsdt and qword in dsdt
    assert default_slot_gsis() == [intx_gsi(s) for s in range(32)]


def test_written_to_guest_memory_and_found_by_a_scan() -> None:
    mem = GuestMemory.anonymous([(0, 2 << 20)])
    try:
        rsdp_addr = build_acpi_tables(mem, LAYOUT, 2)
        assert rsdp_addr == LAYOUT.rsdp
        # the scan Linux does over the BIOS area, on 16-byte boundaries
        found = None
        for addr in range(0xE0000, 0x100000, 16):
            if mem.read(addr, 8) == b"RSD PTR " and sum(mem.read(addr, 20)) & 0xFF == 0:
                found = addr
                break
        assert found == rsdp_addr
        xsdt = struct.unpack_from("<Q", mem.read(found, 36), 24)[0]
        length = struct.unpack_from("<I", mem.read(xsdt, 8), 4)[0]
        table = mem.read(xsdt, length)
        assert table[:4] == b"XSDT" and checksum(table) == 0
        fadt = struct.unpack_from("<Q", table, 36)[0]
        assert mem.read(fadt, 4) == b"FACP"
    finally:
        mem.close()
    small = GuestMemory.anonymous([(0, 0x80000)])
    try:
        with pytest.raises(AcpiError):
            build_acpi_tables(small, LAYOUT, 1)
    finally:
        small.close()


def test_s5_and_power_values_agree_with_the_device() -> None:
    assert S5_SHUTDOWN_VALUE == 0x34
    dsdt = build_tables(LAYOUT, 1).tables["DSDT"][1]
    assert b"\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00" in dsdt


def _disassemble(tmp: Path, name: str, data: bytes) -> str:
    assert IASL is not None
    path = tmp / f"{name}.dat"
    path.write_bytes(data)
    proc = subprocess.run(
        [IASL, "-d", str(path)], capture_output=True, text=True, timeout=60, cwd=tmp
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Error" not in out and "Warning" not in out, out
    return (tmp / f"{name}.dsl").read_text()


@needs_iasl
@pytest.mark.parametrize("nr_vcpus", [1, 8, 300])
def test_iasl_disassembles_every_table(tmp_path: Path, nr_vcpus: int) -> None:
    t = build_tables(LAYOUT, nr_vcpus, irq0_to_gsi2=True)
    for sig, (_, data) in t.tables.items():
        text = _disassemble(tmp_path, sig.lower(), data)
        assert f'"{sig}"' in text
        assert "**** " not in text  # iasl's marker for an unknown or bad field
    madt = (tmp_path / "apic.dsl").read_text()
    assert madt.count("[Processor Local APIC]") + madt.count("[Processor Local x2APIC]") == (
        nr_vcpus
    )
    assert "[I/O APIC]" in madt and "[Interrupt Source Override]" in madt
    fadt = (tmp_path / "facp.dsl").read_text()
    assert "Hardware Reduced (V5) : 1" in fadt
    assert "Reset Register Supported (V2) : 1" in fadt


@needs_iasl
def test_dsdt_disassembles_and_recompiles(tmp_path: Path) -> None:
    dsdt = build_tables(LAYOUT, 2).tables["DSDT"][1]
    text = _disassemble(tmp_path, "dsdt", dsdt)
    for needle in (
        'EisaId ("PNP0A08")',
        'EisaId ("PNP0A03")',
        'EisaId ("PNP0C02")',
        'EisaId ("PNP0501")',
        'EisaId ("PNP0C0C")',
        '"ACPI0013"',
        "Name (_PRT, Package (0x20)",
        "WordBusNumber (ResourceProducer",
        "0x0CF7,",
        "0x0D00,",
        f"0x{LAYOUT.mmio32_start:08X},",
        f"0x{LAYOUT.mmio64_start:016X},",
        f"0x{GED_MMIO_ADDRESS:08X}",
        f"0x{GED_IRQ:08X},",
        "Notify (\\_SB.PWRB, 0x80)",
        "Method (_EVT, 1, Serialized)",
        "Name (_S5, Package (0x04)",
        "0x03F8,",
        "IRQNoFlags ()",
    ):
        assert needle in text, needle
    # the disassembly is valid ASL: it compiles again without errors
    assert IASL is not None
    proc = subprocess.run(
        [IASL, "-p", str(tmp_path / "re"), str(tmp_path / "dsdt.dsl")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 Errors" in proc.stdout, proc.stdout
    recompiled = (tmp_path / "re.aml").read_bytes()
    assert recompiled[:4] == b"DSDT" and sum(recompiled) & 0xFF == 0
