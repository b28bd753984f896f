"""strato-remote: ch-remote's verbs, driving real VMs (strato's builder, the built-in guest)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from strato.cli import remote
from strato.vmm.stop import StopReason
from strato.vmm.vm import VmState
from tests.api.helpers import BOOT_LINE, KVM, POWER_PASS, READY_POWER, ApiEnv, poll, state

needs_kvm = pytest.mark.skipif(not KVM, reason="needs /dev/kvm")


def run(env: ApiEnv, *argv: str) -> int:
    return remote.main(["--api-socket", str(env.path), *argv])


@pytest.mark.kvm
@needs_kvm
def test_every_verb(api_env: ApiEnv, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    env = api_env
    assert env.builder is not None
    assert run(env, "ping") == 0
    assert json.loads(capsys.readouterr().out)["features"] == ["kvm"]
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps(env.config_json()))
    assert run(env, "create", str(cfg)) == 0
    assert capsys.readouterr().out == ""  # 204: nothing printed
    assert state(env) == "Created"
    assert run(env, "boot") == 0
    assert env.vm.state is VmState.RUNNING
    assert run(env, "pause") == 0
    assert env.vm.state is VmState.PAUSED and all(v.paused for v in env.vm.vcpus)
    assert run(env, "resume") == 0
    assert env.vm.state is VmState.RUNNING
    assert run(env, "info") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "Running"
    assert run(env, "counters") == 0
    assert {"_disk0", "__rng"} <= set(json.loads(capsys.readouterr().out))
    first = env.vm
    env.wait_serial(BOOT_LINE)  # the first boot's line whole: a reboot cuts the guest short
    assert run(env, "reboot") == 0
    assert env.vm is not first and first.state is VmState.SHUTDOWN
    env.wait_serial(BOOT_LINE, 2)
    assert run(env, "shutdown") == 0
    assert state(env) == "Shutdown" and env.vm.state is VmState.SHUTDOWN
    ready = env.serial().count(READY_POWER)
    assert run(env, "boot") == 0
    assert len(env.builder.vms) == 3 and env.vm.state is VmState.RUNNING
    env.wait_serial(READY_POWER, ready + 1)
    assert run(env, "power-button") == 0  # the guest sees it and powers off
    assert poll(lambda: state(env) == "Shutdown"), env.serial()
    assert POWER_PASS in env.serial()
    assert env.controller.guest_stop is not None
    assert env.controller.guest_stop.reason is StopReason.POWEROFF
    assert run(env, "delete") == 0
    assert state(env) is None
    assert run(env, "shutdown-vmm") == 0
    assert env.controller.wait(5)


def test_create_from_stdin(api_env: ApiEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    env = api_env
    stdin = io.TextIOWrapper(io.BytesIO(json.dumps(env.config_json()).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert run(env, "create") == 0
    assert env.client.info()["state"] == "Created"


def test_errors(api_env: ApiEnv, capsys: pytest.CaptureFixture[str]) -> None:
    env = api_env
    assert run(env, "pause") == 1
    err = capsys.readouterr().err
    assert "PUT /api/v1/vm.pause: the server answered 500 Internal Server Error" in err
    assert "  1: The VM could not be paused" in err
    assert "VM is not running (the VM is not created)" in err
    assert remote.main(["--api-socket", str(env.dir / "nothing.sock"), "ping"]) == 1
    assert "cannot talk to" in capsys.readouterr().err
    assert run(env, "create", str(env.dir / "missing.json")) == 1
    assert "cannot read" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        run(env, "add-disk")
    assert e.value.code == 2
    assert "add-disk" in capsys.readouterr().err


def test_module_entry_point(api_env: ApiEnv) -> None:
    env = api_env
    out = subprocess.run(
        [sys.executable, "-m", "strato.cli.remote", "--api-socket", str(env.path), "ping"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(out.stdout)["version"]
