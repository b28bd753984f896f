"""The host side of the guest's network checks: a tap device and raw frames on it (root only)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import threading
from dataclasses import dataclass, field

from tests.taps import create_tap, delete_tap

ETH_P_ALL = 0x0003
ETHERTYPE_TEST = 0x88B5
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 1 << 3
SO_RCVBUFFORCE = 33  # not in Python's socket module
PATTERN_OFFSET = 40  # guest/net.c: test frames carry byte k == k & 0xff from here on


def can_make_taps() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None


class TapDevice:
    """A tap interface that exists for the life of the object (`ip tuntap`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        create_tap(name, quiet_ipv6=False)

    def close(self) -> None:
        delete_tap(self.name)

    def __enter__(self) -> TapDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def mac_bytes(mac: str) -> bytes:
    return bytes(int(part, 16) for part in mac.split(":"))


def rx_test_frame(dst_mac: str, seq: int, size: int, tag: str = "RX") -> bytes:
    """A frame the guest's net-rx check accepts: ETHERTYPE_TEST, text, then byte k == k."""
    size = max(60, min(size, 1514))
    header = mac_bytes(dst_mac) + bytes.fromhex("020000000001") + struct.pack("!H", ETHERTYPE_TEST)
    text = f"STRATO-NET-{tag} seq={seq} ".encode()[: PATTERN_OFFSET - 14]
    body = text + bytes(PATTERN_OFFSET - 14 - len(text))
    tail = bytes(k & 0xFF for k in range(PATTERN_OFFSET, size))
    return header + body + tail


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def udp_checksum_ok(frame: bytes, csum_not_ready: bool) -> bool:
    """Is the UDP checksum of an IPv4 frame right?

    With TP_STATUS_CSUMNOTREADY the kernel hands over the frame before the
    offloaded checksum is filled in: the field must then hold the folded
    pseudo-header sum, which is what the device/kernel completes.
    """
    if len(frame) < 42 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
        return False
    ihl = (frame[14] & 0x0F) * 4
    ip = frame[14 : 14 + ihl]
    udp_len: int = struct.unpack("!H", frame[14 + ihl + 4 : 14 + ihl + 6])[0]
    udp = frame[14 + ihl : 14 + ihl + udp_len]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, udp_len)
    if csum_not_ready:
        field_value: int = struct.unpack("!H", udp[6:8])[0]
        return field_value == _csum(pseudo)
    return _csum(pseudo + udp) == 0xFFFF


@dataclass
class Captured:
    frame: bytes
    csum_not_ready: bool


@dataclass
class PacketCapture:
    """Frames arriving on `ifname` (what the guest sent), collected on a thread."""

    ifname: str
    frames: list[Captured] = field(default_factory=list)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> PacketCapture:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        # Room for bursts from the guest (SO_RCVBUFFORCE: we are root).
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        sock.bind((self.ifname, 0))
        sock.settimeout(0.2)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, anc, _flags, addr = self._sock.recvmsg(65536, socket.CMSG_SPACE(32))
            except TimeoutError:
                continue
            except OSError:
                return
            if addr[2] == socket.PACKET_OUTGOING:
                continue  # our own frames towards the guest
            not_ready = False
            for level, kind, value in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(value) >= 4:
                    not_ready = bool(struct.unpack_from("I", value)[0] & TP_STATUS_CSUMNOTREADY)
            with self._lock:
                self.frames.append(Captured(data, not_ready))

    def send(self, frame: bytes) -> None:
        assert self._sock is not None
        self._sock.send(frame)

    def snapshot(self) -> list[Captured]:
        with self._lock:
            return list(self.frames)

    def test_frames(self, tag: str) -> list[bytes]:
        """Frames of ETHERTYPE_TEST whose text starts with STRATO-NET-<tag>."""
        prefix = f"STRATO-NET-{tag}".encode()
        return [
            c.frame
            for c in self.snapshot()
            if c.frame[12:14] == struct.pack("!H", ETHERTYPE_TEST)
            and c.frame[14:].startswith(prefix)
        ]

    def csum_frames(self) -> list[Captured]:
        return [c for c in self.snapshot() if b"STRATO-NET-CSUM" in c.frame]

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=2)
        if self._sock:
            self._sock.close()
