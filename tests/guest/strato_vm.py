"""Booting the built-in guest under strato: the command line, an in-process run, timings.

`StratoMachine` says what to attach (as `tests/guest/qemu.py`'s `QemuMachine` does for QEMU)
and renders the `strato` command's flags. The same flags give the in-process `VmConfig`
(through strato's own argument parser), so every way of running boots the same machine:

- `machine.command()` with `harness.run_guest`: the `strato` command, its serial port on
  stdout (`--serial tty`);
- `run_cli_with_console(machine, ...)`: the `strato` command with `--console tty` on pipes or
  a pseudo-terminal (strato forwards its stdin to a tty console) and the serial port in a
  file, so the host can answer the guest's `console-rx`;
- `run_in_process(machine, ...)`: `strato.vmm.runner.run` in this process, the serial port
  parsed through a callback, the `Vm` at hand (`vm.device_manager.console.enqueue_input`).

`record_timing` keeps each run's "start to DONE" time for the session summary and appends
it to a results file (`TIMINGS_FILE`), so the numbers survive output capture.
"""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from tests.guest.harness import Done, GuestOutput, Ready, ReadyHandler, RunResult

TIMINGS_FILE = Path("/tmp") / f"strato-guest-timings-{os.getuid()}.jsonl"


@dataclass
class StratoMachine:
    """What to attach; `args()` renders strato's flags (Cloud Hypervisor's syntax)."""

    kernel: Path
    cmdline: str = ""
    cpus: int = 1
    memory_mib: int = 256
    disk: Path | None = None
    disk_serial: str = "strato-disk0"
    disk_readonly: bool = False
    rng: bool = True
    console_file: Path | None = None  # --console file=PATH; None: --console off
    console_tty: bool = False  # --console tty (wins over console_file)
    serial_file: Path | None = None  # --serial file=PATH; None: --serial tty (stdout)
    tap: str | None = None
    mac: str = "52:54:00:12:34:56"
    no_reboot: bool = True
    extra: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        args = [
            "--kernel", str(self.kernel),
            "--cmdline", self.cmdline,
            "--cpus", f"boot={self.cpus}",
            "--memory", f"size={self.memory_mib}M",
            "--serial", f"file={self.serial_file}" if self.serial_file else "tty",
        ]  # fmt: skip
        if self.console_tty:
            args += ["--console", "tty"]
        elif self.console_file is not None:
            args += ["--console", f"file={self.console_file}"]
        else:
            args += ["--console", "off"]
        if self.disk is not None:
            disk = f"path={self.disk},serial={self.disk_serial}"
            args += ["--disk", disk + (",readonly=on" if self.disk_readonly else "")]
        if self.rng:
            args += ["--rng", "src=/dev/urandom"]
        if self.tap is not None:
            args += ["--net", f"tap={self.tap},mac={self.mac}"]
        if self.no_reboot:
            args.append("--no-reboot")
        return args + self.extra

    def command(self) -> list[str]:
        """The `strato` command (as a module of this interpreter: no PATH lookup)."""
        return [sys.executable, "-m", "strato.cli.main", *self.args()]


# ---- in-process --------------------------------------------------------------------------------
@dataclass
class InProcessResult:
    run: RunResult
    exit_status: int
    stop_message: str
    handler_errors: list[str]
    stop_reason: str = ""  # StopReason's value: "poweroff", "reset", ...


def run_in_process(
    machine: StratoMachine,
    timeout: float,
    on_ready: Callable[[object], Mapping[str, ReadyHandler]],
) -> InProcessResult:
    """Boot `machine` with `strato.vmm.runner.run` in this process.

    `on_ready(vm)` is called once the VM runs and returns the READY handlers; they run on a
    thread of their own (never on the vCPU thread that printed the line). The serial port is
    parsed as it arrives; the run ends when the guest stops it or after `timeout`.
    """
    from strato.cli.args import build_parser, config_from_args
    from strato.devices.legacy.serial_output import CallbackSink
    from strato.vmm.config import ConsoleConfig, ConsoleMode
    from strato.vmm.runner import run

    config = config_from_args(build_parser().parse_args(machine.args()))
    # Serial bytes come to our callback; NULL (not OFF) keeps the 16550 and never opens a tty.
    config = replace(config, serial=ConsoleConfig(ConsoleMode.NULL))
    output = GuestOutput()
    start = time.monotonic()
    done_at: list[float] = []
    pending = bytearray()
    handlers: dict[str, ReadyHandler] = {}
    errors: list[str] = []
    ready_queue: list[Ready] = []
    ready_cv = threading.Condition()
    finished = threading.Event()

    def on_serial(data: bytes) -> None:  # vCPU thread: parse only, hand READY lines over
        pending.extend(data)
        while (nl := pending.find(b"\n")) >= 0:
            line = pending[:nl].decode("utf-8", "replace").rstrip("\r")
            del pending[: nl + 1]
            event = output.add(line, time.monotonic() - start)
            if isinstance(event, Done) and not done_at:
                done_at.append(time.monotonic())
            if isinstance(event, Ready):
                with ready_cv:
                    ready_queue.append(event)
                    ready_cv.notify()

    def answer_ready() -> None:
        while True:
            with ready_cv:
                ready_cv.wait_for(lambda: ready_queue or finished.is_set())
                if not ready_queue:
                    return
                event = ready_queue.pop(0)
            handler = handlers.get(event.what)
            if handler is None:
                continue
            try:
                handler(event)
            except Exception as e:  # reported by the test, not lost on a thread
                errors.append(f"READY {event.what}: {e!r}")

    def started(vm: object) -> None:
        handlers.update(on_ready(vm))
        with ready_cv:
            ready_cv.notify()

    responder = threading.Thread(target=answer_ready, name="ready", daemon=True)
    responder.start()
    try:
        stop = run(config, serial_out=CallbackSink(on_serial), on_started=started, timeout=timeout)
    finally:
        finished.set()
        with ready_cv:
            ready_cv.notify()
        responder.join(timeout=5)
    if pending:
        output.add(pending.decode("utf-8", "replace"), time.monotonic() - start)
    result = RunResult(
        output=output,
        returncode=stop.exit_status,
        seconds_to_done=done_at[0] - start if done_at else None,
        seconds_total=time.monotonic() - start,
        stderr=stop.message,
    )
    return InProcessResult(result, stop.exit_status, stop.message, errors, stop.reason.value)


