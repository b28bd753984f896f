"""ioctl through libc with errno turned into a typed exception.

`fcntl.ioctl` copies immutable arguments into a 1024-byte buffer and cannot pass a pointer to
a structure we keep, so strato calls libc's ioctl through ctypes: the kernel reads and writes
our ctypes objects in place and the call releases the GIL (KVM_RUN depends on that).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.restype = ctypes.c_int


# A second handle on the same function with declared argument types, for hot paths that pass
# plain ints (no c_int/c_ulong objects built per call).
raw_ioctl = ctypes.CDLL(None, use_errno=True).ioctl
raw_ioctl.restype = ctypes.c_int
raw_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


class SysError(OSError):
    """A failed system call: `errno` and `strerror` as OSError has them, plus the call's name."""

    def __init__(self, err: int, what: str) -> None:
        super().__init__(err, f"{what}: {os.strerror(err)}")
        self.what = what


def _failed(ret: int, what: str, restart: bool) -> bool:
    """False when the call succeeded; True to call it again (EINTR, as PEP 475 does for the
    os module: a signal such as SIGTERM may arrive during any ioctl); SysError otherwise."""
    if ret >= 0:
        return False
    err = ctypes.get_errno()
    if err == errno.EINTR and restart:
        return True
    raise SysError(err, what)


def ioctl(fd: int, request: int, arg: Any = None, what: str = "ioctl") -> int:
    """Call ioctl(fd, request, &arg) for a ctypes object, or with no argument for None."""
    ref = ctypes.c_ulong(0) if arg is None else ctypes.byref(arg)
    while True:
        ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ref)
        if not _failed(ret, what, True):
            return int(ret)


def ioctl_int(
    fd: int, request: int, value: int = 0, what: str = "ioctl", *, restart: bool = True
) -> int:
    """Call ioctl(fd, request, value) where the kernel takes the argument as an integer.

    `restart=False` hands EINTR to the caller (KVM_RUN: a signal is how a vCPU is kicked)."""
    while True:
        ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(value))
        if not _failed(ret, what, restart):
            return int(ret)


def ioctl_ptr(fd: int, request: int, address: int, what: str = "ioctl") -> int:
    """Call ioctl(fd, request, address) with a raw pointer (for variable-length structures)."""
    while True:
        ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_void_p(address))
        if not _failed(ret, what, True):
            return int(ret)


EINTR = errno.EINTR
EAGAIN = errno.EAGAIN
