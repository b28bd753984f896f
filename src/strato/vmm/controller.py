"""The VMM side of the REST API: one VMM thread that owns the VM and runs API actions in order.

As in Cloud Hypervisor's vmm/src/api/mod.rs, callers (the HTTP server, the CLI, Python users)
never touch the VM: they queue an action and get its result back. The VMM thread also handles
the VM stopping by itself (power off, reset, crash), so every change of state happens on one
thread, in one order.

States, as `vm.info` reports them (None: no VM created):

    None --create--> Created --boot--> Running <--pause/resume--> Paused
    Running|Paused --shutdown--> Shutdown --boot--> Running
    Running|Paused --reboot--> Running          any --delete--> None

Any other request is refused with Cloud Hypervisor's status code (see `VmmError`): 404 where
Cloud Hypervisor says "not created" or "config is missing", 500 for everything else, each
message naming the state the VM is in.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any, Protocol

from strato import __version__
from strato._sys.eventfd import EventFd
from strato.vmm.config import ConfigError, ConsoleMode, VmConfig
from strato.vmm.config_json import vm_config_to_json
from strato.vmm.events import EventSink, NullEventMonitor
from strato.vmm.stop import EXIT_OK, Reboots, Stop, StopReason
from strato.vmm.vcpu import install_kick_handler
from strato.vmm.vm import InvalidStateTransition, VmState

log = logging.getLogger(__name__)

FEATURES = ("kvm",)


class Action(enum.Enum):
    """The VMM's API actions, named by their REST endpoint."""

    PING = "vmm.ping"
    SHUTDOWN_VMM = "vmm.shutdown"
    CREATE = "vm.create"
    BOOT = "vm.boot"
    INFO = "vm.info"
    COUNTERS = "vm.counters"
    PAUSE = "vm.pause"
    RESUME = "vm.resume"
    SHUTDOWN = "vm.shutdown"
    REBOOT = "vm.reboot"
    POWER_BUTTON = "vm.power-button"
    DELETE = "vm.delete"


class VmmError(Exception):
    """An action failed. `status` is the HTTP status Cloud Hypervisor answers with; `messages`
    the error chain, outermost first (Cloud Hypervisor's error body)."""

    def __init__(self, status: int, *messages: str) -> None:
        super().__init__(": ".join(messages))
        self.status = status
        self.messages = list(messages)


BAD_REQUEST = 400
NOT_FOUND = 404
INTERNAL_ERROR = 500


class ManagedVm(Protocol):
    """What the controller needs from a VM (strato.vmm.vm.Vm has it). Optional extras, used
    when present: `counters() -> dict[str, dict[str, int]]`, `power_button()`,
    `device_tree() -> dict`, `devices: dict[str, object]` (a device with `power_button()` or
    `counters()`), `machine` (a Machine: its event loop is parked and its KVM clock kept
    across a pause)."""

    state: VmState
    on_stop: list[Callable[[Stop], None]]

    def start(self) -> None: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def request_stop(self, stop: Stop) -> None: ...

    def shutdown(self) -> None: ...


VmFactory = Callable[[VmConfig], ManagedVm]
Done = Callable[[object, "VmmError | None"], None]


def _default_factory() -> VmFactory:
    # Imported here: the API can serve `vmm.ping` before anything needs the builder.
    from strato.vmm.builder import VmBuilder

    return VmBuilder()


