"""Thin, typed access to the Linux system calls strato needs (stdlib + ctypes only)."""

from strato._sys.eventfd import EventFd
from strato._sys.ioctl import SysError, ioctl, ioctl_int, ioctl_ptr

__all__ = ["EventFd", "SysError", "ioctl", "ioctl_int", "ioctl_ptr"]
