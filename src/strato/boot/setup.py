"""Write the boot vCPU's tables into guest memory and return its register state."""

from __future__ import annotations

from strato.boot.cpu_state import BootCpuState, boot_cpu_state
from strato.boot.gdt import write_boot_gdt
from strato.boot.layout import LAYOUT, X86Layout
from strato.boot.paging import write_identity_page_tables
from strato.boot.result import BootMode, LoadedKernel
from strato.memory import GuestMemory

__all__ = ["setup_boot_cpu"]


def setup_boot_cpu(
    mem: GuestMemory, kernel: LoadedKernel, layout: X86Layout = LAYOUT
) -> BootCpuState:
    """GDT and zero IDT for both modes, identity page tables for LINUX64 (PVH runs unpaged)."""
    write_boot_gdt(mem, kernel.mode, layout)
    if kernel.mode is BootMode.LINUX64:
        write_identity_page_tables(mem, layout)
    return boot_cpu_state(kernel, layout)
