"""The PVH ELF loader on synthetic ELF files: segments, start_info, and every rejection."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.boot import BootError, BootMode, E820Type, load_elf_pvh
from strato.boot.elf import parse_elf, parse_notes
from strato.boot.layout import pvh_memmap_addr, pvh_modlist_addr
from strato.boot.start_info import HvmMemmapTableEntry, HvmModlistEntry, HvmStartInfo
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, MiB

from .synth import EM_386, EM_AARCH64, ET_DYN, PT_LOAD, all_zero, make_elf, note, pvh_note

CODE = b"\xfc\x0f\x01\x15" + bytes(range(60))
DATA = b"data" * 100


@pytest.fixture
def mem64() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous([(0, 64 * MiB)])
    yield mem
    mem.close()


def sample_elf(**kw: Any) -> bytes:
    segments = kw.pop("segments", [(2 * MiB, CODE, len(CODE)), (3 * MiB, DATA, 0x2000)])
    notes = kw.pop("notes", note(b"GNU", 3, b"x" * 20) + pvh_note(2 * MiB + 0))
    return make_elf(segments, notes, **kw)


def test_loads_segments_and_builds_start_info(mem64: GuestMemory) -> None:
    mem64.fill(3 * MiB, 0x3000, 0xAA)  # the bss must be cleared, not assumed zero
    initrd = b"initrd" * 1000
    k = load_elf_pvh(mem64, io.BytesIO(sample_elf()), b"console=ttyS0", io.BytesIO(initrd),
                     rsdp_addr=LAYOUT.rsdp)  # fmt: skip
    assert k.mode is BootMode.PVH
    assert k.entry == 2 * MiB
    assert (k.kernel_start, k.kernel_end) == (2 * MiB, 3 * MiB + 0x2000)
    assert mem64.read(2 * MiB, len(CODE)) == CODE
    assert mem64.read(3 * MiB, len(DATA)) == DATA
    assert all_zero(mem64.read(3 * MiB + len(DATA), 0x2000 - len(DATA)))
    assert mem64.read(3 * MiB + 0x2000, 1) == b"\xaa"  # nothing past p_memsz

    assert k.boot_info == LAYOUT.pvh_info
    info = mem64.read_obj(LAYOUT.pvh_info, HvmStartInfo)
    assert (info.magic, info.version, info.flags) == (0x336EC578, 1, 0)
    assert info.cmdline_paddr == LAYOUT.cmdline
    assert mem64.read(LAYOUT.cmdline, 14) == b"console=ttyS0\0"
    assert info.rsdp_paddr == LAYOUT.rsdp
    assert (info.nr_modules, info.modlist_paddr) == (1, pvh_modlist_addr())
    mod = mem64.read_obj(info.modlist_paddr, HvmModlistEntry)
    assert (mod.paddr, mod.size, mod.cmdline_paddr) == (k.initramfs_addr, len(initrd), 0)
    assert mem64.read(mod.paddr, mod.size) == initrd
    assert mod.paddr % 4096 == 0 and mod.paddr + mod.size <= 64 * MiB
    assert info.memmap_paddr == pvh_memmap_addr() and info.memmap_entries == len(k.e820)
    memmap = [mem64.read_obj(info.memmap_paddr + 24 * i, HvmMemmapTableEntry)
              for i in range(info.memmap_entries)]  # fmt: skip
    assert [(m.addr, m.size, m.type) for m in memmap] == [
        (0, 0x9FC00, int(E820Type.RAM)),
        (0x9FC00, 0x400, int(E820Type.RESERVED)),
        (1 * MiB, 63 * MiB, int(E820Type.RAM)),
    ]
    assert info.memmap_paddr + 24 * info.memmap_entries <= LAYOUT.pvh_info + 0x1000


def test_without_initramfs_there_are_no_modules(tmp_path: Path, mem64: GuestMemory) -> None:
    path = tmp_path / "guest.elf"
    path.write_bytes(sample_elf())
    load_elf_pvh(mem64, path, "")
    info = mem64.read_obj(LAYOUT.pvh_info, HvmStartInfo)
    assert (info.nr_modules, info.modlist_paddr, info.rsdp_paddr) == (0, 0, 0)


def test_elf32_and_a_4_byte_note(mem64: GuestMemory) -> None:
    image = sample_elf(elf_class=32, machine=EM_386, notes=pvh_note(2 * MiB + 4, size=4))
    k = load_elf_pvh(mem64, io.BytesIO(image), b"")
    assert k.entry == 2 * MiB + 4 and parse_elf(io.BytesIO(image)).elf_class == 32


def test_notes_parser() -> None:
    notes = parse_notes(note(b"Xen", 18, b"\x01\x02\x03\x04") + note(b"Linux", 256, b"abcde"))
    assert [(n.name, n.type, n.desc) for n in notes] == [
        (b"Xen", 18, b"\x01\x02\x03\x04"),
        (b"Linux", 256, b"abcde"),
    ]
    with pytest.raises(BootError, match="past the end"):
        parse_notes(note(b"Xen", 18, b"12345678")[:-4])


REJECTIONS: list[tuple[dict[str, Any], str]] = [
    ({"notes": note(b"GNU", 3, b"x")}, "no PVH entry point"),
    ({"notes": b""}, "no PVH entry point"),
    ({"notes": note(b"Xen", 18, b"123")}, "has 3 bytes, expected 4 or 8"),
    ({"notes": pvh_note(5 * MiB)}, "not inside a loaded segment"),
    ({"segments": []}, "no loadable"),
    ({"segments": [(0x10000, CODE, 64)]}, "overlaps the first MiB"),
    ({"segments": [(63 * MiB, CODE, 2 * MiB)]}, "outside guest RAM"),
    ({"segments": [(2 * MiB, CODE, 4)]}, "more file bytes"),
    ({"machine": EM_AARCH64}, "strato boots x86 kernels"),
    ({"elf_class": 32}, "strato boots x86 kernels"),  # 32-bit class with x86_64 machine
    ({"etype": ET_DYN}, "not an executable"),
    ({"big_endian": True}, "big-endian"),
    ({"extra_phdrs": [(PT_LOAD, 1 << 40, 4 * MiB, 16, 16)]}, "truncated"),
]


@pytest.mark.parametrize(("kw", "message"), REJECTIONS)
def test_rejections_leave_memory_untouched(
    mem64: GuestMemory, kw: dict[str, Any], message: str
) -> None:
    with pytest.raises(BootError, match=message):
        load_elf_pvh(mem64, io.BytesIO(sample_elf(**kw)), b"", io.BytesIO(b"i" * 4096))
    assert all_zero(mem64.read(0, 8 * MiB))


def test_initramfs_too_big(mem64: GuestMemory) -> None:
    with pytest.raises(BootError, match=r"initramfs .* does not fit"):
        load_elf_pvh(mem64, io.BytesIO(sample_elf()), b"", io.BytesIO(b"i" * 61 * MiB))


def test_not_an_elf_file(mem64: GuestMemory) -> None:
    with pytest.raises(BootError, match="not an ELF file"):
        load_elf_pvh(mem64, io.BytesIO(b"MZ" + bytes(100)), b"")


_SLOW = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SMALL_MEM = GuestMemory.anonymous([(0, 8 * MiB)])


@_SLOW
@given(st.binary(max_size=512))
def test_random_bytes_after_the_magic_are_a_boot_error(data: bytes) -> None:
    with pytest.raises(BootError):
        load_elf_pvh(_SMALL_MEM, io.BytesIO(b"\x7fELF" + data), b"")


@_SLOW
@given(st.data())
def test_corrupted_elf_loads_or_raises_boot_error(data: st.DataObject) -> None:
    image = bytearray(sample_elf())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(image) - 1))
        image[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(image)))
    try:
        k = load_elf_pvh(_SMALL_MEM, io.BytesIO(bytes(image[:cut])), b"")
    except BootError:
        return
    assert 1 * MiB <= k.kernel_start <= k.entry < k.kernel_end <= 8 * MiB
