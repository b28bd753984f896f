"""virtio-net behind rate limiters (one per direction), on a real tap and a fake clock.

As in Cloud Hypervisor, the frame that empties a bucket still goes; the frames after it wait
(in the tx ring, or in the tap for rx) until the limiter's timer fires. Nothing is dropped.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from strato.devices.backends.tap import VNET_HDR_SIZE, Tap
from strato.devices.rate_limiter import REFILL_TIMER_INTERVAL_NS, RateLimiter
from strato.devices.virtio.net import RX_QUEUE, TX_QUEUE, Net
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import VirtioDriver
from tests.devices.rate_limiter_fakes import FakeClock, FakeTimer
from tests.taps import host_tap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a tap"),
]

ETHERTYPE = 0x88B5
GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("525400abcdef")


@pytest.fixture
def tap_name() -> Iterator[str]:
    with host_tap("strl") as name:
        yield name


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 8 << 20)])
    yield m
    m.close()


@pytest.fixture
def wire(tap_name: str) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((tap_name, 0))
    s.settimeout(0.05)
    yield s
    s.close()


def frame(seq: int, dst: bytes, src: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + f"RL-{seq:04d}".encode().ljust(50, b".")


def wait_link_up(name: str) -> None:
    deadline = time.monotonic() + 5
    while open(f"/sys/class/net/{name}/operstate").read().strip() != "up":
        assert time.monotonic() < deadline, f"{name} never came up"
        time.sleep(0.01)  # polling sysfs: the poll interval, not a correctness wait


def pump(loop: EventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)


def captured(wire: socket.socket, want: int, timeout: float = 5.0) -> list[bytes]:
    """Our frames seen on the host side, until `want` arrived (or the deadline)."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        try:
            data = wire.recv(4096)
        except TimeoutError:
            continue
        if data[12:14] == struct.pack("!H", ETHERTYPE) and data[:6] == HOST_MAC:
            got.append(data)
    return got


def test_tx_limit_holds_frames_in_the_ring_until_the_timer(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    tx_rl = RateLimiter.create(ops_size=2, ops_refill_time=100, clock=clock, timer=timer)
    dev = Net(Tap(tap_name), mac=GUEST_MAC, tx_rate_limiter=tx_rl)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    wait_link_up(tap_name)
    try:
        frames = [frame(i, HOST_MAC, GUEST_MAC) for i in range(5)]
        chains = [drv[TX_QUEUE].add_chain([bytes(VNET_HDR_SIZE) + f]) for f in frames]
        drv.kick(TX_QUEUE)
        used = drv[TX_QUEUE].get_used()
        # two tokens, and the frame that found the bucket empty still goes
        assert [h for h, _ in used] == [c.head for c in chains[:3]]
        assert tx_rl.blocked and timer.armed == [REFILL_TIMER_INTERVAL_NS]
        assert dev.queues[TX_QUEUE].pending(mem) == 2
        assert captured(wire, 3) == frames[:3]
        clock.advance(REFILL_TIMER_INTERVAL_NS)
        dev._on_tx_rate_timer(select.EPOLLIN)
        assert [h for h, _ in drv[TX_QUEUE].get_used()] == [c.head for c in chains[3:]]
        assert captured(wire, 2) == frames[3:]
        assert dev.counters()["tx_frames"] == 5 and dev.counters()["tx_dropped"] == 0
    finally:
        dev.reset()
        dev.close()
        dev.tap.close()


def test_rx_limit_leaves_frames_in_the_tap_until_the_timer(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    clock, timer = FakeClock(), FakeTimer()
    rx_rl = RateLimiter.create(ops_size=2, ops_refill_time=100, clock=clock, timer=timer)
    dev = Net(Tap(tap_name), mac=GUEST_MAC, rx_rate_limiter=rx_rl)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    wait_link_up(tap_name)
    try:
        rx = {c.head: c for c in (drv[RX_QUEUE].add_chain([], [2048]) for _ in range(8))}
        drv.kick(RX_QUEUE)
        sent = [frame(i, GUEST_MAC, HOST_MAC) for i in range(5)]
        for f in sent:
            wire.send(f)
        used: list[tuple[int, int]] = []

        def ours() -> list[bytes]:
            out = []
            for head, length in used:
                data = mem.read(rx[head].writable[0][0], length)[VNET_HDR_SIZE:]
                if data[12:14] == struct.pack("!H", ETHERTYPE):
                    out.append(data)
            return out

        def received(n: int) -> Callable[[], bool]:
            def check() -> bool:
                used.extend(drv[RX_QUEUE].get_used())
                return len(ours()) >= n

            return check

        pump(loop, received(3))
        loop.run_once(0.2)  # frames are waiting in the tap: none may be taken while blocked
        used.extend(drv[RX_QUEUE].get_used())
        assert ours() == sent[:3]
        assert rx_rl.blocked and dev.rx_throttled
        clock.advance(REFILL_TIMER_INTERVAL_NS)
        dev._on_rx_rate_timer(select.EPOLLIN)
        pump(loop, received(5))
        assert ours() == sent
        assert dev.counters()["rx_dropped"] == 0
    finally:
        dev.reset()
        dev.close()
        dev.tap.close()
