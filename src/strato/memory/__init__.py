"""Guest physical memory: regions, bounds-checked access, zero-copy views."""

from strato.memory.guest import (
    GuestAddress,
    GuestMemory,
    GuestMemoryError,
    GuestRegion,
)
from strato.memory.layout import X86Layout, ram_ranges

__all__ = [
    "GuestAddress",
    "GuestMemory",
    "GuestMemoryError",
    "GuestRegion",
    "X86Layout",
    "ram_ranges",
]
