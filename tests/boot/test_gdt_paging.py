from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.boot import BootError, BootMode, write_boot_gdt, write_identity_page_tables
from strato.boot.gdt import (
    LINUX64_GDT,
    PVH_GDT,
    boot_segments,
    gdt_entry,
    segment_from_gdt_entry,
)
from strato.boot.paging import identity_page_tables
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, GiB


def test_descriptors_match_the_rust_vmms() -> None:
    # The values Firecracker's and Cloud Hypervisor's gdt tests expect.
    assert LINUX64_GDT == (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x008F8B000000FFFF)
    assert PVH_GDT == (0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF, 0x0000_8B00_0000_0067)
    assert gdt_entry(0x0093, 0x12345678, 0xABCDE) == 0x120A93345678BCDE


def test_segment_decoding_round_trips() -> None:
    seg = segment_from_gdt_entry(gdt_entry(0x0093, 0x12345678, 0xABCDE), 5)
    assert (seg.base, seg.limit, seg.selector, seg.g) == (0x12345678, 0xABCDE, 0x28, 0)


def test_linux64_segments() -> None:
    s = boot_segments(BootMode.LINUX64)
    assert (s.code.selector, s.data.selector, s.tss.selector) == (0x08, 0x10, 0x18)
    assert (s.code.l, s.code.db, s.code.type, s.code.s, s.code.present) == (1, 0, 0xB, 1, 1)
    assert (s.data.db, s.data.type, s.data.limit, s.data.g) == (1, 0x3, 0xFFFFFFFF, 1)
    assert (s.tss.s, s.tss.type, s.tss.present) == (0, 0xB, 1)
    assert (s.gdt_base, s.gdt_limit, s.idt_base, s.idt_limit) == (0x500, 31, 0x520, 7)


def test_pvh_segments_are_flat_32_bit() -> None:
    s = boot_segments(BootMode.PVH)
    assert (s.code.l, s.code.db, s.code.base, s.code.limit, s.code.g) == (0, 1, 0, 0xFFFFFFFF, 1)
    assert (s.data.db, s.data.limit) == (1, 0xFFFFFFFF)
    assert (s.tss.type, s.tss.limit, s.tss.g) == (0xB, 0x67, 0)


@pytest.mark.parametrize("mode", list(BootMode))
def test_gdt_and_idt_are_written(mem128: GuestMemory, mode: BootMode) -> None:
    mem128.fill(LAYOUT.boot_idt, 8, 0xFF)
    write_boot_gdt(mem128, mode)
    table = LINUX64_GDT if mode is BootMode.LINUX64 else PVH_GDT
    assert struct.unpack("<4Q", mem128.read(LAYOUT.boot_gdt, 32)) == table
    assert mem128.read(LAYOUT.boot_idt, 8) == bytes(8)


def translate(mem: GuestMemory, cr3: int, va: int) -> int | None:
    """Walk 4-level page tables the way the MMU does (2 MiB leaves only)."""
    pml4e = mem.read_u64(cr3 + ((va >> 39) & 511) * 8)
    if not pml4e & 1:
        return None
    pdpte = mem.read_u64((pml4e & ~0xFFF & (2**52 - 1)) + ((va >> 30) & 511) * 8)
    if not pdpte & 1:
        return None
    pde = mem.read_u64((pdpte & ~0xFFF & (2**52 - 1)) + ((va >> 21) & 511) * 8)
    if not pde & 1:
        return None
    assert pde & 0x80 and pde & 0x2  # 2 MiB page, writable
    return (pde & ~0x1FFFFF & (2**52 - 1)) | (va & 0x1FFFFF)


_MEM = GuestMemory.anonymous([(0, 1 << 20)])
_CR3 = write_identity_page_tables(_MEM)


@given(st.integers(min_value=0, max_value=4 * GiB - 1))
def test_first_4_gib_are_identity_mapped(va: int) -> None:
    assert _CR3 == LAYOUT.pml4
    assert translate(_MEM, _CR3, va) == va


@given(st.integers(min_value=4 * GiB, max_value=2**47 - 1))
def test_nothing_above_4_gib_is_mapped(va: int) -> None:
    assert translate(_MEM, _CR3, va) is None


def test_page_table_pages_stay_below_the_cmdline() -> None:
    pages = identity_page_tables()
    assert [a for a, _ in pages] == [0x9000, 0xA000, 0xB000, 0xC000, 0xD000, 0xE000]
    assert all(len(p) == 4096 for _, p in pages)
    assert pages[-1][0] + 4096 <= LAYOUT.cmdline
    with pytest.raises(BootError):
        identity_page_tables(gib=0)
