"""Helpers for the API tests: an API environment on a real unix socket whose VMs come from
strato's real builder and run the built-in guest, raw HTTP, and every request in every state."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from strato.api import ApiClient, ApiError, ApiServer, Limits, serve_api
from strato.devices.legacy.ged import GED_POWER_BUTTON
from strato.images.builtin import ensure_builtin_guest
from strato.images.errors import ImageError
from strato.vmm.builder import BootTimes, VmBuilder
from strato.vmm.config import ConfigError, VmConfig
from strato.vmm.controller import ManagedVm, VmmController
from strato.vmm.events import EventMonitor, parse_events
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import Vm, VmState

KVM = os.path.exists("/dev/kvm")
needs_kvm = pytest.mark.skipif(not KVM, reason="needs /dev/kvm")

# The built-in guest (guest/README.md) as the API tests run it: no checks but `power`, which
# routes the ACPI GED interrupt, prints READY power and waits (up to 10 minutes) for the host
# to press the power button; then it reads the GED event register and powers off through the
# FADT's sleep register (ACPI S5). A long-running guest that observes the power button itself.
WAITING_GUEST = "tests=power host-timeout=600000"
READY_POWER = "READY power"
POWER_PASS = "TEST power PASS"
BOOT_LINE = "BOOT strato-guest"
DISK_SIZE = 1 << 20


class RecordingBuilder(VmBuilder):
    """strato's real builder (VmBuilder), keeping every Vm it built so that tests can look at
    the real VM behind the API (its own state, vCPUs, GED). `fail` makes the next builds fail
    the ways a real build or start can: "config" (a ConfigError before anything is built),
    "crash" (an unexpected exception), "start" (a real VM whose start() raises). `acpi=False`
    builds VMs without ACPI (no power button)."""

    def __init__(self) -> None:
        super().__init__()
        self.vms: list[Vm] = []
        self.fail: str | None = None
        self.acpi = True
        self.release: threading.Event | None = None  # set: builds wait for it
        self._changed_from: tuple[VmConfig, VmConfig] | None = None

    def __call__(self, config: VmConfig, *, times: BootTimes | None = None) -> Vm:
        if self.release is not None:
            self.release.wait(10)
        if self.fail == "config":
            raise ConfigError("--serial pty: not supported yet")
        if self.fail == "crash":
            raise RuntimeError("out of memory slots")
        vm = super().__call__(self._changed(config), times=times)
        self.vms.append(vm)
        if self.fail == "start":

            def broken() -> None:
                raise OSError("KVM_RUN: no such device")

            vm.start = broken  # type: ignore[method-assign]
        return vm

    def _changed(self, config: VmConfig) -> VmConfig:
        """The config with this builder's changes: the same object for the same config (the
        builder keeps one serial output per config object, across reboots)."""
        if self._changed_from is None or self._changed_from[0] is not config:
            new = config if self.acpi else replace(config, acpi=False)
            self._changed_from = (config, new)
        return self._changed_from[1]

    @property
    def latest(self) -> Vm:
        return self.vms[-1]


class FakeVm:
    """For the HTTP layer alone (tests/fuzz): a VM that does nothing. It has no state machine
    on purpose: every lifecycle behaviour is tested against a real VM (RecordingBuilder)."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.state = VmState.CREATED
        self.on_stop: list[Callable[[Stop], None]] = []

    def start(self) -> None:
        pass

    def pause(self) -> None:
        pass

    def resume(self) -> None:
        pass

    def request_stop(self, stop: Stop) -> None:
        pass

    def shutdown(self) -> None:
        pass


class FakeFactory:
    def __call__(self, config: VmConfig) -> ManagedVm:
        return FakeVm(config)


