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


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise SysError(err, what)
    return ret


def ioctl(fd: int, request: int, arg: Any = None, what: str = "ioctl") -> int:
    """Call ioctl(fd, request, &arg) for a ctypes object, or with no argument for None."""
    if arg is None:
        ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(0))
    else:
        ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.byref(arg))
    return _check(ret, what)


def ioctl_int(fd: int, request: int, value: int = 0, what: str = "ioctl") -> int:
    """Call ioctl(fd, request, value) where the kernel takes the argument as an integer."""
    ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_ulong(value))
    return _check(ret, what)


def ioctl_ptr(fd: int, request: int, address: int, what: str = "ioctl") -> int:
    """Call ioctl(fd, request, address) with a raw pointer (for variable-length structures)."""
    ret = _ioctl(ctypes.c_int(fd), ctypes.c_ulong(request), ctypes.c_void_p(address))
    return _check(ret, what)


EINTR = errno.EINTR
EAGAIN = errno.EAGAIN
