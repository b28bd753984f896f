"""Run a VM to the end: build, start, wait, and reboot on a guest reset unless told not to."""

from __future__ import annotations

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
from strato.vmm.platform import warn_if_emulated
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import Vm

log = logging.getLogger(__name__)

MAX_REBOOTS = 1000  # a guest that resets forever is stopped eventually


def run(
    config: VmConfig,
    *,
    serial_out: OutputLike | None = None,
    on_started: Callable[[Vm], None] | None = None,
    timeout: float | None = None,
    handle_signals: bool = False,
) -> Stop:
    """Boot `config` and wait for the guest to stop. A guest reset boots it again unless
    `config.no_reboot`. Returns the final Stop (its `exit_status` is the command's)."""
    warn_if_emulated()
    if threading.current_thread() is threading.main_thread():
        # A disk write past RLIMIT_FSIZE must fail with EFBIG (an I/O error for the guest),
        # not kill the VMM (CPython ignores SIGXFSZ already; an embedder may not).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    builder = VmBuilder(serial_out)
    try:
        return _run(config, builder, on_started, timeout, handle_signals)
    finally:
        builder.close()


def _run(
    config: VmConfig,
    builder: VmBuilder,
    on_started: Callable[[Vm], None] | None,
    timeout: float | None,
    handle_signals: bool,
) -> Stop:
    for _ in range(MAX_REBOOTS):
        times = BootTimes()
        vm = builder(config, times=times)
        stdin_pump = None
        try:
            vm.start()
            times.mark("first KVM_RUN")
            if log.isEnabledFor(logging.INFO):  # the report reads /proc: only when shown
                log.info("boot steps: %s", times.report())
            if on_started is not None:
                on_started(vm)
            stdin_pump = terminal_input(config, vm)
            if handle_signals:
                _stop_on_signals(vm)
            stop = _wait(vm, timeout)
            if stop is None:
                stop = Stop(StopReason.REQUESTED, f"timed out after {timeout} s")
        finally:
            if stdin_pump is not None:
                stdin_pump.stop()
            vm.shutdown()
        if stop.reason is StopReason.RESET and not config.no_reboot:
            log.info("rebooting")
            continue
        return stop
    return Stop(StopReason.VMM_ERROR, f"the guest reset {MAX_REBOOTS} times; giving up")


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


def _stop_on_signals(vm: Vm) -> None:
    """SIGTERM and SIGINT stop the VM cleanly (only possible on the main thread)."""

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        vm.request_stop(Stop(StopReason.REQUESTED, f"stopped by {name}"))

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _wait(vm: Vm, timeout: float | None) -> Stop | None:
    # Wait in slices so that signal handlers run promptly on the main thread.
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
        if step <= 0:
            return None
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
