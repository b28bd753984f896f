"""Small helpers shared by the legacy devices: open-bus reads and snapshot field checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# What a read of a port no device decodes returns on a PC: the ISA data lines float high.
OPEN_BUS = 0xFF

# One preallocated `bytes` per byte value: register reads return these instead of allocating.
BYTE = tuple(bytes((i,)) for i in range(256))


def open_bus(size: int) -> bytes:
    """The answer to an access a device does not decode: `size` bytes of 0xff."""
    return b"\xff" * size if size > 0 else b""


def u8_field(state: Mapping[str, Any], key: str) -> int:
    """A byte-valued snapshot field, checked (snapshots are files: do not trust them blindly)."""
    value = state.get(key)
    if type(value) is not int or not 0 <= value <= 0xFF:
        raise ValueError(f"snapshot field {key!r}: expected a byte, got {value!r}")
    return value


def int_field(state: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = state.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"snapshot field {key!r}: expected an int in [{lo}, {hi}], got {value!r}")
    return value


def bool_field(state: Mapping[str, Any], key: str) -> bool:
    value = state.get(key)
    if type(value) is not bool:
        raise ValueError(f"snapshot field {key!r}: expected a bool, got {value!r}")
    return value


def bytes_field(state: Mapping[str, Any], key: str, max_len: int) -> list[int]:
    """A list of byte values no longer than `max_len`."""
    value = state.get(key)
    if not isinstance(value, list) or len(value) > max_len:
        raise ValueError(f"snapshot field {key!r}: expected a list of at most {max_len} bytes")
    for item in value:
        if type(item) is not int or not 0 <= item <= 0xFF:
            raise ValueError(f"snapshot field {key!r}: {item!r} is not a byte")
    return list(value)
