"""2. Memory: the VMM's RSS beyond guest RAM, peak and steady, at 128 MiB and 1 GiB.

Counted as Cloud Hypervisor's `test_memory_overhead` counts it (tests/integration.rs,
`get_vmm_overhead`): the Rss of every mapping in /proc/PID/smaps, except mappings at least as
large as guest memory (the guest RAM mapping, whose Rss only depends on what the guest touched).
/proc/PID/smaps is sampled every 100 ms while the built-in guest runs a block workload (the
data plane is busy: the peak) and then sleeps on its timer for a few seconds (steady: the median
of the samples in the second half of that sleep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.common import (
    Result,
    Results,
    Vm,
    alternate,
    builtin_guest,
    disk_image,
    log,
    median,
    quiet_env,
)
from bench.vmrun import run_vmm

MiB = 1 << 20


@dataclass
class Overhead:
    kib: int  # Rss of the counted mappings
    skipped: list[tuple[str, int, int]] = field(default_factory=list)  # (name, size, rss) KiB


def parse_smaps(text: str, guest_kib: int) -> Overhead:
    """Sum Rss over mappings smaller than guest memory (Cloud Hypervisor's rule)."""
    total = 0
    skipped: list[tuple[str, int, int]] = []
    name = ""
    size = 0
    skip = False
    for line in text.splitlines():
        head = line.split(None, 1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            parts = line.split()
            name = parts[5] if len(parts) > 5 else "[anon]"
            continue
        if line.startswith("Size:"):
            size = int(line.split()[1])
            skip = size >= guest_kib
            continue
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
            if skip:
                skipped.append((name, size, rss))
            else:
                total += rss
    return Overhead(total, skipped)


def smaps_overhead(pid: int, guest_kib: int) -> Overhead | None:
    try:
        with open(f"/proc/{pid}/smaps") as f:
            return parse_smaps(f.read(), guest_kib)
    except (OSError, ValueError):
        return None


def run(results: Results, runs: int, sizes_mib: tuple[int, ...] = (128, 1024)) -> None:
    elf = builtin_guest()
    disk = disk_image(64, "memory-disk.raw")
    env = quiet_env()
    idle_s = 4
    cmdline = (
        "bench=blk-randread,qd=32,seconds=1 bench=blk-seqwrite,bs=1M,seconds=1 "
        f"bench=idle,seconds={idle_s}"
    )
    details: dict[str, dict[str, object]] = {}
    for size in sizes_mib:
        vm = Vm(elf, cmdline=cmdline, memory_mib=size, disk=disk, rng=True)
        log(f"memory: {runs} alternated runs at {size} MiB")
        peak, steady, skipped = measure(vm, size, runs, env)
        for label, values in (("peak", peak), ("steady", steady)):
            results.add(
                Result(
                    "memory",
                    f"{size} MiB guest",
                    f"{label} RSS beyond guest RAM",
                    "MiB",
                    "lower",
                    strato=values["strato"],
                    qemu=values["qemu"],
                    goal="below QEMU",
                )
            )
        details[f"{size}MiB"] = {"excluded_mappings_kib": skipped}
    results.details["memory"] = details


def measure(
    vm: Vm, size: int, runs: int, env: dict[str, str]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, object]]:
    """Peak and steady overhead (MiB) of each VMM over `runs` alternated boots of `vm`."""
    peak: dict[str, list[float]] = {"strato": [], "qemu": []}
    steady: dict[str, list[float]] = {"strato": [], "qemu": []}
    skipped: dict[str, object] = {}

    def once(vmm: str, i: int) -> None:
        r = run_vmm(
            vm.command(vmm),
            timeout=120,
            sampler=lambda pid: smaps_overhead(pid, size * 1024),
            sample_every=0.1,
            env=env,
        )
        w = r.window("idle")
        got = [(t, s) for t, s in r.samples if isinstance(s, Overhead)]
        if not got:
            raise RuntimeError(f"memory: no smaps samples from {vmm}")
        # Only samples while the guest runs: from its first benchmark to the end of its idle
        # period (at exit the RAM mapping goes away and would no longer be excluded).
        first, end = r.windows[0].t_start, w.t_end or w.t_start
        live = [(t, s) for t, s in got if first <= t <= end] or got
        settle = w.t_start + (w.seconds / 2)
        idle = [s for t, s in live if settle <= t]
        peak[vmm].append(max(s.kib for _, s in live) / 1024)
        steady[vmm].append((median([s.kib for s in idle]) or live[-1][1].kib) / 1024)
        skipped[vmm] = (idle or [live[-1][1]])[-1].skipped

    alternate(runs, once)
    return peak, steady, skipped
