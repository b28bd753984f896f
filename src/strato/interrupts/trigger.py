"""The Trigger protocol and its implementations.

An edge trigger (`trigger()`) is what virtio MSI-X vectors and most legacy devices need. A
level trigger (`set_level()`) is for devices whose line stays asserted until the guest acks it
(the 16550 on a real IOAPIC). KVM carries either kind: an irqfd writes an eventfd the kernel
turns into an interrupt without a trip through Python; KVM_IRQ_LINE sets a pin's level.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from strato._sys.eventfd import EventFd


@runtime_checkable
class Trigger(Protocol):
    """Raise one interrupt (an edge, or an MSI message)."""

    def trigger(self) -> None: ...


@runtime_checkable
class LevelTrigger(Trigger, Protocol):
    """An interrupt line with a level; `trigger()` pulses it."""

    def set_level(self, high: bool) -> None: ...


class EventFdTrigger:
    """Writes an eventfd registered with KVM as an irqfd (or read by anyone else)."""

    def __init__(self, eventfd: EventFd | None = None) -> None:
        self.eventfd = eventfd or EventFd()

    def trigger(self) -> None:
        self.eventfd.write(1)

    def fileno(self) -> int:
        return self.eventfd.fd


class IrqLineTrigger:
    """A pin on the in-kernel PIC/IOAPIC, driven with KVM_IRQ_LINE through a callback.

    The callback is `VmFd.irq_line(gsi, level)`; taking it as a callable keeps this layer free of
    the kvm package.
    """

    def __init__(self, gsi: int, set_line: Callable[[int, int], None]) -> None:
        self.gsi = gsi
        self._set_line = set_line
        self._level = False

    def set_level(self, high: bool) -> None:
        self._level = high
        self._set_line(self.gsi, 1 if high else 0)

    def trigger(self) -> None:
        self._set_line(self.gsi, 1)
        self._set_line(self.gsi, 0)


class CountingTrigger:
    """A trigger that counts (for unit tests of devices, and for polled devices)."""

    def __init__(self) -> None:
        self.count = 0
        self.level = False
        self._cond = threading.Condition()

    def trigger(self) -> None:
        with self._cond:
            self.count += 1
            self._cond.notify_all()

    def set_level(self, high: bool) -> None:
        with self._cond:
            if high and not self.level:
                self.count += 1
            self.level = high
            self._cond.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.count >= count, timeout)
