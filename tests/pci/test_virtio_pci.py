"""The virtio-pci modern transport, driven through ECAM and BAR accesses like Linux's driver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest

from strato.bus import Bus
from strato.events import EventLoop
from strato.interrupts import CountingTrigger
from strato.interrupts.msi import MsiRouting
from strato.pci.bus import PciRoot
from strato.virtio.device import (
    STATUS_DEVICE_NEEDS_RESET,
    TYPE_BLOCK,
    TYPE_NET,
    VIRTIO_F_VERSION_1,
)
from strato.virtio.pci import (
    BAR_SIZE,
    NOTIFY_OFFSET,
    VIRTIO_MSI_NO_VECTOR,
    VirtioPciDevice,
)
from strato.virtio.testing import DriverQueue

from .helpers import (
    VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG,
    VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG,
    VIRTIO_PCI_CAP_PCI_CFG,
    FakeIoEvents,
    FakeRoutingBackend,
    FakeVirtioDevice,
    LinuxLikeDriver,
    make_machine,
)

V1 = 1 << VIRTIO_F_VERSION_1


class Setup:
    def __init__(
        self,
        device: FakeVirtioDevice | None = None,
        msi: bool = True,
        ioevents: bool = False,
        intx: bool = False,
    ) -> None:
        self.mem, self.mmio, self.pio, self.root = make_machine()
        self.loop = EventLoop()
        self.backend = FakeRoutingBackend()
        self.routing = MsiRouting(self.backend) if msi else None
        self.ioevents = FakeIoEvents() if ioevents else None
        self.intx = CountingTrigger() if intx else None
        self.device = device or FakeVirtioDevice()
        self.transport = VirtioPciDevice(
            self.device,
            self.routing,
            self.mem,
            self.loop,
            self.ioevents,
            intx=self.intx,
            intx_line=17 if intx else None,
        )
        self.slot = self.root.add_device(self.transport)
        self.driver = LinuxLikeDriver(self.mmio, self.slot)
        self.driver.probe()
        self.rings: list[DriverQueue] = []

    def close(self) -> None:
        self.transport.close()
        self.loop.close()
        self.mem.close()

    def setup_queues(self, msix: bool = True, size: int = 8) -> list[int]:
        offs = []
        for i in range(len(self.device.sizes)):
            dq = DriverQueue(self.mem, size, 0x10000 + i * 0x10000)
            self.rings.append(dq)
            offs.append(
                self.driver.setup_queue(
                    i, size, dq.desc_table, dq.avail_ring, dq.used_ring, i + 1 if msix else None
                )
            )
        return offs

    def bring_up(self, msix: bool = True) -> list[int]:
        d = self.driver
        assert d.negotiate()
        if msix:
            d.enable_msix()
            d.common_write(0x10, 2, 0)  # config vector 0
            assert d.common_read(0x10, 2) == 0
        offs = self.setup_queues(msix)
        for i in range(len(offs)):
            assert d.enable_queue(i)
        d.add_status(4)  # DRIVER_OK
        return offs

    def gsi(self, vector: int) -> int:
        assert self.transport.vectors is not None
        return self.transport.vectors.gsi(vector)

    def run_loop(self) -> int:
        ran = 0
        while (n := self.loop.run_once(0)) > 0:
            ran += n
        return ran


@pytest.fixture
def s() -> Iterator[Setup]:
    st = Setup()
    yield st
    st.close()


def test_identity_bar_and_capabilities(s: Setup) -> None:
    cfg = s.driver.cfg
    assert cfg.read(0x00, 2) == 0x1AF4
    assert cfg.read(0x02, 2) == 0x1040 + s.device.device_type
    assert cfg.read(0x08, 1) == 1  # revision 1: modern only
    assert cfg.read(0x2C, 2) == 0x1AF4 and cfg.read(0x2E, 2) >= 0x40
    assert cfg.read(0x0B, 1) == 0xFF  # rng: "other"
    assert s.driver.size_bar0() == BAR_SIZE
    assert s.driver.bar0 == s.transport.bar_address
    caps = s.driver.caps
    assert set(caps) == {1, 2, 3, 4, 5}
    assert caps[VIRTIO_PCI_CAP_NOTIFY_CFG].notify_off_multiplier == 4
    assert caps[VIRTIO_PCI_CAP_COMMON_CFG].length >= 0x38
    assert caps[VIRTIO_PCI_CAP_ISR_CFG].length >= 1
    for cap in caps.values():
        if cap.cfg_type != VIRTIO_PCI_CAP_PCI_CFG:
            assert cap.offset + cap.length <= BAR_SIZE
    assert s.driver.msix_cap and s.driver.msix_vectors() == len(s.device.sizes) + 1
    assert s.driver.common_read(0x12, 2) == 2  # num_queues


@pytest.mark.parametrize(("dtype", "cls"), [(TYPE_NET, 0x0200), (TYPE_BLOCK, 0x0180)])
def test_class_codes(dtype: int, cls: int) -> None:
    st = Setup(FakeVirtioDevice(device_type=dtype))
    try:
        assert st.driver.cfg.read(0x0A, 2) == cls
    finally:
        st.close()


def test_linux_like_bring_up_and_notify(s: Setup) -> None:
    d = s.driver
    assert d.device_features() == s.device.features
    offs = s.bring_up()
    assert offs == [0, 1]
    assert d.status == 0xF
    assert s.device.acked == [s.device.features]
    assert len(s.device.activations) == 1
    mem, interrupt, queues, loop = s.device.activations[0]
    assert mem is s.mem and interrupt is s.transport and loop is s.loop
    assert [q.ready for q in queues] == [True, True]
    assert queues[1].desc_table == s.rings[1].desc_table and queues[1].size == 8
    assert all(q.event_idx for q in queues)  # EVENT_IDX was negotiated
    # kick queue 1 through an MMIO write (no ioeventfd here): processed on the loop
    d.kick(1, offs[1])
    assert s.device.processed == []
    s.run_loop()
    assert s.device.processed == [1]
    # the device signalled queue 1 -> MSI-X vector 2 -> the irqfd of the group's third GSI
    gsi = s.gsi(2)
    assert s.backend.fired(gsi) == 1
    assert s.backend.msi_routes()[gsi].data == 0x30 + 2


def test_notify_through_ioeventfd_never_reaches_the_transport() -> None:
    st = Setup(ioevents=True)
    try:
        offs = st.bring_up()
        io = st.ioevents
        assert io is not None
        addrs = [st.driver.notify_addr(o) for o in offs]
        assert sorted(io.registered) == addrs
        assert all(v[1] == 2 and v[2] is None for v in io.registered.values())
        io.kick(addrs[0])
        io.kick(addrs[0])
        st.run_loop()
        assert st.device.processed == [0]  # two kicks, one drain
    finally:
        st.close()


def test_features_ok_refused_for_features_not_offered(s: Setup) -> None:
    assert not s.driver.negotiate(s.device.features | 1 << 40)
    assert s.driver.status == 0x3  # FEATURES_OK reads back clear
    assert s.device.acked == []
    s.driver.add_status(4)  # DRIVER_OK without FEATURES_OK is ignored
    assert s.driver.status == 0x3
    assert s.device.activations == []


def test_features_ok_refused_without_version_1(s: Setup) -> None:
    assert not s.driver.negotiate(s.device.features & ~V1)
    assert s.device.acked == []
    assert s.driver.negotiate(V1)  # after a reset the minimal set is accepted
    assert s.device.acked == [V1]


def test_status_writes_that_go_backwards_are_ignored(s: Setup) -> None:
    d = s.driver
    d.reset()
    d.common_write(0x14, 1, 2)  # DRIVER without ACKNOWLEDGE
    assert d.status == 0
    d.common_write(0x14, 1, 1)
    d.common_write(0x14, 1, 3)
    d.common_write(0x14, 1, 1)  # drops DRIVER: backwards
    assert d.status == 3
    d.common_write(0x14, 1, 3 | 0x80)  # FAILED can be added
    assert d.status == 0x83
    d.common_write(0x14, 1, 0)
    assert d.status == 0


def test_queue_registers_frozen_after_driver_ok(s: Setup) -> None:
    s.bring_up()
    d = s.driver
    d.common_write(0x16, 2, 0)
    before = (d.common_read(0x18, 2), d.common_read(0x1A, 2), d.common_read(0x20, 4))
    d.common_write(0x18, 2, 4)
    d.common_write(0x1A, 2, 0)
    d.common_write(0x20, 4, 0x5000)
    d.common_write(0x24, 4, 1)
    assert (d.common_read(0x18, 2), d.common_read(0x1A, 2), d.common_read(0x20, 4)) == before
    assert s.transport.queues[0].desc_table == s.rings[0].desc_table


def test_queue_enable_refused_for_an_invalid_queue(s: Setup) -> None:
    d = s.driver
    assert d.negotiate()
    dq = DriverQueue(s.mem, 8, 0x10000)
    d.setup_queue(0, 6, dq.desc_table, dq.avail_ring, dq.used_ring, None)  # not a power of 2
    assert not d.enable_queue(0)
    d.setup_queue(0, 8, 0xFFFF_F000_0000, dq.avail_ring, dq.used_ring, None)  # not memory
    assert not d.enable_queue(0)
    d.setup_queue(0, 32, dq.desc_table, dq.avail_ring, dq.used_ring, None)  # > max 16
    assert not d.enable_queue(0)
    d.setup_queue(0, 8, dq.desc_table, dq.avail_ring, dq.used_ring, None)
    assert d.enable_queue(0)
    # an enabled queue's configuration no longer changes
    d.common_write(0x18, 2, 4)
    assert d.common_read(0x18, 2) == 8
    # a queue that does not exist reads as size 0 and cannot be enabled
    d.common_write(0x16, 2, 5)
    assert d.common_read(0x18, 2) == 0
    assert d.common_read(0x1A, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(0x1C, 2, 1)
    assert d.common_read(0x1C, 2) == 0


def test_vector_outside_the_table_reads_no_vector(s: Setup) -> None:
    d = s.driver
    assert d.negotiate()
    d.common_write(0x10, 2, 3)  # 3 vectors: 0..2
    assert d.common_read(0x10, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(0x16, 2, 1)
    d.common_write(0x1A, 2, 2)
    assert d.common_read(0x1A, 2) == 2
    d.common_write(0x1A, 2, 0x7FF)
    assert d.common_read(0x1A, 2) == VIRTIO_MSI_NO_VECTOR


def test_reset_resets_device_queues_and_vectors(s: Setup) -> None:
    s.bring_up()
    d = s.driver
    d.reset()
    assert s.device.resets == 1
    assert d.status == 0
    for i in range(2):
        d.common_write(0x16, 2, i)
        assert d.common_read(0x18, 2) == 16  # max size again
        assert d.common_read(0x1C, 2) == 0
        assert d.common_read(0x1A, 2) == VIRTIO_MSI_NO_VECTOR
        assert d.common_read(0x20, 4) == 0
    assert d.common_read(0x10, 2) == VIRTIO_MSI_NO_VECTOR
    d.common_write(0x08, 4, 0)
    assert d.common_read(0x0C, 4) == 0  # driver features forgotten
    assert not s.transport.activated
    s.driver.kick(0, 0)
    s.run_loop()
    assert s.device.processed == []  # not active: the notify is dropped
    s.rings.clear()
    s.bring_up()  # and it comes up again
    assert len(s.device.activations) == 2


def test_msix_masking_sets_pending_bits(s: Setup) -> None:
    offs = s.bring_up()
    d = s.driver
    gsi = s.gsi(1)
    d.set_vector_masked(1, True)
    d.kick(0, offs[0])
    s.run_loop()
    assert s.device.processed == [0]
    assert s.backend.fired(gsi) == 0
    assert d.pba() == 0b10
    d.set_vector_masked(1, False)
    assert s.backend.fired(gsi) == 1
    assert d.pba() == 0


def test_intx_fallback_and_isr() -> None:
    st = Setup(msi=False, intx=True)
    try:
        d = st.driver
        assert d.msix_cap == 0  # no MSI-X capability without a routing layer
        assert d.cfg.read(0x3D, 1) == 1 and d.cfg.read(0x3C, 1) == 17  # INTA#, line 17
        offs = st.bring_up(msix=False)
        intx = st.intx
        assert intx is not None
        d.kick(0, offs[0])
        st.run_loop()
        assert intx.level and intx.count == 1
        assert d.cfg.read(0x06, 2) & 0x08  # status: interrupt pending
        assert d.read(VIRTIO_PCI_CAP_ISR_CFG, 0, 1) == 0x1
        assert not intx.level
        assert d.read(VIRTIO_PCI_CAP_ISR_CFG, 0, 1) == 0  # read clears
        assert not d.cfg.read(0x06, 2) & 0x08
        st.transport.signal_config_change()
        assert intx.level
        assert d.read(VIRTIO_PCI_CAP_ISR_CFG, 0, 1) == 0x2
        # INTx disable in the command register keeps the line low
        d.cfg.write(0x04, 2, d.cfg.read(0x04, 2) | 0x400)
        st.transport.signal_used_queue(1)
        assert not intx.level and intx.count == 2
        d.cfg.write(0x04, 2, d.cfg.read(0x04, 2) & ~0x400)
        assert intx.level
    finally:
        st.close()


def test_device_config_and_generation(s: Setup) -> None:
    d = s.driver
    gen = d.common_read(0x15, 1)
    assert d.read(VIRTIO_PCI_CAP_DEVICE_CFG, 4, 4) == 0x07060504
    assert d.common_read(0x15, 1) == gen
    s.transport.signal_config_change()
    assert d.common_read(0x15, 1) == gen  # bumped on the next config read
    d.read(VIRTIO_PCI_CAP_DEVICE_CFG, 0, 1)
    assert d.common_read(0x15, 1) == gen + 1
    d.write(VIRTIO_PCI_CAP_DEVICE_CFG, 2, 2, 0xBEEF)
    assert s.device.config_writes == [(2, b"\xef\xbe")]


def test_set_needs_reset(s: Setup) -> None:
    s.bring_up()
    s.transport.set_needs_reset()
    assert s.driver.status & STATUS_DEVICE_NEEDS_RESET
    gsi0 = s.gsi(0)
    assert s.backend.fired(gsi0) == 1  # config vector 0
    s.driver.add_status(0)  # the driver echoing the bit back keeps it
    assert s.driver.status & STATUS_DEVICE_NEEDS_RESET
    s.driver.reset()
    assert s.driver.status == 0


def test_failed_activation_asks_for_reset() -> None:
    st = Setup(FakeVirtioDevice(fail_activate=True))
    try:
        st.bring_up()
        assert st.driver.status & STATUS_DEVICE_NEEDS_RESET
        assert not st.transport.activated
        assert st.device.resets == 1  # rolled back at once: all or nothing
        st.driver.reset()
        assert st.device.resets == 1  # nothing left to undo
        st.device.fail_activate = False
        st.rings.clear()
        st.bring_up()
        assert st.transport.activated and len(st.device.activations) == 1
    finally:
        st.close()


def test_reset_after_features_ok_resets_the_device(s: Setup) -> None:
    """Features were handed to the device: a reset before DRIVER_OK must take them back."""
    assert s.driver.negotiate()
    assert s.device.acked == [s.device.features]
    s.driver.reset()
    assert s.device.resets == 1
    s.driver.reset()
    assert s.device.resets == 1  # nothing handed over since


class NetLikeDevice(FakeVirtioDevice):
    """A device with virtio-net's feature dependencies (5.1.3.1)."""

    def feature_conflict(self, features: int) -> str | None:
        from strato.devices.virtio.net import Net

        return Net.feature_conflict(features)