@dataclass
class ApiEnv:
    dir: Path
    path: Path
    controller: VmmController
    server: ApiServer
    client: ApiClient
    events_path: Path
    kernel: Path
    builder: RecordingBuilder | None = None
    tap: str | None = None
    serial_files: list[Path] = field(default_factory=list)

    def events(self) -> list[tuple[str, str]]:
        return [(str(e["source"]), str(e["event"])) for e in self.raw_events()]

    def raw_events(self) -> list[dict[str, Any]]:
        return parse_events(self.events_path.read_text())

    @property
    def disk(self) -> Path:
        return self.dir / "disk.raw"

    def config_json(self, cmdline: str = WAITING_GUEST, **extra: Any) -> dict[str, Any]:
        """A VM of the built-in guest with real devices: a raw disk, a tap (when root), rng,
        a console; its serial port goes to a file of its own (`serial()` reads it)."""
        serial = self.dir / f"serial{len(self.serial_files)}.out"
        self.serial_files.append(serial)
        cfg: dict[str, Any] = {
            "payload": {"kernel": str(self.kernel), "cmdline": cmdline},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 32 << 20},
            "serial": {"mode": "File", "file": str(serial)},
            "console": {"mode": "File", "file": str(self.dir / "console.out")},
            "rng": {"src": "/dev/urandom"},
            "disks": [{"path": str(self.disk)}],
        }
        if self.tap is not None:
            cfg["net"] = [{"tap": self.tap}]
        cfg.update(extra)
        return cfg

    def serial(self) -> str:
        """What the guest of the latest config wrote on its serial port (every boot of it)."""
        if not self.serial_files or not self.serial_files[-1].exists():
            return ""
        return self.serial_files[-1].read_text(errors="replace")

    def wait_serial(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        assert poll(lambda: self.serial().count(text) >= count, timeout), (
            f"{text!r} x{count} not on the serial port:\n{self.serial()}"
        )

    @property
    def vm(self) -> Vm:
        """The real VM the builder built last."""
        assert self.builder is not None and self.builder.vms, "no VM was built"
        return self.builder.latest


def short_dir() -> Path:
    """A short directory for sockets (sun_path is 108 bytes; pytest's tmp_path can be long)."""
    return Path(tempfile.mkdtemp(prefix="strato-api-", dir="/tmp"))


_guest: list[Path] = []


def builtin_guest() -> Path:
    """The built-in guest's ELF (built once per session by `make -C guest`)."""
    if not _guest:
        try:
            _guest.append(ensure_builtin_guest())
        except ImageError as e:
            pytest.fail(str(e))
    return _guest[0]


def make_api_env(
    factory: Callable[[VmConfig], ManagedVm] | None = None,
    *,
    limits: Limits | None = None,
    no_shutdown: bool = True,
    tap: str | None = None,
    default_factory: bool = False,
) -> ApiEnv:
    """A started controller (events to a file) and server on a fresh socket. Without a
    factory the VMs come from strato's real builder (a RecordingBuilder, `env.builder`);
    `default_factory` leaves the choice to the controller (its own VmBuilder)."""
    d = short_dir()
    with open(d / "disk.raw", "wb") as f:
        f.truncate(DISK_SIZE)
    builder = None
    if factory is None and not default_factory:
        builder = RecordingBuilder()
        factory = builder
    events_path = d / "events.json"
    controller = VmmController(
        factory, events=EventMonitor.open(events_path), no_shutdown=no_shutdown
    )
    controller.start()
    path = d / "api.sock"
    server = serve_api(controller, path, limits=limits)
    client = ApiClient(path, timeout=30)
    return ApiEnv(d, path, controller, server, client, events_path, builtin_guest(), builder, tap)


def close_api_env(env: ApiEnv) -> None:
    env.client.close()
    env.server.close()
    env.controller.close()
    shutil.rmtree(env.dir, ignore_errors=True)


# -- raw HTTP -------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        import json

        return json.loads(self.body)


def connect(path: Path, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(path))
    return s


def read_response(s: socket.socket) -> RawResponse:
    """Read exactly one response (pipelined ones after it stay in the socket).
    Raises EOFError on a closed socket."""
    while True:
        peek = s.recv(65536, socket.MSG_PEEK)
        if not peek:
            raise EOFError("connection closed")
        end = peek.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(peek) > 60000:
            raise AssertionError("response head too large")
        time.sleep(0.001)
    head = s.recv(end + 4)
    lines = head[:end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        if not chunk:
            raise EOFError("connection closed in the body")
        body += chunk
    return RawResponse(status, headers, body)


def exchange(path: Path, data: bytes, timeout: float = 10.0) -> RawResponse:
    with connect(path, timeout) as s:
        s.sendall(data)
        return read_response(s)


def closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    """Whether the server closes the connection within `timeout` (reads what is left)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if s.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def poll(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def state(env: ApiEnv) -> str | None:
    try:
        return str(env.client.info()["state"])
    except ApiError as e:
        assert e.status == 404
        return None


# -- every request in every state: the VM state machine through the API -----------------------

# What each request answers in each state, and the state after it. "-": no VM created.
# C Created, R Running, P Paused, S Shutdown. (power-button in R: the guest powers itself off.)
_MATRIX_TABLE = """
                  -        Created  Running  Paused   Shutdown
vm.create         204 C    500 C    500 R    500 P    500 S
vm.boot           404 -    204 R    500 R    500 P    204 R
vm.pause          500 -    500 C    204 P    500 P    500 S
vm.resume         500 -    500 C    500 R    204 R    500 S
vm.shutdown       500 -    500 C    204 S    204 S    500 S
vm.reboot         404 -    404 C    204 R    204 R    404 S
vm.power-button   500 -    500 C    204 S    204 P    500 S
vm.delete         204 -    204 -    204 -    204 -    204 -
vm.info           404 -    200 C    200 R    200 P    200 S
vm.counters       500 -    500 C    200 R    200 P    500 S
"""
_NAMES = {"-": None, "C": "Created", "R": "Running", "P": "Paused", "S": "Shutdown"}
STATES: tuple[str | None, ...] = (None, "Created", "Running", "Paused", "Shutdown")


def _parse_matrix() -> dict[str, list[tuple[int, str | None]]]:
    out: dict[str, list[tuple[int, str | None]]] = {}
    for line in _MATRIX_TABLE.strip().splitlines()[1:]:
        endpoint, *cells = line.split()
        pairs = list(zip(cells[::2], cells[1::2], strict=True))
        out[endpoint] = [(int(status), _NAMES[after]) for status, after in pairs]
    return out


MATRIX = _parse_matrix()
METHOD = {"vm.info": "GET", "vm.counters": "GET"}


_VM_STATE = {"Running": VmState.RUNNING, "Paused": VmState.PAUSED, "Shutdown": VmState.SHUTDOWN}


def go_to(env: ApiEnv, target: str | None, *, ready: bool = False) -> None:
    """Bring a fresh VM to `target` through the API; `ready`: wait until the guest waits for
    the power button (it routed the GED interrupt) before pausing or shutting down."""
    if target is None:
        return
    env.client.create(env.config_json())
    if target == "Created":
        return
    env.client.boot()
    if ready:
        env.wait_serial(READY_POWER)
    if target == "Paused":
        env.client.pause()
    elif target == "Shutdown":
        env.client.shutdown()
    assert state(env) == target


def check_real_vm(env: ApiEnv, after: str | None, where: str) -> None:
    """The real VMs behind the API are in the state the API reports: the latest one's own
    state machine and vCPUs when it runs or is paused; every other one shut down, its vCPU
    threads gone."""
    assert env.builder is not None
    vms = list(env.builder.vms)
    if after in ("Running", "Paused"):
        vm = vms.pop()
        assert vm.state is _VM_STATE[after], f"{where}: the Vm is {vm.state}"
        assert vm.stop_result is None, f"{where}: {vm.stop_result}"
        paused = after == "Paused"  # (a resumed vCPU clears its flag on its own thread)
        assert poll(lambda: all(v.paused == paused for v in vm.vcpus)), where
    for old in vms:
        assert old.state is VmState.SHUTDOWN, f"{where}: an old Vm is {old.state}"
        assert not any(v._thread is not None and v._thread.is_alive() for v in old.vcpus), where


def run_matrix(env: ApiEnv) -> list[tuple[str, str, int, Any]]:
    """Every endpoint in every state, against real VMs of the built-in guest; returns
    (method, endpoint, status, body) seen."""
    assert env.builder is not None
    seen: list[tuple[str, str, int, Any]] = []
    for endpoint, outcomes in MATRIX.items():
        for start, (status, after) in zip(STATES, outcomes, strict=True):
            pressing = endpoint == "vm.power-button"
            go_to(env, start, ready=pressing)
            built = len(env.builder.vms)
            boots = env.serial().count(BOOT_LINE)
            method = METHOD.get(endpoint, "PUT")
            data = json.dumps(env.config_json()).encode() if endpoint == "vm.create" else None
            got, _reason, raw = env.client.request(method, endpoint, data)
            where = f"{endpoint} in state {start}"
            assert got == status, f"{where}: {got} {raw!r}"
            parsed = json.loads(raw) if raw else None
            if status >= 400:
                names = " ".join(parsed)
                assert (start or "not created") in names, f"{where}: {parsed}"
                assert len(env.builder.vms) == built, f"{where}: a refused request built a VM"
            if pressing and start == "Running":  # the guest saw the button and powered off
                assert poll(lambda: state(env) == "Shutdown"), f"{where}: {env.serial()}"
                assert POWER_PASS in env.serial(), env.serial()
                stop = env.controller.guest_stop
                assert stop is not None and stop.reason is StopReason.POWEROFF, where
            if pressing and start == "Paused":  # raised, not seen: the guest is paused
                ged = env.vm.device_manager.ged
                assert ged.pending & GED_POWER_BUTTON, f"{where}: no GED event pending"
                assert POWER_PASS not in env.serial(), where
            if endpoint == "vm.reboot" and status == 204:  # a new VM, and the guest booted
                assert len(env.builder.vms) == built + 1, where
                env.wait_serial(BOOT_LINE, boots + 1)
            if endpoint == "vm.boot" and status == 204:
                assert len(env.builder.vms) == built + 1, where
                env.wait_serial(BOOT_LINE, boots + 1)
            if endpoint == "vm.counters" and status == 200:
                assert set(parsed) >= {"_disk0", "__rng", "__console"}, parsed
            assert state(env) == after, where
            check_real_vm(env, after, where)
            seen.append((method, endpoint, got, parsed))
            env.client.delete()
            check_real_vm(env, None, f"{where}, then vm.delete")
    return seen


def openapi_doc() -> dict[str, Any] | None:
    """strato's openapi.yaml as data (None without PyYAML)."""
    try:
        import yaml
    except ImportError:
        return None
    from importlib.resources import files

    doc: dict[str, Any] = yaml.safe_load(files("strato.api").joinpath("openapi.yaml").read_text())
    return doc
