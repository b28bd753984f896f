from __future__ import annotations

import itertools

import pytest

from strato.boot import BootError, E820Entry, E820Type, build_e820
from strato.boot.e820 import low_ram_end
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, GiB, MiB, ram_ranges

RAM, RESERVED = E820Type.RAM, E820Type.RESERVED


def test_small_guest(mem128: GuestMemory) -> None:
    assert build_e820(mem128) == [
        E820Entry(0, 0x9FC00, RAM),
        E820Entry(0x9FC00, 0x400, RESERVED),
        E820Entry(1 * MiB, 127 * MiB, RAM),
    ]
    assert low_ram_end(mem128) == 128 * MiB


def test_guest_larger_than_the_mmio_hole() -> None:
    mem = GuestMemory.anonymous(ram_ranges(5 * GiB))
    try:
        entries = build_e820(mem)
        assert entries[-2:] == [
            E820Entry(1 * MiB, 3 * GiB - 1 * MiB, RAM),
            E820Entry(4 * GiB, 2 * GiB, RAM),
        ]
        assert low_ram_end(mem) == LAYOUT.mmio32_start
    finally:
        mem.close()


def test_extra_reserved_ranges_are_cut_out_of_ram(mem128: GuestMemory) -> None:
    entries = build_e820(mem128, reserved=[(64 * MiB, 1 * MiB), (0x1000, 0x1000)])
    assert entries == [
        E820Entry(0, 0x1000, RAM),
        E820Entry(0x1000, 0x1000, RESERVED),
        E820Entry(0x2000, 0x9FC00 - 0x2000, RAM),
        E820Entry(0x9FC00, 0x400, RESERVED),
        E820Entry(1 * MiB, 63 * MiB, RAM),
        E820Entry(64 * MiB, 1 * MiB, RESERVED),
        E820Entry(65 * MiB, 63 * MiB, RAM),
    ]


def test_reserved_range_outside_ram_is_listed(mem128: GuestMemory) -> None:
    entries = build_e820(mem128, reserved=[(LAYOUT.pci_ecam, LAYOUT.pci_ecam_size)])
    assert entries[-1] == E820Entry(LAYOUT.pci_ecam, LAYOUT.pci_ecam_size, RESERVED)


def test_entries_never_overlap(mem128: GuestMemory) -> None:
    entries = build_e820(mem128, reserved=[(0x9F000, 0x2000), (100 * MiB, 50 * MiB)])
    for a, b in itertools.pairwise(entries):
        assert a.end <= b.addr


def test_bad_reserved_range(mem128: GuestMemory) -> None:
    with pytest.raises(BootError, match="bad size"):
        build_e820(mem128, reserved=[(0x1000, 0)])


@pytest.mark.parametrize("ranges", [[(1 * MiB, 64 * MiB)], [(0, 512 * 1024)]])
def test_memory_without_the_first_mib_is_rejected(ranges: list[tuple[int, int]]) -> None:
    mem = GuestMemory.anonymous(ranges)
    try:
        with pytest.raises(BootError, match="start at address 0"):
            low_ram_end(mem)
    finally:
        mem.close()
