"""Both loaders on the real Debian cloud kernel: its bzImage and the vmlinux inside it."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.boot import BootError, BootMode, detect_boot_mode, load_kernel
from strato.boot.bootparams import LOADED_HIGH, XLF_KERNEL_64, BootParams
from strato.boot.bzimage import parse_bzimage
from strato.boot.elf import parse_elf
from strato.boot.start_info import HvmModlistEntry, HvmStartInfo
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, MiB

from .conftest import KernelFiles
from .synth import all_zero

INITRD = bytes(range(256)) * 4096  # 1 MiB


def test_bzimage_header(debian_kernel: KernelFiles) -> None:
    image = parse_bzimage(debian_kernel.bzimage)
    hdr = image.header
    assert hdr.version >= 0x20C
    assert hdr.loadflags & LOADED_HIGH
    assert hdr.xloadflags & XLF_KERNEL_64
    assert hdr.relocatable_kernel
    assert hdr.pref_address == 16 * MiB
    assert hdr.cmdline_size >= 255
    assert 16 * MiB < hdr.init_size < 128 * MiB
    assert image.setup_size + image.kernel_size <= image.file_size


def test_bzimage_loads(debian_kernel: KernelFiles, mem256: GuestMemory) -> None:
    data = debian_kernel.bzimage.read_bytes()
    image = parse_bzimage(debian_kernel.bzimage)
    assert detect_boot_mode(debian_kernel.bzimage) is BootMode.LINUX64
    k = load_kernel(mem256, debian_kernel.bzimage, b"console=ttyS0 panic=-1", io.BytesIO(INITRD))
    assert k.mode is BootMode.LINUX64
    assert k.kernel_start == image.header.pref_address
    assert k.entry == k.kernel_start + 0x200
    assert mem256.read(k.entry, 2) == b"\xfc\xfa"  # startup_64: cld; cli
    protected = data[image.setup_size : image.setup_size + image.kernel_size]
    assert mem256.read(k.kernel_start, len(protected)) == protected

    zp = mem256.read_obj(LAYOUT.zero_page, BootParams)
    assert zp.hdr.header == 0x53726448
    assert zp.hdr.version == image.header.version
    assert zp.hdr.init_size == image.header.init_size
    assert zp.hdr.type_of_loader == 0xFF
    assert zp.hdr.cmd_line_ptr == LAYOUT.cmdline
    assert mem256.read(LAYOUT.cmdline, 23) == b"console=ttyS0 panic=-1\0"
    assert (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size) == (k.initramfs_addr, len(INITRD))
    assert zp.hdr.ramdisk_image == 255 * MiB  # highest page below 256 MiB that fits 1 MiB
    assert mem256.read(zp.hdr.ramdisk_image, len(INITRD)) == INITRD
    assert k.kernel_end <= zp.hdr.ramdisk_image
    e820 = [(e.addr, e.size, e.type) for e in zp.e820_table[: zp.e820_entries]]
    assert e820 == [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (1 * MiB, 255 * MiB, 1)]


def test_bzimage_needs_room_to_decompress(debian_kernel: KernelFiles) -> None:
    mem = GuestMemory.anonymous([(0, 48 * MiB)])
    try:
        with pytest.raises(BootError, match="does not fit in guest memory"):
            load_kernel(mem, debian_kernel.bzimage, b"")
        assert all_zero(mem.read(16 * MiB, 1 * MiB))
    finally:
        mem.close()


def test_vmlinux_pvh_note(debian_vmlinux: Path) -> None:
    image = parse_elf(debian_vmlinux)
    assert image.elf_class == 64
    assert image.pvh_entry is not None
    first = min(image.segments, key=lambda s: s.paddr)
    assert first.paddr == 16 * MiB
    assert first.paddr <= image.pvh_entry < first.end
    # The entry is pvh_start_xen: "cld; lgdt ..." in 32-bit code.
    with open(debian_vmlinux, "rb") as f:
        f.seek(first.offset + image.pvh_entry - first.paddr)
        assert f.read(3) == b"\xfc\x0f\x01"
    with open(debian_vmlinux, "rb") as f:
        elf = ELFFile(f)
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [(s["p_paddr"], s["p_memsz"]) for s in loads] == [
            (s.paddr, s.memsz) for s in image.segments
        ]


def test_vmlinux_loads_with_pvh(debian_vmlinux: Path, mem256: GuestMemory) -> None:
    assert detect_boot_mode(debian_vmlinux) is BootMode.PVH
    k = load_kernel(mem256, debian_vmlinux, b"console=ttyS0", io.BytesIO(INITRD),
                    rsdp_addr=LAYOUT.rsdp)  # fmt: skip
    image = parse_elf(debian_vmlinux)
    assert k.mode is BootMode.PVH and k.entry == image.pvh_entry
    assert mem256.read(k.entry, 3) == b"\xfc\x0f\x01"
    with open(debian_vmlinux, "rb") as f:
        for seg in image.segments:
            f.seek(seg.offset)
            assert mem256.read(seg.paddr, seg.filesz) == f.read(seg.filesz)
    info = mem256.read_obj(LAYOUT.pvh_info, HvmStartInfo)
    assert (info.magic, info.version, info.nr_modules) == (0x336EC578, 1, 1)
    assert (info.cmdline_paddr, info.rsdp_paddr) == (LAYOUT.cmdline, LAYOUT.rsdp)
    assert info.memmap_entries == 3
    mod = mem256.read_obj(info.modlist_paddr, HvmModlistEntry)
    assert (mod.paddr, mod.size) == (255 * MiB, len(INITRD))
    assert k.kernel_end <= mod.paddr


def test_vmlinux_needs_enough_ram(debian_vmlinux: Path) -> None:
    mem = GuestMemory.anonymous([(0, 32 * MiB)])
    try:
        with pytest.raises(BootError, match="outside guest RAM"):
            load_kernel(mem, debian_vmlinux, b"")
    finally:
        mem.close()


_FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FEW
@given(cut=st.floats(min_value=0.0, max_value=0.999))
def test_truncated_bzimage_is_a_boot_error(debian_kernel: KernelFiles, cut: float) -> None:
    data = debian_kernel.bzimage.read_bytes()
    image = parse_bzimage(io.BytesIO(data))
    length = int(cut * (image.setup_size + image.kernel_size))
    mem = GuestMemory.anonymous([(0, 128 * MiB)])
    try:
        with pytest.raises(BootError):
            load_kernel(mem, io.BytesIO(data[:length]), b"")
    finally:
        mem.close()


@_FEW
@given(cut=st.floats(min_value=0.0, max_value=0.999))
def test_truncated_vmlinux_is_a_boot_error(debian_vmlinux: Path, cut: float) -> None:
    data = debian_vmlinux.read_bytes()
    # The loader needs the program headers and segment contents, not what follows them
    # (section headers, and the relocations the kernel build appends).
    needed = max(s.offset + s.filesz for s in parse_elf(io.BytesIO(data)).segments)
    mem = GuestMemory.anonymous([(0, 128 * MiB)])
    try:
        with pytest.raises(BootError):
            load_kernel(mem, io.BytesIO(data[: int(cut * needed)]), b"")
    finally:
        mem.close()


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (0x202, b"HdrX", "neither a bzImage nor an ELF"),
        (0x206, b"\x05\x02", "too old"),
        (0x236, b"\x00\x00", "no 64-bit entry point"),
    ],
)
def test_corrupted_bzimage_header(
    debian_kernel: KernelFiles, mem128: GuestMemory, offset: int, value: bytes, message: str
) -> None:
    data = bytearray(debian_kernel.bzimage.read_bytes())
    data[offset : offset + len(value)] = value
    with pytest.raises(BootError, match=message):
        load_kernel(mem128, io.BytesIO(bytes(data)), b"")


def test_vmlinux_without_pvh_note(debian_vmlinux: Path, mem128: GuestMemory) -> None:
    data = bytearray(debian_vmlinux.read_bytes())
    image = parse_elf(io.BytesIO(bytes(data)))
    assert image.pvh_entry is not None
    needle = (18).to_bytes(4, "little") + b"Xen\0"
    pos = data.find(needle)
    assert pos > 0
    data[pos : pos + 4] = (99).to_bytes(4, "little")  # rename the note type
    with pytest.raises(BootError, match="no PVH entry point"):
        load_kernel(mem128, io.BytesIO(bytes(data)), b"")
