"""PCI segment 0, bus 0: the host bridge, device slots, and the two config access mechanisms.

`PciConfigIo` is the legacy mechanism at I/O port 0xCF8 (CONFIG_ADDRESS, a dword register with
the enable bit 31) and 0xCFC-0xCFF (CONFIG_DATA, any 1/2/4-byte access inside the dword).
`PciConfigMmio` is ECAM: offset = bus << 20 | device << 15 | function << 12 | register.
A function that is not there reads as all-ones, which is how a driver enumerates.

The root also places BARs: it allocates addresses for new devices, maps each BAR on the MMIO
(or PIO) bus as a `BarWindow`, and follows the guest when it re-programs a BAR.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from strato._sys.ratelog import RateLimitedLog
from strato.bus import Bus, BusError
from strato.pci.allocator import AllocationError, PciAllocator
from strato.pci.configuration import (
    CLASS_BRIDGE,
    SUBCLASS_HOST_BRIDGE,
    BarKind,
    BarMove,
    BarSpec,
    PciConfiguration,
)
from strato.pci.device import BarRegion, BarWindow, PciDevice

log = logging.getLogger(__name__)

# Guest-triggerable log lines (config space and BAR moves are the guest's), rate-limited.
_log_config_read = RateLimitedLog(log)
_log_config_write = RateLimitedLog(log)
_log_bar_move = RateLimitedLog(log)
_log_bar_moved = RateLimitedLog(log)

NUM_SLOTS = 32
HOST_BRIDGE_VENDOR_ID = 0x8086  # Intel, with Cloud Hypervisor's virtual PCIe host device id
HOST_BRIDGE_DEVICE_ID = 0x0D57

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_IO_LENGTH = 8
CONFIG_ADDRESS_ENABLE = 1 << 31

# INTx: the INTA# pin of slot s is wired to IOAPIC pin PCI_INTX_GSI_BASE + s % PCI_INTX_GSI_COUNT
# (level-triggered, active low, the way the DSDT's _PRT describes it; see strato.boot.acpi).
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSI_COUNT = 8


def intx_gsi(slot: int) -> int:
    """The GSI the INTA# pin of `slot` is routed to."""
    return PCI_INTX_GSI_BASE + slot % PCI_INTX_GSI_COUNT


def _ones(size: int) -> int:
    return (1 << (8 * size)) - 1


class PciHostBridge:
    """00:00.0: a host bridge with no BARs (vendor 0x8086, device 0x0d57 as Cloud Hypervisor)."""

    def __init__(self) -> None:
        self.config = PciConfiguration(
            HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, CLASS_BRIDGE, SUBCLASS_HOST_BRIDGE
        )

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> list[BarMove]:
        return self.config.write(offset, data)

    def bar_specs(self) -> list[BarSpec]:
        return []

    def bars(self) -> list[BarRegion]:
        return []

    def set_bar_address(self, index: int, address: int) -> None:
        raise KeyError(index)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        pass

    def bar_moved(self, index: int, old_base: int, new_base: int) -> None:
        pass

    def state(self) -> dict[str, Any]:
        return {"config": self.config.state()}

    def restore(self, state: dict[str, Any]) -> None:
        self.config.restore(state["config"])


