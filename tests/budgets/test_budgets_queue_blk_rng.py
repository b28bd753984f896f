"""Host cost of adversarial requests to the virtqueue, virtio-blk and virtio-rng (issue 10).

Each test runs one hostile request shape in a child (tests/budgets/harness.py) and checks that
the host's peak RSS growth and the longest loop turn stay within ACCEPTANCE (64 MiB, 100 ms),
and that the device answered the way its rules say (refused, failed or served). Buffers alias
one 16 MiB guest region, so a request names up to 2^32 bytes of a 64 MiB guest.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.devices.backends.raw import RawFile
from strato.devices.virtio.base import IOV_MAX
from strato.devices.virtio.block import (
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
)
from strato.devices.virtio.rng import MAX_REQUEST, Rng
from strato.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from strato.virtio.testing import DriverQueue
from tests.budgets.harness import ACCEPTANCE, Budget, MiB, Rig, assert_within, run_measured

N, R, W, IND = VIRTQ_DESC_F_NEXT, 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT
_DESC = struct.Struct("<QIHH")
SIZE = 256  # queue size
ALIAS, ALIAS_LEN = 32 * MiB, 16 * MiB  # every data buffer names this one guest region
HEADER, STATUS, TABLE = 0x200000, 0x200100, 0x300000  # guest addresses of the small pieces
DATA_BUFFERS = SIZE - 2  # header + data + status = a full chain
CHAIN_BYTES = DATA_BUFFERS * ALIAS_LEN  # 4064 MiB: just under 2^32 with the header
# A queue of the largest size (32768): one chain alone is 32768 descriptors of parsing.
LARGEST_QUEUE = Budget(rss_bytes=ACCEPTANCE.rss_bytes, turn_seconds=0.250)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A sparse image big enough for the largest request (no blocks are allocated)."""
    p = tmp_path / "sparse.raw"
    with open(p, "wb") as f:
        f.truncate(CHAIN_BYTES + 4 * MiB)
    yield p


def _direct_supported(path: Path) -> bool:
    try:
        RawFile(str(path), direct=True).close()
    except OSError:
        return False
    return True


def fill_slots(dq: DriverQueue, head: int, count: int = SIZE) -> None:
    """Make `count` chains available, every avail slot naming the same head."""
    for slot in range(count):
        dq.write_avail_entry(slot, head)
    dq.set_avail_idx(count)


def write_table(rig: Rig, at: int, entries: list[tuple[int, int, int]]) -> int:
    """An indirect table of (addr, len, flags) linked in order; returns its byte length."""
    raw = b"".join(
        _DESC.pack(a, n, f | (N if i < len(entries) - 1 else 0), i + 1)
        for i, (a, n, f) in enumerate(entries)
    )
    rig.mem.write(at, raw)
    return len(raw)


def blk_entries(
    rig: Rig, rtype: int, data_flags: int, data: list[tuple[int, int]]
) -> list[tuple[int, int, int]]:
    rig.mem.write(HEADER, struct.pack("<IIQ", rtype, 0, 0))
    rig.mem.write_u8(STATUS, 0xFF)
    return [(HEADER, 16, R), *((a, n, data_flags) for a, n in data), (STATUS, 1, W)]


def used_lengths(dq: DriverQueue) -> list[int]:
    return [n for _, n in dq.get_used()]


# -- the virtqueue: chain shapes ---------------------------------------------------------------
def test_self_looping_indirect_table_declared_16mib_in_every_slot(disk: Path) -> None:
    """Review item 1: a 16 MiB table whose entry 0 loops to itself, named by all 256 slots."""

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        rig.mem.write(TABLE, _DESC.pack(ALIAS, 1, N, 0))  # 1 byte: the 2^32 limit never ends it
        dq.write_desc(0, TABLE, 16 * MiB, IND)
        fill_slots(dq, 0)
        rig.kick(dev, 0)
        return used_lengths(dq), dev.needs_reset

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "indirect self-loop, 16 MiB table, every slot")
    assert m.result == ([0] * SIZE, False)  # every chain refused, the queue goes on


def test_self_looping_direct_chains_in_every_slot(disk: Path) -> None:
    """A loop through every descriptor of the ring: each chain visits `size`, 256 chains."""

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        for i in range(SIZE):
            dq.write_desc(i, ALIAS, 1, N, (i + 1) % SIZE)
        fill_slots(dq, 0)
        rig.kick(dev, 0)
        return used_lengths(dq)

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "direct loop over the whole ring, every slot")
    assert m.result == [0] * SIZE
    assert m.turns > 2  # the work was split over loop turns (TURN_DESCRIPTORS)


