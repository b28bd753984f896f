"""strato's default Linux guest: Debian's cloud kernel plus a busybox initramfs.

The initramfs holds busybox (with applet symlinks), /dev/console, the virtio modules the
cloud kernel builds as modules (with their dependencies, loaded in order), and an /init
script that prints ``STRATO-GUEST-OK``, a short report of what the guest sees (one
``strato-guest: ...`` line each), ``STRATO-GUEST-END``, then powers off. With
``strato.shell`` on the kernel command line it starts a shell on the console after the
report and powers off when that shell exits.

The default command line is ``console=ttyS0 reboot=k panic=1``: the console on the first
16550 UART; reboot through the keyboard controller, so that without ACPI the final
``poweroff -f`` (which falls back to a reboot or panic) ends the VM promptly under
``--no-reboot``; and a panic reboots after 1 second instead of hanging.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from strato.images.cache import cache_lock, cache_root, staging_dir
from strato.images.cpio import CpioWriter
from strato.images.debian import DebianKernel, ensure_busybox, ensure_debian_kernel
from strato.images.kmod import KernelModule, module_closure, read_module

MARKER = "STRATO-GUEST-OK"
END_MARKER = "STRATO-GUEST-END"
DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1"
# Drivers for strato's virtio devices (virtio_mmio for the MMIO transport; it needs no
# command line option when the devices are described in ACPI).
DEFAULT_MODULES = (
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
)
BUSYBOX_APPLETS = (
    "sh", "ash", "mount", "umount", "insmod", "rmmod", "lsmod", "modprobe", "poweroff",
    "reboot", "halt", "echo", "cat", "ls", "grep", "tr", "uname", "basename", "readlink",
    "sleep", "dmesg", "mkdir", "ps", "free", "ip", "ifconfig", "hexdump", "dd", "head", "tail",
    "sync", "setsid", "cttyhack", "sed", "awk", "cut", "wc", "test", "[", "true", "false", "uptime",
    "mdev", "blockdev", "df", "stat", "cp", "mv", "rm", "ln", "touch", "md5sum", "sha256sum",
    "nproc", "date", "env", "vi",
)  # fmt: skip
# The code that decides the archive's content: a change to it rebuilds cached guests.
_RECIPE_SOURCES = ("initramfs.py", "cpio.py", "kmod.py")


@dataclass(frozen=True)
class DefaultGuest:
    kernel: DebianKernel
    initramfs: Path
    cmdline: str
    marker: str = MARKER  # printed on the console once /init runs
    end_marker: str = END_MARKER  # printed after the report, just before power off


def init_script(modules: Sequence[KernelModule], kernel_version: str) -> str:
    """The guest's /init: mount, load ``modules`` in order, report, power off."""
    base = f"/lib/modules/{kernel_version}"
    insmods = "\n".join(
        f"insmod {base}/{m.relpath} || echo 'strato-guest: insmod {m.name} failed'" for m in modules
    )
    return f"""#!/bin/sh
# /init of strato's default guest (PID 1), written by strato.images.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /tmp
{insmods}
echo {MARKER}
echo "strato-guest: kernel=$(uname -r)"
echo "strato-guest: cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "strato-guest: mem_total_kb=$(grep ^MemTotal: /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
for d in /sys/bus/virtio/devices/*; do
    [ -e "$d" ] || continue
    drv=none
    [ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
    echo "strato-guest: virtio $(basename "$d") device=$(cat "$d/device") driver=$drv"
done
echo "strato-guest: block=$(ls /sys/block | tr '\\n' ' ')"
echo "strato-guest: net=$(ls /sys/class/net | tr '\\n' ' ')"
echo "strato-guest: hwrng=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)"
echo {END_MARKER}
case " $(cat /proc/cmdline) " in
*" strato.shell "*) setsid cttyhack sh ;;
esac
sync
poweroff -f
"""


