"""Hostile drivers against every device: random and malformed rings, chains and requests.

Properties, for any input:
- nothing raises out of `process_queue`;
- the only guest bytes that change are the used ring and buffers some descriptor marked
  device-writable (direct, or inside a table an INDIRECT descriptor points at); the guard
  region's canary pattern survives unless a writable descriptor pointed there;
- afterwards the device either asked for a reset, or serves a well-formed request correctly.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.devices.backends.raw import RawFile
from strato.devices.backends.tap import Tap
from strato.devices.virtio.base import VirtioDeviceBase
from strato.devices.virtio.block import Block
from strato.devices.virtio.console import Console
from strato.devices.virtio.net import Net
from strato.devices.virtio.rng import Rng
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from strato.virtio.testing import VirtioDriver
from tests.taps import host_tap, wait_until_up

SIZE = 8
RAM = (0, 0x100000)
GUARD = (0x200000, 0x1000)  # a second region past a hole, filled with a canary pattern
CANARY = b"\xa5\x5a"
RINGS = 0x1000  # queue i at RINGS + i * 0x1000
DATA, DATA_END = 0x10000, 0x20000  # request buffers (headers planted here)
TABLES = 0x30000  # indirect tables live here, 8 slots of 8 descriptors
DISK_SECTORS = 64

hostile_addr = st.sampled_from(
    [
        RAM[1] - 1,
        RAM[1] - 8,
        RAM[1],
        GUARD[0],
        GUARD[0] + GUARD[1] - 4,
        GUARD[0] + GUARD[1],
        1 << 40,
        2**64 - 1,
        2**64 - 16,
    ]
)
data_addr = st.integers(0, (DATA_END - DATA) // 0x100 - 1).map(lambda k: DATA + k * 0x100)
table_addr = st.integers(0, 7).map(lambda k: TABLES + k * 0x80)
lengths = st.sampled_from([0, 1, 15, 16, 17, 32, 48, 128, 512, 513, 1024, 0x1000, 2**32 - 1])
flags = st.integers(0, 7) | st.sampled_from([0, 1, 2, 3, 0xFFFF])


@st.composite
def descriptor(draw: st.DrawFn) -> tuple[int, int, int, int]:
    f = draw(flags)
    if f & VIRTQ_DESC_F_INDIRECT:
        addr = draw(table_addr | hostile_addr)
        length = draw(st.sampled_from([16, 32, 64, 128, 0, 8, 24, 2**32 - 16]))
    else:
        addr = draw(data_addr | data_addr | hostile_addr)
        length = draw(lengths)
    return addr, length, f, draw(st.integers(0, SIZE - 1) | st.integers(0, 0xFFFF))


@dataclass
class Scenario:
    table: list[tuple[int, int, int, int]]
    tables: list[list[tuple[int, int, int, int]]]
    heads: list[int]
    ahead: int
    start: int
    seed: int
    headers: list[tuple[int, int, int, int]]


request_types = st.sampled_from([0, 0, 1, 1, 1, 4, 8, 10, 11, 11, 13, 13, 99, 2**32 - 1])
sectors = st.sampled_from([0, 1, 2, 10, DISK_SECTORS - 1, DISK_SECTORS, 2**63, 2**64 - 1])
header = st.tuples(
    st.integers(0, 255),  # slot in the data area
    request_types,
    sectors,
    st.integers(0, 2**32 - 1) | st.integers(0, 8),  # first discard segment's sector count
)


@st.composite
def wellformed(
    draw: st.DrawFn,
) -> tuple[list[tuple[int, int, int, int]], list[int], list[tuple[int, int, int, int]], int]:
    """Chains shaped like real block requests (header, data, status), then a few mutations."""
    table: list[tuple[int, int, int, int]] = []
    heads: list[int] = []
    headers: list[tuple[int, int, int, int]] = []
    r, w = 0, VIRTQ_DESC_F_WRITE
    for slot, rtype, sector, count in draw(st.lists(header, min_size=1, max_size=4)):
        if rtype == 0:
            shape = [(16, r), (512 * draw(st.integers(1, 2)), w), (1, w)]
        elif rtype == 1:
            shape = [(16, r), (512 * draw(st.integers(1, 2)), r), (1, w)]
        elif rtype == 8:
            shape = [(16, r), (20, w), (1, w)]
        elif rtype in (11, 13):
            shape = [(32, r), (1, w)]  # the header slot holds one segment after the header
        else:
            shape = [(16, r), (1, w)]
        first = len(table)
        if first + len(shape) > SIZE:
            break
        heads.append(first)
        headers.append((slot, rtype, sector, count))
        for j, (length, f) in enumerate(shape):
            last = j == len(shape) - 1
            addr = DATA + slot * 0x100 if j == 0 else draw(data_addr)
            link = 0 if last else VIRTQ_DESC_F_NEXT
            table.append((addr, length, f | link, 0 if last else first + j + 1))
    count = len(heads)
    while len(table) < SIZE:
        table.append(draw(descriptor()))
    mutation = st.tuples(st.integers(0, SIZE - 1), st.integers(0, 3), descriptor())
    for i, field, d in draw(st.just([]) | st.just([]) | st.lists(mutation, max_size=3)):
        mutated = list(table[i])
        mutated[field] = d[field]
        table[i] = (mutated[0], mutated[1], mutated[2], mutated[3])
    heads += draw(st.lists(st.integers(0, SIZE - 1), min_size=SIZE, max_size=SIZE))
    return table, heads[:SIZE], headers, count


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    if draw(st.booleans()):
        table, heads, headers, count = draw(wellformed())
        ahead = draw(st.just(count) | st.just(count) | st.integers(0, SIZE))
    else:
        table = draw(st.lists(descriptor(), min_size=SIZE, max_size=SIZE))
        heads = draw(
            st.lists(
                st.integers(0, SIZE - 1) | st.integers(0, 0xFFFF), min_size=SIZE, max_size=SIZE
            )
        )
        headers = draw(st.lists(header, max_size=12))
        ahead = draw(st.integers(0, SIZE) | st.integers(0, 0xFFFF))
    return Scenario(
        table=table,
        tables=draw(
            st.lists(st.lists(descriptor(), min_size=0, max_size=8), min_size=8, max_size=8)
        ),
        heads=heads,
        ahead=ahead,
        start=draw(st.integers(0, 0xFFFF)),
        seed=draw(st.integers(0, 2**32 - 1)),
        headers=headers,
    )


def lay_out(mem: GuestMemory, drv: VirtioDriver, qi: int, s: Scenario) -> None:
    """Write the scenario into guest memory the way a (broken) driver would."""
    rnd = random.Random(s.seed)
    mem.write(DATA, rnd.randbytes(DATA_END - DATA))
    for slot, rtype, sector, count in s.headers:
        addr = DATA + slot * 0x100
        # the header, then one discard/write-zeroes segment (sector, count, flags)
        mem.write(addr, struct.pack("<IIQQII", rtype, 0, sector, sector, count, 0))
    for k, entries in enumerate(s.tables):
        for i, d in enumerate(entries):
            mem.write(TABLES + k * 0x80 + 16 * i, struct.pack("<QIHH", *d))
    dq = drv[qi]
    for i, d in enumerate(s.table):
        dq.write_desc(i, *d)
    q = drv.queues[qi]
    q.next_avail = s.start
    q.next_used = s.start
    mem.write_u16(dq.used_ring + 2, s.start)
    for i in range(SIZE):
        dq.write_avail_entry(s.start + i, s.heads[i])
    dq.restart_from(s.start + s.ahead, s.start)


def writable_ranges(mem: GuestMemory, drv: VirtioDriver, qi: int) -> list[tuple[int, int]]:
    """Every range some descriptor of this queue lets the device write, plus the used ring."""
    dq = drv[qi]
    ranges = [(dq.used_ring, 6 + 8 * dq.size)]
    for i in range(dq.size):
        addr, length, f, _ = dq.read_desc(i)
        if f & VIRTQ_DESC_F_INDIRECT:
            if length % 16 == 0 and mem.check(addr, length):
                for j in range(length // 16):
                    a, n, ff, _ = struct.unpack("<QIHH", mem.read(addr + 16 * j, 16))
                    if ff & VIRTQ_DESC_F_WRITE:
                        ranges.append((a, n))
        elif f & VIRTQ_DESC_F_WRITE:
            ranges.append((addr, length))
    return ranges


def snapshot(mem: GuestMemory) -> list[bytes]:
    return [bytes(r.view) for r in mem.regions]


def changed_outside(
    mem: GuestMemory, before: list[bytes], allowed: list[tuple[int, int]]
) -> list[int]:
    bad = []
    for region, old in zip(mem.regions, before, strict=True):
        new = bytes(region.view)
        if new == old:
            continue
        for page in range(0, len(new), 4096):
            if new[page : page + 4096] == old[page : page + 4096]:
                continue
            for off in range(page, min(page + 4096, len(new))):
                if new[off] != old[off]:
                    addr = region.start + off
                    if not any(a <= addr < a + n for a, n in allowed):
                        bad.append(addr)
    return bad


def new_memory() -> GuestMemory:
    mem = GuestMemory.anonymous([RAM, GUARD])
    mem.write(GUARD[0], CANARY * (GUARD[1] // 2))
    return mem


def check_device(
    make: Callable[[], VirtioDeviceBase],
    s: Scenario,
    qi: int,
    still_works: Callable[[GuestMemory, VirtioDriver], None],
    poke: Callable[[VirtioDeviceBase, EventLoop], None] | None = None,
) -> None:
    mem = new_memory()
    loop = EventLoop()
    dev = make()
    try:
        drv = VirtioDriver(
            dev,
            mem,
            queue_size=SIZE,
            rings_base=RINGS,
            ring_stride=0x1000,
            buffers_base=0x40000,
            buffers_end=0x80000,
        )
        drv.activate(loop)
        lay_out(mem, drv, qi, s)
        allowed = writable_ranges(mem, drv, qi)
        before = snapshot(mem)
        dev.process_queue(qi)  # must not raise
        if poke is not None:
            poke(dev, loop)  # event-loop driven paths (a tap with a frame waiting)
        dev.process_queue(qi)  # a second notify must not either
        assert changed_outside(mem, before, allowed) == []
        if dev.needs_reset:
            assert drv.interrupt.needs_reset
            return
        q = drv.queues[qi]
        drv[qi].restart_from(q.next_avail, q.next_used)
        still_works(mem, drv)
    finally:
        dev.reset()
        if isinstance(dev, Block):
            dev.disk.close()
        elif isinstance(dev, Rng | Console):
            dev.close()
        loop.close()
        mem.close()


SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@SETTINGS
@given(s=scenarios())
def test_block_survives_hostile_queues(s: Scenario) -> None:
    with tempfile.NamedTemporaryFile(suffix=".raw") as f:
        content = os.urandom(DISK_SECTORS * 512)
        f.write(content)
        f.flush()

        def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
            dq = drv[0]
            c = dq.add_chain([struct.pack("<IIQ", 0, 0, 3)], [512, 1])
            drv.kick(0)
            assert (c.head, 513) in dq.get_used()
            assert mem.read(c.writable[1][0], 1) == b"\0"
            now = open(f.name, "rb").read()
            assert mem.read(c.writable[0][0], 512) == now[3 * 512 : 4 * 512]

        check_device(lambda: Block(RawFile(f.name), queue_size=SIZE), s, 0, still_works)
        assert os.path.getsize(f.name) == DISK_SECTORS * 512


@SETTINGS
@given(s=scenarios())
def test_rng_survives_hostile_queues(s: Scenario) -> None:
    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        c = drv[0].add_chain([], [32])
        drv.kick(0)
        assert (c.head, 32) in drv[0].get_used()

    check_device(lambda: Rng(queue_size=SIZE), s, 0, still_works)


@SETTINGS
@given(s=scenarios(), qi=st.sampled_from([0, 1]))
def test_console_survives_hostile_queues(s: Scenario, qi: int) -> None:
    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        dev = drv.device
        assert isinstance(dev, Console)
        if qi == 1:
            c = drv[1].add_chain([b"still here"])
            drv.kick(1)
            assert (c.head, 0) in drv[1].get_used()
        else:
            dev.enqueue_input(b"ping")
            c = drv[0].add_chain([], [dev.input_limit + 64])
            drv.kick(0)
            used = dict(drv[0].get_used())
            assert c.head in used
            assert mem.read(c.writable[0][0] + used[c.head] - 4, 4) == b"ping"

    def make() -> Console:
        con = Console(queue_size=SIZE, input_limit=256)
        con.enqueue_input(b"input waiting for the guest")
        return con

    check_device(make, s, qi, still_works)


# -- virtio-net on a real tap (root) -----------------------------------------------------------
ETHERTYPE = 0x88B5


@pytest.fixture(scope="module")
def tap_wire() -> Iterator[tuple[Tap, socket.socket]]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a tap")
    with host_tap("stf") as name:
        tap = Tap(name)
        wait_until_up(name)
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        wire.bind((name, 0))
        yield tap, wire
        wire.close()
        tap.close()


def eth(payload: bytes) -> bytes:
    return b"\x52\x54\x00\x12\x34\x56" * 2 + struct.pack("!H", ETHERTYPE) + payload


@pytest.mark.root
@settings(SETTINGS, max_examples=60)
@given(s=scenarios(), qi=st.sampled_from([0, 1]))
def test_net_survives_hostile_queues(
    tap_wire: tuple[Tap, socket.socket], s: Scenario, qi: int
) -> None:
    tap, wire = tap_wire

    def poke(dev: VirtioDeviceBase, loop: EventLoop) -> None:
        if qi == 0:  # a frame is waiting when the guest's rx queue is hostile
            wire.send(eth(b"fuzz" * 16))
            for _ in range(3):
                loop.run_once(0.01)

    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        if qi == 1:
            c = drv[1].add_chain([bytes(12) + eth(b"ok" * 30)])
            drv.kick(1)
            assert (c.head, 0) in drv[1].get_used()
            return
        chains = {drv[0].add_chain([], [2048]).head for _ in range(4)}
        drv.kick(0)
        wire.send(eth(b"after" * 12))
        deadline = time.monotonic() + 5
        while not any(h in chains for h, _ in drv[0].get_used()):
            assert time.monotonic() < deadline, "rx never resumed"
            assert drv.loop is not None
            drv.loop.run_once(0.05)

    check_device(lambda: Net(tap, queue_size=SIZE), s, qi, still_works, poke)
