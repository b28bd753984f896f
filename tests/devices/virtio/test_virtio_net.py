"""virtio-net on a real tap, with frames sent and received on the host side (needs root)."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from strato.devices.backends.tap import TUN_F_CSUM, TUN_F_TSO4, VNET_HDR_SIZE, Tap, TapError
from strato.devices.virtio.net import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_STATUS,
    Net,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import DriverChain, VirtioDriver
from tests.taps import host_tap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a tap"),
]

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the tap uses it
GUEST_MAC = bytes.fromhex("525400123456")
HOST_MAC = bytes.fromhex("525400abcdef")
RX_BUF = 2048


@pytest.fixture
def tap_name() -> Iterator[str]:
    with host_tap("stv") as name:
        yield name


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 8 << 20)])
    yield m
    m.close()


@pytest.fixture
def wire(tap_name: str) -> Iterator[socket.socket]:
    """The host end: a packet socket on the tap interface."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((tap_name, 0))
    s.settimeout(0.05)
    yield s
    s.close()


def frame(payload: bytes, dst: bytes = GUEST_MAC, src: bytes = HOST_MAC) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + payload


def pump(loop: EventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)


def start(
    mem: GuestMemory, loop: EventLoop, tap_name: str, features: int | None = None
) -> tuple[Net, VirtioDriver]:
    dev = Net(Tap(tap_name), mac=GUEST_MAC)
    drv = VirtioDriver(dev, mem, features=features)
    drv.activate(loop)
    wait_link_up(tap_name)
    return dev, drv


def wait_link_up(name: str) -> None:
    # Attaching the fd turns the carrier on, but the kernel activates the qdisc a little later
    # (linkwatch); frames sent from the host side before that are dropped.
    deadline = time.monotonic() + 5
    path = f"/sys/class/net/{name}/operstate"
    while open(path).read().strip() != "up":
        assert time.monotonic() < deadline, f"{name} never came up"
        time.sleep(0.01)


def ours(
    mem: GuestMemory, chains: dict[int, DriverChain], used: list[tuple[int, int]]
) -> list[bytes]:
    """Frames with our ethertype among the used rx buffers (virtio header checked and cut)."""
    out = []
    for head, length in used:
        addr, _ = chains[head].writable[0]
        data = mem.read(addr, length)
        hdr, eth = data[:VNET_HDR_SIZE], data[VNET_HDR_SIZE:]
        assert struct.unpack_from("<H", hdr, 10)[0] == 1  # num_buffers
        if len(eth) >= 14 and struct.unpack_from("!H", eth, 12)[0] == ETHERTYPE:
            assert hdr[0] == 0 and hdr[1] == 0  # no checksum offload, no GSO
            out.append(eth)
    return out


def add_rx(drv: VirtioDriver, n: int) -> dict[int, DriverChain]:
    return {c.head: c for c in (drv[RX_QUEUE].add_chain([], [RX_BUF]) for _ in range(n))}


def test_config_and_features(mem: GuestMemory, loop: EventLoop, tap_name: str) -> None:
    dev, _ = start(mem, loop, tap_name)
    assert dev.device_features >> VIRTIO_NET_F_MAC & 1
    assert dev.device_features >> VIRTIO_NET_F_STATUS & 1
    assert dev.read_config(0, 6) == GUEST_MAC
    assert struct.unpack("<HH", dev.read_config(6, 4)) == (1, 1)  # link up, one pair
    assert dev.queue_max_sizes == [256, 256]
    dev.reset()
    dev.tap.close()


