"""virtio-net on a real tap, with frames sent and received on the host side (needs root)."""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.devices.backends.tap import TUN_F_CSUM, TUN_F_TSO4, VNET_HDR_SIZE, Tap, TapError
from strato.devices.rate_limiter import REFILL_TIMER_INTERVAL_NS, RateLimiter
from strato.devices.virtio.net import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_NET_CTRL_ANNOUNCE,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MQ,
    VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_CTRL_VLAN,
    VIRTIO_NET_ERR,
    VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_OK,
    Net,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import DriverChain, VirtioDriver
from tests.devices.rate_limiter_fakes import FakeClock, FakeTimer
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
    wire.send(frame(b"y" * 60))  # frames keep coming: the stopped queue must not spin the loop
    ran = [loop.run_once(0.02) for _ in range(5)]
    assert ran[1:] == [0] * 4, ran
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


# -- hostile guests (issue 10) -------------------------------------------------------------------
def wait_frame(wire: socket.socket, want: Callable[[bytes], bool], timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "frame never reached the host side"
        try:
            data = wire.recv(1 << 17)
        except TimeoutError:
            continue
        if want(data):
            return data


def test_rx_frame_longer_than_the_buffers_is_dropped_and_counted(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev, drv = start(mem, loop, tap_name)
    small = drv[RX_QUEUE].add_chain([], [VNET_HDR_SIZE + 100])
    drv.kick(RX_QUEUE)
    wire.send(frame(b"L" * 1000))  # longer than the guest's 100 bytes
    wire.send(frame(b"s" * 60))  # fits
    used: list[tuple[int, int]] = []

    def one() -> bool:
        used.extend(drv[RX_QUEUE].get_used())
        return bool(used)

    pump(loop, one)
    assert dev.counters()["rx_truncated"] >= 1
    assert dev.counters()["rx_dropped"] >= dev.counters()["rx_truncated"]
    # the chain went to the next frame that fits, never to a cut one
    assert used == [(small.head, VNET_HDR_SIZE + 14 + 60)]
    assert ours(mem, {small.head: small}, used) == [frame(b"s" * 60)]
    dev.reset()
    dev.tap.close()


def test_tx_frame_longer_than_the_largest_is_dropped_unread(
    mem: GuestMemory, loop: EventLoop, tap_name: str
) -> None:
    from strato.devices.virtio.net import MAX_TX_FRAME

    dev, drv = start(mem, loop, tap_name)
    tx = drv[TX_QUEUE]
    alias = (0x400000, 4096)
    c = tx.add_chain([alias] * 17, indirect=True)  # 68 KiB of one aliased page
    assert 17 * 4096 > MAX_TX_FRAME
    drv.kick(TX_QUEUE)
    assert tx.get_used() == [(c.head, 0)]
    assert dev.counters()["tx_dropped"] == 1 and dev.counters()["tx_frames"] == 0
    dev.reset()
    dev.tap.close()


def test_tx_frame_of_more_than_iov_max_buffers_arrives_whole(
    mem: GuestMemory, loop: EventLoop, tap_name: str, wire: socket.socket
) -> None:
    dev = Net(Tap(tap_name), mac=GUEST_MAC, queue_size=2048)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    wait_link_up(tap_name)
    f = frame(os.urandom(1100), dst=HOST_MAC, src=GUEST_MAC)
    parts = [bytes(VNET_HDR_SIZE)] + [f[i : i + 1] for i in range(len(f))]
    assert len(parts) > 1024
    c = drv[TX_QUEUE].add_chain(parts, indirect=True)
    drv.kick(TX_QUEUE)
    assert drv[TX_QUEUE].get_used() == [(c.head, 0)]
    assert dev.counters()["tx_frames"] == 1
    got = wait_frame(wire, lambda d: d[:6] == HOST_MAC and d[12:14] == f[12:14])
    assert got == f
    dev.reset()
    dev.close()
    dev.tap.close()


def test_tx_kick_yields_after_its_burst(mem: GuestMemory, loop: EventLoop, tap_name: str) -> None:
    from strato.devices.virtio.net import TX_BURST

    dev = Net(Tap(tap_name), mac=GUEST_MAC, queue_size=512)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    tx = drv[TX_QUEUE]
    for _ in range(TX_BURST + 44):
        tx.add_chain([(0x400000, VNET_HDR_SIZE + 60)])
    drv.kick(TX_QUEUE)
    assert len(tx.get_used()) == TX_BURST  # the rest waits for the next loop turn
    pump(loop, lambda: dev.counters()["tx_frames"] + dev.counters()["tx_dropped"] == 300)
    assert len(tx.get_used()) == 44
    dev.reset()
    dev.close()
    dev.tap.close()


def test_feature_dependencies() -> None:
    from strato.devices.virtio.net import (
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_HOST_TSO6,
    )

    def bits(*b: int) -> int:
        return sum(1 << x for x in b)

    assert Net.feature_conflict(bits(VIRTIO_NET_F_GUEST_TSO4)) is not None
    assert Net.feature_conflict(bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4)) is None
    assert Net.feature_conflict(bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN)) is not None
    assert (
        Net.feature_conflict(
            bits(VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_ECN)
        )
        is None
    )
    assert Net.feature_conflict(bits(VIRTIO_NET_F_HOST_TSO6)) is not None
    assert Net.feature_conflict(bits(VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO6)) is None


