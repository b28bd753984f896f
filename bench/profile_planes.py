#!/usr/bin/env python3
"""Profile strato's hot paths on the host, without a guest: where does each request's time go?

    python -m bench.profile_planes [exit|blk|net|all] [--top 12] [--no-profile]

- exit: decoding a port-I/O exit from a kvm_run page and dispatching it to a device on the bus
  (what the vCPU thread does between two KVM_RUNs; KVM_RUN itself is left out);
- blk: virtio-blk requests driven by strato's Python driver (`VirtioDriver`) in real guest memory,
  `process_queue` timed per request: 4 KiB random reads at depth 32, 1 MiB sequential reads;
- net: virtio-net transmit of 64-byte frames to a real tap (root only), per frame.

Prints nanoseconds per operation, then cProfile's top functions by own time (tottime).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import mmap
import os
import pstats
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KiB, MiB = 1 << 10, 1 << 20


def report(name: str, per_op_ns: float, prof: cProfile.Profile | None, top: int) -> None:
    print(f"\n== {name}: {per_op_ns:,.0f} ns per operation")
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(top)
        lines = s.getvalue().splitlines()
        start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
        print("\n".join(lines[start : start + top + 1]))


def timed(
    fn: Callable[[], int], seconds: float, profile: bool
) -> tuple[float, cProfile.Profile | None]:
    """Call fn (which returns how many operations it did) for `seconds`; ns per operation."""
    prof = cProfile.Profile() if profile else None
    ops = 0
    spent = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if prof:
            prof.enable()
        t = time.perf_counter()
        ops += fn()
        spent += time.perf_counter() - t
        if prof:
            prof.disable()
    return spent / max(ops, 1) * 1e9, prof


# ---- exit dispatch ---------------------------------------------------------------------------
def profile_exit(seconds: float, profile: bool, top: int) -> None:
    from strato.bus import Bus
    from strato.kvm import bindings as b
    from strato.kvm import ioctls as k
    from strato.kvm.fds import VcpuFd
    from strato.pci.bus import PciConfigIo, PciRoot
    from strato.vmm.exit_handler import handle_exit

    class PageVcpu(VcpuFd):
        """A VcpuFd over an anonymous page: decode_exit reads what we wrote there."""

        def __init__(self) -> None:  # no KVM: the kvm_run page only
            self.fd = -1
            self.id = 0
            self._run_map = mmap.mmap(-1, 4096)
            self.run_view = memoryview(self._run_map)

    v = PageVcpu()
    struct.pack_into("<I", v.run_view, b.KVM_RUN_EXIT_REASON, k.KVM_EXIT_IO)
    struct.pack_into(
        "<BBHIQ", v.run_view, b.KVM_RUN_EXIT_UNION, k.KVM_EXIT_IO_OUT, 4, 0xCF8, 1, 0x100
    )
    struct.pack_into("<I", v.run_view, 0x100, 0x80000000)
    pio, mmio = Bus("pio"), Bus("mmio")
    pci = PciRoot(mmio, pio)
    pio.insert(PciConfigIo(pci), 0xCF8, 8)

    def batch() -> int:
        for _ in range(1000):
            v.set_immediate_exit(False)
            handle_exit(v.decode_exit(), v, pio, mmio)
        return 1000

    ns, prof = timed(batch, seconds, profile)
    report("exit: decode + dispatch of `outl 0xcf8` (KVM_RUN excluded)", ns, prof, top)


# ---- block -----------------------------------------------------------------------------------
def profile_blk(seconds: float, profile: bool, top: int) -> None:
    from bench.common import disk_image
    from strato.devices.backends.raw import RawFile
    from strato.devices.virtio.block import VIRTIO_BLK_T_IN, Block
    from strato.events import EventLoop
    from strato.memory import GuestMemory
    from strato.virtio.testing import VirtioDriver

    disk = disk_image(256, "block-disk.raw")
    for label, block, depth, seq in (("4k randread qd32", 4 * KiB, 32, False),
                                     ("1M seqread qd1", MiB, 1, True)):  # fmt: skip
        mem = GuestMemory.anonymous([(0, 64 * MiB + depth * block)])
        loop = EventLoop()
        dev = Block(RawFile(str(disk)), queue_size=256)
        drv = VirtioDriver(dev, mem, buffers_base=MiB, buffers_end=64 * MiB + depth * block)
        drv.activate(loop)
        dq = drv[0]
        slots = [(dq.alloc(16), dq.alloc(block, align=4096), dq.alloc(1)) for _ in range(depth)]
        blocks = 256 * MiB // block
        n = 0

        prof = cProfile.Profile() if profile else None
        ops, spent = 0, 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for hdr, data, status in slots:
                n += 1
                blk = n % blocks if seq else (n * 2654435761) % blocks
                mem.write(hdr, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, blk * block >> 9))
                dq.add_chain([(hdr, 16)], [(data, block), (status, 1)])
            if prof:
                prof.enable()
            t = time.perf_counter()
            drv.kick(0)
            spent += time.perf_counter() - t
            if prof:
                prof.disable()
            if len(dq.get_used()) != depth:
                raise SystemExit("the device did not complete every request")
            ops += depth
        report(f"blk: {label} (process_queue per request)", spent / ops * 1e9, prof, top)
        dev.reset()
        dev.disk.close()
        loop.close()
        mem.close()


# ---- network ---------------------------------------------------------------------------------
def profile_net(seconds: float, profile: bool, top: int) -> None:
    from strato.devices.backends.tap import VNET_HDR_SIZE, Tap
    from strato.devices.virtio.net import RX_QUEUE, TX_QUEUE, Net
    from strato.events import EventLoop
    from strato.memory import GuestMemory
    from strato.virtio.testing import VirtioDriver
    from tests.guest.hostnet import TapDevice, can_make_taps

    if not can_make_taps():
        print("\n== net: skipped (needs root and /dev/net/tun)")
        return
    with TapDevice("stprof0"):
        tap = Tap("stprof0")
        mem = GuestMemory.anonymous([(0, 32 * MiB)])
        loop = EventLoop()
        dev = Net(tap, mac="52:54:00:00:00:01")
        drv = VirtioDriver(dev, mem, buffers_base=MiB, buffers_end=32 * MiB)
        drv.activate(loop)
        tq = drv[TX_QUEUE]
        frame = bytes(VNET_HDR_SIZE) + b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(50)
        bufs = [tq.alloc(len(frame)) for _ in range(128)]
        for a in bufs:
            mem.write(a, frame)

        prof = cProfile.Profile() if profile else None
        ops, spent = 0, 0.0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            for a in bufs:
                tq.add_chain([(a, len(frame))], [])
            if prof:
                prof.enable()
            t = time.perf_counter()
            dev.process_queue(TX_QUEUE)
            spent += time.perf_counter() - t
            if prof:
                prof.disable()
            ops += len(tq.get_used())
        report(
            "net: transmit of 64-byte frames to a tap (process_queue per frame)",
            spent / max(ops, 1) * 1e9,
            prof,
            top,
        )

        # Receive: frames queued on the tap by an AF_PACKET socket, then one rx pass.
        rq = drv[RX_QUEUE]
        rx_bufs = [rq.alloc(2048) for _ in range(128)]
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind(("stprof0", 0))
        wire = frame[VNET_HDR_SIZE:]
        prof = cProfile.Profile() if profile else None
        ops, spent = 0, 0.0
        end = time.perf_counter() + seconds
        free = list(rx_bufs)
        posted: dict[int, int] = {}
        while time.perf_counter() < end:
            while free:
                a = free.pop()
                posted[rq.add_chain([], [(a, 2048)]).head] = a
            for _ in range(100):  # fewer than the tap's queue (500): none dropped
                sender.send(wire)
            if prof:
                prof.enable()
            t = time.perf_counter()
            dev.process_queue(RX_QUEUE)
            spent += time.perf_counter() - t
            if prof:
                prof.disable()
            used = rq.get_used()
            free += [posted.pop(head) for head, _ in used]
            ops += len(used)
        sender.close()
        report(
            "net: receive of 64-byte frames from a tap (process_queue per frame)",
            spent / max(ops, 1) * 1e9,
            prof,
            top,
        )
        loop.close()
        tap.close()
        mem.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("what", nargs="?", default="all", choices=("exit", "blk", "net", "all"))
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--no-profile", action="store_true", help="timings only (no cProfile cost)")
    args = ap.parse_args()
    for name, fn in (("exit", profile_exit), ("blk", profile_blk), ("net", profile_net)):
        if args.what in (name, "all"):
            fn(args.seconds, not args.no_profile, args.top)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    sys.exit(main())
