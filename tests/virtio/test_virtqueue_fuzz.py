"""Property tests: whatever a driver writes, the queue raises only its own errors."""

from __future__ import annotations

import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.memory import GuestMemory
from strato.virtio.queue import ChainError, Queue, QueueError

SIZE = 8
DESC, AVAIL, USED = 0x1000, 0x1100, 0x1200
INDIRECT_AREA = 0x8000
MEM = [(0, 0x10000), (0x20000, 0x1000)]  # a hole at 0x10000..0x20000

addresses = st.one_of(
    st.sampled_from(
        [0, 0x2000, 0x8000, 0xFFF0, 0xFFFF, 0x10000, 0x1FFFF, 0x20000, 0x20FF0, 1 << 40, 2**64 - 8]
    ),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(0, 0x21000),
    st.integers(0, 2**64 - 1),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 16, 32, 48, 0x100, 0xFFFF, 2**32 - 1]), st.integers(0, 0x2000)
)
descriptor = st.tuples(addresses, lengths, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
flag_heavy = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, SIZE))
# Mostly well-formed: in memory, NEXT/WRITE only, next in range.
plausible = st.tuples(
    st.integers(0x2000, 0xF000),
    st.integers(0, 0x800),
    st.sampled_from([0, 1, 2, 3]),
    st.integers(0, SIZE - 1),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.lists(plausible | plausible | flag_heavy | descriptor, min_size=SIZE, max_size=SIZE),
    indirect=st.lists(st.one_of(descriptor, flag_heavy), min_size=0, max_size=16),
    avail_idx=st.one_of(st.integers(0, SIZE + 2), st.integers(0, 0xFFFF)),
    ring=st.lists(st.integers(0, SIZE - 1), min_size=SIZE, max_size=SIZE),
    bad_slot=st.none() | st.none() | st.tuples(st.integers(0, SIZE - 1), st.integers(0, 0xFFFF)),
    next_avail=st.integers(-SIZE - 2, 0) | st.integers(-SIZE, 0) | st.integers(0, 0xFFFF),
)
def test_hostile_rings_raise_only_queue_errors(
    table: list[tuple[int, int, int, int]],
    indirect: list[tuple[int, int, int, int]],
    avail_idx: int,
    ring: list[int],
    bad_slot: tuple[int, int] | None,
    next_avail: int,
) -> None:
    mem = GuestMemory.anonymous(MEM)
    try:
        for i, d in enumerate(table):
            mem.write(DESC + 16 * i, struct.pack("<QIHH", *d))
        for i, d in enumerate(indirect):
            mem.write(INDIRECT_AREA + 16 * i, struct.pack("<QIHH", *d))
        if bad_slot is not None:
            ring[bad_slot[0]] = bad_slot[1]
        for i, head in enumerate(ring):
            mem.write_u16(AVAIL + 4 + 2 * i, head)
        mem.write_u16(AVAIL + 2, avail_idx)
        q = Queue(SIZE)
        q.desc_table, q.avail_ring, q.used_ring, q.ready = DESC, AVAIL, USED, True
        # Negative: that many entries behind avail idx (mostly valid); else anywhere.
        q.next_avail = (avail_idx + next_avail) & 0xFFFF if next_avail <= 0 else next_avail
        popped = 0
        while popped < 2 * SIZE:
            try:
                chain = q.pop(mem)
            except QueueError:
                break
            if chain is None:
                break
            popped += 1
            assert chain.head_index < SIZE
            try:
                descs = chain.descriptors
                views_r = chain.readable_views()
                views_w = chain.writable_views()
            except ChainError:
                q.add_used(mem, chain.head_index, 0)
                continue
            # A chain visits each table entry at most once: direct part + one indirect table.
            assert len(descs) <= SIZE + 0xFFFFFFFF // 16
            assert sum(len(v) for v in views_r) == chain.readable_len
            assert sum(len(v) for v in views_w) == chain.writable_len
            seen_write = False
            for desc in descs:
                assert desc.addr + desc.len <= 2**64
                assert desc.len == 0 or _in_memory(mem, desc.addr, desc.len)
                if desc.is_write_only:
                    seen_write = True
                else:
                    assert not seen_write
            q.add_used(mem, chain.head_index, chain.writable_len)
        assert popped <= SIZE
    finally:
        mem.close()


def _in_memory(mem: GuestMemory, addr: int, length: int) -> bool:
    end = addr + length
    while addr < end:
        for r in mem.regions:
            if r.start <= addr < r.end:
                addr = min(end, r.end)
                break
        else:
            return False
    return True
