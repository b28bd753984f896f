"""Loading a Linux bzImage for the x86 64-bit boot protocol.

Documentation/arch/x86/boot.rst: the protected-mode part of the image is copied to RAM, a
zero page (struct boot_params) carries the setup header, command line, initramfs and e820 map,
and the vCPU starts in long mode at load address + 0x200 with RSI pointing at the zero page.
Every check runs before guest memory is written.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from strato.boot._common import cmdline_bytes, place_initramfs
from strato.boot._image import ImageSource, open_image, read_at, read_into, size_of
from strato.boot.bootparams import (
    E820_MAX_ENTRIES_ZEROPAGE,
    HDRS_MAGIC,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    TYPE_OF_LOADER_UNDEFINED,
    XLF_KERNEL_64,
    BootParams,
    SetupHeader,
)
from strato.boot.cmdline import Cmdline
from strato.boot.e820 import build_e820, low_ram_end
from strato.boot.errors import BootError
from strato.boot.layout import LAYOUT, X86Layout
from strato.boot.result import BootMode, LoadedKernel
from strato.memory import GuestMemory

__all__ = [
    "ENTRY_64_OFFSET",
    "MIN_PROTOCOL",
    "PROTOCOL_KERNEL_64",
    "BzImage",
    "load_bzimage",
    "parse_bzimage",
    "read_setup_header",
]

MIN_PROTOCOL = 0x206  # cmdline_size appears in 2.06
PROTOCOL_KERNEL_64 = 0x20C  # xloadflags (and so XLF_KERNEL_64) appear in 2.12
ENTRY_64_OFFSET = 0x200  # the 64-bit entry point, relative to the load address
_HEADER_END = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)  # 0x26c
_INIT_SIZE_END = 0x264  # the last field strato needs (init_size) ends here
_MAGIC_END = 0x206
_DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF  # boot.rst: what to assume when the field is 0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


@dataclass(frozen=True)
class BzImage:
    """The checked facts of a bzImage's setup header."""

    header: SetupHeader
    header_bytes: bytes  # the image's setup header, 0x1f1 up to its end (0x202 + byte 0x201)
    setup_size: int  # real-mode part (boot sector + setup sectors), skipped
    kernel_size: int  # protected-mode part, copied to guest memory
    file_size: int


def _parse(f: BinaryIO, name: str) -> BzImage:
    size = size_of(f)
    head = read_at(f, 0, _HEADER_END)
    if size < _MAGIC_END or len(head) < _MAGIC_END:
        raise BootError(f"{name} is not a kernel: only {size} bytes long")
    if int.from_bytes(head[0x202:0x206], "little") != HDRS_MAGIC:
        raise BootError(f"{name} is not a bzImage: no 'HdrS' magic at offset 0x202")
    version = int.from_bytes(head[0x206:0x208], "little") if len(head) >= 0x208 else 0
    if version < MIN_PROTOCOL:
        raise BootError(
            f"{name} uses boot protocol {_version(version)}, which is too old: strato needs "
            f"{_version(MIN_PROTOCOL)} or newer"
        )
    if version < PROTOCOL_KERNEL_64:
        raise BootError(
            f"{name} uses boot protocol {_version(version)}, which cannot advertise a 64-bit "
            "entry point; strato boots through it and needs protocol "
            f"{_version(PROTOCOL_KERNEL_64)} (Linux 3.8) or newer"
        )
    header_end = min(0x202 + head[0x201], _HEADER_END)
    if header_end < _INIT_SIZE_END:
        raise BootError(
            f"{name}: its setup header ends at {header_end:#x}, too short for protocol "
            f"{_version(version)}"
        )
    if len(head) < header_end:
        raise BootError(f"{name} is truncated: the file ends inside the setup header")
    header_bytes = head[SETUP_HEADER_OFFSET:header_end]
    header = SetupHeader.from_buffer_copy(header_bytes.ljust(ctypes.sizeof(SetupHeader), b"\0"))
    if not header.loadflags & LOADED_HIGH:
        raise BootError(f"{name} is a zImage (loaded below 1 MiB); strato boots bzImages only")
    if not header.xloadflags & XLF_KERNEL_64:
        raise BootError(
            f"{name} has no 64-bit entry point (XLF_KERNEL_64 is clear in xloadflags): "
            "strato boots x86_64 kernels only"
        )
    setup_size = (header.setup_sectors + 1) * 512
    kernel_size = header.syssize * 16
    if kernel_size == 0:
        raise BootError(f"{name}: its setup header says the kernel is empty (syssize 0)")
    if kernel_size <= ENTRY_64_OFFSET:
        raise BootError(
            f"{name}: its kernel is {kernel_size} bytes (syssize {header.syssize}), too short to "
            f"hold the 64-bit entry point at offset {ENTRY_64_OFFSET:#x}"
        )
    if setup_size + kernel_size > size:
        raise BootError(
            f"{name} is truncated: the header says {setup_size} bytes of setup plus "
            f"{kernel_size} bytes of kernel, the file has {size} bytes"
        )
    return BzImage(header, header_bytes, setup_size, kernel_size, size)


def parse_bzimage(kernel: ImageSource) -> BzImage:
    """Check a bzImage's header and return what it says (nothing is loaded)."""
    with open_image(kernel, "kernel") as (f, name):
        return _parse(f, name)