@pytest.mark.parametrize("entries", [SIZE, SIZE + 1])
def test_maximal_indirect_table_and_one_over(disk: Path, entries: int) -> None:
    """A full table of aliased 16 MiB buffers (2^32 bytes) in every slot, and one entry more
    (refused: virtio 1.2, 2.7.5.3.1). The data is written past the disk's end: refused after
    parsing, so this measures the chain, not the disk."""

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        data = [(ALIAS, ALIAS_LEN)] * (entries - 2)
        rig.mem.write(HEADER + 16, b"")
        length = write_table(rig, TABLE, blk_entries(rig, VIRTIO_BLK_T_OUT, R, data))
        rig.mem.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1 << 40))
        dq.write_desc(0, TABLE, length, IND)
        fill_slots(dq, 0)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, f"indirect table of {entries} aliased 16 MiB buffers")
    if entries == SIZE:
        assert m.result == ([1] * SIZE, VIRTIO_BLK_S_IOERR)  # parsed, then failed: past the end
    else:
        assert m.result == ([0] * SIZE, 0xFF)  # refused unparsed: status untouched


# -- virtio-blk: data -------------------------------------------------------------------------
def test_read_of_2_32_bytes_into_aliased_buffers(disk: Path) -> None:
    """4064 MiB read from the (sparse, O_DIRECT) image into one aliased region: moved a
    TURN_BYTES piece per loop turn."""
    if not _direct_supported(disk):
        pytest.skip("O_DIRECT not supported here (a buffered read would fill the page cache)")

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk), direct=True), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        entries = blk_entries(rig, VIRTIO_BLK_T_IN, W, [(ALIAS, ALIAS_LEN)] * DATA_BUFFERS)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario, timeout=300)
    assert_within(m, ACCEPTANCE, "2^32-byte read into aliased buffers")
    assert m.result == ([CHAIN_BYTES + 1], VIRTIO_BLK_S_OK)


def test_unaligned_direct_read_of_the_largest_size(disk: Path) -> None:
    """Review item 4: unaligned buffers on an O_DIRECT disk go through the bounce buffer, which
    is BOUNCE_SIZE whatever the request (was: as large as the request, kept for good)."""
    if not _direct_supported(disk):
        pytest.skip("O_DIRECT not supported here")

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk), direct=True), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        data = [(ALIAS + 1, ALIAS_LEN)] * DATA_BUFFERS  # off by one byte: not 512-aligned
        entries = blk_entries(rig, VIRTIO_BLK_T_IN, W, data)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario, timeout=300)
    assert_within(m, ACCEPTANCE, "unaligned O_DIRECT read of 4064 MiB")
    assert m.result == ([CHAIN_BYTES + 1], VIRTIO_BLK_S_OK)


def test_unaligned_direct_write(disk: Path) -> None:
    """128 MiB written from unaligned aliased buffers (a write allocates disk blocks, so not
    2^32 of them): the bounce buffer stays BOUNCE_SIZE."""
    if not _direct_supported(disk):
        pytest.skip("O_DIRECT not supported here")

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk), direct=True), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        entries = blk_entries(rig, VIRTIO_BLK_T_OUT, R, [(ALIAS + 1, ALIAS_LEN)] * 8)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario, timeout=300)
    assert_within(m, ACCEPTANCE, "unaligned O_DIRECT write of 128 MiB")
    assert m.result == ([1], VIRTIO_BLK_S_OK)


def test_iov_max_plus_one_buffers(disk: Path) -> None:
    """IOV_MAX + 1 data buffers in one request: served (preadv in pieces), within budget."""

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=2048)
        dq = rig.driver(dev)[0]
        rig.mem.write(ALIAS, os.urandom(512))
        entries = blk_entries(rig, VIRTIO_BLK_T_OUT, R, [(ALIAS, 512)] * (IOV_MAX + 1))
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        rig.mem.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8))
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        with open(disk, "rb") as f:
            f.seek(8 * 512)
            same = f.read(512 * (IOV_MAX + 1)) == rig.mem.read(ALIAS, 512) * (IOV_MAX + 1)
        return used_lengths(dq), rig.mem.read_u8(STATUS), same

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "IOV_MAX + 1 buffers")
    assert m.result == ([1], VIRTIO_BLK_S_OK, True)


