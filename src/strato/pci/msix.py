"""MSI-X: the capability, the vector table and the pending bit array (PBA) in a BAR.

The table is what the guest programs (address, data, per-vector mask). Delivery goes through a
`MsixVectorSink` (in strato: an `MsiVectorGroup` from `strato.interrupts.msi`, one KVM GSI and
irqfd per vector). A vector is live when MSI-X is enabled, the function is not masked and the
entry is not masked; only then is its route given to the sink, and only then does `fire()`
deliver it. Firing a vector that is not live sets its pending bit; unmasking delivers the
pending message and clears the bit (PCI Local Bus 3.0, 6.8.2).
"""

from __future__ import annotations

import logging
import struct
import threading
from typing import Any, Protocol

from strato._sys.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

# Guest-triggerable log lines (a guest programs and fires vectors), each rate-limited.
_log_routing = RateLimitedLog(log)
_log_delivery = RateLimitedLog(log)

MSIX_TABLE_ENTRY_SIZE = 16
MAX_MSIX_VECTORS = 2048
MSG_CTL_ENABLE = 1 << 15
MSG_CTL_FUNCTION_MASK = 1 << 14
MSG_CTL_TABLE_SIZE_MASK = 0x7FF
VECTOR_CTL_MASKED = 1

# Offsets inside the capability (from its id byte)
MSIX_CAP_MESSAGE_CONTROL = 2
MSIX_CAP_TABLE = 4
MSIX_CAP_PBA = 8
MSIX_CAP_LENGTH = 12


class MsixVectorSink(Protocol):
    """Where live vectors go: a route per vector, and a way to raise one."""

    def update(self, vector: int, address: int, data: int) -> None:
        """Vector `vector` is live with this message (route it)."""
        ...

    def trigger(self, vector: int) -> None: ...


def msix_capability_body(
    num_vectors: int, table_bar: int, table_offset: int, pba_bar: int, pba_offset: int
) -> bytes:
    """The capability after its id/next bytes: message control, table and PBA locations."""
    if not 1 <= num_vectors <= MAX_MSIX_VECTORS:
        raise ValueError(f"MSI-X supports 1..{MAX_MSIX_VECTORS} vectors")
    if table_offset & 7 or pba_offset & 7:
        raise ValueError("MSI-X table and PBA offsets must be 8-byte aligned")
    return struct.pack(
        "<HII",
        (num_vectors - 1) & MSG_CTL_TABLE_SIZE_MASK,
        table_offset | (table_bar & 7),
        pba_offset | (pba_bar & 7),
    )


def table_size_bytes(num_vectors: int) -> int:
    return num_vectors * MSIX_TABLE_ENTRY_SIZE


