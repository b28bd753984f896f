"""A fake clock and a recording timer for driving rate limiters in tests."""

from __future__ import annotations

import os

from strato.devices.rate_limiter import NS_PER_MS


class FakeClock:
    def __init__(self, start: int = 1_000 * NS_PER_MS) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


class FakeTimer:
    """Records what the limiter asks of its timer; its fd (an eventfd) never fires."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.armed: list[int] = []
        self.disarmed = 0
        self.reads = 0
        self.closed = False

    def arm(self, delay_ns: int) -> None:
        self.armed.append(delay_ns)

    def disarm(self) -> None:
        self.disarmed += 1

    def read(self) -> int:
        self.reads += 1
        return 1

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        self.closed = True
