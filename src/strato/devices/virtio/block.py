"""virtio-blk (virtio 1.2, 5.2) on a raw image.

Each request is a header (16 device-readable bytes), data buffers, and a status byte: the last
device-writable byte. Data moves straight between the image and guest memory (preadv/pwritev on
memoryviews). Everything the guest sends is checked before the image is touched: directions,
lengths, sector ranges (with overflow in mind), segment counts. A request that fails these
checks gets VIRTIO_BLK_S_IOERR (or UNSUPP for an unknown type) and changes nothing; a chain with
no place for a status byte is returned unused.

With a rate limiter (strato.devices.rate_limiter, Cloud Hypervisor's semantics) every request
takes one op and read/write requests their data bytes; a request the limiter does not admit
stays in its queue until the limiter's timer fires. It waits; it is never failed or dropped.

Budget per request, whatever the guest's descriptors look like (issue 10):
- host memory: the chain's descriptors and views (at most `queue_size` of each, see
  strato.virtio.queue), a 16-byte header, a discard/write-zeroes segment list of at most
  max_seg * 16 bytes (its size is checked before it is copied), and on an O_DIRECT disk with
  unaligned buffers one BOUNCE_SIZE (1 MiB) bounce buffer, made once per disk and looped over.
  Data otherwise moves straight between the image and guest memory: a request naming 2^32
  bytes of aliased guest memory costs no more host memory than one naming 4 KiB.
- loop time: a read or write of more than TURN_BYTES (4 MiB) is moved a TURN_BYTES piece per
  loop turn (the chain stays with the device meanwhile; a snapshot finishes it, a reset drops
  it), and a `_drain` pass stops after TURN_BYTES of data or TURN_DESCRIPTORS descriptors, so
  one turn moves at most 2 * TURN_BYTES and parses at most TURN_DESCRIPTORS + `queue_size`
  descriptors, plus one fdatasync for a FLUSH and the fallocate calls of at most max_seg
  discard/write-zeroes segments (their zero-writing fallback: _ZERO_CHUNK at a time, but all
  of a segment in one turn).
"""

from __future__ import annotations

import select
import struct
from typing import Any

from strato.devices.backends.raw import RawFile
from strato.devices.rate_limiter import RateLimiter, TokenType
from strato.devices.virtio.base import TURN_BYTES, InProgress, VirtioDeviceBase
from strato.virtio.device import TYPE_BLOCK
from strato.virtio.queue import (
    VIRTQ_DESC_F_WRITE,
    ChainError,
    ChainReader,
    ChainWriter,
    Descriptor,
    DescriptorChain,
    guest_views,
)

# Feature bits (5.2.3)
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types (5.2.6)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

SECTOR_SIZE = 512
SECTOR_SHIFT = 9
ID_BYTES = 20
HEADER_SIZE = 16

_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
# virtio_blk_config up to write_zeroes_may_unmap (60 bytes with padding)
_CONFIG = struct.Struct("<QII4sI8sBBHIIIIIB3x")


class _Transfer:
    """A read or write of more than TURN_BYTES, done a piece (TURN_BYTES) per loop turn."""

    __slots__ = ("chain", "cursor", "done", "offset", "read", "status")

    def __init__(self, chain: DescriptorChain, views: list[memoryview], offset: int, read: bool):
        self.chain = chain
        self.cursor = ChainWriter(views)  # a cursor over the data buffers, either direction
        self.offset = offset
        self.read = read
        self.done = 0
        self.status: memoryview | None = None  # the request's status byte


class _Deferred(Exception):
    def __init__(self, transfer: _Transfer) -> None:
        super().__init__("transfer continues on the next turns")
        self.transfer = transfer


