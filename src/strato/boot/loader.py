"""Pick the right loader for a kernel file by its magic."""

from __future__ import annotations

from collections.abc import Iterable

from strato.boot._image import ImageSource, open_image, read_at
from strato.boot.bootparams import HDRS_MAGIC
from strato.boot.bzimage import load_bzimage
from strato.boot.cmdline import Cmdline
from strato.boot.elf import ELF_MAGIC, load_elf_pvh
from strato.boot.errors import BootError
from strato.boot.layout import LAYOUT, X86Layout
from strato.boot.result import BootMode, LoadedKernel
from strato.memory import GuestMemory

__all__ = ["BootMode", "LoadedKernel", "detect_boot_mode", "load_kernel"]


def detect_boot_mode(kernel: ImageSource) -> BootMode:
    """LINUX64 for a bzImage ("HdrS" at 0x202), PVH for an ELF file."""
    with open_image(kernel, "kernel") as (f, name):
        head = read_at(f, 0, 0x206)
    if head[:4] == ELF_MAGIC:
        return BootMode.PVH
    if len(head) == 0x206 and int.from_bytes(head[0x202:0x206], "little") == HDRS_MAGIC:
        return BootMode.LINUX64
    raise BootError(f"{name} is neither a bzImage nor an ELF kernel")


def load_kernel(
    mem: GuestMemory,
    kernel: ImageSource,
    cmdline: bytes | str | Cmdline,
    initramfs: ImageSource | None = None,
    layout: X86Layout = LAYOUT,
    *,
    rsdp_addr: int = 0,
    reserved: Iterable[tuple[int, int]] = (),
) -> LoadedKernel:
    """Load a bzImage (64-bit boot protocol) or an ELF kernel (PVH), whichever `kernel` is."""
    mode = detect_boot_mode(kernel)
    load = load_bzimage if mode is BootMode.LINUX64 else load_elf_pvh
    return load(mem, kernel, cmdline, initramfs, layout, rsdp_addr=rsdp_addr, reserved=reserved)