def test_features_ok_refused_through_the_transport(tap_name: str) -> None:
    from strato.virtio.pci import VirtioPciDevice
    from tests.pci.helpers import LinuxLikeDriver, make_machine

    mem, mmio, _, root = make_machine()
    loop = EventLoop()
    dev = Net(Tap(tap_name), mac=GUEST_MAC)
    transport = VirtioPciDevice(dev, None, mem, loop)
    drv = LinuxLikeDriver(mmio, root.add_device(transport))
    drv.probe()
    try:
        v1 = 1 << 32
        assert not drv.negotiate(v1 | 1 << VIRTIO_NET_F_GUEST_TSO4)  # needs GUEST_CSUM
        assert dev.acked_features == 0
        assert drv.negotiate(v1 | 1 << VIRTIO_NET_F_GUEST_TSO4 | 1 << VIRTIO_NET_F_GUEST_CSUM)
        assert dev.has_feature(VIRTIO_NET_F_GUEST_TSO4)
        drv.reset()
        assert dev.acked_features == 0  # a reset forgets what was negotiated
    finally:
        transport.close()
        dev.close()
        dev.tap.close()
        loop.close()
        mem.close()


def test_failed_activation_leaves_nothing_behind(
    mem: GuestMemory, loop: EventLoop, tap_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev = Net(Tap(tap_name), mac=GUEST_MAC)
    live: set[int] = set()
    register, unregister = loop.register, loop.unregister

    def failing_register(fd: int, cb: Callable[[int], None], events: int = 1) -> None:
        if fd == dev.tap.fd:
            raise OSError(12, "Cannot allocate memory")
        register(fd, cb, events)
        live.add(fd)

    def tracking_unregister(fd: int) -> None:
        unregister(fd)
        live.discard(fd)

    monkeypatch.setattr(loop, "register", failing_register)
    monkeypatch.setattr(loop, "unregister", tracking_unregister)
    drv = VirtioDriver(dev, mem)
    with pytest.raises(OSError, match="Cannot allocate"):
        drv.activate(loop)
    assert not dev.active and live == set()  # all or nothing
    monkeypatch.setattr(loop, "register", register)
    dev.reset()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    assert dev.active
    dev.reset()
    dev.close()
    dev.tap.close()


# -- multiqueue (VIRTIO_NET_F_MQ, the control queue) -------------------------------------------
MQ_PAIRS = 4
CTRL_QUEUE = 2 * MQ_PAIRS  # rx0, tx0, ..., rx3, tx3, then the control queue (5.1.2)


@pytest.fixture
def mq_tap_name() -> Iterator[str]:
    """A tap made with multi_queue (one fd per queue pair), IPv6 off, deleted afterwards."""
    name = f"stm{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "multi_queue"], check=True)
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


@pytest.fixture
def mq_wire(mq_tap_name: str) -> Iterator[socket.socket]:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((mq_tap_name, 0))
    s.settimeout(0.05)
    yield s
    s.close()


def start_mq(
    mem: GuestMemory, loop: EventLoop, name: str, features: int | None = None
) -> tuple[Net, VirtioDriver]:
    dev = Net(Tap.open_queues(name, MQ_PAIRS), mac=GUEST_MAC)
    drv = VirtioDriver(dev, mem, features=features)
    drv.activate(loop)
    wait_link_up(name)
    return dev, drv


def stop_mq(dev: Net) -> None:
    dev.reset()
    dev.close()
    for t in dev.taps:
        t.close()


def ctrl(
    drv: VirtioDriver,
    readable: list[bytes | tuple[int, int]],
    ack_len: int = 1,
    queue: int = CTRL_QUEUE,
) -> tuple[int, int | None]:
    """One control request (the readable pieces as given), kicked: (used length, ack byte)."""
    c = drv[queue].add_chain(readable, [ack_len] if ack_len else [])
    drv.kick(queue)
    ((head, length),) = drv[queue].get_used()
    assert head == c.head
    return length, drv.mem.read(c.writable[0][0], 1)[0] if ack_len else None


def pairs_set(drv: VirtioDriver, n: int, queue: int = CTRL_QUEUE) -> int:
    """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n; the device's ack."""
    c = drv[queue].add_chain([bytes([VIRTIO_NET_CTRL_MQ, 0]), struct.pack("<H", n)], [1])
    drv.kick(queue)
    assert drv[queue].get_used() == [(c.head, 1)]
    return drv.mem.read(c.writable[0][0], 1)[0]


def udp_frame(src_mac: bytes, dst_mac: bytes, sport: int, dport: int, text: bytes) -> bytes:
    """An IPv4/UDP frame between two documentation addresses (checksums zero: not checked)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(text), 0) + text
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, bytes([192, 0, 2, 1]),
        bytes([192, 0, 2, 2]),
    )  # fmt: skip
    if sport > dport:  # the reply direction: addresses swapped
        ip = ip[:12] + ip[16:20] + ip[12:16]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def test_mq_features_config_and_queues(mem: GuestMemory, loop: EventLoop, mq_tap_name: str) -> None:
    dev, _ = start_mq(mem, loop, mq_tap_name)
    assert dev.device_features >> VIRTIO_NET_F_MQ & 1
    assert dev.device_features >> VIRTIO_NET_F_CTRL_VQ & 1
    assert struct.unpack("<HH", dev.read_config(6, 4)) == (1, MQ_PAIRS)  # link up, 4 pairs
    assert dev.queue_max_sizes == [256] * (2 * MQ_PAIRS + 1)
    assert dev.ctrl_queue == CTRL_QUEUE and dev.active_pairs == 1
    # MQ needs CTRL_VQ (5.1.3.1); one pair offers neither (two queues, as before).
    assert Net.feature_conflict(1 << VIRTIO_NET_F_MQ) is not None
    assert Net.feature_conflict(1 << VIRTIO_NET_F_MQ | 1 << VIRTIO_NET_F_CTRL_VQ) is None
    stop_mq(dev)


def test_a_single_queue_tap_cannot_take_several_pairs(tap_name: str) -> None:
    with pytest.raises(TapError, match="multi_queue"):
        Tap.open_queues(tap_name, 2)
    with pytest.raises(ValueError, match="multiqueue tap"):
        Net([Tap(tap_name)] * 2)


def test_one_fd_of_a_multiqueue_tap_still_opens(mq_tap_name: str) -> None:
    (tap,) = Tap.open_queues(mq_tap_name, 1)  # the kernel wants IFF_MULTI_QUEUE: retried
    assert tap.multi_queue
    dev = Net(tap)
    assert dev.queue_max_sizes == [256, 256] and not dev.device_features >> VIRTIO_NET_F_MQ & 1
    dev.close()
    tap.close()


def test_vq_pairs_set_in_range(mem: GuestMemory, loop: EventLoop, mq_tap_name: str) -> None:
    dev, drv = start_mq(mem, loop, mq_tap_name)
    for n in (MQ_PAIRS, 2, 1, 3):
        assert pairs_set(drv, n) == VIRTIO_NET_OK
        assert dev.active_pairs == n
        assert [p.armed for p in dev.pairs] == [k < n for k in range(MQ_PAIRS)]
        assert [p.tap.attached for p in dev.pairs] == [k < n for k in range(MQ_PAIRS)]
    state = json.loads(json.dumps(dev.state()))
    assert state["active_pairs"] == 3
    assert not dev.needs_reset
    dev.reset()  # back to one pair, the other tap queues detached
    assert dev.active_pairs == 1 and [p.tap.attached for p in dev.pairs] == [True] + [False] * 3
    stop_mq(dev)


@pytest.mark.parametrize("n", [0, MQ_PAIRS + 1, 0x8000, 0xFFFF])
def test_vq_pairs_set_out_of_range_is_refused(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str, n: int
) -> None:
    dev, drv = start_mq(mem, loop, mq_tap_name)
    assert pairs_set(drv, 2) == VIRTIO_NET_OK
    assert pairs_set(drv, n) == VIRTIO_NET_ERR
    assert dev.active_pairs == 2 and not dev.needs_reset
    stop_mq(dev)


@pytest.mark.parametrize(
    ("readable", "ack_len", "used_len"),
    [
        ([b""], 1, 1),  # no class or command
        ([bytes([VIRTIO_NET_CTRL_MQ])], 1, 1),  # no command
        ([bytes([VIRTIO_NET_CTRL_MQ, 0]), b"\x02"], 1, 1),  # 1 data byte
        ([bytes([VIRTIO_NET_CTRL_MQ, 0]), b"\x02\x00\x00"], 1, 1),  # 3 data bytes
        ([bytes([VIRTIO_NET_CTRL_MQ, 0]), b"\x02\x00" + bytes(100)], 1, 1),  # too long
        ([bytes([VIRTIO_NET_CTRL_MQ, 0]), (0x200000, 1 << 20)], 1, 1),  # 1 MiB: far too long
        ([bytes([VIRTIO_NET_CTRL_MQ, 1]), bytes(8)], 1, 1),  # RSS_CONFIG: not offered
        ([bytes([VIRTIO_NET_CTRL_RX, 0, 1])], 1, 1),  # promiscuous: CTRL_RX not offered
        ([bytes([VIRTIO_NET_CTRL_MAC, 1]), bytes(6)], 1, 1),  # MAC_ADDR_SET
        ([bytes([VIRTIO_NET_CTRL_VLAN, 0, 1, 0])], 1, 1),
        ([bytes([VIRTIO_NET_CTRL_ANNOUNCE, 0])], 1, 1),
        ([bytes([VIRTIO_NET_CTRL_GUEST_OFFLOADS, 0]), bytes(8)], 1, 1),
        ([bytes([200, 200, 2, 0])], 1, 1),  # no such class
        ([bytes([VIRTIO_NET_CTRL_MQ, 0]), b"\x02\x00"], 0, 0),  # no room for the ack
    ],
)
def test_malformed_control_requests_get_err(
    mem: GuestMemory,
    loop: EventLoop,
    mq_tap_name: str,
    readable: list[bytes | tuple[int, int]],
    ack_len: int,
    used_len: int,
) -> None:
    dev, drv = start_mq(mem, loop, mq_tap_name)
    length, ack = ctrl(drv, readable, ack_len)
    assert length == used_len
    assert ack == (VIRTIO_NET_ERR if ack_len else None)
    assert dev.active_pairs == 1 and not dev.needs_reset and not drv.interrupt.needs_reset
    # The queue goes on: a good request right after is served.
    assert pairs_set(drv, 2) == VIRTIO_NET_OK
    stop_mq(dev)


def test_control_request_split_over_descriptors(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str
) -> None:
    dev, drv = start_mq(mem, loop, mq_tap_name)
    length, ack = ctrl(drv, [bytes([VIRTIO_NET_CTRL_MQ]), b"\x00\x03", b"\x00"], ack_len=4)
    assert length == 1 and ack == VIRTIO_NET_OK
    assert dev.active_pairs == 3
    stop_mq(dev)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    pieces=st.lists(st.binary(max_size=80), min_size=0, max_size=4),
    ack_len=st.integers(0, 3),
)
def test_control_queue_never_raises_on_any_request(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str, pieces: list[bytes], ack_len: int
) -> None:
    dev = Net(Tap.open_queues(mq_tap_name, MQ_PAIRS), mac=GUEST_MAC)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    try:
        if not pieces and not ack_len:
            return  # an empty chain cannot be built
        c = drv[CTRL_QUEUE].add_chain(pieces, [ack_len] if ack_len else [])
        drv.kick(CTRL_QUEUE)
        ((head, length),) = drv[CTRL_QUEUE].get_used()
        assert head == c.head and not dev.needs_reset
        request = b"".join(pieces)
        valid = (
            len(request) == 4
            and request[:2] == bytes([VIRTIO_NET_CTRL_MQ, 0])
            and 1 <= struct.unpack_from("<H", request, 2)[0] <= MQ_PAIRS
        )
        if ack_len:
            ack = mem.read(c.writable[0][0], 1)[0]
            assert length == 1 and ack == (VIRTIO_NET_OK if valid else VIRTIO_NET_ERR)
            assert dev.active_pairs == (struct.unpack_from("<H", request, 2)[0] if valid else 1)
        else:
            assert length == 0 and dev.active_pairs == 1
    finally:
        stop_mq(dev)


def test_mq_control_commands_need_mq(mem: GuestMemory, loop: EventLoop, mq_tap_name: str) -> None:
    # CTRL_VQ without MQ: one pair, and the control queue is queue 2 (5.1.2).
    dev = Net(Tap.open_queues(mq_tap_name, MQ_PAIRS), mac=GUEST_MAC)
    drv = VirtioDriver(dev, mem, features=dev.device_features & ~(1 << VIRTIO_NET_F_MQ))
    drv.activate(loop)
    assert dev.ctrl_queue == 2
    assert pairs_set(drv, 2, queue=2) == VIRTIO_NET_ERR
    assert dev.active_pairs == 1
    stop_mq(dev)


def test_traffic_on_every_pair(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str, mq_wire: socket.socket
) -> None:
    """Each pair's tx goes out through its own tap queue; the host's replies to a flow come
    back on the pair that sent it (the kernel steers by the queue a flow was last sent from);
    idle pairs get nothing."""
    dev, drv = start_mq(mem, loop, mq_tap_name)
    active = 3
    assert pairs_set(drv, active) == VIRTIO_NET_OK
    rx_chains = [add_rx_on(drv, 2 * k, 8) for k in range(MQ_PAIRS)]
    for k in range(MQ_PAIRS):
        drv.kick(2 * k)
    # Guest -> host: one UDP frame per active pair, each its own flow.
    for k in range(active):
        f = udp_frame(GUEST_MAC, HOST_MAC, 40000 + k, 50000 + k, b"STRATO-MQ-TX pair=%d" % k)
        c = drv[2 * k + 1].add_chain([bytes(VNET_HDR_SIZE) + f])
        drv.kick(2 * k + 1)
        assert drv[2 * k + 1].get_used() == [(c.head, 0)], f"pair {k} did not send"
    seen: set[int] = set()
    deadline = time.monotonic() + 5
    while len(seen) < active:
        assert time.monotonic() < deadline, f"only pairs {sorted(seen)} reached the host"
        try:
            data = mq_wire.recv(4096)
        except TimeoutError:
            continue
        if b"STRATO-MQ-TX pair=" in data:
            seen.add(int(data.split(b"pair=")[1][:1]))
    assert dev.counters()["tx_frames"] == active
    # Host -> guest: replies to each flow, a few times each.
    for _ in range(3):
        for k in range(active):
            reply = udp_frame(HOST_MAC, GUEST_MAC, 50000 + k, 40000 + k, b"STRATO-MQ-RX %d" % k)
            mq_wire.send(reply)
    got: dict[int, list[bytes]] = {k: [] for k in range(MQ_PAIRS)}

    def replies() -> bool:
        for k in range(MQ_PAIRS):
            for head, length in drv[2 * k].get_used():
                addr, _ = rx_chains[k][head].writable[0]
                data = mem.read(addr, length)[VNET_HDR_SIZE:]
                if b"STRATO-MQ-RX" in data:
                    got[k].append(data)
        return sum(map(len, got.values())) >= 3 * active

    pump(loop, replies)
    for k in range(active):
        assert {d.split(b"STRATO-MQ-RX ")[1][:1] for d in got[k]} == {b"%d" % k}, got
    assert got[MQ_PAIRS - 1] == []  # the idle pair
    # A kick on the idle pair's tx is ignored: the frame waits in its ring.
    c = drv[2 * MQ_PAIRS - 1].add_chain([bytes(VNET_HDR_SIZE) + frame(b"idle" * 20)])
    drv.kick(2 * MQ_PAIRS - 1)
    assert drv[2 * MQ_PAIRS - 1].get_used() == []
    # ... and goes once the pair is active.
    assert pairs_set(drv, MQ_PAIRS) == VIRTIO_NET_OK
    pump(loop, lambda: drv[2 * MQ_PAIRS - 1].get_used() == [(c.head, 0)])
    stop_mq(dev)


def add_rx_on(drv: VirtioDriver, queue: int, n: int) -> dict[int, DriverChain]:
    return {c.head: c for c in (drv[queue].add_chain([], [RX_BUF]) for _ in range(n))}


def test_one_tx_rate_limiter_for_every_pair(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str
) -> None:
    """The limiter is the device's: frames of every pair take from the same bucket."""
    clock, timer = FakeClock(), FakeTimer()
    tx_rl = RateLimiter.create(ops_size=2, ops_refill_time=100, clock=clock, timer=timer)
    dev = Net(Tap.open_queues(mq_tap_name, MQ_PAIRS), mac=GUEST_MAC, tx_rate_limiter=tx_rl)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    try:
        assert pairs_set(drv, 2) == VIRTIO_NET_OK
        f = bytes(VNET_HDR_SIZE) + frame(b"rl" * 30, dst=HOST_MAC)
        for _ in range(2):
            drv[1].add_chain([f])
        drv.kick(1)  # pair 0: two tokens, two frames
        assert len(drv[1].get_used()) == 2 and not tx_rl.blocked
        b = [drv[3].add_chain([f]) for _ in range(2)]
        drv.kick(3)  # pair 1: the bucket is empty: the frame that finds it so still goes
        assert [h for h, _ in drv[3].get_used()] == [b[0].head] and tx_rl.blocked
        clock.advance(REFILL_TIMER_INTERVAL_NS)
        dev._on_tx_rate_timer(select.EPOLLIN)  # the timer resumes every active pair
        assert [h for h, _ in drv[3].get_used()] == [b[1].head]
        assert dev.counters()["tx_frames"] == 4
    finally:
        stop_mq(dev)


def test_restored_pair_count_applies_at_activation(
    mem: GuestMemory, loop: EventLoop, mq_tap_name: str
) -> None:
    dev, drv = start_mq(mem, loop, mq_tap_name)
    assert pairs_set(drv, 3) == VIRTIO_NET_OK
    state = json.loads(json.dumps(dev.state()))
    stop_mq(dev)
    other = Net(Tap.open_queues(mq_tap_name, MQ_PAIRS), mac=GUEST_MAC)
    other.restore(state)
    VirtioDriver(other, mem).activate(loop)
    assert other.active_pairs == 3 and [p.armed for p in other.pairs] == [True] * 3 + [False]
    with pytest.raises(ValueError, match="5 active queue pairs"):
        other.restore({**state, "active_pairs": 5})
    stop_mq(other)
