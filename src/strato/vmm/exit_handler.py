"""vCPU exit dispatch as a free function: testable without KVM (Firecracker's vcpu.rs idea).

`handle_exit` routes I/O to the buses and turns the exits that end the VM into a `Stop`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from strato._sys.ratelog import RateLimitedLog
from strato.bus import Bus
from strato.kvm import exits as x
from strato.kvm import ioctls as k
from strato.vmm.stop import Stop, StopReason

log = logging.getLogger(__name__)


class ExitIo(Protocol):
    """The part of a VcpuFd the exit handler writes results into."""

    id: int

    def set_io_in_data(self, offset: int, data: bytes) -> None: ...

    def set_mmio_read_data(self, data: bytes) -> None: ...


_unknown_io = RateLimitedLog(log, burst=10, interval=10.0)
_ONES = b"\xff" * 8


def handle_exit(exit: x.VcpuExit, vcpu: ExitIo, pio: Bus, mmio: Bus) -> Stop | None:
    """Handle one exit. Returns a Stop when the VM must stop, None to keep running."""
    cls = type(exit)
    if cls is x.IoOut:
        assert isinstance(exit, x.IoOut)
        size = exit.size
        data = exit.data
        if len(data) == size:
            if not pio.write(exit.port, data):
                _unknown_io("unhandled port write %#x <- %s", exit.port, data.hex())
        else:  # string I/O (rep outs): one write per element
            for i in range(0, len(data), size):
                if not pio.write(exit.port, data[i : i + size]):
                    _unknown_io("unhandled port write %#x", exit.port)
                    break
        return None
    if cls is x.IoIn:
        assert isinstance(exit, x.IoIn)
        out = bytearray()
        for _ in range(exit.count):
            got = pio.read(exit.port, exit.size)
            if got is None:
                _unknown_io("unhandled port read %#x (reads as all-ones)", exit.port)
                got = _ONES[: exit.size]
            out += got
        vcpu.set_io_in_data(exit.data_offset, bytes(out))
        return None
    if cls is x.MmioWrite:
        assert isinstance(exit, x.MmioWrite)
        if not mmio.write(exit.address, exit.data):
            _unknown_io("unhandled MMIO write at %#x <- %s", exit.address, exit.data.hex())
        return None
    if cls is x.MmioRead:
        assert isinstance(exit, x.MmioRead)
        got = mmio.read(exit.address, exit.size)
        if got is None:
            _unknown_io("unhandled MMIO read at %#x (reads as all-ones)", exit.address)
            got = _ONES[: exit.size]
        vcpu.set_mmio_read_data(got)
        return None
    if cls is x.Interrupted or cls is x.Hlt:
        return None
    if cls is x.Shutdown:
        return Stop(StopReason.TRIPLE_FAULT, "the guest triple-faulted (CPU shutdown)", vcpu.id)
    if cls is x.SystemEvent:
        assert isinstance(exit, x.SystemEvent)
        if exit.type == k.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Stop(StopReason.POWEROFF, "the guest powered off", vcpu.id)
        if exit.type == k.KVM_SYSTEM_EVENT_RESET:
            return Stop(StopReason.RESET, "the guest asked for a reset", vcpu.id)
        if exit.type == k.KVM_SYSTEM_EVENT_CRASH:
            return Stop(StopReason.GUEST_PANIC, "the guest reported a crash", vcpu.id)
        return Stop(StopReason.INTERNAL_ERROR, f"unknown system event {exit.type}", vcpu.id)
    if cls is x.InternalError:
        assert isinstance(exit, x.InternalError)
        if exit.suberror == k.KVM_INTERNAL_ERROR_EMULATION:
            reason = StopReason.EMULATION_FAILURE
        elif exit.suberror in (k.KVM_INTERNAL_ERROR_SIMUL_EX, k.KVM_INTERNAL_ERROR_DELIVERY_EV):
            # A fault while delivering a fault: on hosts whose KVM emulates kernel mode (PVM)
            # this is how a triple fault shows up.
            reason = StopReason.TRIPLE_FAULT
        else:
            reason = StopReason.INTERNAL_ERROR
        return Stop(reason, f"KVM internal error: {exit.describe()}", vcpu.id)
    if cls is x.FailEntry:
        assert isinstance(exit, x.FailEntry)
        return Stop(
            StopReason.INTERNAL_ERROR,
            f"VM entry failed: hardware reason {exit.reason:#x} on cpu {exit.cpu}",
            vcpu.id,
        )
    assert isinstance(exit, x.Unknown)
    return Stop(StopReason.INTERNAL_ERROR, f"unexpected KVM exit reason {exit.reason}", vcpu.id)