def read_setup_header(kernel: ImageSource) -> SetupHeader:
    return parse_bzimage(kernel).header


def _decompress_end(image: BzImage, load: int) -> int:
    """First byte after the memory the kernel uses when loaded at `load`.

    The decompressor runs at max(load aligned up to kernel_alignment, LOAD_PHYSICAL_ADDR) for
    a relocatable kernel, at LOAD_PHYSICAL_ADDR (= pref_address) otherwise, and needs
    init_size bytes there.
    """
    hdr = image.header
    pref = int(hdr.pref_address)
    if hdr.relocatable_kernel:
        align = int(hdr.kernel_alignment)
        out = max((load + align - 1) & ~(align - 1), pref)
    else:
        out = pref or load
    return max(load + image.kernel_size, out + max(int(hdr.init_size), image.kernel_size))


def _choose_load_address(image: BzImage, name: str, layout: X86Layout, ram_end: int) -> int:
    hdr = image.header
    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if align == 0 or align & (align - 1):
            raise BootError(f"{name}: kernel_alignment {align:#x} is not a power of two")
    candidates = [layout.high_ram]
    if hdr.pref_address >= layout.high_ram:
        candidates.insert(0, hdr.pref_address)
    for load in candidates:
        if _decompress_end(image, load) <= ram_end:
            return load
    need = _decompress_end(image, layout.high_ram)
    raise BootError(
        f"kernel {name} does not fit in guest memory: it needs RAM up to {need:#x} "
        f"({_mib(need)}) to load and decompress (init_size {_mib(hdr.init_size)}), the guest "
        f"has {_mib(ram_end)} below 4 GiB"
    )


def load_bzimage(
    mem: GuestMemory,
    kernel: ImageSource,
    cmdline: bytes | str | Cmdline,
    initramfs: ImageSource | None = None,
    layout: X86Layout = LAYOUT,
    *,
    rsdp_addr: int = 0,
    reserved: Iterable[tuple[int, int]] = (),
) -> LoadedKernel:
    """Load a bzImage, its command line and initramfs, and build the zero page.

    `reserved` are extra (start, size) ranges marked reserved in the e820 map.
    """
    cmd = cmdline_bytes(cmdline, layout)
    ram_end = low_ram_end(mem, layout)
    e820 = build_e820(mem, layout, reserved)
    if len(e820) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(
            f"the memory map has {len(e820)} entries; the zero page holds "
            f"{E820_MAX_ENTRIES_ZEROPAGE}"
        )
    with open_image(kernel, "kernel") as (kf, kname):
        image = _parse(kf, kname)
        hdr = image.header
        if len(cmd) > hdr.cmdline_size:
            raise BootError(
                f"kernel command line too long: {len(cmd)} bytes, kernel {kname} accepts at "
                f"most {hdr.cmdline_size}"
            )
        load = _choose_load_address(image, kname, layout, ram_end)
        kernel_end = _decompress_end(image, load)
        initrd_addr = initrd_size = 0
        if initramfs is not None:
            with open_image(initramfs, "initramfs") as (rf, rname):
                initrd_size = size_of(rf)
                initrd_max = hdr.initrd_addr_max or _DEFAULT_INITRD_ADDR_MAX
                limit = min(initrd_max + 1, ram_end)
                initrd_addr = place_initramfs(initrd_size, kernel_end, limit, e820, rname)
                # All checks passed: from here on guest memory is written.
                read_into(rf, 0, mem.view(initrd_addr, initrd_size), "initramfs", rname)
        read_into(kf, image.setup_size, mem.view(load, image.kernel_size), "kernel", kname)

    mem.write(layout.cmdline, cmd + b"\0")
    params = _zero_page(image, load, layout, cmd, initrd_addr, initrd_size, rsdp_addr)
    for i, entry in enumerate(e820):
        params.e820_table[i].addr = entry.addr
        params.e820_table[i].size = entry.size
        params.e820_table[i].type = int(entry.type)
    params.e820_entries = len(e820)
    mem.write_obj(layout.zero_page, params)
    return LoadedKernel(
        mode=BootMode.LINUX64,
        entry=load + ENTRY_64_OFFSET,
        boot_info=layout.zero_page,
        kernel_start=load,
        kernel_end=kernel_end,
        cmdline_addr=layout.cmdline,
        cmdline_size=len(cmd),
        initramfs_addr=initrd_addr,
        initramfs_size=initrd_size,
        rsdp_addr=rsdp_addr,
        e820=tuple(e820),
        protocol_version=hdr.version,
    )


def _zero_page(
    image: BzImage,
    load: int,
    layout: X86Layout,
    cmd: bytes,
    initrd_addr: int,
    initrd_size: int,
    rsdp_addr: int,
) -> BootParams:
    """A clean zero page carrying the image's own setup header, then strato's fields."""
    raw = bytearray(ctypes.sizeof(BootParams))
    raw[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(image.header_bytes)] = image.header_bytes
    params = BootParams.from_buffer(raw)
    hdr = params.hdr
    hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED
    hdr.code32_start = load
    hdr.cmd_line_ptr = layout.cmdline
    hdr.ramdisk_image = initrd_addr
    hdr.ramdisk_size = initrd_size
    params.acpi_rsdp_addr = rsdp_addr
    return params
