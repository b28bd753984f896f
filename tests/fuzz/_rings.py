"""Hostile split virtqueues: strategies for what a broken or malicious driver puts in memory.

A `RingState` is everything the driver controls: the descriptor table, indirect tables, the
avail ring (entries, idx, flags, used_event), where the indices start (near the 16-bit wrap
too), and whether EVENT_IDX is on. `lay_out()` writes it into guest memory at a queue's ring
addresses, exactly as the driver would, without going through any validation.

Addresses point into a data area (mostly), at region edges, into the hole between RAM and the
guard region, into the guard region, and far outside (2^40, 2^64 - small). Lengths include 0,
1, sizes around 16 and 512, 2^31 and 2^32 - 1. One indirect table ("big") holds more
descriptors than IOV_MAX (1024), all chained and device-writable.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from hypothesis import strategies as st

from strato.memory import GuestMemory
from strato.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.fuzz._support import GUARD, RAM

SIZE = 8
RINGS = 0x1000  # queue i's rings at RINGS + i * 0x1000
DATA, DATA_END = 0x10000, 0x20000  # buffers; slot k starts at DATA + k * 0x100
SLOTS = (DATA_END - DATA) // 0x100
TABLES = 0x30000  # 4 indirect tables of up to 8 (16 room) descriptors, 0x100 apart
BIG_TABLE = 0x40000  # one table of BIG_COUNT chained writable descriptors
BIG_COUNT = 1100
BIG_BUFFERS = 0x60000  # its 2-byte buffers
DRIVER_BUFFERS = (0x80000, 0xC0000)  # what the well-behaved driver allocates from afterwards

_DESC = struct.Struct("<QIHH")

hostile_addr = st.sampled_from(
    [
        RAM[1] - 1,
        RAM[1] - 8,
        RAM[1],
        RAM[1] + 0x800,  # the hole
        GUARD[0] - 1,
        GUARD[0],
        GUARD[0] + GUARD[1] - 4,
        GUARD[0] + GUARD[1],
        1 << 40,
        2**63,
        2**64 - 1,
        2**64 - 16,
    ]
)
data_addr = st.integers(0, SLOTS - 1).map(lambda k: DATA + k * 0x100)
table_addr = st.integers(0, 3).map(lambda k: TABLES + k * 0x100)
lengths = st.sampled_from(
    [0, 1, 2, 12, 15, 16, 17, 32, 48, 128, 255, 256, 512, 513, 1024, 0x1000, 2**31, 2**32 - 1]
)
table_lengths = st.sampled_from([16, 32, 64, 128, 256, 0, 8, 24, 2**32 - 16, BIG_COUNT * 16])
flag_values = st.integers(0, 7) | st.sampled_from([0, 1, 2, 3, 0xFFFF, 0xFFF8])


@st.composite
def descriptor(draw: st.DrawFn, size: int = SIZE) -> tuple[int, int, int, int]:
    f = draw(flag_values)
    if f & VIRTQ_DESC_F_INDIRECT:
        addr = draw(table_addr | table_addr | st.just(BIG_TABLE) | hostile_addr)
        length = draw(table_lengths)
    else:
        addr = draw(data_addr | data_addr | data_addr | hostile_addr)
        length = draw(lengths)
    nxt = draw(st.integers(0, size - 1) | st.integers(0, 0xFFFF))
    return addr, length, f, nxt


@st.composite
def plausible_chain(draw: st.DrawFn, first: int, count: int) -> list[tuple[int, int, int, int]]:
    """`count` descriptors from index `first`: readable then writable, linked in order."""
    n_read = draw(st.integers(0, count))
    out = []
    for j in range(count):
        last = j == count - 1
        f = (0 if j < n_read else VIRTQ_DESC_F_WRITE) | (0 if last else VIRTQ_DESC_F_NEXT)
        length = draw(st.sampled_from([1, 16, 32, 64, 128, 255]))
        out.append((draw(data_addr), length, f, 0 if last else first + j + 1))
    return out


@dataclass
class RingState:
    table: list[tuple[int, int, int, int]]
    tables: list[list[tuple[int, int, int, int]]]
    heads: list[int]
    ahead: int  # avail idx - start
    start: int  # where next_avail and used idx start
    avail_flags: int
    used_event: int
    event_idx: bool


@st.composite
def ring_states(draw: st.DrawFn, size: int = SIZE) -> RingState:
    table: list[tuple[int, int, int, int]] = []
    heads: list[int] = []
    if draw(st.booleans()):  # mostly well-formed chains, then a few mutations
        while len(table) < size:
            n = draw(st.integers(1, min(4, size - len(table))))
            heads.append(len(table))
            table += draw(plausible_chain(len(table), n))
        mutation = st.tuples(st.integers(0, size - 1), st.integers(0, 3), descriptor(size))
        for i, field, d in draw(st.lists(mutation, max_size=3)):
            mutated = list(table[i])
            mutated[field] = d[field]
            table[i] = (mutated[0], mutated[1], mutated[2], mutated[3])
    else:
        table = draw(st.lists(descriptor(size), min_size=size, max_size=size))
    heads += draw(st.lists(st.integers(0, size - 1), min_size=size, max_size=size))
    heads = heads[:size]
    if draw(st.integers(0, 9)) == 0:
        heads[draw(st.integers(0, size - 1))] = draw(st.sampled_from([size, 0xFFFF, 0x8000]))
    ahead = draw(
        st.sampled_from([len({*heads}), size]) | st.integers(0, size) | st.integers(0, 0xFFFF)
    )
    start = draw(st.sampled_from([0, 1, 0xFFF9, 0xFFFC, 0xFFFF]) | st.integers(0, 0xFFFF))
    inner = st.lists(
        st.one_of(descriptor(16), plausible_chain(0, 1).map(lambda c: c[0])),
        min_size=0,
        max_size=8,
    )
    return RingState(
        table=table,
        tables=draw(st.lists(inner, min_size=4, max_size=4)),
        heads=heads,
        ahead=ahead,
        start=start,
        avail_flags=draw(st.sampled_from([0, 1, 0xFFFF])),
        used_event=draw(st.integers(0, 0xFFFF)),
        event_idx=draw(st.booleans()),
    )


def write_big_table(mem: GuestMemory) -> None:
    """BIG_COUNT chained, device-writable, 2-byte descriptors (more buffers than IOV_MAX)."""
    raw = bytearray()
    for i in range(BIG_COUNT):
        last = i == BIG_COUNT - 1
        flags = VIRTQ_DESC_F_WRITE | (0 if last else VIRTQ_DESC_F_NEXT)
        raw += _DESC.pack(BIG_BUFFERS + 2 * i, 2, flags, 0 if last else i + 1)
    mem.write(BIG_TABLE, raw)


def lay_out(
    mem: GuestMemory, desc: int, avail: int, used: int, size: int, state: RingState
) -> None:
    """Write `state` into guest memory at these ring addresses (as the driver would)."""
    write_big_table(mem)
    for k, entries in enumerate(state.tables):
        for i, d in enumerate(entries):
            mem.write(TABLES + k * 0x100 + 16 * i, _DESC.pack(*d))
    for i, d in enumerate(state.table):
        mem.write(desc + 16 * i, _DESC.pack(*d))
    for i in range(size):
        slot = (state.start + i) % size
        mem.write_u16(avail + 4 + 2 * slot, state.heads[i])
    mem.write_u16(avail, state.avail_flags)
    mem.write_u16(avail + 2, (state.start + state.ahead) & 0xFFFF)
    mem.write_u16(avail + 4 + 2 * size, state.used_event)
    mem.write_u16(used + 2, state.start)


def writable_ranges(mem: GuestMemory, table: int, size: int) -> list[tuple[int, int]]:
    """Every range a descriptor of this table (or of an indirect table one of them points at)
    lets the device write."""
    out: list[tuple[int, int]] = []
    for i in range(size):
        addr, length, f, _ = _DESC.unpack(mem.read(table + 16 * i, 16))
        if f & VIRTQ_DESC_F_INDIRECT:
            if length % 16 == 0 and mem.check(addr, length):
                for j in range(length // 16):
                    a, n, ff, _ = _DESC.unpack(mem.read(addr + 16 * j, 16))
                    if ff & VIRTQ_DESC_F_WRITE:
                        out.append((a, n))
        elif f & VIRTQ_DESC_F_WRITE:
            out.append((addr, length))
    return out
