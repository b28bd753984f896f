"""The boot GDT and IDT, and the segment registers that match them.

Same tables as Firecracker and Cloud Hypervisor: index 1 code, 2 data, 3 TSS. LINUX64 uses a
64-bit code segment (flags 0xa09b); PVH uses flat 32-bit segments (0xc09b / 0xc093) and a
32-bit TSS, as the PVH ABI asks. KVM takes segment registers from KVM_SET_SREGS, not from
memory, so the `Segment` values must match what is written here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from strato.boot.layout import LAYOUT, X86Layout
from strato.boot.result import BootMode
from strato.memory import GuestMemory

__all__ = [
    "CODE_SELECTOR",
    "DATA_SELECTOR",
    "LINUX64_GDT",
    "PVH_GDT",
    "TSS_SELECTOR",
    "BootSegments",
    "Segment",
    "boot_gdt",
    "boot_segments",
    "gdt_entry",
    "segment_from_gdt_entry",
    "write_boot_gdt",
]

CODE_SELECTOR = 0x08
DATA_SELECTOR = 0x10
TSS_SELECTOR = 0x18
_IDT_LIMIT = 7  # one zero 8-byte entry: any exception before the kernel's IDT is fatal


def gdt_entry(flags: int, base: int, limit: int) -> int:
    """An 8-byte descriptor, as in the Rust VMMs: `flags` = access byte | (G,D/B,L,AVL) << 12."""
    return (
        ((base & 0xFF000000) << (56 - 24))
        | ((flags & 0x0000F0FF) << 40)
        | ((limit & 0x000F0000) << (48 - 16))
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0x0000FFFF)
    )


LINUX64_GDT: tuple[int, ...] = (
    gdt_entry(0, 0, 0),
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 64-bit code, present, DPL 0, execute/read, accessed
    gdt_entry(0xC093, 0, 0xFFFFF),  # 32-bit data, 4 GiB, read/write, accessed
    gdt_entry(0x808B, 0, 0xFFFFF),  # busy TSS
)
PVH_GDT: tuple[int, ...] = (
    gdt_entry(0, 0, 0),
    gdt_entry(0xC09B, 0, 0xFFFFFFFF),  # flat 32-bit code
    gdt_entry(0xC093, 0, 0xFFFFFFFF),  # flat 32-bit data
    gdt_entry(0x008B, 0, 0x67),  # busy 32-bit TSS, 104 bytes
)


@dataclass(frozen=True)
class Segment:
    """A segment register as KVM wants it (struct kvm_segment); `limit` is in bytes."""

    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 - the field's name in kvm_segment and the SDM
    g: int
    avl: int
    unusable: int = 0


def segment_from_gdt_entry(entry: int, index: int) -> Segment:
    g = (entry >> 55) & 1
    raw_limit = ((entry >> 32) & 0x000F0000) | (entry & 0xFFFF)
    return Segment(
        base=((entry >> 32) & 0xFF000000) | ((entry >> 16) & 0x00FFFFFF),
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=g,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


@dataclass(frozen=True)
class BootSegments:
    code: Segment
    data: Segment
    tss: Segment
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int


def boot_gdt(mode: BootMode) -> tuple[int, ...]:
    return LINUX64_GDT if mode is BootMode.LINUX64 else PVH_GDT


def boot_segments(mode: BootMode, layout: X86Layout = LAYOUT) -> BootSegments:
    """The segment registers and descriptor-table registers for `mode` (pure)."""
    gdt = boot_gdt(mode)
    return BootSegments(
        code=segment_from_gdt_entry(gdt[CODE_SELECTOR // 8], CODE_SELECTOR // 8),
        data=segment_from_gdt_entry(gdt[DATA_SELECTOR // 8], DATA_SELECTOR // 8),
        tss=segment_from_gdt_entry(gdt[TSS_SELECTOR // 8], TSS_SELECTOR // 8),
        gdt_base=layout.boot_gdt,
        gdt_limit=len(gdt) * 8 - 1,
        idt_base=layout.boot_idt,
        idt_limit=_IDT_LIMIT,
    )


def write_boot_gdt(mem: GuestMemory, mode: BootMode, layout: X86Layout = LAYOUT) -> BootSegments:
    """Write the GDT at layout.boot_gdt and a zero IDT at layout.boot_idt."""
    gdt = boot_gdt(mode)
    mem.write(layout.boot_gdt, struct.pack(f"<{len(gdt)}Q", *gdt))
    mem.write(layout.boot_idt, bytes(_IDT_LIMIT + 1))
    return boot_segments(mode, layout)
