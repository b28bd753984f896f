"""The configuration space: read-only fields, BAR sizing and moves, the capability list."""

from __future__ import annotations

import json

import pytest

from strato.pci.configuration import (
    BAR0,
    COMMAND,
    STATUS_CAP_LIST,
    BarKind,
    BarMove,
    BarSpec,
    PciConfigError,
    PciConfiguration,
)


def make() -> PciConfiguration:
    return PciConfiguration(
        0x1AF4,
        0x1042,
        0x01,
        0x80,
        revision_id=1,
        subsystem_vendor_id=0x1AF4,
        subsystem_id=0x1100,
        interrupt_pin=1,
    )


def test_identity_registers_read_back_and_are_read_only() -> None:
    c = make()
    assert c.read(0x00, 4) == 0x1042_1AF4
    assert c.read(0x08, 4) == 0x0180_0001
    assert c.read(0x2C, 4) == 0x1100_1AF4
    assert c.read(0x3D, 1) == 1
    for off in (0x00, 0x08, 0x2C, 0x0E, 0x34):
        before = c.read(off, 4 if off % 4 == 0 else 1)
        c.write(off, b"\xff" * (4 if off % 4 == 0 else 1))
        c.write(off, b"\x00" * (4 if off % 4 == 0 else 1))
        assert c.read(off, 4 if off % 4 == 0 else 1) == before
    # status is read-only (no error bits to clear), interrupt line is writable
    c.write(0x06, b"\xff\xff")
    assert c.read(0x06, 2) == 0
    c.write(0x3C, b"\x0b")
    assert c.read(0x3C, 1) == 0x0B


def test_command_register_writable_bits() -> None:
    c = make()
    c.write(COMMAND, (0xFFFF).to_bytes(2, "little"))
    assert c.read(COMMAND, 2) == 0x0547
    assert c.memory_enabled and c.bus_master and c.intx_disabled
    c.write(COMMAND, b"\x00\x00")
    assert not c.memory_enabled and not c.bus_master


def test_access_shapes() -> None:
    c = make()
    assert c.read(0x01, 2) == 0x421A  # inside one dword: allowed
    assert c.read(0x03, 2) == 0xFFFF  # crosses a dword
    assert c.read(0x00, 8) == (1 << 64) - 1
    assert c.read(4096, 4) == 0xFFFF_FFFF
    assert c.read(-4, 4) == 0xFFFF_FFFF
    assert c.write(0x03, b"\x01\x02") == []
    assert c.read(0x0FFC, 4) == 0  # the extended space exists and reads zero


@pytest.mark.parametrize(
    ("kind", "size", "prefetchable", "low_flags"),
    [
        (BarKind.MEM32, 0x1000, False, 0x0),
        (BarKind.MEM32, 0x10, True, 0x8),
        (BarKind.MEM64, 0x80000, False, 0x4),
        (BarKind.MEM64, 0x1_0000_0000, True, 0xC),
        (BarKind.IO, 0x20, False, 0x1),
    ],
)
def test_bar_sizing_by_writing_all_ones(
    kind: BarKind, size: int, prefetchable: bool, low_flags: int
) -> None:
    c = make()
    address = (
        0x4000_0000_0000
        if kind is BarKind.MEM64
        else (0xC000_0000 if kind is BarKind.MEM32 else 0x1000)
    )
    address -= address % size
    c.add_bar(BarSpec(1, size, kind, prefetchable), address)
    low = c.read(BAR0 + 4, 4)
    assert low & (0x3 if kind is BarKind.IO else 0xF) == low_flags
    assert c.bar_address(1) == address
    c.write(BAR0 + 4, b"\xff\xff\xff\xff")
    mask = c.read(BAR0 + 4, 4)
    if kind is BarKind.MEM64:
        c.write(BAR0 + 8, b"\xff\xff\xff\xff")
        mask |= c.read(BAR0 + 8, 4) << 32
        decoded = (~(mask & ~0xF) + 1) & ((1 << 64) - 1)
    elif kind is BarKind.IO:
        decoded = (~(mask & ~0x3) + 1) & 0xFFFF_FFFF
    else:
        decoded = (~(mask & ~0xF) + 1) & 0xFFFF_FFFF
    assert decoded == size
    assert mask & (0x3 if kind is BarKind.IO else 0xF) == low_flags  # type bits survive


