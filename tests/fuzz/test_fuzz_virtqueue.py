"""Fuzz target "virtqueue": the device side of a split virtqueue against hostile rings.

A device-like consumer pops every chain, reads its readable views, fills its writable views
and returns it, then asks about notifications. For any ring state:
- only QueueError (the whole queue) or ChainError (one chain) is raised;
- the readable views hold exactly the bytes of the readable descriptors, in order;
- writing the writable views changes exactly the bytes of the writable descriptors, nothing
  else (buffers may cross from one memory region into the next);
- the used ring gets one element per returned chain, at the right slot, across the 16-bit
  wrap; the notification decision follows the spec's rules (flags or used_event);
- nothing outside the used ring and the chains' writable buffers changes, in particular the
  guard region's canary;
- popping and parsing one chain allocates at most CHAIN_ALLOC_BUDGET bytes (tracemalloc),
  whatever its shape: the chain's cost is bounded by the queue size, not the guest's tables.
"""

from __future__ import annotations

import struct

from hypothesis import example, given
from hypothesis import strategies as st

from strato.memory import GuestMemory
from strato.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    DescriptorChain,
    Queue,
    QueueError,
)
from strato.virtio.testing import vring_need_event
from tests.budgets.harness import AllocationPeak
from tests.fuzz import _rings
from tests.fuzz._rings import DATA, SIZE, RingState, ring_states
from tests.fuzz._support import CANARY, GUARD, changed_outside, count, fuzz_settings, snapshot

DESC, AVAIL, USED = 0x1000, 0x1100, 0x1200
SPLIT = 0x18000  # RAM is two adjacent regions meeting here, inside the data area
# What parsing one chain may allocate: `size` descriptors and views (~300 bytes each) + slack.
CHAIN_ALLOC_BUDGET = 4096 + 512 * SIZE


