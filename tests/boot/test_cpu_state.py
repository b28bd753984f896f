from __future__ import annotations

import io

from strato.boot import BootMode, LoadedKernel, boot_cpu_state, boot_msrs, load_kernel
from strato.boot.setup import setup_boot_cpu
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, MiB

from .synth import make_bzimage, make_elf, pvh_note

CR0_PE, CR0_ET, CR0_PG, CR4_PAE = 1, 1 << 4, 1 << 31, 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


def kernel(mode: BootMode) -> LoadedKernel:
    return LoadedKernel(mode=mode, entry=0x1000200, boot_info=0x7000, kernel_start=0x1000000,
                        kernel_end=0x2000000, cmdline_addr=0x20000, cmdline_size=0)  # fmt: skip


def test_linux64_enters_long_mode_with_rsi_at_the_zero_page() -> None:
    state = boot_cpu_state(kernel(BootMode.LINUX64))
    r, s = state.regs, state.sregs
    assert (r.rip, r.rsi, r.rbx, r.rflags) == (0x1000200, 0x7000, 0, 0x2)
    assert r.rsp == r.rbp and LAYOUT.cmdline > r.rsp > LAYOUT.zero_page + 4096
    assert s.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG
    assert s.cr4 & CR4_PAE and s.cr3 == LAYOUT.pml4
    assert s.efer == EFER_LME | EFER_LMA
    assert s.cs.l == 1 and s.cs.db == 0 and s.cs.selector == 0x08
    assert {seg.selector for seg in (s.ds, s.es, s.fs, s.gs, s.ss)} == {0x10}
    assert s.tr.selector == 0x18
    assert (state.fpu.fcw, state.fpu.mxcsr) == (0x37F, 0x1F80)


def test_pvh_enters_32_bit_protected_mode_with_ebx_at_start_info() -> None:
    state = boot_cpu_state(kernel(BootMode.PVH))
    r, s = state.regs, state.sregs
    assert (r.rbx, r.rsi, r.rflags) == (0x7000, 0, 0x2)
    assert s.cr0 & CR0_PE and not s.cr0 & CR0_PG and s.cr0 & CR0_ET
    assert (s.cr4, s.efer) == (0, 0)
    assert s.cs.l == 0 and s.cs.db == 1 and s.cs.limit == 0xFFFFFFFF
    assert s.tr.limit == 0x67


def test_boot_msrs() -> None:
    msrs = dict(boot_msrs())
    assert msrs[0x1A0] == 1  # IA32_MISC_ENABLE: fast strings
    assert msrs[0x2FF] == (1 << 11) | 6  # MTRRdefType: enabled, write-back
    for index in (0x10, 0x174, 0x175, 0x176, 0xC0000081, 0xC0000082, 0xC0000083,
                  0xC0000084, 0xC0000102):  # fmt: skip
        assert msrs[index] == 0
    assert len(msrs) == len(boot_msrs())


def test_setup_boot_cpu_writes_page_tables_only_for_linux64(mem128: GuestMemory) -> None:
    k = load_kernel(mem128, io.BytesIO(make_bzimage()), b"")
    state = setup_boot_cpu(mem128, k)
    assert state.regs.rip == k.entry and state.regs.rsi == LAYOUT.zero_page
    assert mem128.read_u64(LAYOUT.pml4) == LAYOUT.pdpte | 3
    assert mem128.read_u64(LAYOUT.boot_gdt + 8) == 0x00AF9B000000FFFF

    mem = GuestMemory.anonymous([(0, 16 * MiB)])
    try:
        elf = make_elf([(2 * MiB, b"\xf4", 1)], pvh_note(2 * MiB))
        k = load_kernel(mem, io.BytesIO(elf), b"")
        state = setup_boot_cpu(mem, k)
        assert state.regs.rbx == LAYOUT.pvh_info and state.regs.rip == 2 * MiB
        assert mem.read_u64(LAYOUT.pml4) == 0
        assert mem.read_u64(LAYOUT.boot_gdt + 8) == 0x00CF9B000000FFFF
    finally:
        mem.close()
