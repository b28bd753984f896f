"""Synthetic kernel images for the loader tests: a bzImage and ELF files, built byte by byte."""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Sequence
from typing import Any

from strato.boot.bootparams import LOADED_HIGH, SETUP_HEADER_OFFSET, XLF_KERNEL_64, SetupHeader

MiB = 1 << 20
# A recognisable protected-mode part: "cld; cli" at the 64-bit entry (offset 0x200).
KERNEL_BODY = bytes(range(256)) * 2 + b"\xfc\xfa" + bytes(range(254)) * 8


def make_bzimage(kernel: bytes = KERNEL_BODY, **fields: Any) -> bytes:
    """A bzImage whose setup header has sane defaults, overridden by `fields`."""
    hdr = SetupHeader()
    defaults: dict[str, Any] = {
        "setup_sects": 1,
        "boot_flag": 0xAA55,
        "jump": 0x6AEB,  # jmp short; byte 0x201 = 0x6a: the header ends at 0x26c
        "header": 0x53726448,
        "version": 0x20F,
        "loadflags": LOADED_HIGH,
        "code32_start": 0x100000,
        "initrd_addr_max": 0x7FFFFFFF,
        "kernel_alignment": 0x200000,
        "relocatable_kernel": 1,
        "xloadflags": XLF_KERNEL_64,
        "cmdline_size": 0x7FF,
        "pref_address": 0x1000000,
        "init_size": 0x400000,
        "vid_mode": 0xFFFF,
    }
    padded = kernel + bytes(-len(kernel) % 16)
    defaults["syssize"] = len(padded) // 16
    defaults.update(fields)
    for name, value in defaults.items():
        setattr(hdr, name, value)
    setup = bytearray(((hdr.setup_sects or 4) + 1) * 512)
    raw = bytes(hdr)
    setup[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(raw)] = raw
    return bytes(setup) + padded


PT_LOAD = 1
PT_NOTE = 4
EM_386 = 3
EM_X86_64 = 62
EM_AARCH64 = 183
ET_EXEC = 2
ET_DYN = 3


def note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name0 = name + b"\0"
    return (
        struct.pack("<III", len(name0), len(desc), ntype)
        + name0
        + bytes(-len(name0) % 4)
        + desc
        + bytes(-len(desc) % 4)
    )


def pvh_note(entry: int, size: int = 8) -> bytes:
    return note(b"Xen", 18, entry.to_bytes(size, "little"))


def make_elf(
    segments: list[tuple[int, bytes, int]],
    notes: bytes = b"",
    *,
    elf_class: int = 64,
    machine: int = EM_X86_64,
    etype: int = ET_EXEC,
    big_endian: bool = False,
    extra_phdrs: Sequence[tuple[int, int, int, int, int]] = (),
) -> bytes:
    """An ELF executable: `segments` are (paddr, file bytes, memsz) PT_LOADs, plus one PT_NOTE.

    `extra_phdrs` are raw (type, offset, paddr, filesz, memsz) program headers.
    """
    e = ">" if big_endian else "<"
    is64 = elf_class == 64
    ehsize, phentsize = (64, 56) if is64 else (52, 32)
    phdrs: list[tuple[int, int, int, int, int]] = []
    body = bytearray()
    data_start = ehsize + phentsize * (len(segments) + (1 if notes else 0) + len(extra_phdrs))

    def place(data: bytes) -> int:
        body.extend(bytes(-(data_start + len(body)) % 16))
        offset = data_start + len(body)
        body.extend(data)
        return offset

    if notes:
        phdrs.append((PT_NOTE, place(notes), 0, len(notes), len(notes)))
    for paddr, data, memsz in segments:
        phdrs.append((PT_LOAD, place(data), paddr, len(data), memsz))
    phdrs.extend(extra_phdrs)
    ident = b"\x7fELF" + bytes([1 if not is64 else 2, 2 if big_endian else 1, 1]) + bytes(9)
    entry = segments[0][0] if segments else 0
    if is64:
        ehdr = struct.pack(
            e + "16sHHIQQQIHHHHHH", ident, etype, machine, 1, entry, ehsize, 0, 0, ehsize,
            phentsize, len(phdrs), 64, 0, 0,
        )  # fmt: skip
        table = b"".join(
            struct.pack(e + "IIQQQQQQ", t, 7, off, paddr, paddr, filesz, memsz, 16)
            for t, off, paddr, filesz, memsz in phdrs
        )
    else:
        ehdr = struct.pack(
            e + "16sHHIIIIIHHHHHH", ident, etype, machine, 1, entry, ehsize, 0, 0, ehsize,
            phentsize, len(phdrs), 40, 0, 0,
        )  # fmt: skip
        table = b"".join(
            struct.pack(e + "IIIIIIII", t, off, paddr, paddr, filesz, memsz, 7, 16)
            for t, off, paddr, filesz, memsz in phdrs
        )
    assert len(ehdr) == ehsize and len(ehdr + table) == data_start
    return ehdr + table + bytes(body)


def setup_header_of(image: bytes) -> SetupHeader:
    raw = image[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)]
    return SetupHeader.from_buffer_copy(raw)


def all_zero(data: bytes) -> bool:
    return data.count(0) == len(data)  # counts in C: fast on tens of MiB
