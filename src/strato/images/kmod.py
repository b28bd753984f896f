"""Finding kernel modules and the modules they depend on, without depmod.

Debian's kernel package ships no modules.dep (depmod runs at install time), so the
dependencies come from each module's own ``.modinfo`` section (``depends=a,b``).
"""

from __future__ import annotations

import gzip
import io
import lzma
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from strato.images.errors import ImageError

_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


@dataclass(frozen=True)
class KernelModule:
    name: str  # the kernel's name for it: dashes become underscores (virtio-rng -> virtio_rng)
    path: Path  # the file in the kernel's modules directory, possibly compressed
    relpath: str  # path under lib/modules/<version>/, with a plain .ko suffix
    depends: tuple[str, ...]


def module_name(filename: str) -> str:
    for suffix in _SUFFIXES:
        if filename.endswith(suffix):
            return filename[: -len(suffix)].replace("-", "_")
    raise ValueError(f"{filename} is not a kernel module file")


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Every module under ``modules_dir`` (lib/modules/<version>) by module name."""
    index: dict[str, Path] = {}
    for path in sorted((modules_dir / "kernel").rglob("*.ko*")):
        if path.name.endswith(_SUFFIXES):
            index.setdefault(module_name(path.name), path)
    return index


def read_module(path: Path) -> bytes:
    """The module's ELF bytes, decompressed (busybox insmod may not read compressed ones)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        if shutil.which("zstd") is None:
            raise ImageError(f"{path.name} is zstd-compressed: apt-get install zstd")
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data


def modinfo(elf: bytes) -> dict[str, str]:
    """The ``key=value`` pairs of a module's ``.modinfo`` section (first value per key)."""
    section = ELFFile(io.BytesIO(elf)).get_section_by_name(".modinfo")
    if section is None:
        raise ImageError("kernel module has no .modinfo section")
    info: dict[str, str] = {}
    for entry in bytes(section.data()).split(b"\0"):
        key, sep, value = entry.decode(errors="replace").partition("=")
        if sep:
            info.setdefault(key, value)
    return info


def module_closure(modules_dir: Path, names: Iterable[str]) -> list[KernelModule]:
    """``names`` and everything they depend on, each after its dependencies."""
    index = module_index(modules_dir)
    ordered: list[KernelModule] = []
    done: set[str] = set()
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in visiting:
            raise ImageError(f"kernel modules depend on each other in a cycle through {name}")
        path = index.get(name)
        if path is None:
            raise ImageError(f"kernel module {name} ({wanted_by}) is not in {modules_dir}")
        visiting.add(name)
        info = modinfo(read_module(path))
        depends = tuple(d for d in info.get("depends", "").split(",") if d)
        for dep in depends:
            visit(dep, f"needed by {name}")
        visiting.discard(name)
        done.add(name)
        rel = path.relative_to(modules_dir).as_posix()
        rel = rel[: rel.index(".ko")] + ".ko"
        ordered.append(KernelModule(name, path, rel, depends))

    for name in names:
        visit(name, "requested")
    return ordered