@pytest.mark.parametrize("rtype", [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES])
def test_discard_with_a_huge_aliased_payload_in_every_slot(disk: Path, rtype: int) -> None:
    """Review item 2: a 4064 MiB segment list, aliased, 256 times: refused by its size, never
    copied (was: joined into one bytes object first)."""

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        entries = blk_entries(rig, rtype, R, [(ALIAS, ALIAS_LEN)] * DATA_BUFFERS)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "discard/write-zeroes with a 4064 MiB payload, every slot")
    assert m.result == ([1] * SIZE, VIRTIO_BLK_S_IOERR)


# -- virtio-rng ------------------------------------------------------------------------------
def test_rng_chain_of_2_32_bytes_in_every_slot() -> None:
    def scenario(rig: Rig) -> object:
        dev = Rng(queue_size=SIZE)
        dq = rig.driver(dev)[0]
        entries = [(ALIAS, ALIAS_LEN, W)] * SIZE  # 4 GiB: one byte over 2^32 is refused
        entries[-1] = (ALIAS, ALIAS_LEN - 1, W)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0)
        rig.kick(dev, 0)
        return used_lengths(dq)

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "rng: 2^32-byte aliased chain, every slot")
    assert m.result == [MAX_REQUEST] * SIZE


def test_rng_iov_max_plus_one_buffers() -> None:
    def scenario(rig: Rig) -> object:
        dev = Rng(queue_size=2048)
        dq = rig.driver(dev)[0]
        entries = [(ALIAS, 1, W)] * (IOV_MAX + 1)
        dq.write_desc(0, TABLE, write_table(rig, TABLE, entries), IND)
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        return used_lengths(dq)

    m = run_measured(scenario)
    assert_within(m, ACCEPTANCE, "rng: IOV_MAX + 1 buffers")
    assert m.result == [IOV_MAX]


def test_rng_source_without_entropy_does_not_hold_the_loop(tmp_path: Path) -> None:
    """A FIFO nobody writes to: the kick returns at once, the chain waits for entropy."""
    fifo = tmp_path / "entropy"
    os.mkfifo(fifo)

    def scenario(rig: Rig) -> object:
        writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # a writer that has written nothing
        dev = Rng(str(fifo), queue_size=SIZE)
        dq = rig.driver(dev)[0]
        dq.write_desc(0, ALIAS, 64, W)
        fill_slots(dq, 0, 1)
        rig.kick(dev, 0)
        before = used_lengths(dq)
        os.write(writer, b"x" * 64)
        rig.settle()
        return before, used_lengths(dq), rig.mem.read(ALIAS, 64)

    m = run_measured(scenario, timeout=30)
    assert_within(m, ACCEPTANCE, "rng: starved source")
    assert m.result == ([], [64], b"x" * 64)


def test_largest_queue_full_indirect_table(disk: Path) -> None:
    """The worst chain there can be: a queue of 32768 and a full table of 32768 aliased
    buffers (parsed, then failed). One such chain is the per-turn worst case: ~9 MiB and
    32768 descriptors of parsing, 1-3 us each, so its bound is LARGEST_QUEUE, not ACCEPTANCE
    (which holds at the default queue sizes, 128 and 256)."""
    n = 32768

    def scenario(rig: Rig) -> object:
        dev = Block(RawFile(str(disk)), queue_size=n)
        dq = rig.driver(dev, rings_base=0x100000, ring_stride=0x100000, buffers_base=0x400000)[0]
        data = [(ALIAS, 512)] * (n - 2)
        entries = blk_entries(rig, VIRTIO_BLK_T_OUT, R, data)
        rig.mem.write(HEADER, struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 1 << 40))
        dq.write_desc(0, 0x3000000, write_table(rig, 0x3000000, entries), IND)
        fill_slots(dq, 0, 4)
        rig.kick(dev, 0)
        return used_lengths(dq), rig.mem.read_u8(STATUS)

    m = run_measured(scenario)
    assert_within(m, LARGEST_QUEUE, "queue of 32768, full indirect table, 4 slots")
    assert m.result == ([1] * 4, VIRTIO_BLK_S_IOERR)
    assert m.turns >= 4  # one such chain fills a turn's budget
