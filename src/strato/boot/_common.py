"""Steps both kernel loaders share: the command line and where the initramfs goes."""

from __future__ import annotations

from collections.abc import Sequence

from strato.boot.cmdline import Cmdline
from strato.boot.e820 import E820Entry, E820Type
from strato.boot.errors import BootError
from strato.boot.layout import PAGE_SIZE, X86Layout

__all__ = ["cmdline_bytes", "place_initramfs"]


def cmdline_bytes(cmdline: bytes | str | Cmdline, layout: X86Layout) -> bytes:
    """The command line without its terminating NUL, checked against the layout's buffer."""
    if isinstance(cmdline, Cmdline):
        raw = cmdline.as_bytes()
    elif isinstance(cmdline, str):
        try:
            raw = cmdline.encode("ascii")
        except UnicodeEncodeError as e:
            raise BootError(f"kernel command line has a non-ASCII character at {e.start}") from e
    else:
        raw = bytes(cmdline)
    if raw.endswith(b"\0"):
        raw = raw[:-1]
    nul = raw.find(b"\0")
    if nul >= 0:
        raise BootError(f"kernel command line contains a NUL byte at position {nul}")
    if len(raw) + 1 > layout.cmdline_max:
        raise BootError(
            f"kernel command line too long: {len(raw)} bytes plus the terminating NUL, "
            f"strato's buffer holds {layout.cmdline_max}"
        )
    return raw


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def place_initramfs(size: int, lowest: int, limit: int, ram: Sequence[E820Entry], name: str) -> int:
    """The highest page-aligned address a where [a, a+size) lies in [lowest, limit) and inside
    one usable e820 entry (so it never lands in a range the VMM reserved)."""
    if size == 0:
        raise BootError(f"initramfs {name} is empty")
    for entry in sorted(ram, key=lambda e: e.addr, reverse=True):
        if entry.type != E820Type.RAM:
            continue
        start, end = max(entry.addr, lowest), min(entry.end, limit)
        addr = (end - size) & ~(PAGE_SIZE - 1)
        if size <= end and addr >= start:
            return addr
    raise BootError(
        f"initramfs {name} ({_mib(size)}) does not fit in guest memory: the space between "
        f"the kernel's end ({lowest:#x}) and {limit:#x} is {_mib(max(limit - lowest, 0))}; "
        "give the guest more memory"
    )