@pytest.mark.parametrize(
    ("bits", "ok"),
    [
        ((7,), False),  # GUEST_TSO4 without GUEST_CSUM
        ((1, 7), True),
        ((1, 9), False),  # GUEST_ECN without GUEST_TSO4/6
        ((1, 8, 9), True),
        ((11,), False),  # HOST_TSO4 without CSUM
        ((0, 11, 13), True),
        ((0, 13), False),  # HOST_ECN without HOST_TSO4/6
        ((14,), False),  # HOST_UFO without CSUM
        ((1, 10), True),
    ],
)
def test_features_ok_refused_for_invalid_dependencies(bits: tuple[int, ...], ok: bool) -> None:
    dev = NetLikeDevice()
    for b in range(15):
        dev.features |= 1 << b
    st = Setup(dev)
    try:
        features = V1 | sum(1 << b for b in bits)
        assert st.driver.negotiate(features) is ok
        assert dev.acked == ([features] if ok else [])
    finally:
        st.close()


def test_device_config_writes_run_on_the_loop_thread() -> None:
    """A device-config write (e.g. virtio-console's emergency write) never runs device code
    on the vCPU thread: the transport hands it to the loop thread and waits."""
    st = Setup()
    threads: list[threading.Thread] = []
    write = st.device.write_config

    def recording(offset: int, data: bytes) -> None:
        threads.append(threading.current_thread())
        write(offset, data)

    st.device.write_config = recording  # type: ignore[method-assign]
    st.loop.start()
    try:
        st.driver.write(VIRTIO_PCI_CAP_DEVICE_CFG, 8, 4, 0x41)
        assert threads == [st.loop.thread]
        assert st.device.config_writes == [(8, b"A\0\0\0")]
    finally:
        st.loop.stop()
        st.close()


