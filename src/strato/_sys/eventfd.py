"""eventfd(2): the counter KVM uses for ioeventfds and irqfds."""

from __future__ import annotations

import os


class EventFd:
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

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> EventFd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
