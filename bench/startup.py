"""1. Start-up: process launch to the guest's first line and to the process exit, wall and CPU.

The guest is `bench/guests/startup.S`: a PVH entry, one line on COM1, a reset. strato is
compared with QEMU `-M microvm` (PVH straight from `-kernel`, the minimal QEMU machine) and with
`-M q35` booting through qboot (the machine the device benchmarks use). CPU time is the whole
process' user + system time (wait4's rusage: every thread, start to exit).

strato's own start-up is broken down by a second, instrumented launch (`strato_probe.py`):
interpreter, imports, configuration, VM creation, devices, loading, vCPU set-up, first KVM_RUN,
then the guest up to its line and the way out.
"""

from __future__ import annotations

import compileall
import os
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    BENCH,
    ROOT,
    Result,
    Results,
    Vm,
    alternate,
    log,
    median,
    quiet_env,
    startup_guest,
)
from bench.vmrun import VmRun, run_vmm

FIRST_LINE = r"STARTUP hello"
QEMU_MACHINES = ("microvm", "q35")
STEPS = ("interpreter", "imports", "config", "vm", "devices", "load", "vcpus", "first KVM_RUN")


def probe_breakdown(run: VmRun) -> dict[str, float]:
    """Milliseconds spent in each step of strato's start-up, from a strato_probe.py run."""
    marks: dict[str, float] = {}
    for line in run.stderr.splitlines():
        if line.startswith("STRATO-PROBE "):
            step, ns = line[len("STRATO-PROBE ") :].rsplit(" ", 1)
            marks[step] = int(ns) / 1e9 - run.launched
    out: dict[str, float] = {}
    prev = 0.0
    for step in STEPS:
        if step in marks:
            out[step] = (marks[step] - prev) * 1e3
            prev = marks[step]
    if run.first_line is not None:
        out["guest to first line"] = (run.first_line - prev) * 1e3
        if run.exited is not None:
            out["first line to exit"] = (run.exited - run.first_line) * 1e3
    return out


def compile_strato() -> Path:
    """Byte-compile strato as an install does (pip writes .pyc files; an editable checkout run
    with PYTHONDONTWRITEBYTECODE=1, as on these machines, would otherwise compile every module
    on every launch: about 60 ms of CPU here). Returns the source directory compiled."""
    src = Path(os.environ.get("STRATO_BENCH_SRC") or ROOT / "src") / "strato"
    compileall.compile_dir(str(src), quiet=1)
    return src


def run(results: Results, runs: int) -> None:
    compiled = compile_strato()
    elf = startup_guest()
    vm = Vm(elf, memory_mib=128)
    env = quiet_env()
    kinds = ["strato", *(f"qemu-{m}" for m in QEMU_MACHINES)]
    samples: dict[str, dict[str, list[float]]] = {
        k: {"first": [], "exit": [], "cpu": []} for k in kinds
    }
    breakdowns: list[dict[str, float]] = []

    def once(kind: str, i: int) -> None:
        if kind == "strato":
            argv = vm.strato()
        else:
            vm.qemu_machine = kind.split("-", 1)[1]
            argv = vm.qemu()
        r = run_vmm(argv, timeout=60, first_line=FIRST_LINE, env=env)
        if r.first_line is None or r.exited is None:
            raise RuntimeError(
                f"start-up guest failed under {kind}:\n{r.output.text()}\n{r.stderr}"
            )
        samples[kind]["first"].append(r.first_line * 1e3)
        samples[kind]["exit"].append(r.exited * 1e3)
        samples[kind]["cpu"].append(r.cpu * 1e3)
        if kind == "strato":
            probe = run_vmm(
                [sys.executable, str(BENCH / "strato_probe.py"), *vm.strato()[3:]],
                timeout=60,
                first_line=FIRST_LINE,
                env=env,
            )
            breakdowns.append(probe_breakdown(probe))

    log(f"start-up: {runs} alternated runs of strato, QEMU microvm, QEMU q35")
    alternate(runs, once, kinds)
    for machine in QEMU_MACHINES:
        q = samples[f"qemu-{machine}"]
        s = samples["strato"]
        note = f"QEMU -M {machine}" + (" (qboot)" if machine == "q35" else " (PVH, no firmware)")
        for key, metric in (
            ("first", "launch to first line"),
            ("exit", "launch to exit"),
            ("cpu", "CPU time (user+sys)"),
        ):
            results.add(
                Result(
                    "startup",
                    f"vs {machine}",
                    metric,
                    "ms",
                    "lower",
                    strato=s[key],
                    qemu=q[key],
                    goal="below QEMU",
                    note=note,
                )
            )
    steps: dict[str, Any] = {}
    for step in (*STEPS, "guest to first line", "first line to exit"):
        vals = [b[step] for b in breakdowns if step in b]
        steps[step] = median(vals)
    results.details["startup_breakdown_ms"] = steps
    results.details["startup_samples_ms"] = samples
    results.details["startup_bytecode"] = f"{compiled} byte-compiled before measuring"
