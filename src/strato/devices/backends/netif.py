"""Host network interface settings by name: index, IPv4 address and netmask, MAC, MTU, up.

What strato sets on a tap it creates, as Cloud Hypervisor's net_util does: SIOC* ioctls on a
socket. An address (SIOCSIFADDR, SIOCSIFNETMASK) needs an AF_INET socket; the main thread's
seccomp filter lets strato make no socket but AF_UNIX stream ones, so `open_control_socket()`
makes the one AF_INET socket before the filter goes on (strato.vmm.seccomp.prepare) and every
call here uses it. It is shut down for reading and writing at once (an unconnected UDP socket
keeps the shutdown): it sends and receives nothing, only carries ioctls.

Every function raises `NetifError` (an OSError with the errno) naming the interface.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import socket
import struct
import threading

IFNAMSIZ = 16
IFREQ_SIZE = 40  # struct ifreq: the name, then a 24-byte union

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFADDR = 0x8916
SIOCSIFNETMASK = 0x891C
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFHWADDR = 0x8927
SIOCGIFINDEX = 0x8933
# Every request this module makes (the main seccomp filter allows them).
REQUESTS = (
    SIOCGIFFLAGS,
    SIOCSIFFLAGS,
    SIOCSIFADDR,
    SIOCSIFNETMASK,
    SIOCSIFMTU,
    SIOCSIFHWADDR,
    SIOCGIFHWADDR,
    SIOCGIFINDEX,
)

IFF_UP = 0x1
ARPHRD_ETHER = 1

_lock = threading.Lock()
_control: socket.socket | None = None
_unavailable: OSError | None = None


class NetifError(OSError):
    """An interface setting that failed; the message names the interface."""


def open_control_socket() -> socket.socket:
    """The process's socket for interface ioctls (made on first use, kept until exit)."""
    global _control, _unavailable
    with _lock:
        if _unavailable is not None:  # not tried again: under the main filter it would be fatal
            raise NetifError(_unavailable.errno, f"no interface control socket: {_unavailable}")
        if _control is None:
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            except OSError as e:
                _unavailable = e
                raise NetifError(e.errno, f"no interface control socket: {e}") from None
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:  # the usual answer: the shutdown holds anyway
                    sock.close()
                    raise
            _control = sock
        return _control


def _ifreq(name: str, data: bytes = b"") -> bytearray:
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise NetifError(errno.EINVAL, f"{name!r}: not a valid interface name")
    return bytearray(raw.ljust(IFNAMSIZ, b"\0") + data.ljust(IFREQ_SIZE - IFNAMSIZ, b"\0"))


def _ioctl(name: str, request: int, req: bytearray, what: str) -> bytearray:
    try:
        fcntl.ioctl(open_control_socket().fileno(), request, req)
    except OSError as e:
        raise NetifError(e.errno, f"{name}: {what}: {e.strerror}") from None
    return req


def ifindex(name: str) -> int | None:
    """The interface's index in this network namespace, None if there is none of that name."""
    try:
        req = _ioctl(name, SIOCGIFINDEX, _ifreq(name), "index")
    except NetifError as e:
        if e.errno == errno.ENODEV:
            return None
        raise
    index: int = struct.unpack_from("i", req, IFNAMSIZ)[0]
    return index


def _sockaddr_in(addr: ipaddress.IPv4Address) -> bytes:
    return struct.pack("=H2s4s", socket.AF_INET, b"", addr.packed)


def parse_ipv4(text: str, what: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise NetifError(errno.EINVAL, f"{what}={text}: not an IPv4 address") from None


def check_netmask(mask: ipaddress.IPv4Address) -> None:
    host = ~int(mask) & 0xFFFFFFFF
    if host & (host + 1):  # the host part must be all the low bits: ones, then zeros
        raise NetifError(errno.EINVAL, f"mask={mask}: not a netmask (ones, then zeros)")


def set_ipv4(name: str, ip: str, mask: str) -> None:
    """Give `name` the address `ip` with netmask `mask` (the kernel adds the subnet's route)."""
    address = parse_ipv4(ip, "ip")
    netmask = parse_ipv4(mask, "mask")
    check_netmask(netmask)
    _ioctl(name, SIOCSIFADDR, _ifreq(name, _sockaddr_in(address)), f"set ip {address}")
    _ioctl(name, SIOCSIFNETMASK, _ifreq(name, _sockaddr_in(netmask)), f"set mask {netmask}")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise NetifError(errno.EINVAL, f"host_mac={text}: not a MAC address (12:34:56:78:9a:bc)")
    try:
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise NetifError(
            errno.EINVAL, f"host_mac={text}: not a MAC address (12:34:56:78:9a:bc)"
        ) from None


def get_mac(name: str) -> str:
    req = _ioctl(name, SIOCGIFHWADDR, _ifreq(name), "get MAC address")
    return ":".join(f"{b:02x}" for b in req[IFNAMSIZ + 2 : IFNAMSIZ + 8])


def set_mac(name: str, mac: str) -> None:
    """Set the interface's own MAC address (nothing is done when it has it already, as Cloud
    Hypervisor does: then no CAP_NET_ADMIN is needed)."""
    raw = parse_mac(mac)
    if get_mac(name) == raw.hex(":"):
        return
    sockaddr = struct.pack("=H14s", ARPHRD_ETHER, raw)
    _ioctl(name, SIOCSIFHWADDR, _ifreq(name, sockaddr), f"set MAC address {mac}")


def set_mtu(name: str, mtu: int) -> None:
    _ioctl(name, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)), f"set MTU {mtu}")


def is_up(name: str) -> bool:
    req = _ioctl(name, SIOCGIFFLAGS, _ifreq(name), "get flags")
    flags: int = struct.unpack_from("H", req, IFNAMSIZ)[0]
    return bool(flags & IFF_UP)


def bring_up(name: str) -> None:
    """Set IFF_UP (nothing is done when it is up already)."""
    req = _ioctl(name, SIOCGIFFLAGS, _ifreq(name), "get flags")
    flags: int = struct.unpack_from("H", req, IFNAMSIZ)[0]
    if flags & IFF_UP:
        return
    struct.pack_into("H", req, IFNAMSIZ, flags | IFF_UP)
    _ioctl(name, SIOCSIFFLAGS, req, "bring up")
