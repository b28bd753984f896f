"""Fuzz targets "virtio-blk", "virtio-net", "virtio-rng", "virtio-console": hostile drivers.

Each example lays a hostile ring state (tests/fuzz/_rings.py: loops, nested and oversized
indirect tables, buffers in the hole and the guard region, indices near the wrap, more buffers
than IOV_MAX) over a live device, with request-shaped bytes planted in the data area, and
notifies it twice. For any input:
- nothing raises out of `process_queue()` and nothing reaches the device's internal-error
  path (a log record with a traceback);
- the only guest bytes that change are the used ring and buffers some descriptor marked
  device-writable (the guard region's canary included);
- the device either asked for a reset, or then serves a well-formed request correctly (the
  VMM keeps serving); a disk keeps its size;
- blk and rng: serving the kicks allocates at most DEVICE_ALLOC_BUDGET bytes (tracemalloc),
  whatever the ring holds (the per-device budget of issue 10; mmap'd bounce buffers are
  measured by tests/budgets instead).
Compared with tests/devices/virtio/test_virtio_fuzz.py this adds EVENT_IDX on and off, the
IOV_MAX table, the internal-error check, frames counted on the net wire, and regression
examples for the bugs it found.
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
from pathlib import Path

import pytest
from hypothesis import example, given
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
from strato.virtio.device import VIRTIO_F_RING_EVENT_IDX
from strato.virtio.queue import VIRTQ_DESC_F_INDIRECT, Queue
from strato.virtio.testing import DriverQueue, VirtioDriver
from tests.budgets.harness import AllocationPeak
from tests.fuzz import _rings
from tests.fuzz._rings import (
    BIG_COUNT,
    BIG_TABLE,
    DATA,
    DATA_END,
    DRIVER_BUFFERS,
    RINGS,
    SIZE,
    SLOTS,
    RingState,
    ring_states,
)
from tests.fuzz._support import (
    changed_outside,
    count,
    fuzz_settings,
    guarded_memory,
    no_internal_errors,
    snapshot,
)
from tests.taps import host_tap, wait_until_up

DISK_SECTORS = 64
# What two kicks of a queue of SIZE may allocate in Python: a chain's descriptors and views, a
# request's segment list, log records; the 2^32-byte and oversized-table shapes of the ring
# strategies must not show through.
DEVICE_ALLOC_BUDGET = 128 * 1024


@dataclass
class Planted:
    """Bytes the driver left in the data area: random fill, then payloads in some slots."""

    seed: int
    payloads: list[tuple[int, bytes]]


def planted(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[Planted]:
    return st.builds(
        Planted,
        seed=st.integers(0, 2**32 - 1),
        payloads=st.lists(st.tuples(st.integers(0, SLOTS - 1), payload), max_size=10),
    )


def plant(mem: GuestMemory, p: Planted) -> None:
    mem.write(DATA, random.Random(p.seed).randbytes(DATA_END - DATA))
    for slot, data in p.payloads:
        mem.write(DATA + slot * 0x100, data[:0x100])


_BIG_HEAD = RingState(  # one chain: an indirect table of BIG_COUNT writable buffers
    table=[(BIG_TABLE, BIG_COUNT * 16, VIRTQ_DESC_F_INDIRECT, 0)] * SIZE,
    tables=[[] for _ in range(4)],
    heads=[0] * SIZE,
    ahead=1,
    start=0,
    avail_flags=0,
    used_event=0,
    event_idx=False,
)
_NO_PLANT = Planted(0, [])


def lay_out_driver(
    dev: VirtioDeviceBase,
    mem: GuestMemory,
    loop: EventLoop,
    state: RingState,
    plant_: Planted,
    qi: int,
) -> tuple[VirtioDriver, DriverQueue, Queue]:
    """Activate `dev` through a driver and lay `state` over its queue `qi`: (driver, the
    driver's queue, the device's queue)."""
    offered = dev.device_features
    features = offered if state.event_idx else offered & ~(1 << VIRTIO_F_RING_EVENT_IDX)
    drv = VirtioDriver(
        dev,
        mem,
        features=features,
        queue_size=SIZE,
        rings_base=RINGS,
        ring_stride=0x1000,
        buffers_base=DRIVER_BUFFERS[0],
        buffers_end=DRIVER_BUFFERS[1],
    )
    drv.activate(loop)
    plant(mem, plant_)
    dq = drv[qi]
    _rings.lay_out(mem, dq.desc_table, dq.avail_ring, dq.used_ring, SIZE, state)
    q = drv.queues[qi]
    q.next_avail = q.next_used = state.start
    return drv, dq, q


def run_device(
    make: Callable[[], VirtioDeviceBase],
    state: RingState,
    plant_: Planted,
    qi: int,
    still_works: Callable[[GuestMemory, VirtioDriver], None],
    poke: Callable[[VirtioDeviceBase, EventLoop], None] | None = None,
    alloc_budget: int | None = None,
) -> None:
    """Lay `state` over queue `qi` of a fresh device, kick it twice and check the properties
    of the module docstring; `alloc_budget` (bytes) bounds what the two kicks allocate."""
    mem = guarded_memory()
    loop = EventLoop()
    dev = make()
    try:
        drv, dq, q = lay_out_driver(dev, mem, loop, state, plant_, qi)
        allowed = [(dq.used_ring, 6 + 8 * SIZE)]
        allowed += _rings.writable_ranges(mem, dq.desc_table, SIZE)
        before = snapshot(mem)
        with no_internal_errors():
            with AllocationPeak() as alloc:
                dev.process_queue(qi)
                if poke is not None:
                    poke(dev, loop)  # event-loop driven paths (a frame waiting on the tap)
                dev.process_queue(qi)
            if alloc_budget is not None:
                assert alloc.peak <= alloc_budget, f"two kicks allocated {alloc.peak} bytes"
            assert changed_outside(mem, before, allowed) == []
            if dev.needs_reset:
                assert drv.interrupt.needs_reset
                return
            dq.restart_from(q.next_avail, q.next_used)
            still_works(mem, drv)
    finally:
        dev.reset()
        if isinstance(dev, Block):
            dev.disk.close()
        elif isinstance(dev, Rng | Console):
            dev.close()
        loop.close()
        mem.close()


# -- virtio-blk ------------------------------------------------------------------------------
blk_header = st.builds(
    lambda t, sector, seg_sector, seg_count, flags: struct.pack(
        "<IIQQII", t, 0, sector, seg_sector, seg_count, flags
    ),
    st.sampled_from([0, 1, 4, 8, 11, 13, 99, 2**32 - 1]),
    st.sampled_from([0, 3, DISK_SECTORS - 1, DISK_SECTORS, 2**55, 2**63, 2**64 - 1]),
    st.sampled_from([0, 5, DISK_SECTORS - 1, 2**64 - 1]),
    st.sampled_from([0, 1, 8, 2**32 - 1]),
    st.sampled_from([0, 1, 2]),
)


@pytest.fixture(scope="module")
def disk_path() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="strato-fuzz-") as d:
        yield Path(d) / "disk.raw"


@fuzz_settings(120)
@given(state=ring_states(), plant_=planted(blk_header), readonly=st.booleans())
@example(state=_BIG_HEAD, plant_=_NO_PLANT, readonly=False)
def test_virtio_blk_hostile_driver(
    disk_path: Path, state: RingState, plant_: Planted, readonly: bool
) -> None:
    count("virtio-blk")
    content = random.Random(plant_.seed).randbytes(DISK_SECTORS * 512)
    disk_path.write_bytes(content)

    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        dq = drv[0]
        now = disk_path.read_bytes()
        c = dq.add_chain([struct.pack("<IIQ", 0, 0, 3)], [512, 1])
        drv.kick(0)
        assert (c.head, 513) in dq.get_used()
        assert mem.read(c.writable[1][0], 1) == b"\0"
        assert mem.read(c.writable[0][0], 512) == now[3 * 512 : 4 * 512]
        if readonly:
            assert now == content

    run_device(
        lambda: Block(RawFile(str(disk_path), readonly=readonly), queue_size=SIZE),
        state,
        plant_,
        0,
        still_works,
        alloc_budget=DEVICE_ALLOC_BUDGET,
    )
    assert disk_path.stat().st_size == DISK_SECTORS * 512


# -- virtio-rng ------------------------------------------------------------------------------
@fuzz_settings(120)
@given(state=ring_states(), plant_=planted(st.binary(max_size=16)))
@example(state=_BIG_HEAD, plant_=_NO_PLANT)  # more buffers than IOV_MAX: needed a reset
def test_virtio_rng_hostile_driver(state: RingState, plant_: Planted) -> None:
    count("virtio-rng")

    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        c = drv[0].add_chain([], [32])
        drv.kick(0)
        assert (c.head, 32) in drv[0].get_used()

    run_device(
        lambda: Rng(queue_size=SIZE),
        state,
        plant_,
        0,
        still_works,
        alloc_budget=DEVICE_ALLOC_BUDGET,
    )


# -- virtio-console --------------------------------------------------------------------------
@fuzz_settings(120)
@given(state=ring_states(), plant_=planted(st.binary(max_size=64)), qi=st.sampled_from([0, 1]))
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=0)
def test_virtio_console_hostile_driver(state: RingState, plant_: Planted, qi: int) -> None:
    count("virtio-console")

    def still_works(mem: GuestMemory, drv: VirtioDriver) -> None:
        dev = drv.device
        assert isinstance(dev, Console)
        if qi == 1:
            c = drv[1].add_chain([b"still here"])
            drv.kick(1)
            assert (c.head, 0) in drv[1].get_used()
            return
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

    run_device(make, state, plant_, qi, still_works)


# -- virtio-net on a real tap (root) ---------------------------------------------------------
ETHERTYPE = 0x88B5


@pytest.fixture(scope="module")
def tap_wire() -> Iterator[tuple[Tap, socket.socket]]:
    if os.geteuid() != 0:
        pytest.skip("virtio-net needs a real tap, and creating one needs root")
    with host_tap("stfz") as name:
        tap = Tap(name)
        wait_until_up(name)
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        wire.bind((name, 0))
        yield tap, wire
        wire.close()
        tap.close()


def eth(payload: bytes) -> bytes:
    return b"\x52\x54\x00\x12\x34\x56" * 2 + struct.pack("!H", ETHERTYPE) + payload


def _drain_wire(wire: socket.socket) -> None:
    wire.setblocking(False)
    try:
        while True:
            wire.recv(65536)
    except BlockingIOError:
        pass


def _drain_tap(tap: Tap) -> None:
    try:
        while True:
            os.read(tap.fd, 1 << 17)
    except BlockingIOError:
        pass


net_payload = st.builds(
    lambda hdr, frame: hdr + frame,
    st.sampled_from([bytes(12), b"\x01" + bytes(11), b"\x01\x04" + b"\xff" * 10]),
    st.binary(max_size=64).map(eth) | st.binary(max_size=20),
)


@pytest.mark.root
@fuzz_settings(60)
@given(state=ring_states(), plant_=planted(net_payload), qi=st.sampled_from([0, 1]))
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=0)  # rx spun on a frame it could never take
def test_virtio_net_hostile_driver(
    tap_wire: tuple[Tap, socket.socket], state: RingState, plant_: Planted, qi: int
) -> None:
    count("virtio-net")
    tap, wire = tap_wire
    _drain_wire(wire)

    def poke(dev: VirtioDeviceBase, loop: EventLoop) -> None:
        if qi == 0:  # a frame waits while the guest's rx queue is hostile
            _drain_tap(tap)  # frames left from earlier examples would be dropped too
            dropped = dev.stats["rx_dropped"]
            wire.send(eth(b"fuzz" * 16))
            for _ in range(3):
                loop.run_once(0.01)
            # One frame sent: the device may drop it once, not spin on it.
            assert dev.stats["rx_dropped"] <= dropped + 1

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

    run_device(lambda: Net(tap, queue_size=SIZE), state, plant_, qi, still_works, poke)


# -- the resource budget of virtio-net and virtio-console (issue 10) ---------------------------
# Whatever the ring holds, one kick and every loop turn after it stay within the acceptance
# budget: under 64 MiB of host memory allocated at peak (tracemalloc: what the device's Python
# code allocates, guest memory excluded) and under 100 ms of loop-thread CPU time each.
BUDGET_BYTES = 64 << 20
BUDGET_TURN = 0.100


def run_budgeted(
    make: Callable[[], VirtioDeviceBase],
    state: RingState,
    plant_: Planted,
    qi: int,
    poke: Callable[[], None] | None = None,
) -> None:
    import tracemalloc

    mem = guarded_memory()
    loop = EventLoop()
    dev = make()
    tracemalloc.start()
    try:
        lay_out_driver(dev, mem, loop, state, plant_, qi)
        if poke is not None:
            poke()

        def turn(fn: Callable[[], object]) -> object:
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            t0 = time.thread_time()  # CPU time: other processes on the machine do not count
            out = fn()
            took = time.thread_time() - t0
            grew = tracemalloc.get_traced_memory()[1] - base
            assert grew <= BUDGET_BYTES, f"one turn allocated {grew} bytes"
            assert took <= BUDGET_TURN, f"one turn took {took * 1e3:.1f} ms"
            return out

        with no_internal_errors():
            turn(lambda: dev.process_queue(qi))
            for _ in range(1000):
                if not turn(lambda: loop.run_once(0.01 if poke is not None else 0)):
                    break
            else:
                raise AssertionError("the loop never went idle")
    finally:
        tracemalloc.stop()
        dev.reset()
        if isinstance(dev, Console):
            dev.close()
        loop.close()
        mem.close()


@fuzz_settings(60)
@given(state=ring_states(), plant_=planted(st.binary(max_size=64)), qi=st.sampled_from([0, 1]))
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=0)
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=1)
def test_virtio_console_hostile_driver_budget(state: RingState, plant_: Planted, qi: int) -> None:
    count("virtio-console")

    def make() -> Console:
        con = Console(queue_size=SIZE, input_limit=256)
        con.enqueue_input(b"input waiting for the guest")
        return con

    run_budgeted(make, state, plant_, qi)


@pytest.mark.root
@fuzz_settings(30)
@given(state=ring_states(), plant_=planted(net_payload), qi=st.sampled_from([0, 1]))
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=0)
@example(state=_BIG_HEAD, plant_=_NO_PLANT, qi=1)
def test_virtio_net_hostile_driver_budget(
    tap_wire: tuple[Tap, socket.socket], state: RingState, plant_: Planted, qi: int
) -> None:
    count("virtio-net")
    tap, wire = tap_wire
    _drain_wire(wire)

    def poke() -> None:
        if qi == 0:  # frames wait while the guest's rx queue is hostile
            for _ in range(3):
                wire.send(eth(b"fuzz" * 300))

    run_budgeted(lambda: Net(tap, queue_size=SIZE), state, plant_, qi, poke)
