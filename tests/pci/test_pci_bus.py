"""The root bus: 0xCF8/0xCFC and ECAM config access, BAR placement and moves, the allocator."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from strato.bus import Bus, BusError
from strato.memory.layout import LAYOUT
from strato.pci.allocator import AddressAllocator, AllocationError, PciAllocator
from strato.pci.bus import (
    HOST_BRIDGE_DEVICE_ID,
    HOST_BRIDGE_VENDOR_ID,
    PciConfigIo,
    PciConfigMmio,
    PciRoot,
    intx_gsi,
)
from strato.pci.configuration import BarKind, BarMove, BarSpec, PciConfiguration
from strato.pci.device import BarRegion, BarWindow

from .helpers import ECAM_BASE, ECAM_SIZE


class SimpleDevice:
    """A PciDevice with one 32-bit and one 64-bit BAR whose contents are a bytearray."""

    def __init__(self, vendor: int = 0x1234, device: int = 0x5678) -> None:
        self.config = PciConfiguration(vendor, device, 0xFF, 0)
        self.config.add_bar(BarSpec(0, 0x1000, BarKind.MEM32))
        self.config.add_bar(BarSpec(2, 0x4000, BarKind.MEM64, prefetchable=True))
        self.mem = {0: bytearray(0x1000), 2: bytearray(0x4000)}
        self.moved: list[tuple[int, int, int]] = []

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> list[BarMove]:
        return self.config.write(offset, data)

    def bar_specs(self) -> list[BarSpec]:
        return self.config.bar_specs()

    def bars(self) -> list[BarRegion]:
        return [
            BarRegion(s.index, self.config.bar_mapped_address(s.index), s.size, s.kind)
            for s in self.config.bar_specs()
        ]

    def set_bar_address(self, index: int, address: int) -> None:
        self.config.set_bar_address(index, address)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return bytes(self.mem[index][offset : offset + size])

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        self.mem[index][offset : offset + len(data)] = data

    def bar_moved(self, index: int, old_base: int, new_base: int) -> None:
        self.moved.append((index, old_base, new_base))


@pytest.fixture
def machine() -> tuple[Bus, Bus, PciRoot]:
    mmio, pio = Bus("mmio"), Bus("pio")
    root = PciRoot(mmio_bus=mmio, pio_bus=pio)
    pio.insert(PciConfigIo(root), 0xCF8, 8)
    mmio.insert(PciConfigMmio(root), ECAM_BASE, ECAM_SIZE)
    return mmio, pio, root


def cf8(pio: Bus, slot: int, reg: int, fn: int = 0, bus: int = 0, enable: bool = True) -> None:
    value = (1 << 31 if enable else 0) | bus << 16 | slot << 11 | fn << 8 | reg
    assert pio.write(0xCF8, struct.pack("<I", value))


def cfc_read(pio: Bus, offset: int, size: int) -> int:
    data = pio.read(0xCFC + offset, size)
    assert data is not None and len(data) == size
    return int.from_bytes(data, "little")


def ecam(mmio: Bus, slot: int, reg: int, size: int, bus: int = 0, fn: int = 0) -> int:
    data = mmio.read(ECAM_BASE + (bus << 20 | slot << 15 | fn << 12 | reg), size)
    assert data is not None and len(data) == size
    return int.from_bytes(data, "little")


def test_host_bridge_through_cf8(machine: Any) -> None:
    _, pio, _ = machine
    cf8(pio, 0, 0)
    assert cfc_read(pio, 0, 4) == HOST_BRIDGE_DEVICE_ID << 16 | HOST_BRIDGE_VENDOR_ID
    assert cfc_read(pio, 0, 2) == HOST_BRIDGE_VENDOR_ID
    assert cfc_read(pio, 2, 2) == HOST_BRIDGE_DEVICE_ID
    assert cfc_read(pio, 1, 1) == HOST_BRIDGE_VENDOR_ID >> 8
    assert cfc_read(pio, 3, 1) == HOST_BRIDGE_DEVICE_ID >> 8
    cf8(pio, 0, 0x08)
    assert cfc_read(pio, 2, 2) == 0x0600  # class: bridge, subclass: host bridge
    # the address register reads back (dword only)
    assert cfc_read(pio, -4, 4) == 1 << 31 | 0x08
    assert cfc_read(pio, -3, 1) == 0xFF


def test_cf8_disabled_and_partial_address_writes(machine: Any) -> None:
    _, pio, _ = machine
    cf8(pio, 0, 0, enable=False)
    assert cfc_read(pio, 0, 4) == 0xFFFF_FFFF
    cf8(pio, 0, 0)
    pio.write(0xCF9, b"\x06")  # the chipset reset port, not part of CONFIG_ADDRESS
    assert cfc_read(pio, 0, 2) == HOST_BRIDGE_VENDOR_ID
    assert cfc_read(pio, 3, 2) == 0xFFFF  # crosses the data dword


def test_absent_devices_read_all_ones(machine: Any) -> None:
    mmio, pio, _ = machine
    for slot, fn, bus in ((1, 0, 0), (31, 0, 0), (0, 1, 0), (0, 0, 1), (5, 7, 255)):
        cf8(pio, slot, 0, fn=fn, bus=bus)
        assert cfc_read(pio, 0, 4) == 0xFFFF_FFFF
        assert cfc_read(pio, 2, 2) == 0xFFFF
        assert cfc_read(pio, 1, 1) == 0xFF
        assert ecam(mmio, slot, 0, 4, bus=bus, fn=fn) == 0xFFFF_FFFF
        assert ecam(mmio, slot, 0x100, 2, bus=bus, fn=fn) == 0xFFFF
        # writes to nothing are dropped
        pio.write(0xCFC, b"\x00\x00\x00\x00")


def test_config_writes_byte_word_dword(machine: Any) -> None:
    mmio, pio, root = machine
    slot = root.add_device(SimpleDevice())
    cf8(pio, slot, 0x3C)
    pio.write(0xCFC, b"\x0a")
    assert cfc_read(pio, 0, 1) == 0x0A
    cf8(pio, slot, 0x04)
    pio.write(0xCFC, b"\x06\x00")
    assert cfc_read(pio, 0, 2) == 0x0006
    pio.write(0xCFC, b"\x02\x00\xff\xff")  # dword: command + status (read-only)
    assert cfc_read(pio, 0, 4) == 0x0000_0002
    assert ecam(mmio, slot, 0x04, 2) == 0x0002
    mmio.write(ECAM_BASE + (slot << 15) + 0x3D, b"\x07")  # interrupt pin is read-only
    assert ecam(mmio, slot, 0x3D, 1) == 0
    # ECAM reaches the extended space; bad shapes read all-ones
    assert ecam(mmio, slot, 0xFFC, 4) == 0
    assert mmio.read(ECAM_BASE + (slot << 15) + 2, 4) == b"\xff" * 4
    assert mmio.read(ECAM_BASE + (slot << 15), 8) == b"\xff" * 8


def test_add_device_allocates_and_maps_bars(machine: Any) -> None:
    mmio, _, root = machine
    dev = SimpleDevice()
    assert root.next_free_slot() == 1
    slot = root.add_device(dev)
    assert slot == 1 and root.next_free_slot() == 2
    bars = {b.index: b for b in dev.bars()}
    assert LAYOUT.mmio32_start <= bars[0].address < LAYOUT.pci_ecam
    assert bars[0].address % 0x1000 == 0
    assert bars[2].address >= LAYOUT.mmio64_start and bars[2].address % 0x4000 == 0
    mmio.write(bars[2].address + 0x10, b"hello")
    assert dev.mem[2][0x10:0x15] == b"hello"
    assert mmio.read(bars[0].address, 4) == b"\0\0\0\0"
    assert root.add_device(SimpleDevice(), slot=7) == 7
    with pytest.raises(BusError):
        root.add_device(SimpleDevice(), slot=7)
    assert ecam(mmio, 7, 0, 4) == 0x5678_1234


def test_guest_moves_a_bar(machine: Any) -> None:
    mmio, _, root = machine
    dev = SimpleDevice()
    slot = root.add_device(dev)
    old = dev.bars()[0].address
    new = old + 0x10_0000
    base = ECAM_BASE + (slot << 15)
    mmio.write(base + 0x04, b"\x02\x00")  # memory space enable
    mmio.write(base + 0x10, struct.pack("<I", new))
    assert dev.moved == [(0, old, new)]
    assert mmio.lookup(old) is None
    mmio.write(new, b"\x42")
    assert dev.mem[0][0] == 0x42
    # sizing does not move it
    mmio.write(base + 0x10, b"\xff\xff\xff\xff")
    assert ecam(mmio, slot, 0x10, 4) == 0xFFFF_F000
    mmio.write(base + 0x10, struct.pack("<I", new))
    assert len(dev.moved) == 1
    # a 64-bit BAR moves once both halves are written
    old64 = dev.bars()[1].address
    new64 = old64 + 0x1_0000_0000
    mmio.write(base + 0x18, struct.pack("<I", (new64 & 0xFFFF_FFFF) | 0xC))
    assert len(dev.moved) == 1
    mmio.write(base + 0x1C, struct.pack("<I", new64 >> 32))
    assert dev.moved[-1] == (2, old64, new64)
    assert mmio.lookup(new64) is not None and mmio.lookup(old64) is None


def test_bar_move_onto_another_device_is_refused(machine: Any) -> None:
    mmio, _, root = machine
    a, b = SimpleDevice(), SimpleDevice()
    sa, _ = root.add_device(a), root.add_device(b)
    a0, b0 = a.bars()[0].address, b.bars()[0].address
    base = ECAM_BASE + (sa << 15)
    mmio.write(base + 0x04, b"\x02\x00")
    mmio.write(base + 0x10, struct.pack("<I", b0))
    assert a.moved == []
    assert ecam(mmio, sa, 0x10, 4) == a0  # rolled back
    hit = mmio.lookup(a0)
    assert hit is not None and isinstance(hit[0], BarWindow) and hit[0].device is a


def test_remove_device_frees_its_bars(machine: Any) -> None:
    mmio, _, root = machine
    dev = SimpleDevice()
    slot = root.add_device(dev)
    addr = dev.bars()[0].address
    root.remove_device(slot)
    assert mmio.lookup(addr) is None
    assert ecam(mmio, slot, 0, 4) == 0xFFFF_FFFF
    again = SimpleDevice()
    root.add_device(again)
    assert again.bars()[0].address == addr


def test_restored_device_keeps_its_addresses(machine: Any) -> None:
    mmio, _, root = machine
    dev = SimpleDevice()
    dev.set_bar_address(0, 0xC800_0000)
    dev.set_bar_address(2, 0x200_0000_0000)
    root.add_device(dev, slot=3)
    assert mmio.lookup(0xC800_0000) is not None
    # a BAR outside every window (the guest put it there) is mapped where the device says
    assert mmio.lookup(0x200_0000_0000) is not None
    assert dev.bars()[1].address == 0x200_0000_0000
    with pytest.raises(AllocationError):
        root.allocator.mmio32.reserve(0xC800_0000, 0x1000)  # tracked


def test_intx_gsi_rule() -> None:
    assert [intx_gsi(s) for s in (0, 1, 7, 8, 31)] == [16, 17, 23, 16, 23]


# -- allocator -------------------------------------------------------------------------------------
def test_allocator_alignment_and_first_fit() -> None:
    a = AddressAllocator(0x1000, 0x10000)
    assert a.allocate(0x100) == 0x1000
    assert a.allocate(0x2000) == 0x2000
    assert a.allocate(0x100) == 0x1100
    assert a.allocate(0x1000, align=0x4000) == 0x4000
    a.free(0x2000)
    assert a.allocate(0x2000) == 0x2000
    for start, size in a.allocations():
        assert start % min(size, 0x1000) == 0


def test_allocator_exhaustion_and_errors() -> None:
    a = AddressAllocator(0, 0x4000)
    assert [a.allocate(0x1000) for _ in range(4)] == [0, 0x1000, 0x2000, 0x3000]
    with pytest.raises(AllocationError):
        a.allocate(0x1000)
    with pytest.raises(AllocationError):
        a.free(0x800)
    a.free(0x1000)
    with pytest.raises(AllocationError):
        a.allocate(0x2000)  # 4 KiB free, not 8
    with pytest.raises(AllocationError):
        a.reserve(0x800, 0x1000)  # overlaps 0
    a.reserve(0x1000, 0x1000)
    with pytest.raises(AllocationError):
        a.allocate(0x100, align=3)
    with pytest.raises(AllocationError):
        a.reserve(0x3F00, 0x200)  # past the window


def test_pci_allocator_windows() -> None:
    p = PciAllocator.from_layout()
    assert p.mmio32.base == LAYOUT.mmio32_start and p.mmio32.end == LAYOUT.pci_ecam
    assert p.mmio64.base == LAYOUT.mmio64_start
    big = p.allocate_bar(BarSpec(0, 1 << 30, BarKind.MEM64))
    assert big % (1 << 30) == 0 and big >= LAYOUT.mmio64_start
    small = p.allocate_bar(BarSpec(0, 0x1000, BarKind.MEM32))
    assert LAYOUT.mmio32_start <= small < LAYOUT.pci_ecam
    # a full 64-bit window falls back to the 32-bit one
    tiny = PciAllocator((0xC000_0000, 0x10_0000), (1 << 40, 0x1000))
    assert tiny.allocate_bar(BarSpec(0, 0x1000)) == 1 << 40
    assert tiny.allocate_bar(BarSpec(0, 0x1000)) == 0xC000_0000
    state = tiny.mmio32.state()
    fresh = AddressAllocator(0xC000_0000, 0x10_0000)
    fresh.restore(state)
    assert fresh.allocations() == tiny.mmio32.allocations()
