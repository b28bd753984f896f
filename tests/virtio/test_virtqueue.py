"""The split virtqueue against a Python driver laying out rings in real guest memory."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import pytest

from strato.memory import GuestMemory
from strato.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    ChainError,
    ChainFault,
    ChainReader,
    ChainWriter,
    Descriptor,
    DescriptorChain,
    Queue,
    QueueError,
    guest_views,
)
from strato.virtio.testing import DriverQueue, vring_need_event

MEM_SIZE = 1 << 20
N, R, W, IND = VIRTQ_DESC_F_NEXT, 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, MEM_SIZE)])
    yield m
    m.close()


def make(mem: GuestMemory, size: int = 16, event_idx: bool = False) -> tuple[DriverQueue, Queue]:
    dq = DriverQueue(mem, size, 0x1000, buffers=(0x10000, MEM_SIZE), event_idx=event_idx)
    return dq, dq.device_queue()


# -- construction and validation ---------------------------------------------------------------
@pytest.mark.parametrize("max_size", [0, 3, 100, 65536, 1 << 16])
def test_max_size_must_be_power_of_two_up_to_32768(max_size: int) -> None:
    with pytest.raises(ValueError):
        Queue(max_size)


def test_new_queue_defaults() -> None:
    q = Queue(256)
    assert (q.size, q.ready, q.event_idx, q.next_avail, q.next_used) == (256, False, False, 0, 0)


def test_is_valid(mem: GuestMemory) -> None:
    _, q = make(mem)
    assert q.is_valid(mem)
    for size in (0, 3, 12, 32):  # not a power of two, or above max_size
        q.size = size
        assert not q.is_valid(mem)
    q.size = 8
    assert q.is_valid(mem)
    q.size = 16
    for field, bad in (("desc_table", 0x1008), ("avail_ring", 0x3001), ("used_ring", 0x3002)):
        good = getattr(q, field)
        setattr(q, field, bad)
        assert not q.is_valid(mem), field
        setattr(q, field, MEM_SIZE - 16)  # aligned, but the area runs off the end
        assert not q.is_valid(mem), field
        setattr(q, field, 1 << 40)
        assert not q.is_valid(mem), field
        setattr(q, field, good)
    assert q.is_valid(mem)


def test_is_valid_used_ring_includes_avail_event(mem: GuestMemory) -> None:
    _, q = make(mem)
    q.used_ring = MEM_SIZE - 136  # 6 + 8 * 16 = 134 bytes fit (aligned down to 4)
    assert q.is_valid(mem)
    q.used_ring = MEM_SIZE - 132  # the avail_event word would be past the end
    assert not q.is_valid(mem)


def test_areas_must_not_cross_a_region_gap() -> None:
    m = GuestMemory.anonymous([(0, 0x10000), (0x20000, 0x10000)])
    try:
        q = Queue(16)
        q.desc_table, q.avail_ring, q.used_ring = 0x10000 - 0x80, 0x100, 0x200
        assert not q.is_valid(m)
        q.desc_table = 0x20000
        assert q.is_valid(m)
    finally:
        m.close()


def test_pop_on_invalid_queue_is_queue_error(mem: GuestMemory) -> None:
    _, q = make(mem)
    q.used_ring = MEM_SIZE + 0x1000
    with pytest.raises(QueueError):
        q.pop(mem)


def test_pop_on_queue_not_ready_returns_none(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.add_chain([b"x"])
    q.ready = False
    assert q.pop(mem) is None


def test_reset_and_state_round_trip(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    dq.add_chain([b"abc"])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 0)
    state = json.loads(json.dumps(q.state()))
    q2 = Queue(16)
    q2.restore(state)
    assert q2.state() == q.state()
    with pytest.raises(ValueError):
        Queue(32).restore(state)
    q.reset()
    assert q.state() == Queue(16).state()


# -- the avail ring ----------------------------------------------------------------------------
def test_pop_returns_chains_in_order(mem: GuestMemory) -> None:
    dq, q = make(mem)
    chains = [dq.add_chain([bytes([i]) * (i + 1)], [8]) for i in range(5)]
    for dc in chains:
        c = q.pop(mem)
        assert c is not None and c.head_index == dc.head
        assert c.readable() == dc.readable and c.writable() == dc.writable
    assert q.pop(mem) is None


def test_avail_idx_too_far_ahead_is_queue_error(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.set_avail_idx(17)
    with pytest.raises(QueueError):
        q.pop(mem)
    dq.set_avail_idx(16)  # a full ring is fine (entries are zeros: head 0)
    assert q.pop(mem) is not None


def test_avail_entry_out_of_range_is_queue_error(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.write_avail_entry(0, 16)
    dq.set_avail_idx(1)
    with pytest.raises(QueueError):
        q.pop(mem)


def test_indices_wrap_around_65536(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    # Start both sides near the wrap point.
    q.next_avail = q.next_used = 0xFFFE
    dq.avail_shadow = dq.last_used = 0xFFFE
    mem.write_u16(dq.used_ring + 2, 0xFFFE)
    for i in range(6):
        dc = dq.add_chain([bytes([i])])
        c = q.pop(mem)
        assert c is not None and c.head_index == dc.head
        q.add_used(mem, c.head_index, i)
        assert dq.get_used() == [(dc.head, i)]
    assert q.next_avail == q.next_used == 4


def test_undo_pop(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dc = dq.add_chain([b"a"])
    c = q.pop(mem)
    assert c is not None
    q.undo_pop()
    c2 = q.pop(mem)
    assert c2 is not None and c2.head_index == dc.head


def test_pending(mem: GuestMemory) -> None:
    dq, q = make(mem)
    assert q.pending(mem) == 0
    dq.add_chain([b"a"])
    dq.add_chain([b"b"])
    assert q.pending(mem) == 2
    dq.set_avail_idx(40)
    with pytest.raises(QueueError):
        q.pending(mem)


# -- chains ------------------------------------------------------------------------------------
def test_chain_views_and_reader_writer(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.add_chain([b"hello ", b"world"], [3, 5])
    c = q.pop(mem)
    assert c is not None
    assert [bytes(v) for v in c.readable_views()] == [b"hello ", b"world"]
    assert c.readable_len == 11 and c.writable_len == 8
    r = c.reader()
    assert r.read(3) == b"hel" and r.read(5) == b"lo wo" and r.remaining == 3
    with pytest.raises(ChainError) as info:
        r.read(4)
    assert info.value.fault is ChainFault.TOO_SHORT
    w = c.writer()
    w.write(b"ABCDEFG")
    assert w.remaining == 1
    (a1, _), (a2, _) = c.writable()
    assert mem.read(a1, 3) == b"ABC" and mem.read(a2, 5) == b"DEFG\0"
    with pytest.raises(ChainError) as info:
        w.write(b"xy")
    assert info.value.fault is ChainFault.TOO_SHORT


def test_descriptor_iteration(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dc = dq.add_chain([b"ab"], [4])
    c = q.pop(mem)
    assert c is not None
    descs = list(c)
    assert len(c) == 2
    assert descs[0] == Descriptor(dc.readable[0][0], 2, N)
    assert descs[1] == Descriptor(dc.writable[0][0], 4, W) and descs[1].is_write_only


def test_indirect_chain(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dc = dq.add_chain([b"head", b"more"], [16], indirect=True)
    assert dc.indirect_table is not None
    c = q.pop(mem)
    assert c is not None
    assert c.readable() == dc.readable and c.writable() == dc.writable
    assert c.reader().read(8) == b"headmore"


def test_direct_descriptors_then_indirect_table(mem: GuestMemory) -> None:
    dq, q = make(mem)
    table = dq.alloc(32)
    a, b, d = dq.alloc(4), dq.alloc(4), dq.alloc(4)
    mem.write(table, struct.pack("<QIHH", b, 4, N, 1) + struct.pack("<QIHH", d, 4, W, 0))
    dq.write_desc(0, a, 4, N, 1)
    dq.write_desc(1, table, 32, IND)
    dq.publish(0)
    c = q.pop(mem)
    assert c is not None
    assert c.readable() == [(a, 4), (b, 4)] and c.writable() == [(d, 4)]


def _raw_chain(
    dq: DriverQueue, q: Queue, descs: list[tuple[int, int, int, int]], fault: ChainFault
) -> ChainError:
    """Lay out `descs` from index 0, pop the chain and check it is refused for `fault`."""
    mem = dq.mem
    for i, d in enumerate(descs):
        dq.write_desc(i, *d)
    dq.publish(0)
    c = q.pop(mem)
    assert c is not None
    with pytest.raises(ChainError) as info:
        c.readable_views()
        c.writable_views()
    assert info.value.fault is fault, f"refused for {info.value.fault}, not {fault}: {info.value}"
    return info.value


def test_loop_is_an_error(mem: GuestMemory) -> None:
    dq, q = make(mem)
    err = _raw_chain(dq, q, [(0x20000, 4, N, 1), (0x20000, 4, N, 0)], ChainFault.TOO_LONG)
    assert "loop" in str(err)


def test_self_loop_is_an_error(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [(0x20000, 4, N, 0)], ChainFault.TOO_LONG)


def test_chain_as_long_as_the_queue_is_fine(mem: GuestMemory) -> None:
    dq, q = make(mem, size=8)
    for i in range(8):
        dq.write_desc(i, 0x20000 + i, 1, N if i < 7 else 0, i + 1)
    dq.publish(0)
    c = q.pop(mem)
    assert c is not None and len(c) == 8


def test_next_out_of_range(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [(0x20000, 4, N, 16)], ChainFault.NEXT_OUT_OF_RANGE)


def test_readable_after_writable(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(
        dq, q, [(0x20000, 4, W | N, 1), (0x20010, 4, R, 0)], ChainFault.READABLE_AFTER_WRITABLE
    )


def test_address_overflow(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [((1 << 64) - 2, 4, R, 0)], ChainFault.ADDRESS_OVERFLOW)


def test_chain_longer_than_4gib(mem: GuestMemory) -> None:
    dq, q = make(mem)
    err = _raw_chain(dq, q, [(0, 0xFFFFFFFF, N, 1), (0, 2, 0, 0)], ChainFault.TOO_MANY_BYTES)
    assert "2^32" in str(err)


def test_buffer_outside_memory(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [(MEM_SIZE - 2, 4, R, 0)], ChainFault.BUFFER_OUT_OF_MEMORY)
    dq2, q2 = make(mem)
    _raw_chain(dq2, q2, [(1 << 40, 1, W, 0)], ChainFault.BUFFER_OUT_OF_MEMORY)


@pytest.mark.parametrize(
    "length",
    [0, 8, 17],  # zero, not a multiple of 16
)
def test_bad_indirect_length(mem: GuestMemory, length: int) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [(0x20000, length, IND, 0)], ChainFault.INDIRECT_BAD_LENGTH)


def test_indirect_with_next(mem: GuestMemory) -> None:
    dq, q = make(mem)
    mem.write(0x20000, struct.pack("<QIHH", 0x30000, 4, 0, 0))
    _raw_chain(
        dq, q, [(0x20000, 16, IND | N, 1), (0x30000, 4, 0, 0)], ChainFault.INDIRECT_WITH_NEXT
    )


def test_indirect_table_outside_memory(mem: GuestMemory) -> None:
    dq, q = make(mem)
    _raw_chain(dq, q, [(MEM_SIZE - 16, 32, IND, 0)], ChainFault.INDIRECT_OUT_OF_MEMORY)


def test_nested_indirect(mem: GuestMemory) -> None:
    dq, q = make(mem)
    mem.write(0x20100, struct.pack("<QIHH", 0x30000, 4, W, 0))
    mem.write(0x20000, struct.pack("<QIHH", 0x20100, 16, IND, 0))  # a table naming a table
    _raw_chain(dq, q, [(0x20000, 16, IND, 0)], ChainFault.NESTED_INDIRECT)


def test_indirect_next_beyond_table(mem: GuestMemory) -> None:
    dq, q = make(mem)
    # Two entries; the second says NEXT=2 which is past len/16.
    mem.write(
        0x20000, struct.pack("<QIHH", 0x30000, 4, N, 1) + struct.pack("<QIHH", 0x30010, 4, N, 2)
    )
    _raw_chain(dq, q, [(0x20000, 32, IND, 0)], ChainFault.NEXT_OUT_OF_RANGE)


def test_indirect_loop(mem: GuestMemory) -> None:
    dq, q = make(mem)
    mem.write(
        0x20000, struct.pack("<QIHH", 0x30000, 4, N, 1) + struct.pack("<QIHH", 0x30010, 4, N, 0)
    )
    _raw_chain(dq, q, [(0x20000, 32, IND, 0)], ChainFault.TOO_LONG)


def test_indirect_table_as_long_as_the_queue_is_fine(mem: GuestMemory) -> None:
    dq, q = make(mem, size=16)
    entries = b"".join(
        struct.pack("<QIHH", 0x30000 + i, 1, N if i < 15 else 0, i + 1) for i in range(16)
    )
    mem.write(0x20000, entries)
    dq.write_desc(0, 0x20000, 16 * 16, IND)
    dq.publish(0)
    c = q.pop(mem)
    assert c is not None and len(c) == 16 and c.cost == 16


def test_indirect_table_longer_than_the_queue(mem: GuestMemory) -> None:
    # 17 entries for a queue of 16 (virtio 1.2, 2.7.5.3.1): refused before the table is read,
    # so a table declared megabytes long costs nothing.
    dq, q = make(mem, size=16)
    _raw_chain(dq, q, [(0x20000, 17 * 16, IND, 0)], ChainFault.INDIRECT_TOO_LARGE)
    dq2, q2 = make(mem, size=16)
    mem.write(0x20000, struct.pack("<QIHH", 0x30000, 4, N, 0))  # a self-loop at entry 0
    _raw_chain(dq2, q2, [(0x20000, 16 << 20, IND, 0)], ChainFault.INDIRECT_TOO_LARGE)


def test_direct_and_indirect_buffers_share_the_queue_size(mem: GuestMemory) -> None:
    dq, q = make(mem, size=16)
    entries = b"".join(
        struct.pack("<QIHH", 0x30000 + i, 1, N if i < 15 else 0, i + 1) for i in range(16)
    )
    mem.write(0x20000, entries)
    # One direct buffer + a full table: 17 buffers in a queue of 16.
    _raw_chain(dq, q, [(0x40000, 1, N, 1), (0x20000, 16 * 16, IND, 0)], ChainFault.TOO_LONG)


def test_head_index_past_the_queue(mem: GuestMemory) -> None:
    dq, _ = make(mem, size=16)
    c = DescriptorChain(mem, mem.view(dq.desc_table, 16 * 16), 16, 16)
    with pytest.raises(ChainError) as info:
        c.readable_views()
    assert info.value.fault is ChainFault.HEAD_OUT_OF_RANGE


def test_a_bad_chain_does_not_stop_the_queue(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.write_desc(15, 0x20000, 4, N, 15)  # self loop (the driver allocates from 0 up)
    dq.publish(15)
    good = dq.add_chain([b"ok"])
    bad = q.pop(mem)
    assert bad is not None
    with pytest.raises(ChainError) as info:
        bad.readable()
    assert info.value.fault is ChainFault.TOO_LONG
    q.add_used(mem, bad.head_index, 0)
    c = q.pop(mem)
    assert c is not None and c.head_index == good.head and c.reader().read(2) == b"ok"


def test_zero_length_descriptor_is_allowed_and_has_no_view(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.add_chain([(0x20000, 0), b"x"])
    c = q.pop(mem)
    assert c is not None
    assert [bytes(v) for v in c.readable_views()] == [b"x"]


def test_guest_views_split_at_adjacent_regions() -> None:
    m = GuestMemory.anonymous([(0, 0x1000), (0x1000, 0x1000), (0x3000, 0x1000)])
    try:
        m.write(0xFFE, b"ab")
        m.write(0x1000, b"cd")
        views = guest_views(m, 0xFFE, 4)
        assert [bytes(v) for v in views] == [b"ab", b"cd"]
        with pytest.raises(ChainError) as info:
            guest_views(m, 0x1FFE, 4)  # runs into the hole at 0x2000
        assert info.value.fault is ChainFault.BUFFER_OUT_OF_MEMORY
        assert guest_views(m, 0x3000, 0) == []
    finally:
        m.close()


def test_cursor_take_splits_views() -> None:
    a, b = bytearray(b"0123"), bytearray(b"4567")
    r = ChainReader([memoryview(a), memoryview(b)])
    assert [bytes(v) for v in r.take(3)] == [b"012"]
    assert [bytes(v) for v in r.take(3)] == [b"3", b"45"]
    assert [bytes(v) for v in r.take_all()] == [b"67"]
    w = ChainWriter([memoryview(a), memoryview(b)])
    w.write(b"ABCDEF")
    assert (a, b) == (bytearray(b"ABCD"), bytearray(b"EF67"))


# -- the used ring -----------------------------------------------------------------------------
def test_add_used_writes_element_and_index(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dc = dq.add_chain([b"x"], [10])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 7)
    assert dq.used_idx == 1 and dq.used_entry(0) == (dc.head, 7)
    with pytest.raises(QueueError):
        q.add_used(mem, 16, 0)
    assert dq.used_idx == 1


def test_used_descriptors_are_reusable_by_the_driver(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    for round_ in range(10):
        heads = [dq.add_chain([bytes([round_])]).head for _ in range(4)]
        assert dq.free_descriptors == 0
        while (c := q.pop(mem)) is not None:
            q.add_used(mem, c.head_index, 0)
        assert [h for h, _ in dq.get_used()] == heads
        dq.reset_buffers()


# -- notifications -----------------------------------------------------------------------------
def test_needs_notification_without_event_idx(mem: GuestMemory) -> None:
    dq, q = make(mem)
    assert not q.needs_notification(mem)  # nothing added
    dq.add_chain([b"a"])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 0)
    assert q.needs_notification(mem)
    assert not q.needs_notification(mem)  # nothing new since
    dq.set_no_interrupt(True)
    dq.add_chain([b"b"])
    c = q.pop(mem)
    assert c is not None
    q.add_used(mem, c.head_index, 0)
    assert not q.needs_notification(mem)


def test_needs_notification_event_idx_matches_vring_need_event(mem: GuestMemory) -> None:
    _, q = make(mem, event_idx=True)
    avail = q.avail_ring
    for used_event in (0, 4, 8, 15, 0xFFFC, 0xFFFF):
        mem.write_u16(avail + 4 + 2 * 16, used_event)
        for start in (0, 3, 4, 5, 0xFFFB, 0xFFFE, 0xFFFF):
            for added in (1, 2, 5):
                q.next_used = (start + added) & 0xFFFF
                q.num_added = added
                expect = vring_need_event(used_event, q.next_used, start)
                assert q.needs_notification(mem) == expect, (used_event, start, added)


def test_event_idx_interrupt_exactly_when_crossing_used_event(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    dq.set_used_event(2)  # "interrupt me once used idx passes 2", i.e. reaches 3
    raised = []
    for _ in range(6):
        dq.add_chain([b"x"])
        c = q.pop(mem)
        assert c is not None
        q.add_used(mem, c.head_index, 0)
        raised.append(q.needs_notification(mem))
        dq.get_used()
        dq.reset_buffers()
    assert raised == [False, False, True, False, False, False]


def test_enable_disable_notification_flags(mem: GuestMemory) -> None:
    dq, q = make(mem)
    q.disable_notification(mem)
    assert dq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert not dq.kick_needed(0, 1)
    assert q.enable_notification(mem) is False
    assert dq.used_flags == 0 and dq.kick_needed(0, 1)
    dq.add_chain([b"a"])
    assert q.enable_notification(mem) is True  # something arrived: process before sleeping


def test_enable_notification_event_idx_writes_avail_event(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    for _ in range(3):
        dq.add_chain([b"a"])
    q.disable_notification(mem)
    assert dq.used_flags == 0  # EVENT_IDX: the flag is not used
    assert q.enable_notification(mem) is True
    assert dq.avail_event == 0
    while (c := q.pop(mem)) is not None:
        q.add_used(mem, c.head_index, 0)
    assert q.enable_notification(mem) is False
    assert dq.avail_event == 3
    old = dq.avail_shadow
    dq.add_chain([b"b"])
    assert dq.kick_needed(old, dq.avail_shadow)  # idx 3 -> 4 crosses avail_event 3
    old = dq.avail_shadow
    dq.add_chain([b"c"])
    assert not dq.kick_needed(old, dq.avail_shadow)  # the device has not caught up: no kick
