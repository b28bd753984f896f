"""The virtio-pci modern transport (virtio 1.2, 4.1), non-transitional.

Vendor 0x1AF4, device 0x1040 + type, revision 1. Every structure lives in one 64-bit memory
BAR (BAR 0), laid out as Cloud Hypervisor does (8 KiB apart, so the MSI-X structures do not
share a page with the others):

    0x00000  common configuration (64 bytes: virtio_pci_modern_common_cfg)
    0x02000  ISR status (1 byte, read to clear)
    0x04000  device-specific configuration (4 KiB window)
    0x06000  notifications: queue i at 0x6000 + 4 * i (notify_off_multiplier 4)
    0x08000  MSI-X table (room for 2048 vectors)
    0x48000  MSI-X pending bit array
    BAR size 0x80000

Capabilities (vendor-specific, id 0x09): COMMON_CFG (1), ISR_CFG (3), DEVICE_CFG (4),
NOTIFY_CFG (2), PCI_CFG (5), then MSI-X.

Threads: BAR and config accesses come from vCPU threads; queue notifications arrive on one
eventfd per queue, registered with KVM as an ioeventfd on the queue's notify address and on the
event loop, whose callback calls `device.process_queue(i)` (a notify never runs on a vCPU
thread). `activate()` and `reset()` of the device also run on the loop thread (the vCPU that
wrote DRIVER_OK or 0 waits for them), so the data plane never races its own setup.

Hostile-guest budget: a register access costs O(1) host memory and time, except a queue enable
(one ring validation: O(queue size) reads, no allocation in proportion to it) and the DRIVER_OK
and reset writes, which cost what the device's own activate/reset cost (each device states its
bound). Activation is all or nothing: a device that fails to activate is reset at once, and a
driver reset always leaves the device as new (features forgotten, nothing on the loop). Every
log line a guest can trigger is rate-limited (one `RateLimitedLog` per call site).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import Any, Protocol

from strato._sys.eventfd import EventFd
from strato._sys.ratelog import RateLimitedLog
from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting, MsiVectorGroup
from strato.interrupts.trigger import LevelTrigger
from strato.memory import GuestMemory
from strato.pci.configuration import (
    CAP_ID_MSIX,
    CAP_ID_VENDOR,
    CLASS_COMMUNICATION,
    CLASS_MASS_STORAGE,
    CLASS_NETWORK,
    CLASS_OTHER,
    STATUS_INTERRUPT,
    BarKind,
    BarMove,
    BarSpec,
    PciConfiguration,
)
from strato.pci.device import BarRegion
from strato.pci.msix import (
    MSG_CTL_ENABLE,
    MSG_CTL_FUNCTION_MASK,
    MSIX_CAP_MESSAGE_CONTROL,
    MsixTable,
    msix_capability_body,
)
from strato.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    TYPE_BLOCK,
    TYPE_CONSOLE,
    TYPE_FS,
    TYPE_NET,
    TYPE_VSOCK,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from strato.virtio.queue import Queue

log = logging.getLogger(__name__)

# One rate limit per guest-triggerable log line (a guest must not flood the host log).
_log_ioevent_unregister = RateLimitedLog(log)
_log_ioevent_register = RateLimitedLog(log)
_log_bar_read = RateLimitedLog(log)
_log_bar_write = RateLimitedLog(log)
_log_config_write = RateLimitedLog(log)
_log_queue_enable = RateLimitedLog(log)
_log_status = RateLimitedLog(log)
_log_features_unoffered = RateLimitedLog(log)
_log_features_version = RateLimitedLog(log)
_log_features_conflict = RateLimitedLog(log)
_log_activate = RateLimitedLog(log)
_log_reset = RateLimitedLog(log)
_log_loop_timeout = RateLimitedLog(log)
_log_loop_job = RateLimitedLog(log)
_log_queue = RateLimitedLog(log)

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040
VIRTIO_PCI_REVISION = 1

# cfg_type of the virtio structure capabilities (virtio 1.2, 4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_MSI_NO_VECTOR = 0xFFFF
ISR_QUEUE = 0x1
ISR_CONFIG = 0x2

BAR_INDEX = 0
COMMON_CFG_OFFSET = 0x0000
COMMON_CFG_SIZE = 0x40
ISR_CFG_OFFSET = 0x2000
ISR_CFG_SIZE = 1
DEVICE_CFG_OFFSET = 0x4000
DEVICE_CFG_SIZE = 0x1000
NOTIFY_OFFSET = 0x6000
NOTIFY_OFF_MULTIPLIER = 4
MAX_QUEUES = 0x400
NOTIFY_SIZE = MAX_QUEUES * NOTIFY_OFF_MULTIPLIER
MSIX_TABLE_OFFSET = 0x8000
MSIX_TABLE_SIZE = 0x40000
MSIX_PBA_OFFSET = 0x48000
MSIX_PBA_SIZE = 0x800
BAR_SIZE = 0x80000
NOTIFY_ACCESS_SIZE = 2  # the 16-bit queue index write the ioeventfd matches

# Common configuration register offsets
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
QUEUE_NOTIFY_DATA = 0x38
QUEUE_RESET = 0x3A

_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQHHHH")
assert _COMMON.size == COMMON_CFG_SIZE

# (class, subclass) per device type; anything else is "other"
_CLASS_CODES = {
    TYPE_NET: (CLASS_NETWORK, 0x00),
    TYPE_BLOCK: (CLASS_MASS_STORAGE, 0x80),
    TYPE_CONSOLE: (CLASS_COMMUNICATION, 0x80),
    TYPE_VSOCK: (CLASS_COMMUNICATION, 0x80),
    TYPE_FS: (CLASS_MASS_STORAGE, 0x80),
}

# Seconds a vCPU waits for the event loop to run an activation or reset.
LOOP_JOB_TIMEOUT = 10.0

_KNOWN_STATUS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED
)


class IoEventRegistrar(Protocol):
    """KVM_IOEVENTFD for MMIO addresses (VmFd implements it)."""

    def register_ioevent(
        self, eventfd: int, addr: int, length: int, datamatch: int | None
    ) -> None: ...

    def unregister_ioevent(
        self, eventfd: int, addr: int, length: int, datamatch: int | None
    ) -> None: ...


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap after cap_vndr/cap_next (+ extra fields)."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra


class VirtioPciDevice:
    """A virtio device behind the modern PCI transport; a `PciDevice` and a `VirtioInterrupt`."""

    def __init__(
        self,
        device: VirtioDevice,
        msi: MsiRouting | None,
        mem: GuestMemory,
        loop: EventLoop,
        ioevent_registrar: IoEventRegistrar | None = None,
        intx: LevelTrigger | None = None,
        intx_line: int | None = None,
    ) -> None:
        self.device = device
        self.mem = mem
        self.loop = loop
        self.ioevents = ioevent_registrar
        self.intx = intx
        self._lock = threading.RLock()
        self._isr_lock = threading.Lock()

        sizes = list(device.queue_max_sizes)
        if not 1 <= len(sizes) <= MAX_QUEUES:
            raise ValueError(f"a virtio-pci device has 1..{MAX_QUEUES} queues, not {len(sizes)}")
        self.queues = [Queue(s) for s in sizes]
        self.num_vectors = len(sizes) + 1  # a vector per queue and one for config changes

        device_id = VIRTIO_PCI_DEVICE_ID_BASE + device.device_type
        cls, sub = _CLASS_CODES.get(device.device_type, (CLASS_OTHER, 0x00))
        self.config = PciConfiguration(
            VIRTIO_PCI_VENDOR_ID,
            device_id,
            cls,
            sub,
            revision_id=VIRTIO_PCI_REVISION,
            subsystem_vendor_id=VIRTIO_PCI_VENDOR_ID,
            subsystem_id=device_id,
            interrupt_pin=1 if intx is not None else 0,
        )
        if intx_line is not None:
            self.config.set_interrupt_line(intx_line)
        self.config.add_bar(BarSpec(BAR_INDEX, BAR_SIZE, BarKind.MEM64))
        self._add_capabilities(msi is not None)

        self.vectors: MsiVectorGroup | None = None
        self.msix: MsixTable | None = None
        if msi is not None:
            self.vectors = msi.allocate_group(self.num_vectors)
            self.msix = MsixTable(self.num_vectors, self.vectors)

        # virtio common configuration state
        self.status = 0
        self.driver_features = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(sizes)
        self.config_generation = 0
        self.config_changed = False
        self.isr = 0
        self.activated = False
        self._device_dirty = False  # the device was given features or an activation attempt
        self._intx_level = False

        # notifications: an eventfd per queue, on the loop (and on KVM once BAR 0 is placed)
        self.queue_evts = [EventFd() for _ in sizes]
        self._ioevent_base: int | None = None
        self._jobs: list[Callable[[], None]] = []
        self._jobs_lock = threading.Lock()
        self._job_evt = EventFd()
        self._closed = False
        self._early_notifies: set[int] = set()
        for i, evt in enumerate(self.queue_evts):
            loop.register(evt.fd, self._notify_callback(i))
        loop.register(self._job_evt.fd, self._run_jobs)

    # -- construction -------------------------------------------------------------------------
    def _add_capabilities(self, with_msix: bool) -> None:
        cfg = self.config
        cfg.add_capability(
            CAP_ID_VENDOR,
            _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG_OFFSET, COMMON_CFG_SIZE),
        )
        cfg.add_capability(
            CAP_ID_VENDOR, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE)
        )
        cfg.add_capability(
            CAP_ID_VENDOR,
            _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, DEVICE_CFG_SIZE),
        )
        cfg.add_capability(
            CAP_ID_VENDOR,
            _virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                struct.pack("<I", NOTIFY_OFF_MULTIPLIER),
            ),
        )
        # PCI_CFG: bar, offset and length are the driver's, pci_cfg_data is a window on the BAR
        self.pci_cfg_cap = cfg.add_capability(
            CAP_ID_VENDOR, _virtio_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, b"\0\0\0\0")
        )
        cfg.set_writable(self.pci_cfg_cap + 4, 1, 0xFF)
        cfg.set_writable(self.pci_cfg_cap + 8, 8, (1 << 64) - 1)
        self.msix_cap: int | None = None
        if with_msix:
            self.msix_cap = cfg.add_capability(
                CAP_ID_MSIX,
                msix_capability_body(
                    self.num_vectors, BAR_INDEX, MSIX_TABLE_OFFSET, BAR_INDEX, MSIX_PBA_OFFSET
                ),
            )
            cfg.set_writable(
                self.msix_cap + MSIX_CAP_MESSAGE_CONTROL, 2, MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK
            )

    def close(self) -> None:
        """Unregister everything this transport registered (hot-unplug, VM teardown)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._set_ioevent_base(None)
        for evt in self.queue_evts:
            self.loop.unregister(evt.fd)
            evt.close()
        self.loop.unregister(self._job_evt.fd)
        self._job_evt.close()
        if self.vectors is not None:
            self.vectors.close()

    # -- PciDevice: configuration space -------------------------------------------------------
    def _pci_cfg_data_range(self) -> tuple[int, int]:
        start = self.pci_cfg_cap + 16
        return start, start + 4

    def _pci_cfg_window(self) -> tuple[int, int, int] | None:
        """(bar, offset, length) of the PCI_CFG window, if it names a valid BAR 0 access."""
        c = self.pci_cfg_cap
        bar = self.config.get(c + 4, 1)
        offset = self.config.get(c + 8, 4)
        length = self.config.get(c + 12, 4)
        if bar != BAR_INDEX or length not in (1, 2, 4) or offset % length:
            return None
        if offset + length > BAR_SIZE:
            return None
        return bar, offset, length

    def config_read(self, offset: int, size: int) -> int:
        if not PciConfiguration.access_ok(offset, size):
            return (1 << (8 * max(0, min(size, 8)))) - 1
        start, end = self._pci_cfg_data_range()
        if offset < end and offset + size > start:
            window = self._pci_cfg_window()
            data = b"\0\0\0\0"
            if window is not None:
                _, bar_off, length = window
                data = self.bar_read(BAR_INDEX, bar_off, length).ljust(4, b"\0")
            with self._lock:
                self.config.set(start, 4, int.from_bytes(data, "little"))
        with self._lock:
            return self.config.read(offset, size)

    def config_write(self, offset: int, data: bytes) -> list[BarMove]:
        size = len(data)
        if not PciConfiguration.access_ok(offset, size):
            return []
        start, end = self._pci_cfg_data_range()
        if offset < end and offset + size > start:
            with self._lock:
                for i, b in enumerate(data):
                    if start <= offset + i < end:
                        self.config.set(offset + i, 1, b)
                field = self.config.get(start, 4).to_bytes(4, "little")
            window = self._pci_cfg_window()
            if window is not None:
                _, bar_off, length = window
                self.bar_write(BAR_INDEX, bar_off, field[:length])
            return []
        with self._lock:
            moves = self.config.write(offset, data)
            if self.msix is not None and self.msix_cap is not None:
                ctl = self.msix_cap + MSIX_CAP_MESSAGE_CONTROL
                if offset < ctl + 2 and offset + size > ctl:
                    self.msix.set_message_control(self.config.get(ctl, 2))
            self._update_intx()
            return moves

    # -- PciDevice: BARs ------------------------------------------------------------------------
    def bar_specs(self) -> list[BarSpec]:
        return self.config.bar_specs()

    def bars(self) -> list[BarRegion]:
        return [
            BarRegion(
                s.index, self.config.bar_mapped_address(s.index), s.size, s.kind, s.prefetchable
            )
            for s in self.config.bar_specs()
        ]

    def set_bar_address(self, index: int, address: int) -> None:
        with self._lock:
            self.config.set_bar_address(index, address)
            if index == BAR_INDEX:
                self._set_ioevent_base(address or None)

    def bar_moved(self, index: int, old_base: int, new_base: int) -> None:
        if index == BAR_INDEX:
            with self._lock:
                self._set_ioevent_base(new_base or None)

    @property
    def bar_address(self) -> int:
        return self.config.bar_mapped_address(BAR_INDEX)

    def notify_address(self, queue_index: int) -> int:
        return self.bar_address + NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * queue_index

    def _set_ioevent_base(self, base: int | None) -> None:
        """Move the queue ioeventfds to follow BAR 0 (None: unregister them)."""
        if self.ioevents is None or base == self._ioevent_base:
            return
        old = self._ioevent_base
        for i, evt in enumerate(self.queue_evts):
            step = NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * i
            if old is not None:
                try:
                    self.ioevents.unregister_ioevent(evt.fd, old + step, NOTIFY_ACCESS_SIZE, None)
                except OSError as e:
                    _log_ioevent_unregister.warning(
                        "virtio-pci: unregistering ioeventfd at %#x: %s", old + step, e
                    )
            if base is not None:
                try:
                    self.ioevents.register_ioevent(evt.fd, base + step, NOTIFY_ACCESS_SIZE, None)
                except OSError as e:
                    # the MMIO exit path still delivers the notify, only slower
                    _log_ioevent_register.warning(
                        "virtio-pci: registering ioeventfd at %#x: %s", base + step, e
                    )
        self._ioevent_base = base

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        if index != BAR_INDEX or size <= 0 or offset < 0 or offset + size > BAR_SIZE:
            return b"\0" * max(size, 0)
        try:
            data = self._bar_read(offset, size)
        except Exception:
            _log_bar_read.error("virtio-pci: BAR read at %#x failed", offset, exc_info=True)
            data = b""
        return data[:size].ljust(size, b"\0")

    def _bar_read(self, offset: int, size: int) -> bytes:
        if offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
            with self._lock:
                raw = self._common_bytes()
            return raw[offset : offset + size]
        if ISR_CFG_OFFSET <= offset < ISR_CFG_OFFSET + ISR_CFG_SIZE:
            return bytes([self.read_isr()]) + b"\0" * (size - 1)
        if DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
            with self._lock:
                if self.config_changed:
                    self.config_changed = False
                    self.config_generation = (self.config_generation + 1) & 0xFF
            return self.device.read_config(offset - DEVICE_CFG_OFFSET, size)
        if self.msix is not None:
            if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE:
                return self.msix.read_table(offset - MSIX_TABLE_OFFSET, size)
            if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + MSIX_PBA_SIZE:
                return self.msix.read_pba(offset - MSIX_PBA_OFFSET, size)
        return b"\0" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        size = len(data)
        if index != BAR_INDEX or size == 0 or offset < 0 or offset + size > BAR_SIZE:
            return
        job: Callable[[], None] | None = None
        try:
            if offset < COMMON_CFG_OFFSET + COMMON_CFG_SIZE:
                with self._lock:
                    job = self._common_write(offset, data)
            elif DEVICE_CFG_OFFSET <= offset < DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE:
                # Device code runs on the loop thread only (e.g. virtio-console's emergency
                # write feeds its output path); the vCPU waits for it, which also bounds how
                # fast a guest can queue such writes.
                job = self._config_write_job(offset - DEVICE_CFG_OFFSET, bytes(data))
            elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
                self._mmio_notify(offset - NOTIFY_OFFSET)
            elif self.msix is not None:
                if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + MSIX_TABLE_SIZE:
                    self.msix.write_table(offset - MSIX_TABLE_OFFSET, data)
                elif MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + MSIX_PBA_SIZE:
                    self.msix.write_pba(offset - MSIX_PBA_OFFSET, data)
        except Exception:
            _log_bar_write.error("virtio-pci: BAR write at %#x failed", offset, exc_info=True)
            return
        if job is not None:
            self._run_on_loop(job)

    def _config_write_job(self, offset: int, data: bytes) -> Callable[[], None]:
        def write_config() -> None:
            try:
                self.device.write_config(offset, data)
            except Exception:
                _log_config_write.error(
                    "virtio-pci: device config write at %#x failed", offset, exc_info=True
                )

        return write_config

    # -- common configuration -----------------------------------------------------------------
    def _selected_queue(self) -> Queue | None:
        if self.queue_select < len(self.queues):
            return self.queues[self.queue_select]
        return None

    def _common_bytes(self) -> bytes:
        q = self._selected_queue()
        sel = self.device_feature_select
        features = self.device.device_features
        device_feature = (features >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        drv_sel = self.driver_feature_select
        driver_feature = (
            (self.driver_features >> (32 * drv_sel)) & 0xFFFF_FFFF if drv_sel < 2 else 0
        )
        if q is not None:
            qi = self.queue_select
            queue_fields = (
                q.size,
                self.queue_vectors[qi],
                1 if q.ready else 0,
                qi,
                q.desc_table,
                q.avail_ring,
                q.used_ring,
                qi,
            )
        else:
            queue_fields = (0, VIRTIO_MSI_NO_VECTOR, 0, 0, 0, 0, 0, 0)
        return _COMMON.pack(
            self.device_feature_select,
            device_feature,
            self.driver_feature_select,
            driver_feature,
            self.config_vector,
            len(self.queues),
            self.status,
            self.config_generation,
            self.queue_select,
            *queue_fields,
            0,  # queue_reset: VIRTIO_F_RING_RESET is not offered
            0,  # admin_queue_index
            0,  # admin_queue_num
        )

    def _common_write(self, offset: int, data: bytes) -> Callable[[], None] | None:
        size = len(data)
        value = int.from_bytes(data, "little")
        if size == 4 and offset == DEVICE_FEATURE_SELECT:
            self.device_feature_select = value
        elif size == 4 and offset == DRIVER_FEATURE_SELECT:
            self.driver_feature_select = value
        elif size == 4 and offset == DRIVER_FEATURE:
            self._write_driver_features(value)
        elif size == 2 and offset == CONFIG_MSIX_VECTOR:
            self.config_vector = self._checked_vector(value)
        elif size == 1 and offset == DEVICE_STATUS:
            return self._write_status(value)
        elif size == 2 and offset == QUEUE_SELECT:
            self.queue_select = value
        elif offset >= QUEUE_SIZE:
            self._queue_write(offset, size, value)
        return None

    def _write_driver_features(self, value: int) -> None:
        sel = self.driver_feature_select
        if sel >= 2 or self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK):
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)

    def _checked_vector(self, vector: int) -> int:
        """A vector outside the table is a mapping failure: the register reads NO_VECTOR."""
        if self.msix is None or vector >= self.num_vectors:
            return VIRTIO_MSI_NO_VECTOR
        return vector

    def _queue_write(self, offset: int, size: int, value: int) -> None:
        q = self._selected_queue()
        if q is None or self.status & STATUS_DRIVER_OK:
            return  # queue registers are frozen once the device is live
        qi = self.queue_select
        if size == 2 and offset == QUEUE_MSIX_VECTOR:
            self.queue_vectors[qi] = self._checked_vector(value)
            return
        if size == 2 and offset == QUEUE_ENABLE:
            if value == 1 and not q.ready:
                if self._queue_config_ok(q):
                    q.ready = True
                else:
                    _log_queue_enable.warning(
                        "virtio-pci: queue %d enable refused: invalid configuration", qi
                    )
            return
        if q.ready:
            return  # configure before enabling (virtio 1.2, 4.1.4.3.2)
        if size == 2 and offset == QUEUE_SIZE:
            q.size = value
            return
        for base, attr in (
            (QUEUE_DESC, "desc_table"),
            (QUEUE_DRIVER, "avail_ring"),
            (QUEUE_DEVICE, "used_ring"),
        ):
            current: int = getattr(q, attr)
            if offset == base and size == 8:
                setattr(q, attr, value)
            elif offset == base and size == 4:
                setattr(q, attr, (current & ~0xFFFF_FFFF) | value)
            elif offset == base + 4 and size == 4:
                setattr(q, attr, (current & 0xFFFF_FFFF) | (value << 32))

    def _queue_config_ok(self, q: Queue) -> bool:
        size = q.size
        if not 0 < size <= q.max_size or size & (size - 1):
            return False
        try:
            return bool(q.is_valid(self.mem))
        except Exception:
            return False

    # -- device status ------------------------------------------------------------------------
    def _write_status(self, value: int) -> Callable[[], None] | None:
        if value == 0:
            return self._reset
        current = self.status & _KNOWN_STATUS
        new = value & _KNOWN_STATUS
        if new & current != current:
            _log_status.log(
                logging.DEBUG, "virtio-pci: status %#x -> %#x goes backwards; ignored", current, new
            )
            return None
        added = new & ~current
        if added & STATUS_DRIVER and not new & STATUS_ACKNOWLEDGE:
            return None
        if added & STATUS_FEATURES_OK and not self._features_acceptable(new):
            new &= ~STATUS_FEATURES_OK  # the driver reads it back clear: negotiation failed
        if added & STATUS_FEATURES_OK and new & STATUS_FEATURES_OK:
            self._device_dirty = True
            self.device.ack_features(self.driver_features)
        if added & STATUS_DRIVER_OK and not new & STATUS_FEATURES_OK:
            new &= ~STATUS_DRIVER_OK
        self.status = new | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if new & STATUS_DRIVER_OK and added & STATUS_DRIVER_OK and not new & STATUS_FAILED:
            return self._activate
        return None

    def _features_acceptable(self, status: int) -> bool:
        if not status & STATUS_DRIVER:
            return False
        offered = self.device.device_features
        if self.driver_features & ~offered:
            _log_features_unoffered.warning(
                "virtio-pci: driver accepted features %#x the device did not offer",
                self.driver_features & ~offered,
            )
            return False
        if not self.driver_features >> VIRTIO_F_VERSION_1 & 1:
            _log_features_version.warning("virtio-pci: driver did not accept VERSION_1")
            return False
        # The device's own dependencies between features (e.g. virtio-net, 5.1.3.1).
        conflict: Callable[[int], str | None] | None = getattr(
            self.device, "feature_conflict", None
        )
        reason = conflict(self.driver_features) if conflict is not None else None
        if reason is not None:
            _log_features_conflict.warning(
                "virtio-pci: features %#x refused: %s", self.driver_features, reason
            )
            return False
        return True

    def _activate(self) -> None:
        """Runs on the loop thread: hand the queues to the device."""
        with self._lock:
            if self.activated or not self.status & STATUS_DRIVER_OK:
                return
            event_idx = bool(self.driver_features >> VIRTIO_F_RING_EVENT_IDX & 1)
            for q in self.queues:
                q.event_idx = event_idx
            queues = list(self.queues)
            self._device_dirty = True
        try:
            self.device.activate(self.mem, self, queues, self.loop)
        except Exception:
            _log_activate.error("virtio-pci: device activation failed", exc_info=True)
            self._reset_device()  # all or nothing: nothing of the attempt stays behind
            self.set_needs_reset()
            return
        with self._lock:
            self.activated = True
        early, self._early_notifies = sorted(self._early_notifies), set()
        for index in early:
            self.process_notify(index)

    def _reset(self) -> None:
        """Runs on the loop thread: stop the device, then forget everything negotiated."""
        with self._lock:
            self.activated = False
            self._early_notifies.clear()
        self._reset_device()
        with self._lock:
            for q in self.queues:
                q.reset()
            self.status = 0
            self.driver_features = 0
            self.device_feature_select = 0
            self.driver_feature_select = 0
            self.queue_select = 0
            self.config_vector = VIRTIO_MSI_NO_VECTOR
            self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queues)
            self.config_changed = False
            with self._isr_lock:
                self.isr = 0
            self._update_intx()

    def _reset_device(self) -> None:
        """Reset the device if anything was handed to it (features, an activation attempt)."""
        if not self._device_dirty:
            return
        try:
            self.device.reset()
            self._device_dirty = False
        except Exception:
            _log_reset.error("virtio-pci: device reset failed", exc_info=True)

    # -- jobs on the event loop thread ---------------------------------------------------------
    def _run_on_loop(self, job: Callable[[], None]) -> None:
        """Run `job` on the loop thread and wait for it (directly when there is no such thread)."""
        thread = self.loop.thread
        if thread is None or thread is threading.current_thread() or not thread.is_alive():
            job()
            return
        done = threading.Event()

        def wrapped() -> None:
            try:
                job()
            finally:
                done.set()

        with self._jobs_lock:
            self._jobs.append(wrapped)
        self._job_evt.write(1)
        if not done.wait(LOOP_JOB_TIMEOUT):
            _log_loop_timeout.error(
                "virtio-pci: the event loop did not run %s within %.0f s",
                getattr(job, "__name__", "a job"),
                LOOP_JOB_TIMEOUT,
            )

    def _run_jobs(self, mask: int) -> None:
        self._job_evt.read()
        with self._jobs_lock:
            jobs, self._jobs = self._jobs, []
        for job in jobs:
            try:
                job()
            except Exception:
                _log_loop_job.error("virtio-pci: loop job failed", exc_info=True)

    # -- notifications --------------------------------------------------------------------------
    def _notify_callback(self, index: int) -> Callable[[int], None]:
        evt = self.queue_evts[index]

        def on_notify(mask: int) -> None:
            evt.read()
            self.process_notify(index)

        return on_notify

    def process_notify(self, index: int) -> None:
        """The driver notified queue `index` (called on the loop thread)."""
        if not self.activated:
            if self.status & STATUS_DRIVER_OK:
                # the activation job is queued behind this notify: replay it afterwards
                self._early_notifies.add(index)
            return
        if not self.queues[index].ready:
            return
        try:
            self.device.process_queue(index)
        except Exception:
            _log_queue.error("virtio-pci: queue %d processing failed", index, exc_info=True)
            self.set_needs_reset()

    def _mmio_notify(self, offset: int) -> None:
        """A notify write that reached us (no ioeventfd): the same eventfd, the same path."""
        index, rem = divmod(offset, NOTIFY_OFF_MULTIPLIER)
        if rem == 0 and index < len(self.queue_evts):
            self.queue_evts[index].write(1)

    # -- VirtioInterrupt ------------------------------------------------------------------------
    @property
    def msix_enabled(self) -> bool:
        return self.msix is not None and self.msix.enabled

    def signal_used_queue(self, queue_index: int) -> None:
        if self.msix is not None and self.msix.enabled:
            if 0 <= queue_index < len(self.queue_vectors):
                vector = self.queue_vectors[queue_index]
                if vector != VIRTIO_MSI_NO_VECTOR:
                    self.msix.fire(vector)
            return
        self._raise_isr(ISR_QUEUE)

    def signal_config_change(self) -> None:
        with self._lock:
            self.config_changed = True
        if self.msix is not None and self.msix.enabled:
            with self._isr_lock:
                self.isr |= ISR_CONFIG
            if self.config_vector != VIRTIO_MSI_NO_VECTOR:
                self.msix.fire(self.config_vector)
            return
        self._raise_isr(ISR_CONFIG)

    def set_needs_reset(self) -> None:
        with self._lock:
            if self.status & STATUS_DEVICE_NEEDS_RESET or self.status == 0:
                return
            self.status |= STATUS_DEVICE_NEEDS_RESET
        self.signal_config_change()

    def read_isr(self) -> int:
        with self._isr_lock:
            value, self.isr = self.isr, 0
        self._update_intx()
        return value

    def _raise_isr(self, bit: int) -> None:
        with self._isr_lock:
            self.isr |= bit
        self._update_intx()

    def _update_intx(self) -> None:
        """INTA# follows the ISR while MSI-X is off (and INTx is not disabled)."""
        with self._isr_lock:
            pending = self.isr != 0 and not self.msix_enabled
            self.config.set_status_bits(STATUS_INTERRUPT, pending)
            level = pending and not self.config.intx_disabled
            if self.intx is None or level == self._intx_level:
                return
            self._intx_level = level
            self.intx.set_level(level)

    # -- snapshot -------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The transport's state (the device's own state is saved by its owner)."""
        with self._lock:
            return {
                "config": self.config.state(),
                "msix": self.msix.state() if self.msix is not None else None,
                "status": self.status,
                "driver_features": self.driver_features,
                "device_feature_select": self.device_feature_select,
                "driver_feature_select": self.driver_feature_select,
                "queue_select": self.queue_select,
                "config_vector": self.config_vector,
                "queue_vectors": list(self.queue_vectors),
                "config_generation": self.config_generation,
                "config_changed": self.config_changed,
                "isr": self.isr,
                "activated": self.activated,
                "queues": [q.state() for q in self.queues],
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Load the transport state; re-activates the device if it was live.

        Order: restore the device's own state, then this, then `PciRoot.add_device` (which maps
        the BAR where the restored registers say instead of allocating a new address).
        """
        with self._lock:
            if len(state["queues"]) != len(self.queues):
                raise ValueError("snapshot has a different number of queues")
            self.config.restore(state["config"])
            if self.msix is not None and state.get("msix") is not None:
                self.msix.restore(state["msix"])
            self.status = int(state["status"]) & 0xFF
            self.driver_features = int(state["driver_features"])
            self.device_feature_select = int(state["device_feature_select"])
            self.driver_feature_select = int(state["driver_feature_select"])
            self.queue_select = int(state["queue_select"]) & 0xFFFF
            self.config_vector = int(state["config_vector"]) & 0xFFFF
            self.queue_vectors = [int(v) & 0xFFFF for v in state["queue_vectors"]]
            self.config_generation = int(state["config_generation"]) & 0xFF
            self.config_changed = bool(state["config_changed"])
            self.isr = int(state["isr"]) & 0xFF
            self._device_dirty = bool(self.status & (STATUS_FEATURES_OK | STATUS_DRIVER_OK))
            for q, qs in zip(self.queues, state["queues"], strict=True):
                q.restore(qs)
            self._set_ioevent_base(self.bar_address or None)
            self._update_intx()
            reactivate = bool(state["activated"]) and bool(self.status & STATUS_DRIVER_OK)
        if reactivate:
            self._run_on_loop(self._activate)
