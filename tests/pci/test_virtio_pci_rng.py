"""End to end through the transport with strato's real virtio-rng device and split queue: a
request written in guest memory, kicked through the notify address, answered in the used ring,
and announced with the queue's MSI-X vector."""

from __future__ import annotations

from strato.devices.virtio.rng import Rng
from strato.events import EventLoop
from strato.interrupts.msi import MsiRouting
from strato.virtio.device import VIRTIO_F_RING_EVENT_IDX
from strato.virtio.pci import VirtioPciDevice
from strato.virtio.testing import DriverQueue

from .helpers import FakeIoEvents, FakeRoutingBackend, LinuxLikeDriver, make_machine


def test_rng_request_through_pci() -> None:
    mem, mmio, _, root = make_machine()
    loop = EventLoop()
    backend = FakeRoutingBackend()
    io = FakeIoEvents()
    rng = Rng()
    transport = VirtioPciDevice(rng, MsiRouting(backend), mem, loop, io)
    try:
        slot = root.add_device(transport)
        d = LinuxLikeDriver(mmio, slot)
        d.probe()
        assert d.negotiate()
        event_idx = bool(rng.device_features >> VIRTIO_F_RING_EVENT_IDX & 1)
        d.enable_msix()
        dq = DriverQueue(mem, 8, 0x10000, event_idx=event_idx)
        off = d.setup_queue(0, 8, dq.desc_table, dq.avail_ring, dq.used_ring, 1)
        assert d.enable_queue(0)
        d.add_status(4)
        assert d.status == 0xF and transport.activated

        chain = dq.add_chain(writable=[64])
        io.kick(d.notify_addr(off))  # what KVM does with the guest's 16-bit write
        while loop.run_once(0):
            pass
        assert dq.get_used() == [(chain.head, 64)]
        addr, length = chain.writable[0]
        assert length == 64 and mem.read(addr, 64) != bytes(64)
        assert transport.vectors is not None
        assert backend.fired(transport.vectors.gsi(1)) == 1
        assert rng.counters()["read_bytes"] == 64

        d.reset()
        assert not rng.active
    finally:
        transport.close()
        rng.close()
        loop.close()
        mem.close()
