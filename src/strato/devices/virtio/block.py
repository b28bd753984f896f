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
"""

from __future__ import annotations

import select
import struct
from typing import Any

from strato.devices.backends.raw import RawFile
from strato.devices.rate_limiter import RateLimiter, TokenType
from strato.devices.virtio.base import VirtioDeviceBase
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
        if self.rate_limiter is None:
            self._drain(queue_index, self._handle)
        else:
            self._drain_limited(queue_index, self.rate_limiter)

    # -- rate limiting (Cloud Hypervisor's virtio-blk: one op per request, data bytes) ------
    def _on_activate(self) -> None:
        rl = self.rate_limiter
        if rl is not None and (fd := rl.fileno()) is not None:
            self._register(fd, self._on_rate_limiter_timer, select.EPOLLIN)

    def _on_reset(self) -> None:
        if self.rate_limiter is not None:
            self.rate_limiter.unblock()

    def _on_rate_limiter_timer(self, mask: int) -> None:
        assert self.rate_limiter is not None
        self.rate_limiter.event_handler()
        for i in range(len(self.queues)):
            self.process_queue(i)

    def _admit(self, chain: DescriptorChain, rl: RateLimiter) -> bool:
        """Take the request's tokens, or False to leave it in the queue for later."""
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

    def _drain_limited(self, queue_index: int, rl: RateLimiter) -> None:
        """`_drain`, stopping at the first request the limiter does not admit."""
        q = self.queues[queue_index]
        mem = self.mem
        assert mem is not None
        done = 0
        while True:
            q.disable_notification(mem)
            throttled = False
            while (chain := q.pop(mem)) is not None:
                if not self._admit(chain, rl):
                    q.undo_pop()  # it waits where it is; the limiter's timer resumes us
                    throttled = True
                    break
                try:
                    written = self._handle(chain)
                except ChainError as e:
                    self._log.warning("%s: queue %d: bad chain: %s", self.name, queue_index, e)
                    written = 0
                q.add_used(mem, chain.head_index, written)
                done += 1
            if throttled or not q.enable_notification(mem):
                break
        if done:
            self._notify(queue_index)

    def close(self) -> None:
        """Release the rate limiter's timer (the disk is closed by its owner)."""
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
            return self._discard_or_zero(b"".join(rdata), data_in, discard=True)
        if rtype == VIRTIO_BLK_T_WRITE_ZEROES and self.has_feature(VIRTIO_BLK_F_WRITE_ZEROES):
            return self._discard_or_zero(b"".join(rdata), data_in, discard=False)
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

    def _discard_or_zero(self, payload: bytes, data_in: int, *, discard: bool) -> int:
        if data_in:
            raise _RequestError(VIRTIO_BLK_S_IOERR, "discard/write-zeroes with writable data")
        self._check_writable()
        if not payload or len(payload) % _SEGMENT.size:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"segment list of {len(payload)} bytes")
        count = len(payload) // _SEGMENT.size
        max_seg = self.max_discard_seg if discard else self.max_write_zeroes_seg
        max_sectors = self.max_discard_sectors if discard else self.max_write_zeroes_sectors
        if count > max_seg:
            raise _RequestError(VIRTIO_BLK_S_IOERR, f"{count} segments > {max_seg}")
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
