"""Loading an ELF kernel (vmlinux or a freestanding guest) through the PVH entry point.

PVH (xen/include/public/arch-x86/hvm/start_info.h, also used by QEMU and Cloud Hypervisor):
PT_LOAD segments are copied to their physical addresses, the entry point comes from the
XEN_ELFNOTE_PHYS32_ENTRY note, and the vCPU starts in 32-bit protected mode with paging off
and EBX pointing at a struct hvm_start_info. Every check runs before guest memory is written.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from strato.boot._common import cmdline_bytes, place_initramfs
from strato.boot._image import ImageSource, open_image, read_at, read_into, size_of
from strato.boot.cmdline import Cmdline
from strato.boot.e820 import build_e820, low_ram_end
from strato.boot.errors import BootError
from strato.boot.layout import (
    LAYOUT,
    X86Layout,
    pvh_memmap_addr,
    pvh_memmap_capacity,
    pvh_modlist_addr,
)
from strato.boot.result import BootMode, LoadedKernel
from strato.boot.start_info import (
    HVM_START_INFO_MAGIC,
    HVM_START_INFO_VERSION,
    HvmMemmapTableEntry,
    HvmModlistEntry,
    HvmStartInfo,
)
from strato.memory import GuestMemory

__all__ = [
    "ELF_MAGIC",
    "XEN_ELFNOTE_PHYS32_ENTRY",
    "ElfImage",
    "ElfNote",
    "ElfSegment",
    "load_elf_pvh",
    "parse_elf",
    "parse_notes",
]

ELF_MAGIC = b"\x7fELF"
XEN_ELFNOTE_PHYS32_ENTRY = 18
_MAX_NOTES_BYTES = 1 << 20  # notes are small; do not read a hostile multi-GiB "note"
_NOTE_HEADER = struct.Struct("<III")
_ACCEPTED = {(64, "EM_X86_64"), (32, "EM_386")}


@dataclass(frozen=True)
class ElfSegment:
    """One PT_LOAD program header."""

    offset: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


@dataclass(frozen=True)
class ElfNote:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    elf_class: int  # 32 or 64
    segments: tuple[ElfSegment, ...]
    notes: tuple[ElfNote, ...]
    pvh_entry: int | None
    file_size: int


def parse_notes(data: bytes) -> list[ElfNote]:
    """Split the contents of a PT_NOTE segment (4-byte aligned records)."""
    notes = []
    off = 0
    while off + _NOTE_HEADER.size <= len(data):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(data, off)
        name_off = off + _NOTE_HEADER.size
        desc_off = name_off + ((namesz + 3) & ~3)
        end = desc_off + ((descsz + 3) & ~3)
        if desc_off + descsz > len(data):
            raise BootError("ELF note runs past the end of its segment")
        notes.append(
            ElfNote(
                data[name_off : name_off + namesz].rstrip(b"\0"),
                ntype,
                data[desc_off : desc_off + descsz],
            )
        )
        off = end
    return notes


def _pvh_entry(notes: Iterable[ElfNote], name: str) -> int | None:
    for note in notes:
        if note.name == b"Xen" and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) not in (4, 8):
                raise BootError(
                    f"{name}: the PVH entry note has {len(note.desc)} bytes, expected 4 or 8"
                )
            return int.from_bytes(note.desc, "little")
    return None


def _read_headers(f: BinaryIO, name: str) -> tuple[int, list[tuple[str, int, int, int, int]]]:
    """ELF class and program headers (type, offset, paddr, filesz, memsz), via pyelftools."""
    # Imported here: pyelftools costs ~40 ms of start-up that bzImage boots do not need.
    from elftools.elf.elffile import ELFFile

    try:
        elf = ELFFile(f)
        elf_class = int(elf.elfclass)
        machine = str(elf["e_machine"])
        if not elf.little_endian:
            raise BootError(f"{name} is a big-endian ELF file; x86 kernels are little-endian")
        if (elf_class, machine) not in _ACCEPTED:
            raise BootError(
                f"{name} is a {elf_class}-bit ELF file for {machine}; strato boots x86 kernels "
                "(64-bit EM_X86_64 or 32-bit EM_386)"
            )
        if elf["e_type"] != "ET_EXEC":
            raise BootError(f"{name} is an ELF file of type {elf['e_type']}, not an executable")
        headers = []
        for i in range(elf.num_segments()):
            ph = elf.get_segment(i).header
            headers.append(
                (
                    str(ph["p_type"]),
                    int(ph["p_offset"]),
                    int(ph["p_paddr"]),
                    int(ph["p_filesz"]),
                    int(ph["p_memsz"]),
                )
            )
    except BootError:
        raise
    except Exception as e:  # pyelftools raises many kinds on malformed files
        raise BootError(f"{name} is not a valid ELF file: {e or type(e).__name__}") from e
    return elf_class, headers


def _parse(f: BinaryIO, name: str) -> ElfImage:
    size = size_of(f)
    if read_at(f, 0, 4) != ELF_MAGIC:
        raise BootError(f"{name} is not an ELF file (no \\x7fELF magic)")
    elf_class, headers = _read_headers(f, name)
    segments = []
    notes: list[ElfNote] = []
    for ptype, offset, paddr, filesz, memsz in headers:
        if ptype not in ("PT_LOAD", "PT_NOTE"):
            continue
        if offset + filesz > size:
            raise BootError(
                f"{name} is truncated: a {ptype} segment needs bytes up to {offset + filesz:#x}, "
                f"the file has {size:#x}"
            )
        if ptype == "PT_NOTE":
            if filesz > _MAX_NOTES_BYTES:
                raise BootError(f"{name}: a PT_NOTE segment of {filesz} bytes is implausibly big")
            notes += parse_notes(read_at(f, offset, filesz))
            continue
        if filesz > memsz:
            raise BootError(
                f"{name}: a PT_LOAD segment at {paddr:#x} has more file bytes ({filesz:#x}) "
                f"than memory bytes ({memsz:#x})"
            )
        if memsz:
            segments.append(ElfSegment(offset, paddr, filesz, memsz))
    return ElfImage(elf_class, tuple(segments), tuple(notes), _pvh_entry(notes, name), size)


def parse_elf(kernel: ImageSource) -> ElfImage:
    """Check an ELF kernel's headers and return its segments and notes (nothing is loaded)."""
    with open_image(kernel, "kernel") as (f, name):
        return _parse(f, name)