def test_pci_cfg_capability_window(s: Setup) -> None:
    cfg, cap = s.driver.cfg, s.driver.caps[VIRTIO_PCI_CAP_PCI_CFG].cap_offset

    def window(offset: int, length: int) -> None:
        cfg.write(cap + 4, 1, 0)  # bar
        cfg.write(cap + 8, 4, offset)
        cfg.write(cap + 12, 4, length)

    window(0x12, 2)  # common cfg: num_queues
    assert cfg.read(cap + 16, 2) == 2
    window(0x14, 1)
    cfg.write(cap + 16, 1, 1)  # device_status = ACKNOWLEDGE
    assert s.transport.status == 1
    window(0x14, 3)  # bad length: no access
    assert cfg.read(cap + 16, 4) == 0
    assert cfg.read(cap + 3, 1) == VIRTIO_PCI_CAP_PCI_CFG  # cfg_type stays read-only
    cfg.write(cap + 3, 1, 0x7)
    assert cfg.read(cap + 3, 1) == VIRTIO_PCI_CAP_PCI_CFG


def test_activation_and_notify_run_on_the_loop_thread() -> None:
    st = Setup(ioevents=True)
    st.loop.start()
    try:
        offs = st.bring_up()  # DRIVER_OK from this thread waits for activation on the loop
        loop_thread = st.loop.thread
        assert st.device.activate_threads == [loop_thread]
        assert st.ioevents is not None
        st.ioevents.kick(st.driver.notify_addr(offs[1]))
        deadline = time.monotonic() + 5
        while not st.device.processed and time.monotonic() < deadline:
            time.sleep(0.001)
        assert st.device.processed == [1]
        assert st.device.process_threads == [loop_thread]
        st.driver.reset()
        assert st.device.resets == 1
    finally:
        st.loop.stop()
        st.close()


