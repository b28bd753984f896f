"""eventfd(2): the counter KVM uses for ioeventfds and irqfds."""

from __future__ import annotations

import os

from strato._sys.fd import OwnedFd


class EventFd(OwnedFd):
    """An owned eventfd. Non-blocking by default so a data plane never stalls on it."""

    def __init__(self, initval: int = 0, nonblocking: bool = True) -> None:
        flags = os.EFD_CLOEXEC | (os.EFD_NONBLOCK if nonblocking else 0)
        self.fd = os.eventfd(initval, flags)

    def write(self, value: int = 1) -> None:
        os.eventfd_write(self.fd, value)

    def read(self) -> int:
        """Return the counter and reset it; 0 when nothing was signalled (non-blocking)."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0
