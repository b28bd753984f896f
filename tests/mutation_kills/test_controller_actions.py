"""`VmmController` actions against real VMs (tests/mutation_kills/hlt_vm.py: a real KVM machine
whose guest only halts): each action's result, its Cloud Hypervisor error (status and message
chain) in each state it is refused in, the events it emits, and the VM stopping by itself."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from strato.devices.legacy.ged import GED_POWER_BUTTON
from strato.devices.virtio.rng import Rng
from strato.vmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RngConfig,
    VmConfig,
)
from strato.vmm.controller import FEATURES, Action, VmmController, VmmError
from strato.vmm.device_manager import DeviceManager
from strato.vmm.stop import EXIT_GUEST_CRASH, EXIT_OK, Stop, StopReason
from strato.vmm.vm import Vm, VmState
from tests.mutation_kills.hlt_vm import hlt_vm, poll

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


class Events:
    """An EventSink that keeps (source, event, properties)."""

    def __init__(self) -> None:
        self.got: list[tuple[str, str, dict[str, str] | None]] = []
        self.closed = False

    def emit(self, source: str, event: str, properties: Any = None) -> None:
        self.got.append((source, event, dict(properties) if properties else None))

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True

    def names(self) -> list[tuple[str, str]]:
        return [(s, e) for s, e, _ in self.got]


class Factory:
    """Builds real halting VMs and keeps them; `close()` is counted (the controller calls it
    when a config is deleted)."""

    def __init__(self, acpi: bool = True) -> None:
        self.vms: list[Vm] = []
        self.acpi = acpi
        self.closes = 0

    def __call__(self, config: VmConfig) -> Vm:
        vm = hlt_vm(acpi=self.acpi)
        self.vms.append(vm)
        return vm

    def close(self) -> None:
        self.closes += 1

    @property
    def latest(self) -> Vm:
        return self.vms[-1]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel"
    k.write_bytes(b"\xf4")
    return k


def config(kernel: Path, **kw: Any) -> VmConfig:
    return VmConfig(payload=PayloadConfig(kernel=kernel), memory=MemoryConfig(16 << 20), **kw)


Ctl = tuple[VmmController, Factory, Events]


@pytest.fixture
def ctl() -> Iterator[Ctl]:
    factory, events = Factory(), Events()
    c = VmmController(factory, events=events, no_shutdown=True, version="9.9")
    c.start()
    yield c, factory, events
    c.close()


def error_of(fn: Callable[[], object]) -> VmmError:
    with pytest.raises(VmmError) as e:
        fn()
    return e.value


# -- before a VM exists -----------------------------------------------------------------------
def test_ping(ctl: Ctl) -> None:
    c, _, _ = ctl
    assert c.ping() == {
        "build_version": "v9.9",
        "version": "9.9",
        "pid": os.getpid(),
        "features": list(FEATURES),
    }
    assert FEATURES == ("kvm",)


def test_every_vm_action_before_create_is_refused(ctl: Ctl) -> None:
    c, _, events = ctl
    cases: list[tuple[Callable[[], object], int, list[str]]] = [
        (c.boot, 404, ["The VM could not boot", "VM config is missing (the VM is not created)"]),
        (c.info, 404, ["The VM info is not available", "VM is not created"]),
        (
            c.pause,
            500,
            ["The VM could not be paused", "VM is not running (the VM is not created)"],
        ),
        (c.resume, 500, ["The VM could not resume", "VM is not running (the VM is not created)"]),
        (
            c.shutdown,
            500,
            ["The VM could not shutdown", "VM is not running (the VM is not created)"],
        ),
        (c.reboot, 404, ["The VM could not reboot", "VM is not created (the VM is not created)"]),
        (
            c.power_button,
            500,
            ["Error triggering power button", "VM is not running (the VM is not created)"],
        ),
        (
            c.counters,
            500,
            ["The VM info is not available", "VM is not running (the VM is not created)"],
        ),
    ]
    for fn, status, messages in cases:
        e = error_of(fn)
        assert (e.status, e.messages) == (status, messages), fn
        assert str(e) == ": ".join(messages)
    c.delete()  # nothing to delete: not an error, and no event
    assert c.state is None and c.config is None
    assert events.names() == [("vmm", "starting")]


def test_create_needs_a_valid_config_and_only_once(ctl: Ctl, kernel: Path) -> None:
    c, _, _ = ctl
    e = error_of(lambda: c.call(Action.CREATE, "not a config"))
    assert (e.status, e.messages) == (
        400,
        ["The VM could not be created", "no VM configuration"],
    )
    e = error_of(lambda: c.create(replace(config(kernel), memory=MemoryConfig(1 << 20))))
    assert e.status == 400
    assert e.messages[:2] == ["The VM could not be created", "Failed to validate config"]
    assert e.messages[2].startswith("--memory size=1048576")
    assert c.state is None and c.config is None
    cfg = config(kernel)
    c.create(cfg)
    assert c.state is VmState.CREATED and c.config is cfg
    e = error_of(lambda: c.create(cfg))
    assert (e.status, e.messages) == (
        500,
        ["The VM could not be created", "VM is already created (the VM is Created)"],
    )


def test_info_of_a_created_vm_lists_the_configured_devices(ctl: Ctl, kernel: Path) -> None:
    c, _, _ = ctl
    disk = kernel.parent / "disk.raw"
    disk.write_bytes(bytes(4096))
    cfg = config(
        kernel,
        disks=(DiskConfig(path=disk), DiskConfig(path=disk, id="data")),
        net=(NetConfig(), NetConfig(id="eth1")),
        rng=RngConfig(),
        serial=ConsoleConfig(ConsoleMode.NULL),
        console=ConsoleConfig(ConsoleMode.NULL),
    )
    c.create(cfg)
    info = c.info()
    assert info["state"] == "Created"
    assert info["memory_actual_size"] == 16 << 20
    assert info["config"]["memory"]["size"] == 16 << 20
    assert "device_tree" not in info  # no VM yet
    c.boot()
    tree = c.info()["device_tree"]
    # A Vm with a device manager but no virtio devices: the serial port only.
    assert tree == {"__serial": {"id": "__serial", "resources": [], "children": []}}


def test_device_tree_from_the_config_when_the_vm_has_no_device_manager(kernel: Path) -> None:
    disk = kernel.parent / "disk.raw"
    disk.write_bytes(bytes(4096))
    cfg = config(
        kernel,
        disks=(DiskConfig(path=disk), DiskConfig(path=disk, id="data")),
        net=(NetConfig(), NetConfig(id="eth1")),
        rng=RngConfig(),
        serial=ConsoleConfig(ConsoleMode.OFF),
        console=ConsoleConfig(ConsoleMode.NULL),
    )

    def no_device_manager(c: VmConfig) -> Vm:
        vm = hlt_vm()
        vm.device_manager = None
        return vm

    c = VmmController(no_device_manager, no_shutdown=True)
    c.start()
    try:
        c.create(cfg)
        c.boot()
        tree = c.info()["device_tree"]
        assert list(tree) == ["__console", "_disk0", "data", "_net2", "eth1", "__rng"]
        assert tree["_net2"] == {"id": "_net2", "resources": [], "children": []}
    finally:
        c.close()


# -- the life of a VM -------------------------------------------------------------------------
def test_boot_pause_resume_shutdown_boot_delete(ctl: Ctl, kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    vm = factory.latest
    assert c.state is VmState.RUNNING and vm.state is VmState.RUNNING
    e = error_of(c.boot)
    assert (e.status, e.messages) == (
        500,
        ["The VM could not boot", "VM is already created (the VM is Running)"],
    )
    c.pause()
    assert c.state is VmState.PAUSED and vm.state is VmState.PAUSED
    assert all(v.paused for v in vm.vcpus)
    assert c._park is not None and c._park.wait_parked(0)  # the device loop is parked
    e = error_of(c.pause)
    assert e.status == 500
    assert e.messages == [
        "The VM could not be paused",
        "Cannot pause VM",
        "invalid VM state transition: Paused to Paused (the VM is Paused)",
    ]
    c.resume()
    assert c.state is VmState.RUNNING and vm.state is VmState.RUNNING
    assert c._park is None and c._clock is None
    c.shutdown()
    assert c.state is VmState.SHUTDOWN and vm.state is VmState.SHUTDOWN
    assert vm.stop_result == Stop(StopReason.REQUESTED, "shutdown requested")
    e = error_of(c.pause)
    assert e.messages == ["The VM could not be paused", "VM is not running (the VM is Shutdown)"]
    c.boot()  # a shut down VM boots again: a new VM from the same config
    assert len(factory.vms) == 2 and c.state is VmState.RUNNING
    c.delete()
    assert c.state is None and c.config is None
    assert factory.latest.state is VmState.SHUTDOWN
    assert factory.closes == 1
    assert events.names() == [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("vm", "pausing"),
        ("vm", "paused"),
        ("vm", "resuming"),
        ("vm", "resumed"),
        ("vm", "shutdown"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("vm", "shutdown"),
        ("vm", "deleted"),
    ]


def test_reboot_replaces_the_vm(ctl: Ctl, kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    old = factory.latest
    c.reboot()
    assert len(factory.vms) == 2 and factory.latest is not old
    assert old.state is VmState.SHUTDOWN and c.state is VmState.RUNNING
    assert events.names()[-2:] == [("vm", "rebooting"), ("vm", "rebooted")]
    c.pause()
    c.reboot()  # a paused VM reboots too, and its device loop is released
    assert c.state is VmState.RUNNING and c._park is None


def test_power_button_reaches_the_guest_ged(ctl: Ctl, kernel: Path) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    c.power_button()
    dm = factory.latest.device_manager
    assert dm is not None and dm.ged is not None and dm.ged.pending == GED_POWER_BUTTON


def test_power_button_without_acpi_is_a_500_naming_why(kernel: Path) -> None:
    c = VmmController(Factory(acpi=False), no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        e = error_of(c.power_button)
        assert (e.status, e.messages) == (
            500,
            ["Error triggering power button", "the guest has no ACPI power button (ACPI is off)"],
        )
    finally:
        c.close()


def test_power_button_from_a_ged_device_when_the_vm_has_no_hook(kernel: Path) -> None:
    pressed: list[str] = []

    class Ged:
        def power_button(self) -> None:
            pressed.append("ged")

    class NoHook(Vm):
        power_button = None  # type: ignore[assignment]

    def factory(cfg: VmConfig) -> Vm:
        vm = hlt_vm()
        plain = NoHook(vm.machine, devices={"ged": Ged()})
        return plain

    c = VmmController(factory, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        c.power_button()
        assert pressed == ["ged"]
    finally:
        c.close()

    def no_ged(cfg: VmConfig) -> Vm:
        return NoHook(hlt_vm().machine)

    c = VmmController(no_ged, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        e = error_of(c.power_button)
        assert e.status == 500
        assert e.messages == [
            "Error triggering power button",
            "the guest has no ACPI power button (this VM has no ACPI GED device)",
        ]
    finally:
        c.close()


def test_counters(ctl: Ctl, kernel: Path) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    assert c.counters() == {}
    vm = factory.latest
    vm.counters = lambda: {"_disk0": {"read_bytes": 512, 7: True}}  # type: ignore[method-assign,dict-item]
    assert c.counters() == {"_disk0": {"read_bytes": 512, "7": 1}}
    vm.counters = lambda: {"_disk0": {"read_bytes": "x"}}  # type: ignore[method-assign,dict-item]
    e = error_of(c.counters)
    assert e.status == 500
    assert e.messages == [
        "The VM info is not available",
        "Error getting counters",
        "ValueError: invalid literal for int() with base 10: 'x'",
    ]


# -- failures while building or starting ------------------------------------------------------
def test_build_and_start_failures(kernel: Path) -> None:
    mode = {"fail": "config"}
    built: list[Vm] = []

    def factory(cfg: VmConfig) -> Vm:
        if mode["fail"] == "config":
            raise ConfigError("--serial pty: not supported yet")
        if mode["fail"] == "crash":
            raise RuntimeError("out of memory slots")
        vm = hlt_vm()
        built.append(vm)
        if mode["fail"] == "start":

            def broken() -> None:
                raise OSError("KVM_RUN failed")

            vm.start = broken  # type: ignore[method-assign]
        return vm

    c = VmmController(factory, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        for fail, status, last in (
            ("config", 400, "--serial pty: not supported yet"),
            ("crash", 500, "RuntimeError: out of memory slots"),
            ("start", 500, "OSError: KVM_RUN failed"),
        ):
            mode["fail"] = fail
            e = error_of(c.boot)
            assert (e.status, e.messages) == (status, ["The VM could not boot", last])
            assert c.state is VmState.CREATED
        assert built[-1].state is VmState.SHUTDOWN  # the VM that did not start was shut down
        mode["fail"] = ""
        c.boot()
        assert c.state is VmState.RUNNING
    finally:
        c.close()


def test_an_action_that_raises_is_an_internal_server_error(ctl: Ctl, kernel: Path) -> None:
    c, _, _ = ctl
    c.create(config(kernel))
    c._info = lambda: 1 / 0  # type: ignore[method-assign]
    e = error_of(c.info)
    assert (e.status, e.messages) == (
        500,
        ["Internal Server Error", "ZeroDivisionError: division by zero"],
    )
    assert c.state is VmState.CREATED  # the VMM thread lives on


def test_on_vm_start_hook_and_its_cleanup(kernel: Path) -> None:
    seen: list[str] = []

    def on_start(vm: Any) -> Callable[[], None]:
        seen.append(f"start {vm.state.value}")
        return lambda: seen.append("cleanup")

    c = VmmController(Factory(), no_shutdown=True, on_vm_start=on_start)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        assert seen == ["start Running"]
        c.reboot()
        assert seen == ["start Running", "cleanup", "start Running"]
        c.shutdown()
        assert seen[-1] == "cleanup" and len(seen) == 4
    finally:
        c.close()

    def broken(vm: Any) -> None:
        raise RuntimeError("no terminal")

    c = VmmController(Factory(), no_shutdown=True, on_vm_start=broken)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()  # a failing hook does not fail the boot
        assert c.state is VmState.RUNNING
    finally:
        c.close()


# -- the VM stopping by itself ----------------------------------------------------------------
def test_guest_power_off_ends_the_vmm(kernel: Path) -> None:
    events = Events()
    factory = Factory()
    c = VmmController(factory, events=events)
    c.start()
    c.create(config(kernel))
    c.boot()
    assert not c.wait(0) and c.exit_status == EXIT_OK
    stop = Stop(StopReason.POWEROFF, "the guest powered off", 0)
    factory.latest.request_stop(stop)
    assert c.wait(10)
    assert c.exit_stop == stop and c.guest_stop == stop and c.exit_status == EXIT_OK
    assert c.state is None
    assert events.got[-3:] == [
        ("vm", "shutdown", {"reason": "poweroff", "message": "the guest powered off"}),
        ("vm", "deleted", None),
        ("vmm", "shutdown", None),
    ]
    c.close()
    assert events.closed


def test_guest_crash_sets_the_crash_exit_status_and_panic_event(kernel: Path) -> None:
    events = Events()
    factory = Factory()
    c = VmmController(factory, events=events)
    c.start()
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.GUEST_PANIC, "the guest reported a crash", 0))
    assert c.wait(10)
    assert c.exit_status == EXIT_GUEST_CRASH
    assert ("guest", "panic", {"event": "panicked"}) in events.got
    c.close()


def test_no_shutdown_keeps_the_vmm_after_a_guest_stop(ctl: Ctl, kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.TRIPLE_FAULT, "triple fault", 0))
    assert poll(lambda: c.state is VmState.SHUTDOWN)
    assert not c.wait(0.1) and c.exit_stop is None
    assert c.guest_stop == Stop(StopReason.TRIPLE_FAULT, "triple fault", 0)
    assert ("guest", "panic") not in events.names()
    assert factory.latest.state is VmState.SHUTDOWN


def test_guest_reset_reboots_unless_no_reboot(ctl: Ctl, kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.RESET, "reset"))
    assert poll(lambda: len(factory.vms) == 2 and c.state is VmState.RUNNING)
    assert poll(lambda: ("vm", "rebooted") in events.names())
    c.delete()
    c.create(replace(config(kernel), no_reboot=True))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.RESET, "reset"))
    assert poll(lambda: c.state is VmState.SHUTDOWN)
    assert len(factory.vms) == 3


def test_a_stop_from_a_vm_already_replaced_is_ignored(ctl: Ctl, kernel: Path) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    old = factory.latest
    c.reboot()
    c._on_vm_stop(old, Stop(StopReason.POWEROFF, "late"))  # as its on_stop would
    c.ping()  # the stop was queued before: it has run
    assert c.state is VmState.RUNNING and c.guest_stop is None


# -- queuing ----------------------------------------------------------------------------------
def test_call_timeout_and_submit_after_close(kernel: Path) -> None:
    release = threading.Event()

    def slow(cfg: VmConfig) -> Vm:
        release.wait(10)
        return hlt_vm()

    c = VmmController(slow, no_shutdown=True)
    c.start()
    c.start()  # a second start is a no-op
    c.create(config(kernel))
    with pytest.raises(TimeoutError, match=r"^vm.boot: no answer from the VMM thread in 0.1 s$"):
        c.call(Action.BOOT, timeout=0.1)
    release.set()
    assert poll(lambda: c.state is VmState.RUNNING)
    c.close()
    c.close()  # twice is fine
    got: list[Any] = []
    c.submit(Action.PING, None, lambda r, e: got.append((r, e)))
    assert got[0][0] is None and isinstance(got[0][1], VmmError)
    assert (got[0][1].status, got[0][1].messages) == (500, ["The VMM is not running"])
    c.submit(Action.PING)  # without a callback: nothing happens, nothing raises


def test_submit_before_start_is_refused() -> None:
    c = VmmController(Factory())
    got: list[Any] = []
    c.submit(Action.PING, None, lambda r, e: got.append(e))
    assert isinstance(got[0], VmmError) and got[0].messages == ["The VMM is not running"]


def test_shutdown_vmm_deletes_the_vm_and_ends(ctl: Ctl, kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    c.shutdown_vmm()
    assert c.wait(5) and c.state is None and c.exit_status == EXIT_OK
    assert factory.latest.state is VmState.SHUTDOWN
    assert events.names()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]


def test_report_device_error(ctl: Ctl) -> None:
    c, _, events = ctl
    c.report_device_error("_disk0", "EIO")
    assert events.got[-1] == ("device", "error", {"id": "_disk0", "error": "EIO"})


# -- VMs with less (or more) than strato's Vm ---------------------------------------------------
class ProtocolOnlyVm:
    """A real Vm seen through the ManagedVm protocol alone: no counters, no power button, no
    devices, no device manager (what a VM from another factory may offer)."""

    def __init__(self) -> None:
        self._vm = hlt_vm()
        self.on_stop = self._vm.on_stop

    @property
    def state(self) -> VmState:
        return self._vm.state

    def start(self) -> None:
        self._vm.start()

    def pause(self) -> None:
        self._vm.pause()

    def resume(self) -> None:
        self._vm.resume()

    def request_stop(self, stop: Stop) -> None:
        self._vm.request_stop(stop)

    def shutdown(self) -> None:
        self._vm.shutdown()


def test_a_vm_with_only_the_protocol(kernel: Path) -> None:
    c = VmmController(lambda cfg: ProtocolOnlyVm(), no_shutdown=True)  # type: ignore[arg-type,return-value]
    c.start()
    try:
        c.create(
            config(
                kernel,
                serial=ConsoleConfig(ConsoleMode.NULL),
                console=ConsoleConfig(ConsoleMode.OFF),
                rng=RngConfig(),
            )
        )
        c.boot()
        assert c.counters() == {}
        e = error_of(c.power_button)
        assert e.status == 500
        assert (
            e.messages[-1] == "the guest has no ACPI power button (this VM has no ACPI GED device)"
        )
        assert c.info()["device_tree"] == {
            "__serial": {"id": "__serial", "resources": [], "children": []},
            "__rng": {"id": "__rng", "resources": [], "children": []},
        }
        c.pause()
        c.resume()
        assert c.state is VmState.RUNNING
    finally:
        c.close()


def test_a_vm_that_has_its_own_device_tree(kernel: Path) -> None:
    class WithTree(Vm):
        def device_tree(self) -> dict[str, Any]:
            return {"mine": {"id": "mine", "resources": [], "children": ["x"]}}

    def factory(cfg: VmConfig) -> Vm:
        vm = hlt_vm()
        return WithTree(vm.machine)

    c = VmmController(factory, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        assert c.info()["device_tree"] == {
            "mine": {"id": "mine", "resources": [], "children": ["x"]}
        }
    finally:
        c.close()


def test_the_device_tree_lists_virtio_devices_with_their_pci_address(kernel: Path) -> None:
    def factory(cfg: VmConfig) -> Vm:
        vm = hlt_vm()
        vm.device_manager = DeviceManager.create(vm.machine)
        vm.device_manager.add_virtio("rng", Rng(), "__rng")
        return vm

    c = VmmController(factory, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel, serial=ConsoleConfig(ConsoleMode.OFF)))
        c.boot()
        tree = c.info()["device_tree"]
        assert list(tree) == ["__rng"]
        slot = tree["__rng"]["pci_bdf"]
        assert tree["__rng"] == {"id": "__rng", "resources": [], "children": [], "pci_bdf": slot}
        assert slot == "0000:00:01.0"
        assert c.counters()["__rng"] == {k: int(v) for k, v in Rng().counters().items()}
    finally:
        c.close()


def test_a_counters_failure_is_logged(
    ctl: Ctl, kernel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.counters = lambda: {"_disk0": None}  # type: ignore[method-assign,dict-item]
    with caplog.at_level(logging.ERROR, logger="strato.vmm.controller"):
        e = error_of(c.counters)
    assert e.status == 500 and e.messages[1] == "Error getting counters"
    assert "reading the VM's counters failed" in [r.getMessage() for r in caplog.records]


def test_resume_keeps_the_guest_clock_where_the_pause_left_it(ctl: Ctl, kernel: Path) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    vmfd = factory.latest.machine.vm
    c.pause()
    at_pause = vmfd.get_clock().clock
    time.sleep(1.0)  # let host time pass while paused: the guest must not see it
    c.resume()
    # 1 s went by on the host; the guest's clock moved on from the pause by far less.
    assert vmfd.get_clock().clock - at_pause < 0.5e9


def test_resume_refused_by_the_vm_names_its_state(ctl: Ctl, kernel: Path) -> None:
    """The controller thinks the VM is paused but the Vm runs (it was resumed behind the
    controller's back): the Vm's refusal comes back as Cloud Hypervisor's error."""
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    c.pause()
    factory.latest.resume()
    e = error_of(c.resume)
    assert (e.status, e.messages) == (
        500,
        [
            "The VM could not resume",
            "Cannot resume VM",
            "invalid VM state transition: Running to Running (the VM is Running)",
        ],
    )
    assert c.state is VmState.PAUSED


def test_a_failed_reboot_leaves_the_vm_shut_down(kernel: Path) -> None:
    builds = {"n": 0}

    def factory(cfg: VmConfig) -> Vm:
        builds["n"] += 1
        if builds["n"] > 1:
            raise RuntimeError("no more memory slots")
        return hlt_vm()

    c = VmmController(factory, no_shutdown=True)
    c.start()
    try:
        c.create(config(kernel))
        c.boot()
        e = error_of(c.reboot)
        assert (e.status, e.messages) == (
            500,
            ["The VM could not reboot", "RuntimeError: no more memory slots"],
        )
        assert c.state is VmState.SHUTDOWN
    finally:
        c.close()


def test_pause_parks_only_a_running_device_loop(
    ctl: Ctl, kernel: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    with caplog.at_level(logging.WARNING, logger="strato.vmm.controller"):
        c.pause()  # a running loop: parked at once, no warning
        assert c._park is not None
        c.resume()
        factory.latest.machine.loop.stop()  # no loop thread: nothing to park
        c.pause()
        assert c._park is None
        c.resume()
    assert [r.getMessage() for r in caplog.records] == []


def test_pause_refused_by_the_vm_names_its_state(ctl: Ctl, kernel: Path) -> None:
    """The Vm was paused behind the controller's back: its refusal comes back as Cloud
    Hypervisor's error, and the controller still says Running."""
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.pause()
    e = error_of(c.pause)
    assert (e.status, e.messages) == (
        500,
        [
            "The VM could not be paused",
            "Cannot pause VM",
            "invalid VM state transition: Paused to Paused (the VM is Paused)",
        ],
    )
    assert c.state is VmState.RUNNING


def test_close_deletes_the_vm_ends_the_thread_and_closes_factory_and_events(
    kernel: Path,
) -> None:
    factory, events = Factory(), Events()
    c = VmmController(factory, events=events, no_shutdown=True)
    c.start()
    c.create(config(kernel))
    c.boot()
    thread = c._thread
    c.close()
    assert thread is not None and not thread.is_alive()
    assert factory.latest.state is VmState.SHUTDOWN
    assert factory.closes == 2  # once for the deleted config, once for the VMM
    assert events.closed and events.names()[-2:] == [("vm", "shutdown"), ("vm", "deleted")]


def test_close_without_start(kernel: Path) -> None:
    factory, events = Factory(), Events()
    c = VmmController(factory, events=events)
    c.close()
    assert factory.closes == 1 and events.closed and factory.vms == []
