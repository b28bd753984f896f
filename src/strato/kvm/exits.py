"""Typed VM exits decoded from struct kvm_run.

One small object per exit, with __slots__; the vCPU loop dispatches on its class.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class IoOut:
    port: int
    data: bytes  # size * count bytes (string I/O repeats)
    size: int


@dataclass(slots=True)
class IoIn:
    port: int
    size: int
    count: int
    data_offset: int  # where to put size*count bytes in kvm_run


@dataclass(slots=True)
class MmioWrite:
    address: int
    data: bytes


@dataclass(slots=True)
class MmioRead:
    address: int
    size: int


@dataclass(slots=True)
class Hlt:
    pass


@dataclass(slots=True)
class Shutdown:
    """Triple fault (or another reason the CPU shut down)."""


@dataclass(slots=True)
class SystemEvent:
    type: int  # KVM_SYSTEM_EVENT_*
    flags: int


@dataclass(slots=True)
class InternalError:
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        from strato.kvm import ioctls

        names = {
            ioctls.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
            ioctls.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
            ioctls.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failure",
        }
        what = names.get(self.suberror, f"suberror {self.suberror}")
        detail = ""
        if self.suberror == ioctls.KVM_INTERNAL_ERROR_EMULATION and len(self.data) >= 3:
            # struct emulation_failure: u64 flags (bit 0: instruction bytes valid), then
            # u8 insn_size and u8 insn_bytes[15] (Linux 5.14 and later).
            flags = self.data[0]
            raw = b"".join(v.to_bytes(8, "little") for v in self.data[1:3])
            n = raw[0]
            if flags & 1 and 0 < n <= 15:
                detail = " (instruction bytes " + raw[1 : 1 + n].hex(" ") + ")"
        if not detail and self.data:
            detail = " data " + " ".join(f"{x:#x}" for x in self.data)
        return what + detail


@dataclass(slots=True)
class FailEntry:
    reason: int
    cpu: int


@dataclass(slots=True)
class Interrupted:
    """KVM_RUN returned EINTR (a signal, or immediate_exit was set): no guest exit."""


@dataclass(slots=True)
class Unknown:
    reason: int


VcpuExit = (
    IoOut
    | IoIn
    | MmioWrite
    | MmioRead
    | Hlt
    | Shutdown
    | SystemEvent
    | InternalError
    | FailEntry
    | Interrupted
    | Unknown
)
