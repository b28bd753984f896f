"""The VMM controller without HTTP: the VMM thread, guest stops, failures, quiescing."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from strato._sys.eventfd import EventFd
from strato.events import EventLoop
from strato.vmm.config import ConfigError, MemoryConfig, PayloadConfig, VmConfig
from strato.vmm.controller import Action, VmmController, VmmError
from strato.vmm.events import EventMonitor, parse_events
from strato.vmm.stop import EXIT_GUEST_CRASH, Stop, StopReason
from strato.vmm.vm import VmState
from tests.api.helpers import FakeFactory, FakeVm, poll


class Recorder:
    """An EventSink that keeps the events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, str] | None]] = []

    def emit(self, source: str, event: str, properties: Any = None) -> None:
        self.events.append((source, event, dict(properties) if properties else None))

    def close(self, timeout: float = 2.0) -> None:
        pass

    def names(self) -> list[tuple[str, str]]:
        return [(s, e) for s, e, _ in self.events]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "kernel"
    k.write_bytes(b"\xf4")
    return k


def config(kernel: Path, **kw: Any) -> VmConfig:
    return VmConfig(payload=PayloadConfig(kernel=kernel), memory=MemoryConfig(16 << 20), **kw)


@pytest.fixture
def ctl() -> Iterator[tuple[VmmController, FakeFactory, Recorder]]:
    factory = FakeFactory()
    events = Recorder()
    c = VmmController(factory, events=events, no_shutdown=True)
    c.start()
    yield c, factory, events
    c.close()


def test_blocking_api(ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path) -> None:
    c, factory, _ = ctl
    assert c.state is None
    c.create(config(kernel))
    assert c.state is VmState.CREATED
    c.boot()
    assert factory.latest.calls == ["start"]
    c.pause()
    c.resume()
    assert c.counters()["_disk0"]["read_bytes"] == 512
    c.power_button()
    assert poll(lambda: c.state is VmState.SHUTDOWN)
    c.boot()  # a shut down VM boots again
    assert len(factory.vms) == 2 and c.state is VmState.RUNNING
    c.delete()
    assert c.state is None
    ping = c.ping()
    assert ping["pid"] == os.getpid() and ping["version"] == c.version


def test_guest_poweroff_ends_the_vmm_unless_no_shutdown(kernel: Path) -> None:
    events = Recorder()
    c = VmmController(FakeFactory(), events=events)
    c.start()
    c.create(config(kernel))
    c.boot()
    assert not c.wait(0)
    c.power_button()
    assert c.wait(5)
    assert c.exit_status == 0 and c.state is None
    assert events.names()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]
    c.close()


def test_guest_crash_gives_the_crash_exit_status(kernel: Path) -> None:
    factory = FakeFactory()
    c = VmmController(factory)
    c.start()
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.TRIPLE_FAULT, "triple fault", 0))
    assert c.wait(5)
    assert c.exit_status == EXIT_GUEST_CRASH
    c.close()


def test_guest_reset_reboots_unless_no_reboot(
    ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path
) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.RESET, "reset"))
    assert poll(lambda: len(factory.vms) == 2 and c.state is VmState.RUNNING)
    assert ("vm", "rebooted") in events.names()
    c.delete()
    c.create(config(kernel, no_reboot=True))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.RESET, "reset"))
    assert poll(lambda: c.state is VmState.SHUTDOWN)
    assert len(factory.vms) == 3


def test_guest_panic_event(ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path) -> None:
    c, factory, events = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.request_stop(Stop(StopReason.GUEST_PANIC, "panic"))
    assert poll(lambda: ("guest", "panic") in events.names())
    assert poll(lambda: c.state is VmState.SHUTDOWN)


def test_build_and_start_failures_leave_the_vmm_working(kernel: Path) -> None:
    mode = {"fail": "config"}
    started: list[FakeVm] = []

    def factory(cfg: VmConfig) -> FakeVm:
        if mode["fail"] == "config":
            raise ConfigError("--serial pty: not supported yet")
        if mode["fail"] == "crash":
            raise RuntimeError("out of memory slots")
        vm = FakeVm(cfg)
        if mode["fail"] == "start":
            vm.start = lambda: (_ for _ in ()).throw(OSError("KVM_RUN"))  # type: ignore[method-assign]
        started.append(vm)
        return vm

    c = VmmController(factory)
    c.start()
    c.create(config(kernel))
    for fail, status, words in (
        ("config", 400, "pty"),
        ("crash", 500, "out of memory slots"),
        ("start", 500, "KVM_RUN"),
    ):
        mode["fail"] = fail
        with pytest.raises(VmmError) as e:
            c.boot()
        assert e.value.status == status and words in str(e.value)
        assert c.state is VmState.CREATED
    assert started[-1].calls == ["shutdown"]  # the VM that did not start was cleaned up
    mode["fail"] = ""
    c.boot()
    assert c.state is VmState.RUNNING
    c.close()


