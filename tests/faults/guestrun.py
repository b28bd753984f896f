"""Running the built-in guest under strato for the fault and load tests.

- `strato_args(...)`: the `strato` flags (Cloud Hypervisor's syntax) for a small machine;
  `strato_command(args)` is the command, `wrapped(command, ...)` the same command started
  under a resource limit.
- `run_in_process(args, ...)`: `strato.vmm.runner.run` in this process, the serial port parsed
  as it arrives, READY lines answered on a thread of their own with the `Vm` at hand. Returns
  the output, the `Stop`, and the device counters.
- `crash_status()`: the exit status of a guest that ends with a triple fault (what the built-in
  guest does after a failed check): 3, or 4 on the PVM hosts where KVM reports it as an
  emulation failure (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from strato.vmm.stop import EXIT_EMULATION_FAILURE, EXIT_GUEST_CRASH, Stop
from tests.guest.harness import GuestOutput, Ready

if TYPE_CHECKING:
    from strato.devices.legacy.serial_output import SerialOutput
    from strato.vmm.vm import Vm


def crash_status() -> int:
    from strato.vmm.platform import kvm_emulates_kernel_mode

    return EXIT_EMULATION_FAILURE if kvm_emulates_kernel_mode() else EXIT_GUEST_CRASH


def strato_args(
    kernel: Path,
    cmdline: str,
    *,
    memory_mib: int = 32,
    disk: str | None = None,
    net: str | None = None,
    rng: bool = False,
    serial: str = "tty",
    extra: Sequence[str] = (),
) -> list[str]:
    args = [
        "--kernel", str(kernel),
        "--cmdline", cmdline,
        "--memory", f"size={memory_mib}M",
        "--serial", serial,
        "--console", "off",
        "--no-reboot",
    ]  # fmt: skip
    if disk is not None:
        args += ["--disk", disk]
    if net is not None:
        args += ["--net", net]
    if rng:
        args += ["--rng", "src=/dev/urandom"]
    return args + list(extra)


def strato_command(args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "strato.cli.main", *args]


def wrapped(command: Sequence[str], *, fsize: int) -> list[str]:
    """`command` started under RLIMIT_FSIZE = `fsize`, with SIGXFSZ at its default action
    (kill), as a shell or a service manager would start it: an ignored signal would otherwise
    stay ignored across exec, and prove nothing about strato."""
    launcher = (
        "import os, resource, signal, sys\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return [sys.executable, "-c", launcher, *command]


ReadyAction = Callable[[Ready, "Vm"], None]


@dataclass
class InProcessRun:
    output: GuestOutput
    stop: Stop
    counters: dict[str, dict[str, int]]
    handler_errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    vm: Vm | None = None


def run_in_process(
    args: Sequence[str],
    *,
    timeout: float,
    on_ready: Mapping[str, ReadyAction] | None = None,
    on_started: Callable[[Vm], None] | None = None,
    serial_out: SerialOutput | None = None,
    output: GuestOutput | None = None,
) -> InProcessRun:
    """Boot the machine `args` describe with `strato.vmm.runner.run`, in this process.

    The serial port goes to a parser (or to `serial_out`, a SerialOutput, with the parser as a
    watcher of the UART) and fills `output` (a new GuestOutput by default) as lines arrive;
    READY lines are answered by `on_ready[what](event, vm)` on a responder thread, never on
    the vCPU thread that printed them.
    """
    from strato.cli.args import build_parser, config_from_args
    from strato.devices.legacy.serial_output import CallbackSink
    from strato.vmm.config import ConsoleConfig, ConsoleMode
    from strato.vmm.runner import run

    config = config_from_args(build_parser().parse_args(list(args)))
    config = replace(config, serial=ConsoleConfig(ConsoleMode.NULL))
    output = GuestOutput() if output is None else output
    start = time.monotonic()
    pending = bytearray()
    ready: queue.Queue[Ready | None] = queue.Queue()
    errors: list[str] = []
    vms: list[Vm] = []
    vm_ready = threading.Event()

    def on_serial(data: bytes) -> None:  # the vCPU thread: parse only
        pending.extend(data)
        while (nl := pending.find(b"\n")) >= 0:
            line = pending[:nl].decode("utf-8", "replace").rstrip("\r")
            del pending[: nl + 1]
            event = output.add(line, time.monotonic() - start)
            if isinstance(event, Ready):
                ready.put(event)

    def answer() -> None:
        while (event := ready.get()) is not None:
            action = (on_ready or {}).get(event.what)
            if action is None:
                continue
            vm_ready.wait(30)
            try:
                action(event, vms[0])
            except Exception as e:  # reported by the test, not lost on a thread
                errors.append(f"READY {event.what}: {e!r}")

    def started(vm: Vm) -> None:
        vms.append(vm)
        if serial_out is not None:
            vm.devices["serial"].add_watcher(on_serial)
        if on_started is not None:
            on_started(vm)
        vm_ready.set()

    responder = threading.Thread(target=answer, name="ready-responder", daemon=True)
    responder.start()
    sink = serial_out if serial_out is not None else CallbackSink(on_serial)
    try:
        stop = run(config, serial_out=sink, on_started=started, timeout=timeout)
    finally:
        ready.put(None)
        responder.join(timeout=10)
    if pending:
        output.add(pending.decode("utf-8", "replace"), time.monotonic() - start)
    vm = vms[0] if vms else None
    counters = vm.counters() if vm is not None else {}
    return InProcessRun(output, stop, counters, errors, time.monotonic() - start, vm)


def thread_cpu_seconds(native_id: int) -> float:
    """CPU time (user + system) a thread of this process has used so far."""
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return ticks / os.sysconf("SC_CLK_TCK")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)  # polling: the interval, not a correctness wait
