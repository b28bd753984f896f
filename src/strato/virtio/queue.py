"""The split virtqueue (virtio 1.2, 2.7), device side, validated against a hostile driver.

The transport fills in the queue's configuration fields (`size`, `ready`, the three ring
addresses, `event_idx`); the device pulls descriptor chains with `pop()` and returns them with
`add_used()`. Everything the driver wrote is checked before it is used: the avail index may run
at most `size` entries ahead (else `QueueError`: the device must go NEEDS_RESET), and a chain
that loops, points out of its table, nests indirect tables or puts a device-readable buffer
after a device-writable one raises `ChainError` when the device looks at it (the device returns
that chain unused and carries on). Every ChainError carries a `ChainFault` saying which rule
the chain broke.

Host cost per chain (the budget; guest input cannot raise it): a chain is at most `size`
buffer descriptors wherever they sit (virtio 1.2, 2.7.5.3.1: no chain is longer than the queue
size), so parsing visits at most `size` + 1 descriptors (the +1: one INDIRECT descriptor) and
keeps at most `size` Descriptor tuples and `size` memoryviews (~260 bytes each: under 9 MiB for
the largest queue, 32768; 66 KiB for 256). An indirect table longer than `size` entries is
refused before it is mapped; a loop anywhere ends at the same count. Buffers are never copied:
a chain naming 2^32 bytes of aliased guest memory costs what its descriptors cost. Parsing
takes ~1-3 us per descriptor, so one chain holds the loop at most ~1 ms in a queue of 256 and
~100 ms in one of 32768; a refused chain is parsed once (its error is kept).

Memory ordering: strato runs on x86_64 (TSO), where loads are not reordered with loads and
stores not with stores, so reading the avail idx before the ring entries (acquire) and writing
the used element before the used idx (release) only needs program order. The two places that
need a store->load barrier (publish used idx, then read used_event; write avail_event, then
re-read avail idx) take `_full_barrier()`, a lock round trip whose locked instruction is a full
fence.
"""

from __future__ import annotations

import enum
import struct
import threading
from collections.abc import Iterator
from typing import Any, NamedTuple

from strato.memory import GuestMemory, GuestMemoryError

MAX_QUEUE_SIZE = 32768

# Descriptor flags (virtio 1.2, 2.7.5)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_U64_LIMIT = 1 << 64
_CHAIN_BYTES_LIMIT = 1 << 32  # 2.7.5.2: a chain is at most 2^32 bytes

_barrier_lock = threading.Lock()
_tuple_new = tuple.__new__  # builds a Descriptor without NamedTuple's Python-level __new__


def _full_barrier() -> None:
    # pthread_mutex lock/unlock executes a locked instruction: a full fence on x86.
    _barrier_lock.acquire()
    _barrier_lock.release()


class VirtqueueError(Exception):
    """Base of the errors a hostile or buggy driver can cause."""


class QueueError(VirtqueueError):
    """The queue itself is corrupt (rings outside memory, avail idx too far ahead).

    The device must stop using the queue and ask for a reset (DEVICE_NEEDS_RESET).
    """


class ChainFault(enum.Enum):
    """Which rule a refused chain broke (`ChainError.fault`): tests check the exact one."""

    HEAD_OUT_OF_RANGE = "head index >= queue size"
    NEXT_OUT_OF_RANGE = "next index >= table size"
    TOO_LONG = "more buffer descriptors than the queue size (or a loop)"
    NESTED_INDIRECT = "INDIRECT inside an indirect table"
    INDIRECT_WITH_NEXT = "INDIRECT and NEXT on one descriptor"
    INDIRECT_BAD_LENGTH = "indirect table length 0 or not a multiple of 16"
    INDIRECT_TOO_LARGE = "indirect table longer than the queue size"
    INDIRECT_OUT_OF_MEMORY = "indirect table not in guest memory"
    ADDRESS_OVERFLOW = "buffer address + length overflows 64 bits"
    TOO_MANY_BYTES = "chain longer than 2^32 bytes"
    READABLE_AFTER_WRITABLE = "device-readable buffer after a device-writable one"
    BUFFER_OUT_OF_MEMORY = "buffer not in guest memory"
    TOO_SHORT = "chain shorter than the request needs"
    DEVICE = "refused by the device (its own framing rules)"


