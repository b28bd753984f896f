"""Reading a bzImage: its setup header and the ELF vmlinux compressed inside it.

Boot protocol >= 2.08 records where the compressed kernel sits: ``payload_offset`` (0x248)
and ``payload_length`` (0x24c), counted from the start of the protected-mode code, which
begins after the ``setup_sects`` (0x1f1) 512-byte sectors of real-mode setup plus the boot
sector. The kernel build appends the uncompressed size as a little-endian u32 to every
payload (gzip's own trailer holds the same), which lets us check the result.
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

from strato.images.errors import ImageError

HDRS_MAGIC = b"HdrS"
_HDRS_OFFSET = 0x202
_MIN_VERSION = 0x0208  # the first protocol with payload_offset/payload_length
_LZMA_MEMLIMIT = 256 << 20  # kernel images use small dictionaries; refuse absurd headers

# Magic bytes of each compressor the kernel build can use, first match wins.
_MAGICS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x5d\x00\x00", "lzma"),
    (b"\x89LZO", "lzo"),
    (b"\x02\x21\x4c\x18", "lz4"),  # the lz4 "legacy" frame that the kernel build writes
    (b"\x28\xb5\x2f\xfd", "zstd"),
)
# Decompressors that need a command line tool: (command, Debian package).
_TOOLS = {
    "lz4": (["lz4", "-dc"], "lz4"),
    "zstd": (["zstd", "-dc"], "zstd"),
    "lzo": (["lzop", "-dc"], "lzop"),
}


@dataclass(frozen=True)
class SetupHeader:
    version: int
    setup_sects: int
    payload_offset: int
    payload_length: int

    @property
    def protected_mode_offset(self) -> int:
        """File offset of the 32-bit code: the boot sector plus the setup sectors."""
        return (self.setup_sects + 1) * 512


def parse_setup_header(image: bytes) -> SetupHeader:
    if len(image) < 0x250 or image[_HDRS_OFFSET : _HDRS_OFFSET + 4] != HDRS_MAGIC:
        raise ImageError("not a bzImage: no 'HdrS' setup header at 0x202")
    (version,) = struct.unpack_from("<H", image, 0x206)
    if version < _MIN_VERSION:
        raise ImageError(f"boot protocol {version >> 8}.{version & 0xFF:02d} has no payload fields")
    setup_sects = image[0x1F1] or 4  # 0 means 4 (historic default)
    payload_offset, payload_length = struct.unpack_from("<II", image, 0x248)
    return SetupHeader(version, setup_sects, payload_offset, payload_length)


def payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage."""
    header = parse_setup_header(image)
    start = header.protected_mode_offset + header.payload_offset
    end = start + header.payload_length
    if header.payload_length < 8 or end > len(image):
        raise ImageError(f"bzImage payload [{start:#x}, {end:#x}) lies outside the file")
    return image[start:end]


def compression_of(data: bytes) -> str:
    for magic, name in _MAGICS:
        if data.startswith(magic):
            return name
    raise ImageError(f"unknown kernel payload compression (starts with {data[:6].hex()})")


def decompress_payload(data: bytes) -> bytes:
    """Decompress a kernel payload and check it against the size stored in its last 4 bytes."""
    kind = compression_of(data)
    (expected,) = struct.unpack_from("<I", data, len(data) - 4)
    body = data[:-4]  # the appended size is no part of the compressed stream
    try:
        if kind == "gzip":
            out = zlib.decompressobj(wbits=31).decompress(data)
        elif kind == "xz":
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=_LZMA_MEMLIMIT).decompress(body)
        elif kind == "lzma":
            out = lzma.LZMADecompressor(lzma.FORMAT_ALONE, memlimit=_LZMA_MEMLIMIT).decompress(body)
        elif kind == "bzip2":
            out = bz2.BZ2Decompressor().decompress(body)
        else:
            out = _decompress_with_tool(kind, body)
    except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
        raise ImageError(f"cannot decompress the {kind} kernel payload: {e}") from e
    if len(out) & 0xFFFF_FFFF != expected:
        raise ImageError(f"{kind} kernel payload gave {len(out)} bytes, header says {expected}")
    return out


def _decompress_with_tool(kind: str, body: bytes) -> bytes:
    cmd, package = _TOOLS[kind]
    if shutil.which(cmd[0]) is None:
        raise ImageError(
            f"the kernel is {kind}-compressed and '{cmd[0]}' is missing: apt-get install {package}"
        )
    done = subprocess.run(cmd, input=body, capture_output=True, check=False)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise ImageError(f"{' '.join(cmd)} failed (exit {done.returncode}): {err}")
    return done.stdout


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage; checked to be an x86-64 ELF."""
    elf = decompress_payload(payload(image))
    # e_ident: magic, ELFCLASS64 (2); e_machine at 18: EM_X86_64 (62).
    if elf[:5] != b"\x7fELF\x02" or struct.unpack_from("<H", elf, 18)[0] != 62:
        raise ImageError("the bzImage payload is not an x86-64 ELF kernel")
    return elf
