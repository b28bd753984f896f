"""virtio-rng driven by the Python driver."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato._sys.ratelog import RateLimitedLog
from strato.devices.virtio.base import TURN_DESCRIPTORS
from strato.devices.virtio.rng import MAX_REQUEST, Rng
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.device import TYPE_RNG
from strato.virtio.queue import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from strato.virtio.testing import VirtioDriver


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4 << 20)])
    yield m
    m.close()


def test_fills_writable_buffers_from_the_source(
    mem: GuestMemory, loop: EventLoop, tmp_path: Path
) -> None:
    src = tmp_path / "entropy"
    pattern = bytes(range(256)) * 4
    src.write_bytes(pattern)
    dev = Rng(str(src))
    assert dev.device_type == TYPE_RNG and dev.read_config(0, 4) == b"\0" * 4
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    c = drv[0].add_chain([], [100, 28])
    drv.kick(0)
    assert drv[0].get_used() == [(c.head, 128)]
    (a1, _), (a2, _) = c.writable
    assert mem.read(a1, 100) + mem.read(a2, 28) == pattern[:128]
    assert dev.counters() == {"read_bytes": 128, "read_ops": 1}
    assert drv.interrupt.used == [0]
    dev.close()


def test_urandom_by_default(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    chains = [drv[0].add_chain([], [256]) for _ in range(4)]
    drv.kick(0)
    assert drv[0].get_used() == [(c.head, 256) for c in chains]
    blobs = {mem.read(c.writable[0][0], 256) for c in chains}
    assert len(blobs) == 4 and bytes(256) not in blobs
    dev.close()


def test_readable_only_chain_gets_nothing(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    c = drv[0].add_chain([b"not for me"])
    drv.kick(0)
    assert drv[0].get_used() == [(c.head, 0)]
    dev.close()


def test_requests_are_bounded(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    c = drv[0].add_chain([], [MAX_REQUEST + 4096])
    drv.kick(0)
    assert drv[0].get_used() == [(c.head, MAX_REQUEST)]
    dev.close()


def test_bad_buffer_is_returned_unused(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    bad = drv[0].add_chain([], [(1 << 40, 64)])
    good = drv[0].add_chain([], [64])
    drv.kick(0)
    assert drv[0].get_used() == [(bad.head, 0), (good.head, 64)]
    assert not drv.interrupt.needs_reset
    dev.close()


def test_missing_source_fails_at_construction() -> None:
    with pytest.raises(OSError, match="/nonexistent/rng"):
        Rng("/nonexistent/rng")


def test_state_round_trip(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    drv[0].add_chain([], [16])
    drv.kick(0)
    other = Rng()
    other.restore(json.loads(json.dumps(dev.state())))
    assert other.counters() == dev.counters() and other.acked_features == dev.acked_features
    dev.close()
    other.close()


def test_reset_then_activate_again(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Rng()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    drv.activate(loop)  # twice without a reset: the old data plane is stopped first
    dev.reset()
    assert dev.acked_features == 0 and not dev.active
    dev.process_queue(0)  # inactive: ignored
    drv2 = VirtioDriver(dev, mem)
    drv2.activate(loop)
    c = drv2[0].add_chain([], [8])
    drv2.kick(0)
    assert drv2[0].get_used() == [(c.head, 8)]
    dev.close()


def test_log_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    rl = RateLimitedLog(logging.getLogger("strato.test.ratelimit"), burst=3, interval=60)
    with caplog.at_level(logging.WARNING, logger="strato.test.ratelimit"):
        for i in range(10):
            rl.warning("message %d", i)
    assert [r.getMessage() for r in caplog.records] == ["message 0", "message 1", "message 2"]
    assert rl.suppressed == 7


# -- a source that has nothing to give ------------------------------------------------------------
def test_starved_source_leaves_the_chain_waiting(
    mem: GuestMemory, loop: EventLoop, tmp_path: Path
) -> None:
    """A FIFO with nothing in it: the kick returns at once (the source is non-blocking), the
    chain stays queued, and the loop serves it once the source is readable."""
    fifo = tmp_path / "entropy"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    dev = Rng(str(fifo))
    try:
        drv = VirtioDriver(dev, mem)
        drv.activate(loop)
        c = drv[0].add_chain([], [16])
        drv.kick(0)  # would block forever on a blocking source
        assert drv[0].get_used() == [] and drv.interrupt.used == []
        assert loop.run_once(0) == 0  # nothing readable yet: nothing runs
        os.write(writer, b"0123456789abcdef")
        assert loop.run_once(1) == 1
        assert drv[0].get_used() == [(c.head, 16)]
        assert mem.read(c.writable[0][0], 16) == b"0123456789abcdef"
        assert drv.interrupt.used == [0]
        # A kick while waiting does not read again; reset forgets the wait.
        c2 = drv[0].add_chain([], [8])
        drv.kick(0)
        assert drv[0].get_used() == []
        dev.reset()
        assert loop.run_once(0) == 0
        os.write(writer, b"x" * 8)
        assert loop.run_once(0) == 0  # the source is no longer on the loop
        assert c2.head is not None
    finally:
        dev.close()
        os.close(writer)


def test_work_per_turn_is_bounded(mem: GuestMemory, loop: EventLoop) -> None:
    """256 self-looping chains (each costs the whole queue size to refuse): one kick serves
    TURN_DESCRIPTORS worth, the rest is served on the next loop turns, not in one go."""
    dev = Rng(queue_size=256)
    try:
        drv = VirtioDriver(dev, mem)
        drv.activate(loop)
        dq = drv[0]
        dq.write_desc(0, 0x200000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
        for slot in range(256):
            dq.write_avail_entry(slot, 0)
        dq.set_avail_idx(256)
        drv.kick(0)
        per_turn = TURN_DESCRIPTORS // 256
        assert len(dq.get_used()) == per_turn
        turns = 0
        while loop.run_once(0):
            turns += 1
        assert turns == 256 // per_turn - 1  # 7 more turns of 32, none wasted
        assert dq.used_idx == 256 and not dev.needs_reset
        good = dq.add_chain([], [8])  # the queue goes on
        drv.kick(0)
        assert (good.head, 8) in dq.get_used()
    finally:
        dev.close()
