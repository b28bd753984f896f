"""A Linux tap interface with a virtio-net header on every frame.

The fd is opened non-blocking with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte header
(virtio_net_hdr_v1), so frames move between the tap and guest memory with readv/writev and no
translation. Everything that can fail is tried in the constructor, and fails with a `TapError`
that names the tap.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Sequence

from strato._sys import SysError, ioctl, ioctl_int
from strato._sys.fd import OwnedFd

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1


class _IfReq(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char * IFNAMSIZ),
        ("flags", ctypes.c_short),
        ("_pad", ctypes.c_char * 22),
    ]


class TapError(OSError):
    """A tap that cannot be opened or configured; the message names it."""


class Tap(OwnedFd):
    """An open tap interface (created if missing, which needs CAP_NET_ADMIN)."""

    def __init__(self, name: str, vnet_hdr_size: int = VNET_HDR_SIZE) -> None:
        if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
            raise TapError(errno.EINVAL, f"tap {name!r}: not a valid interface name")
        self.name = name
        self.vnet_hdr_size = vnet_hdr_size
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise TapError(e.errno, f"tap {name}: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            ifr = _IfReq(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            try:
                ioctl(self.fd, TUNSETIFF, ifr, what="TUNSETIFF")
            except SysError as e:
                hint = ""
                if e.errno in (errno.EPERM, errno.EACCES):
                    hint = (
                        " (creating a tap, or using one owned by another user, needs"
                        f" CAP_NET_ADMIN; try `ip tuntap add dev {name} mode tap user $USER`)"
                    )
                elif e.errno == errno.EBUSY:
                    hint = " (already in use, or not a tap with a vnet header)"
                raise TapError(e.errno, f"tap {name}: {e.strerror}{hint}") from None
            self.name = ifr.name.decode()
            try:
                ioctl(self.fd, TUNSETVNETHDRSZ, ctypes.c_int(vnet_hdr_size), what="TUNSETVNETHDRSZ")
            except SysError as e:
                raise TapError(e.errno, f"tap {name}: TUNSETVNETHDRSZ: {e.strerror}") from None
            self.supports_ufo = self._probe(TUN_F_CSUM | TUN_F_UFO)
            self.offload = -1
            self.set_offload(0)
        except BaseException:
            os.close(self.fd)
            self.fd = -1
            raise

    def _probe(self, flags: int) -> bool:
        try:
            ioctl_int(self.fd, TUNSETOFFLOAD, flags, what="TUNSETOFFLOAD")
            return True
        except SysError:
            return False

    def set_offload(self, flags: int) -> None:
        """TUN_F_* offloads the guest accepts on receive (what the tap may hand us)."""
        if flags == self.offload:
            return
        try:
            ioctl_int(self.fd, TUNSETOFFLOAD, flags, what="TUNSETOFFLOAD")
        except SysError as e:
            raise TapError(
                e.errno, f"tap {self.name}: TUNSETOFFLOAD {flags:#x}: {e.strerror}"
            ) from None
        self.offload = flags

    def read_into(self, buffers: Sequence[memoryview]) -> int:
        """One frame (with its vnet header) into `buffers`; BlockingIOError when none waits."""
        return os.readv(self.fd, buffers)

    def write_from(self, buffers: Sequence[memoryview]) -> int:
        """Send one frame (vnet header first) gathered from `buffers`."""
        if len(buffers) > 1024:  # IOV_MAX
            return os.write(self.fd, b"".join(buffers))
        return os.writev(self.fd, buffers)
