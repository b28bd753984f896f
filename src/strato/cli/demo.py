"""strato's main job, for the README: boot the built-in guest and show its report.

The built-in guest (guest/, a PVH program that drives strato's devices from inside the VM)
boots with 2 vCPUs, a disk, an rng and a virtio console, and a network device on a tap when
run as root. It prints one `TEST` line per check on the serial console, and strato exits with
the guest's verdict. `--linux` boots the Debian cloud kernel instead (minutes, on hosts where
KVM emulates guest kernel mode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from strato.vmm.platform import kvm_emulates_kernel_mode
from strato.vmm.stop import StopSignals

LINUX_CMDLINE = "console=ttyS0 slub_debug=F reboot=k panic=1 i8042.noaux"
CONSOLE_ENABLED = b"printk: console [ttyS0] enabled"
DEMO_TAP = "strato-demo0"
CONSOLE_INPUT = b"hello-from-host 42\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="strato-demo", description=__doc__)
    p.add_argument("--linux", action="store_true", help="boot the Debian cloud kernel instead")
    ns = p.parse_args(argv)
    from strato.cli.main import setup_logging

    setup_logging(0, None)
    try:
        return linux_demo() if ns.linux else builtin_demo()
    finally:
        if argv is None:  # the command: its status is decided; no death by signal on exit
            StopSignals.ignore_from_now()


def builtin_demo() -> int:
    from strato.devices.legacy.serial_output import CallbackSink
    from strato.images.builtin import ensure_builtin_guest
    from strato.vmm.config import (
        ConsoleConfig,
        ConsoleMode,
        CpusConfig,
        DiskConfig,
        MemoryConfig,
        NetConfig,
        PayloadConfig,
        RngConfig,
        VmConfig,
    )
    from strato.vmm.runner import run
    from strato.vmm.vm import Vm

    elf = ensure_builtin_guest()
    tap = _make_tap() if os.geteuid() == 0 else None
    tests = "serial,pci,blk,rng,console,irq,smp" + (",net-tx,net-csum" if tap else "")
    with tempfile.TemporaryDirectory(prefix="strato-demo-") as d:
        disk = Path(d) / "disk.raw"
        with disk.open("wb") as f:
            f.truncate(64 << 20)
        console_log = Path(d) / "console.log"
        cfg = VmConfig(
            payload=PayloadConfig(kernel=elf, cmdline=f"tests={tests}"),
            cpus=CpusConfig(boot_vcpus=2, max_vcpus=2),
            memory=MemoryConfig(size=256 << 20),
            serial=ConsoleConfig(ConsoleMode.TTY),
            console=ConsoleConfig(ConsoleMode.FILE, console_log),
            disks=(DiskConfig(path=disk, serial="strato-demo-disk"),),
            net=(NetConfig(tap=tap, mac="52:54:00:12:34:56"),) if tap else (),
            rng=RngConfig(),
            no_reboot=True,
        )
        print(f"strato demo: booting the built-in guest ({elf.name}) with 2 vCPUs, 256 MiB,")
        print(
            "             a 64 MiB disk, an rng, a virtio console"
            + (f" and a network device on tap {tap}" if tap else " (run as root for a tap)")
        )
        print()
        seen = bytearray()

        def on_started(vm: Vm) -> None:
            console = vm.device_manager.console

            def watch(data: bytes) -> None:
                seen.extend(data)
                if b"READY console-rx" in seen and console is not None:
                    console.enqueue_input(CONSOLE_INPUT)
                    del seen[:]

            vm.devices["serial"].add_watcher(watch)

        started = time.monotonic()
        out = CallbackSink(_stdout_write)
        try:
            stop = run(cfg, serial_out=out, on_started=on_started, handle_signals=True)
        finally:
            if tap:
                subprocess.run(["ip", "link", "del", tap], capture_output=True)
        elapsed = time.monotonic() - started
        print()
        print(f"strato demo: the guest's virtio console said: {console_log.read_text().strip()!r}")
    if stop.exit_status == 0:
        print(f"strato demo: every check passed; the guest stopped itself after {elapsed:.2f} s")
    else:
        print(f"strato demo: the guest reported a failure ({stop.message})")
    return stop.exit_status


def _stdout_write(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _make_tap() -> str | None:
    subprocess.run(["ip", "link", "del", DEMO_TAP], capture_output=True)
    r = subprocess.run(
        ["ip", "tuntap", "add", "dev", DEMO_TAP, "mode", "tap"], capture_output=True, text=True
    )
    if r.returncode != 0:
        print(f"strato demo: no tap ({r.stderr.strip()}); running without a network device")
        return None
    subprocess.run(["ip", "link", "set", DEMO_TAP, "up"], capture_output=True)
    return DEMO_TAP


def linux_demo() -> int:
    from strato.images import ensure_default_guest
    from strato.vmm.config import (
        ConsoleConfig,
        ConsoleMode,
        MemoryConfig,
        PayloadConfig,
        VmConfig,
    )
    from strato.vmm.runner import run

    guest = ensure_default_guest()
    emulated = kvm_emulates_kernel_mode()
    print(f"strato demo: booting Debian {guest.kernel.version} (PVH entry) with 128 MiB")
    if emulated:
        print(
            "strato demo: this host's KVM emulates guest kernel mode, so expect ~2 minutes of\n"
            "             boot log and then an emulation failure in the kernel's FPU set-up."
        )
    seen = bytearray()

    def tee(data: bytes) -> None:
        seen.extend(data)
        _stdout_write(data)

    from strato.devices.legacy.serial_output import CallbackSink

    cfg = VmConfig(
        payload=PayloadConfig(
            kernel=guest.kernel.vmlinux, initramfs=guest.initramfs, cmdline=LINUX_CMDLINE
        ),
        memory=MemoryConfig(size=128 << 20),
        serial=ConsoleConfig(ConsoleMode.TTY),
        console=ConsoleConfig(ConsoleMode.OFF),
        no_reboot=True,
    )
    stop = run(cfg, serial_out=CallbackSink(tee), handle_signals=True)
    print()
    if guest.marker.encode() in seen:
        print("strato demo: the guest reached userspace and reported: OK")
        return 0
    if emulated and CONSOLE_ENABLED in seen:
        print(
            "strato demo: the kernel booted to its serial console (as far as a kernel gets on "
            "this host); strato works."
        )
        return 0
    print(f"strato demo: the guest did not get as far as expected ({stop.message})")
    return stop.exit_status or 1


if __name__ == "__main__":
    sys.exit(main())