class ChainError(VirtqueueError):
    """One descriptor chain is malformed; the device returns it unused and carries on.

    `fault` says which rule it broke; a device's own refusals default to ChainFault.DEVICE.
    """

    def __init__(self, message: str, fault: ChainFault = ChainFault.DEVICE) -> None:
        super().__init__(message)
        self.fault = fault


class Descriptor(NamedTuple):
    addr: int
    len: int
    flags: int

    @property
    def is_write_only(self) -> bool:
        return bool(self.flags & VIRTQ_DESC_F_WRITE)


def guest_views(mem: GuestMemory, addr: int, length: int) -> list[memoryview]:
    """Zero-copy views of guest memory [addr, addr+length), split where regions meet.

    Raises ChainError when any byte of the range is not guest memory.
    """
    if length == 0:
        return []
    views: list[memoryview] = []
    end = addr + length
    for r in mem.regions:
        if r.start <= addr < r.start + r.size:
            n = min(end, r.start + r.size) - addr
            off = addr - r.start
            views.append(r.view[off : off + n])
            addr += n
            if addr == end:
                return views
    raise ChainError(
        f"buffer [{addr:#x}, {end:#x}) is not in guest memory", ChainFault.BUFFER_OUT_OF_MEMORY
    )


def _spans(mem: GuestMemory) -> tuple[tuple[int, int, memoryview], ...]:
    """(start, end, view) of each region of `mem`: the chain parser's region lookup walks this.

    Built once and kept on the GuestMemory (its regions are fixed for its life); rebuilt if
    the region list is ever replaced.
    """
    regions = mem.regions
    cached: tuple[Any, tuple[tuple[int, int, memoryview], ...]] | None = getattr(
        mem, "_virtqueue_spans", None
    )
    if cached is not None and cached[0] is regions:
        return cached[1]
    spans = tuple((r.start, r.start + r.size, r.view) for r in regions)
    mem._virtqueue_spans = (regions, spans)  # type: ignore[attr-defined]
    return spans


class _Cursor:
    """Consumes a list of buffers front to back (a chain's readable or writable part)."""

    def __init__(self, views: list[memoryview]) -> None:
        self._views = views
        self._i = 0
        self._off = 0
        self.remaining = sum(map(len, views))

    def take(self, n: int) -> list[memoryview]:
        """The next n bytes as views (zero-copy, for preadv/pwritev); ChainError if short."""
        if n > self.remaining:
            raise ChainError(
                f"chain too short: need {n} bytes, {self.remaining} left", ChainFault.TOO_SHORT
            )
        out: list[memoryview] = []
        views = self._views
        while n:
            v = views[self._i]
            avail = len(v) - self._off
            if avail == 0:
                self._i += 1
                self._off = 0
                continue
            k = min(avail, n)
            out.append(v[self._off : self._off + k] if (self._off or k != len(v)) else v)
            self._off += k
            n -= k
            self.remaining -= k
        return out

    def take_all(self) -> list[memoryview]:
        return self.take(self.remaining)


class ChainReader(_Cursor):
    """Reads the device-readable part of a chain."""

    def read(self, n: int) -> bytes:
        parts = self.take(n)
        if len(parts) == 1:
            return bytes(parts[0])
        return b"".join(parts)


