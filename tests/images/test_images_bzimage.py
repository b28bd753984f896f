"""Extracting vmlinux from a bzImage: synthetic images for every compressor, and bad input."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.images.bzimage import (
    compression_of,
    extract_vmlinux,
    parse_setup_header,
    payload,
)
from strato.images.errors import ImageError

# A minimal "ELF": x86-64 class and machine, then filler that compresses well.
FAKE_ELF = b"\x7fELF\x02\x01\x01" + bytes(11) + struct.pack("<H", 62) + bytes(range(256)) * 64


def make_bzimage(compressed: bytes, *, setup_sects: int = 3, payload_offset: int = 0x40) -> bytes:
    """A bzImage skeleton: boot sector + setup sectors, then the payload inside the 32-bit code."""
    pm_start = (setup_sects + 1) * 512
    image = bytearray(pm_start + payload_offset + len(compressed) + 16)
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x020F)
    struct.pack_into("<II", image, 0x248, payload_offset, len(compressed))
    start = pm_start + payload_offset
    image[start : start + len(compressed)] = compressed
    return bytes(image)


def with_size(stream: bytes, size: int = len(FAKE_ELF)) -> bytes:
    """What the kernel build does to every payload: append the uncompressed size."""
    return stream + struct.pack("<I", size)


def tool_stream(cmd: list[str]) -> bytes:
    if shutil.which(cmd[0]) is None:
        pytest.skip(f"{cmd[0]} is not installed")
    return subprocess.run(cmd, input=FAKE_ELF, capture_output=True, check=True).stdout


COMPRESSORS = {
    "gzip": lambda: gzip.compress(FAKE_ELF, mtime=0),  # its trailer already holds the size
    "xz": lambda: with_size(lzma.compress(FAKE_ELF, format=lzma.FORMAT_XZ)),
    "lzma": lambda: with_size(lzma.compress(FAKE_ELF, format=lzma.FORMAT_ALONE)),
    "bzip2": lambda: with_size(bz2.compress(FAKE_ELF)),
    "lz4": lambda: with_size(tool_stream(["lz4", "-l", "-c"])),  # legacy frame, as Kbuild
    "zstd": lambda: with_size(tool_stream(["zstd", "-c", "-q"])),
}


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_extracts_vmlinux_for_each_compressor(kind: str) -> None:
    compressed = COMPRESSORS[kind]()
    image = make_bzimage(compressed)
    assert compression_of(payload(image)) == kind
    assert extract_vmlinux(image) == FAKE_ELF


def test_header_fields() -> None:
    image = make_bzimage(b"x" * 16, setup_sects=5, payload_offset=0x123)
    header = parse_setup_header(image)
    assert (header.setup_sects, header.payload_offset, header.payload_length) == (5, 0x123, 16)
    assert header.protected_mode_offset == 6 * 512
    assert payload(image) == b"x" * 16


def test_setup_sects_zero_means_four() -> None:
    image = bytearray(make_bzimage(b"y" * 16, setup_sects=4))
    image[0x1F1] = 0
    assert parse_setup_header(bytes(image)).setup_sects == 4
    assert payload(bytes(image)) == b"y" * 16


def test_not_a_bzimage() -> None:
    with pytest.raises(ImageError, match="HdrS"):
        parse_setup_header(b"\0" * 4096)


def test_old_boot_protocol() -> None:
    image = bytearray(make_bzimage(b"z" * 16))
    struct.pack_into("<H", image, 0x206, 0x0206)
    with pytest.raises(ImageError, match="no payload fields"):
        parse_setup_header(bytes(image))


def test_payload_outside_file() -> None:
    image = bytearray(make_bzimage(b"z" * 16))
    struct.pack_into("<I", image, 0x24C, 1 << 30)
    with pytest.raises(ImageError, match="outside the file"):
        payload(bytes(image))


def test_unknown_compression() -> None:
    with pytest.raises(ImageError, match="unknown kernel payload compression"):
        extract_vmlinux(make_bzimage(b"NOTCOMPRESSED" * 4))


def test_wrong_size_trailer() -> None:
    compressed = with_size(lzma.compress(FAKE_ELF), size=len(FAKE_ELF) + 1)
    with pytest.raises(ImageError, match="header says"):
        extract_vmlinux(make_bzimage(compressed))


def test_corrupt_stream() -> None:
    compressed = bytearray(with_size(lzma.compress(FAKE_ELF)))
    compressed[20:40] = b"\xff" * 20
    with pytest.raises(ImageError, match="decompress"):
        extract_vmlinux(make_bzimage(bytes(compressed)))


def test_payload_that_is_not_an_x86_64_elf() -> None:
    not_elf = b"just text " * 100
    compressed = gzip.compress(not_elf, mtime=0)
    with pytest.raises(ImageError, match="not an x86-64 ELF"):
        extract_vmlinux(make_bzimage(compressed))


@given(st.binary(max_size=2048))
def test_garbage_payload_raises_only_image_error(garbage: bytes) -> None:
    try:
        extract_vmlinux(make_bzimage(garbage))
    except ImageError:
        pass


@given(st.binary(min_size=0x250, max_size=0x600))
def test_garbage_image_raises_only_image_error(garbage: bytes) -> None:
    image = bytearray(garbage)
    image[0x202:0x206] = b"HdrS"  # get past the first check most of the time
    try:
        extract_vmlinux(bytes(image))
    except ImageError:
        pass