def _check_segments(image: ElfImage, mem: GuestMemory, name: str, layout: X86Layout) -> None:
    if not image.segments:
        raise BootError(f"{name} has no loadable (PT_LOAD) segment")
    for seg in image.segments:
        if seg.paddr < layout.high_ram:
            raise BootError(
                f"{name}: segment [{seg.paddr:#x}, {seg.end:#x}) overlaps the first MiB, where "
                "strato keeps the boot structures; link the kernel at 1 MiB or above"
            )
        if not mem.check(seg.paddr, seg.memsz):
            raise BootError(
                f"{name}: segment [{seg.paddr:#x}, {seg.end:#x}) lies outside guest RAM; give "
                "the guest more memory"
            )
    entry = image.pvh_entry
    if entry is None:
        raise BootError(
            f"{name} has no PVH entry point (Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY): build the "
            "kernel with CONFIG_PVH=y, or boot its bzImage"
        )
    if not any(seg.paddr <= entry < seg.end for seg in image.segments):
        raise BootError(f"{name}: the PVH entry point {entry:#x} is not inside a loaded segment")
    if entry >= 1 << 32:
        raise BootError(f"{name}: the PVH entry point {entry:#x} is above 4 GiB")


def load_elf_pvh(
    mem: GuestMemory,
    kernel: ImageSource,
    cmdline: bytes | str | Cmdline,
    initramfs: ImageSource | None = None,
    layout: X86Layout = LAYOUT,
    *,
    rsdp_addr: int = 0,
    reserved: Iterable[tuple[int, int]] = (),
) -> LoadedKernel:
    """Load an ELF kernel with a PVH entry note, and build hvm_start_info at layout.pvh_info."""
    cmd = cmdline_bytes(cmdline, layout)
    ram_end = low_ram_end(mem, layout)
    memmap = build_e820(mem, layout, reserved)
    if len(memmap) > pvh_memmap_capacity():
        raise BootError(
            f"the memory map has {len(memmap)} entries; the PVH info page holds "
            f"{pvh_memmap_capacity()}"
        )
    with open_image(kernel, "kernel") as (kf, kname):
        image = _parse(kf, kname)
        _check_segments(image, mem, kname, layout)
        assert image.pvh_entry is not None
        kernel_start = min(seg.paddr for seg in image.segments)
        kernel_end = max(seg.end for seg in image.segments)
        initrd_addr = initrd_size = 0
        if initramfs is not None:
            with open_image(initramfs, "initramfs") as (rf, rname):
                initrd_size = size_of(rf)
                initrd_addr = place_initramfs(initrd_size, kernel_end, ram_end, memmap, rname)
                # All checks passed: from here on guest memory is written.
                read_into(rf, 0, mem.view(initrd_addr, initrd_size), "initramfs", rname)
        for seg in image.segments:
            read_into(kf, seg.offset, mem.view(seg.paddr, seg.filesz), "kernel", kname)
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)

    mem.write(layout.cmdline, cmd + b"\0")
    info = HvmStartInfo(
        magic=HVM_START_INFO_MAGIC,
        version=HVM_START_INFO_VERSION,
        cmdline_paddr=layout.cmdline,
        rsdp_paddr=rsdp_addr,
        memmap_paddr=pvh_memmap_addr(layout),
        memmap_entries=len(memmap),
    )
    if initrd_size:
        info.nr_modules = 1
        info.modlist_paddr = pvh_modlist_addr(layout)
        mem.write_obj(info.modlist_paddr, HvmModlistEntry(paddr=initrd_addr, size=initrd_size))
    for i, entry in enumerate(memmap):
        mem.write_obj(
            pvh_memmap_addr(layout) + i * ctypes.sizeof(HvmMemmapTableEntry),
            HvmMemmapTableEntry(addr=entry.addr, size=entry.size, type=int(entry.type)),
        )
    mem.write_obj(layout.pvh_info, info)
    return LoadedKernel(
        mode=BootMode.PVH,
        entry=image.pvh_entry,
        boot_info=layout.pvh_info,
        kernel_start=kernel_start,
        kernel_end=kernel_end,
        cmdline_addr=layout.cmdline,
        cmdline_size=len(cmd),
        initramfs_addr=initrd_addr,
        initramfs_size=initrd_size,
        rsdp_addr=rsdp_addr,
        e820=tuple(memmap),
    )
