"""Booting the built-in guest under QEMU: the command line and a console socket client."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

QEMU = "qemu-system-x86_64"
# qboot: QEMU's minimal firmware. It boots in a fraction of SeaBIOS' time where
# firmware runs emulated (see docs PLATFORM.md), but leaves PCI BARs to the guest.
QBOOT = Path("/usr/share/qemu/qboot.rom")


def qemu_path() -> str | None:
    return shutil.which(QEMU)


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def fast_firmware() -> str:
    return "qboot" if QBOOT.is_file() else "seabios"


@dataclass
class QemuMachine:
    """What to attach; `command()` renders QEMU's arguments."""

    kernel: Path
    append: str = ""
    accel: str = "kvm"
    firmware: str = "seabios"  # or "qboot"
    cpu: str = "qemu64"
    memory_mib: int = 256
    cpus: int = 1
    disk: Path | None = None
    disk_serial: str = "strato-disk0"
    disk_readonly: bool = False
    rng: bool = True
    console_socket: Path | None = None
    tap: str | None = None
    mac: str = "52:54:00:12:34:56"
    extra: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        cmd = [
            qemu_path() or QEMU,
            "-M", "q35",
            "-accel", self.accel,
            "-cpu", self.cpu,
            "-m", str(self.memory_mib),
            "-smp", str(self.cpus),
            "-nodefaults",
            "-display", "none",
            "-monitor", "none",
            "-serial", "stdio",
            "-no-reboot",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", str(self.kernel),
            "-append", self.append,
        ]  # fmt: skip
        if self.firmware == "qboot":
            cmd += ["-bios", str(QBOOT)]
        if self.disk is not None:
            ro = ",readonly=on" if self.disk_readonly else ""
            blk = f"virtio-blk-pci,disable-legacy=on,drive=disk0,serial={self.disk_serial}"
            cmd += ["-drive", f"file={self.disk},format=raw,if=none,id=disk0{ro}", "-device", blk]
        if self.rng:
            cmd += ["-device", "virtio-rng-pci,disable-legacy=on"]
        if self.console_socket is not None:
            cmd += [
                "-chardev", f"socket,id=con0,path={self.console_socket},server=on,wait=off",
                "-device", "virtio-serial-pci,disable-legacy=on",
                "-device", "virtconsole,chardev=con0",
            ]  # fmt: skip
        if self.tap is not None:
            cmd += [
                "-netdev", f"tap,id=net0,ifname={self.tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,disable-legacy=on,netdev=net0,mac={self.mac}",
            ]  # fmt: skip
        return cmd + self.extra


@dataclass
class ConsoleClient:
    """Connects to a VMM's console unix socket, collects output, writes input."""

    path: Path
    received: bytearray = field(default_factory=bytearray)
    _sock: socket.socket | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self, timeout: float = 10.0) -> ConsoleClient:
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)  # waiting for the VMM to create its socket
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(4096)
            except OSError:
                return
            if not data:
                return
            with self._lock:
                self.received += data

    def write(self, data: bytes) -> None:
        assert self._sock is not None
        self._sock.sendall(data)

    def text(self) -> str:
        with self._lock:
            return self.received.decode("utf-8", "replace")

    def close(self) -> None:
        if self._sock:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        if self._thread:
            self._thread.join(timeout=2)
