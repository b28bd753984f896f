"""3. Exit cost: the built-in guest does N port-I/O and N MMIO writes; time per exit.

- `pio-exits`: `outl` to 0xCF8 (PCI CONFIG_ADDRESS; QEMU's q35 registers it as coalesced PIO,
  so KVM buffers those writes and QEMU's userspace never sees the exit), and `outb` to the
  16550's scratch register (0x3FF), a userspace exit on both;
- `mmio-exits`: a 32-bit write to the first virtio device's `device_feature_select`
  (virtio-pci common configuration, implemented by both);
- `mmio-exits` at an unassigned address (0xd0000000: no device in either VMM's layout), the
  "nobody is there" path.

Each loop is timed by the guest's TSC (`guest_us`), so the time per exit is the full round trip:
guest -> KVM -> the VMM's dispatch and device -> KVM_RUN again. The VMM's CPU time per exit
comes from /proc/PID/stat around the loop.
"""

from __future__ import annotations

from bench.common import Result, Results, Vm, alternate, builtin_guest, log, quiet_env
from bench.vmrun import run_vmm

UNASSIGNED_MMIO = 0xD000_0000
COM1_SCRATCH = 0x3FF
# (guest bench, nth of that name in the run, label, extra bench parameters)
CASES = (
    ("pio-exits", 0, "port I/O (0xcf8)", ""),
    ("pio-exits", 1, "port I/O (COM1 scratch)", f",port={COM1_SCRATCH:#x},size=1"),
    ("mmio-exits", 0, "MMIO (virtio register)", ""),
    ("mmio-exits", 1, "MMIO (unassigned)", f",addr={UNASSIGNED_MMIO:#x}"),
)


def run(results: Results, runs: int, count: int = 100_000) -> None:
    elf = builtin_guest()
    cmdline = " ".join(f"bench={name},ops={count}{extra}" for name, _, _, extra in CASES)
    vm = Vm(elf, cmdline=cmdline, memory_mib=128, rng=True)
    env = quiet_env()
    ns: dict[str, dict[str, list[float]]] = {c[2]: {"strato": [], "qemu": []} for c in CASES}
    cpu: dict[str, dict[str, list[float]]] = {c[2]: {"strato": [], "qemu": []} for c in CASES}

    def once(vmm: str, i: int) -> None:
        r = run_vmm(vm.command(vmm), timeout=300, env=env)
        for name, nth, label, _ in CASES:
            w = r.window(name, nth)
            ns[label][vmm].append(w.guest_seconds / w.ops * 1e9)
            if w.cpu_seconds is not None:
                cpu[label][vmm].append(w.cpu_seconds / w.ops * 1e9)

    log(f"exits: {runs} alternated runs, {count} exits of each kind")
    alternate(runs, once)
    for _, _, label, _ in CASES:
        results.add(
            Result(
                "exits",
                label,
                "time per exit",
                "ns",
                "lower",
                strato=ns[label]["strato"],
                qemu=ns[label]["qemu"],
                goal="no worse than QEMU",
                note="QEMU registers 0xcf8 as coalesced PIO: its writes never reach QEMU's "
                "userspace (the other rows are userspace exits on both)"
                if "0xcf8" in label
                else "",
            )
        )
        results.add(
            Result(
                "exits",
                label,
                "VMM CPU per exit",
                "ns",
                "lower",
                strato=cpu[label]["strato"],
                qemu=cpu[label]["qemu"],
            )
        )
