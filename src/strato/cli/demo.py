"""strato's main job, for the README: boot the default guest and show its console.

The default guest is the Debian cloud kernel with strato's busybox initramfs (built and cached
by `strato.images`). On hosts with hardware virtualization it boots to the initramfs, which
prints a report and powers off. Where KVM emulates guest kernel mode (PVM) the kernel gets as
far as its serial console and then stops at an emulation failure; the demo says so.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from strato.vmm.platform import kvm_emulates_kernel_mode

CMDLINE = "console=ttyS0 slub_debug=F reboot=k panic=1 i8042.noaux"
CONSOLE_ENABLED = b"printk: console [ttyS0] enabled"


def main(argv: list[str] | None = None) -> int:
    from strato.images import ensure_default_guest

    guest = ensure_default_guest()
    emulated = kvm_emulates_kernel_mode()
    args = [
        "--kernel", str(guest.kernel.vmlinux),
        "--initramfs", str(guest.initramfs),
        "--cmdline", CMDLINE,
        "--cpus", "boot=1",
        "--memory", "size=128M",
        "--console", "off",
        "--no-reboot",
        *(argv if argv is not None else sys.argv[1:]),
    ]  # fmt: skip
    print(f"strato demo: booting Debian {guest.kernel.version} (PVH entry) with 128 MiB")
    if emulated:
        print(
            "strato demo: this host's KVM emulates guest kernel mode, so expect ~2 minutes of\n"
            "             boot log and then an emulation failure in the kernel's FPU set-up."
        )
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "serial.log"
        # Show the console live on the terminal and keep a copy to judge the result.
        status = _run_tee(args, log)
        seen = log.read_bytes() if log.exists() else b""
    if guest.marker.encode() in seen:
        print("strato demo: the guest reached userspace and reported: OK")
        return 0
    if emulated and CONSOLE_ENABLED in seen:
        print(
            "strato demo: the kernel booted to its serial console (as far as a kernel gets on "
            "this host); strato works."
        )
        return 0
    print(f"strato demo: the guest did not get as far as expected (strato exit status {status})")
    return status or 1


def _run_tee(args: list[str], log: Path) -> int:
    from strato.cli.args import build_parser, config_from_args
    from strato.devices.legacy.serial_output import CallbackSink
    from strato.vmm.config import ConsoleConfig, ConsoleMode
    from strato.vmm.runner import run

    ns = build_parser().parse_args([*args, "--serial", "null"])
    cfg = config_from_args(ns)
    cfg = type(cfg)(**{**cfg.__dict__, "serial": ConsoleConfig(ConsoleMode.FILE, log)})
    out = log.open("wb")

    def tee(data: bytes) -> None:
        out.write(data)
        out.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    try:
        stop = run(cfg, serial_out=CallbackSink(tee), handle_signals=True)
    finally:
        out.close()
    if stop.is_crash:
        print(f"\nstrato: the guest stopped: {stop.message}")
    return stop.exit_status


if __name__ == "__main__":
    sys.exit(main())