class PciRoot:
    """Bus 0 of segment 0. Config accesses are serialised by one lock."""

    def __init__(
        self,
        mmio_bus: Bus | None = None,
        pio_bus: Bus | None = None,
        allocator: PciAllocator | None = None,
    ) -> None:
        self.mmio_bus = mmio_bus
        self.pio_bus = pio_bus
        self.allocator = allocator or PciAllocator.from_layout()
        self.host_bridge = PciHostBridge()
        self._slots: dict[int, PciDevice] = {0: self.host_bridge}
        self._windows: dict[tuple[int, int], BarWindow] = {}
        self._lock = threading.RLock()

    # -- slots --------------------------------------------------------------------------------
    def next_free_slot(self) -> int:
        """The slot `add_device` would pick (to wire INTx before creating the device)."""
        with self._lock:
            for s in range(NUM_SLOTS):
                if s not in self._slots:
                    return s
        raise BusError("no free PCI slot")

    def add_device(self, device: PciDevice, slot: int | None = None) -> int:
        """Plug `device` in (the first free slot by default); place and map its BARs.

        A BAR already programmed with an address (restore) keeps it; others get one from the
        allocator. Returns the slot number (device number on bus 0).
        """
        with self._lock:
            if slot is None:
                slot = self.next_free_slot()
            if not 0 <= slot < NUM_SLOTS:
                raise BusError(f"PCI slot {slot} out of range")
            if slot in self._slots:
                raise BusError(f"PCI slot {slot} is taken")
            placed: list[BarRegion] = []
            try:
                current = {r.index: r for r in device.bars()}
                for spec in device.bar_specs():
                    region = current.get(spec.index)
                    if region is not None and region.address:
                        self.allocator.reserve_bar(spec.kind, region.address, spec.size)
                    else:
                        address = self.allocator.allocate_bar(spec)
                        device.set_bar_address(spec.index, address)
                    placed.append(next(r for r in device.bars() if r.index == spec.index))
                for region in placed:
                    self._map(slot, device, region)
            except (AllocationError, BusError):
                for region in placed:
                    self._unmap(slot, region)
                    try:
                        self.allocator.free_bar(region.kind, region.address, region.size)
                    except AllocationError:
                        pass
                raise
            self._slots[slot] = device
            return slot

    def remove_device(self, slot: int) -> PciDevice:
        with self._lock:
            if slot == 0 or slot not in self._slots:
                raise BusError(f"no removable device in PCI slot {slot}")
            device = self._slots.pop(slot)
            for region in device.bars():
                self._unmap(slot, region)
                try:
                    self.allocator.free_bar(region.kind, region.address, region.size)
                except AllocationError:
                    pass
            return device

    def device(self, slot: int) -> PciDevice | None:
        return self._slots.get(slot)

    def devices(self) -> dict[int, PciDevice]:
        return dict(self._slots)

    def _bus_for(self, kind: BarKind) -> Bus | None:
        return self.pio_bus if kind is BarKind.IO else self.mmio_bus

    def _map(self, slot: int, device: PciDevice, region: BarRegion) -> None:
        bus = self._bus_for(region.kind)
        window = BarWindow(device, region.index)
        if bus is not None:
            bus.insert(window, region.address, region.size)
        self._windows[(slot, region.index)] = window

    def _unmap(self, slot: int, region: BarRegion) -> None:
        window = self._windows.pop((slot, region.index), None)
        bus = self._bus_for(region.kind)
        if window is None or bus is None:
            return
        hit = bus.lookup(region.address)
        if hit is not None and hit[0] is window and hit[1] == 0:
            bus.remove(region.address)

    # -- config access ------------------------------------------------------------------------
    def config_read(self, bus: int, dev: int, fn: int, offset: int, size: int) -> int:
        if bus != 0 or fn != 0:
            return _ones(size)
        with self._lock:
            device = self._slots.get(dev)
            if device is None:
                return _ones(size)
            try:
                return device.config_read(offset, size) & _ones(size)
            except Exception:
                _log_config_read.error(
                    "PCI %02x:%02x.%x config read at %#x failed",
                    bus,
                    dev,
                    fn,
                    offset,
                    exc_info=True,
                )
                return _ones(size)

    def config_write(self, bus: int, dev: int, fn: int, offset: int, data: bytes) -> None:
        if bus != 0 or fn != 0:
            return
        with self._lock:
            device = self._slots.get(dev)
            if device is None:
                return
            try:
                moves = device.config_write(offset, data)
            except Exception:
                _log_config_write.error(
                    "PCI %02x:%02x.%x config write at %#x failed",
                    bus,
                    dev,
                    fn,
                    offset,
                    exc_info=True,
                )
                return
            for move in moves:
                self._move_bar(dev, device, move)

    def _move_bar(self, slot: int, device: PciDevice, move: BarMove) -> None:
        """Follow the guest's new BAR address; keep the old one if the new range is taken."""
        bus = self._bus_for(move.kind)
        window = self._windows.get((slot, move.index))
        if bus is not None and window is not None:
            try:
                hit = bus.lookup(move.old_base)
                if hit is not None and hit[0] is window and hit[1] == 0:
                    bus.remove(move.old_base)
                bus.insert(window, move.new_base, move.size)
            except BusError as e:
                _log_bar_move.warning(
                    "PCI %02x BAR %d: cannot move %#x -> %#x (%s); keeping the old address",
                    slot,
                    move.index,
                    move.old_base,
                    move.new_base,
                    e,
                )
                if bus.lookup(move.old_base) is None:
                    bus.insert(window, move.old_base, move.size)
                device.set_bar_address(move.index, move.old_base)
                return
        self.allocator.move_bar(move.kind, move.old_base, move.new_base, move.size)
        try:
            device.bar_moved(move.index, move.old_base, move.new_base)
        except Exception:
            _log_bar_moved.error(
                "PCI %02x BAR %d: bar_moved failed", slot, move.index, exc_info=True
            )


def _parse_config_address(address: int) -> tuple[int, int, int, int]:
    return (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7, address & 0xFC


class PciConfigIo:
    """The 0xCF8/0xCFC mechanism: a BusDevice inserted at PIO 0xCF8, 8 bytes long."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root
        self.address = 0
        self._lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            # CONFIG_ADDRESS only answers dword accesses (0xCF9 is the chipset reset port)
            value = self.address if offset == 0 and size == 4 else _ones(size)
        elif (offset - 4) + size <= 4 and size in (1, 2, 4):
            with self._lock:
                address = self.address
            if not address & CONFIG_ADDRESS_ENABLE:
                value = _ones(size)
            else:
                bus, dev, fn, reg = _parse_config_address(address)
                value = self.root.config_read(bus, dev, fn, reg + offset - 4, size)
        else:
            value = _ones(size)
        return (value & _ones(size)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset < 4:
            if offset == 0 and size == 4:
                with self._lock:
                    self.address = int.from_bytes(data, "little") & 0x80FF_FFFC
            return
        if (offset - 4) + size > 4 or size not in (1, 2, 4):
            return
        with self._lock:
            address = self.address
        if not address & CONFIG_ADDRESS_ENABLE:
            return
        bus, dev, fn, reg = _parse_config_address(address)
        self.root.config_write(bus, dev, fn, reg + offset - 4, data)

    def state(self) -> dict[str, Any]:
        return {"address": self.address}

    def restore(self, state: dict[str, Any]) -> None:
        self.address = int(state["address"])


class PciConfigMmio:
    """ECAM: a BusDevice inserted at LAYOUT.pci_ecam (buses 0..255, 1 MiB each)."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, size: int) -> bytes:
        if size not in (1, 2, 4) or (offset & 3) + size > 4 or offset >> 28:
            return b"\xff" * size
        bus, dev, fn, reg = self._decode(offset)
        value = self.root.config_read(bus, dev, fn, reg, size)
        return value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (1, 2, 4) or (offset & 3) + size > 4 or offset >> 28:
            return
        bus, dev, fn, reg = self._decode(offset)
        self.root.config_write(bus, dev, fn, reg, data)
