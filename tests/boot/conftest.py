"""Fixtures for the boot tests: the real Debian cloud kernel (bzImage and its vmlinux).

`strato.images.debian.ensure_debian_kernel()` provides it when that module exists; until then
this falls back to fetching the newest linux-image-6.1.0-NN-cloud-amd64 with apt-get into a
cache directory and extracting the vmlinux from the bzImage payload itself.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.memory import GuestMemory

CACHE = Path(os.environ.get("STRATO_BOOT_TEST_CACHE", "/tmp/strato-boot-tests"))
MiB = 1 << 20


@dataclass(frozen=True)
class KernelFiles:
    bzimage: Path
    vmlinux: Path | None
    version: str


def _run(*cmd: str, cwd: Path | None = None) -> str:
    result = subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True, timeout=300)
    return str(result.stdout)


def _newest_cloud_kernel_package() -> str:
    out = _run("apt-cache", "search", "--names-only", r"^linux-image-6\.1\.0-[0-9]+-cloud-amd64$")
    names: list[tuple[str, str]] = re.findall(
        r"^(linux-image-6\.1\.0-(\d+)-cloud-amd64) ", out, re.M
    )
    if not names:
        raise RuntimeError("apt-cache knows no linux-image-6.1.0-NN-cloud-amd64 (apt-get update?)")
    return max(names, key=lambda n: int(n[1]))[0]


def decompress_payload(payload: bytes) -> bytes | None:
    """The vmlinux inside a bzImage payload, or None if no decompressor is available here."""
    if payload[:2] == b"\x1f\x8b":
        return gzip.decompress(payload)
    if payload[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMADecompressor().decompress(payload)
    tools = {
        b"\x28\xb5\x2f\xfd": ("zstd", "-dc"),
        b"\x02\x21\x4c\x18": ("lz4", "-dc"),  # legacy LZ4 frames, as the kernel build makes
    }
    tool = tools.get(payload[:4])
    if tool is None or shutil.which(tool[0]) is None:
        return None
    # The kernel build appends the uncompressed size (4 bytes); the CLI tools reject it.
    data = subprocess.run(
        tool, input=payload[:-4], capture_output=True, check=False, timeout=120
    ).stdout
    return data if data[:4] == b"\x7fELF" else None


def extract_vmlinux(bzimage: Path, out: Path) -> Path | None:
    data = bzimage.read_bytes()
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    vmlinux = decompress_payload(data[start : start + length])
    if vmlinux is None:
        return None
    out.write_bytes(vmlinux)
    return out


def _fetch_kernel() -> KernelFiles:
    CACHE.mkdir(parents=True, exist_ok=True)
    found = sorted(CACHE.glob("root/boot/vmlinuz-*"))
    if not found:
        package = _newest_cloud_kernel_package()
        for old in CACHE.glob("*.deb"):
            old.unlink()
        _run("apt-get", "download", package, cwd=CACHE)
        (deb,) = CACHE.glob("*.deb")
        _run("dpkg", "-x", str(deb), str(CACHE / "root"))
        found = sorted(CACHE.glob("root/boot/vmlinuz-*"))
    bzimage = found[-1]
    version = bzimage.name.removeprefix("vmlinuz-")
    vmlinux = CACHE / f"vmlinux-{version}"
    if not vmlinux.exists() and extract_vmlinux(bzimage, vmlinux) is None:
        return KernelFiles(bzimage, None, version)
    return KernelFiles(bzimage, vmlinux, version)


@pytest.fixture(scope="session")
def debian_kernel() -> KernelFiles:
    try:
        from strato.images.debian import ensure_debian_kernel

        k = ensure_debian_kernel()
        return KernelFiles(Path(k.bzimage), Path(k.vmlinux), str(k.version))
    except Exception as first:  # the images module is missing or cannot download
        try:
            return _fetch_kernel()
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            pytest.skip(f"the Debian cloud kernel could not be fetched: {first}; {e}")


@pytest.fixture(scope="session")
def debian_vmlinux(debian_kernel: KernelFiles) -> Path:
    if debian_kernel.vmlinux is None:
        pytest.skip("no decompressor for this kernel's payload (install lz4/zstd)")
    return debian_kernel.vmlinux


@pytest.fixture
def mem128() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous([(0, 128 * MiB)])
    yield mem
    mem.close()


@pytest.fixture
def mem256() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous([(0, 256 * MiB)])
    yield mem
    mem.close()
