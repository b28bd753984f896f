"""Layouts of the boot ABI structures: fixed offsets, and the installed kernel headers."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from strato.boot.bootparams import BootE820Entry, BootParams, SetupHeader
from strato.boot.start_info import HvmMemmapTableEntry, HvmModlistEntry, HvmStartInfo


def off(struct: type[ctypes.Structure], field: str) -> int:
    return int(getattr(struct, field).offset)


def test_boot_params_is_one_page_with_fixed_offsets() -> None:
    assert ctypes.sizeof(BootParams) == 4096
    assert ctypes.sizeof(SetupHeader) == 0x7B
    assert ctypes.sizeof(BootE820Entry) == 20
    assert off(BootParams, "acpi_rsdp_addr") == 0x070
    assert off(BootParams, "ext_ramdisk_image") == 0x0C0
    assert off(BootParams, "e820_entries") == 0x1E8
    assert off(BootParams, "sentinel") == 0x1EF
    assert off(BootParams, "hdr") == 0x1F1
    assert off(BootParams, "e820_table") == 0x2D0
    assert off(BootParams, "eddbuf") == 0xD00


@pytest.mark.parametrize(
    ("field", "absolute"),
    [
        ("setup_sects", 0x1F1),
        ("syssize", 0x1F4),
        ("boot_flag", 0x1FE),
        ("jump", 0x200),
        ("header", 0x202),
        ("version", 0x206),
        ("type_of_loader", 0x210),
        ("loadflags", 0x211),
        ("code32_start", 0x214),
        ("ramdisk_image", 0x218),
        ("ramdisk_size", 0x21C),
        ("cmd_line_ptr", 0x228),
        ("initrd_addr_max", 0x22C),
        ("kernel_alignment", 0x230),
        ("relocatable_kernel", 0x234),
        ("xloadflags", 0x236),
        ("cmdline_size", 0x238),
        ("payload_offset", 0x248),
        ("pref_address", 0x258),
        ("init_size", 0x260),
        ("kernel_info_offset", 0x268),
    ],
)
def test_setup_header_fields_sit_where_boot_rst_says(field: str, absolute: int) -> None:
    assert 0x1F1 + off(SetupHeader, field) == absolute


def test_hvm_start_info_layout() -> None:
    assert ctypes.sizeof(HvmStartInfo) == 56
    assert ctypes.sizeof(HvmModlistEntry) == 32
    assert ctypes.sizeof(HvmMemmapTableEntry) == 24
    assert off(HvmStartInfo, "modlist_paddr") == 16
    assert off(HvmStartInfo, "rsdp_paddr") == 32
    assert off(HvmStartInfo, "memmap_paddr") == 40
    assert off(HvmStartInfo, "memmap_entries") == 48


def _compile_and_run(tmp_path: Path, source: str) -> str:
    c = tmp_path / "layout.c"
    c.write_text(source)
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(c)], check=True, capture_output=True, timeout=60)
    return subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_layout_matches_installed_asm_bootparam_h(tmp_path: Path) -> None:
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <asm/bootparam.h>',
             'int main(void) {']  # fmt: skip
    expected = []
    for struct_name, cls in (("boot_params", BootParams), ("setup_header", SetupHeader)):
        lines.append(f'printf("%zu\\n", sizeof(struct {struct_name}));')
        expected.append(ctypes.sizeof(cls))
        for name, *_ in cls._fields_:
            lines.append(f'printf("%zu\\n", offsetof(struct {struct_name}, {name}));')
            expected.append(off(cls, name))
    lines.append("return 0; }")
    try:
        out = _compile_and_run(tmp_path, "\n".join(lines))
    except subprocess.CalledProcessError as e:
        if b"bootparam.h" in e.stderr and b"No such file" in e.stderr:
            pytest.skip("asm/bootparam.h is not installed (linux-libc-dev)")
        raise
    assert [int(x) for x in out.split()] == expected
