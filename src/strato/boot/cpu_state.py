"""The boot vCPU's register state, as plain data the VMM turns into KVM ioctls.

LINUX64: long mode, paging on with the identity map, RSI = zero page (64-bit boot protocol).
PVH: 32-bit protected mode, paging off, flat segments, EBX = hvm_start_info.
"""

from __future__ import annotations

from dataclasses import dataclass

from strato.boot.gdt import BootSegments, Segment, boot_segments
from strato.boot.layout import BOOT_STACK_POINTER, LAYOUT, X86Layout
from strato.boot.result import BootMode, LoadedKernel

__all__ = [
    "BootCpuState",
    "BootFpu",
    "BootRegisters",
    "BootSpecialRegisters",
    "boot_cpu_state",
    "boot_fpu",
    "boot_msrs",
    "boot_registers",
    "boot_special_registers",
]

X86_CR0_PE = 1 << 0
X86_CR0_ET = 1 << 4
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1  # bit 1 always reads as one; IF (and everything else) clear

MSR_IA32_TSC = 0x10
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_MEM_TYPE_WB = 6


@dataclass(frozen=True)
class BootRegisters:
    """General registers; the ones not named here start at zero."""

    rip: int
    rsp: int = 0
    rbp: int = 0
    rsi: int = 0
    rbx: int = 0
    rflags: int = RFLAGS_RESERVED


@dataclass(frozen=True)
class BootSpecialRegisters:
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: Segment
    ds: Segment
    es: Segment
    fs: Segment
    gs: Segment
    ss: Segment
    tr: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int


@dataclass(frozen=True)
class BootFpu:
    fcw: int = 0x37F  # x87 default: all exceptions masked, 64-bit precision
    mxcsr: int = 0x1F80  # SSE default: all exceptions masked, round to nearest


@dataclass(frozen=True)
class BootCpuState:
    regs: BootRegisters
    sregs: BootSpecialRegisters
    fpu: BootFpu
    msrs: tuple[tuple[int, int], ...]


def boot_registers(kernel: LoadedKernel) -> BootRegisters:
    if kernel.mode is BootMode.LINUX64:
        return BootRegisters(
            rip=kernel.entry,
            rsp=BOOT_STACK_POINTER,
            rbp=BOOT_STACK_POINTER,
            rsi=kernel.boot_info,
        )
    return BootRegisters(
        rip=kernel.entry, rsp=BOOT_STACK_POINTER, rbp=BOOT_STACK_POINTER, rbx=kernel.boot_info
    )


def _sregs(seg: BootSegments, cr0: int, cr3: int, cr4: int, efer: int) -> BootSpecialRegisters:
    return BootSpecialRegisters(
        cr0=cr0, cr3=cr3, cr4=cr4, efer=efer,
        cs=seg.code, ds=seg.data, es=seg.data, fs=seg.data, gs=seg.data, ss=seg.data, tr=seg.tss,
        gdt_base=seg.gdt_base, gdt_limit=seg.gdt_limit,
        idt_base=seg.idt_base, idt_limit=seg.idt_limit,
    )  # fmt: skip


def boot_special_registers(mode: BootMode, layout: X86Layout = LAYOUT) -> BootSpecialRegisters:
    seg = boot_segments(mode, layout)
    if mode is BootMode.LINUX64:
        return _sregs(
            seg,
            cr0=X86_CR0_PE | X86_CR0_ET | X86_CR0_PG,
            cr3=layout.pml4,
            cr4=X86_CR4_PAE,
            efer=EFER_LME | EFER_LMA,
        )
    return _sregs(seg, cr0=X86_CR0_PE | X86_CR0_ET, cr3=0, cr4=0, efer=0)


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) pairs for KVM_SET_MSRS, as Firecracker and Cloud Hypervisor set them."""
    return [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]


def boot_fpu() -> BootFpu:
    return BootFpu()


def boot_cpu_state(kernel: LoadedKernel, layout: X86Layout = LAYOUT) -> BootCpuState:
    """Everything the boot vCPU needs for `kernel` (pure; see setup.setup_boot_cpu)."""
    return BootCpuState(
        regs=boot_registers(kernel),
        sregs=boot_special_registers(kernel.mode, layout),
        fpu=boot_fpu(),
        msrs=tuple(boot_msrs()),
    )
