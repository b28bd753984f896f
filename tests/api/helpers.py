"""Helpers for the API tests: a fake VM, an API environment on a real unix socket, raw HTTP."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from strato.api import ApiClient, ApiError, ApiServer, Limits, serve_api
from strato.vmm.config import VmConfig
from strato.vmm.controller import ManagedVm, VmmController
from strato.vmm.events import EventMonitor, parse_events
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import InvalidStateTransition, VmState

KVM = os.path.exists("/dev/kvm")
needs_kvm = pytest.mark.skipif(not KVM, reason="needs /dev/kvm")

_ALLOWED = {
    VmState.CREATED: {VmState.RUNNING, VmState.SHUTDOWN},
    VmState.RUNNING: {VmState.PAUSED, VmState.SHUTDOWN},
    VmState.PAUSED: {VmState.RUNNING, VmState.SHUTDOWN},
    VmState.SHUTDOWN: {VmState.RUNNING},
}


class FakeVm:
    """A VM without KVM, with the real Vm's state machine: for tests of the API plumbing."""

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.state = VmState.CREATED
        self.on_stop: list[Callable[[Stop], None]] = []
        self.stop_result: Stop | None = None
        self.pressed = 0
        self.calls: list[str] = []

    def _go(self, target: VmState) -> None:
        if target not in _ALLOWED[self.state]:
            raise InvalidStateTransition(self.state, target)
        self.state = target

    def start(self) -> None:
        self.calls.append("start")
        self._go(VmState.RUNNING)

    def pause(self) -> None:
        self.calls.append("pause")
        self._go(VmState.PAUSED)

    def resume(self) -> None:
        self.calls.append("resume")
        self._go(VmState.RUNNING)
        if self.pressed:
            self.request_stop(Stop(StopReason.POWEROFF, "the guest powered off"))

    def request_stop(self, stop: Stop) -> None:
        if self.stop_result is not None:
            return
        self.stop_result = stop
        for cb in self.on_stop:
            cb(stop)

    def shutdown(self) -> None:
        self.calls.append("shutdown")
        self.request_stop(Stop(StopReason.REQUESTED, "shutdown requested"))
        self.state = VmState.SHUTDOWN

    def counters(self) -> dict[str, dict[str, int]]:
        return {"_disk0": {"read_bytes": 512, "read_ops": 1, "write_bytes": 0, "write_ops": 0}}

    def power_button(self) -> None:
        """A guest that honours the button: it powers off, once it runs."""
        self.pressed += 1
        if self.state is VmState.RUNNING:
            self.request_stop(Stop(StopReason.POWEROFF, "the guest powered off"))


class FakeFactory:
    def __init__(self) -> None:
        self.vms: list[FakeVm] = []

    def __call__(self, config: VmConfig) -> ManagedVm:
        vm = FakeVm(config)
        self.vms.append(vm)
        return vm

    @property
    def latest(self) -> FakeVm:
        return self.vms[-1]


@dataclass
class ApiEnv:
    dir: Path
    path: Path
    controller: VmmController
    server: ApiServer
    client: ApiClient
    events_path: Path
    kernel: Path

    def events(self) -> list[tuple[str, str]]:
        return [(str(e["source"]), str(e["event"])) for e in self.raw_events()]

    def raw_events(self) -> list[dict[str, Any]]:
        return parse_events(self.events_path.read_text())

    def config_json(self, **extra: Any) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "payload": {"kernel": str(self.kernel)},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 16 << 20},
            "serial": {"mode": "Null"},
            "console": {"mode": "Off"},
        }
        cfg.update(extra)
        return cfg


def short_dir() -> Path:
    """A short directory for sockets (sun_path is 108 bytes; pytest's tmp_path can be long)."""
    return Path(tempfile.mkdtemp(prefix="strato-api-", dir="/tmp"))


def make_api_env(
    factory: Callable[[VmConfig], ManagedVm] | None,
    *,
    limits: Limits | None = None,
    no_shutdown: bool = True,
    kernel: Path | None = None,
) -> ApiEnv:
    """A started controller (events to a file) and server on a fresh socket. A None factory
    is the controller's default: strato's real builder."""
    d = short_dir()
    events_path = d / "events.json"
    controller = VmmController(
        factory, events=EventMonitor.open(events_path), no_shutdown=no_shutdown
    )
    controller.start()
    path = d / "api.sock"
    server = serve_api(controller, path, limits=limits)
    if kernel is None:
        kernel = d / "kernel.bin"
        kernel.write_bytes(b"\xf4")  # hlt; FakeVm never runs it
    return ApiEnv(d, path, controller, server, ApiClient(path, timeout=30), events_path, kernel)


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


def go_to(env: ApiEnv, target: str | None) -> None:
    if target is None:
        return
    env.client.create(env.config_json())
    if target == "Created":
        return
    env.client.boot()
    if target == "Paused":
        env.client.pause()
    elif target == "Shutdown":
        env.client.shutdown()
    assert state(env) == target


def run_matrix(env: ApiEnv) -> list[tuple[str, str, int, Any]]:
    """Every endpoint in every state; returns (method, endpoint, status, body) seen."""
    seen: list[tuple[str, str, int, Any]] = []
    body = env.config_json()
    for endpoint, outcomes in MATRIX.items():
        for start, (status, after) in zip(STATES, outcomes, strict=True):
            go_to(env, start)
            method = METHOD.get(endpoint, "PUT")
            data = json.dumps(body).encode() if endpoint == "vm.create" else None
            got, _reason, raw = env.client.request(method, endpoint, data)
            where = f"{endpoint} in state {start}"
            assert got == status, f"{where}: {got} {raw!r}"
            parsed = json.loads(raw) if raw else None
            if status >= 400:
                names = " ".join(parsed)
                assert (start or "not created") in names, f"{where}: {parsed}"
            if endpoint == "vm.power-button" and start == "Running":
                assert poll(lambda: state(env) == "Shutdown"), where
            assert state(env) == after, where
            seen.append((method, endpoint, got, parsed))
            env.client.delete()
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
