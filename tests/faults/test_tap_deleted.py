"""The tap under a virtio-net device is deleted while the VM runs.

The kernel keeps the fd open but detached: reads and writes fail with EBADFD and epoll reports
EPOLLERR on it forever, whatever events are asked for. The net device must report errors (frames
dropped and counted, a log line), take the fd off its event loop (or the loop spins on it), and
the VMM must keep serving: the guest goes on with its other checks.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.devices.backends.tap import VNET_HDR_SIZE, Tap
from strato.devices.virtio.net import RX_QUEUE, TX_QUEUE, Net
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import VirtioDriver
from tests.faults.guestrun import (
    crash_status,
    run_in_process,
    strato_args,
    thread_cpu_seconds,
    wait_until,
)
from tests.guest.harness import GuestOutput, Ready
from tests.taps import host_tap

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create and delete a tap"),
]


@pytest.fixture
def tap_name() -> Iterator[str]:
    with host_tap("stfl") as name:
        yield name


def delete_tap(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], check=True)


def test_device_takes_a_deleted_tap_off_its_loop(tap_name: str) -> None:
    mem = GuestMemory.anonymous([(0, 8 << 20)])
    loop = EventLoop()
    dev = Net(Tap(tap_name))
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    try:
        rx = [drv[RX_QUEUE].add_chain([], [2048]) for _ in range(4)]
        drv.kick(RX_QUEUE)
        delete_tap(tap_name)
        ran = 0
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            ran += loop.run_once(0.05)
        # one callback sees EPOLLERR and unregisters; before the fix the loop spun on it
        # (~300000 callbacks in 0.5 s, a whole core)
        assert ran <= 2 and dev.tap_failed
        chains = [drv[TX_QUEUE].add_chain([bytes(VNET_HDR_SIZE + 60)]) for _ in range(3)]
        drv.kick(TX_QUEUE)
        assert [h for h, _ in drv[TX_QUEUE].get_used()] == [c.head for c in chains]
        assert dev.counters()["tx_dropped"] == 3 and dev.counters()["tx_frames"] == 0
        drv.kick(RX_QUEUE)  # buffers stay posted; nothing to read, nothing dropped
        assert drv[RX_QUEUE].get_used() == [] and dev.counters()["rx_dropped"] == 0
        assert len(rx) == 4 and not dev.needs_reset
    finally:
        dev.reset()
        dev.tap.close()
        loop.close()
        mem.close()


@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm")
def test_guest_keeps_running_after_its_tap_is_deleted(guest_elf: Path, tap_name: str) -> None:
    """At READY net-rx the host deletes the tap instead of sending frames. net-rx fails after
    its host timeout; rng and irq then pass, 200 frames sent to the dead tap all complete
    (dropped and counted), and the event loop stays idle while the guest waits."""
    sampled: dict[str, float] = {}
    run_output = GuestOutput()

    def on_net_rx(event: Ready, vm: object) -> None:
        from strato.vmm.vm import Vm

        assert isinstance(vm, Vm)
        loop_thread = vm.machine.loop.thread
        assert loop_thread is not None and loop_thread.native_id is not None
        tid = loop_thread.native_id
        delete_tap(tap_name)
        sampled["cpu0"] = thread_cpu_seconds(tid)
        sampled["t0"] = time.monotonic()
        wait_until(lambda: bool(run_output.named("net-rx")), 30, "the net-rx verdict")
        sampled["cpu1"] = thread_cpu_seconds(tid)
        sampled["t1"] = time.monotonic()

    args = strato_args(
        guest_elf,
        "tests=net-rx,rng,irq host-timeout=1000 bench=net-tx,ops=200",
        net=f"tap={tap_name},mac=52:54:00:12:34:56",
        rng=True,
    )
    r = run_in_process(args, timeout=60, on_ready={"net-rx": on_net_rx}, output=run_output)
    out = r.output
    assert not r.handler_errors, r.handler_errors
    assert not out.result("net-rx").passed  # no frames came: the tap was gone
    assert out.result("rng").passed and out.result("irq").passed, out.text()
    (tx,) = [b for b in out.benches if b.name == "net-tx"]
    assert tx.ops == 200, out.text()
    assert [t.name for t in out.failures()] == ["net-rx"], out.text()
    assert out.done is not None and out.done.failed == 1
    # the guest ends a failed run with a deliberate triple fault: a clean, reported stop
    assert r.stop.exit_status == crash_status(), r.stop
    net = r.counters["_net0"]
    assert net["tx_dropped"] >= 200 and net["tx_frames"] == 0, net
    waited = sampled["t1"] - sampled["t0"]
    busy = sampled["cpu1"] - sampled["cpu0"]
    print(f"after the tap went: loop thread used {busy:.3f} s of CPU in {waited:.2f} s; {net}")
    assert waited >= 0.5, sampled
    assert busy < 0.5 * waited, f"the event loop used {busy:.2f} s of CPU in {waited:.2f} s"
