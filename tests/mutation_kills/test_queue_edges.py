"""The split virtqueue at its edges, with a Python driver in real guest memory: each check
that a hostile driver can reach, asserted by the specific error it raises (or by the exact
value at a boundary), so that dropping or loosening a check fails here."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from strato.memory import GuestMemory
from strato.virtio.queue import (
    MAX_QUEUE_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    ChainError,
    ChainReader,
    ChainWriter,
    Descriptor,
    DescriptorChain,
    Queue,
    QueueError,
    guest_views,
)
from strato.virtio.testing import DriverQueue

MEM_SIZE = 1 << 20
DESC = struct.Struct("<QIHH")  # a descriptor as the driver writes it: addr, len, flags, next
BUF = 0x20000
N, R, W, IND = VIRTQ_DESC_F_NEXT, 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, MEM_SIZE)])
    yield m
    m.close()


def make(mem: GuestMemory, size: int = 16, event_idx: bool = False) -> tuple[DriverQueue, Queue]:
    dq = DriverQueue(mem, size, 0x1000, buffers=(0x10000, MEM_SIZE), event_idx=event_idx)
    return dq, dq.device_queue()


def chain_of(dq: DriverQueue, q: Queue, descs: list[tuple[int, int, int, int]]) -> DescriptorChain:
    """Write raw descriptors 0.. and make descriptor 0 available; the popped chain."""
    for i, d in enumerate(descs):
        dq.write_desc(i, *d)
    dq.publish(0)
    c = q.pop(dq.mem)
    assert c is not None and c.head_index == 0
    return c


def chain_error(c: DescriptorChain) -> str:
    with pytest.raises(ChainError) as e:
        c.descriptors  # noqa: B018 (parsing is the point)
    return str(e.value)


# -- the address overflow check ---------------------------------------------------------------
def test_a_buffer_that_wraps_past_2_to_64_is_a_malformed_chain(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [((1 << 64) - 2, 4, R, 0)])
    assert chain_error(c) == "buffer 0xfffffffffffffffe+0x4 overflows"
    with pytest.raises(ChainError, match="overflows"):
        len(c)
    with pytest.raises(ChainError, match="overflows"):
        c.readable()


def test_a_wrapping_buffer_after_a_good_one_is_still_refused(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(BUF, 16, N, 1), ((1 << 64) - 1, 2, W, 0)])
    assert chain_error(c) == "buffer 0xffffffffffffffff+0x2 overflows"


def test_a_buffer_ending_exactly_at_2_to_64_parses_but_is_not_memory(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [((1 << 64) - 4, 4, R, 0)])
    assert c.descriptors == [Descriptor((1 << 64) - 4, 4, 0)]
    with pytest.raises(ChainError, match="is not in guest memory"):
        c.readable_views()


def test_a_wrapping_buffer_in_an_indirect_table_is_refused(mem: GuestMemory) -> None:
    dq, q = make(mem)
    table = 0x30000
    mem.write(table, DESC.pack((1 << 64) - 8, 16, R, 0))
    c = chain_of(dq, q, [(table, 16, IND, 0)])
    assert chain_error(c) == "buffer 0xfffffffffffffff8+0x10 overflows"


# -- chain length and shape --------------------------------------------------------------------
def test_a_chain_of_exactly_2_to_32_bytes_is_fine_one_more_is_not(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(0, 0xFFFFFFFF, N, 1), (0, 1, 0, 0)])
    assert c.readable_len == 1 << 32
    dq2, q2 = make(mem)
    c2 = chain_of(dq2, q2, [(0, 0xFFFFFFFF, N, 1), (0, 2, 0, 0)])
    assert chain_error(c2) == "chain longer than 2^32 bytes"


def test_a_head_beyond_the_table_is_refused_by_the_chain() -> None:
    m = GuestMemory.anonymous([(0, 0x10000)])
    try:
        c = DescriptorChain(m, m.view(0, 16 * 4), 4, 4)
        assert chain_error(c) == "head index 4 >= queue size 4"
        assert c.head_index == 4 and repr(c) == "DescriptorChain(head=4)"
    finally:
        m.close()


def test_next_index_at_the_table_size_is_refused(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    c = chain_of(dq, q, [(BUF, 4, N, 4)])
    assert chain_error(c) == "next index 4 >= table size 4"
    dq2, q2 = make(mem, size=4)
    c2 = chain_of(dq2, q2, [(BUF, 4, N, 3), (0, 0, 0, 0), (0, 0, 0, 0), (BUF + 4, 4, W, 0)])
    assert c2.readable() == [(BUF, 4)] and c2.writable() == [(BUF + 4, 4)]


def test_a_loop_is_refused_after_size_descriptors(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    c = chain_of(dq, q, [(BUF, 1, N, 1), (BUF, 1, N, 2), (BUF, 1, N, 3), (BUF, 1, N, 0)])
    assert chain_error(c).endswith("(a loop?)")


def test_readable_after_writable_is_refused(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(BUF, 4, W | N, 1), (BUF + 4, 4, R, 0)])
    assert chain_error(c) == "device-readable descriptor after a device-writable one"


@pytest.mark.parametrize(
    ("length", "message"),
    [
        (0, "indirect table length 0 not a multiple of 16"),
        (8, "indirect table length 8 not a multiple of 16"),
        (24, "indirect table length 24 not a multiple of 16"),
    ],
)
def test_indirect_table_lengths(mem: GuestMemory, length: int, message: str) -> None:
    dq, q = make(mem)
    assert chain_error(chain_of(dq, q, [(0x30000, length, IND, 0)])) == message


def test_indirect_with_next_and_nested_indirect(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(0x30000, 16, IND | N, 1), (BUF, 4, R, 0)])
    assert chain_error(c) == "descriptor has both INDIRECT and NEXT"
    table = 0x30000
    mem.write(table, DESC.pack(0x31000, 16, IND, 0))
    dq2, q2 = make(mem)
    assert chain_error(chain_of(dq2, q2, [(table, 16, IND, 0)])) == (
        "indirect descriptor inside an indirect table"
    )


def test_indirect_table_outside_memory(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(MEM_SIZE - 16, 32, IND, 0)])
    assert chain_error(c).startswith("indirect table not in guest memory: ")


def test_an_indirect_table_of_one_descriptor_loops_no_further(mem: GuestMemory) -> None:
    dq, q = make(mem)
    table = 0x30000
    # One entry whose NEXT points at itself: the table's own size bounds the walk.
    mem.write(table, DESC.pack(BUF, 4, N, 0))
    c = chain_of(dq, q, [(table, 16, IND, 0)])
    assert chain_error(c).endswith("(a loop?)")


def test_indirect_chain_views_and_flags(mem: GuestMemory) -> None:
    dq, q = make(mem)
    ch = dq.add_chain([b"abcd"], [8], indirect=True)
    c = q.pop(mem)
    assert c is not None and c.head_index == ch.head
    assert [d.is_write_only for d in c] == [False, True]
    assert (c.readable_len, c.writable_len) == (4, 8)
    assert c.reader().read(4) == b"abcd"
    c.writer().write(b"12345678")
    assert bytes(c.writable_views()[0]) == b"12345678"


# -- buffers and cursors -----------------------------------------------------------------------
def test_guest_views_edges() -> None:
    m = GuestMemory.anonymous([(0, 0x1000), (0x1000, 0x1000), (0x4000, 0x1000)])
    try:
        assert guest_views(m, 0x5000, 0) == []
        views = guest_views(m, 0xFFE, 4)  # across the seam of two adjacent regions
        assert [len(v) for v in views] == [2, 2]
        assert len(guest_views(m, 0x4000, 0x1000)) == 1  # a whole region, to its last byte
        with pytest.raises(ChainError, match=r"^buffer \[0x5000, 0x5001\) is not in guest memory$"):
            guest_views(m, 0x4000, 0x1001)
        with pytest.raises(ChainError, match=r"^buffer \[0x2000, 0x2004\) is not in guest memory$"):
            guest_views(m, 0x1FFE, 6)  # runs into the hole after the second region
    finally:
        m.close()


def test_a_buffer_across_two_regions_reads_through_split_views() -> None:
    m = GuestMemory.anonymous([(0, 0x10000), (0x10000, 0x10000)])
    try:
        dq = DriverQueue(m, 8, 0x1000, buffers=(0x8000, 0x20000))
        q = dq.device_queue()
        m.write(0xFFFC, b"ABCD")
        m.write(0x10000, b"EFGH")
        c = chain_of(dq, q, [(0xFFFC, 8, R, 0)])
        assert [bytes(v) for v in c.readable_views()] == [b"ABCD", b"EFGH"]
        assert c.writable_views() == []
        assert c.reader().read(8) == b"ABCDEFGH"
    finally:
        m.close()


def test_cursor_take_and_short_reads(mem: GuestMemory) -> None:
    mem.write(BUF, b"0123456789")
    a, b = mem.view(BUF, 4), mem.view(BUF + 4, 6)
    r = ChainReader([a, b])
    assert r.remaining == 10
    assert r.read(2) == b"01"
    assert r.read(4) == b"2345"  # across the two views
    assert r.remaining == 4
    with pytest.raises(ChainError, match=r"^chain too short: need 5 bytes, 4 left$"):
        r.read(5)
    parts = r.take_all()
    assert [bytes(p) for p in parts] == [b"6789"] and r.remaining == 0
    whole = ChainReader([a])
    assert whole.take(4)[0] is a  # a whole view is handed out as is (zero-copy)
    w = ChainWriter([mem.view(BUF, 3), mem.view(BUF + 8, 3)])
    w.write(b"xyzXYZ")
    assert mem.read(BUF, 11) == b"xyz34567XYZ"
    with pytest.raises(ChainError):
        w.write(b"!")


def test_zero_length_buffers_have_no_views(mem: GuestMemory) -> None:
    dq, q = make(mem)
    c = chain_of(dq, q, [(BUF, 0, N, 1), (BUF, 0, W, 0)])
    assert c.readable() == [(BUF, 0)] and c.writable() == [(BUF, 0)]
    assert c.readable_views() == [] and c.writable_views() == []


# -- the queue: configuration -----------------------------------------------------------------
def test_areas_and_max_size() -> None:
    assert Queue.areas(16) == (256, 38, 134)
    assert Queue.areas(1) == (16, 8, 14)
    assert Queue(MAX_QUEUE_SIZE).max_size == MAX_QUEUE_SIZE
    assert Queue(1).max_size == 1
    with pytest.raises(ValueError, match="not a power of two <= 32768"):
        Queue(2 * MAX_QUEUE_SIZE)


def test_is_valid_at_the_size_and_alignment_edges(mem: GuestMemory) -> None:
    _, q = make(mem)
    q.size = 1
    assert q.is_valid(mem)
    q.size = 16
    q.desc_table, q.avail_ring, q.used_ring = 0x1010, 0x3002, 0x4004
    assert q.is_valid(mem)
    q.desc_table = MEM_SIZE - 256  # the table's last byte is memory's last byte
    assert q.is_valid(mem)
    q.desc_table = MEM_SIZE - 240
    assert not q.is_valid(mem)


def test_state_restore_masks_indices_and_checks_max_size(mem: GuestMemory) -> None:
    _, q = make(mem)
    state = q.state()
    assert state["max_size"] == 16 and state["ready"] is True
    state.update(next_avail=0x1_0003, next_used=0x1_0005, num_added=0x1_0001)
    q2 = Queue(16)
    q2.restore(state)
    assert (q2.next_avail, q2.next_used, q2.num_added) == (3, 5, 1)
    assert q2.state() == {**state, "next_avail": 3, "next_used": 5, "num_added": 1}
    del state["num_added"]
    q2.restore(state)
    assert q2.num_added == 0
    with pytest.raises(ValueError, match=r"^queue max size 16 != 32$"):
        Queue(32).restore(state)


def test_reset_forgets_the_layout(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    dq.add_chain([b"x"])
    assert q.pop(mem) is not None
    q.reset()
    assert q.state() == {
        "max_size": 16,
        "size": 16,
        "ready": False,
        "desc_table": 0,
        "avail_ring": 0,
        "used_ring": 0,
        "event_idx": False,
        "next_avail": 0,
        "next_used": 0,
        "num_added": 0,
    }
    assert q.pop(mem) is None and q.pending(mem) == 0


def test_moving_a_ring_is_validated_on_next_use(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.add_chain([b"x"])
    assert q.pending(mem) == 1
    q.used_ring = MEM_SIZE - 4  # the driver moved the used ring off the end of memory
    with pytest.raises(QueueError, match=r"^queue size 16 or rings \(desc 0x1000, avail "):
        q.pop(mem)
    with pytest.raises(QueueError):
        q.add_used(mem, 0, 1)


# -- the queue: data plane ---------------------------------------------------------------------
def test_pending_at_exactly_size_and_one_more(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    dq.set_avail_idx(4)
    assert q.pending(mem) == 4
    dq.set_avail_idx(5)
    with pytest.raises(QueueError, match=r"^avail idx is 5 entries ahead of a queue of 4$"):
        q.pending(mem)
    with pytest.raises(QueueError, match=r"^avail idx 5 is 5 entries ahead of a queue of 4$"):
        q.pop(mem)


def test_an_avail_entry_equal_to_size_is_refused(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    dq.write_avail_entry(0, 4)
    dq.set_avail_idx(1)
    with pytest.raises(QueueError, match=r"^avail ring entry 4 >= queue size 4$"):
        q.pop(mem)
    assert q.next_avail == 0  # nothing was consumed
    dq.write_avail_entry(0, 3)
    c = q.pop(mem)
    assert c is not None and c.head_index == 3 and q.next_avail == 1


def test_add_used_bounds_and_length_wrap(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    for bad in (4, -1):
        with pytest.raises(QueueError, match=f"^used head index {bad} >= queue size 4$"):
            q.add_used(mem, bad, 1)
    q.add_used(mem, 3, (1 << 32) + 7)
    assert dq.used_entry(0) == (3, 7)
    assert dq.used_idx == 1 and q.next_used == 1 and q.num_added == 1
    for i in range(4):
        q.add_used(mem, i, i)
    assert dq.used_entry(0) == (3, 3)  # the fifth entry went to slot 0 again
    assert dq.used_idx == 5 and q.used_idx(mem) == 5


def test_used_idx_wraps_at_65536(mem: GuestMemory) -> None:
    dq, q = make(mem, size=4)
    q.next_used = 0xFFFF
    q.add_used(mem, 1, 9)
    assert q.next_used == 0 and dq.used_idx == 0
    assert dq.used_entry(0xFFFF & 3) == (1, 9)


def test_undo_pop_wraps(mem: GuestMemory) -> None:
    _, q = make(mem)
    q.undo_pop()
    assert q.next_avail == 0xFFFF


def test_notifications_without_event_idx(mem: GuestMemory) -> None:
    dq, q = make(mem)
    assert q.needs_notification(mem) is False  # nothing added
    q.add_used(mem, 0, 0)
    assert q.needs_notification(mem) is True
    assert q.num_added == 0 and q.needs_notification(mem) is False
    dq.set_no_interrupt(True)
    q.add_used(mem, 0, 0)
    assert q.needs_notification(mem) is False
    assert dq.avail_idx == 0
    q.disable_notification(mem)
    assert dq.used_flags == VIRTQ_USED_F_NO_NOTIFY
    assert q.enable_notification(mem) is False and dq.used_flags == 0
    dq.add_chain([b"x"])
    assert q.enable_notification(mem) is True  # a buffer came in meanwhile: re-check
    assert VIRTQ_AVAIL_F_NO_INTERRUPT == 1


def test_notifications_with_event_idx(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    dq.set_used_event(0)
    q.add_used(mem, 0, 0)  # used idx 0 -> 1 crosses used_event 0
    assert q.needs_notification(mem) is True
    dq.set_used_event(5)
    q.add_used(mem, 0, 0)  # 1 -> 2 does not reach 5
    assert q.needs_notification(mem) is False
    q.disable_notification(mem)
    assert dq.used_flags == 0  # with EVENT_IDX the flag is not used
    q.next_avail = 7
    assert q.enable_notification(mem) is True  # avail idx 0 != 7
    assert dq.avail_event == 7


def test_a_queue_not_ready_does_nothing(mem: GuestMemory) -> None:
    dq, q = make(mem)
    dq.add_chain([b"x"])
    q.ready = False
    assert q.pop(mem) is None and q.pending(mem) == 0
    assert q.enable_notification(mem) is False
    q.disable_notification(mem)
    assert dq.used_flags == 0


# -- views when buffers cross regions, and regions that do not start at 0 ----------------------
SPLIT_MEM = [(0, 0x10000), (0x10000, 0x10000), (0x40000, 0x10000)]


@pytest.mark.parametrize("writable_first", [False, True])
def test_views_of_a_chain_with_a_buffer_across_regions(writable_first: bool) -> None:
    m = GuestMemory.anonymous(SPLIT_MEM)
    try:
        table = 0x1000
        for i, (addr, length, flags, nxt) in enumerate(
            [(0xFFFC, 8, N, 1), (0x8000, 0, N, 2), (0x40008, 4, N, 3), (0x40010, 6, W, 0)]
        ):
            m.write(table + 16 * i, DESC.pack(addr, length, flags, nxt))
        m.write(0xFFFC, b"ABCD")
        m.write(0x10000, b"EFGH")
        m.write(0x40008, b"ijkl")
        m.write(0x40010, b"uvwxyz")
        c = DescriptorChain(m, m.view(table, 64), 4, 0)  # no spans given: it finds its own
        if writable_first:
            w = c.writable_views()
            assert isinstance(w, list) and [bytes(v) for v in w] == [b"uvwxyz"]
        r = c.readable_views()
        assert [bytes(v) for v in r] == [b"ABCD", b"EFGH", b"ijkl"]
        assert [bytes(v) for v in c.writable_views()] == [b"uvwxyz"]
        c.writer().write(b"UVWXYZ")
        assert m.read(0x40010, 6) == b"UVWXYZ"
        assert c.reader().read(12) == b"ABCDEFGHijkl"
    finally:
        m.close()


def test_a_buffer_in_a_region_that_does_not_start_at_0() -> None:
    m = GuestMemory.anonymous([(0, 0x10000), (0x40000, 0x10000)])
    try:
        m.write(0x1000, DESC.pack(0x40008, 4, N, 1) + DESC.pack(0x40100, 2, W, 0))
        m.write(0x40008, b"wxyz")
        c = DescriptorChain(m, m.view(0x1000, 32), 2, 0)
        assert c.reader().read(4) == b"wxyz"
        c.writer().write(b"ok")
        assert m.read(0x40100, 2) == b"ok"
    finally:
        m.close()


def test_adjacent_regions_give_one_view_per_region() -> None:
    m = GuestMemory.anonymous([(0, 0x1000), (0x1000, 0x1000)])
    try:
        assert [len(v) for v in guest_views(m, 0x1000, 4)] == [4]  # no empty view of region 0
        assert [len(v) for v in guest_views(m, 0xFFF, 2)] == [1, 1]
    finally:
        m.close()


def test_a_reader_and_a_writer_over_three_views(mem: GuestMemory) -> None:
    mem.write(BUF, b"abcdefghijkl")
    views = [mem.view(BUF, 4), mem.view(BUF + 4, 4), mem.view(BUF + 8, 4)]
    r = ChainReader(views)
    assert r.read(4) == b"abcd"
    assert r.read(4) == b"efgh"
    assert r.read(4) == b"ijkl"
    w = ChainWriter([mem.view(0x30000, 2), mem.view(0x30010, 2), mem.view(0x30020, 2)])
    w.write(b"123456")
    assert mem.read(0x30000, 2) + mem.read(0x30010, 2) + mem.read(0x30020, 2) == b"123456"


def test_next_index_beyond_an_indirect_table_names_its_size(mem: GuestMemory) -> None:
    dq, q = make(mem)
    table = 0x30000
    mem.write(table, DESC.pack(BUF, 4, N, 2) + DESC.pack(BUF, 4, R, 0))
    c = chain_of(dq, q, [(table, 32, IND, 0)])
    assert chain_error(c) == "next index 2 >= table size 2"


# -- the queue: more edges ---------------------------------------------------------------------
def test_a_queue_of_the_largest_size_is_valid() -> None:
    m = GuestMemory.anonymous([(0, 2 << 20)])
    try:
        q = Queue(MAX_QUEUE_SIZE)
        q.desc_table, q.avail_ring, q.used_ring = 0, 0x80000, 0x100000
        assert q.is_valid(m)
    finally:
        m.close()


def test_the_rings_follow_a_new_guest_memory() -> None:
    """The same queue used with another GuestMemory (e.g. a restored VM) reads that memory."""
    mems = [GuestMemory.anonymous([(0, MEM_SIZE)]) for _ in range(2)]
    try:
        dqs = [DriverQueue(m, 8, 0x1000, buffers=(0x10000, MEM_SIZE)) for m in mems]
        q = dqs[0].device_queue()
        dqs[0].add_chain([b"first"])
        dqs[1].add_chain([b"other", b"!"])
        c = q.pop(mems[0])
        assert c is not None and c.reader().read(5) == b"first"
        q.next_avail = 0
        c = q.pop(mems[1])
        assert c is not None and c.reader().read(6) == b"other!"
        q.add_used(mems[1], c.head_index, 6)
        assert dqs[1].used_idx == 1 and dqs[0].used_idx == 0
        assert q.avail_idx(mems[0]) == 1 and q.used_idx(mems[0]) == 0
        assert q.avail_idx(mems[0]) == 1  # back to the first memory
        q.add_used(mems[1], 0, 1)  # add_used on its own (no pop before) follows the memory too
        assert (dqs[1].used_idx, dqs[0].used_idx) == (2, 0)
    finally:
        for m in mems:
            m.close()


def test_pending_counts_from_next_avail(mem: GuestMemory) -> None:
    dq, q = make(mem)
    for _ in range(3):
        dq.add_chain([b"x"])
    assert q.pop(mem) is not None
    assert q.pending(mem) == 2


def test_num_added_counts_every_used_entry(mem: GuestMemory) -> None:
    dq, q = make(mem, event_idx=True)
    q.add_used(mem, 0, 0)
    q.add_used(mem, 1, 0)
    assert q.num_added == 2
    dq.set_used_event(0)  # used idx went 0 -> 2 past used_event 0: interrupt
    assert q.needs_notification(mem) is True


@pytest.mark.parametrize(("added", "expected"), [(0xFFFF, False), (0x10000, True)])
def test_event_idx_with_a_huge_number_added(mem: GuestMemory, added: int, expected: bool) -> None:
    dq, q = make(mem, event_idx=True)
    dq.set_used_event(0)  # new == used_event: the formula says no interrupt
    q.num_added = added
    assert q.needs_notification(mem) is expected
