"""`strato --api-socket ... --landlock`: the VM that `vm.create` brings later is confined to
the paths strato was started with. Its kernel, outside them, cannot be opened; the same
configuration boots once `--landlock-rules` grants its directory. Real processes, real socket,
real KVM (a landlocked process stays landlocked, so strato runs as a child)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.api.client import ApiClient, ApiError
from strato.images.builtin import ensure_builtin_guest
from strato.vmm import landlock
from strato.vmm.config import ConfigError

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


def _has_landlock() -> bool:
    try:
        return landlock.abi_version() >= 1
    except ConfigError:
        return False


needs_landlock = pytest.mark.skipif(not _has_landlock(), reason="the kernel has no Landlock")


RNG_RULE = "path=/dev/urandom,access=r"  # Cloud Hypervisor's default rng source


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in guest, copied into a directory of its own (only a rule may open it)."""
    elf = tmp_path_factory.mktemp("guest") / "guest.elf"
    elf.write_bytes(ensure_builtin_guest().read_bytes())
    return elf


@pytest.fixture
def api_strato(tmp_path: Path) -> Iterator[tuple[list[str], Path]]:
    """Starts `strato --api-socket` with extra flags (call it); yields the socket path."""
    procs: list[subprocess.Popen[bytes]] = []
    sock = tmp_path / "api.sock"

    def start(*flags: str) -> ApiClient:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strato.cli.main", "--api-socket", f"path={sock}", *flags],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        procs.append(proc)
        wait_for(sock, proc)
        return ApiClient(sock)

    yield start, sock  # type: ignore[misc]
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)
        if p.stderr:
            p.stderr.close()


def vm_config(guest: Path, serial: Path) -> dict[str, object]:
    return {
        "payload": {"kernel": str(guest), "cmdline": "tests=serial"},
        "memory": {"size": 64 << 20},
        "serial": {"mode": "File", "file": str(serial)},
        "console": {"mode": "Off"},
    }


def boot_and_wait(api: ApiClient, guest: Path, serial: Path) -> None:
    api.create(vm_config(guest, serial))
    api.boot()
    deadline = time.monotonic() + 30
    while b"DONE pass=1 fail=0" not in (serial.read_bytes() if serial.exists() else b""):
        assert time.monotonic() < deadline, serial.read_bytes() if serial.exists() else ""
        time.sleep(0.05)
    assert api.info()["state"] == "Running"


def second_vm(api: ApiClient, guest: Path, tmp_path: Path) -> None:
    """Delete the VM, create one whose kernel lies outside every rule, boot it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "guest.elf").write_bytes(guest.read_bytes())
    api.delete()
    api.create(vm_config(elsewhere / "guest.elf", tmp_path / "out" / "serial2.log"))
    api.boot()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return tmp_path / "out"


@needs_landlock
def test_a_vm_created_over_the_api_of_a_landlocked_strato_is_confined(
    api_strato: tuple, guest: Path, tmp_path: Path, out: Path
) -> None:
    start, _ = api_strato
    rules = [f"path={guest.parent},access=r", f"path={out},access=rw", RNG_RULE]
    with start("--landlock", "--landlock-rules", *rules) as api:
        boot_and_wait(api, guest, out / "serial.log")  # its paths are granted: it runs
        with pytest.raises(ApiError) as e:
            second_vm(api, guest, tmp_path)
        assert e.value.status in (400, 500)
        assert "Permission denied" in str(e.value), str(e.value)
        assert str(tmp_path / "elsewhere" / "guest.elf") in str(e.value)
        assert api.info()["state"] == "Created"  # that VM did not start
        api.shutdown_vmm()


def test_without_landlock_the_same_second_vm_boots(
    api_strato: tuple, guest: Path, tmp_path: Path, out: Path
) -> None:
    start, _ = api_strato
    rules = [f"path={guest.parent},access=r", f"path={out},access=rw"]
    with start("--landlock-rules", *rules) as api:  # rules alone restrict nothing
        boot_and_wait(api, guest, out / "serial.log")
        second_vm(api, guest, tmp_path)
        assert api.info()["state"] == "Running"
        api.shutdown_vmm()
