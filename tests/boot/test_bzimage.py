"""The bzImage loader on synthetic images: what lands where, and every rejection."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.boot import BootError, BootMode, E820Type, load_bzimage
from strato.boot.bootparams import BootParams
from strato.boot.bzimage import parse_bzimage
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT, MiB

from .synth import KERNEL_BODY, all_zero, make_bzimage, setup_header_of

SETUP = 1024  # make_bzimage's default: boot sector + 1 setup sector


@pytest.fixture
def mem64() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous([(0, 64 * MiB)])
    yield mem
    mem.close()


def zero_page(mem: GuestMemory) -> BootParams:
    return mem.read_obj(LAYOUT.zero_page, BootParams)


def test_loads_at_pref_address_and_builds_the_zero_page(mem64: GuestMemory) -> None:
    image = make_bzimage()
    initrd = bytes(range(256)) * 40  # 10 KiB
    k = load_bzimage(mem64, io.BytesIO(image), b"console=ttyS0", io.BytesIO(initrd),
                     rsdp_addr=LAYOUT.rsdp)  # fmt: skip
    assert k.mode is BootMode.LINUX64
    assert k.kernel_start == 0x1000000
    assert k.entry == 0x1000200
    assert mem64.read(k.entry, 2) == b"\xfc\xfa"
    assert mem64.read(k.kernel_start, len(image) - SETUP) == image[SETUP:]
    assert k.kernel_end == 0x1000000 + 0x400000  # pref_address + init_size
    assert k.boot_info == LAYOUT.zero_page
    assert k.protocol_version == 0x20F

    zp = zero_page(mem64)
    expected = setup_header_of(image)
    for name, value in [("type_of_loader", 0xFF), ("code32_start", k.kernel_start),
                        ("cmd_line_ptr", LAYOUT.cmdline), ("ramdisk_image", k.initramfs_addr),
                        ("ramdisk_size", len(initrd))]:  # fmt: skip
        setattr(expected, name, value)
    assert bytes(zp.hdr) == bytes(expected)  # the image's header, plus the loader's fields
    assert zp.hdr.header == 0x53726448 and zp.hdr.version == 0x20F
    assert zp.hdr.setup_sects == 1 and zp.hdr.syssize == (len(image) - SETUP) // 16
    assert zp.hdr.type_of_loader == 0xFF
    assert zp.hdr.code32_start == k.kernel_start
    assert zp.hdr.cmd_line_ptr == LAYOUT.cmdline
    assert mem64.read(LAYOUT.cmdline, 14) == b"console=ttyS0\0"
    assert k.cmdline_size == 13
    assert zp.acpi_rsdp_addr == LAYOUT.rsdp
    assert zp.sentinel == 0

    assert (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size) == (k.initramfs_addr, len(initrd))
    assert k.initramfs_addr % 4096 == 0
    assert k.initramfs_addr + len(initrd) <= 64 * MiB < k.initramfs_addr + len(initrd) + 4096
    assert mem64.read(k.initramfs_addr, len(initrd)) == initrd

    e820 = [(e.addr, e.size, e.type) for e in zp.e820_table[: zp.e820_entries]]
    assert e820 == [(e.addr, e.size, int(e.type)) for e in k.e820]
    assert e820[-1] == (1 * MiB, 63 * MiB, int(E820Type.RAM))


def test_accepts_a_path(tmp_path: Path, mem64: GuestMemory) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(make_bzimage())
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x" * 5000)
    k = load_bzimage(mem64, path, "")
    assert k.initramfs_size == 0 and zero_page(mem64).hdr.ramdisk_image == 0
    k = load_bzimage(mem64, str(path), "", initrd)
    assert k.initramfs_size == 5000


def test_loads_at_1mib_without_pref_address(mem64: GuestMemory) -> None:
    k = load_bzimage(mem64, io.BytesIO(make_bzimage(pref_address=0)), b"")
    assert k.kernel_start == 1 * MiB and k.entry == 1 * MiB + 0x200
    assert k.kernel_end == 2 * MiB + 0x400000  # decompressed at 1 MiB aligned up to 2 MiB


def test_initramfs_stays_below_initrd_addr_max(mem64: GuestMemory) -> None:
    image = make_bzimage(initrd_addr_max=32 * MiB - 1)
    k = load_bzimage(mem64, io.BytesIO(image), b"", io.BytesIO(b"y" * 10000))
    assert k.initramfs_addr == 32 * MiB - 3 * 4096


def test_extra_reserved_range_reaches_the_zero_page(mem64: GuestMemory) -> None:
    load_bzimage(mem64, io.BytesIO(make_bzimage()), b"", reserved=[(60 * MiB, 4 * MiB)])
    zp = zero_page(mem64)
    last = zp.e820_table[zp.e820_entries - 1]
    assert (last.addr, last.size, last.type) == (60 * MiB, 4 * MiB, int(E820Type.RESERVED))


def test_initramfs_avoids_reserved_ranges(mem64: GuestMemory) -> None:
    reserved = [(62 * MiB, 2 * MiB), (40 * MiB, 20 * MiB)]
    k = load_bzimage(mem64, io.BytesIO(make_bzimage()), b"", io.BytesIO(b"r" * 3 * MiB),
                     reserved=reserved)  # fmt: skip
    assert k.initramfs_addr == 37 * MiB  # 60..62 MiB is too small, 40..60 MiB is reserved


def test_header_end_follows_the_jump_byte(mem64: GuestMemory) -> None:
    # Protocol 2.12's header ends at 0x268: kernel_info_offset must not be copied.
    image = bytearray(make_bzimage(jump=0x66EB, kernel_info_offset=0x12345678))
    load_bzimage(mem64, io.BytesIO(bytes(image)), b"")
    assert zero_page(mem64).hdr.kernel_info_offset == 0


REJECTIONS: list[tuple[dict[str, Any], str]] = [
    ({"header": 0x12345678}, "no 'HdrS' magic"),
    ({"version": 0x205}, "too old"),
    ({"version": 0x20B}, "cannot advertise a 64-bit entry"),
    ({"xloadflags": 0}, "no 64-bit entry point"),
    ({"loadflags": 0}, "zImage"),
    ({"syssize": 0}, "empty"),
    ({"syssize": 1}, "too short to hold the 64-bit entry point"),  # found by tests/fuzz
    ({"syssize": 0x10000}, "truncated"),
    ({"jump": 0x40EB}, "setup header ends at 0x242"),
    ({"init_size": 0x8000000}, "does not fit in guest memory"),
    ({"pref_address": 62 * MiB}, "does not fit in guest memory"),
    ({"kernel_alignment": 0x300000}, "not a power of two"),
    ({"cmdline_size": 4}, "kernel command line too long"),
]


@pytest.mark.parametrize(("fields", "message"), REJECTIONS)
def test_rejections_leave_memory_untouched(
    mem64: GuestMemory, fields: dict[str, Any], message: str
) -> None:
    image = make_bzimage(**fields)
    with pytest.raises(BootError, match=message):
        load_bzimage(mem64, io.BytesIO(image), b"console=ttyS0", io.BytesIO(b"z" * 4096))
    assert all_zero(mem64.read(0, 64 * MiB))


@pytest.mark.parametrize(
    ("initrd", "message"),
    [(b"", "is empty"), (b"i" * 61 * MiB, "does not fit in guest memory")],
    ids=["empty", "too-big"],
)
def test_initramfs_rejections(mem64: GuestMemory, initrd: bytes, message: str) -> None:
    with pytest.raises(BootError, match=message):
        load_bzimage(mem64, io.BytesIO(make_bzimage()), b"", io.BytesIO(initrd))
    assert all_zero(mem64.read(0, 64 * MiB))


def test_missing_files(tmp_path: Path, mem64: GuestMemory) -> None:
    with pytest.raises(BootError, match="cannot open kernel"):
        load_bzimage(mem64, tmp_path / "nope", b"")
    with pytest.raises(BootError, match="cannot open initramfs"):
        load_bzimage(mem64, io.BytesIO(make_bzimage()), b"", tmp_path / "nope")


def test_setup_sectors_past_the_end_of_file(mem64: GuestMemory) -> None:
    image = bytearray(make_bzimage())
    image[0x1F1] = 200
    with pytest.raises(BootError, match="truncated: the header says 102912 bytes of setup"):
        load_bzimage(mem64, io.BytesIO(bytes(image)), b"")


def test_too_short_file() -> None:
    with pytest.raises(BootError, match="only 100 bytes"):
        parse_bzimage(io.BytesIO(bytes(100)))


def test_memory_without_low_ram_is_rejected() -> None:
    mem = GuestMemory.anonymous([(1 * MiB, 64 * MiB)])
    try:
        with pytest.raises(BootError, match="start at address 0"):
            load_bzimage(mem, io.BytesIO(make_bzimage()), b"")
    finally:
        mem.close()


_SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_SMALL_MEM = GuestMemory.anonymous([(0, 24 * MiB)])


@_SLOW
@given(st.binary(max_size=2048))
def test_random_bytes_are_a_boot_error(data: bytes) -> None:
    with pytest.raises(BootError):
        load_bzimage(_SMALL_MEM, io.BytesIO(data), b"")


@_SLOW
@given(st.integers(min_value=0, max_value=len(make_bzimage()) - 1))
def test_truncated_image_is_a_boot_error(length: int) -> None:
    with pytest.raises(BootError):
        load_bzimage(_SMALL_MEM, io.BytesIO(make_bzimage()[:length]), b"")


@_SLOW
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "setup_sects": st.integers(0, 255),
            "version": st.integers(0, 0xFFFF),
            "loadflags": st.integers(0, 255),
            "xloadflags": st.integers(0, 0xFFFF),
            "relocatable_kernel": st.integers(0, 255),
            "kernel_alignment": st.integers(0, 2**32 - 1),
            "pref_address": st.integers(0, 2**64 - 1),
            "init_size": st.integers(0, 2**32 - 1),
            "syssize": st.integers(0, 2**32 - 1),
            "cmdline_size": st.integers(0, 2**32 - 1),
            "initrd_addr_max": st.integers(0, 2**32 - 1),
            "jump": st.integers(0, 0xFFFF),
        },
    )
)
def test_any_header_values_load_or_raise_boot_error(fields: dict[str, Any]) -> None:
    image = make_bzimage(KERNEL_BODY, **fields)
    try:
        k = load_bzimage(_SMALL_MEM, io.BytesIO(image), b"ro", io.BytesIO(b"i" * 8192))
    except BootError:
        return
    assert 1 * MiB <= k.kernel_start < k.kernel_end <= 24 * MiB
    assert k.kernel_end <= k.initramfs_addr and k.initramfs_addr + 8192 <= 24 * MiB
