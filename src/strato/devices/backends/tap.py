"""A Linux tap interface with a virtio-net header on every frame, created when missing.

The fd is opened non-blocking with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and a 12-byte header
(virtio_net_hdr_v1), so frames move between the tap and guest memory with readv/writev and no
translation. Everything that can fail is tried in the constructor, and fails with a `TapError`
that names the tap.

A multiqueue tap (`open_queues(name, n)` with n > 1, as Cloud Hypervisor opens one) is the same
interface opened n times with IFF_MULTI_QUEUE: one fd per virtio-net queue pair. The kernel
spreads the frames it sends to the tap over the attached queues (by flow hash); a queue that is
detached (`set_attached(False)`, TUNSETQUEUE) gets none, and its fd neither reads nor writes.

`open_tap` is what a --net device opens, as Cloud Hypervisor's net_util `open_tap`: the tap
is created if missing (`vmtapN` without a name), given `ip`/`mask` only if created here, its
`host_mac` and `mtu` set, and brought up (a tap that is down fails every write with EIO).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Sequence

from strato._sys import SysError, ioctl, ioctl_int
from strato._sys.fd import OwnedFd
from strato.devices.backends import netif

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
MAX_TAP_QUEUES = 256  # the kernel's limit on the fds of one multiqueue tap
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_SIZE = 12  # struct virtio_net_hdr_v1
# The largest frame a tap takes or gives: 64 KiB of GSO payload plus Ethernet and VLAN headers.
MAX_FRAME = 65550
IOV_MAX = 1024  # most buffers one readv/writev takes (UIO_MAXIOV)


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

    def __init__(
        self, name: str, vnet_hdr_size: int = VNET_HDR_SIZE, *, multi_queue: bool = False
    ) -> None:
        _check_name(name)
        self.name = name
        self.vnet_hdr_size = vnet_hdr_size
        self.multi_queue = multi_queue
        self.attached = True  # TUNSETIFF attaches the queue
        self._scratch: memoryview | None = None  # write_from's gather buffer, when needed
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise TapError(e.errno, f"tap {name}: cannot open /dev/net/tun: {e.strerror}") from None
        try:
            flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
            ifr = _IfReq(name.encode(), flags)
            try:
                try:
                    ioctl(self.fd, TUNSETIFF, ifr, what="TUNSETIFF")
                except SysError as e:
                    if e.errno not in (errno.EINVAL, errno.EBUSY) or multi_queue:
                        raise
                    # One queue of a tap made with multi_queue: the kernel wants the flag.
                    ifr = _IfReq(name.encode(), flags | IFF_MULTI_QUEUE)
                    try:
                        ioctl(self.fd, TUNSETIFF, ifr, what="TUNSETIFF")
                    except SysError:
                        raise e from None  # not that: the first error says what is wrong
                    self.multi_queue = True
            except SysError as e:
                hint = ""
                if e.errno in (errno.EINVAL, errno.EBUSY) and multi_queue:
                    hint = (
                        " (a tap made without multi_queue cannot take several queues; try"
                        f" `ip tuntap add dev {name} mode tap multi_queue`)"
                    )
                elif e.errno in (errno.EPERM, errno.EACCES):
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

    @classmethod
    def open_queues(cls, name: str, count: int, vnet_hdr_size: int = VNET_HDR_SIZE) -> list[Tap]:
        """`count` fds on tap `name`: one plain fd for 1, IFF_MULTI_QUEUE fds for more.

        All or nothing: if one cannot be opened, those already open are closed.
        """
        if not 1 <= count <= MAX_TAP_QUEUES:
            raise TapError(errno.EINVAL, f"tap {name}: {count} queues (1..{MAX_TAP_QUEUES})")
        taps: list[Tap] = []
        try:
            for _ in range(count):
                # After the first, by the name the kernel gave (`name` may be a template).
                taps.append(
                    cls(taps[0].name if taps else name, vnet_hdr_size, multi_queue=count > 1)
                )
        except BaseException:
            for t in taps:
                t.close()
            raise
        return taps

    def set_attached(self, attached: bool) -> None:
        """Attach or detach this queue of a multiqueue tap (TUNSETQUEUE).

        A detached queue is given no frames by the kernel, and its fd neither reads nor writes
        (poll reports EPOLLERR): it must not be on an event loop meanwhile.
        """
        if attached == self.attached:
            return
        if not self.multi_queue:
            raise TapError(errno.EINVAL, f"tap {self.name}: not a multiqueue tap")
        ifr = _IfReq(b"", IFF_ATTACH_QUEUE if attached else IFF_DETACH_QUEUE)
        try:
            ioctl(self.fd, TUNSETQUEUE, ifr, what="TUNSETQUEUE")
        except SysError as e:
            what = "attach" if attached else "detach"
            raise TapError(e.errno, f"tap {self.name}: {what} queue: {e.strerror}") from None
        self.attached = attached

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
        """Send one frame (vnet header first) gathered from `buffers`.

        More buffers than writev takes are gathered into one fixed scratch buffer of the
        largest frame's size (allocated on first use, then reused): the copy is bounded by
        that size whatever the buffers claim, and a longer frame fails with EMSGSIZE untouched.
        """
        if len(buffers) <= IOV_MAX:
            return os.writev(self.fd, buffers)
        total = 0
        for b in buffers:
            total += len(b)
        limit = self.vnet_hdr_size + MAX_FRAME
        if total > limit:
            raise OSError(errno.EMSGSIZE, f"frame of {total} bytes exceeds {limit}")
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(limit))
        pos = 0
        for b in buffers:
            n = len(b)
            scratch[pos : pos + n] = b
            pos += n
        return os.write(self.fd, scratch[:pos])


GENERATED_NAME = "vmtap%d"  # Cloud Hypervisor's: the kernel picks the first free number
DEFAULT_MASK = "255.255.255.0"
_PERM_HINT = " (configuring an interface needs CAP_NET_ADMIN)"


def open_tap(
    name: str | None,
    queue_pairs: int,
    *,
    ip: str | None = None,
    mask: str | None = None,
    host_mac: str | None = None,
    mtu: int | None = None,
    vnet_hdr_size: int = VNET_HDR_SIZE,
) -> list[Tap]:
    """One fd per queue pair on tap `name`, made ready as Cloud Hypervisor's `open_tap` does.

    A tap that does not exist is created (a new `vmtapN` when `name` is None); it is not
    persistent, so it goes away when the last fd is closed. Only a tap created here gets
    `ip`/`mask` (an existing interface keeps its addresses); `host_mac` and `mtu` are set on
    either, and the tap is brought up. All or nothing: on an error every fd is closed (and a
    tap created here is gone).
    """
    if name is not None:
        _check_name(name)
    what = name if name is not None else GENERATED_NAME
    try:
        # The settings are checked before anything is made.
        if ip is not None:
            netif.parse_ipv4(ip, "ip")
        if mask is not None:
            netif.check_netmask(netif.parse_ipv4(mask, "mask"))
        if host_mac is not None:
            netif.parse_mac(host_mac)
        existed = name is not None and netif.ifindex(name) is not None
    except netif.NetifError as e:
        raise TapError(e.errno, f"tap {what}: {e.strerror}") from None
    try:
        taps = Tap.open_queues(name or GENERATED_NAME, queue_pairs, vnet_hdr_size)
    except TapError as e:
        raise _creation_error(e, name, existed) from None
    real = taps[0].name
    try:
        if not existed and ip is not None:
            netif.set_ipv4(real, ip, mask if mask is not None else DEFAULT_MASK)
        elif existed and ip is not None:
            log.info("tap %s exists already: its IP configuration is left as it is", real)
        if host_mac is not None:
            netif.set_mac(real, host_mac)
        if mtu is not None:
            netif.set_mtu(real, mtu)
        netif.bring_up(real)
    except netif.NetifError as e:
        for t in taps:
            t.close()
        hint = _PERM_HINT if e.errno in (errno.EPERM, errno.EACCES) else ""
        raise TapError(e.errno, f"tap {e.strerror}{hint}") from None
    except BaseException:
        for t in taps:
            t.close()
        raise
    return taps


def _check_name(name: str) -> None:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name:
        raise TapError(
            errno.EINVAL,
            f"tap {name!r}: not a valid interface name (1 to {IFNAMSIZ - 1} bytes, no '/')",
        )


def _creation_error(e: TapError, name: str | None, existed: bool) -> TapError:
    """The exact reason when TUNSETIFF fails on a name that did not exist, or on one that
    exists and is no tap."""
    if existed or name is None:
        if existed and e.errno == errno.EINVAL and "multi_queue" not in str(e.strerror):
            return TapError(
                e.errno,
                f"tap {name}: an interface of that name exists and is not a tap"
                f" (TUNSETIFF: {os.strerror(e.errno)})",
            )
        if name is None and e.errno in (errno.EPERM, errno.EACCES):
            return TapError(
                e.errno,
                f"tap {GENERATED_NAME}: cannot create a tap: {os.strerror(e.errno)} (creating a tap"
                " needs CAP_NET_ADMIN; or create one and give its name: `ip tuntap add dev NAME"
                " mode tap user $USER`, then --net tap=NAME)",
            )
        return e
    reason = os.strerror(e.errno) if e.errno else str(e)
    if e.errno in (errno.EPERM, errno.EACCES):
        return TapError(
            e.errno,
            f"tap {name}: does not exist and cannot be created: {reason} (creating a tap needs"
            f" CAP_NET_ADMIN; or create it first: `ip tuntap add dev {name} mode tap user $USER`)",
        )
    if e.errno == errno.EINVAL:
        return TapError(
            e.errno, f"tap {name}: cannot create it: {reason} (not a valid interface name)"
        )
    return TapError(e.errno, f"tap {name}: cannot create it: {reason}")
