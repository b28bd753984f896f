"""x86_64 boot: kernel loaders, zero page / PVH start info, boot vCPU state, CPUID, MP table.

Pure: nothing here touches KVM. Loaders write into a `GuestMemory` and return plain data
(`LoadedKernel`, `BootCpuState`, `CpuidEntry`) that the VMM applies to its vCPUs.
"""

from strato.boot.bzimage import load_bzimage
from strato.boot.cmdline import Cmdline
from strato.boot.cpu_state import (
    BootCpuState,
    BootFpu,
    BootRegisters,
    BootSpecialRegisters,
    boot_cpu_state,
    boot_msrs,
    boot_registers,
    boot_special_registers,
)
from strato.boot.cpuid import CpuidEntry, patch_cpuid
from strato.boot.e820 import E820Entry, E820Type, build_e820
from strato.boot.elf import load_elf_pvh
from strato.boot.errors import BootError
from strato.boot.gdt import BootSegments, Segment, boot_segments, write_boot_gdt
from strato.boot.loader import BootMode, LoadedKernel, detect_boot_mode, load_kernel
from strato.boot.mptable import build_mptable, write_mptable
from strato.boot.paging import write_identity_page_tables
from strato.boot.setup import setup_boot_cpu

__all__ = [
    "BootCpuState",
    "BootError",
    "BootFpu",
    "BootMode",
    "BootRegisters",
    "BootSegments",
    "BootSpecialRegisters",
    "Cmdline",
    "CpuidEntry",
    "E820Entry",
    "E820Type",
    "LoadedKernel",
    "Segment",
    "boot_cpu_state",
    "boot_msrs",
    "boot_registers",
    "boot_segments",
    "boot_special_registers",
    "build_e820",
    "build_mptable",
    "detect_boot_mode",
    "load_bzimage",
    "load_elf_pvh",
    "load_kernel",
    "patch_cpuid",
    "setup_boot_cpu",
    "write_boot_gdt",
    "write_identity_page_tables",
    "write_mptable",
]
