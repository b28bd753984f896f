"""The driver side of virtio, in Python, for tests and fuzzers.

`DriverQueue` lays out a split virtqueue in a real `GuestMemory` exactly as a guest driver
does: a descriptor table, an avail ring and a used ring, buffers it allocates, chains of
readable then writable buffers, indirect tables, the used_event/avail_event words. A device
under test sees nothing but guest memory, as it would with a real guest. It also exposes the
raw pieces (write any descriptor, any avail entry, any idx) so tests can be hostile.

`VirtioDriver` negotiates features with a device, lays out all its queues and activates it;
`RecordingInterrupt` is the `VirtioInterrupt` a test inspects.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from strato.memory import GuestMemory
from strato.virtio.device import VIRTIO_F_RING_EVENT_IDX, VirtioDevice
from strato.virtio.queue import (
    DESC_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    Queue,
)

if TYPE_CHECKING:
    from strato.events import EventLoop

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

Readable = bytes | bytearray | tuple[int, int]  # data to place, or a raw (addr, len)
Writable = int | tuple[int, int]  # a length to allocate, or a raw (addr, len)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """The virtio spec's test: has idx moved past `event` going from old to new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass
class DriverChain:
    """What the driver put in the queue for one request."""

    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    indices: list[int] = field(default_factory=list)
    indirect_table: int | None = None