def test_an_action_that_raises_is_a_500_and_the_thread_lives(
    ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path
) -> None:
    c, factory, _ = ctl
    c.create(config(kernel))
    c.boot()
    factory.latest.counters = lambda: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(VmmError) as e:
        c.counters()
    assert e.value.status == 500 and "ZeroDivisionError" in str(e.value)
    assert c.info()["state"] == "Running"


def test_call_timeout_and_submit_after_close(kernel: Path) -> None:
    release = threading.Event()

    def slow(cfg: VmConfig) -> FakeVm:
        release.wait(10)
        return FakeVm(cfg)

    c = VmmController(slow)
    c.start()
    c.create(config(kernel))
    with pytest.raises(TimeoutError):
        c.call(Action.BOOT, timeout=0.1)
    release.set()
    assert poll(lambda: c.state is VmState.RUNNING)
    c.close()
    got: list[Any] = []
    c.submit(Action.PING, None, lambda r, e: got.append(e))
    assert isinstance(got[0], VmmError) and "not running" in str(got[0])


def test_power_button_and_counters_from_devices(
    ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path
) -> None:
    """A Vm without the hooks: the ACPI GED in vm.devices, device counters."""
    c, _, _ = ctl
    pressed: list[int] = []

    class Bare(FakeVm):
        power_button = None  # type: ignore[assignment]
        counters = None  # type: ignore[assignment]

    def make(cfg: VmConfig) -> Bare:
        vm = Bare(cfg)
        vm.devices = {  # type: ignore[attr-defined]
            "ged": SimpleNamespace(power_button=lambda: pressed.append(1)),
            "_disk0": SimpleNamespace(counters=lambda: {"read_ops": 3}),
            "serial": object(),
        }
        return vm

    c._factory = make
    c.create(config(kernel))
    c.boot()
    c.power_button()
    assert pressed == [1]
    assert c.counters() == {"_disk0": {"read_ops": 3}}


def test_pause_parks_the_device_event_loop(
    ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path
) -> None:
    c, _, _ = ctl
    loop = EventLoop()
    efd = EventFd()
    handled: list[int] = []
    loop.register(efd.fd, lambda mask: handled.append(efd.read()))
    loop.start()

    def make(cfg: VmConfig) -> FakeVm:
        vm = FakeVm(cfg)
        vm.machine = SimpleNamespace(loop=loop, vm=None)  # type: ignore[attr-defined]
        return vm

    c._factory = make
    c.create(config(kernel))
    c.boot()
    efd.write(1)
    assert poll(lambda: handled == [1])
    c.pause()
    efd.write(1)
    time.sleep(0.2)  # the device loop must not run while paused: watch for a while
    assert handled == [1]
    c.resume()
    assert poll(lambda: handled == [1, 1])
    c.pause()
    c.shutdown()  # shutting down a paused VM releases its device loop
    efd.write(1)
    assert poll(lambda: handled == [1, 1, 1])
    loop.close()
    efd.close()


def test_transition_errors_name_the_state(
    ctl: tuple[VmmController, FakeFactory, Recorder], kernel: Path
) -> None:
    c, _, _ = ctl
    c.create(config(kernel))
    c.boot()
    with pytest.raises(VmmError) as e:
        c.resume()
    assert e.value.messages == [
        "The VM could not resume",
        "Cannot resume VM",
        "invalid VM state transition: Running to Running (the VM is Running)",
    ]
    with pytest.raises(VmmError) as e:
        c.create(config(kernel))
    assert e.value.status == 500 and "Running" in e.value.messages[-1]


def test_event_monitor_file_and_device_errors(tmp_path: Path, kernel: Path) -> None:
    path = tmp_path / "events"
    c = VmmController(FakeFactory(), events=EventMonitor.open(path), no_shutdown=True)
    c.start()
    c.create(config(kernel))
    c.boot()
    c.report_device_error("_disk0", "read failed: EIO")
    c.close()  # flushes the monitor
    events = parse_events(path.read_text())
    names = [(e["source"], e["event"]) for e in events]
    assert names == [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("device", "error"),
        ("vm", "shutdown"),
        ("vm", "deleted"),
    ]
    assert events[3]["properties"] == {"id": "_disk0", "error": "read failed: EIO"}