def test_notify_that_overtakes_the_activation_is_replayed(s: Setup) -> None:
    """On a busy loop a kick can be dispatched before the queued activation job."""
    d = s.driver
    assert d.negotiate()
    offs = s.setup_queues(msix=False)
    assert d.enable_queue(0) and d.enable_queue(1)
    s.transport.status |= 4  # DRIVER_OK is set, the activation job has not run yet
    d.kick(1, offs[1])
    s.run_loop()
    assert s.device.processed == []
    s.transport._activate()
    assert s.device.processed == [1]


def test_bar_move_follows_with_ioeventfds() -> None:
    st = Setup(ioevents=True)
    try:
        io = st.ioevents
        assert io is not None
        old = st.transport.bar_address
        assert sorted(io.registered) == [old + NOTIFY_OFFSET, old + NOTIFY_OFFSET + 4]
        new = old + 0x100_0000
        cfg = st.driver.cfg
        cfg.write(0x10, 4, (new & 0xFFFF_FFFF) | 0x4)
        cfg.write(0x14, 4, new >> 32)
        assert st.transport.bar_address == new
        assert sorted(io.registered) == [new + NOTIFY_OFFSET, new + NOTIFY_OFFSET + 4]
        assert st.mmio.lookup(old) is None
        st.driver.bar0 = new
        assert st.driver.common_read(0x12, 2) == 2
    finally:
        st.close()


