"""`Vm` on a real KVM machine: its state machine, the stop path (first reason wins, callbacks,
log line), shutdown and the ACPI power button (tests/mutation_kills/hlt_vm.py: a guest that
only halts)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator

import pytest

from strato.boot.acpi import constants as acpi
from strato.devices.legacy.ged import GED_POWER_BUTTON
from strato.devices.virtio.rng import Rng
from strato.vmm import vm as vm_module
from strato.vmm.device_manager import DeviceManager
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import InvalidStateTransition, Vm, VmState
from tests.mutation_kills.hlt_vm import LOAD, hlt_machine, hlt_vm, poll

OUT_THEN_HLT = bytes.fromhex("e680f4ebfd")  # out 0x80, al; hlt; jmp back to the hlt

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


@pytest.fixture
def vm() -> Iterator[Vm]:
    v = hlt_vm()
    yield v
    if v.state is not VmState.SHUTDOWN:
        v.shutdown()


# -- the state machine ------------------------------------------------------------------------
def test_a_new_vm_is_created_and_cannot_pause(vm: Vm) -> None:
    assert vm.state is VmState.CREATED and vm.stop_result is None and vm.vcpus == []
    with pytest.raises(
        InvalidStateTransition, match=r"^the VM is Created: it cannot go to Paused$"
    ):
        vm.pause()
    assert vm.state is VmState.CREATED


def test_a_shut_down_vm_cannot_pause(vm: Vm) -> None:
    vm.shutdown()
    assert vm.state is VmState.SHUTDOWN
    with pytest.raises(InvalidStateTransition) as e:
        vm.pause()
    assert (e.value.current, e.value.target) == (VmState.SHUTDOWN, VmState.PAUSED)
    assert str(e.value) == "the VM is Shutdown: it cannot go to Paused"


def test_start_pause_resume_shutdown(vm: Vm) -> None:
    started: list[str] = []
    vm.thread_hooks = {
        "vcpu": lambda: started.append(threading.current_thread().name),
        "events": lambda: started.append("events"),
    }
    vm.start()
    assert vm.state is VmState.RUNNING
    assert [v.id for v in vm.vcpus] == [0]
    assert poll(lambda: sorted(started) == ["events", "vcpu0"]), started
    with pytest.raises(InvalidStateTransition) as e:
        vm.start()  # already running
    assert (e.value.current, e.value.target) == (VmState.RUNNING, VmState.RUNNING)
    with pytest.raises(InvalidStateTransition):
        vm.resume()

    vm.pause()
    assert vm.state is VmState.PAUSED
    assert all(v.paused for v in vm.vcpus)
    with pytest.raises(InvalidStateTransition):
        vm.pause()
    vm.resume()
    assert vm.state is VmState.RUNNING
    assert poll(lambda: not any(v.paused for v in vm.vcpus))
    assert vm.wait(0) is None  # still running

    vm.shutdown()
    assert vm.state is VmState.SHUTDOWN
    assert vm.stop_result == Stop(StopReason.REQUESTED, "shutdown requested")
    assert all(not v._thread.is_alive() for v in vm.vcpus if v._thread is not None)


def test_a_paused_vm_shuts_down(vm: Vm) -> None:
    vm.start()
    vm.pause()
    vm.shutdown()
    assert vm.state is VmState.SHUTDOWN


# -- stopping ---------------------------------------------------------------------------------
def test_the_first_stop_wins_and_every_callback_runs_once(
    vm: Vm, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[tuple[str, Stop]] = []

    def broken(stop: Stop) -> None:
        raise RuntimeError("flush failed")

    vm.on_stop = [lambda s: seen.append(("a", s)), broken, lambda s: seen.append(("b", s))]
    vm.start()
    first = Stop(StopReason.POWEROFF, "the guest powered off", 0)
    with caplog.at_level(logging.INFO, logger=vm_module.log.name):
        vm.request_stop(first)
        vm.request_stop(Stop(StopReason.TRIPLE_FAULT, "later"))
    assert vm.wait(5) == first
    assert vm.stop_result == first
    assert seen == [("a", first), ("b", first)]  # the broken callback did not stop "b"
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == vm_module.log.name]
    assert lines[0] == (logging.INFO, "VM stopped: the guest powered off (vCPU 0)")
    assert (logging.ERROR, "stop callback failed") in lines
    assert not any("later" in m for _, m in lines)
    # The vCPU threads were told to stop: they end without shutdown().
    assert poll(lambda: all(not v._thread.is_alive() for v in vm.vcpus if v._thread))
    vm.shutdown()
    assert vm.stop_result == first  # shutdown keeps the guest's reason


def test_a_crash_is_logged_as_an_error_without_vcpu_when_none(
    vm: Vm, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=vm_module.log.name):
        vm.request_stop(Stop(StopReason.TRIPLE_FAULT, "the guest triple-faulted"))
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == vm_module.log.name]
    assert got == [(logging.ERROR, "VM stopped: the guest triple-faulted")]
    assert vm.wait(0) == Stop(StopReason.TRIPLE_FAULT, "the guest triple-faulted")


def test_shutdown_runs_every_closer_and_releases_the_machine(
    vm: Vm, caplog: pytest.LogCaptureFixture
) -> None:
    closed: list[str] = []

    def broken() -> None:
        raise OSError("disk gone")

    vm.on_close = [lambda: closed.append("a"), broken, lambda: closed.append("b")]
    vm.start()
    with caplog.at_level(logging.ERROR, logger=vm_module.log.name):
        vm.shutdown()
    assert closed == ["a", "b"]
    assert "closing a device failed" in [r.getMessage() for r in caplog.records]
    m = vm.machine
    assert (m.vm.fd, m.kvm.fd, [v.fd for v in m.vcpus]) == (-1, -1, [-1])
    assert not m.loop._thread or not m.loop._thread.is_alive()


# -- the power button and the counters --------------------------------------------------------
def test_power_button_raises_the_ged_event_the_guest_reads() -> None:
    vm = hlt_vm(acpi=True)
    m, dm = vm.machine, vm.device_manager
    try:
        assert dm.ged is not None and dm.ged.pending == 0
        vm.power_button()
        assert dm.ged.pending == GED_POWER_BUTTON
        # The guest's _EVT method reads the GED register: the power button bit, once.
        assert m.mmio.read(acpi.GED_MMIO_ADDRESS, 1) == bytes([GED_POWER_BUTTON])
        assert m.mmio.read(acpi.GED_MMIO_ADDRESS, 1) == b"\x00"
    finally:
        vm.shutdown()


def test_power_button_without_acpi_is_an_error(vm: Vm) -> None:
    with pytest.raises(RuntimeError, match=r"^the guest has no ACPI power button \(ACPI is off\)$"):
        vm.power_button()
    vm.device_manager = DeviceManager.create(vm.machine)  # ACPI devices not added: no GED
    with pytest.raises(RuntimeError, match="no ACPI power button"):
        vm.power_button()


def test_counters_come_from_the_device_manager(vm: Vm) -> None:
    assert vm.counters() == {}
    dm = DeviceManager.create(vm.machine)
    dm.add_virtio("rng", Rng(), "__rng")
    vm.device_manager = dm
    counters = vm.counters()
    assert list(counters) == ["__rng"] and counters == dm.counters()


# -- the guest stopping by itself ---------------------------------------------------------------
def test_a_device_failing_on_a_vcpu_stops_the_vm_through_that_vcpu() -> None:
    """The guest writes port 0x80, whose device raises: the vCPU thread turns that into a
    VMM_ERROR Stop and hands it to Vm.request_stop (its on_stop)."""

    class Broken:
        def read(self, offset: int, size: int) -> bytes:
            return bytes(size)

        def write(self, offset: int, data: bytes) -> None:
            raise RuntimeError("the device broke")

    m = hlt_machine()
    m.memory.write(LOAD, OUT_THEN_HLT)
    m.pio.insert(Broken(), 0x80, 1)
    vm = Vm(m)
    seen: list[Stop] = []
    vm.on_stop.append(seen.append)
    vm.start()
    try:
        stop = vm.wait(10)
        assert stop == Stop(StopReason.VMM_ERROR, "vCPU 0: the device broke", 0)
        assert seen == [stop] and vm.stop_result == stop
    finally:
        vm.shutdown()


def test_a_pause_that_works_logs_no_warning(vm: Vm, caplog: pytest.LogCaptureFixture) -> None:
    vm.start()
    with caplog.at_level(logging.WARNING, logger=vm_module.log.name):
        vm.pause()
    assert [r.getMessage() for r in caplog.records if r.name == vm_module.log.name] == []
    vm.resume()