def pba_size_bytes(num_vectors: int) -> int:
    return ((num_vectors + 63) // 64) * 8


class MsixTable:
    """The guest-visible MSI-X state of one function. Thread-safe."""

    def __init__(self, num_vectors: int, sink: MsixVectorSink) -> None:
        if not 1 <= num_vectors <= MAX_MSIX_VECTORS:
            raise ValueError(f"MSI-X supports 1..{MAX_MSIX_VECTORS} vectors")
        self.num_vectors = num_vectors
        self.sink = sink
        # [addr_lo, addr_hi, data, vector_control]; entries start masked (PCI 3.0, 6.8.2.9)
        self.entries: list[list[int]] = [[0, 0, 0, VECTOR_CTL_MASKED] for _ in range(num_vectors)]
        self.pending: list[bool] = [False] * num_vectors
        self.enabled = False
        self.function_masked = False
        self._routed: list[tuple[int, int] | None] = [None] * num_vectors
        self._lock = threading.RLock()

    # -- message control (from the capability in config space) ---------------------------------
    @property
    def message_control_bits(self) -> int:
        return (MSG_CTL_ENABLE if self.enabled else 0) | (
            MSG_CTL_FUNCTION_MASK if self.function_masked else 0
        )

    def set_message_control(self, value: int) -> None:
        with self._lock:
            self.enabled = bool(value & MSG_CTL_ENABLE)
            self.function_masked = bool(value & MSG_CTL_FUNCTION_MASK)
            for vector in range(self.num_vectors):
                self._refresh(vector)

    def _live(self, vector: int) -> bool:
        return (
            self.enabled
            and not self.function_masked
            and not self.entries[vector][3] & VECTOR_CTL_MASKED
        )

    def _message(self, vector: int) -> tuple[int, int]:
        lo, hi, data, _ = self.entries[vector]
        return (hi << 32) | lo, data

    def _refresh(self, vector: int) -> None:
        """Route a live vector (if its message changed) and deliver a pending message."""
        if not self._live(vector):
            return
        message = self._message(vector)
        if self._routed[vector] != message:
            try:
                self.sink.update(vector, *message)
            except Exception:
                _log_routing.error("MSI-X vector %d: routing update failed", vector, exc_info=True)
                return
            self._routed[vector] = message
        if self.pending[vector]:
            self.pending[vector] = False
            self._deliver(vector)

    def _deliver(self, vector: int) -> None:
        try:
            self.sink.trigger(vector)
        except Exception:
            _log_delivery.error("MSI-X vector %d: delivery failed", vector, exc_info=True)

    # -- delivery -----------------------------------------------------------------------------
    def fire(self, vector: int) -> bool:
        """Raise `vector`: delivered now (True) or left pending/ignored (False)."""
        with self._lock:
            if not 0 <= vector < self.num_vectors:
                return False
            if not self._live(vector):
                self.pending[vector] = True
                return False
        self._deliver(vector)
        return True

    def is_masked(self, vector: int) -> bool:
        with self._lock:
            return not self._live(vector)

    # -- table and PBA accesses (offsets relative to their start) -------------------------------
    def read_table(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or offset < 0:
            return b"\x00" * size
        vector, field = divmod(offset, MSIX_TABLE_ENTRY_SIZE)
        with self._lock:
            if vector >= self.num_vectors:
                return b"\x00" * size
            entry = self.entries[vector]
            if size == 4:
                return struct.pack("<I", entry[field // 4])
            return struct.pack("<II", entry[field // 4], entry[field // 4 + 1])

    def write_table(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size or offset < 0:
            return
        vector, field = divmod(offset, MSIX_TABLE_ENTRY_SIZE)
        if vector >= self.num_vectors:
            return
        values = struct.unpack("<I" if size == 4 else "<II", data)
        with self._lock:
            entry = self.entries[vector]
            for i, value in enumerate(values):
                index = field // 4 + i
                if index == 3:
                    value &= VECTOR_CTL_MASKED  # the other bits are reserved
                entry[index] = value
            self._refresh(vector)

    def read_pba(self, offset: int, size: int) -> bytes:
        if size not in (4, 8) or offset % size or offset < 0:
            return b"\x00" * size
        with self._lock:
            bits = 0
            first = offset * 8
            for i in range(size * 8):
                vector = first + i
                if vector < self.num_vectors and self.pending[vector]:
                    bits |= 1 << i
        return bits.to_bytes(size, "little")

    def write_pba(self, offset: int, data: bytes) -> None:
        """The PBA is read-only."""

    # -- snapshot -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "entries": [list(e) for e in self.entries],
                "pending": list(self.pending),
                "enabled": self.enabled,
                "function_masked": self.function_masked,
            }

    def restore(self, state: dict[str, Any]) -> None:
        with self._lock:
            entries = [[int(v) for v in e] for e in state["entries"]]
            if len(entries) != self.num_vectors or any(len(e) != 4 for e in entries):
                raise ValueError("MSI-X state does not match the table size")
            self.entries = entries
            self.pending = [bool(p) for p in state["pending"]]
            self.enabled = bool(state["enabled"])
            self.function_masked = bool(state["function_masked"])
            self._routed = [None] * self.num_vectors
            for vector in range(self.num_vectors):
                self._refresh(vector)
