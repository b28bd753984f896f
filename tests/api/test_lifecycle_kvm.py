"""The VM lifecycle through the REST API with a real KVM guest (tests/api/ticker.S).

create -> boot -> pause -> resume -> counters -> reboot -> power-button -> delete, the event
stream it writes, the guest rebooting and powering off by itself, and every request in every
state (allowed or not) with Cloud Hypervisor's status codes.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from strato.api import ApiError
from strato.vmm.stop import StopReason
from tests.api.guest import TickerFactory, build_ticker
from tests.api.helpers import KVM, ApiEnv, openapi_doc, poll, run_matrix, short_dir, state

pytestmark = [pytest.mark.kvm, pytest.mark.skipif(not KVM, reason="needs /dev/kvm")]


@pytest.fixture(scope="module")
def ticker_kernel() -> Iterator[Path]:
    d = short_dir()
    yield build_ticker(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ticker_env(
    make_env: Callable[..., ApiEnv], ticker_kernel: Path
) -> tuple[ApiEnv, TickerFactory]:
    factory = TickerFactory()
    return make_env(factory, kernel=ticker_kernel), factory


def ticks(env: ApiEnv) -> int:
    return int(env.client.counters()["ticker"]["ticks"])


def test_whole_lifecycle(ticker_env: tuple[ApiEnv, TickerFactory]) -> None:
    env, factory = ticker_env
    api = env.client

    api.create(env.config_json())
    info = api.info()
    assert info["state"] == "Created" and "device_tree" not in info
    assert info["config"]["memory"]["size"] == 16 << 20
    assert info["memory_actual_size"] == 16 << 20

    api.boot()
    info = api.info()
    assert info["state"] == "Running"
    assert set(info["device_tree"]) == {"__serial", "__rng"}
    assert poll(lambda: ticks(env) >= 10), "the guest does not run"

    # Pause: every vCPU parked, the device loop parked, the guest's clock frozen.
    vm = factory.latest
    clock_at_pause = vm.machine.vm.get_clock().clock
    api.pause()
    assert api.info()["state"] == "Paused"
    assert all(v.paused for v in vm.vcpus)
    assert env.controller._park is not None and env.controller._park.wait_parked(0)
    frozen = ticks(env)
    time.sleep(0.3)  # nothing may happen while paused: watch for a while
    assert ticks(env) == frozen

    api.resume()
    assert api.info()["state"] == "Running"
    assert env.controller._park is None
    # Guest time went on from where it stopped: the paused 0.3 s are not in the KVM clock.
    assert vm.machine.vm.get_clock().clock - clock_at_pause < 0.25e9
    assert poll(lambda: ticks(env) >= frozen + 10), "the guest did not continue"

    counters = api.counters()
    assert counters["ticker"]["ticks"] >= frozen and counters["ticker"]["button_reads"] > 0

    # Reboot: a new VM from the same config; the old one's vCPU threads are gone.
    old = factory.latest
    api.reboot()
    assert factory.latest is not old and len(factory.vms) == 2
    assert all(not v._thread.is_alive() for v in old.vcpus if v._thread is not None)
    assert api.info()["state"] == "Running"
    assert poll(lambda: 5 <= ticks(env) < frozen), "the rebooted guest does not run from 0"

    # The power button: the guest notices and powers itself off.
    api.power_button()
    assert poll(lambda: state(env) == "Shutdown"), "the guest did not power off"
    assert env.controller.guest_stop is not None
    assert env.controller.guest_stop.reason is StopReason.POWEROFF
    with pytest.raises(ApiError) as e:
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
        ("vm", "shutdown"),
        ("vm", "deleted"),
    ]
    assert poll(lambda: env.events() == expected), env.events()
    raw = env.raw_events()
    assert raw[1]["properties"] is None
    assert raw[-2]["properties"] == {
        "reason": "poweroff",
        "message": "the ticker guest powered off",
    }
    stamps = [(e["timestamp"]["secs"], e["timestamp"]["nanos"]) for e in raw]  # type: ignore[index]
    assert stamps == sorted(stamps)


def test_guest_reset_reboots_the_vm(ticker_env: tuple[ApiEnv, TickerFactory]) -> None:
    env, factory = ticker_env
    env.client.create(env.config_json())
    env.client.boot()
    assert poll(lambda: ticks(env) > 0)
    factory.latest.guest_reset()
    assert poll(lambda: len(factory.vms) == 2 and state(env) == "Running")
    assert poll(lambda: ticks(env) > 0)
    assert poll(lambda: ("vm", "rebooted") in env.events())


def test_guest_poweroff_ends_the_vmm_by_default(
    make_env: Callable[..., ApiEnv], ticker_kernel: Path
) -> None:
    factory = TickerFactory()
    env = make_env(factory, kernel=ticker_kernel, no_shutdown=False)
    env.client.create(env.config_json())
    env.client.boot()
    env.client.power_button()
    assert env.controller.wait(10), "the VMM did not end after the guest powered off"
    assert env.controller.exit_status == 0
    assert env.controller.exit_stop is not None
    assert env.controller.exit_stop.reason is StopReason.POWEROFF
    assert state(env) is None
    assert poll(
        lambda: env.events()[-3:] == [("vm", "shutdown"), ("vm", "deleted"), ("vmm", "shutdown")]
    )


def test_shutdown_vmm(ticker_env: tuple[ApiEnv, TickerFactory]) -> None:
    env, factory = ticker_env
    env.client.create(env.config_json())
    env.client.boot()
    env.client.shutdown_vmm()
    assert env.controller.wait(5)
    assert env.controller.exit_status == 0
    assert factory.latest.state.value == "Shutdown"


# -- every request in every state --------------------------------------------------------------


def test_every_request_in_every_state(ticker_env: tuple[ApiEnv, TickerFactory]) -> None:
    env, _ = ticker_env
    seen = run_matrix(env)
    assert len(seen) == 50
    doc = openapi_doc()
    if doc is None:
        return
    for method, endpoint, status, _ in seen:
        documented = doc["paths"][f"/{endpoint}"][method.lower()]["responses"]
        assert status in documented, f"{method} {endpoint} answered {status}, not documented"
