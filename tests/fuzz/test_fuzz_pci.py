"""Fuzz target "pci": configuration space (0xCF8/0xCFC and ECAM) and MSI-X from a hostile guest.

A virtio-pci function sits in slot 1 behind a real PCI root on real buses. The guest does
random config reads and writes through both mechanisms, at any bus/slot/function/register and
width (moving BAR 0 around included), random MSI-X table and PBA accesses through the BAR
wherever it is, and the device raises vectors. For any sequence:
- nothing raises and nothing is logged as an internal error;
- every config read returns exactly the bytes asked for; absent functions read all-ones;
- the read-only parts of the header and the capability list never change;
- a live MSI-X vector is routed with exactly the message the guest programmed and is
  delivered when raised; a masked one is left pending in the PBA and delivered on unmask;
- afterwards BAR 0 still sizes correctly and a driver can find and negotiate the device.
tests/pci/test_pci_fuzz.py checks no-raise and read sizes; this adds the semantic checks.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from strato.bus import Bus
from strato.events import EventLoop
from strato.interrupts.msi import MsiRoute, MsiRouting
from strato.pci.bus import PciConfigIo
from strato.pci.msix import MSIX_TABLE_ENTRY_SIZE
from strato.virtio.pci import BAR_SIZE, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, VirtioPciDevice
from tests.fuzz._support import count, fuzz_settings, no_internal_errors
from tests.pci.helpers import (
    ECAM_BASE,
    FakeIoEvents,
    FakeRoutingBackend,
    FakeVirtioDevice,
    LinuxLikeDriver,
    make_machine,
)

SLOT = 1
NUM_VECTORS = 3  # two queues + config

sizes = st.sampled_from([1, 2, 4, 4, 4, 8, 0, 3])
registers = st.one_of(
    st.integers(0, 0x3F),
    st.sampled_from([0x04, 0x06, 0x10, 0x14, 0x18, 0x30, 0x3C]),
    st.integers(0x40, 0xFF),
    st.integers(0x100, 0xFFF),
)
values = st.one_of(
    st.binary(min_size=0, max_size=8),
    st.sampled_from(
        [b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x06\x00", b"\x00\x80", b"\x00\xc0"]
    ),
    st.sampled_from([0xE000_0000, 0xFEE0_0000, 0x1_0000_0000, 0xE800_0000, 0x80000]).map(
        lambda v: struct.pack("<I", v & 0xFFFF_FFFF)
    ),
)
config_op = st.tuples(
    st.sampled_from(["cfg_read", "cfg_write"]),
    st.sampled_from(["ecam", "cf8"]),
    st.sampled_from([0, 0, 0, 1]),  # bus
    st.sampled_from([SLOT, SLOT, SLOT, 0, 2, 31]),  # the device, the host bridge, nothing
    st.sampled_from([0, 0, 0, 5]),  # function
    registers,
    sizes,
    values,
)
msix_offsets = st.one_of(
    st.integers(0, NUM_VECTORS * MSIX_TABLE_ENTRY_SIZE + 8).map(lambda o: MSIX_TABLE_OFFSET + o),
    st.integers(0, 16).map(lambda o: MSIX_PBA_OFFSET + o),
    st.sampled_from([MSIX_TABLE_OFFSET + 0x3FFFC, BAR_SIZE - 4, BAR_SIZE]),
)
msix_op = st.tuples(
    st.sampled_from(["msix_read", "msix_write"]),
    msix_offsets,
    st.sampled_from([4, 4, 8, 2, 1]),
    st.sampled_from([0, 1, 0xFEE0_0000, 0x31, 0xFFFF_FFFF]),
)
fire_op = st.tuples(st.just("fire"), st.integers(0, NUM_VECTORS))
enable_op = st.tuples(st.just("msix_ctl"), st.sampled_from([0x8000, 0xC000, 0x4000, 0, 0xFFFF]))
op_lists = st.lists(
    st.one_of(config_op, config_op, msix_op, msix_op, fire_op, enable_op), min_size=20, max_size=80
)


class PciMachine:
    def __init__(self) -> None:
        mem, self.mmio, self.pio, root = make_machine(1 << 20)
        self.mem = mem
        self.loop = EventLoop()
        self.backend = FakeRoutingBackend()
        self.transport = VirtioPciDevice(
            FakeVirtioDevice(), MsiRouting(self.backend), mem, self.loop, FakeIoEvents()
        )
        assert root.add_device(self.transport, SLOT) == SLOT
        self.pio.insert(PciConfigIo(root), 0xCF8, 8)
        cfg = self.transport.config
        assert self.transport.msix_cap is not None and self.transport.msix is not None
        self.msix = self.transport.msix
        self.msix_ctl = self.transport.msix_cap + 2
        # What must never change: every header/capability byte the guest cannot write,
        # except the status register and the PCI_CFG window (the device updates those).
        start, end = self.transport._pci_cfg_data_range()
        self.readonly = {
            off: cfg.regs[off]
            for off in range(0x100)
            if not cfg.wmask[off] and off not in (6, 7) and not start <= off < end
        }
        self.caps = cfg.capabilities()

    def close(self) -> None:
        self.transport.close()
        self.loop.close()
        self.mem.close()

    def cfg_addr(self, via: str, bus: int, slot: int, fn: int, reg: int) -> tuple[Bus, int]:
        if via == "ecam":
            return self.mmio, ECAM_BASE + (bus << 20 | slot << 15 | fn << 12 | reg)
        cf8 = 0x8000_0000 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC)
        assert self.pio.write(0xCF8, struct.pack("<I", cf8))
        return self.pio, 0xCFC + (reg & 3)

    def step(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind in ("cfg_read", "cfg_write"):
            _, via, bus, slot, fn, reg, size, data = op
            if via == "cf8" and reg >= 0x100:
                reg &= 0xFF  # the legacy mechanism reaches the first 256 bytes only
            target, addr = self.cfg_addr(via, bus, slot, fn, reg)
            if kind == "cfg_read":
                got = target.read(addr, size)
                assert got is not None and len(got) == size
                present = bus == 0 and fn == 0 and slot in (0, SLOT)
                if not present:
                    assert got == b"\xff" * size
            else:
                target.write(addr, data)
        elif kind in ("msix_read", "msix_write"):
            _, offset, size, value = op
            addr = self.transport.bar_address + offset
            if kind == "msix_read":
                got = self.mmio.read(addr, size)
                assert got is None or len(got) == size
            else:
                self.mmio.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        elif kind == "msix_ctl":
            base = ECAM_BASE + (SLOT << 15) + self.msix_ctl
            self.mmio.write(base, struct.pack("<H", op[1]))
        elif kind == "fire":
            self.fire(op[1])
        self.loop.run_once(0)

    def fire(self, vector: int) -> None:
        if vector >= NUM_VECTORS:
            assert not self.msix.fire(vector)
            return
        vectors = self.transport.vectors
        assert vectors is not None
        gsi = vectors.gsi(vector)
        self.backend.fired(gsi)  # forget earlier deliveries
        live = not self.msix.is_masked(vector)
        assert self.msix.fire(vector) == live
        assert self.backend.fired(gsi) == (1 if live else 0)
        assert self.msix.pending[vector] == (not live)
        pba = self.msix.read_pba(0, 8)
        assert (int.from_bytes(pba, "little") >> vector) & 1 == (not live)

    def check(self) -> None:
        cfg = self.transport.config
        changed = {o: cfg.regs[o] for o, v in self.readonly.items() if cfg.regs[o] != v}
        assert not changed, changed
        assert cfg.capabilities() == self.caps
        vectors = self.transport.vectors
        assert vectors is not None
        routes = {r.gsi: r for r in self.backend.table if isinstance(r, MsiRoute)}
        for v in range(NUM_VECTORS):
            lo, hi, data, _ = self.msix.entries[v]
            if self.msix.is_masked(v):
                continue
            route = routes.get(vectors.gsi(v))
            assert route == MsiRoute(vectors.gsi(v), lo, hi, data), (v, route)
            assert not self.msix.pending[v]  # unmasking delivered what was pending


def _recovers(m: PciMachine) -> None:
    cfg_base = ECAM_BASE + (SLOT << 15)
    m.mmio.write(cfg_base + 0x04, b"\x00\x00")  # decoding off while sizing
    m.mmio.write(cfg_base + 0x10, b"\xff\xff\xff\xff")
    m.mmio.write(cfg_base + 0x14, b"\xff\xff\xff\xff")
    lo, hi = m.mmio.read(cfg_base + 0x10, 4), m.mmio.read(cfg_base + 0x14, 4)
    assert lo is not None and hi is not None
    mask = (int.from_bytes(lo, "little") & ~0xF) | int.from_bytes(hi, "little") << 32
    assert (~mask + 1) & (2**64 - 1) == BAR_SIZE
    assert int.from_bytes(lo, "little") & 0xF == 0x4  # still a 64-bit memory BAR
    old = m.transport.bar_address  # put it back where it is mapped, then a driver probes
    m.mmio.write(cfg_base + 0x10, struct.pack("<I", old & 0xFFFF_FFFF))
    m.mmio.write(cfg_base + 0x14, struct.pack("<I", old >> 32))
    driver = LinuxLikeDriver(m.mmio, SLOT)
    driver.probe()
    assert driver.bar0 == m.transport.bar_address
    assert driver.negotiate()


@fuzz_settings(200)
@given(seq=op_lists)
@example(  # a vector fired while masked is pending, unmasking it delivers it
    seq=[
        ("msix_ctl", 0x8000),
        ("msix_write", MSIX_TABLE_OFFSET, 4, 0xFEE0_0000),
        ("msix_write", MSIX_TABLE_OFFSET + 8, 4, 0x31),
        ("fire", 0),
        ("msix_write", MSIX_TABLE_OFFSET + 12, 4, 0),
        ("fire", 0),
    ]
)
@example(  # BAR 0 moved onto the ECAM window while decoding is on: refused, kept
    seq=[
        ("cfg_write", "ecam", 0, SLOT, 0, 0x10, 4, b"\x00\x00\x00\xe8"),
        ("cfg_write", "ecam", 0, SLOT, 0, 0x14, 4, b"\x00\x00\x00\x00"),
        ("cfg_write", "cf8", 0, SLOT, 0, 0x04, 2, b"\x06\x00"),
    ]
)
def test_pci_config_space_and_msix(seq: list[tuple[Any, ...]]) -> None:
    count("pci")
    m = PciMachine()
    try:
        with no_internal_errors():
            for op in seq:
                m.step(op)
                m.check()
            _recovers(m)
    finally:
        m.close()
