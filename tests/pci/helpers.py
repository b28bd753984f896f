"""Test doubles for the PCI tests: a recording KVM routing backend, a recording ioeventfd
registrar, a small virtio device, and a driver that talks to a device through config space and
BAR accesses the way Linux's virtio_pci_modern does."""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from strato.bus import Bus
from strato.events import EventLoop
from strato.interrupts.msi import GsiRoute, MsiRoute
from strato.memory import GuestMemory
from strato.pci.bus import PciConfigMmio, PciRoot
from strato.virtio.device import (
    TYPE_RNG,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioInterrupt,
)
from strato.virtio.queue import Queue

ECAM_BASE = 0xE800_0000
ECAM_SIZE = 0x1000_0000


class FakeRoutingBackend:
    """Records what the MSI layer asks of KVM."""

    def __init__(self) -> None:
        self.tables: list[list[GsiRoute]] = []
        self.irqfds: dict[int, int] = {}  # gsi -> eventfd
        self.unregistered: list[tuple[int, int]] = []

    def set_gsi_routing(self, entries: list[GsiRoute]) -> None:
        self.tables.append(list(entries))

    def register_irqfd(self, eventfd_fd: int, gsi: int) -> None:
        assert gsi not in self.irqfds
        self.irqfds[gsi] = eventfd_fd

    def unregister_irqfd(self, eventfd_fd: int, gsi: int) -> None:
        assert self.irqfds.get(gsi) == eventfd_fd
        del self.irqfds[gsi]
        self.unregistered.append((eventfd_fd, gsi))

    @property
    def table(self) -> list[GsiRoute]:
        return self.tables[-1] if self.tables else []

    def msi_routes(self) -> dict[int, MsiRoute]:
        return {r.gsi: r for r in self.table if isinstance(r, MsiRoute)}

    def fired(self, gsi: int) -> int:
        """How many times the irqfd of `gsi` was written since the last call."""
        import os

        try:
            return os.eventfd_read(self.irqfds[gsi])
        except BlockingIOError:
            return 0


class FakeIoEvents:
    """Records KVM_IOEVENTFD registrations (addr -> eventfd)."""

    def __init__(self) -> None:
        self.registered: dict[int, tuple[int, int, int | None]] = {}
        self.log: list[tuple[str, int, int]] = []

    def register_ioevent(self, eventfd: int, addr: int, length: int, datamatch: int | None) -> None:
        assert addr not in self.registered
        self.registered[addr] = (eventfd, length, datamatch)
        self.log.append(("register", eventfd, addr))

    def unregister_ioevent(
        self, eventfd: int, addr: int, length: int, datamatch: int | None
    ) -> None:
        assert self.registered.pop(addr)[0] == eventfd
        self.log.append(("unregister", eventfd, addr))

    def kick(self, addr: int) -> None:
        """What KVM does when the guest writes the address."""
        import os

        os.eventfd_write(self.registered[addr][0], 1)


@dataclass
class FakeVirtioDevice:
    """A VirtioDevice that records what the transport does to it."""

    sizes: tuple[int, ...] = (16, 16)
    features: int = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << 5)
    device_type: int = TYPE_RNG
    config: bytearray = field(default_factory=lambda: bytearray(range(16)))
    acked: list[int] = field(default_factory=list)
    activations: list[tuple[Any, ...]] = field(default_factory=list)
    processed: list[int] = field(default_factory=list)
    resets: int = 0
    config_writes: list[tuple[int, bytes]] = field(default_factory=list)
    activate_threads: list[threading.Thread] = field(default_factory=list)
    process_threads: list[threading.Thread] = field(default_factory=list)
    fail_activate: bool = False
    interrupt: VirtioInterrupt | None = None
    signal_on_process: bool = True

    @property
    def queue_max_sizes(self) -> list[int]:
        return list(self.sizes)

    @property
    def device_features(self) -> int:
        return self.features

    def ack_features(self, features: int) -> None:
        self.acked.append(features)

    def read_config(self, offset: int, size: int) -> bytes:
        return bytes(self.config[offset : offset + size]).ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, bytes(data)))

    def activate(
        self, mem: GuestMemory, interrupt: VirtioInterrupt, queues: list[Queue], loop: EventLoop
    ) -> None:
        self.activate_threads.append(threading.current_thread())
        if self.fail_activate:
            raise RuntimeError("activation failed")
        self.interrupt = interrupt
        self.activations.append((mem, interrupt, queues, loop))

    def process_queue(self, queue_index: int) -> None:
        self.process_threads.append(threading.current_thread())
        self.processed.append(queue_index)
        if self.signal_on_process and self.interrupt is not None:
            self.interrupt.signal_used_queue(queue_index)

    def reset(self) -> None:
        self.resets += 1
        self.interrupt = None

    def counters(self) -> dict[str, int]:
        return {}

    def state(self) -> dict[str, Any]:
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        pass


