"""virtio-net and virtio-console under adversarial requests stay within issue 10's budget.

Each scenario runs in a forked child (tests/budgets/harness.py) and is measured per loop turn:
peak RSS growth under 64 MiB and under 100 ms per kick, whatever the guest declares.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strato.devices.backends.tap import MAX_FRAME, VNET_HDR_SIZE, Tap
from strato.devices.virtio.console import MAX_CHAIN_OUTPUT, Console
from strato.devices.virtio.net import RX_QUEUE, TX_QUEUE, Net
from strato.virtio.queue import VIRTQ_DESC_F_INDIRECT
from strato.virtio.testing import DriverQueue
from tests.budgets.harness import ACCEPTANCE, Measurement, MiB, Rig, assert_within, run_measured

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a tap")

ALIAS = 0x200000  # every aliased buffer points here
BIG = 16 * MiB - 1  # one aliased buffer: 256 of them make a chain of almost 2^32 bytes
IOV_MAX = 1024


@pytest.fixture
def tap_name() -> Iterator[str]:
    from tests.taps import host_tap

    with host_tap("stb") as name:
        yield name


def fill_ring(dq: DriverQueue, parts: list[tuple[int, int, int]], chains: int) -> None:
    """`chains` chains, each the descriptors (addr, len, flags) of `parts` in an indirect
    table (one table shared by them all)."""
    table = dq.alloc(16 * len(parts))
    raw = bytearray()
    for i, (addr, length, flags) in enumerate(parts):
        last = i == len(parts) - 1
        raw += (
            addr.to_bytes(8, "little")
            + length.to_bytes(4, "little")
            + (flags | (0 if last else 1)).to_bytes(2, "little")
            + (0 if last else i + 1).to_bytes(2, "little")
        )
    dq.mem.write(table, bytes(raw))
    for _ in range(chains):
        head = dq._take_desc()
        dq.write_desc(head, table, 16 * len(parts), VIRTQ_DESC_F_INDIRECT)
        dq.publish(head)


def within(m: Measurement, what: str) -> None:
    assert_within(m, ACCEPTANCE, what)  # prints the numbers (see them with `pytest -s`)


# -- virtio-net --------------------------------------------------------------------------------
def net_scenario(
    tap_name: str, parts: list[tuple[int, int, int]], queue_size: int = 256, chains: int = 256
) -> Callable[[Rig], object]:
    def scenario(rig: Rig) -> object:
        gc.freeze()  # pytest's heap (forked into the child) is not the device's: no GC over it
        dev = Net(Tap(tap_name), queue_size=queue_size)
        drv = rig.driver(dev)
        fill_ring(drv[TX_QUEUE], parts, chains)
        rig.kick(dev, TX_QUEUE)
        return dev.counters()

    return scenario


@pytest.mark.root
@needs_root
def test_net_tx_chains_of_4gib_aliased_buffers(tap_name: str) -> None:
    parts = [(ALIAS, BIG, 0)] * 256
    m = run_measured(net_scenario(tap_name, parts))
    within(m, "net tx: 256 chains of 256 x 16 MiB aliased buffers")
    assert m.result["tx_dropped"] == 256 and m.result["tx_frames"] == 0


@pytest.mark.root
@needs_root
def test_net_tx_chains_of_iov_max_plus_one_buffers(tap_name: str) -> None:
    # IOV_MAX + 1 buffers (a queue of 2048), a frame just under the largest: gathered in the
    # tap's scratch buffer and sent
    n = IOV_MAX + 1
    parts = [(ALIAS, (VNET_HDR_SIZE + MAX_FRAME) // n, 0)] * n
    m = run_measured(net_scenario(tap_name, parts, queue_size=2048))
    within(m, "net tx: 256 chains of IOV_MAX+1 aliased buffers")
    assert m.result["tx_frames"] == 256, m.result


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("queue_size", [256, 2048])
def test_net_tx_maximal_indirect_tables(tap_name: str, queue_size: int) -> None:
    # the longest chain the queue takes, one byte per buffer: a frame of `queue_size` bytes
    parts = [(ALIAS, 1, 0)] * queue_size
    m = run_measured(net_scenario(tap_name, parts, queue_size=queue_size, chains=64))
    within(m, f"net tx: 64 chains of {queue_size}-entry indirect tables")
    assert m.result["tx_frames"] + m.result["tx_dropped"] == 64, m.result


@pytest.mark.root
@needs_root
def test_net_rx_into_tiny_buffers(tap_name: str) -> None:
    import socket
    import time

    def scenario(rig: Rig) -> object:
        gc.freeze()  # pytest's heap (forked into the child) is not the device's: no GC over it
        dev = Net(Tap(tap_name))
        drv = rig.driver(dev)
        wait_until_up(tap_name)
        for _ in range(drv[RX_QUEUE].size):
            drv[RX_QUEUE].add_chain([], [VNET_HDR_SIZE + 2])
        rig.kick(dev, RX_QUEUE)
        wire = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        wire.bind((tap_name, 0))
        frame = bytes.fromhex("525400123456525400abcdef88b5") + bytes(1400)
        for _ in range(500):
            wire.send(frame)
        deadline = time.monotonic() + 10
        while dev.counters()["rx_truncated"] < 500 and time.monotonic() < deadline:
            rig.settle()
        wire.close()
        return dev.counters(), drv[RX_QUEUE].get_used()

    from tests.taps import wait_until_up

    m = run_measured(scenario)
    counters, used = m.result
    within(m, "net rx: 1400-byte frames into 14-byte buffers")
    assert counters["rx_truncated"] >= 1 and counters["rx_frames"] == 0
    assert used == []  # the guest never saw a cut frame


# -- virtio-console ----------------------------------------------------------------------------
def console_scenario(
    parts: list[tuple[int, int, int]], output: str, queue_size: int = 256, chains: int = 256
) -> Callable[[Rig], object]:
    def scenario(rig: Rig) -> object:
        gc.freeze()  # pytest's heap (forked into the child) is not the device's: no GC over it
        dev = Console(output=output, queue_size=queue_size)
        drv = rig.driver(dev)
        fill_ring(drv[1], parts, chains)
        rig.kick(dev, 1)
        return dev.counters(), os.path.getsize(output)

    return scenario


def test_console_tx_chains_of_4gib_aliased_buffers(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    parts = [(ALIAS, BIG, 0)] * 256
    m = run_measured(console_scenario(parts, out))
    counters, size = m.result
    within(m, "console tx: 256 chains of 256 x 16 MiB aliased buffers")
    assert size == 256 * MAX_CHAIN_OUTPUT  # the rest dropped and counted
    assert counters["tx_dropped"] == 256 * (256 * BIG - MAX_CHAIN_OUTPUT)


def test_console_tx_iov_max_plus_one_buffers(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    parts = [(ALIAS, 60, 0)] * (IOV_MAX + 1)  # 61500 bytes: under MAX_CHAIN_OUTPUT
    m = run_measured(console_scenario(parts, out, queue_size=2048))
    within(m, "console tx: 256 chains of IOV_MAX+1 buffers")
    assert m.result[1] == 256 * 60 * (IOV_MAX + 1)


@pytest.mark.parametrize("queue_size", [256, 2048])
def test_console_tx_maximal_indirect_tables(tmp_path: Path, queue_size: int) -> None:
    out = str(tmp_path / "out")
    parts = [(ALIAS, 1, 0)] * queue_size
    m = run_measured(console_scenario(parts, out, queue_size=queue_size, chains=64))
    within(m, f"console tx: 64 chains of {queue_size}-entry indirect tables")
    assert m.result[1] == 64 * queue_size


def test_console_rx_into_tiny_buffers() -> None:
    def scenario(rig: Rig) -> object:
        gc.freeze()  # pytest's heap (forked into the child) is not the device's: no GC over it
        dev = Console(input_limit=1 << 16)
        drv = rig.driver(dev)
        dev.enqueue_input(b"x" * (1 << 16))
        for _ in range(drv[0].size):
            drv[0].add_chain([], [1])
        rig.kick(dev, 0)
        return dev.counters(), dev.pending_input

    m = run_measured(scenario)
    counters, pending = m.result
    within(m, "console rx: 64 KiB of input into one-byte buffers")
    assert counters["rx_bytes"] == 256 and pending == (1 << 16) - 256
