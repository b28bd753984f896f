"""What a kernel loader leaves in guest memory and what the boot vCPU needs to know."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from strato.boot.e820 import E820Entry

__all__ = ["BootMode", "LoadedKernel"]


class BootMode(Enum):
    LINUX64 = "linux64"  # bzImage 64-bit boot protocol: long mode, RSI = zero page
    PVH = "pvh"  # PVH ELF entry: 32-bit protected mode, paging off, EBX = hvm_start_info


@dataclass(frozen=True)
class LoadedKernel:
    mode: BootMode
    entry: int  # guest physical address for RIP
    boot_info: int  # zero page (goes in RSI, LINUX64) or hvm_start_info (goes in EBX, PVH)
    kernel_start: int  # lowest guest address the kernel image occupies
    kernel_end: int  # first byte after all memory the kernel claims (init_size / p_memsz)
    cmdline_addr: int
    cmdline_size: int  # bytes, without the terminating NUL
    initramfs_addr: int = 0
    initramfs_size: int = 0
    rsdp_addr: int = 0
    e820: tuple[E820Entry, ...] = field(default=())
    protocol_version: int = 0  # bzImage boot protocol (e.g. 0x20f); 0 for PVH
