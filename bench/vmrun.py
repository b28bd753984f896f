"""Launch one VMM process, follow its serial port (stdout), and measure the process while it runs.

`harness.run_guest` (tests/guest) runs a guest for the tests; the benchmarks need more from the
same run: the process id (to read /proc/PID/stat and /proc/PID/smaps while it runs), host
timestamps of the first line and of the exit, the CPU time the kernel accounted to the whole
process (wait4's rusage, every thread included), and a hook on each parsed event (to sample the
CPU time exactly at BENCH-START and BENCH-END). Lines are parsed with the harness' `GuestOutput`.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tests.guest.harness import BenchEnd, BenchStart, Done, Event, GuestOutput

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a whole process (all its threads, live and exited), in seconds."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode()
    except OSError:
        return None
    return parse_proc_stat_cpu(raw)


def parse_proc_stat_cpu(stat_line: str) -> float:
    """utime + stime from a /proc/PID/stat line (the command may contain spaces and parens)."""
    rest = stat_line[stat_line.rindex(")") + 2 :].split()
    # rest[0] is field 3 (state): utime and stime are fields 14 and 15.
    return (int(rest[11]) + int(rest[12])) / CLOCK_TICKS


@dataclass
class BenchWindow:
    """One guest benchmark as the host saw it: times and VMM CPU at its START and END lines."""

    name: str
    t_start: float
    t_end: float | None = None
    cpu_start: float | None = None
    cpu_end: float | None = None
    fields: dict[str, str] = field(default_factory=dict)
    ops: int = 0
    bytes: int = 0

    @property
    def seconds(self) -> float:
        return (self.t_end - self.t_start) if self.t_end is not None else 0.0

    @property
    def cpu_seconds(self) -> float | None:
        if self.cpu_start is None or self.cpu_end is None:
            return None
        return self.cpu_end - self.cpu_start

    @property
    def guest_seconds(self) -> float:
        """The guest's own TSC timing of the workload (falls back to the host's)."""
        us = self.fields.get("guest_us")
        return int(us) / 1e6 if us and us.isdigit() and int(us) > 0 else self.seconds


@dataclass
class VmRun:
    argv: list[str]
    pid: int
    launched: float  # time.monotonic() just before the process was created
    output: GuestOutput
    first_line: float | None  # seconds from launch to the first matching line
    done: float | None  # ... to the DONE line
    exited: float | None  # ... to the exit of the process (None: killed at the deadline)
    returncode: int | None
    cpu_user: float  # whole-process CPU time (rusage)
    cpu_sys: float
    max_rss_kib: int
    windows: list[BenchWindow]
    stderr: str
    samples: list[tuple[float, object]] = field(default_factory=list)

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    def window(self, name: str, nth: int = 0) -> BenchWindow:
        found = [w for w in self.windows if w.name == name and w.t_end is not None]
        if len(found) <= nth:
            raise RuntimeError(
                f"no BENCH-END {name} #{nth} in the output of {self.argv[0]}:\n"
                + self.output.text()[-3000:]
                + "\n--- stderr:\n"
                + self.stderr[-2000:]
            )
        return found[nth]


EventHook = Callable[[Event, "RunState"], None]
Sampler = Callable[[int], object]


@dataclass
class RunState:
    """What a hook may look at or act on while the VMM runs."""

    pid: int
    output: GuestOutput
    stop: bool = False  # set by a hook to end the run (the process gets SIGTERM)


def run_vmm(
    argv: Sequence[str],
    timeout: float,
    *,
    first_line: str = r"\S",
    on_event: EventHook | None = None,
    sampler: Sampler | None = None,
    sample_every: float = 0.1,
    stop_at: str | None = None,
    exit_grace: float = 10.0,
    env: Mapping[str, str] | None = None,
) -> VmRun:
    """Run a VMM whose stdout is the guest's serial port until it exits (or `timeout`).

    `first_line` is a regex the first interesting line matches; `stop_at` a regex on a line
    after which the process is stopped with SIGTERM (for guests that never stop by themselves);
    `sampler(pid)` is called every `sample_every` seconds and its results kept with their times.
    """
    first_re = re.compile(first_line)
    stop_re = re.compile(stop_at) if stop_at else None
    output = GuestOutput()
    windows: list[BenchWindow] = []
    samples: list[tuple[float, object]] = []
    stderr_chunks: list[bytes] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=None if env is None else dict(env),
    )
    assert proc.stdout is not None and proc.stderr is not None
    state = RunState(proc.pid, output)
    t_first: float | None = None
    t_done: float | None = None
    pending = b""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    open_streams = 2
    deadline = t0 + timeout
    next_sample = t0
    terminated = False
    rusage = None
    status = 0
    try:
        while open_streams:
            now = time.monotonic()
            if now >= deadline:
                break
            if state.stop and not terminated:
                proc.send_signal(signal.SIGTERM)
                terminated = True
                deadline = min(deadline, now + exit_grace)
            wait = deadline - now
            if sampler is not None:
                if now >= next_sample:
                    samples.append((now - t0, sampler(proc.pid)))
                    next_sample = now + sample_every
                wait = min(wait, max(0.0, next_sample - now))
            for key, _ in sel.select(timeout=min(wait, 0.5)):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                if key.data == "err":
                    stderr_chunks.append(data)
                    continue
                pending += data
                *complete, pending = pending.split(b"\n")
                t = time.monotonic() - t0
                for raw in complete:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    if t_first is None and first_re.search(line):
                        t_first = t
                    event = output.add(line, t)
                    if isinstance(event, BenchStart):
                        windows.append(
                            BenchWindow(event.name, t, cpu_start=proc_cpu_seconds(proc.pid))
                        )
                        windows[-1].fields.update(event.fields)
                    elif isinstance(event, BenchEnd):
                        cpu = proc_cpu_seconds(proc.pid)
                        for w in reversed(windows):
                            if w.name == event.name and w.t_end is None:
                                w.t_end, w.cpu_end = t, cpu
                                w.ops, w.bytes = event.ops, event.bytes
                                w.fields.update(event.fields)
                                break
                    elif isinstance(event, Done) and t_done is None:
                        t_done = t
                        deadline = min(deadline, time.monotonic() + exit_grace)
                    if event is not None and on_event is not None:
                        on_event(event, state)
                    if stop_re is not None and stop_re.search(line):
                        state.stop = True
        if pending:
            output.add(pending.decode("utf-8", "replace"), time.monotonic() - t0)
        # The streams closed (the process is exiting) or the deadline passed.
        while time.monotonic() < deadline + 0.1:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.002)  # polling for the exit; the exit time is taken after this
    finally:
        t_exit = time.monotonic() - t0
        if rusage is None:
            proc.kill()
            _, status, rusage = os.wait4(proc.pid, 0)
            t_exit_or_none: float | None = None
        else:
            t_exit_or_none = t_exit
        proc.returncode = os.waitstatus_to_exitcode(status)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    killed = t_exit_or_none is None
    return VmRun(
        argv=list(argv),
        pid=proc.pid,
        launched=t0,
        output=output,
        first_line=t_first,
        done=t_done,
        exited=t_exit_or_none,
        returncode=None if killed else proc.returncode,
        cpu_user=rusage.ru_utime,
        cpu_sys=rusage.ru_stime,
        max_rss_kib=rusage.ru_maxrss,
        windows=windows,
        stderr=b"".join(stderr_chunks).decode("utf-8", "replace"),
        samples=samples,
    )
