"""The built-in guest builds into a PVH ELF that QEMU and strato's loader both accept."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import cast

import pytest
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from elftools.elf.segments import NoteSegment

from strato.images.builtin import builtin_guest_path, ensure_builtin_guest
from strato.images.errors import ImageError

XEN_ELFNOTE_PHYS32_ENTRY = 18


def test_ensure_builtin_guest_returns_the_elf(guest_elf: Path) -> None:
    assert guest_elf == builtin_guest_path()
    assert guest_elf.read_bytes()[:4] == b"\x7fELF"
    # A second call is make's "nothing to do" and gives the same file.
    mtime = guest_elf.stat().st_mtime_ns
    assert ensure_builtin_guest() == guest_elf
    assert guest_elf.stat().st_mtime_ns == mtime


def test_elf_has_the_pvh_note_pointing_at_the_32bit_entry(guest_elf: Path) -> None:
    with open(guest_elf, "rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == "ET_EXEC"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads, "no PT_LOAD segment"
        assert min(s["p_paddr"] for s in loads) == 0x100000  # loaded at 1 MiB
        for seg in loads:
            assert seg["p_paddr"] == seg["p_vaddr"]  # identity: QEMU and strato use p_paddr
        notes = [s for s in elf.iter_segments() if isinstance(s, NoteSegment)]
        assert notes, "no PT_NOTE segment"
        entries = [
            n
            for seg in notes
            for n in seg.iter_notes()
            # pyelftools gives unknown note types (Xen's) as plain numbers
            if n["n_name"] == "Xen" and cast(object, n["n_type"]) == XEN_ELFNOTE_PHYS32_ENTRY
        ]
        assert len(entries) == 1, "expected one XEN_ELFNOTE_PHYS32_ENTRY note"
        desc = entries[0]["n_descdata"]
        assert len(desc) in (4, 8)
        entry = struct.unpack_from("<I", desc)[0]
        symtab = elf.get_section_by_name(".symtab")
        assert isinstance(symtab, SymbolTableSection)
        symbols = symtab.get_symbol_by_name("pvh_entry")
        assert symbols is not None and len(symbols) == 1
        assert entry == symbols[0]["st_value"] == elf["e_entry"]
        # The entry must lie inside what gets loaded, below 4 GiB (32-bit protected mode).
        assert any(s["p_paddr"] <= entry < s["p_paddr"] + s["p_filesz"] for s in loads)


def test_missing_sources_raise_image_error(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="sources"):
        ensure_builtin_guest(tmp_path)


def test_a_build_failure_raises_image_error_with_the_compiler_output(tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text("all:\n\t@echo 'broken.c:1: error: nope'; exit 1\n")
    with pytest.raises(ImageError, match=r"broken\.c:1: error: nope"):
        ensure_builtin_guest(tmp_path)
