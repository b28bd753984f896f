"""A type-0 PCI configuration space: 256 standard bytes plus the 4 KiB extended space (ECAM).

Every byte has a writable mask, so read-only fields (ids, class, capability pointers, the low
bits of a BAR) stay read-only whatever the guest writes. A BAR's writable mask covers exactly
its address bits above the size, so writing all-ones and reading back yields the size mask with
no special case, at any access width.

A guest may move a BAR. The move takes effect when decoding is enabled in the command register:
`write()` returns the `BarMove`s that the owner of the buses must apply (and may reject with
`revert_bar_move()`), following Cloud Hypervisor's rule that a 64-bit BAR is only re-decoded
when its upper half (or the command register) is written, so a half-written address is never
mapped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

CONFIG_SPACE_SIZE = 4096
STANDARD_CONFIG_SIZE = 256

# Header registers (byte offsets)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
PROG_IF = 0x09
SUBCLASS = 0x0A
CLASS_CODE = 0x0B
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_BAR = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

NUM_BARS = 6

COMMAND_IO_SPACE = 0x0001
COMMAND_MEMORY_SPACE = 0x0002
COMMAND_BUS_MASTER = 0x0004
COMMAND_INTX_DISABLE = 0x0400
# The bits a guest may change; the rest of the command register reads as zero.
COMMAND_WRITABLE = 0x0547  # IO, memory, bus master, parity err resp, SERR#, INTx disable

STATUS_INTERRUPT = 0x0008
STATUS_CAP_LIST = 0x0010

FIRST_CAPABILITY_OFFSET = 0x40

# Capability ids
CAP_ID_MSI = 0x05
CAP_ID_VENDOR = 0x09
CAP_ID_PCIE = 0x10
CAP_ID_MSIX = 0x11

BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCHABLE = 0x8

# Class codes (class, subclass)
CLASS_MASS_STORAGE = 0x01
CLASS_NETWORK = 0x02
CLASS_BRIDGE = 0x06
CLASS_COMMUNICATION = 0x07
CLASS_OTHER = 0xFF
SUBCLASS_HOST_BRIDGE = 0x00

ALL_ONES = (1 << 32) - 1


class BarKind(enum.Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True)
class BarSpec:
    """What a BAR needs: the owner of the address windows allocates `size` bytes for it."""

    index: int
    size: int
    kind: BarKind = BarKind.MEM64
    prefetchable: bool = False


@dataclass(frozen=True)
class BarMove:
    """A BAR the guest re-programmed while decoding is enabled: [old, old+size) -> new."""

    index: int
    old_base: int
    new_base: int
    size: int
    kind: BarKind


class PciConfigError(ValueError):
    """A host-side misuse (bad BAR size, capability space full); never raised by guest access."""


@dataclass
class _Bar:
    spec: BarSpec
    mapped: int  # the address the owner of the buses has it at


class PciConfiguration:
    """Registers and writable masks of one function. Not thread-safe: the owner serialises."""

    def __init__(
        self,
        vendor_id: int,
        device_id: int,
        class_code: int,
        subclass: int,
        prog_if: int = 0,
        revision_id: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        header_type: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        self.regs = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, _Bar] = {}
        self._last_cap: tuple[int, int] | None = None  # (offset, length)
        self._set(VENDOR_ID, 2, vendor_id)
        self._set(DEVICE_ID, 2, device_id)
        self._set(REVISION_ID, 1, revision_id)
        self._set(PROG_IF, 1, prog_if)
        self._set(SUBCLASS, 1, subclass)
        self._set(CLASS_CODE, 1, class_code)
        self._set(HEADER_TYPE, 1, header_type)
        self._set(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._set(SUBSYSTEM_ID, 2, subsystem_id)
        self._set(INTERRUPT_PIN, 1, interrupt_pin)
        self._set_mask(COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(CACHE_LINE_SIZE, 1, 0xFF)
        self._set_mask(LATENCY_TIMER, 1, 0xFF)
        self._set_mask(INTERRUPT_LINE, 1, 0xFF)

    # -- raw helpers --------------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset : offset + size], "little")

    def _set(self, offset: int, size: int, value: int) -> None:
        self.regs[offset : offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset : offset + size] = (mask & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little"
        )

    def get(self, offset: int, size: int) -> int:
        """Host-side read of a register (no access checks)."""
        return self._get(offset, size)

    def set(self, offset: int, size: int, value: int) -> None:
        """Host-side write that ignores the writable mask (ids, status bits, capability data)."""
        self._set(offset, size, value)

    def set_writable(self, offset: int, size: int, mask: int) -> None:
        self._set_mask(offset, size, mask)

    # -- guest access -------------------------------------------------------------------------
    @staticmethod
    def access_ok(offset: int, size: int) -> bool:
        """An access of 1, 2 or 4 bytes that stays inside one dword of the 4 KiB space."""
        return (
            size in (1, 2, 4)
            and 0 <= offset
            and offset + size <= CONFIG_SPACE_SIZE
            and (offset & 3) + size <= 4
        )

    def read(self, offset: int, size: int) -> int:
        """The value of a guest read; all-ones for an access that is not well formed."""
        if not self.access_ok(offset, size):
            return (1 << (8 * max(0, min(size, 8)))) - 1
        return self._get(offset, size)

    def write(self, offset: int, data: bytes) -> list[BarMove]:
        """Apply a guest write through the writable masks; return the BAR moves it caused."""
        size = len(data)
        if not self.access_ok(offset, size):
            return []
        for i, byte in enumerate(data):
            m = self.wmask[offset + i]
            if m:
                old = self.regs[offset + i]
                self.regs[offset + i] = (old & ~m & 0xFF) | (byte & m)
        return self._detect_moves(offset, size)

    # -- command / status ---------------------------------------------------------------------
    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(STATUS, 2)

    def set_status_bits(self, bits: int, on: bool) -> None:
        value = self.status
        self._set(STATUS, 2, (value | bits) if on else (value & ~bits))

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & COMMAND_MEMORY_SPACE)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & COMMAND_IO_SPACE)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    # -- BARs ---------------------------------------------------------------------------------
    def add_bar(self, spec: BarSpec, address: int = 0) -> None:
        """Declare a BAR (and program `address` into it, 0 meaning not yet placed)."""
        i = spec.index
        size = spec.size
        if not 0 <= i < NUM_BARS:
            raise PciConfigError(f"BAR index {i} out of range")
        if spec.kind is BarKind.MEM64 and i == NUM_BARS - 1:
            raise PciConfigError("a 64-bit BAR needs two registers")
        used = {j for b in self._bars.values() for j in self._bar_regs(b.spec)}
        if set(self._bar_regs(spec)) & used:
            raise PciConfigError(f"BAR {i} already used")
        minimum = 4 if spec.kind is BarKind.IO else 16
        if size < minimum or size & (size - 1):
            raise PciConfigError(f"BAR size {size:#x} is not a power of two >= {minimum}")
        if spec.kind is not BarKind.MEM64 and size > 1 << 31:
            raise PciConfigError(f"BAR size {size:#x} too large for a 32-bit BAR")
        if spec.kind is BarKind.IO and size > 256:
            raise PciConfigError("I/O BARs are at most 256 bytes")
        if spec.prefetchable and spec.kind is BarKind.IO:
            raise PciConfigError("an I/O BAR cannot be prefetchable")
        off = BAR0 + 4 * i
        addr_mask = ~(size - 1)
        if spec.kind is BarKind.IO:
            self._set(off, 4, BAR_IO)
            self._set_mask(off, 4, addr_mask & 0xFFFF_FFFC)
        else:
            low_flags = (BAR_MEM64 if spec.kind is BarKind.MEM64 else 0) | (
                BAR_PREFETCHABLE if spec.prefetchable else 0
            )
            self._set(off, 4, low_flags)
            self._set_mask(off, 4, addr_mask & 0xFFFF_FFF0)
            if spec.kind is BarKind.MEM64:
                self._set(off + 4, 4, 0)
                self._set_mask(off + 4, 4, (addr_mask >> 32) & ALL_ONES)
        self._bars[i] = _Bar(spec, 0)
        self.set_bar_address(i, address)

    @staticmethod
    def _bar_regs(spec: BarSpec) -> list[int]:
        return [spec.index, spec.index + 1] if spec.kind is BarKind.MEM64 else [spec.index]

    def bar_specs(self) -> list[BarSpec]:
        return [b.spec for _, b in sorted(self._bars.items())]

    def set_bar_address(self, index: int, address: int) -> None:
        """Host-side placement of a BAR (initial allocation, restore, rollback)."""
        bar = self._bars[index]
        spec = bar.spec
        if address & (spec.size - 1):
            raise PciConfigError(f"BAR {index} address {address:#x} not aligned to its size")
        limit = 1 << (64 if spec.kind is BarKind.MEM64 else 32)
        if address + spec.size > limit:
            raise PciConfigError(f"BAR {index} address {address:#x} out of range")
        off = BAR0 + 4 * index
        low_flags = self._get(off, 4) & (0x3 if spec.kind is BarKind.IO else 0xF)
        self._set(
            off, 4, (address & ALL_ONES & ~(0x3 if spec.kind is BarKind.IO else 0xF)) | low_flags
        )
        if spec.kind is BarKind.MEM64:
            self._set(off + 4, 4, address >> 32)
        bar.mapped = address

    def bar_address(self, index: int) -> int:
        """The address currently programmed in the BAR registers."""
        spec = self._bars[index].spec
        off = BAR0 + 4 * index
        low = self._get(off, 4) & (0xFFFF_FFFC if spec.kind is BarKind.IO else 0xFFFF_FFF0)
        if spec.kind is BarKind.MEM64:
            return low | (self._get(off + 4, 4) << 32)
        return low

    def bar_mapped_address(self, index: int) -> int:
        """Where the BAR is mapped on the bus (differs from `bar_address` while it moves)."""
        return self._bars[index].mapped

    def revert_bar_move(self, move: BarMove) -> None:
        """The move could not be applied: put the old address back in the registers."""
        self.set_bar_address(move.index, move.old_base)

    def _is_size_probe(self, bar: _Bar) -> bool:
        """All address bits set in either half: the guest is sizing, not placing, the BAR."""
        off = BAR0 + 4 * bar.spec.index
        lo_mask = int.from_bytes(self.wmask[off : off + 4], "little")
        if lo_mask and self._get(off, 4) & lo_mask == lo_mask:
            return True
        if bar.spec.kind is BarKind.MEM64:
            hi_mask = int.from_bytes(self.wmask[off + 4 : off + 8], "little")
            if hi_mask and self._get(off + 4, 4) & hi_mask == hi_mask:
                return True
        return False

    def _detect_moves(self, offset: int, size: int) -> list[BarMove]:
        end = offset + size
        touched_command = offset < COMMAND + 2 and end > COMMAND
        if not touched_command and (end <= BAR0 or offset >= BAR0 + 4 * NUM_BARS):
            return []
        moves: list[BarMove] = []
        for index, bar in sorted(self._bars.items()):
            spec = bar.spec
            commit_reg = BAR0 + 4 * (index + (1 if spec.kind is BarKind.MEM64 else 0))
            if not touched_command and not (offset < commit_reg + 4 and end > commit_reg):
                continue
            enabled = self.io_enabled if spec.kind is BarKind.IO else self.memory_enabled
            if not enabled:
                continue
            new = self.bar_address(index)
            if new == bar.mapped or self._is_size_probe(bar):
                continue
            moves.append(BarMove(index, bar.mapped, new, spec.size, spec.kind))
            bar.mapped = new
        return moves

    # -- capabilities -------------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes) -> int:
        """Append a capability (id, next pointer, then `body`); returns its offset."""
        length = 2 + len(body)
        if self._last_cap is None:
            offset = FIRST_CAPABILITY_OFFSET
        else:
            last_off, last_len = self._last_cap
            offset = (last_off + last_len + 3) & ~3
        if offset + length > STANDARD_CONFIG_SIZE:
            raise PciConfigError(f"capability of {length} bytes does not fit")
        if self._last_cap is None:
            self._set(CAPABILITIES_POINTER, 1, offset)
        else:
            self._set(self._last_cap[0] + 1, 1, offset)
        self._set(offset, 1, cap_id)
        self._set(offset + 1, 1, 0)
        self.regs[offset + 2 : offset + length] = body
        self._last_cap = (offset, length)
        self.set_status_bits(STATUS_CAP_LIST, True)
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, id) of each capability, walking the list as a driver does."""
        out: list[tuple[int, int]] = []
        if not self.status & STATUS_CAP_LIST:
            return out
        ptr = self._get(CAPABILITIES_POINTER, 1) & 0xFC
        seen: set[int] = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            out.append((ptr, self._get(ptr, 1)))
            ptr = self._get(ptr + 1, 1) & 0xFC
        return out

    # -- interrupts ---------------------------------------------------------------------------
    def set_interrupt_line(self, line: int) -> None:
        self._set(INTERRUPT_LINE, 1, line)

    # -- snapshot -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "regs": self.regs.hex(),
            "wmask": self.wmask.hex(),
            "bars": [
                {
                    "index": b.spec.index,
                    "size": b.spec.size,
                    "kind": b.spec.kind.value,
                    "prefetchable": b.spec.prefetchable,
                    "mapped": b.mapped,
                }
                for _, b in sorted(self._bars.items())
            ],
            "last_cap": list(self._last_cap) if self._last_cap else None,
        }

    def restore(self, state: dict[str, Any]) -> None:
        regs = bytes.fromhex(state["regs"])
        wmask = bytes.fromhex(state["wmask"])
        if len(regs) != CONFIG_SPACE_SIZE or len(wmask) != CONFIG_SPACE_SIZE:
            raise PciConfigError("configuration space state has the wrong size")
        self.regs[:] = regs
        self.wmask[:] = wmask
        self._bars = {}
        for b in state["bars"]:
            spec = BarSpec(b["index"], b["size"], BarKind(b["kind"]), b["prefetchable"])
            self._bars[spec.index] = _Bar(spec, b["mapped"])
        last = state.get("last_cap")
        self._last_cap = (last[0], last[1]) if last else None