# ---- the command, its virtio console on standard input and output -----------------------------
@dataclass
class ConsoleRun:
    run: RunResult
    console: bytes  # what the guest wrote to its virtio console


def run_cli_with_console(
    machine: StratoMachine,
    timeout: float,
    on_ready: Mapping[str, ReadyHandler],
    console_write: list[Callable[[bytes], None]],
    *,
    terminal: bool = False,
    exit_grace: float = 10.0,
) -> ConsoleRun:
    """Run the `strato` command with `--console tty` and the serial port in a file.

    strato forwards its standard input to a `tty` console and writes the console to its
    standard output: here both are pipes (or, with `terminal`, one pseudo-terminal). The
    serial file is followed for the guest's lines; READY lines go to `on_ready`, which can
    type into the console through `console_write[0]` (filled in here before the start).
    """
    assert machine.serial_file is not None and machine.console_tty
    master = slave = -1
    if terminal:
        master, slave = pty.openpty()
        proc = subprocess.Popen(
            machine.command(), stdin=slave, stdout=slave, stderr=subprocess.PIPE, close_fds=True
        )
        os.close(slave)
        console_fd, input_fd = master, master
    else:
        proc = subprocess.Popen(
            machine.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None
        console_fd, input_fd = proc.stdout.fileno(), proc.stdin.fileno()
    start = time.monotonic()
    os.set_blocking(console_fd, False)
    console = bytearray()
    stderr_chunks: list[bytes] = []
    err_thread = threading.Thread(
        target=lambda: stderr_chunks.append(proc.stderr.read() if proc.stderr else b""),
        daemon=True,
    )
    err_thread.start()
    console_write[:] = [lambda data: _write_all(input_fd, data)]
    output = GuestOutput()
    offset = 0
    pending = b""
    done_at: float | None = None

    def read_console() -> None:
        try:
            while chunk := os.read(console_fd, 65536):
                console.extend(chunk)
        except OSError:  # EAGAIN: nothing more now; EIO: the terminal's other side closed
            pass

    def read_serial(now: float) -> None:
        nonlocal offset, pending, done_at
        assert machine.serial_file is not None
        if not machine.serial_file.exists():
            return
        with open(machine.serial_file, "rb") as f:
            f.seek(offset)
            data = f.read()
        offset += len(data)
        pending += data
        *complete, pending = pending.split(b"\n")
        for raw in complete:
            event = output.add(raw.decode("utf-8", "replace").rstrip("\r"), now - start)
            if isinstance(event, Done) and done_at is None:
                done_at = now
            if isinstance(event, Ready) and event.what in on_ready:
                on_ready[event.what](event)

    try:
        while True:
            now = time.monotonic()
            read_console()
            read_serial(now)
            limit = (
                start + timeout if done_at is None else min(start + timeout, done_at + exit_grace)
            )
            if now >= limit or proc.poll() is not None:
                break
            # Following a file: the poll interval, not a wait for correctness.
            select.select([console_fd], [], [], 0.005)
        try:
            returncode: int | None = proc.wait(timeout=max(0.1, limit - time.monotonic()))
        except subprocess.TimeoutExpired:
            returncode = None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        read_console()
        read_serial(time.monotonic())
        err_thread.join(timeout=2)
        if terminal:
            os.close(master)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if proc.stderr is not None:
            proc.stderr.close()
    if pending:
        output.add(pending.decode("utf-8", "replace"), time.monotonic() - start)
    result = RunResult(
        output=output,
        returncode=returncode,
        seconds_to_done=None if done_at is None else done_at - start,
        seconds_total=time.monotonic() - start,
        stderr=b"".join(stderr_chunks).decode("utf-8", "replace"),
    )
    return ConsoleRun(result, bytes(console))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# ---- timings -----------------------------------------------------------------------------------
def record_timing(test_id: str, vmm: str, result: RunResult) -> None:
    """Keep `result`'s start-to-DONE time for the session summary and in TIMINGS_FILE."""
    from tests.guest.conftest import TIMINGS

    seconds = result.seconds_to_done
    TIMINGS.append((test_id, vmm, seconds if seconds is not None else float("nan")))
    record = {
        "time": time.time(),
        "pid": os.getpid(),
        "test": test_id,
        "vmm": vmm,
        "seconds_to_done": seconds,
        "seconds_total": result.seconds_total,
        "returncode": result.returncode,
    }
    with open(TIMINGS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")