def modules_dep(modules: Sequence[KernelModule]) -> str:
    """A modules.dep for ``modules`` (given dependencies first), as depmod writes it.

    Each line lists the module's whole dependency closure, the one to load last first:
    modprobe loads the list from its end and does not recurse.
    """
    position = {m.name: i for i, m in enumerate(modules)}
    by_name = {m.name: m for m in modules}
    lines = []
    for module in modules:
        closure: set[str] = set()
        pending = [d.replace("-", "_") for d in module.depends]
        while pending:
            name = pending.pop()
            if name not in closure:
                closure.add(name)
                pending.extend(d.replace("-", "_") for d in by_name[name].depends)
        deps = [by_name[n].relpath for n in sorted(closure, key=position.__getitem__, reverse=True)]
        lines.append(f"{module.relpath}: {' '.join(deps)}".rstrip())
    return "".join(line + "\n" for line in lines)


def write_initramfs(
    out_path: Path, kernel: DebianKernel, busybox: Path, module_names: Sequence[str]
) -> None:
    """Write the default guest's uncompressed newc initramfs to ``out_path``.

    Uncompressed because decompression is guest kernel code, which is slow where KVM
    emulates it; the archive is a few MiB.
    """
    modules = module_closure(kernel.modules_dir, module_names)
    base = f"lib/modules/{kernel.version}"
    with out_path.open("wb") as f, CpioWriter(f) as cpio:
        for d in ("bin", "dev", "proc", "sys", "tmp", "root", "mnt", "etc", "lib", "run"):
            cpio.add_dir(d, 0o1777 if d == "tmp" else 0o755)
        cpio.add_symlink("sbin", "bin")
        cpio.add_device("dev/console", 0o600, 5, 1)
        cpio.add_device("dev/null", 0o666, 1, 3)
        cpio.add_file("bin/busybox", busybox, 0o755)
        for applet in BUSYBOX_APPLETS:
            cpio.add_symlink(f"bin/{applet}", "busybox")
        for module in modules:
            cpio.add_file(f"{base}/{module.relpath}", read_module(module.path), 0o644)
        # So that busybox modprobe works in the guest too.
        cpio.add_file(f"{base}/modules.dep", modules_dep(modules).encode())
        cpio.add_file("init", init_script(modules, kernel.version).encode(), 0o755)


def _guest_key(kernel: DebianKernel, busybox: Path, module_names: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for part in (kernel.version, ",".join(module_names)):
        digest.update(part.encode() + b"\0")
    for source in _RECIPE_SOURCES:
        digest.update((Path(__file__).parent / source).read_bytes())
    digest.update(busybox.read_bytes())
    return f"{kernel.version}-{digest.hexdigest()[:16]}"


def _prune_guests(guests: Path, keep: Path, count: int = 4) -> None:
    """Keep the ``count`` newest guests: each build of changed code adds one."""
    entries = sorted(guests.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    for entry in entries[count:]:
        if entry != keep:
            shutil.rmtree(entry, ignore_errors=True)


def ensure_default_guest(cache_dir: Path | None = None, *, refresh: bool = False) -> DefaultGuest:
    """The default guest (kernel, initramfs, command line), from the cache or built now."""
    root = cache_root(cache_dir)
    kernel = ensure_debian_kernel(root, refresh=refresh)
    busybox = ensure_busybox(root, refresh=refresh)
    final = root / "guests" / _guest_key(kernel, busybox, DEFAULT_MODULES) / "initramfs.cpio"
    if not final.is_file():
        with cache_lock(root), staging_dir(root) as staging:
            if not final.is_file():
                staged = staging / "initramfs.cpio"
                write_initramfs(staged, kernel, busybox, DEFAULT_MODULES)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, final)
                _prune_guests(root / "guests", keep=final.parent)
    return DefaultGuest(kernel=kernel, initramfs=final, cmdline=DEFAULT_CMDLINE)