class DriverQueue:
    """One split virtqueue, driver side, in guest memory."""

    def __init__(
        self,
        mem: GuestMemory,
        size: int,
        base: int,
        *,
        buffers: tuple[int, int] | None = None,
        event_idx: bool = False,
    ) -> None:
        """Lay out the rings at `base`; allocate buffers from `buffers` = (start, end)."""
        self.mem = mem
        self.size = size
        self.event_idx = event_idx
        self.desc_table = _align(base, 16)
        self.avail_ring = self.desc_table + DESC_SIZE * size
        self.used_ring = _align(self.avail_ring + 6 + 2 * size, 4)
        self.end = self.used_ring + 6 + 8 * size
        mem.fill(self.desc_table, self.end - self.desc_table, 0)
        if buffers is None:
            start = _align(self.end, 4096)
            buffers = (start, start + 1024 * 1024)
        self._buf_start, self._buf_end = buffers
        self._buf_next = self._buf_start
        self._free = list(range(size - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._chains: dict[int, DriverChain] = {}
        self.avail_shadow = 0  # the driver's own copy of avail idx
        self.last_used = 0  # how far the driver has read the used ring

    # -- the device side of the same queue ------------------------------------------------------
    def configure(self, queue: Queue) -> Queue:
        """Program a device Queue as the transport would, and mark it ready."""
        queue.size = self.size
        queue.desc_table = self.desc_table
        queue.avail_ring = self.avail_ring
        queue.used_ring = self.used_ring
        queue.event_idx = self.event_idx
        queue.ready = True
        return queue

    def device_queue(self, max_size: int | None = None) -> Queue:
        return self.configure(Queue(max_size or self.size))

    # -- buffers -------------------------------------------------------------------------------
    def alloc(self, length: int, align: int = 16) -> int:
        """Allocate a buffer in guest memory (bump allocator; `reset_buffers` starts over)."""
        addr = _align(self._buf_next, align)
        if addr + length > self._buf_end:
            raise MemoryError("driver buffer area exhausted; call reset_buffers()")
        self._buf_next = addr + max(length, 1)
        return addr

    def reset_buffers(self) -> None:
        self._buf_next = self._buf_start

    # -- descriptors ---------------------------------------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.mem.write(self.desc_table + DESC_SIZE * index, _DESC.pack(addr, length, flags, next))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        raw = self.mem.read(self.desc_table + DESC_SIZE * index, DESC_SIZE)
        addr, length, flags, nxt = _DESC.unpack(raw)
        return addr, length, flags, nxt

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    def _buffers(
        self, readable: Sequence[Readable], writable: Sequence[Writable]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        rd: list[tuple[int, int]] = []
        for item in readable:
            if isinstance(item, tuple):
                rd.append(item)
            else:
                addr = self.alloc(len(item))
                self.mem.write(addr, item)
                rd.append((addr, len(item)))
        wr: list[tuple[int, int]] = []
        for w in writable:
            if isinstance(w, tuple):
                wr.append(w)
            else:
                addr = self.alloc(w)
                self.mem.fill(addr, w, 0)
                wr.append((addr, w))
        return rd, wr

    def add_chain(
        self,
        readable: Sequence[Readable] = (),
        writable: Sequence[Writable] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> DriverChain:
        """Build a chain of readable then writable buffers and (by default) make it available."""
        rd, wr = self._buffers(readable, writable)
        parts = [(a, n, 0) for a, n in rd] + [(a, n, VIRTQ_DESC_F_WRITE) for a, n in wr]
        if not parts:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table = self.alloc(DESC_SIZE * len(parts), align=16)
            for i, (a, n, f) in enumerate(parts):
                last = i == len(parts) - 1
                self.mem.write(
                    table + DESC_SIZE * i,
                    _DESC.pack(a, n, f | (0 if last else VIRTQ_DESC_F_NEXT), 0 if last else i + 1),
                )
            head = self._take_desc()
            self.write_desc(head, table, DESC_SIZE * len(parts), VIRTQ_DESC_F_INDIRECT)
            chain = DriverChain(head, rd, wr, [head], table)
        else:
            if len(parts) > len(self._free):
                raise MemoryError("not enough free descriptors")
            indices = [self._take_desc() for _ in parts]
            for i, (a, n, f) in enumerate(parts):
                last = i == len(parts) - 1
                self.write_desc(
                    indices[i],
                    a,
                    n,
                    f | (0 if last else VIRTQ_DESC_F_NEXT),
                    0 if last else indices[i + 1],
                )
            chain = DriverChain(indices[0], rd, wr, indices)
        self._chains[chain.head] = chain
        if publish:
            self.publish(chain.head)
        return chain

    def _take_desc(self) -> int:
        if not self._free:
            raise MemoryError("no free descriptors")
        return self._free.pop()

    # -- avail ring ----------------------------------------------------------------------------
    def publish(self, head: int, *, update_idx: bool = True) -> None:
        """Put `head` in the next avail slot, then (release) bump avail idx."""
        slot = self.avail_shadow % self.size
        self.mem.write_u16(self.avail_ring + 4 + 2 * slot, head)
        self.avail_shadow = (self.avail_shadow + 1) & 0xFFFF
        if update_idx:
            self.mem.write_u16(self.avail_ring + 2, self.avail_shadow)

    def set_avail_idx(self, value: int) -> None:
        """Write avail idx directly (hostile tests)."""
        self.avail_shadow = value & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self.avail_shadow)

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.mem.write_u16(self.avail_ring + 4 + 2 * (slot % self.size), head)

    @property
    def avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_ring + 2)

    def set_no_interrupt(self, on: bool) -> None:
        """VIRTQ_AVAIL_F_NO_INTERRUPT (only meaningful without EVENT_IDX)."""
        self.mem.write_u16(self.avail_ring, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, value: int) -> None:
        """used_event: interrupt me when used idx moves past this (EVENT_IDX)."""
        self.mem.write_u16(self.avail_ring + 4 + 2 * self.size, value & 0xFFFF)

    # -- used ring -----------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_ring + 2)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_ring)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_ring + 4 + 8 * self.size)

    def used_entry(self, slot: int) -> tuple[int, int]:
        raw = self.mem.read(self.used_ring + 4 + 8 * (slot % self.size), 8)
        ident, length = _USED_ELEM.unpack(raw)
        return ident, length

    def get_used(self) -> list[tuple[int, int]]:
        """New (id, len) entries since the last call; their descriptors become free again."""
        out = []
        idx = self.used_idx  # acquire: idx before entries
        while self.last_used != idx:
            ident, length = self.used_entry(self.last_used)
            out.append((ident, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            chain = self._chains.pop(ident, None)
            if chain is not None:
                self._free.extend(reversed(chain.indices))
        return out

    def restart_from(self, avail_idx: int, used_idx: int) -> None:
        """Start the driver's bookkeeping over at these ring indices with every descriptor
        free (for tests that scribbled raw descriptors and rings and want to go on)."""
        self.avail_shadow = avail_idx & 0xFFFF
        self.mem.write_u16(self.avail_ring + 2, self.avail_shadow)
        self.last_used = used_idx & 0xFFFF
        self._free = list(range(self.size - 1, -1, -1))
        self._chains.clear()

    def kick_needed(self, old_avail: int, new_avail: int) -> bool:
        """Should the driver notify the device after moving avail idx from old to new?"""
        if self.event_idx:
            return vring_need_event(self.avail_event, new_avail, old_avail)
        return not self.used_flags & VIRTQ_USED_F_NO_NOTIFY


class RecordingInterrupt:
    """A VirtioInterrupt that records what the device raised."""

    def __init__(self) -> None:
        self.used: list[int] = []
        self.config_changes = 0
        self.needs_reset = False

    def signal_used_queue(self, queue_index: int) -> None:
        self.used.append(queue_index)

    def signal_config_change(self) -> None:
        self.config_changes += 1

    def set_needs_reset(self) -> None:
        self.needs_reset = True

    def count(self, queue_index: int) -> int:
        return self.used.count(queue_index)

    def clear(self) -> None:
        self.used.clear()


class VirtioDriver:
    """Negotiates with a device, lays out all its queues in guest memory and activates it.

    Queue i's rings live at `rings_base + i * ring_stride`; buffers come from
    [`buffers_base`, `buffers_end`), split evenly between the queues.
    """

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        *,
        features: int | None = None,
        queue_size: int | None = None,
        rings_base: int = 0x1000,
        ring_stride: int = 0x10000,
        buffers_base: int = 0x100000,
        buffers_end: int | None = None,
    ) -> None:
        self.device = device
        self.mem = mem
        offered = device.device_features
        self.features = offered if features is None else features & offered
        device.ack_features(self.features)
        event_idx = bool(self.features & (1 << VIRTIO_F_RING_EVENT_IDX))
        sizes = device.queue_max_sizes
        if buffers_end is None:
            buffers_end = mem.region_of(buffers_base).end
        share = ((buffers_end - buffers_base) // max(len(sizes), 1)) & ~0xFFF
        self.driver_queues: list[DriverQueue] = []
        self.queues: list[Queue] = []
        for i, max_size in enumerate(sizes):
            size = min(queue_size or max_size, max_size)
            start = buffers_base + i * share
            dq = DriverQueue(
                mem,
                size,
                rings_base + i * ring_stride,
                buffers=(start, start + share),
                event_idx=event_idx,
            )
            self.driver_queues.append(dq)
            self.queues.append(dq.configure(Queue(max_size)))
        self.interrupt = RecordingInterrupt()
        self.loop: EventLoop | None = None

    def activate(self, loop: EventLoop) -> None:
        self.loop = loop
        self.device.activate(self.mem, self.interrupt, self.queues, loop)

    def __getitem__(self, index: int) -> DriverQueue:
        return self.driver_queues[index]

    def kick(self, index: int) -> None:
        """Notify queue `index` (what the ioeventfd would do)."""
        self.device.process_queue(index)