def test_close_unregisters_everything() -> None:
    st = Setup(ioevents=True)
    assert st.ioevents is not None and st.ioevents.registered
    gsis = set(st.backend.irqfds)
    assert len(gsis) == 3
    st.transport.close()
    assert st.ioevents.registered == {}
    assert st.backend.irqfds == {}
    st.loop.close()


def test_state_round_trip() -> None:
    st = Setup(ioevents=True)
    try:
        st.bring_up()
        state = json.loads(json.dumps(st.transport.state()))
        # the restored VM: the same device model behind a new transport on a new bus
        mmio2 = Bus("mmio2")
        root2 = PciRoot(mmio_bus=mmio2)
        dev2 = FakeVirtioDevice()
        io2 = FakeIoEvents()
        backend2 = FakeRoutingBackend()
        loop2 = EventLoop()
        t2 = VirtioPciDevice(dev2, MsiRouting(backend2), st.mem, loop2, io2)
        t2.restore(state)
        root2.add_device(t2, slot=st.slot)
        assert t2.status == 0xF and t2.activated
        assert len(dev2.activations) == 1
        assert [q.ready for q in t2.queues] == [True, True]
        assert t2.bar_address == st.transport.bar_address
        assert mmio2.lookup(t2.bar_address) is not None
        assert st.ioevents is not None
        assert sorted(io2.registered) == sorted(st.ioevents.registered)
        assert t2.msix is not None and t2.msix.enabled
        assert len(backend2.msi_routes()) == 3  # the live vectors are routed again
        t2.close()
        loop2.close()
    finally:
        st.close()


def test_concurrent_config_and_bar_access_do_not_break(s: Setup) -> None:
    """Two vCPU-like threads hammer config space and the common cfg at once."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                assert s.driver.cfg.read(0x00, 4) == 0x1044_1AF4
                s.driver.common_write(0x16, 2, (i + n) % 3)
                assert s.driver.common_read(0x18, 2) in (0, 16)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_unused_parts_of_the_bar_read_zero(s: Setup) -> None:
    base = s.transport.bar_address
    assert s.mmio.read(base + 0x1000, 4) == bytes(4)
    assert s.mmio.read(base + NOTIFY_OFFSET, 2) == bytes(2)
    s.mmio.write(base + 0x3000, b"\x01\x02")  # nothing there: ignored
    assert s.mmio.read(base + 0x3000, 2) == bytes(2)
