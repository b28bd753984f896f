"""virtio-console both ways: guest output to a sink, host input to the guest."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strato.devices.virtio.console import (
    RX_QUEUE,
    TX_QUEUE,
    VIRTIO_CONSOLE_F_SIZE,
    Console,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import DriverChain, VirtioDriver


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4 << 20)])
    yield m
    m.close()


def pump(loop: EventLoop, until: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.05)


def received(mem: GuestMemory, chain: DriverChain, length: int) -> bytes:
    out = b""
    for addr, n in chain.writable:
        take = min(n, length - len(out))
        out += mem.read(addr, take)
    return out


def test_output_to_a_file(mem: GuestMemory, loop: EventLoop, tmp_path: Path) -> None:
    out = tmp_path / "console.log"
    dev = Console(output=str(out))
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    tx = drv[TX_QUEUE]
    a = tx.add_chain([b"hello, ", b"world\n"])
    b = tx.add_chain([b"second line\n"])
    drv.kick(TX_QUEUE)
    assert tx.get_used() == [(a.head, 0), (b.head, 0)]
    assert out.read_bytes() == b"hello, world\nsecond line\n"
    assert dev.counters()["tx_bytes"] == 25
    assert drv.interrupt.used == [TX_QUEUE]
    dev.close()


def test_output_to_nowhere_is_counted(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Console()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    drv[TX_QUEUE].add_chain([b"x" * 100])
    drv.kick(TX_QUEUE)
    assert dev.counters()["tx_bytes"] == 100 and dev.counters()["tx_dropped"] == 0
    dev.close()


def test_slow_sink_never_blocks_and_drops_what_does_not_fit(
    mem: GuestMemory, loop: EventLoop
) -> None:
    r, w = os.pipe()
    try:
        dev = Console(output=w, output_limit=4096)
        drv = VirtioDriver(dev, mem)
        drv.activate(loop)
        tx = drv[TX_QUEUE]
        pipe_size = 1 << 16
        total = pipe_size + 3 * 4096 + 100
        chunk = 8192
        sent = 0
        t0 = time.monotonic()
        while sent < total:
            n = min(chunk, total - sent)
            tx.add_chain([bytes([65 + (sent // chunk) % 26]) * n])
            drv.kick(TX_QUEUE)
            tx.get_used()
            tx.reset_buffers()
            sent += n
        assert time.monotonic() - t0 < 2.0  # nothing waited for the reader
        c = dev.counters()
        assert c["tx_bytes"] == total
        buffered = dev.state()["pending_output"]
        assert 0 < len(buffered) // 2 <= 4096
        # The reader catches up: the buffered part arrives, the dropped part never does.
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < total - c["tx_dropped"]:
            assert time.monotonic() < deadline
            try:
                os.set_blocking(r, False)
                got += os.read(r, 1 << 16)
            except BlockingIOError:
                pass
            loop.run_once(0.01)
        assert len(got) == total - c["tx_dropped"] and c["tx_dropped"] > 0
        assert dev.state()["pending_output"] == ""
        dev.close()
    finally:
        os.close(r)
        os.close(w)


def test_sink_fd_of_the_caller_stays_blocking(mem: GuestMemory, loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        dev = Console(output=w)
        assert os.get_blocking(w)  # we reopened it, not changed the caller's description
        dev.close()
    finally:
        os.close(r)
        os.close(w)


def test_enqueue_input_reaches_the_guest(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Console()
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    rx = drv[RX_QUEUE]
    c1 = rx.add_chain([], [4])
    c2 = rx.add_chain([], [64])
    drv.kick(RX_QUEUE)  # buffers, but nothing to say yet
    assert rx.get_used() == []
    assert dev.enqueue_input(b"ls -l\n") == 6
    pump(loop, lambda: rx.used_idx == 2)
    assert rx.get_used() == [(c1.head, 4), (c2.head, 2)]
    assert received(mem, c1, 4) + received(mem, c2, 2) == b"ls -l\n"
    assert dev.counters()["rx_bytes"] == 6
    assert drv.interrupt.count(RX_QUEUE) == 1
    dev.close()


def test_input_waits_for_rx_buffers(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Console()
    drv = VirtioDriver(dev, mem)
    dev.enqueue_input(b"early")  # before activation: kept
    drv.activate(loop)
    loop.run_once(0.05)
    assert dev.pending_input == 5
    rx = drv[RX_QUEUE]
    c = rx.add_chain([], [16])
    drv.kick(RX_QUEUE)
    assert rx.get_used() == [(c.head, 5)] and received(mem, c, 5) == b"early"
    assert dev.pending_input == 0
    dev.close()


def test_input_is_bounded(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Console(input_limit=10)
    assert dev.enqueue_input(b"0123456789abc") == 10
    assert dev.enqueue_input(b"x") == 0
    assert dev.counters()["rx_dropped"] == 4
    dev.close()


def test_input_from_a_pipe_with_back_pressure(mem: GuestMemory, loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        dev = Console(input_fd=r, input_limit=16)
        drv = VirtioDriver(dev, mem)
        drv.activate(loop)
        message = bytes(range(48, 48 + 40))
        os.write(w, message)
        pump(loop, lambda: dev.pending_input == 16)
        for _ in range(3):  # no rx buffers: the fd is masked, not read or spun on
            assert loop.run_once(0.02) == 0
        assert dev.pending_input == 16 and dev.counters()["rx_dropped"] == 0
        rx = drv[RX_QUEUE]
        chains = [rx.add_chain([], [8]) for _ in range(5)]
        drv.kick(RX_QUEUE)
        pump(loop, lambda: rx.used_idx == 5)
        assert b"".join(received(mem, c, 8) for c in chains) == message
        assert dev.counters()["rx_bytes"] == 40
        dev.close()
    finally:
        os.close(r)
        os.close(w)


def test_regular_file_input_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "in"
    p.write_bytes(b"x")
    fd = os.open(p, os.O_RDONLY)
    try:
        with pytest.raises(ValueError):
            Console(input_fd=fd)
    finally:
        os.close(fd)


def test_config_and_emergency_write(mem: GuestMemory, loop: EventLoop, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dev = Console(output=str(out), size=(80, 25))
    assert dev.device_features >> VIRTIO_CONSOLE_F_SIZE & 1
    assert struct.unpack("<HHII", dev.read_config(0, 12)) == (80, 25, 1, 0)
    dev.write_config(8, struct.pack("<I", ord("!")))
    assert out.read_bytes() == b"!"
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    dev.resize(100, 40)
    assert drv.interrupt.config_changes == 1
    assert struct.unpack("<HH", dev.read_config(0, 4)) == (100, 40)
    dev.close()


def test_state_round_trip(mem: GuestMemory, loop: EventLoop) -> None:
    dev = Console(input_limit=100)
    dev.enqueue_input(b"pending")
    state = json.loads(json.dumps(dev.state()))
    other = Console()
    other.restore(state)
    assert other.pending_input == 7
    drv = VirtioDriver(other, mem)
    drv.activate(loop)
    c = drv[RX_QUEUE].add_chain([], [16])
    drv.kick(RX_QUEUE)
    assert received(mem, c, 7) == b"pending"
    dev.close()
    other.close()


# -- hostile guests (issue 10) -------------------------------------------------------------------
def test_emergency_write_through_the_transport_runs_on_the_loop_thread(tmp_path: Path) -> None:
    from tests.pci.helpers import VIRTIO_PCI_CAP_DEVICE_CFG
    from tests.pci.test_virtio_pci import Setup

    out = tmp_path / "out"
    dev = Console(output=str(out))
    threads = []
    emit = dev._emit

    def recording(data: bytes | memoryview) -> None:
        threads.append(threading.current_thread())
        emit(data)

    dev._emit = recording  # type: ignore[method-assign]
    st = Setup(dev)  # type: ignore[arg-type]
    st.loop.start()
    try:
        for ch in b"hi!":  # a vCPU (this thread) writes emerg_wr
            st.driver.write(VIRTIO_PCI_CAP_DEVICE_CFG, 8, 4, ch)
        assert out.read_bytes() == b"hi!"
        assert threads == [st.loop.thread] * 3
    finally:
        st.loop.stop()
        st.close()
        dev.close()


def test_transmit_chain_longer_than_the_cap_is_cut_and_counted(
    mem: GuestMemory, loop: EventLoop, tmp_path: Path
) -> None:
    from strato.devices.virtio.console import MAX_CHAIN_OUTPUT

    out = tmp_path / "out"
    dev = Console(output=str(out))
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    page = (0x200000, 1 << 20)
    drv[TX_QUEUE].add_chain([page] * 64, indirect=True)  # 64 MiB of one aliased MiB
    drv.kick(TX_QUEUE)
    assert out.stat().st_size == MAX_CHAIN_OUTPUT
    assert dev.counters()["tx_dropped"] == (64 << 20) - MAX_CHAIN_OUTPUT
    assert dev.counters()["tx_bytes"] == 64 << 20
    dev.close()


def test_many_small_buffers_are_one_write(
    mem: GuestMemory, loop: EventLoop, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    dev = Console(output=str(out))
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    drv[TX_QUEUE].add_chain([bytes([0x41 + i % 26]) for i in range(200)], indirect=True)
    drv.kick(TX_QUEUE)
    assert out.read_bytes() == bytes(0x41 + i % 26 for i in range(200))
    dev.close()


def test_transmit_kick_yields_after_its_burst(mem: GuestMemory, loop: EventLoop) -> None:
    from strato.devices.virtio.console import TX_BURST

    dev = Console(queue_size=512)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    tx = drv[TX_QUEUE]
    for _ in range(TX_BURST + 44):
        tx.add_chain([b"x"])
    drv.kick(TX_QUEUE)
    assert len(tx.get_used()) == TX_BURST  # the rest waits for the next loop turn
    pump(loop, lambda: dev.counters()["tx_bytes"] == TX_BURST + 44)
    assert len(tx.get_used()) == 44
    dev.close()


def test_receive_yields_after_its_burst(mem: GuestMemory, loop: EventLoop) -> None:
    from strato.devices.virtio.console import RX_BURST

    dev = Console(queue_size=512)
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    for _ in range(RX_BURST + 10):
        drv[RX_QUEUE].add_chain([], [1])
    dev.enqueue_input(b"y" * 1000)
    drv.kick(RX_QUEUE)
    assert len(drv[RX_QUEUE].get_used()) == RX_BURST
    pump(loop, lambda: dev.counters()["rx_bytes"] == RX_BURST + 10)
    dev.close()


def test_failed_activation_leaves_nothing_behind(
    mem: GuestMemory, loop: EventLoop, monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = os.pipe()
    dev = Console(input_fd=r)
    live: set[int] = set()
    register, unregister = loop.register, loop.unregister

    def failing_register(fd: int, cb: Callable[[int], None], events: int = 1) -> None:
        if fd == dev._in_fd:
            raise OSError(12, "Cannot allocate memory")
        register(fd, cb, events)
        live.add(fd)

    def tracking_unregister(fd: int) -> None:
        unregister(fd)
        live.discard(fd)

    monkeypatch.setattr(loop, "register", failing_register)
    monkeypatch.setattr(loop, "unregister", tracking_unregister)
    with pytest.raises(OSError, match="Cannot allocate"):
        VirtioDriver(dev, mem).activate(loop)
    assert not dev.active and live == set()  # all or nothing
    monkeypatch.setattr(loop, "register", register)
    dev.reset()
    VirtioDriver(dev, mem).activate(loop)
    assert dev.active
    dev.reset()
    dev.close()
    os.close(r)
    os.close(w)
