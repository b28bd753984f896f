"""KVM ioctl request numbers (linux/kvm.h), computed the way <asm-generic/ioctl.h> does."""

from __future__ import annotations

import ctypes

from strato.kvm import bindings as b

KVMIO = 0xAE
_NONE, _WRITE, _READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, 0)


def _iow(nr: int, t: type) -> int:
    return _ioc(_WRITE, nr, ctypes.sizeof(t))


def _ior(nr: int, t: type) -> int:
    return _ioc(_READ, nr, ctypes.sizeof(t))


def _iowr(nr: int, t: type) -> int:
    return _ioc(_READ | _WRITE, nr, ctypes.sizeof(t))


# system
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, b.kvm_msr_list)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, b.kvm_cpuid2)
# vm
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, b.kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, b.kvm_irq_level)
KVM_GET_IRQCHIP = _iowr(0x62, b.kvm_irqchip)
KVM_SET_IRQCHIP = _ior(0x63, b.kvm_irqchip)
KVM_SET_GSI_ROUTING = _iow(0x6A, b.kvm_irq_routing)
KVM_IRQFD = _iow(0x76, b.kvm_irqfd)
KVM_CREATE_PIT2 = _iow(0x77, b.kvm_pit_config)
KVM_IOEVENTFD = _iow(0x79, b.kvm_ioeventfd)
KVM_SET_CLOCK = _iow(0x7B, b.kvm_clock_data)
KVM_GET_CLOCK = _ior(0x7C, b.kvm_clock_data)
KVM_GET_PIT2 = _ior(0x9F, b.kvm_pit_state2)
KVM_SET_PIT2 = _iow(0xA0, b.kvm_pit_state2)
# vcpu
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, b.kvm_regs)
KVM_SET_REGS = _iow(0x82, b.kvm_regs)
KVM_GET_SREGS = _ior(0x83, b.kvm_sregs)
KVM_SET_SREGS = _iow(0x84, b.kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, b.kvm_msrs)
KVM_SET_MSRS = _iow(0x89, b.kvm_msrs)
KVM_GET_FPU = _ior(0x8C, b.kvm_fpu)
KVM_SET_FPU = _iow(0x8D, b.kvm_fpu)
KVM_GET_LAPIC = _ior(0x8E, b.kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, b.kvm_lapic_state)
KVM_SET_CPUID2 = _iow(0x90, b.kvm_cpuid2)
KVM_GET_CPUID2 = _iowr(0x91, b.kvm_cpuid2)
KVM_GET_MP_STATE = _ior(0x98, b.kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, b.kvm_mp_state)
KVM_GET_VCPU_EVENTS = _ior(0x9F, b.kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, b.kvm_vcpu_events)
KVM_GET_XSAVE = _ior(0xA4, b.kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, b.kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, b.kvm_xcrs)
KVM_SET_XCRS = _iow(0xA7, b.kvm_xcrs)

# capabilities
KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_IRQFD = 32
KVM_CAP_PIT2 = 33
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_ADJUST_CLOCK = 39
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_XSAVE = 55
KVM_CAP_XCRS = 56
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_ONE_REG = 70
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_IMMEDIATE_EXIT = 136

# exit reasons
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_IRQ_ROUTING_IRQCHIP = 1
KVM_IRQ_ROUTING_MSI = 2
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
KVM_PIT_SPEAKER_DUMMY = 1
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