def _memory() -> GuestMemory:
    mem = GuestMemory.anonymous([(0, SPLIT), (SPLIT, 0x100000 - SPLIT), GUARD])
    mem.write(GUARD[0], CANARY * (GUARD[1] // 2))
    return mem


def _read_span(mem: GuestMemory, addr: int, length: int) -> bytes:
    """Guest bytes [addr, addr+length) even across adjacent regions."""
    out = bytearray()
    while length:
        r = mem.region_of(addr)
        n = min(length, r.end - addr)
        out += mem.read(addr, n)
        addr += n
        length -= n
    return bytes(out)


def _serve(mem: GuestMemory, q: Queue, chain: DescriptorChain) -> int:
    """What a device does with one chain; returns the bytes it wrote (0 for a bad chain)."""
    try:
        descs = chain.descriptors
        readable = chain.readable_views()
        writable = chain.writable_views()
    except ChainError:
        return 0
    expected = b"".join(_read_span(mem, d.addr, d.len) for d in descs if not d.is_write_only)
    assert b"".join(bytes(v) for v in readable) == expected
    assert sum(map(len, writable)) == chain.writable_len
    before = snapshot(mem)
    marker = 0xEE
    for v in writable:
        v[:] = bytes([marker]) * len(v)
    ranges = [(d.addr, d.len) for d in descs if d.is_write_only]
    assert changed_outside(mem, before, ranges) == []
    for a, n in ranges:
        assert _read_span(mem, a, n) == bytes([marker]) * n
    return chain.writable_len


def _parse(chain: DescriptorChain) -> None:
    """Everything a device asks of a chain's layout (cached on the chain afterwards)."""
    try:
        _ = chain.descriptors
        chain.readable_views()
        chain.writable_views()
    except ChainError:
        pass


def run_queue(mem: GuestMemory, state: RingState) -> None:
    _rings.lay_out(mem, DESC, AVAIL, USED, SIZE, state)
    q = Queue(SIZE)
    q.desc_table, q.avail_ring, q.used_ring = DESC, AVAIL, USED
    q.event_idx = state.event_idx
    q.ready = True
    q.next_avail = q.next_used = state.start
    initial = snapshot(mem)
    allowed = [(USED, 6 + 8 * SIZE)]
    returned: list[tuple[int, int]] = []
    corrupt = False
    while len(returned) < 2 * SIZE:
        with AllocationPeak() as alloc:
            try:
                chain = q.pop(mem)
            except QueueError:
                chain = None
                corrupt = True
            if chain is not None:
                _parse(chain)
        assert alloc.peak <= CHAIN_ALLOC_BUDGET, f"one chain allocated {alloc.peak} bytes"
        if chain is None:
            break
        assert 0 <= chain.head_index < SIZE
        try:
            allowed += [(d.addr, d.len) for d in chain.descriptors if d.is_write_only]
        except ChainError:
            pass
        written = _serve(mem, q, chain)
        q.add_used(mem, chain.head_index, written)
        returned.append((chain.head_index, written))

    if not corrupt:
        # A queue that is not corrupt hands out exactly what the driver made available.
        assert len(returned) == state.ahead
    assert len(returned) <= SIZE
    new_used = (state.start + len(returned)) & 0xFFFF
    assert mem.read_u16(USED + 2) == new_used == q.next_used
    for i in range(len(returned)):
        slot = (state.start + i) % SIZE
        assert struct.unpack("<II", mem.read(USED + 4 + 8 * slot, 8)) == returned[i]

    wants = q.needs_notification(mem)
    if not returned:
        assert not wants
    elif state.event_idx:
        assert wants == vring_need_event(state.used_event, new_used, state.start)
    else:
        assert wants == (not state.avail_flags & 1)

    if not corrupt:
        more = q.enable_notification(mem)
        assert more == (mem.read_u16(AVAIL + 2) != q.next_avail)
        if state.event_idx:
            assert mem.read_u16(USED + 4 + 8 * SIZE) == q.next_avail
        q.disable_notification(mem)
    assert changed_outside(mem, initial, allowed) == []  # the guard's canary included


_WRAP = RingState(
    table=[(DATA + 0x100 * i, 16, VIRTQ_DESC_F_WRITE, 0) for i in range(SIZE)],
    tables=[[] for _ in range(4)],
    heads=list(range(SIZE)),
    ahead=SIZE,
    start=0xFFFD,  # the used idx wraps while the chains are returned
    avail_flags=0,
    used_event=0xFFFF,
    event_idx=True,
)
_BIG = RingState(  # every slot: an indirect table of BIG_COUNT (> SIZE) writable buffers
    table=[(_rings.BIG_TABLE, _rings.BIG_COUNT * 16, VIRTQ_DESC_F_INDIRECT, 0)] * SIZE,
    tables=[[] for _ in range(4)],
    heads=[0] * SIZE,
    ahead=SIZE,
    start=0,
    avail_flags=0,
    used_event=0,
    event_idx=False,
)
_CROSSING = RingState(  # one readable and one writable buffer across the region edge
    table=[(SPLIT - 8, 16, VIRTQ_DESC_F_NEXT, 1), (SPLIT - 4, 8, VIRTQ_DESC_F_WRITE, 0)]
    + [(DATA, 1, 0, 0)] * (SIZE - 2),
    tables=[[] for _ in range(4)],
    heads=[0] * SIZE,
    ahead=1,
    start=7,
    avail_flags=1,
    used_event=0,
    event_idx=False,
)


@fuzz_settings(400)
@given(state=ring_states())
@example(state=_WRAP)
@example(state=_CROSSING)
@example(state=_BIG)
def test_virtqueue_hostile_rings(state: RingState) -> None:
    count("virtqueue")
    mem = _memory()
    try:
        run_queue(mem, state)
    finally:
        mem.close()


@fuzz_settings(150)
@given(
    size=st.sampled_from([0, 1, 2, 3, 8, 12, 16, 0x8000, 0x10000]),
    desc=st.sampled_from([0, 0x1000, 0x1008, 0xFFFF0, 0x100000, GUARD[0], 2**64 - 16]),
    avail=st.sampled_from([0x1100, 0x1101, 0xFFFFE, 0x1FFFFE, GUARD[0] + 0xFF0]),
    used=st.sampled_from([0x1200, 0x1202, 0xFFFFC, GUARD[0] + 0xF00, 2**64 - 4]),
    idx=st.integers(0, 0xFFFF),
)
def test_virtqueue_bad_configuration_is_a_queue_error(
    size: int, desc: int, avail: int, used: int, idx: int
) -> None:
    """A queue set up with a bad size or rings outside memory never touches memory."""
    count("virtqueue")
    mem = _memory()
    try:
        if mem.check(avail + 2, 2):
            mem.write_u16(avail + 2, idx)
        before = snapshot(mem)
        q = Queue(16)
        q.size, q.desc_table, q.avail_ring, q.used_ring, q.ready = size, desc, avail, used, True
        d, a, u = Queue.areas(max(size, 1))
        valid = (
            size in (1, 2, 8, 16)
            and desc % 16 == 0
            and avail % 2 == 0
            and used % 4 == 0
            and all(mem.check(x, n) for x, n in ((desc, d), (avail, a), (used, u)))
        )
        assert q.is_valid(mem) == valid
        try:
            while q.pop(mem) is not None:
                pass
        except QueueError:
            assert not valid or idx != 0
        if not valid:
            assert snapshot(mem) == before
    finally:
        mem.close()
