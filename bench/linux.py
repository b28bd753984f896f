"""6. Linux boot: the Debian cloud kernel (bzImage) to `printk: console [ttyS0] enabled`.

Both VMMs get the same bzImage, initramfs and command line (`python -m strato.images --json`
names them; the command line adds `slub_debug=F`, without which this host's PVM emulator stops
the kernel before its console, see docs/ARCHITECTURE.md). QEMU runs `-M q35` through qboot.
Each boot is stopped with SIGTERM once the line is out. Where guest kernel code is emulated
(PVM) this takes minutes per boot, so the suite runs it only with --linux or --all.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import Result, Results, Vm, alternate, log, quiet_env
from bench.vmrun import run_vmm

CONSOLE_ENABLED = r"console \[ttyS0\] enabled"
CMDLINE = "console=ttyS0 slub_debug=F reboot=k panic=1 i8042.noaux"


def images() -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "strato.images", "--json"],
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    ).stdout
    data: dict[str, str] = json.loads(out)
    return data


def run(results: Results, runs: int, timeout: float = 1200.0) -> None:
    img = images()
    vm = Vm(
        Path(img["bzimage"]),
        cmdline=CMDLINE,
        memory_mib=256,
        initramfs=Path(img["initramfs"]),
    )
    env = quiet_env()
    wall: dict[str, list[float]] = {"strato": [], "qemu": []}
    cpu: dict[str, list[float]] = {"strato": [], "qemu": []}

    def once(vmm: str, i: int) -> None:
        log(f"linux: booting under {vmm} (minutes where kernel code is emulated)")
        r = run_vmm(
            vm.command(vmm),
            timeout=timeout,
            first_line=CONSOLE_ENABLED,
            stop_at=CONSOLE_ENABLED,
            env=env,
        )
        if r.first_line is None:
            tail = "\n".join(r.output.lines[-20:])
            raise RuntimeError(
                f"linux: {vmm} never enabled its console:\n{tail}\n{r.stderr[-2000:]}"
            )
        wall[vmm].append(r.first_line)
        cpu[vmm].append(r.cpu)

    log(f"linux: {runs} alternated boots per VMM of {img.get('kernel_version', 'the kernel')}")
    alternate(runs, once)
    note = f"{img.get('kernel_version', '')} bzImage, QEMU -M q35 + qboot"
    results.add(
        Result(
            "linux",
            "Debian kernel",
            "launch to console enabled",
            "s",
            "lower",
            strato=wall["strato"],
            qemu=wall["qemu"],
            note=note,
        )
    )
    results.add(
        Result(
            "linux",
            "Debian kernel",
            "CPU time to console",
            "s",
            "lower",
            strato=cpu["strato"],
            qemu=cpu["qemu"],
            note=note,
        )
    )