class ChainWriter(_Cursor):
    """Writes the device-writable part of a chain."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        for v in self.take(len(data)):
            n = len(v)
            v[:] = data[pos : pos + n]
            pos += n


class DescriptorChain:
    """One chain popped from the avail ring; parsed and validated on first use.

    Accessing `descriptors`, `readable()`, `writable()`, the views or a reader/writer raises
    ChainError if the chain is malformed; `head_index` is always valid for `add_used()`.
    """

    __slots__ = (
        "_desc",
        "_error",
        "_parsed",
        "_readable",
        "_size",
        "_spans",
        "_writable",
        "head_index",
        "mem",
    )

    def __init__(
        self,
        mem: GuestMemory,
        desc_table: memoryview,
        size: int,
        head: int,
        spans: tuple[tuple[int, int, memoryview], ...] | None = None,
    ) -> None:
        self.mem = mem
        self._desc = desc_table
        self._size = size
        self.head_index = head
        self._spans = spans  # mem's regions as (start, end, view), when the caller has them
        self._parsed: list[Descriptor] | None = None
        self._error: ChainError | None = None  # why parsing failed: asked again, not redone
        self._readable: list[memoryview] | None = None
        self._writable: list[memoryview] | None = None

    # -- parsing -----------------------------------------------------------------------------
    @property
    def descriptors(self) -> list[Descriptor]:
        if self._parsed is None:
            self._parsed = self._parse_once()
        return self._parsed

    def _parse_once(self) -> list[Descriptor]:
        """`_parse`, but a refused chain is parsed only once (its error is kept)."""
        if self._error is not None:
            raise self._error
        try:
            return self._parse()
        except ChainError as e:
            self._error = e
            raise

    def _parse(self) -> list[Descriptor]:
        table = self._desc
        count = self._size
        index = self.head_index
        if index >= count:
            raise ChainError(
                f"head index {index} >= queue size {count}", ChainFault.HEAD_OUT_OF_RANGE
            )
        # One budget for the whole chain, indirect table included: at most `size` buffer
        # descriptors (a loop, in either table, runs into it too).
        ttl = count
        indirect = False
        seen_write = False
        total = 0
        out: list[Descriptor] = []
        unpack = _DESC.unpack_from
        spans = self._spans or _spans(self.mem)
        readable: list[memoryview] | None = []
        writable: list[memoryview] | None = []
        views: list[memoryview] | None
        while True:
            if ttl == 0:
                raise ChainError(
                    f"chain has more than {self._size} descriptors (a loop?)", ChainFault.TOO_LONG
                )
            ttl -= 1
            addr, length, flags, nxt = unpack(table, index * DESC_SIZE)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if indirect:
                    raise ChainError(
                        "indirect descriptor inside an indirect table", ChainFault.NESTED_INDIRECT
                    )
                if flags & VIRTQ_DESC_F_NEXT:
                    raise ChainError(
                        "descriptor has both INDIRECT and NEXT", ChainFault.INDIRECT_WITH_NEXT
                    )
                if length == 0 or length % DESC_SIZE:
                    raise ChainError(
                        f"indirect table length {length} not a multiple of 16",
                        ChainFault.INDIRECT_BAD_LENGTH,
                    )
                if length > self._size * DESC_SIZE:
                    raise ChainError(
                        f"indirect table of {length // DESC_SIZE} entries > queue size "
                        f"{self._size}",
                        ChainFault.INDIRECT_TOO_LARGE,
                    )
                try:
                    table = self.mem.view(addr, length)
                except GuestMemoryError as e:
                    raise ChainError(
                        f"indirect table not in guest memory: {e}",
                        ChainFault.INDIRECT_OUT_OF_MEMORY,
                    ) from None
                indirect = True
                count = length // DESC_SIZE
                ttl += 1  # the INDIRECT descriptor is not a buffer
                index = 0
                continue
            if addr + length > _U64_LIMIT:
                raise ChainError(
                    f"buffer {addr:#x}+{length:#x} overflows", ChainFault.ADDRESS_OVERFLOW
                )
            total += length
            if total > _CHAIN_BYTES_LIMIT:
                raise ChainError("chain longer than 2^32 bytes", ChainFault.TOO_MANY_BYTES)
            if flags & VIRTQ_DESC_F_WRITE:
                seen_write = True
                views = writable
            elif seen_write:
                raise ChainError(
                    "device-readable descriptor after a device-writable one",
                    ChainFault.READABLE_AFTER_WRITABLE,
                )
            else:
                views = readable
            out.append(_tuple_new(Descriptor, (addr, length, flags)))
            # The buffer views, in the same pass (most buffers sit inside one region). Any
            # other case is left to _split_views, which raises its ChainError only when the
            # device asks for the views: a bad buffer is not a malformed chain.
            if length and views is not None:
                for start, end, view in spans:
                    if start <= addr and addr + length <= end:
                        off = addr - start
                        views.append(view[off : off + length])
                        break
                else:
                    readable = writable = views = None
            if not flags & VIRTQ_DESC_F_NEXT:
                if readable is not None and writable is not None:
                    self._readable, self._writable = readable, writable
                return out
            if nxt >= count:
                raise ChainError(
                    f"next index {nxt} >= table size {count}", ChainFault.NEXT_OUT_OF_RANGE
                )
            index = nxt

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors)

    @property
    def cost(self) -> int:
        """Descriptors this chain made the device look at, for a per-turn work budget: its
        length once parsed, else (refused, or never looked at) the most it could be."""
        parsed = self._parsed
        return len(parsed) if parsed is not None else self._size

    def __len__(self) -> int:
        return len(self.descriptors)

    # -- buffers -----------------------------------------------------------------------------
    def readable(self) -> list[tuple[int, int]]:
        """(addr, len) of the device-readable buffers, in chain order."""
        return [(d.addr, d.len) for d in self.descriptors if not d.flags & VIRTQ_DESC_F_WRITE]

    def writable(self) -> list[tuple[int, int]]:
        """(addr, len) of the device-writable buffers, in chain order."""
        return [(d.addr, d.len) for d in self.descriptors if d.flags & VIRTQ_DESC_F_WRITE]

    @property
    def readable_len(self) -> int:
        return sum(d.len for d in self.descriptors if not d.flags & VIRTQ_DESC_F_WRITE)

    @property
    def writable_len(self) -> int:
        return sum(d.len for d in self.descriptors if d.flags & VIRTQ_DESC_F_WRITE)

    def readable_views(self) -> list[memoryview]:
        """Views of the readable buffers (empty ones left out); ChainError if outside memory."""
        if self._readable is None:
            if self._parsed is None:
                self._parsed = self._parse_once()
            if self._readable is None:
                self._split_views()
        assert self._readable is not None
        return self._readable

    def writable_views(self) -> list[memoryview]:
        """Views of the writable buffers (empty ones left out); ChainError if outside memory."""
        if self._writable is None:
            if self._parsed is None:
                self._parsed = self._parse_once()
            if self._writable is None:
                self._split_views()
        assert self._writable is not None
        return self._writable

    def _split_views(self) -> None:
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        mem = self.mem
        regions = mem.regions
        for addr, length, flags in self.descriptors:
            if not length:
                continue
            out = writable if flags & VIRTQ_DESC_F_WRITE else readable
            for r in regions:  # inline fast path: the buffer sits inside one region
                start = r.start
                if start <= addr and addr + length <= start + r.size:
                    off = addr - start
                    out.append(r.view[off : off + length])
                    break
            else:
                out.extend(guest_views(mem, addr, length))
        self._readable = readable
        self._writable = writable

    def reader(self) -> ChainReader:
        return ChainReader(self.readable_views())

    def writer(self) -> ChainWriter:
        return ChainWriter(self.writable_views())

    def __repr__(self) -> str:
        return f"DescriptorChain(head={self.head_index})"


class Queue:
    """Device side of one split virtqueue."""

    def __init__(self, max_size: int) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue max size {max_size} is not a power of two <= 32768")
        self.max_size = max_size
        self._size = max_size
        self.ready = False
        self._desc_table = 0
        self._avail_ring = 0
        self._used_ring = 0
        self.event_idx = False
        self.next_avail = 0
        self.next_used = 0
        self.num_added = 0  # used entries since the last needs_notification()
        self._mem: GuestMemory | None = None  # the memory the cached ring views are of
        self._spans: tuple[tuple[int, int, memoryview], ...] | None = None  # _mem's regions
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used16: memoryview | None = None  # the used ring as 16-bit words (see _used_words)

    # The ring layout. Setting any of these drops the cached ring views, so the next use
    # validates the new layout; the data path then only checks that the views exist.
    @property
    def size(self) -> int:
        return self._size

    @size.setter
    def size(self, value: int) -> None:
        self._size = value
        self._drop_views()

    @property
    def desc_table(self) -> int:
        return self._desc_table

    @desc_table.setter
    def desc_table(self, value: int) -> None:
        self._desc_table = value
        self._drop_views()

    @property
    def avail_ring(self) -> int:
        return self._avail_ring

    @avail_ring.setter
    def avail_ring(self, value: int) -> None:
        self._avail_ring = value
        self._drop_views()

    @property
    def used_ring(self) -> int:
        return self._used_ring

    @used_ring.setter
    def used_ring(self, value: int) -> None:
        self._used_ring = value
        self._drop_views()

    # -- configuration ----------------------------------------------------------------------
    @staticmethod
    def areas(size: int) -> tuple[int, int, int]:
        """Byte sizes of (descriptor table, avail ring, used ring) for a queue of `size`."""
        return DESC_SIZE * size, 6 + 2 * size, 6 + 8 * size

    def is_valid(self, mem: GuestMemory) -> bool:
        """Size and ring addresses are usable: call before using a queue the driver set up."""
        size = self.size
        if not 0 < size <= self.max_size <= MAX_QUEUE_SIZE or size & (size - 1):
            return False
        if self.desc_table % 16 or self.avail_ring % 2 or self.used_ring % 4:
            return False
        d, a, u = self.areas(size)
        return (
            mem.check(self.desc_table, d)
            and mem.check(self.avail_ring, a)
            and mem.check(self.used_ring, u)
        )

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = self.avail_ring = self.used_ring = 0
        self.event_idx = False
        self.next_avail = self.next_used = self.num_added = 0
        self._drop_views()

    def _drop_views(self) -> None:
        self._mem = None
        self._desc = self._avail = self._used = self._used16 = None

    def state(self) -> dict[str, Any]:
        return {
            "max_size": self.max_size,
            "size": self.size,
            "ready": self.ready,
            "desc_table": self.desc_table,
            "avail_ring": self.avail_ring,
            "used_ring": self.used_ring,
            "event_idx": self.event_idx,
            "next_avail": self.next_avail,
            "next_used": self.next_used,
            "num_added": self.num_added,
        }

    def restore(self, state: dict[str, Any]) -> None:
        if int(state["max_size"]) != self.max_size:
            raise ValueError(f"queue max size {state['max_size']} != {self.max_size}")
        self.size = int(state["size"])
        self.ready = bool(state["ready"])
        self.desc_table = int(state["desc_table"])
        self.avail_ring = int(state["avail_ring"])
        self.used_ring = int(state["used_ring"])
        self.event_idx = bool(state["event_idx"])
        self.next_avail = int(state["next_avail"]) & 0xFFFF
        self.next_used = int(state["next_used"]) & 0xFFFF
        self.num_added = int(state.get("num_added", 0)) & 0xFFFF
        self._drop_views()

    # -- ring access ------------------------------------------------------------------------
    def _rings(self, mem: GuestMemory) -> tuple[memoryview, memoryview, memoryview]:
        if mem is not self._mem or self._used16 is None:
            self._map_rings(mem)
        assert self._desc is not None and self._avail is not None and self._used is not None
        return self._desc, self._avail, self._used

    def _map_rings(self, mem: GuestMemory) -> None:
        """Validate the layout and cache views of the rings in `mem` (until it changes)."""
        self._drop_views()
        if not self.is_valid(mem):
            raise QueueError(
                f"queue size {self.size} or rings (desc {self.desc_table:#x}, avail "
                f"{self.avail_ring:#x}, used {self.used_ring:#x}) are not valid"
            )
        d, a, u = self.areas(self.size)
        self._desc = mem.view(self.desc_table, d)
        self._avail = mem.view(self.avail_ring, a)
        self._used = mem.view(self.used_ring, u)
        self._used16 = self._used.cast("H")  # 6 + 8 * size bytes: always even
        self._spans = _spans(mem)
        self._mem = mem

    def _used_words(self, mem: GuestMemory) -> memoryview:
        """The used ring as native (little-endian on x86) 16-bit words: flags at 0, idx at 1,
        avail_event at 2 + 4 * size.

        The driver reads these while we write them, so each must change in one store. A store
        through this view is one 16-bit store; `struct.pack_into` is not: CPython zeroes the
        destination before packing, and a driver polling the used idx can see 0 in between
        and take it for 65535 new entries.
        """
        self._rings(mem)
        assert self._used16 is not None
        return self._used16

    def avail_idx(self, mem: GuestMemory) -> int:
        return int(_U16.unpack_from(self._rings(mem)[1], 2)[0])

    def used_idx(self, mem: GuestMemory) -> int:
        return int(_U16.unpack_from(self._rings(mem)[2], 2)[0])

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that we have not popped."""
        if not self.ready:
            return 0
        n = (self.avail_idx(mem) - self.next_avail) & 0xFFFF
        if n > self.size:
            raise QueueError(f"avail idx is {n} entries ahead of a queue of {self.size}")
        return n

    # -- data plane -------------------------------------------------------------------------
    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None. Raises QueueError on a corrupt queue."""
        if not self.ready:
            return None
        if mem is not self._mem or self._used16 is None:
            self._map_rings(mem)
        avail = self._avail
        assert avail is not None and self._desc is not None
        u16 = _U16.unpack_from
        idx = u16(avail, 2)[0]  # acquire: the idx before the entries (TSO)
        next_avail = self.next_avail
        ahead = (idx - next_avail) & 0xFFFF
        if ahead == 0:
            return None
        size = self._size
        if ahead > size:
            raise QueueError(f"avail idx {idx} is {ahead} entries ahead of a queue of {size}")
        head = u16(avail, 4 + 2 * (next_avail & (size - 1)))[0]
        if head >= size:
            raise QueueError(f"avail ring entry {head} >= queue size {size}")
        self.next_avail = (next_avail + 1) & 0xFFFF
        return DescriptorChain(mem, self._desc, size, head, self._spans)

    def undo_pop(self) -> None:
        """Give back the last popped chain (e.g. the tap had no frame for an rx buffer)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def add_used(self, mem: GuestMemory, head_index: int, length: int) -> None:
        """Return a chain: write the used element, then publish the new used idx."""
        size = self._size
        if not 0 <= head_index < size:
            raise QueueError(f"used head index {head_index} >= queue size {size}")
        if mem is not self._mem or self._used16 is None:
            self._map_rings(mem)
        words = self._used16
        assert words is not None and self._used is not None
        next_used = self.next_used
        slot = next_used & (size - 1)
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head_index, length & 0xFFFFFFFF)
        self.next_used = next_used = (next_used + 1) & 0xFFFF
        self.num_added += 1
        # Release: after the element (TSO). One store (see _used_words); the element above may
        # be written in two steps, as the driver does not read it before this.
        words[1] = next_used

    def needs_notification(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the entries added since the last call."""
        added = self.num_added
        self.num_added = 0
        if added == 0:
            return False
        _, avail, _ = self._rings(mem)
        _full_barrier()  # the used idx store must be visible before we read the driver's wish
        if self.event_idx:
            used_event = _U16.unpack_from(avail, 4 + 2 * self.size)[0]
            new = self.next_used
            old = (new - added) & 0xFFFF
            # vring_need_event(used_event, new, old); `added` can exceed 0xffff only in theory
            return added > 0xFFFF or ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self, mem: GuestMemory) -> bool:
        """Ask the driver to notify on new buffers; True if some arrived meanwhile (re-check)."""
        if not self.ready:
            return False
        _, avail, _ = self._rings(mem)
        if self.event_idx:
            self._used_words(mem)[2 + 4 * self.size] = self.next_avail  # avail_event
        else:
            self._used_words(mem)[0] = 0  # flags
        _full_barrier()
        return bool(_U16.unpack_from(avail, 2)[0] != self.next_avail)

    def disable_notification(self, mem: GuestMemory) -> None:
        """Tell the driver notifications are not needed while we are processing."""
        if not self.ready or self.event_idx:
            # With EVENT_IDX a stale avail_event already suppresses them.
            return
        self._used_words(mem)[0] = VIRTQ_USED_F_NO_NOTIFY
