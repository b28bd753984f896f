"""`strato`'s flags, with Cloud Hypervisor's names and syntax."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from strato import __version__
from strato.vmm import options
from strato.vmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    MemoryConfig,
    PayloadConfig,
    VmConfig,
)
from strato.vmm.landlock import parse_rule as parse_landlock_rule
from strato.vmm.stop import EXIT_CONFIG_ERROR


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG_ERROR, f"strato: error: {message}\n")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="strato",
        description="strato: a virtual machine monitor on KVM with Cloud Hypervisor's interface",
        allow_abbrev=False,
    )
    p.add_argument("--kernel", metavar="PATH", help="kernel: bzImage or ELF vmlinux with PVH entry")
    p.add_argument("--initramfs", metavar="PATH", help="initramfs (cpio archive)")
    p.add_argument("--cmdline", metavar="STRING", help="kernel command line")
    p.add_argument(
        "--firmware", metavar="PATH", help="firmware: not supported yet (refused; use --kernel)"
    )
    p.add_argument("--cpus", default="boot=1", metavar="boot=N[,max=N]", help="vCPUs (boot=1)")
    p.add_argument(
        "--memory", default="size=512M", metavar="size=SIZE[,shared=on]", help="RAM (size=512M)"
    )
    p.add_argument(
        "--serial",
        default="null",
        metavar="off|null|tty|file=PATH",
        help="the 16550 on COM1 (null)",
    )
    p.add_argument(
        "--console",
        default="tty",
        metavar="off|null|tty|file=PATH",
        help="the virtio console (tty)",
    )
    p.add_argument(
        "--disk",
        action="append",
        default=[],
        metavar="path=PATH[,...]",
        help="a virtio-blk disk (repeatable)",
    )
    p.add_argument(
        "--net",
        action="append",
        default=[],
        metavar="tap=NAME[,...]",
        help="a virtio-net device on a tap (repeatable)",
    )
    p.add_argument("--rng", metavar="src=PATH", help="a virtio-rng device")
    p.add_argument("--api-socket", metavar="path=PATH|fd=N", help="serve the REST API")
    p.add_argument(
        "--event-monitor",
        metavar="path=PATH|fd=N",
        help="write Cloud Hypervisor's JSON events (vm booted, shutdown, reboot, ...)",
    )
    p.add_argument(
        "--seccomp",
        default="true",
        choices=["true", "false", "log"],
        help="seccomp filtering (true)",
    )
    p.add_argument(
        "--landlock",
        nargs="?",
        const="on",
        choices=["on", "off"],
        metavar="on|off",
        help="restrict strato's file access to its configuration's paths (landlock): on by "
        "default without --api-socket where the kernel has it; opt-in with --api-socket",
    )
    p.add_argument(
        "--landlock-rules",
        action="extend",
        nargs="+",
        default=[],
        metavar="path=PATH,access=r|w|rw",
        help="with --landlock: more paths strato may use (repeatable)",
    )
    p.add_argument(
        "--no-shutdown",
        action="store_true",
        help="with --api-socket: keep the VMM running after the guest stops",
    )
    p.add_argument(
        "--no-reboot", action="store_true", help="exit instead of rebooting when the guest resets"
    )
    p.add_argument(
        "--log-file", metavar="PATH", help="append strato's log to PATH instead of stderr"
    )
    p.add_argument(
        "-v", action="count", default=0, dest="verbose", help="more log output (repeatable)"
    )
    p.add_argument("-V", "--version", action="version", version=f"strato {__version__}")
    return p


def config_from_args(ns: argparse.Namespace) -> VmConfig:
    """Turn parsed flags into a VmConfig; ConfigError names the flag and value."""
    cpus: CpusConfig = options.parse_cpus(ns.cpus)
    memory: MemoryConfig = options.parse_memory(ns.memory)
    serial: ConsoleConfig = options.parse_console("serial", ns.serial)
    console: ConsoleConfig = options.parse_console("console", ns.console)
    if serial.mode is ConsoleMode.TTY and console.mode is ConsoleMode.TTY:
        raise ConfigError("--serial tty and --console tty: only one of them can use the terminal")
    for flag, text in (("--kernel", ns.kernel), ("--initramfs", ns.initramfs),
                       ("--cmdline", ns.cmdline), ("--firmware", ns.firmware)):  # fmt: skip
        if text is not None and "\x00" in text:
            raise ConfigError(f"{flag}: must not contain a NUL character")
    payload = PayloadConfig(
        kernel=Path(ns.kernel) if ns.kernel else None,
        cmdline=ns.cmdline,
        initramfs=Path(ns.initramfs) if ns.initramfs else None,
        firmware=Path(ns.firmware) if ns.firmware else None,
    )
    if ns.firmware:
        raise ConfigError("--firmware: firmware boot is not supported yet; use --kernel")
    cfg = VmConfig(
        payload=payload,
        cpus=cpus,
        memory=memory,
        serial=serial,
        console=console,
        disks=tuple(options.parse_disk(d) for d in ns.disk),
        net=tuple(options.parse_net(n) for n in ns.net),
        rng=options.parse_rng(ns.rng) if ns.rng is not None else None,
        no_reboot=ns.no_reboot,
        seccomp=ns.seccomp,
        landlock=ns.landlock == "on",
        landlock_rules=tuple(parse_landlock_rule(r) for r in ns.landlock_rules),
    )
    return cfg
