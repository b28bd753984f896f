"""Run a VM to the end: build, start, wait, and reboot on a guest reset unless told not to."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from strato.devices.legacy.serial_output import OutputLike
from strato.vmm.builder import BootTimes, VmBuilder
from strato.vmm.config import ConsoleMode, VmConfig
from strato.vmm.events import EventSink, NullEventMonitor
from strato.vmm.platform import warn_if_emulated
from strato.vmm.stop import MAX_REBOOTS, Reboots, Stop, StopReason, StopSignals
from strato.vmm.vm import Vm

log = logging.getLogger(__name__)

__all__ = ["MAX_REBOOTS", "TerminalInput", "run", "terminal_input"]

WAIT_SLICE = 0.2  # seconds: how often the main thread looks at a received SIGTERM/SIGINT


def run(
    config: VmConfig,
    *,
    serial_out: OutputLike | None = None,
    on_started: Callable[[Vm], None] | None = None,
    timeout: float | None = None,
    handle_signals: bool = False,
    signals: StopSignals | None = None,
    events: EventSink | None = None,
    max_reboots: int = MAX_REBOOTS,
) -> Stop:
    """Boot `config` and wait for the guest to stop. A guest reset boots it again unless
    `config.no_reboot`, at most `max_reboots` times. Returns the final Stop (its
    `exit_status` is the command's; `reboots` counts the reboots before it).

    SIGTERM and SIGINT stop the VM when `signals` is given (installed by the caller) or
    `handle_signals` is true (installed here; main thread only). `events` receives Cloud
    Hypervisor's events (vm booting/booted/rebooting/rebooted/shutdown)."""
    if signals is None and handle_signals and threading.current_thread() is threading.main_thread():
        signals = StopSignals()
        signals.install()
    warn_if_emulated()
    if threading.current_thread() is threading.main_thread():
        # A disk write past RLIMIT_FSIZE must fail with EFBIG (an I/O error for the guest),
        # not kill the VMM (CPython ignores SIGXFSZ already; an embedder may not).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    reboots = Reboots(max_reboots)
    sink = events if events is not None else NullEventMonitor()
    builder = VmBuilder(serial_out)
    try:
        stop = _run(config, builder, _Run(on_started, timeout, signals, sink, reboots))
    finally:
        builder.close()
    if reboots.count:
        log.info("the guest rebooted %d times", reboots.count)
    if stop.reason is StopReason.GUEST_PANIC:
        sink.emit("guest", "panic", {"event": "panicked"})
    sink.emit("vm", "shutdown", {"reason": stop.reason.value, "message": stop.message})
    return dataclasses.replace(stop, reboots=reboots.count)


@dataclasses.dataclass
class _Run:
    on_started: Callable[[Vm], None] | None
    timeout: float | None
    signals: StopSignals | None
    events: EventSink
    reboots: Reboots

    def signalled(self) -> Stop | None:
        return self.signals.stop if self.signals is not None else None


def _run(config: VmConfig, builder: VmBuilder, r: _Run) -> Stop:
    rebooting = False
    while True:
        early = r.signalled()
        if early is not None:
            return early  # a signal before this boot: do not start the guest at all
        r.events.emit("vm", "rebooting" if rebooting else "booting")
        times = BootTimes()
        vm = builder(config, times=times)
        stdin_pump = None
        try:
            vm.start()
            times.mark("first KVM_RUN")
            r.events.emit("vm", "rebooted" if rebooting else "booted")
            if log.isEnabledFor(logging.INFO):  # the report reads /proc: only when shown
                log.info("boot steps: %s", times.report())
            if r.on_started is not None:
                r.on_started(vm)
            stdin_pump = terminal_input(config, vm)
            stop = _wait(vm, r)
        finally:
            if stdin_pump is not None:
                stdin_pump.stop()
            vm.shutdown()
        if stop.reason is not StopReason.RESET or config.no_reboot:
            return stop
        give_up = r.reboots.next()
        if give_up is not None:
            return give_up
        rebooting = True


def terminal_input(config: VmConfig, vm: Any) -> TerminalInput | None:
    """Standard input goes to whichever console is `tty` (a terminal, or a pipe)."""
    sink: Callable[[bytes], int] | None = None
    if config.serial.mode is ConsoleMode.TTY and "serial" in vm.devices:
        sink = vm.devices["serial"].enqueue_input
    elif config.console.mode is ConsoleMode.TTY and vm.device_manager is not None:
        console = vm.device_manager.console
        if console is not None:
            sink = console.enqueue_input
    if sink is None:
        return None
    pump = TerminalInput(sink)
    pump.start()
    return pump


def _wait(vm: Vm, r: _Run) -> Stop:
    """Wait for the VM to stop, in slices, so that a signal is acted on (from here, not from
    the handler) within WAIT_SLICE. The first stop wins: a guest that stopped on its own
    before the signal keeps its reason and status."""
    deadline = None if r.timeout is None else time.monotonic() + r.timeout
    while True:
        signalled = r.signalled()
        if signalled is not None:
            vm.request_stop(signalled)
        elif deadline is not None and time.monotonic() >= deadline:
            vm.request_stop(Stop(StopReason.REQUESTED, f"timed out after {r.timeout} s"))
        step = (
            WAIT_SLICE
            if deadline is None
            else max(0.0, min(WAIT_SLICE, deadline - time.monotonic()))
        )
        stop = vm.wait(step)
        if stop is not None:
            return stop


class TerminalInput:
    """Forwards the terminal's input to the guest console, in raw mode while the VM runs."""

    def __init__(self, sink: Callable[[bytes], int], fd: int = 0) -> None:
        self._sink = sink
        self._fd = fd
        self._saved: list[object] | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="stdin", daemon=True)

    def start(self) -> None:
        try:
            os.fstat(self._fd)
        except OSError:
            return  # no standard input at all
        if os.isatty(self._fd):
            import termios
            import tty

            self._saved = termios.tcgetattr(self._fd)
            tty.setraw(self._fd)
        self._thread.start()

    def _run(self) -> None:
        import select

        while True:
            r, _, _ = select.select([self._fd, self._stop_r], [], [])
            if self._stop_r in r:
                return
            data = os.read(self._fd, 1024)
            if not data:
                return
            while data:
                n = self._sink(data)
                data = data[n:]
                # The guest's input buffer is full: wait a little, unless we are stopping.
                if data and select.select([self._stop_r], [], [], 0.01)[0]:
                    return

    def stop(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive():
            self._thread.join(1)
        if self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)  # type: ignore[arg-type]
            self._saved = None
        os.close(self._stop_r)
        os.close(self._stop_w)
        sys.stdout.flush()
