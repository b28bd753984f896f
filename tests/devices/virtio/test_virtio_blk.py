"""virtio-blk driven by the Python driver against real image files."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.devices.backends.raw import BOUNCE_SIZE, RawFile
from strato.devices.virtio.base import IOV_MAX, TURN_BYTES
from strato.devices.virtio.block import (
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    Block,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from strato.virtio.testing import DriverChain, DriverQueue, VirtioDriver
from tests.budgets.harness import AllocationPeak

MiB = 1 << 20
DISK_SECTORS = 2048  # 1 MiB


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory.anonymous([(0, 4 * MiB)])
    yield m
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.raw"
    p.write_bytes(bytes(i % 251 for i in range(DISK_SECTORS * 512)))
    return p


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def start(
    mem: GuestMemory, loop: EventLoop, path: Path, *, readonly: bool = False, **kw: object
) -> tuple[Block, VirtioDriver]:
    disk = RawFile(str(path), readonly=readonly, direct=bool(kw.pop("direct", False)))
    dev = Block(disk, **kw)  # type: ignore[arg-type]
    drv = VirtioDriver(dev, mem)
    drv.activate(loop)
    return dev, drv


def request(
    dq: DriverQueue,
    rtype: int,
    sector: int = 0,
    data: list[bytes] | None = None,
    read_len: list[int] | None = None,
    *,
    indirect: bool = False,
) -> DriverChain:
    header = struct.pack("<IIQ", rtype, 0, sector)
    return dq.add_chain([header, *(data or [])], [*(read_len or []), 1], indirect=indirect)


def status(mem: GuestMemory, chain: DriverChain) -> int:
    addr, length = chain.writable[-1]
    return mem.read(addr + length - 1, 1)[0]


def run(drv: VirtioDriver, q: int = 0) -> list[tuple[int, int]]:
    drv.kick(q)
    return drv[q].get_used()


def segment(sector: int, count: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, count, flags)


# -- features and config -----------------------------------------------------------------------
def test_features_and_config(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, _ = start(mem, loop, image, serial="disk-1")
    f = dev.device_features
    for bit in (VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES):
        assert f >> bit & 1
    assert f >> VIRTIO_F_VERSION_1 & 1 and f >> VIRTIO_F_RING_EVENT_IDX & 1
    assert not f >> VIRTIO_BLK_F_RO & 1 and not f >> VIRTIO_BLK_F_MQ & 1
    cfg = dev.read_config(0, 60)
    assert struct.unpack_from("<Q", cfg, 0)[0] == DISK_SECTORS
    assert struct.unpack_from("<I", cfg, 12)[0] == 254  # seg_max
    assert struct.unpack_from("<I", cfg, 20)[0] == 512  # blk_size
    assert struct.unpack_from("<H", cfg, 34)[0] == 1  # num_queues
    assert struct.unpack_from("<III", cfg, 36) == (0x3FFFFF, 32, 8)  # discard limits
    assert dev.read_config(4, 4) == cfg[4:8]
    assert dev.read_config(100, 4) == b"\0" * 4  # past the end reads zeros
    assert dev.read_config(58, 4) == cfg[58:60] + b"\0\0"


def test_readonly_features(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, _ = start(mem, loop, image, readonly=True)
    f = dev.device_features
    assert f >> VIRTIO_BLK_F_RO & 1
    assert not f >> VIRTIO_BLK_F_DISCARD & 1 and not f >> VIRTIO_BLK_F_WRITE_ZEROES & 1


# -- reads and writes --------------------------------------------------------------------------
def test_write_then_read_back(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, drv = start(mem, loop, image)
    dq = drv[0]
    payload = os.urandom(8192)
    w = request(dq, VIRTIO_BLK_T_OUT, 10, [payload[:4096], payload[4096:]])
    assert run(drv) == [(w.head, 1)]
    assert status(mem, w) == VIRTIO_BLK_S_OK
    with open(image, "rb") as f:  # the image itself, through a separate fd
        f.seek(10 * 512)
        assert f.read(8192) == payload
    r = request(dq, VIRTIO_BLK_T_IN, 10, read_len=[512, 8192 - 512])
    assert run(drv) == [(r.head, 8193)]
    assert status(mem, r) == VIRTIO_BLK_S_OK
    got = b"".join(mem.read(a, n) for a, n in r.writable[:-1])
    assert got == payload
    c = dev.counters()
    assert (c["write_bytes"], c["write_ops"], c["read_bytes"], c["read_ops"]) == (8192, 1, 8192, 1)


def test_status_byte_sharing_the_data_descriptor(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 1)
    c = dq.add_chain([header], [513])  # data and status in one buffer
    assert run(drv) == [(c.head, 513)]
    addr, _ = c.writable[0]
    assert mem.read(addr, 512) == image.read_bytes()[512:1024]
    assert mem.read(addr + 512, 1)[0] == VIRTIO_BLK_S_OK


def test_indirect_requests(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    data = os.urandom(2048)
    w = request(dq, VIRTIO_BLK_T_OUT, 3, [data[:1024], data[1024:]], indirect=True)
    r = request(dq, VIRTIO_BLK_T_IN, 3, read_len=[2048], indirect=True)
    assert run(drv) == [(w.head, 1), (r.head, 2049)]
    assert mem.read(r.writable[0][0], 2048) == data
    assert image.read_bytes()[3 * 512 : 3 * 512 + 2048] == data


def test_many_requests_in_one_kick(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image, queue_size=64)
    dq = drv[0]
    chains = [request(dq, VIRTIO_BLK_T_OUT, i, [bytes([i]) * 512]) for i in range(21)]
    used = run(drv)
    assert used == [(c.head, 1) for c in chains]
    content = image.read_bytes()
    assert all(content[i * 512 : (i + 1) * 512] == bytes([i]) * 512 for i in range(21))


def test_flush_calls_fdatasync(
    mem: GuestMemory, loop: EventLoop, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", spy)
    dev, drv = start(mem, loop, image)
    dq = drv[0]
    w = request(dq, VIRTIO_BLK_T_OUT, 0, [b"D" * 512])
    f = request(dq, VIRTIO_BLK_T_FLUSH)
    assert run(drv) == [(w.head, 1), (f.head, 1)]
    assert status(mem, f) == VIRTIO_BLK_S_OK
    assert synced == [dev.disk.fd]
    assert image.read_bytes()[:512] == b"D" * 512
    assert dev.counters()["flush_ops"] == 1


def test_flush_on_tmpfs_keeps_data(mem: GuestMemory, loop: EventLoop) -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    p = Path("/dev/shm") / f"strato-blk-{os.getpid()}.raw"
    p.write_bytes(bytes(64 * 512))
    try:
        _, drv = start(mem, loop, p)
        dq = drv[0]
        request(dq, VIRTIO_BLK_T_OUT, 5, [b"tmpfs!" * 256])
        f = request(dq, VIRTIO_BLK_T_FLUSH)
        run(drv)
        assert status(mem, f) == VIRTIO_BLK_S_OK
        assert p.read_bytes()[5 * 512 : 5 * 512 + 1536] == b"tmpfs!" * 256
    finally:
        p.unlink()


# -- refusals ------------------------------------------------------------------------------------
def test_readonly_refuses_writes_and_changes_nothing(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    before = digest(image)
    dev, drv = start(mem, loop, image, readonly=True)
    dq = drv[0]
    chains = [
        request(dq, VIRTIO_BLK_T_OUT, 0, [b"x" * 512]),
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(0, 8)]),
        request(dq, VIRTIO_BLK_T_WRITE_ZEROES, 0, [segment(0, 8)]),
    ]
    f = request(dq, VIRTIO_BLK_T_FLUSH)
    r = request(dq, VIRTIO_BLK_T_IN, 0, read_len=[512])
    run(drv)
    assert [status(mem, c) for c in chains] == [VIRTIO_BLK_S_IOERR] * 3
    assert status(mem, f) == VIRTIO_BLK_S_OK and status(mem, r) == VIRTIO_BLK_S_OK
    assert digest(image) == before
    assert dev.counters()["write_ops"] == 0


@pytest.mark.parametrize(
    ("sector", "nbytes"),
    [
        (DISK_SECTORS, 512),  # starts at the end
        (DISK_SECTORS - 1, 1024),  # runs past the end
        (2**64 - 1, 512),  # would wrap a 64-bit sum
        (2**64 - 2, 1024),
        (2**55, 512),  # sector << 9 beyond 64 bits
    ],
)
def test_out_of_range_is_ioerr(
    mem: GuestMemory, loop: EventLoop, image: Path, sector: int, nbytes: int
) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    w = request(dq, VIRTIO_BLK_T_OUT, sector, [b"z" * nbytes])
    r = request(dq, VIRTIO_BLK_T_IN, sector, read_len=[nbytes])
    assert run(drv) == [(w.head, 1), (r.head, 1)]
    assert status(mem, w) == VIRTIO_BLK_S_IOERR and status(mem, r) == VIRTIO_BLK_S_IOERR
    assert mem.read(r.writable[0][0], nbytes) == bytes(nbytes)  # nothing read into the guest
    assert digest(image) == before


def test_last_sector_is_in_range(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    w = request(dq, VIRTIO_BLK_T_OUT, DISK_SECTORS - 1, [b"L" * 512])
    run(drv)
    assert status(mem, w) == VIRTIO_BLK_S_OK
    assert image.read_bytes()[-512:] == b"L" * 512


def test_partial_sector_lengths_are_ioerr(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    w = request(dq, VIRTIO_BLK_T_OUT, 0, [b"x" * 100])
    r = request(dq, VIRTIO_BLK_T_IN, 0, read_len=[700])
    run(drv)
    assert status(mem, w) == VIRTIO_BLK_S_IOERR and status(mem, r) == VIRTIO_BLK_S_IOERR
    assert digest(image) == before


def test_wrong_directions_are_ioerr(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    header_in = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
    header_out = struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0)
    a = dq.add_chain([header_in, b"r" * 512], [512, 1])  # read with readable data
    b = dq.add_chain([header_out, b"w" * 512], [512, 1])  # write with writable data
    c = dq.add_chain([header_out], [512, 1])  # write whose data is device-writable
    run(drv)
    assert [status(mem, x) for x in (a, b, c)] == [VIRTIO_BLK_S_IOERR] * 3
    assert digest(image) == before


def test_short_header_is_ioerr(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    c = dq.add_chain([struct.pack("<II", VIRTIO_BLK_T_IN, 0)], [1])
    assert run(drv) == [(c.head, 1)]
    assert status(mem, c) == VIRTIO_BLK_S_IOERR


def test_header_split_across_descriptors(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 2)
    c = dq.add_chain([header[:5], header[5:]], [512, 1])
    run(drv)
    assert status(mem, c) == VIRTIO_BLK_S_OK
    assert mem.read(c.writable[0][0], 512) == image.read_bytes()[1024:1536]


def test_no_status_byte_returns_the_chain_unused(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    before = digest(image)
    dev, drv = start(mem, loop, image)
    dq = drv[0]
    c = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0), b"q" * 512])
    ok = request(dq, VIRTIO_BLK_T_IN, 0, read_len=[512])
    assert run(drv) == [(c.head, 0), (ok.head, 513)]
    assert digest(image) == before
    assert not drv.interrupt.needs_reset
    assert dev.counters()["errors"] == 1


def test_status_byte_outside_memory_does_nothing(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    c = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0), b"q" * 512], [(8 * MiB, 1)])
    assert run(drv) == [(c.head, 0)]
    assert digest(image) == before


def test_data_buffer_outside_memory_is_ioerr(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    c = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 0), (4 * MiB - 256, 512)], [1])
    r = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)], [(4 * MiB - 256, 512), 1])
    assert run(drv) == [(c.head, 1), (r.head, 1)]
    assert status(mem, c) == VIRTIO_BLK_S_IOERR and status(mem, r) == VIRTIO_BLK_S_IOERR
    assert digest(image) == before


def test_unsupported_type(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    c = request(dq, 99)
    d = request(dq, 10)  # GET_LIFETIME: not offered
    run(drv)
    assert status(mem, c) == VIRTIO_BLK_S_UNSUPP and status(mem, d) == VIRTIO_BLK_S_UNSUPP


def test_host_io_error_is_ioerr(
    mem: GuestMemory, loop: EventLoop, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dev, drv = start(mem, loop, image)

    def fail(*_: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(dev.disk, "preadv", fail)
    r = request(drv[0], VIRTIO_BLK_T_IN, 0, read_len=[512])
    assert run(drv) == [(r.head, 1)]
    assert status(mem, r) == VIRTIO_BLK_S_IOERR
    assert not drv.interrupt.needs_reset


# -- get-id, discard, write-zeroes ---------------------------------------------------------------
def test_get_id(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image, serial="strato-serial-0123456789")
    dq = drv[0]
    c = request(dq, VIRTIO_BLK_T_GET_ID, read_len=[20])
    short = request(dq, VIRTIO_BLK_T_GET_ID, read_len=[8])
    assert run(drv) == [(c.head, 21), (short.head, 9)]
    assert status(mem, c) == VIRTIO_BLK_S_OK
    assert mem.read(c.writable[0][0], 20) == b"strato-serial-012345"
    assert mem.read(short.writable[0][0], 8) == b"strato-s"


def test_get_id_pads_short_serial(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image, serial="abc")
    c = request(drv[0], VIRTIO_BLK_T_GET_ID, read_len=[20])
    run(drv)
    assert mem.read(c.writable[0][0], 20) == b"abc" + bytes(17)


def test_discard_and_write_zeroes(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, drv = start(mem, loop, image)
    dq = drv[0]
    d = request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(8, 8) + segment(100, 16)])
    z = request(dq, VIRTIO_BLK_T_WRITE_ZEROES, 0, [segment(200, 3)])
    zu = request(dq, VIRTIO_BLK_T_WRITE_ZEROES, 0, [segment(300, 8, 1)])  # may unmap
    run(drv)
    assert [status(mem, c) for c in (d, z, zu)] == [VIRTIO_BLK_S_OK] * 3
    content = image.read_bytes()
    original = bytes(i % 251 for i in range(DISK_SECTORS * 512))
    assert len(content) == len(original)
    zeroed = {*range(8, 16), *range(100, 116), *range(200, 203), *range(300, 308)}
    for s in range(DISK_SECTORS):
        want = bytes(512) if s in zeroed else original[s * 512 : (s + 1) * 512]
        assert content[s * 512 : (s + 1) * 512] == want, s
    c = dev.counters()
    assert (c["discard_ops"], c["write_zeroes_ops"]) == (1, 2)


def test_discard_checks_every_segment_before_changing_anything(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    before = digest(image)
    _, drv = start(mem, loop, image)
    dq = drv[0]
    bad = [
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(0, 8) + segment(DISK_SECTORS, 1)]),
        request(dq, VIRTIO_BLK_T_WRITE_ZEROES, 0, [segment(0, 8) + segment(2**64 - 1, 2)]),
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(0, 8)[:10]]),  # not whole segments
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [b"".join(segment(i, 1) for i in range(33))]),
        request(dq, VIRTIO_BLK_T_DISCARD, 0, []),  # no segment at all
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(0, 0x400000)]),  # > max_discard_sectors
    ]
    unsupp = [
        request(dq, VIRTIO_BLK_T_DISCARD, 0, [segment(0, 8, 1)]),  # unmap flag on discard
        request(dq, VIRTIO_BLK_T_WRITE_ZEROES, 0, [segment(0, 8, 2)]),  # reserved flag
    ]
    run(drv)
    assert [status(mem, c) for c in bad] == [VIRTIO_BLK_S_IOERR] * len(bad)
    assert [status(mem, c) for c in unsupp] == [VIRTIO_BLK_S_UNSUPP] * len(unsupp)
    assert digest(image) == before


def test_discard_not_negotiated_is_unsupp(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    before = digest(image)
    dev = Block(RawFile(str(image)))
    drv = VirtioDriver(dev, mem, features=dev.device_features & ~(1 << VIRTIO_BLK_F_DISCARD))
    drv.activate(loop)
    c = request(drv[0], VIRTIO_BLK_T_DISCARD, 0, [segment(0, 8)])
    run(drv)
    assert status(mem, c) == VIRTIO_BLK_S_UNSUPP
    assert digest(image) == before


# -- queues, interrupts, failure ------------------------------------------------------------------
def test_multiple_queues(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, drv = start(mem, loop, image, num_queues=3)
    assert dev.device_features >> VIRTIO_BLK_F_MQ & 1
    assert struct.unpack("<H", dev.read_config(34, 2))[0] == 3
    chains = [request(drv[q], VIRTIO_BLK_T_OUT, q * 8, [bytes([65 + q]) * 512]) for q in range(3)]
    for q in range(3):
        assert run(drv, q) == [(chains[q].head, 1)]
    content = image.read_bytes()
    for q in range(3):
        assert content[q * 8 * 512 : q * 8 * 512 + 512] == bytes([65 + q]) * 512
    assert sorted(drv.interrupt.used) == [0, 1, 2]


def test_interrupts_follow_event_idx(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    _, drv = start(mem, loop, image)
    dq = drv[0]
    assert dq.event_idx
    dq.set_used_event(4)  # interrupt when used idx passes 4
    raised = []
    for i in range(8):
        request(dq, VIRTIO_BLK_T_IN, i, read_len=[512])
        drv.interrupt.clear()
        run(drv)
        raised.append(drv.interrupt.count(0))
        dq.reset_buffers()
    assert raised == [0, 0, 0, 0, 1, 0, 0, 0]
    # A batch that crosses used_event raises exactly one interrupt.
    dq.set_used_event(10)
    drv.interrupt.clear()
    for i in range(4):
        request(dq, VIRTIO_BLK_T_IN, i, read_len=[512])
    run(drv)
    assert drv.interrupt.used == [0]
    # The device asked to be kicked at the next buffer: avail_event = where it stopped.
    assert dq.avail_event == dq.avail_shadow


def test_interrupts_without_event_idx(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev = Block(RawFile(str(image)))
    drv = VirtioDriver(dev, mem, features=dev.device_features & ~(1 << VIRTIO_F_RING_EVENT_IDX))
    drv.activate(loop)
    dq = drv[0]
    request(dq, VIRTIO_BLK_T_IN, 0, read_len=[512])
    run(drv)
    assert drv.interrupt.used == [0]
    dq.set_no_interrupt(True)
    request(dq, VIRTIO_BLK_T_IN, 0, read_len=[512])
    run(drv)
    assert drv.interrupt.used == [0]
    assert dq.used_idx == 2
    assert dq.used_flags == 0  # notifications re-enabled after the batch


def test_corrupt_queue_needs_reset_and_stops_that_queue(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    dev, drv = start(mem, loop, image, num_queues=2)
    drv[0].set_avail_idx(drv[0].size + 5)
    drv.kick(0)
    assert drv.interrupt.needs_reset and dev.needs_reset and dev.broken == [True, False]
    # The queue is left alone from now on, even when it looks sane again.
    drv[0].set_avail_idx(0)
    request(drv[0], VIRTIO_BLK_T_IN, 0, read_len=[512])
    drv.kick(0)
    assert drv[0].used_idx == 0
    # The other queue keeps working; a device reset brings queue 0 back.
    r = request(drv[1], VIRTIO_BLK_T_IN, 0, read_len=[512])
    assert run(drv, 1) == [(r.head, 513)]
    dev.reset()
    assert not dev.needs_reset and dev.broken == [False, False]


def test_process_before_activate_and_bad_index_are_ignored(image: Path) -> None:
    dev = Block(RawFile(str(image)))
    dev.process_queue(0)
    dev.process_queue(7)


def test_state_round_trip(mem: GuestMemory, loop: EventLoop, image: Path) -> None:
    dev, drv = start(mem, loop, image)
    request(drv[0], VIRTIO_BLK_T_OUT, 0, [b"s" * 512])
    run(drv)
    state = json.loads(json.dumps(dev.state()))
    other = Block(RawFile(str(image)))
    other.restore(state)
    assert other.acked_features == dev.acked_features
    assert other.counters() == dev.counters()
    small = image.parent / "small.raw"
    small.write_bytes(bytes(512))
    with pytest.raises(ValueError):
        Block(RawFile(str(small))).restore(state)


# -- O_DIRECT --------------------------------------------------------------------------------------
def test_direct_io_aligned_and_bounced(mem: GuestMemory, loop: EventLoop, tmp_path: Path) -> None:
    p = tmp_path / "direct.raw"
    p.write_bytes(bytes(DISK_SECTORS * 512))
    try:
        dev, drv = start(mem, loop, p, direct=True)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported here: {e}")
    dq = drv[0]
    aligned = os.urandom(4096)
    buf = dq.alloc(4096, align=4096)
    mem.write(buf, aligned)
    w = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 8), (buf, 4096)], [1])
    odd = dq.alloc(1024 + 3, align=16) + 3  # not 512-aligned: goes through the bounce buffer
    mem.write(odd, b"O" * 1024)
    w2 = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_OUT, 0, 40), (odd, 1024)], [1])
    r = dq.add_chain([struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 40)], [(odd + 2000, 1024), 1])
    run(drv)
    assert [status(mem, c) for c in (w, w2, r)] == [VIRTIO_BLK_S_OK] * 3
    content = p.read_bytes()
    assert content[8 * 512 : 8 * 512 + 4096] == aligned
    assert content[40 * 512 : 40 * 512 + 1024] == b"O" * 1024
    assert mem.read(odd + 2000, 1024) == b"O" * 1024
    dev.disk.close()


# -- host cost per request (issue 10) --------------------------------------------------------------
def test_discard_payload_is_checked_before_it_is_copied(
    mem: GuestMemory, loop: EventLoop, image: Path
) -> None:
    """200 MiB of segment list, aliased over one 1 MiB buffer: IOERR by its size alone."""
    _, drv = start(mem, loop, image)
    dq = drv[0]
    alias = dq.alloc(MiB)
    before = digest(image)
    for rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
        c = dq.add_chain([struct.pack("<IIQ", rtype, 0, 0), *[(alias, MiB)] * 200], [1])
        with AllocationPeak() as alloc:
            assert run(drv) == [(c.head, 1)]
        assert status(mem, c) == VIRTIO_BLK_S_IOERR
        assert alloc.peak < MiB  # was: the whole 200 MiB joined into one bytes object
    assert digest(image) == before


def _big_rig(tmp_path: Path, mem_size: int = 24 * MiB) -> tuple[GuestMemory, Path, bytes]:
    m = GuestMemory.anonymous([(0, mem_size)])
    p = tmp_path / "big.raw"
    content = os.urandom(12 * MiB)
    p.write_bytes(content)
    return m, p, content


def test_large_read_is_moved_a_piece_per_loop_turn(loop: EventLoop, tmp_path: Path) -> None:
    m, p, content = _big_rig(tmp_path)
    try:
        dev, drv = start(m, loop, p)
        dq = drv[0]
        size = 2 * TURN_BYTES + 512  # three pieces
        r = request(dq, VIRTIO_BLK_T_IN, 8, read_len=[size])
        drv.kick(0)  # the first piece
        assert dq.get_used() == [] and drv.interrupt.used == []
        assert loop.run_once(0) == 1  # the second
        assert dq.get_used() == []
        assert loop.run_once(0) == 1  # the last: the request is returned
        assert dq.get_used() == [(r.head, size + 1)]
        assert drv.interrupt.used == [0]
        assert status(m, r) == VIRTIO_BLK_S_OK
        assert m.read(r.writable[0][0], size) == content[8 * 512 : 8 * 512 + size]
        assert dev.counters()["read_bytes"] == size and dev.counters()["read_ops"] == 1
        while loop.run_once(0):  # the queue behind it is served next (empty here)
            pass
        w = request(dq, VIRTIO_BLK_T_OUT, 0, [b"\x5a" * 512])  # the queue goes on
        assert run(drv) == [(w.head, 1)]
    finally:
        m.close()


def test_large_write_in_flight_is_finished_by_a_snapshot(loop: EventLoop, tmp_path: Path) -> None:
    m, p, _ = _big_rig(tmp_path)
    try:
        dev, drv = start(m, loop, p)
        dq = drv[0]
        data = os.urandom(TURN_BYTES + 4096)
        w = request(dq, VIRTIO_BLK_T_OUT, 16, [data])
        drv.kick(0)
        assert dq.get_used() == []
        state = dev.state()  # the VM is paused: the transfer completes now
        assert dq.get_used() == [(w.head, 1)] and status(m, w) == VIRTIO_BLK_S_OK
        assert state["counters"]["write_bytes"] == len(data)
        assert p.read_bytes()[16 * 512 : 16 * 512 + len(data)] == data
    finally:
        m.close()


def test_reset_drops_a_transfer_in_flight(loop: EventLoop, tmp_path: Path) -> None:
    m, p, _ = _big_rig(tmp_path)
    try:
        dev, drv = start(m, loop, p)
        request(drv[0], VIRTIO_BLK_T_IN, 0, read_len=[TURN_BYTES * 2])
        drv.kick(0)
        dev.reset()
        assert loop.run_once(0) == 0  # nothing left on the loop
        assert drv[0].get_used() == []
    finally:
        m.close()


def test_more_buffers_than_iov_max(loop: EventLoop, tmp_path: Path) -> None:
    """A read and a write of 1025 buffers: preadv/pwritev take at most IOV_MAX at a time."""
    m, p, content = _big_rig(tmp_path, 4 * MiB)
    try:
        _, drv = start(m, loop, p, queue_size=2048)
        dq = drv[0]
        n = IOV_MAX + 1
        r = request(dq, VIRTIO_BLK_T_IN, 0, read_len=[512] * n, indirect=True)
        assert run(drv) == [(r.head, 512 * n + 1)] and status(m, r) == VIRTIO_BLK_S_OK
        assert b"".join(m.read(a, k) for a, k in r.writable[:-1]) == content[: 512 * n]
        dq.reset_buffers()
        blocks = [os.urandom(512) for _ in range(n)]
        w = request(dq, VIRTIO_BLK_T_OUT, 0, blocks, indirect=True)
        assert run(drv) == [(w.head, 1)] and status(m, w) == VIRTIO_BLK_S_OK
        assert p.read_bytes()[: 512 * n] == b"".join(blocks)
    finally:
        m.close()


def test_direct_bounce_buffer_is_fixed_and_looped(tmp_path: Path) -> None:
    """Unaligned O_DIRECT transfers larger than BOUNCE_SIZE: correct bytes, one small bounce."""
    p = tmp_path / "direct-big.raw"
    content = os.urandom(4 * BOUNCE_SIZE)
    p.write_bytes(content)
    try:
        disk = RawFile(str(p), direct=True)
    except OSError as e:
        pytest.skip(f"O_DIRECT not supported here: {e}")
    with disk:
        backing = bytearray(3 * BOUNCE_SIZE + 64)
        views = [
            memoryview(backing)[1 : 1 + BOUNCE_SIZE + 7],
            memoryview(backing)[BOUNCE_SIZE + 9 :],
        ]
        want = sum(map(len, views))
        assert disk.preadv(views, 100) == want  # unaligned offset and buffers
        assert b"".join(bytes(v) for v in views) == content[100 : 100 + want]
        assert len(disk._bounce or b"") == BOUNCE_SIZE
        data = os.urandom(2 * BOUNCE_SIZE + 512)
        src = bytearray(len(data) + 1)
        src[1:] = data
        parts = [memoryview(src)[1:1000], memoryview(src)[1000:]]  # unaligned, odd split
        assert disk.pwritev(parts, 512) == len(data)
        assert len(disk._bounce or b"") == BOUNCE_SIZE
        # Past the end of the file: what is there, no more.
        tail = memoryview(bytearray(4096 + 3))[3:]
        assert disk.preadv([tail], len(content) - 1000) == 1000
    assert p.read_bytes()[512 : 512 + len(data)] == data
    assert bytes(tail[:1000]) == content[-1000:]
