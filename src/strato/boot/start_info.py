"""The PVH boot ABI structures (xen/include/public/arch-x86/hvm/start_info.h)."""

from __future__ import annotations

import ctypes

__all__ = [
    "HVM_START_INFO_MAGIC",
    "HVM_START_INFO_VERSION",
    "HvmMemmapTableEntry",
    "HvmModlistEntry",
    "HvmStartInfo",
]

HVM_START_INFO_MAGIC = 0x336EC578  # "xEn3" with the high bit of each byte flipped
HVM_START_INFO_VERSION = 1  # version 1 adds the memory map

_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class HvmStartInfo(ctypes.LittleEndianStructure):
    _fields_ = [
        ("magic", _u32),
        ("version", _u32),
        ("flags", _u32),
        ("nr_modules", _u32),
        ("modlist_paddr", _u64),
        ("cmdline_paddr", _u64),
        ("rsdp_paddr", _u64),
        ("memmap_paddr", _u64),
        ("memmap_entries", _u32),
        ("reserved", _u32),
    ]


class HvmModlistEntry(ctypes.LittleEndianStructure):
    _fields_ = [
        ("paddr", _u64),
        ("size", _u64),
        ("cmdline_paddr", _u64),
        ("reserved", _u64),
    ]


class HvmMemmapTableEntry(ctypes.LittleEndianStructure):
    _fields_ = [
        ("addr", _u64),
        ("size", _u64),
        ("type", _u32),
        ("reserved", _u32),
    ]