def test_bar_sizing_with_byte_writes() -> None:
    c = make()
    c.add_bar(BarSpec(0, 0x1000, BarKind.MEM32), 0xC000_0000)
    for i in range(4):
        c.write(BAR0 + i, b"\xff")
    assert c.read(BAR0, 4) == 0xFFFF_F000


def test_unused_bars_and_rom_read_zero() -> None:
    c = make()
    c.add_bar(BarSpec(0, 0x1000, BarKind.MEM32), 0xC000_0000)
    for off in (BAR0 + 4, BAR0 + 20, 0x30):
        c.write(off, b"\xff\xff\xff\xff")
        assert c.read(off, 4) == 0


def test_bar_declaration_errors() -> None:
    c = make()
    with pytest.raises(PciConfigError):
        c.add_bar(BarSpec(0, 0x1800))  # not a power of two
    with pytest.raises(PciConfigError):
        c.add_bar(BarSpec(5, 0x1000, BarKind.MEM64))  # needs BAR 6
    c.add_bar(BarSpec(0, 0x1000, BarKind.MEM64))
    with pytest.raises(PciConfigError):
        c.add_bar(BarSpec(1, 0x1000, BarKind.MEM32))  # upper half of BAR 0
    with pytest.raises(PciConfigError):
        c.set_bar_address(0, 0x1800)  # misaligned


def test_bar_move_reported_only_with_decoding_enabled() -> None:
    c = make()
    c.add_bar(BarSpec(2, 0x1000, BarKind.MEM32), 0xC000_0000)
    assert c.write(BAR0 + 8, (0xC010_0000).to_bytes(4, "little")) == []  # MSE off
    assert c.bar_mapped_address(2) == 0xC000_0000
    moves = c.write(COMMAND, b"\x02\x00")
    assert moves == [BarMove(2, 0xC000_0000, 0xC010_0000, 0x1000, BarKind.MEM32)]
    assert c.bar_mapped_address(2) == 0xC010_0000
    moves = c.write(BAR0 + 8, (0xC020_0000).to_bytes(4, "little"))
    assert moves == [BarMove(2, 0xC010_0000, 0xC020_0000, 0x1000, BarKind.MEM32)]
    # sizing while decoding is enabled is not a move
    assert c.write(BAR0 + 8, b"\xff\xff\xff\xff") == []
    assert c.write(BAR0 + 8, (0xC020_0000).to_bytes(4, "little")) == []


def test_64bit_bar_moves_when_upper_half_is_written() -> None:
    c = make()
    c.add_bar(BarSpec(0, 0x80000, BarKind.MEM64), 0x100_0000_0000)
    c.write(COMMAND, b"\x02\x00")
    assert c.write(BAR0, (0x0008_0000 | 0x4).to_bytes(4, "little")) == []  # half written
    moves = c.write(BAR0 + 4, (0x200).to_bytes(4, "little"))
    assert moves == [BarMove(0, 0x100_0000_0000, 0x200_0008_0000, 0x80000, BarKind.MEM64)]
    c.revert_bar_move(moves[0])
    assert c.bar_address(0) == 0x100_0000_0000 == c.bar_mapped_address(0)


def test_capability_list_walk() -> None:
    c = make()
    assert not c.status & STATUS_CAP_LIST
    assert c.capabilities() == []
    a = c.add_capability(0x09, b"\x10" + bytes(13))
    b = c.add_capability(0x11, bytes(10))
    d = c.add_capability(0x09, bytes(3))
    assert (a, b, d) == (0x40, 0x50, 0x5C)
    assert c.status & STATUS_CAP_LIST
    assert c.read(0x34, 1) == 0x40
    assert c.capabilities() == [(0x40, 0x09), (0x50, 0x11), (0x5C, 0x09)]
    assert c.read(0x5D, 1) == 0  # end of list
    # capability bytes are read-only
    c.write(0x40, b"\xff\xff\xff\xff")
    assert c.read(0x40, 4) == 0x0010_5009
    with pytest.raises(PciConfigError):
        c.add_capability(0x09, bytes(200))


def test_state_round_trip() -> None:
    c = make()
    c.add_bar(BarSpec(0, 0x80000, BarKind.MEM64), 0x100_0000_0000)
    c.add_capability(0x09, bytes(14))
    c.write(COMMAND, b"\x06\x00")
    state = json.loads(json.dumps(c.state()))
    d = make()
    d.restore(state)
    assert d.regs == c.regs and d.wmask == c.wmask
    assert d.bar_specs() == c.bar_specs()
    assert d.bar_mapped_address(0) == 0x100_0000_0000
    assert d.capabilities() == c.capabilities()