class _RequestError(Exception):
    """A request the device answers with a status other than OK."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


class Block(VirtioDeviceBase):
    """A virtio block device on a `RawFile`."""

    device_type = TYPE_BLOCK
    name = "virtio-blk"

    def __init__(
        self,
        disk: RawFile,
        *,
        serial: str | bytes | None = None,
        num_queues: int = 1,
        queue_size: int = 256,
        seg_max: int | None = None,
        size_max: int = 0,
        blk_size: int = SECTOR_SIZE,
        discard: bool = True,
        write_zeroes: bool = True,
        max_discard_sectors: int = 0x3F_FFFF,
        max_discard_seg: int = 32,
        discard_sector_alignment: int = 8,
        max_write_zeroes_sectors: int = 0x3F_FFFF,
        max_write_zeroes_seg: int = 32,
        write_zeroes_may_unmap: bool = True,
        rate_limiter: RateLimiter | None = None,
    ) -> None:
        if not 1 <= num_queues <= 0xFFFF:
            raise ValueError(f"num_queues {num_queues} out of range")
        if blk_size < SECTOR_SIZE or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size {blk_size} must be a power of two >= 512")
        self.disk = disk
        self.readonly = disk.readonly
        self.capacity = disk.size >> SECTOR_SHIFT  # in 512-byte sectors; a partial tail is cut
        if serial is None:
            serial = disk.path.rsplit("/", 1)[-1]
        self.serial = (serial.encode() if isinstance(serial, str) else bytes(serial))[:ID_BYTES]
        self.num_queues = num_queues
        # header + status take 2 descriptors of the queue (5.2.3: seg_max < queue size)
        self.seg_max = seg_max if seg_max is not None else queue_size - 2
        self.size_max = size_max
        self.blk_size = blk_size
        self.discard = discard and not self.readonly
        self.write_zeroes = write_zeroes and not self.readonly
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.discard_sector_alignment = discard_sector_alignment
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.write_zeroes_may_unmap = write_zeroes_may_unmap
        # Shared by every queue; a throttled request waits in its queue for the limiter's timer.
        self.rate_limiter = rate_limiter

        features = (
            (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
        )
        if size_max:
            features |= 1 << VIRTIO_BLK_F_SIZE_MAX
        if self.readonly:
            features |= 1 << VIRTIO_BLK_F_RO
        if num_queues > 1:
            features |= 1 << VIRTIO_BLK_F_MQ
        if self.discard:
            features |= 1 << VIRTIO_BLK_F_DISCARD
        if self.write_zeroes:
            features |= 1 << VIRTIO_BLK_F_WRITE_ZEROES
        super().__init__([queue_size] * num_queues, features)
        self._inflight: dict[int, _Transfer] = {}  # queue index -> its large transfer
        self._queue_index = 0  # the queue `_drain` is serving (for `_handle`)
        self.stats = {
            "read_bytes": 0,
            "write_bytes": 0,
            "read_ops": 0,
            "write_ops": 0,
            "flush_ops": 0,
            "discard_ops": 0,
            "write_zeroes_ops": 0,
            "errors": 0,
        }

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(
            self.capacity,
            self.size_max,
            self.seg_max,
            b"\0" * 4,  # geometry: not offered
            self.blk_size,
            b"\0" * 8,  # topology: not offered
            0,  # writeback (CONFIG_WCE not offered: the cache mode is writeback + flush)
            0,
            self.num_queues,
            self.max_discard_sectors,
            self.max_discard_seg,
            self.discard_sector_alignment,
            self.max_write_zeroes_sectors,
            self.max_write_zeroes_seg,
            1 if self.write_zeroes_may_unmap else 0,
        )

    def _process(self, queue_index: int) -> None:
        transfer = self._inflight.get(queue_index)
        if transfer is not None:
            # One piece per turn; once the transfer is done the queue is served next turn.
            self._continue(queue_index, transfer)
            self._resume_later(queue_index)
            return
        self._queue_index = queue_index
        if self.rate_limiter is None:
            self._drain(queue_index, self._handle)
        else:
            self._drain(queue_index, self._handle, self._admit)

    def _continue(self, queue_index: int, t: _Transfer) -> None:
        """Move the next piece of a large transfer; return its chain once it is complete."""
        status = VIRTIO_BLK_S_OK
        try:
            views = t.cursor.take(min(TURN_BYTES, t.cursor.remaining))
            want = sum(map(len, views))
            if t.read:
                n = self.disk.preadv(views, t.offset + t.done)
                if n != want:
                    raise _RequestError(VIRTIO_BLK_S_IOERR, f"short read at {t.offset + t.done}")
            else:
                n = self.disk.pwritev(views, t.offset + t.done)
            t.done += n
            if t.cursor.remaining:
                return
            kind = "read" if t.read else "write"
            self.stats[f"{kind}_bytes"] += t.done
            self.stats[f"{kind}_ops"] += 1
        except (_RequestError, OSError) as e:
            self._log.warning("%s: I/O error on %s: %s", self.name, self.disk.path, e)
            self.stats["errors"] += 1
            status = VIRTIO_BLK_S_IOERR
        del self._inflight[queue_index]
        assert t.status is not None and self.mem is not None
        t.status[0] = status
        written = (t.done if t.read and status == VIRTIO_BLK_S_OK else 0) + 1
        self.queues[queue_index].add_used(self.mem, t.chain.head_index, written)
        self._notify(queue_index)

    # -- rate limiting (Cloud Hypervisor's virtio-blk: one op per request, data bytes) ------
    def _on_activate(self) -> None:
        rl = self.rate_limiter
        if rl is not None and (fd := rl.fileno()) is not None:
            self._register(fd, self._on_rate_limiter_timer, select.EPOLLIN)

    def _on_reset(self) -> None:
        self._inflight.clear()  # the driver reset the device: nobody waits for these
        if self.rate_limiter is not None:
            self.rate_limiter.unblock()

    def _on_rate_limiter_timer(self, mask: int) -> None:
        assert self.rate_limiter is not None
        self.rate_limiter.event_handler()
        for i in range(len(self.queues)):
            self.process_queue(i)

    def _admit(self, chain: DescriptorChain) -> bool:
        """Take the request's tokens, or False to leave it in the queue for later."""
        rl = self.rate_limiter
        assert rl is not None
        if rl.blocked:
            return False
        try:
            header, rdata, wdata = self._split(chain)
            rtype = _HEADER.unpack(header)[0]
        except Exception:
            return True  # malformed: not rate limited; _handle answers it
        if not rl.consume(1, TokenType.OPS):
            return False
        if rtype in (VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT):
            data = wdata if rtype == VIRTIO_BLK_T_IN else rdata
            if not rl.consume(sum(map(len, data)), TokenType.BYTES):
                rl.manual_replenish(1, TokenType.OPS)
                return False
        return True

    def close(self) -> None:
        """Release the rate limiter's timer (the disk is closed by its owner)."""
        super().close()
        if self.rate_limiter is not None:
            self.rate_limiter.close()

    # -- one request -------------------------------------------------------------------------
    def _handle(self, chain: DescriptorChain) -> int:
        """Execute one request; returns the bytes written to the guest (data + status)."""
        try:
            # Common case: every buffer is guest memory, so the status byte is the last byte
            # of the last writable view (parsing the chain made the views in the same pass).
            wviews = chain.writable_views()
        except ChainError:
            wviews = None  # malformed, or a buffer outside memory: the careful path below
        if wviews:
            last = wviews[-1]
            status_byte = last[len(last) - 1 :]
        else:
            try:
                descs = chain.descriptors
            except ChainError:
                self.stats["errors"] += 1
                raise  # no trustworthy layout: returned unused
            status_at = self._status_address(descs)
            if status_at is None:
                self.stats["errors"] += 1
                raise ChainError("request has no device-writable status byte")
            status_byte = guest_views(chain.mem, status_at, 1)[0]  # checked before any I/O
        try:
            written = self._execute(chain)
            status = VIRTIO_BLK_S_OK
        except _Deferred as d:
            d.transfer.status = status_byte
            self._inflight[self._queue_index] = d.transfer
            self._continue(self._queue_index, d.transfer)  # the first piece, this turn
            raise InProgress from None
        except _RequestError as e:
            self._log.warning("%s: request failed: %s", self.name, e)
            self.stats["errors"] += 1
            written, status = 0, e.status
        except ChainError as e:
            self._log.warning("%s: bad request: %s", self.name, e)
            self.stats["errors"] += 1
            written, status = 0, VIRTIO_BLK_S_IOERR
        except OSError as e:
            self._log.warning("%s: I/O error on %s: %s", self.name, self.disk.path, e)
            self.stats["errors"] += 1
            written, status = 0, VIRTIO_BLK_S_IOERR
        status_byte[0] = status
        return written + 1

    @staticmethod
    def _status_address(descs: list[Descriptor]) -> int | None:
        """Guest address of the status byte: the last byte of the last writable descriptor."""
        for d in reversed(descs):
            if not d.flags & VIRTQ_DESC_F_WRITE:
                return None
            if d.len:
                return d.addr + d.len - 1
        return None

    @staticmethod
    def _split(chain: DescriptorChain) -> tuple[bytes, list[memoryview], list[memoryview]]:
        """(header, readable data, writable data before the status byte) of a request.

        The common layout (a 16-byte header buffer, a 1-byte status buffer) costs no copies;
        any other framing goes through a reader/writer.
        """
        rviews = chain.readable_views()
        wviews = chain.writable_views()
        if rviews and len(rviews[0]) == HEADER_SIZE:
            header, rdata = bytes(rviews[0]), rviews[1:]
        else:
            reader = ChainReader(rviews)
            if reader.remaining < HEADER_SIZE:
                raise ChainError(f"request header is {reader.remaining} bytes, not 16")
            header, rdata = reader.read(HEADER_SIZE), reader.take_all()
        if len(wviews[-1]) == 1:
            wdata = wviews[:-1]
        else:
            writer = ChainWriter(wviews)
            wdata = writer.take(writer.remaining - 1)
        return header, rdata, wdata

    def _execute(self, chain: DescriptorChain) -> int:
        header, rdata, wdata = self._split(chain)
        rtype, _, sector = _HEADER.unpack(header)
        data_out = sum(map(len, rdata))  # readable bytes after the header
        data_in = sum(map(len, wdata))  # writable bytes before the status byte

        if rtype == VIRTIO_BLK_T_IN:
            if data_out:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "read request with device-readable data")
            offset = self._check_range(sector, data_in)
            if data_in > TURN_BYTES:
                raise _Deferred(_Transfer(chain, wdata, offset, read=True))
            self._turn_bytes += data_in
            n = self.disk.preadv(wdata, offset)
            if n != data_in:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"short read at sector {sector}")
            self.stats["read_bytes"] += n
            self.stats["read_ops"] += 1
            return n
        if rtype == VIRTIO_BLK_T_OUT:
            if data_in:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "write request with device-writable data")
            offset = self._check_range(sector, data_out)
            self._check_writable()
            if data_out > TURN_BYTES:
                raise _Deferred(_Transfer(chain, rdata, offset, read=False))
            self._turn_bytes += data_out
            n = self.disk.pwritev(rdata, offset)
            self.stats["write_bytes"] += n
            self.stats["write_ops"] += 1
            return 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            if not self.readonly:
                self.disk.flush()
            self.stats["flush_ops"] += 1
            return 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            if data_out:
                raise _RequestError(VIRTIO_BLK_S_IOERR, "get-id with device-readable data")
            ident = self.serial.ljust(ID_BYTES, b"\0")[: min(ID_BYTES, data_in)]
            ChainWriter(wdata).write(ident)
            return len(ident)
        if rtype == VIRTIO_BLK_T_DISCARD and self.has_feature(VIRTIO_BLK_F_DISCARD):
            return self._discard_or_zero(rdata, data_out, data_in, discard=True)
        if rtype == VIRTIO_BLK_T_WRITE_ZEROES and self.has_feature(VIRTIO_BLK_F_WRITE_ZEROES):
            return self._discard_or_zero(rdata, data_out, data_in, discard=False)
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES) and self.readonly:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes on a read-only disk")
        raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"unsupported request type {rtype}")

    def _check_range(self, sector: int, length: int) -> int:
        """Byte offset of a transfer, after checking it is whole sectors inside the disk."""
        if length % SECTOR_SIZE:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"length {length} is not whole sectors")
        # Python ints do not wrap, so sector + count cannot overflow past the check.
        if sector > self.capacity or sector + (length >> SECTOR_SHIFT) > self.capacity:
            raise _RequestError(
                VIRTIO_BLK_S_IOERR, f"sectors {sector}+{length >> SECTOR_SHIFT} past the end"
            )
        return sector << SECTOR_SHIFT

    def _check_writable(self) -> None:
        if self.readonly:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "write to a read-only disk")

    def _discard_or_zero(
        self, rdata: list[memoryview], data_out: int, data_in: int, *, discard: bool
    ) -> int:
        if data_in:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes with writable data")
        self._check_writable()
        if not data_out or data_out % _SEGMENT.size:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment list of {data_out} bytes")
        count = data_out // _SEGMENT.size
        max_seg = self.max_discard_seg if discard else self.max_write_zeroes_seg
        max_sectors = self.max_discard_sectors if discard else self.max_write_zeroes_sectors
        if count > max_seg:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"{count} segments > {max_seg}")
        # Copied only now that its size is known to be small (max_seg * 16 bytes).
        payload = b"".join(rdata)
        segments = [_SEGMENT.unpack_from(payload, i * _SEGMENT.size) for i in range(count)]
        # Check every segment before changing anything.
        for sector, sectors, flags in segments:
            if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                raise _RequestError(VIRTIO_BLK_S_UNSUPP, f"segment flags {flags:#x}")
            if sectors > max_sectors:
                raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment of {sectors} sectors")
            self._check_range(sector, sectors << SECTOR_SHIFT)
        for sector, sectors, flags in segments:
            offset, length = sector << SECTOR_SHIFT, sectors << SECTOR_SHIFT
            if not length:
                continue
            if discard:
                self.disk.discard(offset, length)
            else:
                unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
                self.disk.write_zeroes(offset, length, unmap and self.write_zeroes_may_unmap)
        self.stats["discard_ops" if discard else "write_zeroes_ops"] += 1
        return 0

    # -- snapshots ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        # A snapshot has no place for a half-done transfer: finish it (the VM is paused).
        for qi, t in list(self._inflight.items()):
            while qi in self._inflight:
                self._continue(qi, t)
        s = super().state()
        s["capacity"] = self.capacity
        if self.rate_limiter is not None:
            s["rate_limiter"] = self.rate_limiter.state()
        return s

    def restore(self, state: dict[str, Any]) -> None:
        if int(state.get("capacity", self.capacity)) != self.capacity:
            raise ValueError(
                f"{self.name}: snapshot disk had {state['capacity']} sectors, "
                f"{self.disk.path} has {self.capacity}"
            )
        super().restore(state)
        if self.rate_limiter is not None and state.get("rate_limiter") is not None:
            self.rate_limiter.restore(state["rate_limiter"])
