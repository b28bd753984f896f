"""timerfd(2): a one-shot timer that an epoll loop can wait on (os.timerfd_* is Python 3.13+)."""

from __future__ import annotations

import ctypes
import os

from strato._sys.fd import OwnedFd

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC

_NS_PER_S = 1_000_000_000
_MAX_DELAY_NS = 1 << 62  # ~146 years: far beyond any use, and tv_sec stays a valid long


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_libc = ctypes.CDLL(None, use_errno=True)
_create = _libc.timerfd_create
_create.argtypes = [ctypes.c_int, ctypes.c_int]
_create.restype = ctypes.c_int
_settime = _libc.timerfd_settime
_settime.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(_Itimerspec),
    ctypes.POINTER(_Itimerspec),
]
_settime.restype = ctypes.c_int


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class TimerFd(OwnedFd):
    """An owned CLOCK_MONOTONIC timerfd, non-blocking, close-on-exec.

    `arm(ns)` schedules one expiry `ns` nanoseconds from now (replacing any earlier one); the fd
    then polls readable until `read()` collects the expiry count.
    """

    def __init__(self) -> None:
        self.fd = _check(_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC), "timerfd_create")

    def arm(self, delay_ns: int) -> None:
        # A zero it_value would disarm the timer: the shortest real delay is 1 ns.
        delay_ns = min(max(1, int(delay_ns)), _MAX_DELAY_NS)
        spec = _Itimerspec()
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(delay_ns, _NS_PER_S)
        _check(_settime(self.fd, 0, ctypes.byref(spec), None), "timerfd_settime")

    def disarm(self) -> None:
        _check(_settime(self.fd, 0, ctypes.byref(_Itimerspec()), None), "timerfd_settime")

    def read(self) -> int:
        """Expiries since the last read (0 when none: the fd is non-blocking)."""
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0
