#!/usr/bin/env python3
"""virtio-blk on the host: the device driven by strato's Python driver vs plain preadv/pwritev.

Workloads: 4 KiB random read / write and 1 MiB sequential read / write on one raw file. For the
device, requests are queued `--depth` at a time in a real GuestMemory, the queue is kicked
(`process_queue`, what the ioeventfd does) and the used ring is reaped. Two numbers are given:
"device" counts only the time inside `process_queue` (the VMM's cost per request), "e2e" adds
the Python driver's own work (building chains, reaping). The baseline does the same I/O with
os.preadv/os.pwritev on a memoryview of an mmap, one call per request.

    python bench/blk_host.py [--size-mib 256] [--seconds 2] [--depth 32] [--direct]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import random
import struct
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from strato.devices.backends.raw import RawFile
from strato.devices.virtio.block import VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Block
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.virtio.testing import VirtioDriver

KiB, MiB = 1 << 10, 1 << 20


@dataclass
class Result:
    workload: str
    engine: str
    requests: int
    seconds: float
    mb_per_s: float
    req_per_s: float


class Offsets:
    """Byte offsets of successive requests: random blocks, or one after the other."""

    def __init__(self, kind: str, block: int, size: int) -> None:
        self.kind, self.block, self.size = kind, block, size
        self.rnd = random.Random(1)
        self.pos = -block

    def next(self) -> int:
        if self.kind == "rand":
            return self.rnd.randrange(self.size // self.block) * self.block
        self.pos = (self.pos + self.block) % self.size
        return self.pos


def run_device(
    path: str, workload: str, block: int, depth: int, seconds: float, direct: bool, size: int
) -> tuple[Result, Result]:
    kind, op = workload.split("-")
    rtype = VIRTIO_BLK_T_IN if op == "read" else VIRTIO_BLK_T_OUT
    mem = GuestMemory.anonymous([(0, 64 * MiB + depth * block)])
    loop = EventLoop()
    dev = Block(RawFile(path, direct=direct), queue_size=256)
    drv = VirtioDriver(dev, mem, buffers_base=MiB, buffers_end=64 * MiB + depth * block)
    drv.activate(loop)
    dq = drv[0]
    # Fixed slots per in-flight request: header, data, status (no allocation while running).
    slots = []
    for _ in range(depth):
        hdr = dq.alloc(16)
        status = dq.alloc(1)
        data = dq.alloc(block, align=4096)
        mem.write(data, os.urandom(block) if op == "write" else bytes(block))
        slots.append((hdr, data, status))
    where = Offsets(kind, block, size)
    done = 0
    device_time = 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for hdr, data, status in slots:
            sector = where.next() >> 9
            mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
            if op == "read":
                dq.add_chain([(hdr, 16)], [(data, block), (status, 1)])
            else:
                dq.add_chain([(hdr, 16), (data, block)], [(status, 1)])
        k0 = time.perf_counter()
        drv.kick(0)
        device_time += time.perf_counter() - k0
        used = dq.get_used()
        if len(used) != depth or mem.read(slots[0][2], 1) != b"\0":
            raise SystemExit(f"device failed a request: {used[:3]} counters {dev.counters()}")
        done += depth
    total = time.perf_counter() - t0
    dev.reset()
    dev.disk.close()
    loop.close()
    mem.close()
    nbytes = done * block
    return (
        Result(
            workload, "device", done, device_time, nbytes / device_time / MiB, done / device_time
        ),
        Result(workload, "e2e", done, total, nbytes / total / MiB, done / total),
    )


def run_baseline(
    path: str, workload: str, block: int, seconds: float, direct: bool, size: int
) -> Result:
    kind, op = workload.split("-")
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, block)
    view = memoryview(buf)
    if op == "write":
        view[:] = os.urandom(block)
    where = Offsets(kind, block, size)
    done = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(32):
            off = where.next()
            if op == "read":
                os.preadv(fd, [view], off)
            else:
                os.pwritev(fd, [view], off)
        done += 32
    total = time.perf_counter() - t0
    view.release()
    buf.close()
    os.close(fd)
    return Result(workload, "preadv/pwritev", done, total, done * block / total / MiB, done / total)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=256, help="image size (default 256)")
    ap.add_argument("--seconds", type=float, default=2.0, help="per workload and engine")
    ap.add_argument("--depth", type=int, default=32, help="requests per kick (4 KiB workloads)")
    ap.add_argument("--direct", action="store_true", help="O_DIRECT for both engines")
    ap.add_argument("--dir", default=None, help="where to put the image (default: /var/tmp)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "blk_host.json"))
    args = ap.parse_args()

    size = args.size_mib * MiB
    with tempfile.NamedTemporaryFile(dir=args.dir or "/var/tmp", suffix=".raw") as f:
        chunk = os.urandom(MiB)
        for _ in range(args.size_mib):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
        results: list[Result] = []
        for workload, block, depth in (
            ("rand-read", 4 * KiB, args.depth),
            ("rand-write", 4 * KiB, args.depth),
            ("seq-read", MiB, 4),
            ("seq-write", MiB, 4),
        ):
            results.extend(
                run_device(f.name, workload, block, depth, args.seconds, args.direct, size)
            )
            results.append(run_baseline(f.name, workload, block, args.seconds, args.direct, size))

    print(f"{'workload':<11} {'engine':<15} {'MB/s':>9} {'req/s':>10} {'requests':>9}")
    for r in results:
        print(
            f"{r.workload:<11} {r.engine:<15} {r.mb_per_s:9.1f} {r.req_per_s:10.0f} {r.requests:9d}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "blk_host",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "python": sys.version.split()[0],
                "machine": platform.machine(),
                "args": vars(args),
                "results": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    print(f"results written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
