"""Fuzz target "virtio-pci": the common configuration structure of the modern transport.

A real virtio-rng behind the transport, on real buses and guest memory. The guest writes and
reads any common-config register at any width with values near the interesting ones (queue
sizes, ring addresses inside and outside memory, every status transition, feature words),
notifies queues and resets, in any order. For any sequence:
- nothing raises and nothing is logged as an internal error; reads are exactly sized;
- a queue is only ever enabled with a valid configuration (size, alignment, rings in memory);
- once DRIVER_OK is set, the queue registers of every queue are frozen until a reset
  (reconfiguring a live queue is the classic bug);
- the device is active only with FEATURES_OK and DRIVER_OK, with features it offered;
- afterwards a driver resets the device, sets it up the Linux way and gets random bytes.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from strato.devices.virtio.rng import Rng
from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting
from strato.virtio.device import (
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
)
from strato.virtio.pci import COMMON_CFG_OFFSET, COMMON_CFG_SIZE, NOTIFY_OFFSET, VirtioPciDevice
from strato.virtio.testing import DriverQueue
from tests.fuzz._support import count, fuzz_settings, no_internal_errors
from tests.pci.helpers import FakeIoEvents, FakeRoutingBackend, LinuxLikeDriver, make_machine

MEM = 1 << 20
QUEUE = 16
GOOD_RINGS = (0x10000, 0x10100, 0x10200)  # desc, avail, used for a queue of up to 16

registers = st.one_of(
    st.sampled_from([0x00, 0x04, 0x08, 0x0C, 0x10, 0x12, 0x14, 0x15, 0x16, 0x18, 0x1A, 0x1C]),
    st.sampled_from([0x1E, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3A, 0x3C, 0x3E]),
    st.integers(0, COMMON_CFG_SIZE + 4),
)
values = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 8, 0xB, 0xF, 0x4F, 0x80, 0xFF, 0xFFFF, 0xFFFF_FFFF]),
    st.sampled_from([QUEUE, QUEUE // 2, QUEUE * 2, 3, 0x8000]),  # queue sizes
    st.sampled_from([*GOOD_RINGS, 0x10008, MEM - 8, MEM, 0xFFFF_FFF0, 1 << 40]),  # addresses
    st.sampled_from([1 << VIRTIO_F_RING_EVENT_IDX, 1 << (VIRTIO_F_VERSION_1 - 32)]),
    st.integers(0, 2**64 - 1),
)
common_op = st.tuples(
    st.sampled_from(["write", "write", "read"]), registers, st.sampled_from([1, 2, 4, 8]), values
)
notify_op = st.tuples(st.just("notify"), st.integers(0, 3), st.just(2), st.just(0))
# Steps of a correct set-up, so that sequences get to FEATURES_OK and DRIVER_OK often.
negotiate_op = st.tuples(st.just("negotiate"), st.just(0), st.just(0), st.just(0))
queue_op = st.tuples(
    st.just("queue"),
    st.sampled_from([0, 0, 0, 1]),
    st.sampled_from([8, 16, 3, 32]),
    st.sampled_from([0, 0, 1, 2, 3]),
)
live_op = st.tuples(st.just("live"), st.just(0), st.just(0), st.just(0))
ops = st.lists(
    st.one_of(common_op, common_op, common_op, notify_op, negotiate_op, queue_op, live_op),
    min_size=10,
    max_size=100,
)

_QUEUE_FIELDS = ("size", "desc_table", "avail_ring", "used_ring")


class Transport:
    def __init__(self) -> None:
        self.mem, self.mmio, _, root = make_machine(MEM)
        self.loop = EventLoop()
        self.backend = FakeRoutingBackend()
        self.io = FakeIoEvents()
        self.rng = Rng(queue_size=QUEUE)
        self.t = VirtioPciDevice(self.rng, MsiRouting(self.backend), self.mem, self.loop, self.io)
        self.slot = root.add_device(self.t)
        self.driver = LinuxLikeDriver(self.mmio, self.slot)
        self.driver.probe()
        self.frozen: list[tuple[int, ...]] | None = None

    def close(self) -> None:
        self.t.close()
        self.rng.close()
        self.loop.close()
        self.mem.close()

    def step(self, op: tuple[Any, ...]) -> None:
        kind, reg, size, value = op
        base = self.t.bar_address
        if kind == "read":
            got = self.mmio.read(base + COMMON_CFG_OFFSET + reg, size)
            assert got is not None and len(got) == size
        elif kind == "write":
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            self.mmio.write(base + COMMON_CFG_OFFSET + reg, data)
        elif kind == "negotiate":
            self.driver.negotiate()
        elif kind == "queue":
            rings = [GOOD_RINGS, (0x10008, 0x10100, 0x10200), (MEM - 8, 0, 0), (0, 0, 0)][value]
            d = self.driver
            d.common_write(0x16, 2, reg)  # queue_select: 1 and 2 do not exist
            d.common_write(0x18, 2, size)
            for offset, addr in zip((0x20, 0x28, 0x30), rings, strict=True):
                d.common_write(offset, 4, addr & 0xFFFF_FFFF)
                d.common_write(offset + 4, 4, addr >> 32)
            d.common_write(0x1C, 2, 1)
        elif kind == "live":
            self.driver.add_status(STATUS_DRIVER_OK)
        else:
            self.mmio.write(base + NOTIFY_OFFSET + 4 * reg, struct.pack("<H", reg))
        while self.loop.run_once(0):
            pass

    def queue_fields(self) -> list[tuple[int, ...]]:
        return [(*(getattr(q, f) for f in _QUEUE_FIELDS), q.ready) for q in self.t.queues]

    def check(self) -> None:
        t = self.t
        for q in t.queues:
            if q.ready:
                assert q.is_valid(self.mem), q.state()
        live = bool(t.status & STATUS_DRIVER_OK)
        if live:
            if self.frozen is None:
                self.frozen = self.queue_fields()
            assert self.queue_fields() == self.frozen, "queue reconfigured after DRIVER_OK"
        else:
            self.frozen = None
        if t.activated or self.rng.active:
            assert t.status & STATUS_FEATURES_OK and t.status & STATUS_DRIVER_OK
            assert not self.rng.acked_features & ~self.rng.device_features

    def recovers(self) -> None:
        d = self.driver
        assert d.negotiate()  # resets first
        d.enable_msix()
        dq = DriverQueue(self.mem, 8, 0x20000, event_idx=True)
        off = d.setup_queue(0, 8, dq.desc_table, dq.avail_ring, dq.used_ring, 1)
        assert d.enable_queue(0)
        d.add_status(STATUS_DRIVER_OK)
        assert d.status == 0xF and self.t.activated
        chain = dq.add_chain(writable=[32])
        self.io.kick(d.notify_addr(off))
        while self.loop.run_once(0):
            pass
        assert dq.get_used() == [(chain.head, 32)]


def _w(reg: int, size: int, value: int) -> tuple[str, int, int, int]:
    return ("write", reg, size, value)


_LIVE_THEN_RECONFIGURE = [  # set up queue 0, go live, then try to move and resize it
    _w(0x14, 1, 1),
    _w(0x14, 1, 3),
    _w(0x08, 4, 1),
    _w(0x0C, 4, 1),
    _w(0x14, 1, 0xB),
    _w(0x16, 2, 0),
    _w(0x18, 2, 8),
    _w(0x20, 8, GOOD_RINGS[0]),
    _w(0x28, 8, GOOD_RINGS[1]),
    _w(0x30, 8, GOOD_RINGS[2]),
    _w(0x1C, 2, 1),
    _w(0x14, 1, 0xF),
    _w(0x18, 2, 16),
    _w(0x20, 4, 0xFFFF_FFF0),
    _w(0x24, 4, 0xFFFF),
    _w(0x1C, 2, 0),
    ("notify", 0, 2, 0),
]


@fuzz_settings(200)
@given(seq=ops)
@example(seq=_LIVE_THEN_RECONFIGURE)
def test_virtio_pci_common_config(seq: list[tuple[Any, ...]]) -> None:
    count("virtio-pci")
    m = Transport()
    try:
        with no_internal_errors():
            for op in seq:
                m.step(op)
                m.check()
            m.recovers()
    finally:
        m.close()