def test_host_to_guest(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    chains = add_rx(drv, 8)
    drv.kick(RX_QUEUE)
    sent = [frame(bytes([i]) * (60 + i)) for i in range(3)]
    for f in sent:
        wire.send(f)
    got: list[bytes] = []
    used: list[tuple[int, int]] = []

    def three() -> bool:
        used.extend(drv[RX_QUEUE].get_used())
        got[:] = ours(mem, chains, used)
        return len(got) >= 3

    pump(loop, three)
    assert got == sent
    assert dev.counters()["rx_frames"] >= 3
    assert dev.counters()["rx_bytes"] >= sum(len(f) for f in sent)
    assert drv.interrupt.count(RX_QUEUE) >= 1
    dev.reset()
    dev.tap.close()


def test_guest_to_host(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    tx = drv[TX_QUEUE]
    payload = os.urandom(100)
    f = frame(payload, dst=HOST_MAC, src=GUEST_MAC)
    c = tx.add_chain([bytes(VNET_HDR_SIZE), f[:20], f[20:]])  # header, then a split frame
    drv.kick(TX_QUEUE)
    assert tx.get_used() == [(c.head, 0)]
    assert drv.interrupt.count(TX_QUEUE) == 1
    deadline = time.monotonic() + 5
    while True:
        assert time.monotonic() < deadline, "frame never reached the host side"
        try:
            data = wire.recv(4096)
        except TimeoutError:
            continue
        if data[12:14] == struct.pack("!H", ETHERTYPE) and data[:6] == HOST_MAC:
            break
    assert data == f
    assert dev.counters()["tx_frames"] == 1 and dev.counters()["tx_bytes"] == len(f)
    dev.reset()
    dev.tap.close()


def test_no_rx_buffers_pauses_the_tap_without_dropping(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    sent = [frame(bytes([0x40 + i]) * 64) for i in range(4)]
    for f in sent:
        wire.send(f)
    pump(loop, lambda: dev.rx_paused)
    for _ in range(5):  # the tap is masked: the loop sleeps instead of spinning
        assert loop.run_once(0.02) == 0
    assert dev.counters()["rx_frames"] == 0 and dev.counters()["rx_dropped"] == 0
    chains = add_rx(drv, 16)
    drv.kick(RX_QUEUE)  # the guest's rx notify resumes reading
    assert not dev.rx_paused
    used: list[tuple[int, int]] = []

    def all_four() -> bool:
        used.extend(drv[RX_QUEUE].get_used())
        return len(ours(mem, chains, used)) >= 4

    pump(loop, all_four)
    assert ours(mem, chains, used) == sent
    dev.reset()
    dev.tap.close()


def test_guest_offloads_set_the_tap(mem: GuestMemory, loop: EventLoop, tap_name: str) -> None:
    probe = Net(Tap(tap_name))
    offered = probe.device_features
    probe.tap.close()
    want = (1 << VIRTIO_NET_F_GUEST_CSUM) | (1 << VIRTIO_NET_F_GUEST_TSO4)
    dev, _ = start(mem, loop, tap_name, features=offered & ~((1 << 16) - 1) | want)
    assert dev.tap.offload == TUN_F_CSUM | TUN_F_TSO4
    dev.reset()
    dev.tap.close()


def test_bad_tx_chain_is_dropped_and_the_queue_goes_on(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    tx = drv[TX_QUEUE]
    bad = tx.add_chain([(1 << 40, 64)])
    short = tx.add_chain([b"tiny"])
    good = tx.add_chain([bytes(VNET_HDR_SIZE) + frame(b"ok" * 30, dst=HOST_MAC)])
    drv.kick(TX_QUEUE)
    assert tx.get_used() == [(bad.head, 0), (short.head, 0), (good.head, 0)]
    assert dev.counters()["tx_dropped"] == 2 and dev.counters()["tx_frames"] == 1
    assert not drv.interrupt.needs_reset
    dev.reset()
    dev.tap.close()


def test_corrupt_rx_queue_needs_reset(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    drv[RX_QUEUE].set_avail_idx(1000)
    wire.send(frame(b"x" * 60))
    pump(loop, lambda: drv.interrupt.needs_reset)
    assert dev.needs_reset
    dev.reset()
    dev.tap.close()


def test_state_round_trip(mem: GuestMemory, loop: EventLoop, tap_name: str) -> None:
    dev, _ = start(mem, loop, tap_name)
    state = json.loads(json.dumps(dev.state()))
    dev.reset()
    dev.tap.close()
    other = Net(Tap(tap_name))
    other.restore(state)
    assert other.mac == GUEST_MAC and other.acked_features == state["acked_features"]
    other.tap.close()


def test_tap_errors_name_the_tap() -> None:
    with pytest.raises(TapError, match="x" * 20):
        Tap("x" * 20)
    with pytest.raises(TapError, match="bad/name"):
        Tap("bad/name")


def test_tap_without_permission_fails_at_construction(tap_name: str) -> None:
    # A child without CAP_NET_ADMIN cannot attach to root's tap: the error names it.
    code = (
        "import os, sys\n"
        "from strato.devices.backends.tap import Tap, TapError\n"
        "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    Tap({tap_name!r})\n"
        "except TapError as e:\n"
        f"    sys.exit(0 if {tap_name!r} in str(e) else 2)\n"
        "sys.exit(1)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
