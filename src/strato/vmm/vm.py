"""A running VM: vCPU threads, the device event loop, the state machine and the stop path."""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from strato.vmm.machine import Machine
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vcpu import Vcpu, install_kick_handler

log = logging.getLogger(__name__)


class VmState(enum.Enum):
    """Cloud Hypervisor's VM states."""

    CREATED = "Created"
    RUNNING = "Running"
    PAUSED = "Paused"
    SHUTDOWN = "Shutdown"


class InvalidStateTransition(RuntimeError):
    def __init__(self, current: VmState, target: VmState) -> None:
        super().__init__(f"the VM is {current.value}: it cannot go to {target.value}")
        self.current = current
        self.target = target


_ALLOWED = {
    VmState.CREATED: {VmState.RUNNING, VmState.SHUTDOWN},
    VmState.RUNNING: {VmState.PAUSED, VmState.SHUTDOWN},
    VmState.PAUSED: {VmState.RUNNING, VmState.SHUTDOWN},
    VmState.SHUTDOWN: {VmState.RUNNING},
}


@dataclass(eq=False)
class Vm:
    machine: Machine
    # Called on stop, after the vCPUs are asked to stop (devices flush, event monitor, ...).
    on_stop: list[Callable[[Stop], None]] = field(default_factory=list)
    thread_hooks: dict[str, Callable[[], None]] = field(default_factory=dict)
    state: VmState = VmState.CREATED
    stop_result: Stop | None = None
    vcpus: list[Vcpu] = field(default_factory=list)
    devices: dict[str, Any] = field(default_factory=dict)
    device_manager: Any = None  # strato.vmm.device_manager.DeviceManager (set by the builder)
    on_close: list[Callable[[], None]] = field(default_factory=list)
    boot_times: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _transition(self, target: VmState) -> None:
        if target not in _ALLOWED[self.state]:
            raise InvalidStateTransition(self.state, target)
        self.state = target

    def start(self) -> None:
        with self._lock:
            self._transition(VmState.RUNNING)
        install_kick_handler()
        m = self.machine
        m.loop.on_thread_start = self.thread_hooks.get("events")
        m.loop.start()
        self.vcpus = [
            Vcpu(fd, m.pio, m.mmio, self.request_stop, self.thread_hooks.get("vcpu"))
            for fd in m.vcpus
        ]
        for v in self.vcpus:
            v.start()

    def request_stop(self, stop: Stop) -> None:
        """Stop the VM (from any thread, vCPU threads included). The first reason wins."""
        with self._lock:
            if self.stop_result is not None:
                return
            self.stop_result = stop
        level = logging.ERROR if stop.is_crash else logging.INFO
        where = f" (vCPU {stop.vcpu})" if stop.vcpu is not None else ""
        log.log(level, "VM stopped: %s%s", stop.message, where)
        for v in self.vcpus:
            v.request_stop()
        for cb in self.on_stop:
            try:
                cb(stop)
            except Exception:
                log.exception("stop callback failed")
        self._stopped.set()

    def pause(self) -> None:
        with self._lock:
            self._transition(VmState.PAUSED)
        for v in self.vcpus:
            if not v.pause():
                log.warning("vCPU %d did not pause in time", v.id)

    def resume(self) -> None:
        with self._lock:
            self._transition(VmState.RUNNING)
        for v in self.vcpus:
            v.resume()

    def wait(self, timeout: float | None = None) -> Stop | None:
        """Wait until the VM stops; returns why (None on timeout)."""
        if not self._stopped.wait(timeout):
            return None
        for v in self.vcpus:
            v.join(timeout=5)
        return self.stop_result

    def shutdown(self) -> None:
        """Stop everything and release the machine."""
        if self.stop_result is None:
            self.request_stop(Stop(StopReason.REQUESTED, "shutdown requested"))
        for v in self.vcpus:
            v.join(timeout=5)
        with self._lock:
            self.state = VmState.SHUTDOWN
        self.machine.loop.stop()
        for close in self.on_close:
            try:
                close()
            except Exception:
                log.exception("closing a device failed")
        self.machine.close()

    def power_button(self) -> None:
        """Press the ACPI power button (the guest decides to shut down)."""
        dm = self.device_manager
        if dm is None or dm.ged is None:
            raise RuntimeError("the guest has no ACPI power button (ACPI is off)")
        dm.ged.power_button()

    def counters(self) -> dict[str, dict[str, int]]:
        dm = self.device_manager
        return dm.counters() if dm is not None else {}