class _LoopPark:
    """Quiesces a device event loop: a callback on the loop's own thread that waits until
    released, so no device handler runs while the VM is paused."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._efd = EventFd()
        self._parked = threading.Event()
        self._release = threading.Event()
        loop.register(self._efd.fd, self._on_wake)
        self._efd.write(1)

    def _on_wake(self, mask: int) -> None:
        self._efd.read()
        self._parked.set()
        self._release.wait()

    def wait_parked(self, timeout: float) -> bool:
        return self._parked.wait(timeout)

    def release(self) -> None:
        self._release.set()
        self._loop.unregister(self._efd.fd)
        self._efd.close()


class VmmController:
    """Holds the optional VmConfig and the current VM; runs API actions on the VMM thread.

    Create it on the main thread (the vCPU kick signal handler is installed there), then
    `start()`. Each action has a blocking method (`boot()`, `info()`, ...; they raise
    VmmError) and can be queued with `submit()` (the HTTP server does that). `wait()` returns
    when the VMM should exit: after `vmm.shutdown`, or when the guest stopped and
    `no_shutdown` is false (Cloud Hypervisor's default).

    `on_vm_start(vm)` runs on the VMM thread after each boot (reboots included), for what
    goes with a running VM (the terminal input pump); the function it returns, if any, runs
    before that VM is shut down. `events` (closed by close()) receives the event stream.
    `seccomp` ("true", "log", "false"; None: each config's own) is the VMM's `--seccomp`: as
    in Cloud Hypervisor it is the VMM's setting, so it replaces that of every created config
    (a `vm.create` body has no such field).
    """

    def __init__(
        self,
        vm_factory: VmFactory | None = None,
        *,
        events: EventSink | None = None,
        no_shutdown: bool = False,
        on_vm_start: Callable[[ManagedVm], Callable[[], None] | None] | None = None,
        version: str = __version__,
        seccomp: str | None = None,
    ) -> None:
        self._factory: VmFactory = vm_factory or _default_factory()
        self.seccomp = seccomp  # the VMM's --seccomp: every created VM's threads get it
        self._on_vm_start = on_vm_start
        self._vm_cleanup: Callable[[], None] | None = None
        self.events: EventSink = events or NullEventMonitor()
        self.no_shutdown = no_shutdown
        self.version = version
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], Done | None] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._closed = False
        self._config: VmConfig | None = None
        self._vm: ManagedVm | None = None
        self._state: VmState | None = None
        self._park: _LoopPark | None = None
        self._clock: Any = None
        self._exit = threading.Event()
        self._exit_requested = False
        self.exit_stop: Stop | None = None  # the guest stop that ended the VMM, if one did
        self.guest_stop: Stop | None = None  # why the last VM stopped by itself
        self.reboots = Reboots()  # guest resets that rebooted the VM (vm.info "reboots")
        install_kick_handler()

    # -- life of the VMM thread ----------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="vmm", daemon=True)
        self._thread.start()
        self.events.emit("vmm", "starting")

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the VMM should exit; False on timeout."""
        return self._exit.wait(timeout)

    @property
    def exit_status(self) -> int:
        """The process exit status for `strato` (strato.vmm.stop's EXIT_*)."""
        return self.exit_stop.exit_status if self.exit_stop is not None else EXIT_OK

    @property
    def config(self) -> VmConfig | None:
        """The VM's configuration (from `vm.create` or the command line)."""
        return self._config

    @property
    def state(self) -> VmState | None:
        """The VM's state as `vm.info` reports it; None when no VM is created."""
        return self._state

    def close(self, timeout: float = 10.0) -> None:
        """Stop the VM if one runs, end the VMM thread, close the event monitor."""
        if self._closed:
            return
        if self._thread is not None and self._thread.is_alive():
            try:
                self.call(Action.DELETE, timeout=timeout)
            except (VmmError, TimeoutError) as e:
                log.warning("closing the VMM: %s", e)
        self._closed = True
        self._queue.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        close_factory = getattr(self._factory, "close", None)
        if callable(close_factory):
            close_factory()
        self.events.close()

    # -- queuing actions (any thread) ----------------------------------------------------------
    def submit(self, action: Action, arg: object = None, done: Done | None = None) -> None:
        """Queue `action`; `done(result, error)` is called on the VMM thread when it ran."""
        if self._closed or self._thread is None:
            if done is not None:
                done(None, VmmError(INTERNAL_ERROR, "The VMM is not running"))
            return
        self._queue.put((partial(self._dispatch, action, arg), done))

    def call(self, action: Action, arg: object = None, timeout: float | None = None) -> object:
        """Run `action` and return its result; raises VmmError (TimeoutError on timeout)."""
        if threading.current_thread() is self._thread:
            return self._dispatch(action, arg)
        finished = threading.Event()
        out: list[Any] = [None, None]

        def done(result: object, error: VmmError | None) -> None:
            out[0], out[1] = result, error
            finished.set()

        self.submit(action, arg, done)
        if not finished.wait(timeout):
            raise TimeoutError(f"{action.value}: no answer from the VMM thread in {timeout} s")
        if out[1] is not None:
            raise out[1]
        return out[0]

    def ping(self) -> dict[str, Any]:
        return self._dict(self.call(Action.PING))

    def create(self, config: VmConfig) -> None:
        self.call(Action.CREATE, config)

    def boot(self) -> None:
        self.call(Action.BOOT)

    def info(self) -> dict[str, Any]:
        return self._dict(self.call(Action.INFO))

    def counters(self) -> dict[str, Any]:
        return self._dict(self.call(Action.COUNTERS))

    def pause(self) -> None:
        self.call(Action.PAUSE)

    def resume(self) -> None:
        self.call(Action.RESUME)

    def shutdown(self) -> None:
        self.call(Action.SHUTDOWN)

    def reboot(self) -> None:
        self.call(Action.REBOOT)

    def power_button(self) -> None:
        self.call(Action.POWER_BUTTON)

    def delete(self) -> None:
        self.call(Action.DELETE)

    def shutdown_vmm(self) -> None:
        self.call(Action.SHUTDOWN_VMM)

    def report_device_error(self, device: str, error: str) -> None:
        """For devices and backends: a device failed (emitted as a `device error` event)."""
        self.events.emit("device", "error", {"id": device, "error": error})

    @staticmethod
    def _dict(value: object) -> dict[str, Any]:
        assert isinstance(value, dict)
        return value

    # -- the VMM thread -----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, done = item
            result: object = None
            error: VmmError | None = None
            try:
                result = fn()
            except VmmError as e:
                error = e
            except Exception as e:  # a bug or a device failure must not end the VMM thread
                log.exception("VMM action failed")
                error = VmmError(
                    INTERNAL_ERROR, "Internal Server Error", f"{type(e).__name__}: {e}"
                )
            if done is not None:
                try:
                    done(result, error)
                except Exception:
                    log.exception("API completion callback failed")
            if self._exit_requested:
                self._exit.set()

    def _dispatch(self, action: Action, arg: object) -> object:
        if action is Action.CREATE:
            if not isinstance(arg, VmConfig):
                raise VmmError(BAD_REQUEST, "The VM could not be created", "no VM configuration")
            self._create(arg)
            return None
        handler: Callable[[], object] = getattr(self, "_" + action.name.lower())
        return handler()

    def _state_name(self) -> str:
        return "not created" if self._state is None else self._state.value

    def _require_vm(self, what: str, status: int = INTERNAL_ERROR) -> ManagedVm:
        """The running or paused VM; otherwise Cloud Hypervisor's "VM is not running"."""
        if self._vm is None:
            reason = "VM is not created" if status == NOT_FOUND else "VM is not running"
            raise VmmError(status, what, f"{reason} (the VM is {self._state_name()})")
        return self._vm

    # -- actions ---------------------------------------------------------------------------------
    def _ping(self) -> dict[str, Any]:
        return {
            "build_version": f"v{self.version}",
            "version": self.version,
            "pid": os.getpid(),
            "features": list(FEATURES),
        }

    def _create(self, config: VmConfig) -> None:
        what = "The VM could not be created"
        if self._config is not None:
            raise VmmError(
                INTERNAL_ERROR, what, f"VM is already created (the VM is {self._state_name()})"
            )
        if self.seccomp is not None and config.seccomp != self.seccomp:
            config = replace(config, seccomp=self.seccomp)
        try:
            config.validate()
        except ConfigError as e:
            raise VmmError(BAD_REQUEST, what, "Failed to validate config", str(e)) from None
        self._config = config
        self._state = VmState.CREATED

    def _boot(self) -> None:
        what = "The VM could not boot"
        if self._config is None:
            raise VmmError(NOT_FOUND, what, "VM config is missing (the VM is not created)")
        if self._vm is not None:
            raise VmmError(
                INTERNAL_ERROR, what, f"VM is already created (the VM is {self._state_name()})"
            )
        self.events.emit("vm", "booting")
        self._start_vm(what)
        self.events.emit("vm", "booted")

    def _pause(self) -> None:
        what = "The VM could not be paused"
        vm = self._require_vm(what)
        self._check_transition(vm, VmState.PAUSED, what, "Cannot pause VM")
        self.events.emit("vm", "pausing")
        try:
            vm.pause()
        except InvalidStateTransition as e:
            raise self._transition_error(what, "Cannot pause VM", e.current, e.target) from None
        self._park_devices(vm)
        self._clock = self._save_clock(vm)
        self._state = VmState.PAUSED
        self.events.emit("vm", "paused")

    def _resume(self) -> None:
        what = "The VM could not resume"
        vm = self._require_vm(what)
        self._check_transition(vm, VmState.RUNNING, what, "Cannot resume VM")
        self.events.emit("vm", "resuming")
        self._restore_clock(vm)
        self._unpark_devices()
        try:
            vm.resume()
        except InvalidStateTransition as e:
            raise self._transition_error(what, "Cannot resume VM", e.current, e.target) from None
        self._state = VmState.RUNNING
        self.events.emit("vm", "resumed")

    def _shutdown(self) -> None:
        self._require_vm("The VM could not shutdown")
        self._stop_vm()
        self._state = VmState.SHUTDOWN
        self.events.emit("vm", "shutdown")

    def _reboot(self) -> None:
        what = "The VM could not reboot"
        self._require_vm(what, NOT_FOUND)
        self.events.emit("vm", "rebooting")
        self._stop_vm()
        self._state = VmState.SHUTDOWN
        self._start_vm(what)
        self.events.emit("vm", "rebooted")

    def _power_button(self) -> None:
        vm = self._require_vm("Error triggering power button")
        press = getattr(vm, "power_button", None)
        if not callable(press):
            ged = getattr(vm, "devices", {}).get("ged")
            press = getattr(ged, "power_button", None)
        if not callable(press):
            raise VmmError(
                INTERNAL_ERROR,
                "Error triggering power button",
                "the guest has no ACPI power button (this VM has no ACPI GED device)",
            )
        try:
            press()
        except Exception as e:
            raise VmmError(INTERNAL_ERROR, "Error triggering power button", str(e)) from None

    def _counters(self) -> dict[str, dict[str, int]]:
        what = "The VM info is not available"
        vm = self._require_vm(what)
        read = getattr(vm, "counters", None)
        raw: dict[str, Any] = {}
        try:
            if callable(read):
                raw = read()
            else:
                for name, dev in getattr(vm, "devices", {}).items():
                    dev_counters = getattr(dev, "counters", None)
                    if callable(dev_counters):
                        raw[name] = dev_counters()
            return {str(dev): {str(k): int(v) for k, v in c.items()} for dev, c in raw.items()}
        except Exception as e:
            log.exception("reading the VM's counters failed")
            raise VmmError(
                INTERNAL_ERROR, what, "Error getting counters", f"{type(e).__name__}: {e}"
            ) from None

    def _info(self) -> dict[str, Any]:
        if self._config is None or self._state is None:
            raise VmmError(NOT_FOUND, "The VM info is not available", "VM is not created")
        info: dict[str, Any] = {
            "config": vm_config_to_json(self._config),
            "state": self._state.value,
            "memory_actual_size": self._config.memory.size,
            "reboots": self.reboots.count,
        }
        if self._vm is not None:
            info["device_tree"] = self._device_tree(self._vm, self._config)
        return info

    def _delete(self) -> None:
        if self._config is None:
            return
        if self._vm is not None:
            self._stop_vm()
            self.events.emit("vm", "shutdown")
        self._config = None
        self._state = None
        close_factory = getattr(self._factory, "close", None)
        if callable(close_factory):
            close_factory()  # the deleted config's serial output
        self.events.emit("vm", "deleted")

    def _shutdown_vmm(self) -> None:
        self._delete()
        self.events.emit("vmm", "shutdown")
        self._exit_requested = True

    # -- the VM stopping by itself ---------------------------------------------------------------
    def _on_vm_stop(self, vm: ManagedVm, stop: Stop) -> None:
        """Vm.on_stop callback (any thread, vCPU threads included): hand it to the VMM thread."""
        self._queue.put((partial(self._guest_stopped, vm, stop), None))

    def _guest_stopped(self, vm: ManagedVm, stop: Stop) -> None:
        if vm is not self._vm:
            return  # a VM this thread stopped itself (shutdown, reboot, delete)
        assert self._config is not None
        self.guest_stop = stop
        if stop.reason is StopReason.GUEST_PANIC:
            self.events.emit("guest", "panic", {"event": "panicked"})
        if stop.reason is StopReason.RESET and not self._config.no_reboot:
            give_up = self.reboots.next()  # counted and logged; past the limit, the stop
            if give_up is None:
                try:
                    self._reboot()
                except VmmError as e:
                    log.error("the guest asked for a reset and the reboot failed: %s", e)
                    self._state = VmState.SHUTDOWN
                return
            stop = give_up
        self._stop_vm()
        self._state = VmState.SHUTDOWN
        self.events.emit("vm", "shutdown", {"reason": stop.reason.value, "message": stop.message})
        if not self.no_shutdown:
            self.exit_stop = stop
            self._shutdown_vmm()

    # -- helpers -----------------------------------------------------------------------------------
    def _start_vm(self, what: str) -> None:
        assert self._config is not None
        try:
            vm = self._factory(self._config)
        except ConfigError as e:
            raise VmmError(BAD_REQUEST, what, str(e)) from None
        except Exception as e:
            log.exception("building the VM failed")
            raise VmmError(INTERNAL_ERROR, what, f"{type(e).__name__}: {e}") from None
        vm.on_stop.append(partial(self._on_vm_stop, vm))
        try:
            vm.start()
        except Exception as e:
            log.exception("starting the VM failed")
            try:
                vm.shutdown()
            except Exception:
                log.exception("cleaning up the VM that failed to start")
            raise VmmError(INTERNAL_ERROR, what, f"{type(e).__name__}: {e}") from None
        self._vm = vm
        self._state = VmState.RUNNING
        if self._on_vm_start is not None:
            try:
                self._vm_cleanup = self._on_vm_start(vm)
            except Exception:
                log.exception("the on_vm_start hook failed")

    def _stop_vm(self) -> None:
        vm, self._vm = self._vm, None
        self._unpark_devices()
        self._clock = None
        cleanup, self._vm_cleanup = self._vm_cleanup, None
        if cleanup is not None:
            try:
                cleanup()
            except Exception:
                log.exception("the on_vm_start cleanup failed")
        if vm is None:
            return
        try:
            vm.shutdown()
        except Exception:
            log.exception("shutting the VM down failed")

    def _check_transition(self, vm: ManagedVm, target: VmState, what: str, cause: str) -> None:
        current = self._state or VmState.CREATED
        if current is target:
            raise self._transition_error(what, cause, current, target)

    @staticmethod
    def _transition_error(what: str, cause: str, current: VmState, target: VmState) -> VmmError:
        return VmmError(
            INTERNAL_ERROR,
            what,
            cause,
            f"invalid VM state transition: {current.value} to {target.value}"
            f" (the VM is {current.value})",
        )

    def _park_devices(self, vm: ManagedVm) -> None:
        loop = getattr(getattr(vm, "machine", None), "loop", None)
        thread = getattr(loop, "thread", None)
        if loop is None or thread is None or not thread.is_alive():
            return
        park = _LoopPark(loop)
        self._park = park
        if not park.wait_parked(5.0):
            log.warning("the device event loop did not pause within 5 s")

    def _unpark_devices(self) -> None:
        park, self._park = self._park, None
        if park is not None:
            park.release()

    @staticmethod
    def _save_clock(vm: ManagedVm) -> Any:
        """The guest's KVM clock at pause time, so that resuming does not jump guest time."""
        vmfd = getattr(getattr(vm, "machine", None), "vm", None)
        if vmfd is None:
            return None
        try:
            return vmfd.get_clock()
        except OSError as e:
            log.warning("cannot read the KVM clock at pause: %s", e)
            return None

    def _restore_clock(self, vm: ManagedVm) -> None:
        clock, self._clock = self._clock, None
        vmfd = getattr(getattr(vm, "machine", None), "vm", None)
        if clock is None or vmfd is None:
            return
        clock.flags = 0  # KVM_CLOCK_REALTIME would add the paused time back
        try:
            vmfd.set_clock(clock)
        except OSError as e:
            log.warning("cannot restore the KVM clock at resume: %s", e)

    @staticmethod
    def _device_tree(vm: ManagedVm, config: VmConfig) -> dict[str, Any]:
        """Cloud Hypervisor's device tree: the VM's own when it has one; else its virtio
        devices (from its device manager, with their PCI address) or, failing that, the
        configured ones under Cloud Hypervisor's names; and the serial port."""
        tree = getattr(vm, "device_tree", None)
        if callable(tree):
            result = tree()
            assert isinstance(result, dict)
            return result

        def node(dev_id: str, **extra: Any) -> dict[str, Any]:
            return {"id": dev_id, "resources": [], "children": [], **extra}

        out: dict[str, Any] = {}
        if config.serial.mode is not ConsoleMode.OFF:
            out["__serial"] = node("__serial")
        entries = getattr(getattr(vm, "device_manager", None), "virtio", None)
        if entries is not None:
            for e in entries:
                out[e.id] = node(e.id, pci_bdf=f"0000:00:{e.slot:02x}.0")
            return out
        ids: list[str] = []
        if config.console.mode is not ConsoleMode.OFF:
            ids.append("__console")
        n = 0
        for d in config.disks:
            ids.append(d.id or f"_disk{n}")
            n += 1
        for net in config.net:
            ids.append(net.id or f"_net{n}")
            n += 1
        if config.rng is not None:
            ids.append("__rng")
        out.update((i, node(i)) for i in ids)
        return out
