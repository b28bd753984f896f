"""Hostile guests: random config-space and BAR accesses of every size never raise and never log
an internal error; reads always return exactly the bytes asked for."""

from __future__ import annotations

import logging
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.bus import Bus
from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting
from strato.pci.bus import PciConfigIo
from strato.virtio.pci import (
    DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET,
    MSIX_PBA_OFFSET,
    MSIX_TABLE_OFFSET,
    NOTIFY_OFFSET,
    VirtioPciDevice,
)

from .helpers import ECAM_BASE, FakeIoEvents, FakeRoutingBackend, FakeVirtioDevice, make_machine

COMMON_REGS = list(range(0, 0x40, 2))
REGION_BASES = [
    ISR_CFG_OFFSET,
    DEVICE_CFG_OFFSET,
    NOTIFY_OFFSET,
    NOTIFY_OFFSET + 4,
    MSIX_TABLE_OFFSET,
    MSIX_TABLE_OFFSET + 0x2C,
    MSIX_PBA_OFFSET,
    0x7FFF8,
]

sizes = st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(min_value=0, max_value=9))
values = st.one_of(
    st.binary(min_size=0, max_size=9),
    st.sampled_from(
        [
            b"\x00",
            b"\x01",
            b"\x0f",
            b"\x01\x00",
            b"\x00\x00\x00\x00",
            b"\xff\xff\xff\xff",
            b"\x00\x80",
        ]
    ),
)
bar_offsets = st.one_of(
    st.sampled_from(COMMON_REGS),
    st.tuples(st.sampled_from(REGION_BASES), st.integers(min_value=-4, max_value=0x20)).map(sum),
    st.integers(min_value=0, max_value=0x7FFFF),
)
config_op = st.tuples(
    st.sampled_from(["ecam_read", "ecam_write", "cfc_read", "cfc_write"]),
    st.tuples(
        st.sampled_from([0, 0, 0, 1]),  # bus
        st.sampled_from([0, 1, 1, 1, 2]),  # slot: the host bridge, the device, nothing
        st.sampled_from([0, 0, 0, 3]),  # function
        st.one_of(
            st.integers(min_value=0, max_value=0xFFF),
            st.sampled_from([0x04, 0x06, 0x10, 0x14, 0x30, 0x3C]),
            st.integers(min_value=0x40, max_value=0xB0),  # the capabilities
        ),
    ),
    sizes,
    values,
)
bar_op = st.tuples(st.sampled_from(["bar_read", "bar_write"]), bar_offsets, sizes, values)


class ErrorRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _build() -> tuple[Bus, Bus, VirtioPciDevice, EventLoop]:
    mem, mmio, pio, root = make_machine(1 << 20)
    loop = EventLoop()
    transport = VirtioPciDevice(
        FakeVirtioDevice(), MsiRouting(FakeRoutingBackend()), mem, loop, FakeIoEvents()
    )
    root.add_device(transport)
    pio.insert(PciConfigIo(root), 0xCF8, 8)
    return mmio, pio, transport, loop


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.one_of(config_op, bar_op, bar_op), min_size=1, max_size=60))
def test_random_accesses_never_raise(ops: list[Any]) -> None:
    recorder = ErrorRecorder()
    logger = logging.getLogger("strato")
    logger.addHandler(recorder)
    mmio, pio, transport, loop = _build()
    try:
        for op in ops:
            kind = op[0]
            if kind in ("bar_read", "bar_write"):
                _, offset, size, data = op
                addr = transport.bar_address + max(0, offset)
                if kind == "bar_read":
                    got = mmio.read(addr, size)
                    assert got is None or len(got) == size
                else:
                    mmio.write(addr, data)
            else:
                _, (bus, slot, fn, reg), size, data = op
                assert isinstance(size, int) and isinstance(data, bytes)
                if kind.startswith("ecam"):
                    addr = ECAM_BASE + (bus << 20 | slot << 15 | fn << 12 | reg)
                    if kind == "ecam_read":
                        got = mmio.read(addr, size)
                        assert got is not None and len(got) == size
                    else:
                        mmio.write(addr, data)
                else:
                    cf8 = 0x8000_0000 | bus << 16 | slot << 11 | fn << 8 | (reg & 0xFC)
                    pio.write(0xCF8, struct.pack("<I", cf8))
                    if kind == "cfc_read":
                        got = pio.read(0xCFC + reg % 4, size)
                        assert got is not None and len(got) == size
                    else:
                        pio.write(0xCFC + reg % 4, data)
            loop.run_once(0)
        assert recorder.records == [], [r.getMessage() for r in recorder.records]
    finally:
        logger.removeHandler(recorder)
        transport.close()
        loop.close()


def test_every_register_at_every_size() -> None:
    """A deterministic sweep next to the random one: every offset of config space and of the
    BAR's structures, read and written with 1..8 bytes of zeros, ones and all-ones."""
    recorder = ErrorRecorder()
    logger = logging.getLogger("strato")
    logger.addHandler(recorder)
    mmio, _, transport, loop = _build()
    try:
        cfg_base = ECAM_BASE + (1 << 15)
        offsets = list(range(0, 0x40)) + [b + d for b in REGION_BASES for d in range(-4, 0x14)]
        for size in (1, 2, 3, 4, 8):
            for pattern in (b"\x00", b"\x01", b"\xff"):
                data = pattern * size
                for reg in range(0, 0x100):
                    if reg in range(0x10, 0x18):
                        continue  # moving BAR 0 around is the random test's business
                    got = mmio.read(cfg_base + reg, size)
                    assert got is not None and len(got) == size
                    mmio.write(cfg_base + reg, data)
                for off in offsets:
                    addr = transport.bar_address + max(0, off)
                    got = mmio.read(addr, size)
                    assert got is None or len(got) == size
                    mmio.write(addr, data)
                loop.run_once(0)
        assert recorder.records == [], [r.getMessage() for r in recorder.records]
    finally:
        logger.removeHandler(recorder)
        transport.close()
        loop.close()
