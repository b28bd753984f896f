"""4. Block: the built-in guest's virtio-blk workloads on one raw file, and the host's own limit.

Workloads (one boot runs them all, each for `seconds`): 4 KiB random read and write at queue
depth 1 and 32, 1 MiB sequential read and write at depth 1 and 4, over the whole image. Both VMMs
use the same file with the host page cache (strato's default; QEMU's default cache=writeback,
aio=threads). Reported: IOPS (4 KiB) or MB/s (1 MiB), and the VMM's CPU time per I/O from
/proc/PID/stat between BENCH-START and BENCH-END. The host limit is the same pattern done by this
process with os.preadv/os.pwritev on the same file, one synchronous call per I/O
(bench/blk_host.py's baseline).
"""

from __future__ import annotations

import os

from bench.blk_host import run_baseline
from bench.common import (
    MiB,
    Result,
    Results,
    Vm,
    alternate,
    builtin_guest,
    disk_image,
    log,
    quiet_env,
)
from bench.vmrun import run_vmm

KiB = 1 << 10
DISK_MIB = 256

# (guest bench word, label, host baseline workload, block size)
CASES = (
    ("blk-randread,qd=1,bs=4096", "randread 4k qd1", "rand-read", 4 * KiB),
    ("blk-randread,qd=32,bs=4096", "randread 4k qd32", "rand-read", 4 * KiB),
    ("blk-randwrite,qd=1,bs=4096", "randwrite 4k qd1", "rand-write", 4 * KiB),
    ("blk-randwrite,qd=32,bs=4096", "randwrite 4k qd32", "rand-write", 4 * KiB),
    ("blk-seqread,qd=1,bs=1M", "seqread 1M qd1", "seq-read", MiB),
    ("blk-seqread,qd=4,bs=1M", "seqread 1M qd4", "seq-read", MiB),
    ("blk-seqwrite,qd=1,bs=1M", "seqwrite 1M qd1", "seq-write", MiB),
    ("blk-seqwrite,qd=4,bs=1M", "seqwrite 1M qd4", "seq-write", MiB),
)


def host_case(label: str) -> str:
    """The case whose host baseline stands for `label` (the baseline is synchronous: qd1)."""
    return label.replace("qd32", "qd1").replace("qd4", "qd1")


def _rate(ops: int, nbytes: int, seconds: float, block: int) -> float:
    """IOPS for 4 KiB workloads, MB/s (10^6) for 1 MiB ones."""
    if seconds <= 0:
        return 0.0
    return ops / seconds if block < MiB else nbytes / seconds / 1e6


def run(results: Results, runs: int, seconds: int = 3) -> None:
    elf = builtin_guest()
    disk = disk_image(DISK_MIB, "block-disk.raw")
    cmdline = " ".join(f"bench={word},seconds={seconds}" for word, *_ in CASES)
    vm = Vm(elf, cmdline=cmdline, memory_mib=256, disk=disk, rng=True)
    env = quiet_env()
    rate: dict[str, dict[str, list[float]]] = {c[1]: {"strato": [], "qemu": []} for c in CASES}
    cpu: dict[str, dict[str, list[float]]] = {c[1]: {"strato": [], "qemu": []} for c in CASES}
    host_rate: dict[str, list[float]] = {c[1]: [] for c in CASES}
    host_cpu: dict[str, list[float]] = {c[1]: [] for c in CASES}

    def once(vmm: str, i: int) -> None:
        r = run_vmm(vm.command(vmm), timeout=60 + 10 * seconds * len(CASES), env=env)
        if r.output.failures():
            raise RuntimeError(f"block: {vmm} failed: {r.output.failures()}")
        counts: dict[str, int] = {}
        for word, label, _, block in CASES:
            name = word.split(",", 1)[0]
            nth = counts.get(name, 0)
            counts[name] = nth + 1
            w = r.window(name, nth)
            if w.fields.get("errors", "0") != "0":
                raise RuntimeError(f"block: {vmm} {label}: {w.fields['errors']} errors")
            rate[label][vmm].append(_rate(w.ops, w.bytes, w.guest_seconds, block))
            if w.cpu_seconds is not None and w.ops:
                cpu[label][vmm].append(w.cpu_seconds / w.ops * 1e6)
        if vmm == "qemu":  # the host's limit once per round, between the VMMs
            for _, label, workload, block in CASES:
                if host_case(label) != label:
                    continue  # synchronous calls: queue depth means nothing to the baseline
                t0 = os.times()
                res = run_baseline(
                    str(disk), workload, block, min(seconds, 2), False, DISK_MIB * MiB
                )
                t1 = os.times()
                used = (t1.user - t0.user) + (t1.system - t0.system)
                host_rate[label].append(
                    _rate(res.requests, res.requests * block, res.seconds, block)
                )
                host_cpu[label].append(used / res.requests * 1e6)

    log(f"block: {runs} alternated runs, {len(CASES)} workloads x {seconds} s each")
    alternate(runs, once)
    for _, label, _, block in CASES:
        base = host_case(label)
        seq = block >= MiB
        results.add(
            Result(
                "block",
                label,
                "MB/s" if seq else "IOPS",
                "MB/s" if seq else "IOPS",
                "higher",
                strato=rate[label]["strato"],
                qemu=rate[label]["qemu"],
                host=host_rate[base],
                goal="at least QEMU" + ("; within 10% of the host" if seq else ""),
                note="host: one os.preadv/pwritev per I/O"
                + ("" if label == base else " (synchronous, i.e. qd1)"),
            )
        )
        results.add(
            Result(
                "block",
                label,
                "VMM CPU per I/O",
                "us",
                "lower",
                strato=cpu[label]["strato"],
                qemu=cpu[label]["qemu"],
                host=host_cpu[base],
            )
        )
