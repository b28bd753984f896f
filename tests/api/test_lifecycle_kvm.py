"""The VM lifecycle through the REST API, against strato's real builder and the built-in guest
with real devices (a raw disk, a tap when root, rng, a console).

create -> boot -> counters -> pause -> resume -> reboot -> power-button -> delete, the event
stream it writes, the guest rebooting and powering off by itself, and every request in every
state (allowed or not) with Cloud Hypervisor's status codes. Each step is checked on the real
VM too (its own state, its vCPUs, its GED) and, where the guest can see it, by the guest.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from strato.api import ApiError
from strato.devices.legacy.ged import GED_POWER_BUTTON
from strato.vmm.stop import StopReason
from strato.vmm.vm import VmState
from tests.api.helpers import (
    BOOT_LINE,
    KVM,
    POWER_PASS,
    READY_POWER,
    ApiEnv,
    openapi_doc,
    poll,
    run_matrix,
    state,
)

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not KVM, reason="needs /dev/kvm")]

# The device checks first (so that every device has done real work), then the power button.
CHECKS_THEN_BUTTON = "tests=blk,net-tx,rng,power host-timeout=600000"


def threads_alive(env: ApiEnv, index: int) -> bool:
    assert env.builder is not None
    vm = env.builder.vms[index]
    return any(v._thread is not None and v._thread.is_alive() for v in vm.vcpus)


def test_whole_lifecycle(api_env: ApiEnv) -> None:
    env, api = api_env, api_env.client
    assert env.builder is not None

    api.create(env.config_json(CHECKS_THEN_BUTTON))
    info = api.info()
    assert info["state"] == "Created" and "device_tree" not in info
    assert info["config"]["memory"]["size"] == 32 << 20
    assert info["memory_actual_size"] == 32 << 20
    assert env.builder.vms == []  # nothing is built before the boot

    api.boot()
    vm = env.vm
    assert vm.state is VmState.RUNNING
    info = api.info()
    assert info["state"] == "Running"
    tree = info["device_tree"]
    devices = {"__serial", "_disk0", "__rng", "__console"} | ({"_net0"} if env.tap else set())
    assert set(tree) == devices
    assert all(tree[d]["pci_bdf"].startswith("0000:00:") for d in devices - {"__serial"})
    env.wait_serial(READY_POWER)
    out = env.serial()
    for check in ("blk-rw", "rng") + (("net-tx",) if env.tap else ()):
        assert f"TEST {check} PASS" in out, out
    counters = api.counters()
    assert counters["_disk0"]["write_ops"] >= 1 and counters["_disk0"]["read_ops"] >= 1
    assert counters["__rng"]["read_bytes"] == 128  # two 64-byte reads
    if env.tap:
        assert counters["_net0"]["tx_frames"] == 8
    assert env.disk.read_bytes().strip(b"\0"), "the guest's writes are not in the disk file"

    # Pause: the real VM is paused, every vCPU parked, the device loop parked, the clock frozen.
    clock_at_pause = vm.machine.vm.get_clock().clock
    api.pause()
    assert api.info()["state"] == "Paused"
    assert vm.state is VmState.PAUSED
    assert vm.vcpus and all(v.paused for v in vm.vcpus)
    assert env.controller._park is not None and env.controller._park.wait_parked(0)
    paused_counters = api.counters()  # a paused VM still answers, and its guest did nothing
    assert {d: paused_counters[d] for d in ("_disk0", "__rng")} == {
        d: counters[d] for d in ("_disk0", "__rng")
    }
    time.sleep(0.3)  # the paused time must not show in the guest's clock

    api.resume()
    assert api.info()["state"] == "Running"
    assert vm.state is VmState.RUNNING
    assert poll(lambda: not any(v.paused for v in vm.vcpus))
    assert env.controller._park is None
    assert vm.machine.vm.get_clock().clock - clock_at_pause < 0.25e9

    # Reboot: a new VM from the same config; the old one is shut down, its threads gone; the
    # guest boots again (one serial file for every boot of a config).
    api.reboot()
    assert len(env.builder.vms) == 2 and env.vm is not vm
    assert vm.state is VmState.SHUTDOWN and not threads_alive(env, 0)
    assert api.info()["state"] == "Running" and env.vm.state is VmState.RUNNING
    env.wait_serial(BOOT_LINE, 2)
    env.wait_serial(READY_POWER, 2)

    # The power button, pressed while paused: the GED raises its event, the paused guest
    # cannot see it (nothing happens while paused); once resumed, the guest reads the event
    # and powers off through ACPI S5.
    vm = env.vm
    api.pause()
    api.power_button()
    assert vm.device_manager.ged is not None
    assert vm.device_manager.ged.pending & GED_POWER_BUTTON
    time.sleep(0.3)  # watch for a while: a paused guest must not act on it
    assert state(env) == "Paused" and vm.stop_result is None
    assert POWER_PASS not in env.serial()
    api.resume()
    assert poll(lambda: state(env) == "Shutdown"), env.serial()
    assert POWER_PASS in env.serial() and "events=0x08" in env.serial()
    assert env.controller.guest_stop is not None
    assert env.controller.guest_stop.reason is StopReason.POWEROFF
    assert vm.state is VmState.SHUTDOWN and not threads_alive(env, 1)
    with pytest.raises(ApiError, match="VM is not running") as e:
        api.counters()
    assert e.value.status == 500

    api.delete()
    assert state(env) is None

    expected = [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("vm", "pausing"),
        ("vm", "paused"),
        ("vm", "resuming"),
        ("vm", "resumed"),
        ("vm", "rebooting"),
        ("vm", "rebooted"),
        ("vm", "pausing"),
        ("vm", "paused"),
        ("vm", "resuming"),
        ("vm", "resumed"),
        ("vm", "shutdown"),
        ("vm", "deleted"),
    ]
    assert poll(lambda: env.events() == expected), env.events()
    raw = env.raw_events()
    assert raw[1]["properties"] is None
    assert raw[-2]["properties"] == {
        "reason": "poweroff",
        "message": "the guest powered off (ACPI S5)",
    }
    stamps = [(e["timestamp"]["secs"], e["timestamp"]["nanos"]) for e in raw]  # type: ignore[index]
    assert stamps == sorted(stamps)


def test_guest_reset_reboots_the_vm(api_env: ApiEnv) -> None:
    """The guest resets the machine itself: the VMM builds a new VM from the same config and
    the guest boots again, on the same disk. The built-in guest's `reboot` check writes a
    marker on its first boot, resets, finds the marker on its second boot and powers off."""
    env = api_env
    assert env.builder is not None
    env.client.create(env.config_json("tests=reboot"))
    env.client.boot()
    assert poll(lambda: state(env) == "Shutdown", timeout=60), env.serial()
    out = env.serial()
    assert out.count(BOOT_LINE) == 2, out
    assert "TEST reboot PASS" in out and " boot=1 " in out, out
    assert "boot=2 found=boot1" in out and "data=ok" in out, out
    first, second = env.builder.vms
    assert first.stop_result is not None and first.stop_result.reason is StopReason.RESET
    assert second.stop_result is not None and second.stop_result.reason is StopReason.POWEROFF
    assert first.state is VmState.SHUTDOWN and second.state is VmState.SHUTDOWN
    tail = [("vm", "booted"), ("vm", "rebooting"), ("vm", "rebooted"), ("vm", "shutdown")]
    assert poll(lambda: env.events()[-4:] == tail), env.events()


def test_guest_poweroff_ends_the_vmm_by_default(make_env: Callable[..., ApiEnv]) -> None:
    env = make_env(no_shutdown=False)
    env.client.create(env.config_json())
    env.client.boot()
    env.wait_serial(READY_POWER)
    env.client.power_button()
    assert env.controller.wait(30), "the VMM did not end after the guest powered off"
    assert POWER_PASS in env.serial()
    assert env.controller.exit_status == 0
    assert env.controller.exit_stop is not None
    assert env.controller.exit_stop.reason is StopReason.POWEROFF
    assert state(env) is None
    assert env.vm.state is VmState.SHUTDOWN
    assert poll(
        lambda: env.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]
    )


def test_shutdown_vmm(api_env: ApiEnv) -> None:
    env = api_env
    env.client.create(env.config_json())
    env.client.boot()
    env.client.shutdown_vmm()
    assert env.controller.wait(5)
    assert env.controller.exit_status == 0
    assert env.vm.state is VmState.SHUTDOWN and not threads_alive(env, 0)


def test_power_button_without_acpi_is_refused(api_env: ApiEnv) -> None:
    env = api_env
    assert env.builder is not None
    env.builder.acpi = False
    env.client.create(env.config_json("bench=idle,seconds=600"))
    env.client.boot()
    with pytest.raises(ApiError, match="no ACPI power button") as e:
        env.client.power_button()
    assert e.value.status == 500
    assert e.value.messages[1] == "Error triggering power button"
    assert env.client.info()["state"] == "Running" and env.vm.state is VmState.RUNNING


# -- every request in every state --------------------------------------------------------------


def test_every_request_in_every_state(api_env: ApiEnv) -> None:
    seen = run_matrix(api_env)
    assert len(seen) == 50
    doc = openapi_doc()
    if doc is None:
        return
    for method, endpoint, status, _ in seen:
        documented = doc["paths"][f"/{endpoint}"][method.lower()]["responses"]
        assert status in documented, f"{method} {endpoint} answered {status}, not documented"
