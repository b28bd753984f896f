"""Apply the boot code's plain-data vCPU state to KVM vCPUs."""

from __future__ import annotations

import struct

from strato.boot import BootCpuState, CpuidEntry, Segment, patch_cpuid
from strato.kvm import Kvm, VcpuFd
from strato.kvm import bindings as b

APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_MODE_NMI = 0x4
APIC_MODE_EXTINT = 0x7


def host_cpuid(kvm: Kvm) -> list[CpuidEntry]:
    return [
        CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
        for e in kvm.supported_cpuid()
    ]


def set_cpuid(vcpu: VcpuFd, base: list[CpuidEntry], nr_vcpus: int) -> None:
    entries = []
    for e in patch_cpuid(base, vcpu.id, nr_vcpus):
        k = b.kvm_cpuid_entry2(
            function=e.function, index=e.index, flags=e.flags,
            eax=e.eax, ebx=e.ebx, ecx=e.ecx, edx=e.edx,
        )  # fmt: skip
        entries.append(k)
    vcpu.set_cpuid2(entries)


def set_lint(vcpu: VcpuFd) -> None:
    """LINT0 = ExtINT (the PIC), LINT1 = NMI: what a BIOS leaves for the kernel."""
    lapic = vcpu.get_lapic()
    raw = bytearray(bytes(lapic))  # not .regs: a c_char array stops at the first NUL
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        (v,) = struct.unpack_from("<I", raw, reg)
        struct.pack_into("<I", raw, reg, (v & ~0x700) | (mode << 8))
    vcpu.set_lapic(b.kvm_lapic_state.from_buffer_copy(raw))


def _segment(s: Segment) -> b.kvm_segment:
    return b.kvm_segment(
        base=s.base, limit=s.limit, selector=s.selector, type=s.type, present=s.present,
        dpl=s.dpl, db=s.db, s=s.s, l=s.l, g=s.g, avl=s.avl, unusable=s.unusable,
    )  # fmt: skip


def set_boot_state(vcpu: VcpuFd, state: BootCpuState) -> None:
    """Registers, special registers and FPU of the boot vCPU."""
    sr = vcpu.get_sregs()
    s = state.sregs
    sr.cs, sr.ds, sr.es = _segment(s.cs), _segment(s.ds), _segment(s.es)
    sr.fs, sr.gs, sr.ss, sr.tr = _segment(s.fs), _segment(s.gs), _segment(s.ss), _segment(s.tr)
    sr.gdt.base, sr.gdt.limit = s.gdt_base, s.gdt_limit
    sr.idt.base, sr.idt.limit = s.idt_base, s.idt_limit
    sr.cr0, sr.cr3, sr.cr4, sr.efer = s.cr0, s.cr3, s.cr4, s.efer
    vcpu.set_sregs(sr)
    r = state.regs
    vcpu.set_regs(
        b.kvm_regs(rip=r.rip, rsp=r.rsp, rbp=r.rbp, rsi=r.rsi, rbx=r.rbx, rflags=r.rflags)
    )
    fpu = b.kvm_fpu(fcw=state.fpu.fcw, mxcsr=state.fpu.mxcsr)
    vcpu.set_fpu(fpu)


def set_msrs(vcpu: VcpuFd, msrs: tuple[tuple[int, int], ...]) -> None:
    done = vcpu.set_msrs(msrs)
    if done != len(msrs):
        bad = msrs[done][0]
        raise RuntimeError(f"KVM refused MSR {bad:#x} on vCPU {vcpu.id}")