# -- a driver in Python --------------------------------------------------------------------------
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5


class ConfigAccess:
    """Config space of one function through ECAM, as a guest reads it."""

    def __init__(self, mmio: Bus, slot: int, bus: int = 0, fn: int = 0) -> None:
        self.mmio = mmio
        self.base = ECAM_BASE + (bus << 20 | slot << 15 | fn << 12)

    def read(self, offset: int, size: int) -> int:
        data = self.mmio.read(self.base + offset, size)
        assert data is not None and len(data) == size
        return int.from_bytes(data, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        assert self.mmio.write(self.base + offset, value.to_bytes(size, "little"))


@dataclass
class VirtioCap:
    cfg_type: int
    bar: int
    offset: int
    length: int
    cap_offset: int
    notify_off_multiplier: int = 0


class LinuxLikeDriver:
    """Walks the capability list, sizes and enables BAR 0, negotiates, sets up queues with
    MSI-X, and kicks them, in the order drivers/virtio/virtio_pci_modern*.c do."""

    def __init__(self, mmio: Bus, slot: int) -> None:
        self.mmio = mmio
        self.cfg = ConfigAccess(mmio, slot)
        self.caps: dict[int, VirtioCap] = {}
        self.msix_cap = 0
        self.bar0 = 0

    # config space
    def probe(self) -> None:
        cfg = self.cfg
        assert cfg.read(0x06, 2) & 0x10, "no capability list"
        ptr = cfg.read(0x34, 1) & 0xFC
        seen = set()
        while ptr:
            assert ptr not in seen
            seen.add(ptr)
            cap_id = cfg.read(ptr, 1)
            if cap_id == 0x09:
                cfg_type = cfg.read(ptr + 3, 1)
                cap = VirtioCap(
                    cfg_type,
                    cfg.read(ptr + 4, 1),
                    cfg.read(ptr + 8, 4),
                    cfg.read(ptr + 12, 4),
                    ptr,
                )
                if cfg_type == VIRTIO_PCI_CAP_NOTIFY_CFG:
                    cap.notify_off_multiplier = cfg.read(ptr + 16, 4)
                self.caps.setdefault(cfg_type, cap)  # first of each type wins
            elif cap_id == 0x11:
                self.msix_cap = ptr
            ptr = cfg.read(ptr + 1, 1) & 0xFC
        # BAR 0: 64-bit memory BAR; read its address (the VMM placed it)
        lo = cfg.read(0x10, 4)
        assert lo & 0x7 == 0x4, "BAR 0 is not a 64-bit memory BAR"
        self.bar0 = (lo & ~0xF) | (cfg.read(0x14, 4) << 32)
        cfg.write(0x04, 2, cfg.read(0x04, 2) | 0x6)  # memory space + bus master

    def size_bar0(self) -> int:
        cfg = self.cfg
        cmd = cfg.read(0x04, 2)
        cfg.write(0x04, 2, cmd & ~0x3)
        lo, hi = cfg.read(0x10, 4), cfg.read(0x14, 4)
        cfg.write(0x10, 4, 0xFFFF_FFFF)
        cfg.write(0x14, 4, 0xFFFF_FFFF)
        mask = (cfg.read(0x10, 4) & ~0xF) | (cfg.read(0x14, 4) << 32)
        cfg.write(0x10, 4, lo)
        cfg.write(0x14, 4, hi)
        cfg.write(0x04, 2, cmd)
        return (~mask + 1) & ((1 << 64) - 1)

    # BAR access
    def _addr(self, cfg_type: int, offset: int) -> int:
        cap = self.caps[cfg_type]
        assert cap.bar == 0
        return self.bar0 + cap.offset + offset

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        data = self.mmio.read(self._addr(cfg_type, offset), size)
        assert data is not None and len(data) == size
        return int.from_bytes(data, "little")

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        assert self.mmio.write(self._addr(cfg_type, offset), value.to_bytes(size, "little"))

    def common_read(self, offset: int, size: int) -> int:
        return self.read(VIRTIO_PCI_CAP_COMMON_CFG, offset, size)

    def common_write(self, offset: int, size: int, value: int) -> None:
        self.write(VIRTIO_PCI_CAP_COMMON_CFG, offset, size, value)

    @property
    def status(self) -> int:
        return self.common_read(0x14, 1)

    def add_status(self, bits: int) -> None:
        self.common_write(0x14, 1, self.status | bits)

    def reset(self) -> None:
        self.common_write(0x14, 1, 0)
        assert self.status == 0

    def device_features(self) -> int:
        self.common_write(0x00, 4, 0)
        lo = self.common_read(0x04, 4)
        self.common_write(0x00, 4, 1)
        hi = self.common_read(0x04, 4)
        return lo | hi << 32

    def set_driver_features(self, features: int) -> None:
        self.common_write(0x08, 4, 0)
        self.common_write(0x0C, 4, features & 0xFFFF_FFFF)
        self.common_write(0x08, 4, 1)
        self.common_write(0x0C, 4, features >> 32)

    def negotiate(self, features: int | None = None) -> bool:
        self.reset()
        self.add_status(1)  # ACKNOWLEDGE
        self.add_status(2)  # DRIVER
        offered = self.device_features()
        self.set_driver_features(offered if features is None else features)
        self.add_status(8)  # FEATURES_OK
        return bool(self.status & 8)

    # MSI-X
    def msix_table_addr(self, vector: int) -> int:
        table = self.cfg.read(self.msix_cap + 4, 4)
        assert table & 7 == 0
        return self.bar0 + (table & ~7) + 16 * vector

    def msix_pba_addr(self) -> int:
        pba = self.cfg.read(self.msix_cap + 8, 4)
        return self.bar0 + (pba & ~7)

    def msix_vectors(self) -> int:
        return (self.cfg.read(self.msix_cap + 2, 2) & 0x7FF) + 1

    def enable_msix(self, address: int = 0xFEE0_0000, data_base: int = 0x30) -> None:
        ctl = self.cfg.read(self.msix_cap + 2, 2)
        self.cfg.write(self.msix_cap + 2, 2, ctl | 0xC000)  # enable + function mask
        for v in range(self.msix_vectors()):
            a = self.msix_table_addr(v)
            self.mmio.write(a, struct.pack("<I", address))
            self.mmio.write(a + 4, struct.pack("<I", 0))
            self.mmio.write(a + 8, struct.pack("<I", data_base + v))
            self.mmio.write(a + 12, struct.pack("<I", 0))  # unmask
        self.cfg.write(self.msix_cap + 2, 2, (ctl | 0x8000) & ~0x4000)

    def set_vector_masked(self, vector: int, masked: bool) -> None:
        self.mmio.write(self.msix_table_addr(vector) + 12, struct.pack("<I", 1 if masked else 0))

    def pba(self) -> int:
        data = self.mmio.read(self.msix_pba_addr(), 8)
        assert data is not None
        return int.from_bytes(data, "little")

    # queues
    def setup_queue(
        self, index: int, size: int, desc: int, avail: int, used: int, vector: int | None
    ) -> int:
        self.common_write(0x16, 2, index)
        max_size = self.common_read(0x18, 2)
        assert max_size, f"queue {index} does not exist"
        self.common_write(0x18, 2, size)
        self.common_write(0x20, 4, desc & 0xFFFF_FFFF)
        self.common_write(0x24, 4, desc >> 32)
        self.common_write(0x28, 4, avail & 0xFFFF_FFFF)
        self.common_write(0x2C, 4, avail >> 32)
        self.common_write(0x30, 4, used & 0xFFFF_FFFF)
        self.common_write(0x34, 4, used >> 32)
        notify_off = self.common_read(0x1E, 2)
        if vector is not None:
            self.common_write(0x1A, 2, vector)
            assert self.common_read(0x1A, 2) == vector
        return notify_off

    def enable_queue(self, index: int) -> bool:
        self.common_write(0x16, 2, index)
        self.common_write(0x1C, 2, 1)
        return self.common_read(0x1C, 2) == 1

    def notify_addr(self, notify_off: int) -> int:
        cap = self.caps[VIRTIO_PCI_CAP_NOTIFY_CFG]
        return self.bar0 + cap.offset + notify_off * cap.notify_off_multiplier

    def kick(self, index: int, notify_off: int) -> None:
        assert self.mmio.write(self.notify_addr(notify_off), struct.pack("<H", index))


def make_machine(mem_size: int = 1 << 24) -> tuple[GuestMemory, Bus, Bus, PciRoot]:
    mem = GuestMemory.anonymous([(0, mem_size)])
    mmio = Bus("mmio")
    pio = Bus("pio")
    root = PciRoot(mmio_bus=mmio, pio_bus=pio)
    mmio.insert(PciConfigMmio(root), ECAM_BASE, ECAM_SIZE)
    return mem, mmio, pio, root
