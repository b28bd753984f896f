"""ctypes structures from linux/kvm.h and asm/kvm.h (x86_64), and nothing else.

Sizes and offsets are checked against the installed kernel headers in tests/kvm/test_bindings.py.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow it (see msrs_buffer)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(ctypes.Structure):
    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", ctypes.c_char * 1024)]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class _events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault_pending", c_uint8),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class kvm_pit_config(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("devid", c_uint32),
    ]


class _routing_union(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _routing_union),
    ]


class kvm_irq_routing(ctypes.Structure):
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * 16),
        ("padding", c_uint64 * 16),
    ]


class kvm_xsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]


class kvm_pic_state(ctypes.Structure):
    _fields_ = [("raw", c_uint8 * 16)]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", c_uint8 * 512)]


class kvm_pit_state2(ctypes.Structure):
    _fields_ = [("channels", c_uint8 * (24 * 3)), ("flags", c_uint32), ("reserved", c_uint32 * 9)]


# struct kvm_run: the fixed head, and offsets into the exit union (at offset 32).
KVM_RUN_EXIT_REASON = 8
KVM_RUN_IMMEDIATE_EXIT = 1
KVM_RUN_IF_FLAG = 13
KVM_RUN_EXIT_UNION = 32
# io: u8 direction, u8 size, u16 port, u32 count, u64 data_offset
# mmio: u64 phys_addr, u8 data[8], u32 len, u8 is_write
# internal: u32 suberror, u32 ndata, u64 data[16]
# system_event: u32 type, u32 ndata, u64 data[16]
# fail_entry: u64 hardware_entry_failure_reason, u32 cpu


def flexible(header: type[ctypes.Structure], entry: type[ctypes.Structure], n: int) -> type:
    """A structure with a header and `n` trailing entries (the kernel's flexible arrays)."""
    return type(
        f"{header.__name__}_{n}",
        (ctypes.Structure,),
        {"_fields_": [("hdr", header), ("entries", entry * n)]},
    )
