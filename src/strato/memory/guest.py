"""Guest memory as a set of host mappings.

Every access is bounds-checked against the region that holds it and never crosses a region
edge, so a guest-supplied address can never reach host memory outside the guest. Devices do
their I/O through `view()`, a memoryview of the mapping that `os.preadv`/`os.readv` fill in
place.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NewType, TypeVar

GuestAddress = NewType("GuestAddress", int)

_MAP_NORESERVE = 0x4000  # not exported by Python 3.11's mmap module
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

CT = TypeVar("CT", bound=ctypes.Structure)


class GuestMemoryError(ValueError):
    """An access that falls outside guest memory, or crosses a region edge."""


@dataclass(eq=False)
class GuestRegion:
    """One contiguous range of guest physical memory backed by one host mapping."""

    start: int
    size: int
    mapping: mmap.mmap
    fd: int = -1  # memfd or file backing (-1 for anonymous memory)
    fd_offset: int = 0
    view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.view = memoryview(self.mapping)

    @property
    def end(self) -> int:
        return self.start + self.size

    @property
    def host_address(self) -> int:
        """Host virtual address of the mapping, for KVM_SET_USER_MEMORY_REGION."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.start <= addr and addr + length <= self.end


class GuestMemory:
    """Guest physical memory. Regions must not overlap; they need not be contiguous."""

    def __init__(self, regions: list[GuestRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.start)
        for a, b in itertools.pairwise(ordered):
            if a.end > b.start:
                raise GuestMemoryError(
                    f"regions overlap: [{a.start:#x}, {a.end:#x}) and [{b.start:#x}, {b.end:#x})"
                )
        self.regions = ordered

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def anonymous(cls, ranges: list[tuple[int, int]]) -> GuestMemory:
        """Private anonymous memory; pages cost host RAM only once the guest touches them."""
        regions = []
        for start, size in ranges:
            mm = mmap.mmap(
                -1,
                size,
                flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
            regions.append(GuestRegion(start, size, mm))
        return cls(regions)

    @classmethod
    def shared(cls, ranges: list[tuple[int, int]], name: str = "strato-guest") -> GuestMemory:
        """memfd-backed shared memory: another process (vhost-user, migration) can map it."""
        total = sum(size for _, size in ranges)
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(fd, total)
        regions = []
        offset = 0
        for start, size in ranges:
            mm = mmap.mmap(
                fd,
                size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=offset,
            )
            regions.append(GuestRegion(start, size, mm, fd=fd, fd_offset=offset))
            offset += size
        return cls(regions)

    def close(self) -> None:
        fds = set()
        for r in self.regions:
            r.view.release()
            try:
                r.mapping.close()
            except BufferError:
                pass  # a ctypes export (host_address) keeps it alive until collected
            if r.fd >= 0:
                fds.add(r.fd)
        for fd in fds:
            os.close(fd)

    # -- lookup ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    @property
    def last_address(self) -> int:
        return self.regions[-1].end - 1

    def __iter__(self) -> Iterator[GuestRegion]:
        return iter(self.regions)

    def region_of(self, addr: int, length: int = 1) -> GuestRegion:
        for r in self.regions:
            if r.start <= addr and addr + length <= r.start + r.size:
                return r
        raise GuestMemoryError(f"guest range [{addr:#x}, +{length:#x}) is not in guest memory")

    def check(self, addr: int, length: int) -> bool:
        """True when [addr, addr+length) lies inside one region (length 0 needs addr valid)."""
        if addr < 0 or length < 0:
            return False
        for r in self.regions:
            if r.start <= addr and addr + max(length, 1) <= r.start + r.size:
                return True
        return False

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy, writable view of guest memory; must not cross a region edge."""
        if length < 0 or addr < 0:
            raise GuestMemoryError(f"bad guest range {addr:#x} length {length}")
        r = self.region_of(addr, max(length, 1))
        off = addr - r.start
        return r.view[off : off + length]

    # -- bytes ----------------------------------------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n == 0:
            return
        self.view(addr, n)[:] = data

    def fill(self, addr: int, length: int, byte: int = 0) -> None:
        if length:
            self.view(addr, length)[:] = bytes([byte]) * length

    # -- integers (little endian) ---------------------------------------------------------------
    def _at(self, addr: int, length: int) -> tuple[memoryview, int]:
        for r in self.regions:
            if r.start <= addr and addr + length <= r.start + r.size:
                return r.view, addr - r.start
        raise GuestMemoryError(f"guest range [{addr:#x}, +{length:#x}) is not in guest memory")

    def read_u8(self, addr: int) -> int:
        v, off = self._at(addr, 1)
        return v[off]

    def read_u16(self, addr: int) -> int:
        v, off = self._at(addr, 2)
        return int(_U16.unpack_from(v, off)[0])

    def read_u32(self, addr: int) -> int:
        v, off = self._at(addr, 4)
        return int(_U32.unpack_from(v, off)[0])

    def read_u64(self, addr: int) -> int:
        v, off = self._at(addr, 8)
        return int(_U64.unpack_from(v, off)[0])

    def write_u8(self, addr: int, value: int) -> None:
        v, off = self._at(addr, 1)
        v[off] = value & 0xFF

    # Not struct.pack_into: it zero-fills the destination before writing the value, so a guest
    # polling the field (a used-ring index) could see a transient 0. A slice assignment of 2, 4
    # or 8 bytes is one store.
    def write_u16(self, addr: int, value: int) -> None:
        v, off = self._at(addr, 2)
        v[off : off + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def write_u32(self, addr: int, value: int) -> None:
        v, off = self._at(addr, 4)
        v[off : off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")

    def write_u64(self, addr: int, value: int) -> None:
        v, off = self._at(addr, 8)
        v[off : off + 8] = (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little")

    # -- ctypes objects -------------------------------------------------------------------------
    def read_obj(self, addr: int, ctype: type[CT]) -> CT:
        return ctype.from_buffer_copy(self.read(addr, ctypes.sizeof(ctype)))

    def write_obj(self, addr: int, obj: ctypes.Structure | ctypes.Array[ctypes.c_uint8]) -> None:
        self.write(addr, bytes(memoryview(obj).cast("B")))
