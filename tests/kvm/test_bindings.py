"""The ctypes structures and ioctl numbers match the installed kernel headers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from strato.kvm import bindings as b
from strato.kvm import ioctls as k

STRUCTS = {
    "kvm_regs": b.kvm_regs,
    "kvm_sregs": b.kvm_sregs,
    "kvm_segment": b.kvm_segment,
    "kvm_dtable": b.kvm_dtable,
    "kvm_fpu": b.kvm_fpu,
    "kvm_msr_entry": b.kvm_msr_entry,
    "kvm_msrs": b.kvm_msrs,
    "kvm_cpuid_entry2": b.kvm_cpuid_entry2,
    "kvm_cpuid2": b.kvm_cpuid2,
    "kvm_lapic_state": b.kvm_lapic_state,
    "kvm_mp_state": b.kvm_mp_state,
    "kvm_vcpu_events": b.kvm_vcpu_events,
    "kvm_userspace_memory_region": b.kvm_userspace_memory_region,
    "kvm_irq_level": b.kvm_irq_level,
    "kvm_irqfd": b.kvm_irqfd,
    "kvm_ioeventfd": b.kvm_ioeventfd,
    "kvm_pit_config": b.kvm_pit_config,
    "kvm_irq_routing_entry": b.kvm_irq_routing_entry,
    "kvm_irq_routing": b.kvm_irq_routing,
    "kvm_clock_data": b.kvm_clock_data,
    "kvm_xcrs": b.kvm_xcrs,
    "kvm_xsave": b.kvm_xsave,
    "kvm_irqchip": b.kvm_irqchip,
    "kvm_pit_state2": b.kvm_pit_state2,
}

OFFSETS = [
    ("kvm_sregs", "cr0", b.kvm_sregs.cr0.offset),
    ("kvm_sregs", "efer", b.kvm_sregs.efer.offset),
    ("kvm_sregs", "interrupt_bitmap", b.kvm_sregs.interrupt_bitmap.offset),
    ("kvm_fpu", "mxcsr", b.kvm_fpu.mxcsr.offset),
    ("kvm_fpu", "xmm", b.kvm_fpu.xmm.offset),
    ("kvm_vcpu_events", "sipi_vector", b.kvm_vcpu_events.sipi_vector.offset),
    ("kvm_vcpu_events", "exception_payload", b.kvm_vcpu_events.exception_payload.offset),
    ("kvm_ioeventfd", "flags", b.kvm_ioeventfd.flags.offset),
    ("kvm_irq_routing_entry", "u", b.kvm_irq_routing_entry.u.offset),
    ("kvm_run", "exit_reason", b.KVM_RUN_EXIT_REASON),
    ("kvm_run", "immediate_exit", b.KVM_RUN_IMMEDIATE_EXIT),
    ("kvm_run", "if_flag", b.KVM_RUN_IF_FLAG),
    ("kvm_run", "io", b.KVM_RUN_EXIT_UNION),
    ("kvm_run", "mmio", b.KVM_RUN_EXIT_UNION),
]

IOCTLS = [
    name
    for name in dir(k)
    if name.startswith("KVM_")
    and not name.startswith(
        (
            "KVM_CAP_",
            "KVM_EXIT_",
            "KVM_SYSTEM_EVENT_",
            "KVM_INTERNAL_",
            "KVM_MP_STATE_",
            "KVM_IOEVENTFD_",
            "KVM_IRQFD_",
            "KVM_IRQ_ROUTING_",
            "KVM_IRQCHIP_",
            "KVM_PIT_",
            "KVM_MEM_",
        )
    )
]
CONSTANTS = [
    name
    for name in dir(k)
    if name.startswith(
        (
            "KVM_CAP_",
            "KVM_EXIT_",
            "KVM_SYSTEM_EVENT_",
            "KVM_INTERNAL_ERROR_",
            "KVM_MP_STATE_",
            "KVM_IOEVENTFD_FLAG_",
            "KVM_IRQ_ROUTING_",
            "KVM_IRQCHIP_",
            "KVM_PIT_SPEAKER",
            "KVM_MEM_",
        )
    )
]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or linux/kvm.h (Debian linux-libc-dev) is not installed")
    d = tmp_path_factory.mktemp("kvmh")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/kvm.h>",
        "int main(void){",
    ]
    for name in STRUCTS:
        lines.append(f'printf("sizeof_{name} %zu\\n", sizeof(struct {name}));')
    for s, f, _ in OFFSETS:
        lines.append(f'printf("off_{s}_{f} %zu\\n", offsetof(struct {s}, {f}));')
    for name in IOCTLS + CONSTANTS:
        lines.append(f'printf("{name} %lu\\n", (unsigned long)({name}));')
    lines.append("return 0;}")
    src = d / "probe.c"
    src.write_text("\n".join(lines))
    subprocess.run(["gcc", "-o", str(d / "probe"), str(src)], check=True)
    out = subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: int(line.split()[1]) for line in out.splitlines()}


@pytest.mark.parametrize("name", sorted(STRUCTS))
def test_struct_sizes(header_values: dict[str, int], name: str) -> None:
    assert ctypes.sizeof(STRUCTS[name]) == header_values[f"sizeof_{name}"]


@pytest.mark.parametrize(("struct", "field", "ours"), OFFSETS)
def test_field_offsets(header_values: dict[str, int], struct: str, field: str, ours: int) -> None:
    assert ours == header_values[f"off_{struct}_{field}"]


@pytest.mark.parametrize("name", sorted(IOCTLS + CONSTANTS))
def test_ioctl_numbers_and_constants(header_values: dict[str, int], name: str) -> None:
    assert getattr(k, name) == header_values[name], name
