"""A bus maps address ranges to devices. The vCPU exit path looks up every access here."""

from __future__ import annotations

import bisect
import threading
from typing import Protocol


class BusDevice(Protocol):
    """A device on a bus. Offsets are relative to the start of the range it was inserted at."""

    def read(self, offset: int, size: int) -> bytes:
        """Return exactly `size` bytes."""
        ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(ValueError):
    """A range that overlaps another, or is empty."""


class Bus:
    """Non-overlapping ranges [base, base+length) -> device. Lookups are O(log n)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device)
        self._lock = (
            threading.Lock()
        )  # only for inserts/removals (hotplug); lookups read a snapshot

    def insert(self, device: BusDevice, base: int, length: int) -> None:
        if length <= 0:
            raise BusError(f"{self.name}: empty range at {base:#x}")
        end = base + length
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i > 0 and self._entries[i - 1][1] > base:
                b, e, _ = self._entries[i - 1]
                raise BusError(f"{self.name}: [{base:#x}, {end:#x}) overlaps [{b:#x}, {e:#x})")
            if i < len(self._entries) and self._entries[i][0] < end:
                b, e, _ = self._entries[i]
                raise BusError(f"{self.name}: [{base:#x}, {end:#x}) overlaps [{b:#x}, {e:#x})")
            bases = list(self._bases)
            entries = list(self._entries)
            bases.insert(i, base)
            entries.insert(i, (base, end, device))
            self._bases, self._entries = bases, entries

    def remove(self, base: int) -> BusDevice:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i >= len(self._bases) or self._bases[i] != base:
                raise BusError(f"{self.name}: nothing at {base:#x}")
            bases = list(self._bases)
            entries = list(self._entries)
            del bases[i]
            _, _, dev = entries.pop(i)
            self._bases, self._entries = bases, entries
            return dev

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """The device covering `addr` and the offset into its range, or None."""
        bases, entries = self._bases, self._entries
        i = bisect.bisect_right(bases, addr) - 1
        if i < 0:
            return None
        base, end, dev = entries[i]
        if addr >= end:
            return None
        return dev, addr - base

    def read(self, addr: int, size: int) -> bytes | None:
        hit = self.lookup(addr)
        if hit is None:
            return None
        dev, off = hit
        return dev.read(off, size)

    def write(self, addr: int, data: bytes) -> bool:
        hit = self.lookup(addr)
        if hit is None:
            return False
        dev, off = hit
        dev.write(off, data)
        return True

    def ranges(self) -> list[tuple[int, int, BusDevice]]:
        return list(self._entries)
