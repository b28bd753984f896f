"""The known virtio bug classes, one named test each, against strato's queue and devices.

Each test builds the hostile ring by hand in guest memory (guarded: 1 MiB of RAM, a hole, a
4 KiB region holding a canary), notifies the device, and checks what a correct device does:
returns the chain unused or with an error status, or asks for a reset; writes nothing it may
not; and keeps serving the next well-formed request. A test about a malformed chain also
checks the queue refuses it for the reason the test is named after (`Rig.fault`), so that
dropping any one check of the virtqueue fails a test here.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.devices.backends.raw import RawFile
from strato.devices.virtio.block import VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, Block
from strato.devices.virtio.console import Console
from strato.devices.virtio.rng import Rng
from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting
from strato.memory import GuestMemory
from strato.virtio.device import STATUS_DRIVER_OK
from strato.virtio.pci import VirtioPciDevice
from strato.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    ChainFault,
    DescriptorChain,
    Queue,
    QueueError,
)
from strato.virtio.testing import DriverQueue, VirtioDriver
from tests.fuzz._support import (
    CANARY,
    GUARD,
    HOLE,
    RAM,
    changed_outside,
    guarded_memory,
    no_internal_errors,
    snapshot,
)
from tests.pci.helpers import FakeIoEvents, FakeRoutingBackend, LinuxLikeDriver, make_machine

R, W, N, IND = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT
SIZE = 8
BUF = 0x10000  # hand-placed buffers
TABLE = 0x30000  # hand-placed indirect tables
SECTORS = 64
_DESC = struct.Struct("<QIHH")


@dataclass
class Rig:
    mem: GuestMemory
    drv: VirtioDriver
    loop: EventLoop

    @property
    def dq(self) -> DriverQueue:
        return self.drv[0]

    def desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.dq.write_desc(index, addr, length, flags, nxt)

    def rings(self) -> list[tuple[int, int]]:
        """The avail ring (the driver publishes) and the used ring (the device returns)."""
        return [(self.dq.avail_ring, 6 + 2 * SIZE), (self.dq.used_ring, 6 + 8 * SIZE)]

    def table(self, at: int, entries: list[tuple[int, int, int, int]]) -> None:
        self.mem.write(at, b"".join(_DESC.pack(*e) for e in entries))

    def fault(self, head: int) -> ChainFault | None:
        """Why the virtqueue refuses the chain at `head` of queue 0 (None: it does not)."""
        size = self.dq.size
        chain = DescriptorChain(self.mem, self.mem.view(self.dq.desc_table, 16 * size), size, head)
        try:
            chain.readable_views()
            chain.writable_views()
        except ChainError as e:
            return e.fault
        return None

    def kick(self, *heads: int) -> list[tuple[int, int]]:
        """Publish `heads`, notify queue 0; the used entries the device returned."""
        for h in heads:
            self.dq.publish(h)
        with no_internal_errors():
            self.drv.kick(0)
        return self.dq.get_used()


def make_rig(dev: Rng | Block | Console, size: int = SIZE) -> Rig:
    mem = guarded_memory()
    loop = EventLoop()
    drv = VirtioDriver(dev, mem, queue_size=size, buffers_base=0x80000, buffers_end=0xC0000)
    drv.activate(loop)
    return Rig(mem, drv, loop)


@pytest.fixture
def rng() -> Iterator[Rig]:
    dev = Rng(queue_size=SIZE)
    rig = make_rig(dev)
    yield rig
    dev.reset()
    dev.close()
    rig.loop.close()
    rig.mem.close()


@pytest.fixture
def disk() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="strato-regress-") as d:
        path = Path(d) / "disk.raw"
        path.write_bytes(os.urandom(SECTORS * 512))
        yield path


@pytest.fixture
def blk(disk: Path) -> Iterator[Rig]:
    dev = Block(RawFile(str(disk)), queue_size=SIZE)
    rig = make_rig(dev)
    yield rig
    dev.reset()
    dev.disk.close()
    rig.loop.close()
    rig.mem.close()


def rng_still_serves(rig: Rig) -> None:
    c = rig.dq.add_chain([], [32])
    assert (c.head, 32) in rig.kick()


def blk_still_serves(rig: Rig, disk: Path) -> None:
    c = rig.dq.add_chain([struct.pack("<IIQ", 0, 0, 2)], [512, 1])
    assert (c.head, 513) in rig.kick()
    assert rig.mem.read(c.writable[0][0], 512) == disk.read_bytes()[1024:1536]
    assert rig.mem.read(c.writable[1][0], 1) == bytes([VIRTIO_BLK_S_OK])


def queue_over(mem: GuestMemory, size: int = SIZE) -> tuple[Queue, DriverQueue]:
    dq = DriverQueue(mem, size, 0x1000)
    return dq.device_queue(), dq


# -- descriptor loops --------------------------------------------------------------------------
def test_descriptor_loop_is_returned_unused(rng: Rig) -> None:
    rng.desc(0, BUF, 16, W | N, 1)
    rng.desc(1, BUF + 16, 16, W | N, 0)  # 0 -> 1 -> 0 -> ...
    rng.desc(2, BUF + 32, 16, W | N, 2)  # 2 -> 2
    assert rng.fault(0) is rng.fault(2) is ChainFault.TOO_LONG
    before = snapshot(rng.mem)
    assert rng.kick(0, 2) == [(0, 0), (2, 0)]
    assert changed_outside(rng.mem, before, rng.rings()) == []
    rng_still_serves(rng)


def test_descriptor_loop_inside_an_indirect_table(rng: Rig) -> None:
    rng.table(TABLE, [(BUF, 16, W | N, 1), (BUF + 16, 16, W | N, 0)])
    rng.desc(0, TABLE, 32, IND)
    assert rng.fault(0) is ChainFault.TOO_LONG
    assert rng.kick(0) == [(0, 0)]
    rng_still_serves(rng)


# -- zero-length and huge descriptors ----------------------------------------------------------
def test_zero_length_descriptors(rng: Rig) -> None:
    rng.desc(0, BUF, 0, W)  # nothing to fill
    rng.desc(1, 2**64 - 1, 0, W | N, 2)  # an empty buffer at an absurd address is still empty
    rng.desc(2, BUF, 8, W)
    assert rng.kick(0, 1) == [(0, 0), (1, 8)]
    rng_still_serves(rng)


def test_zero_length_indirect_table_is_rejected(rng: Rig) -> None:
    rng.desc(0, TABLE, 0, IND)
    assert rng.fault(0) is ChainFault.INDIRECT_BAD_LENGTH
    assert rng.kick(0) == [(0, 0)]
    rng_still_serves(rng)


def test_huge_descriptor_is_rejected_without_touching_memory(rng: Rig) -> None:
    rng.desc(0, BUF, 2**32 - 1, W)  # 4 GiB at a valid address: runs out of RAM
    rng.desc(1, 2**64 - 16, 2**32 - 1, W)  # and one that wraps the address space
    assert rng.fault(0) is ChainFault.BUFFER_OUT_OF_MEMORY
    assert rng.fault(1) is ChainFault.ADDRESS_OVERFLOW
    before = snapshot(rng.mem)
    assert rng.kick(0, 1) == [(0, 0), (1, 0)]
    assert changed_outside(rng.mem, before, rng.rings()) == []
    rng_still_serves(rng)


# -- indices ---------------------------------------------------------------------------------
def test_avail_index_jumping_past_the_queue_size(rng: Rig) -> None:
    rng.desc(0, BUF, 16, W)
    rng.dq.write_avail_entry(0, 0)
    before = snapshot(rng.mem)
    rng.dq.set_avail_idx(SIZE + 1)  # claims 9 new entries in a queue of 8
    assert rng.kick() == []
    dev = rng.drv.device
    assert isinstance(dev, Rng) and dev.needs_reset and rng.drv.interrupt.needs_reset
    assert changed_outside(rng.mem, before, rng.rings()[:1]) == []  # used ring untouched


def test_avail_ring_entry_past_the_queue_size() -> None:
    mem = guarded_memory()
    try:
        q, dq = queue_over(mem)
        dq.write_avail_entry(0, SIZE)  # head index 8 in a queue of 8
        dq.set_avail_idx(1)
        with pytest.raises(QueueError):
            q.pop(mem)
    finally:
        mem.close()


def test_used_ring_index_wraps_at_65535(rng: Rig) -> None:
    q = rng.drv.queues[0]
    q.next_avail = q.next_used = 0xFFFE
    rng.mem.write_u16(rng.dq.used_ring + 2, 0xFFFE)
    rng.dq.restart_from(0xFFFE, 0xFFFE)
    chains = [rng.dq.add_chain([], [8]) for _ in range(4)]
    used = rng.kick()
    assert used == [(c.head, 8) for c in chains]
    assert rng.dq.used_idx == 2 and q.next_used == 2 and q.next_avail == 2
    for i, c in enumerate(chains):  # slots 6, 7, 0, 1
        assert rng.dq.used_entry((0xFFFE + i) & 0xFFFF) == (c.head, 8)
    rng_still_serves(rng)


# -- indirect tables --------------------------------------------------------------------------
def test_nested_indirect_table_is_rejected(rng: Rig) -> None:
    rng.table(TABLE + 0x100, [(BUF, 16, W, 0)])
    rng.table(TABLE, [(TABLE + 0x100, 16, IND, 0)])  # an indirect descriptor in a table
    rng.desc(0, TABLE, 16, IND)
    assert rng.fault(0) is ChainFault.NESTED_INDIRECT
    before = snapshot(rng.mem)
    assert rng.kick(0) == [(0, 0)]
    assert changed_outside(rng.mem, before, rng.rings()) == []
    rng_still_serves(rng)


@pytest.mark.parametrize(
    ("addr", "length", "flags", "fault"),
    [
        (TABLE, 24, IND, ChainFault.INDIRECT_BAD_LENGTH),  # not a whole number of descriptors
        (TABLE, 8, IND, ChainFault.INDIRECT_BAD_LENGTH),
        (TABLE, 16, IND | N, ChainFault.INDIRECT_WITH_NEXT),
        (RAM[1] - 16, 32, IND, ChainFault.INDIRECT_OUT_OF_MEMORY),  # runs off the end of RAM
        (HOLE[0], 16, IND, ChainFault.INDIRECT_OUT_OF_MEMORY),  # table in the hole
        (2**64 - 16, 16, IND, ChainFault.INDIRECT_OUT_OF_MEMORY),
        (TABLE, 16 * (SIZE + 1), IND, ChainFault.INDIRECT_TOO_LARGE),  # > the queue size
        (TABLE, 16 << 20, IND, ChainFault.INDIRECT_TOO_LARGE),  # 16 MiB: refused unread
    ],
)
def test_malformed_indirect_table_is_rejected(
    rng: Rig, addr: int, length: int, flags: int, fault: ChainFault
) -> None:
    rng.table(TABLE, [(BUF, 16, W, 0), (BUF + 16, 16, W, 0)])
    rng.desc(0, addr, length, flags, 1)
    rng.desc(1, BUF, 16, W)
    assert rng.fault(0) is fault
    assert rng.kick(0) == [(0, 0)]
    rng_still_serves(rng)


def test_indirect_next_index_past_the_table(rng: Rig) -> None:
    rng.table(TABLE, [(BUF, 16, W | N, 5)])  # next 5 in a table of 1
    rng.desc(0, TABLE, 16, IND)
    assert rng.fault(0) is ChainFault.NEXT_OUT_OF_RANGE
    assert rng.kick(0) == [(0, 0)]
    rng_still_serves(rng)


# -- buffers outside guest memory --------------------------------------------------------------
@pytest.mark.parametrize(
    ("addr", "length"),
    [
        (RAM[1] - 8, 16),  # straddles the end of RAM into the hole
        (HOLE[0] + 0x100, 16),  # inside the memory hole
        (GUARD[0] + GUARD[1] - 4, 8),  # past the end of the last region
        (GUARD[0] + GUARD[1], 1),
        (1 << 40, 16),
        (2**64 - 8, 8),
    ],
)
def test_descriptor_outside_guest_memory(rng: Rig, addr: int, length: int) -> None:
    rng.desc(0, addr, length, W)
    assert rng.fault(0) is ChainFault.BUFFER_OUT_OF_MEMORY
    before = snapshot(rng.mem)
    assert rng.kick(0) == [(0, 0)]
    assert changed_outside(rng.mem, before, rng.rings()) == []
    assert rng.mem.read(GUARD[0], GUARD[1]) == CANARY * (GUARD[1] // 2)
    rng_still_serves(rng)


def test_chain_longer_than_2_pow_32_bytes_is_rejected() -> None:
    mem = guarded_memory()
    try:
        q, dq = queue_over(mem)
        # Three 2 GiB buffers: their lengths add up past 32 bits (they need not fit in RAM,
        # the sum is checked first).
        dq.write_desc(0, BUF, 2**31, W | N, 1)
        dq.write_desc(1, BUF, 2**31, W | N, 2)
        dq.write_desc(2, BUF, 2**31, W)
        dq.publish(0)
        chain = q.pop(mem)
        assert chain is not None
        with pytest.raises(ChainError) as info:
            _ = chain.descriptors
        assert info.value.fault is ChainFault.TOO_MANY_BYTES
    finally:
        mem.close()


@pytest.fixture
def rng2048() -> Iterator[Rig]:
    dev = Rng(queue_size=2048)
    rig = make_rig(dev, 2048)
    yield rig
    dev.reset()
    dev.close()
    rig.loop.close()
    rig.mem.close()


def test_chain_with_more_buffers_than_iov_max(rng2048: Rig) -> None:
    """Regression: 1100 one-byte buffers made readv fail with EINVAL, which reached the
    device's internal-error path and put virtio-rng into NEEDS_RESET. (A queue of 2048: in a
    smaller one such a table is refused for its length.)"""
    rng = rng2048
    n = 1100
    rng.table(
        TABLE,
        [
            (BUF + 2 * i, 1, W | (N if i < n - 1 else 0), i + 1 if i < n - 1 else 0)
            for i in range(n)
        ],
    )
    rng.desc(0, TABLE, 16 * n, IND)
    used = rng.kick(0)
    assert used == [(0, 1024)]  # what one readv fills; the rest of the chain is left alone
    dev = rng.drv.device
    assert isinstance(dev, Rng) and not dev.needs_reset
    rng_still_serves(rng)


def test_readable_buffer_after_a_writable_one_is_rejected(rng: Rig) -> None:
    rng.desc(0, BUF, 16, W | N, 1)
    rng.desc(1, BUF + 16, 16, R)
    assert rng.fault(0) is ChainFault.READABLE_AFTER_WRITABLE
    assert rng.kick(0) == [(0, 0)]
    rng_still_serves(rng)


# -- directions: write-only is never read as data, read-only is never written --------------------
def test_device_does_not_write_buffers_marked_read_only(rng: Rig) -> None:
    rng.mem.write(BUF, b"\x11" * 64)
    rng.desc(0, BUF, 64, R)  # an rng request with no writable buffer
    assert rng.kick(0) == [(0, 0)]
    assert rng.mem.read(BUF, 64) == b"\x11" * 64
    rng_still_serves(rng)


def test_console_does_not_write_receive_buffers_marked_read_only() -> None:
    dev = Console(queue_size=SIZE, input_limit=64)
    rig = make_rig(dev)
    try:
        dev.enqueue_input(b"secret")
        rig.mem.write(BUF, b"\x11" * 32)
        rig.desc(0, BUF, 32, R)
        rig.dq.publish(0)
        with no_internal_errors():
            rig.drv.kick(0)
        assert rig.dq.get_used() == [(0, 0)]
        assert rig.mem.read(BUF, 32) == b"\x11" * 32
    finally:
        dev.reset()
        dev.close()
        rig.loop.close()
        rig.mem.close()


def test_blk_write_does_not_take_data_from_write_only_buffers(blk: Rig, disk: Path) -> None:
    before = disk.read_bytes()
    blk.mem.write(BUF, struct.pack("<IIQ", 1, 0, 0))  # T_OUT sector 0
    blk.mem.write(BUF + 0x100, b"\xee" * 512)
    blk.desc(0, BUF, 16, R | N, 1)
    blk.desc(1, BUF + 0x100, 512, W | N, 2)  # the "data" is device-writable
    blk.desc(2, BUF + 0x400, 1, W)
    assert blk.kick(0) == [(0, 1)]
    assert blk.mem.read(BUF + 0x400, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert disk.read_bytes() == before
    blk_still_serves(blk, disk)


def test_blk_read_does_not_write_read_only_buffers(blk: Rig, disk: Path) -> None:
    blk.mem.write(BUF, struct.pack("<IIQ", 0, 0, 0))  # T_IN sector 0
    blk.mem.write(BUF + 0x100, b"\x11" * 512)
    blk.desc(0, BUF, 16, R | N, 1)
    blk.desc(1, BUF + 0x100, 512, R | N, 2)  # the destination is device-readable
    blk.desc(2, BUF + 0x400, 1, W)
    assert blk.kick(0) == [(0, 1)]
    assert blk.mem.read(BUF + 0x100, 512) == b"\x11" * 512
    assert blk.mem.read(BUF + 0x400, 1) == bytes([VIRTIO_BLK_S_IOERR])
    blk_still_serves(blk, disk)


def test_blk_header_in_a_write_only_buffer_is_not_read(blk: Rig, disk: Path) -> None:
    blk.mem.write(BUF, struct.pack("<IIQ", 1, 0, 0))  # a plausible T_OUT header, but writable
    blk.desc(0, BUF, 16, W | N, 1)
    blk.desc(1, BUF + 0x100, 512, W | N, 2)
    blk.desc(2, BUF + 0x400, 1, W)
    before = disk.read_bytes()
    blk.kick(0)
    assert blk.mem.read(BUF + 0x400, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert disk.read_bytes() == before
    blk_still_serves(blk, disk)


# -- sector arithmetic --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sector",
    # the last sector (+2 runs past the end), the end, byte offsets at and past 2^64, 2^64 - 1
    [SECTORS - 1, SECTORS, 2**55 - 1, 2**55, 2**63, 2**64 - 2, 2**64 - 1],
)
@pytest.mark.parametrize("rtype", [0, 1])
def test_blk_sector_near_2_pow_64(blk: Rig, disk: Path, sector: int, rtype: int) -> None:
    before = disk.read_bytes()
    blk.mem.write(BUF, struct.pack("<IIQ", rtype, 0, sector))
    blk.mem.write(BUF + 0x100, b"\x22" * 1024)
    data_flags = W if rtype == 0 else R
    blk.desc(0, BUF, 16, R | N, 1)
    blk.desc(1, BUF + 0x100, 1024, data_flags | N, 2)  # two sectors: sector + 2 wraps 2^64
    blk.desc(2, BUF + 0x800, 1, W)
    assert blk.kick(0) == [(0, 1)]
    assert blk.mem.read(BUF + 0x800, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert blk.mem.read(BUF + 0x100, 1024) == b"\x22" * 1024
    assert disk.read_bytes() == before and disk.stat().st_size == SECTORS * 512
    blk_still_serves(blk, disk)


def test_blk_discard_segment_wrapping_2_pow_64(blk: Rig, disk: Path) -> None:
    before = disk.read_bytes()
    segment = struct.pack("<QII", 2**64 - 1, 2, 0)
    blk.mem.write(BUF, struct.pack("<IIQ", 11, 0, 0) + segment)
    blk.desc(0, BUF, 32, R | N, 1)
    blk.desc(1, BUF + 0x800, 1, W)
    assert blk.kick(0) == [(0, 1)]
    assert blk.mem.read(BUF + 0x800, 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert disk.read_bytes() == before
    blk_still_serves(blk, disk)


# -- queue reconfiguration after DRIVER_OK (virtio-pci) -----------------------------------------
def test_queue_reconfiguration_after_driver_ok_is_ignored() -> None:
    mem, mmio, _, root = make_machine(1 << 20)
    loop = EventLoop()
    dev = Rng(queue_size=16)
    io = FakeIoEvents()
    transport = VirtioPciDevice(dev, MsiRouting(FakeRoutingBackend()), mem, loop, io)
    try:
        d = LinuxLikeDriver(mmio, root.add_device(transport))
        d.probe()
        assert d.negotiate()
        dq = DriverQueue(mem, 8, 0x10000)
        off = d.setup_queue(0, 8, dq.desc_table, dq.avail_ring, dq.used_ring, None)
        assert d.enable_queue(0)
        d.add_status(STATUS_DRIVER_OK)
        assert transport.activated
        q = transport.queues[0]
        live = q.state()
        with no_internal_errors():
            # Move the rings into the hole, resize, disable, point them at the BAR: all of it
            # while the device is live.
            d.common_write(0x16, 2, 0)
            d.common_write(0x18, 2, 16)
            for reg in (0x20, 0x28, 0x30):
                d.common_write(reg, 8, 0xFFFF_F000)
                d.common_write(reg + 4, 4, 0x1)
            d.common_write(0x1C, 2, 0)
            d.common_write(0x1A, 2, 0)
        assert q.state() == live
        assert d.common_read(0x18, 2) == 8 and d.common_read(0x20, 4) == dq.desc_table
        chain = dq.add_chain(writable=[16])
        io.kick(d.notify_addr(off))
        while loop.run_once(0):
            pass
        assert dq.get_used() == [(chain.head, 16)]
        d.reset()  # after a reset the queue can be configured again
        assert not transport.queues[0].ready and transport.queues[0].desc_table == 0
    finally:
        transport.close()
        dev.close()
        loop.close()
        mem.close()


def test_queue_enable_with_rings_outside_memory_is_refused() -> None:
    mem, mmio, _, root = make_machine(1 << 20)
    loop = EventLoop()
    dev = Rng(queue_size=16)
    transport = VirtioPciDevice(dev, MsiRouting(FakeRoutingBackend()), mem, loop, FakeIoEvents())
    try:
        d = LinuxLikeDriver(mmio, root.add_device(transport))
        d.probe()
        assert d.negotiate()
        d.setup_queue(0, 8, (1 << 20) - 0x40, 0x2000, 0x3000, None)  # table runs off RAM
        assert not d.enable_queue(0)
        d.setup_queue(0, 12, 0x1000, 0x2000, 0x3000, None)  # not a power of two
        assert not d.enable_queue(0)
        assert not transport.queues[0].ready
    finally:
        transport.close()
        dev.close()
        loop.close()
        mem.close()
