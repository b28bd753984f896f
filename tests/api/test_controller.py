"""The VMM controller without HTTP, driving real VMs (strato's builder, the built-in guest with
real devices): the VMM thread, guest stops, failures, quiescing."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from typing import Any

import pytest

from strato._sys.eventfd import EventFd
from strato.vmm.config import VmConfig
from strato.vmm.config_json import vm_config_from_json
from strato.vmm.controller import Action, VmmController, VmmError
from strato.vmm.events import parse_events
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import VmState
from tests.api.helpers import BOOT_LINE, KVM, POWER_PASS, READY_POWER, ApiEnv, poll
from tests.faults.guestrun import crash_status

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not KVM, reason="needs /dev/kvm")]


def config(env: ApiEnv, cmdline: str | None = None) -> VmConfig:
    return vm_config_from_json(env.config_json() if cmdline is None else env.config_json(cmdline))


def shut_down(c: VmmController) -> bool:
    """Whether the VM is shut down, asked on the VMM thread (`c.state` read from this thread
    may catch the transient Shutdown inside a reboot)."""
    return c.info()["state"] == "Shutdown"


def test_blocking_api(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    assert env.builder is not None
    assert c.state is None
    c.create(config(env))
    assert c.state is VmState.CREATED and env.builder.vms == []
    c.boot()
    vm = env.vm
    assert c.state is VmState.RUNNING and vm.state is VmState.RUNNING
    env.wait_serial(READY_POWER)
    c.pause()
    assert c.state is VmState.PAUSED and vm.state is VmState.PAUSED
    assert all(v.paused for v in vm.vcpus)
    c.resume()
    assert c.state is VmState.RUNNING and vm.state is VmState.RUNNING
    assert poll(lambda: not any(v.paused for v in vm.vcpus))
    counters = c.counters()
    assert set(counters) >= {"_disk0", "__rng", "__console"}
    assert counters["_disk0"]["read_ops"] == 0  # this guest does not use its disk
    c.power_button()
    assert poll(lambda: shut_down(c)), env.serial()
    assert POWER_PASS in env.serial() and vm.state is VmState.SHUTDOWN
    assert not c.wait(0)  # no_shutdown: the VMM outlives its guest
    c.boot()  # a shut down VM boots again: a new VM of the same config
    assert len(env.builder.vms) == 2 and c.state is VmState.RUNNING
    assert env.vm.state is VmState.RUNNING
    env.wait_serial(BOOT_LINE, 2)
    c.delete()
    assert c.state is None and env.vm.state is VmState.SHUTDOWN
    ping = c.ping()
    assert ping["pid"] == os.getpid() and ping["version"] == c.version


def test_guest_crash_gives_the_crash_exit_status(make_env: Any) -> None:
    """The built-in guest with fault=ud takes an invalid opcode, reports it and triple faults."""
    env: ApiEnv = make_env(no_shutdown=False)
    c = env.controller
    c.create(config(env, "fault=ud"))
    c.boot()
    assert c.wait(30), env.serial()
    assert "FATAL exception vector=6" in env.serial()
    assert c.exit_status == crash_status()
    assert c.exit_stop is not None and c.exit_stop.is_crash


def test_guest_reset_reboots_unless_no_reboot(api_env: ApiEnv) -> None:
    """The built-in guest's `reboot` check: boot 1 writes a marker and resets the machine;
    rebooted, boot 2 finds it and powers off. With no_reboot the reset stops the VM."""
    env, c = api_env, api_env.controller
    assert env.builder is not None
    c.create(config(env, "tests=reboot"))
    c.boot()
    assert poll(lambda: shut_down(c), timeout=60), env.serial()
    assert "boot=2 found=boot1" in env.serial() and env.serial().count(BOOT_LINE) == 2
    assert ("vm", "rebooted") in env.events()
    assert c.guest_stop is not None and c.guest_stop.reason is StopReason.POWEROFF
    first = env.builder.vms[0]
    assert first.stop_result is not None and first.stop_result.reason is StopReason.RESET
    c.delete()
    built = len(env.builder.vms)
    env.disk.write_bytes(bytes(1 << 20))  # a fresh disk: the guest's first boot again
    c.create(replace(config(env, "tests=reboot"), no_reboot=True))
    c.boot()
    assert poll(lambda: shut_down(c), timeout=60), env.serial()
    assert c.guest_stop is not None and c.guest_stop.reason is StopReason.RESET
    assert len(env.builder.vms) == built + 1 and env.vm.state is VmState.SHUTDOWN
    assert env.serial().count(BOOT_LINE) == 1 and " boot=1 " in env.serial()


def test_guest_panic_event(api_env: ApiEnv) -> None:
    """KVM_SYSTEM_EVENT_CRASH (the exit handler's GUEST_PANIC) on a real VM: event, shut down."""
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    env.vm.request_stop(Stop(StopReason.GUEST_PANIC, "the guest reported a crash", 0))
    assert poll(lambda: ("guest", "panic") in env.events())
    assert poll(lambda: shut_down(c))
    assert env.vm.state is VmState.SHUTDOWN


def test_build_and_start_failures_leave_the_vmm_working(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    builder = env.builder
    assert builder is not None
    c.create(config(env))
    for fail, status, words in (
        ("config", 400, "pty"),
        ("crash", 500, "out of memory slots"),
        ("start", 500, "KVM_RUN"),
    ):
        builder.fail = fail
        with pytest.raises(VmmError, match=words) as e:
            c.boot()
        assert e.value.status == status
        assert e.value.messages[0] == "The VM could not boot"
        assert c.state is VmState.CREATED
    # The real VM that did not start was shut down and released.
    assert len(builder.vms) == 1 and builder.vms[0].state is VmState.SHUTDOWN
    builder.fail = None
    c.boot()
    assert c.state is VmState.RUNNING and env.vm.state is VmState.RUNNING
    env.wait_serial(BOOT_LINE)


def test_an_action_that_raises_is_a_500_and_the_thread_lives(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    env.vm.counters = lambda: 1 / 0  # type: ignore[method-assign]
    with pytest.raises(VmmError, match="ZeroDivisionError") as e:
        c.counters()
    assert e.value.status == 500
    assert e.value.messages[:2] == ["The VM info is not available", "Error getting counters"]
    assert c.info()["state"] == "Running"


def test_call_timeout_and_submit_after_close(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    assert env.builder is not None
    env.builder.release = release = threading.Event()  # the next build waits for it
    c.create(config(env))
    with pytest.raises(TimeoutError, match=r"vm\.boot: no answer from the VMM thread"):
        c.call(Action.BOOT, timeout=0.1)
    release.set()
    assert poll(lambda: c.state is VmState.RUNNING)
    c.close()
    assert env.vm.state is VmState.SHUTDOWN
    got: list[Any] = []
    c.submit(Action.PING, None, lambda r, e: got.append(e))
    assert isinstance(got[0], VmmError) and "not running" in str(got[0])


def test_power_button_and_counters_from_devices(api_env: ApiEnv) -> None:
    """A VM without the hooks: the controller finds the ACPI GED and the device counters in
    vm.devices (the real VM's GED and disk)."""
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    vm = env.vm
    dm = vm.device_manager
    vm.power_button = None  # type: ignore[assignment,method-assign]
    vm.counters = None  # type: ignore[assignment,method-assign]
    vm.devices = {"ged": dm.ged, "_disk0": dm.virtio[0].device, "no counters": object()}
    env.wait_serial(READY_POWER)
    assert set(c.counters()) == {"_disk0"}
    assert set(c.counters()["_disk0"]) >= {"read_ops", "write_ops", "read_bytes"}
    c.power_button()
    assert poll(lambda: shut_down(c)), env.serial()
    assert POWER_PASS in env.serial()


def test_pause_parks_the_device_event_loop(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    loop = env.vm.machine.loop
    efd = EventFd()
    handled: list[int] = []
    loop.register(efd.fd, lambda mask: handled.append(efd.read()))
    efd.write(1)
    assert poll(lambda: handled == [1])
    c.pause()
    efd.write(1)
    time.sleep(0.2)  # the device loop must not run while paused: watch for a while
    assert handled == [1]
    c.resume()
    assert poll(lambda: handled == [1, 1])
    c.pause()
    thread = loop.thread
    assert thread is not None and thread.is_alive()
    c.shutdown()  # shutting down a paused VM releases its device loop, which then ends
    assert not thread.is_alive()
    assert env.vm.state is VmState.SHUTDOWN
    efd.close()


def test_transition_errors_name_the_state(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    with pytest.raises(VmmError, match="Running to Running") as e:
        c.resume()
    assert e.value.messages == [
        "The VM could not resume",
        "Cannot resume VM",
        "invalid VM state transition: Running to Running (the VM is Running)",
    ]
    assert env.vm.state is VmState.RUNNING
    with pytest.raises(VmmError, match="already created") as e:
        c.create(config(env))
    assert e.value.status == 500 and "Running" in e.value.messages[-1]
    c.pause()
    with pytest.raises(VmmError, match="Paused to Paused") as e:
        c.pause()
    assert e.value.messages[:2] == ["The VM could not be paused", "Cannot pause VM"]
    assert env.vm.state is VmState.PAUSED


def test_event_monitor_file_and_device_errors(api_env: ApiEnv) -> None:
    env, c = api_env, api_env.controller
    c.create(config(env))
    c.boot()
    c.report_device_error("_disk0", "read failed: EIO")
    c.close()  # flushes the monitor
    events = parse_events(env.events_path.read_text())
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
    assert env.vm.state is VmState.SHUTDOWN
