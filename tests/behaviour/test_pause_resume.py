"""Pause and resume with disk and network I/O in flight: nothing lost, nothing twice.

The built-in guest runs two workloads back to back, each slowed by a rate limit so that it
is still running when the host reacts to its BENCH-START line: `blk-flushstorm` (batches of
writes to fresh sectors, a FLUSH after each, `FLUSHED seq=.. sector=.. sectors=..` once a
batch is durable) and `net-tx` (numbered frames on the tap). At each BENCH-START the host
pauses the VM through the Python API, checks that the guest stands still (its serial output
does not move), and resumes it. Afterwards every batch the guest reported is on the disk
with its data, the batches are numbered 0..N-1 once each, and the tap saw every frame number
exactly once.
"""

from __future__ import annotations

import os
import re
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_OK
from tests.behaviour.vmrun import Boot, boot
from tests.guest.harness import BenchStart, Event, blk_pattern
from tests.guest.hostnet import PacketCapture, TapDevice, can_make_taps

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]

BATCHES = 60  # of 8 writes of 4 KiB and a FLUSH each (a FLUSH is an fsync: ~20 ms here)
FRAMES = 3000
# ~2000 disk requests/s and ~5000 frames/s: each workload runs for about a second.
DISK_LIMIT = "ops_size=200,ops_refill_time=100"
NET_LIMIT = "ops_size=500,ops_refill_time=100"
PAUSED_WINDOW = 0.5  # how long the host watches the paused guest for movement
_FLUSHED = re.compile(r"^FLUSHED seq=(\d+) sector=(\d+) sectors=(\d+)$")
_FRAME_SEQ = re.compile(rb"STRATO-NET-BENCH seq=(\d+) ")


def test_pause_and_resume_with_io_in_flight(guest_elf: Path, workdir: Path) -> None:
    net = can_make_taps()
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(16 << 20))
    cmdline = f"bench=blk-flushstorm,qd=8,bs=4096,ops={BATCHES},seconds=0"
    if net:
        cmdline += f" bench=net-tx,size=64,ops={FRAMES}"
    # (bench, lines once paused, lines after the window, VM state, bench over at the pause)
    pauses: list[tuple[str, int, int, str, bool]] = []
    with ExitStack() as stack:
        args = [
            "--kernel", str(guest_elf), "--memory", "size=64M", "--cmdline", cmdline,
            "--disk", f"path={disk},{DISK_LIMIT}",
            "--console", "off", "--serial", "null", "--no-reboot",
        ]  # fmt: skip
        capture = None
        if net:
            tap = stack.enter_context(TapDevice(f"stbp{os.getpid() % 100000}"))
            capture = PacketCapture(tap.name).start()
            stack.callback(capture.stop)
            args += ["--net", f"tap={tap.name},mac=52:54:00:12:34:58,{NET_LIMIT}"]

        def pause_resume(event: Event, boot_: Boot) -> None:
            if not isinstance(event, BenchStart):
                return
            lines = boot_.output.lines
            boot_.vm.pause()
            # Observing a paused guest: the windows are how long we look, not waits for a
            # result. A line already on its way through the UART may land just after the pause.
            time.sleep(0.1)
            settled = len(lines)
            time.sleep(PAUSED_WINDOW)
            state = boot_.vm.state.value
            ended = any(line.startswith(f"BENCH-END {event.name} ") for line in lines[:settled])
            pauses.append((event.name, settled, len(lines), state, ended))
            boot_.vm.resume()

        run = boot(args, timeout=90, on_event=pause_resume)
    assert not run.errors, run.errors
    out = run.output
    out.check()
    assert run.stop.exit_status == EXIT_OK, run.stop
    expected = ["blk-flushstorm"] + (["net-tx"] if net else [])
    assert [p[0] for p in pauses] == expected, pauses
    for name, settled, after, state, ended in pauses:
        assert not ended, f"{name} was over before the pause: nothing was in flight"
        assert state == "Paused", (name, state)  # Cloud Hypervisor's state name
        assert after == settled, f"{name}: the paused guest printed {after - settled} lines"
    # The disk: batches 0..N-1 reported once each, every one on the disk with its data.
    storm = next(b for b in out.benches if b.name == "blk-flushstorm")
    assert storm.ops == BATCHES and int(storm.fields.get("errors", "0")) == 0, storm
    seed = int(storm.fields["seed"], 16)
    flushed = [tuple(map(int, m.groups())) for line in out.lines if (m := _FLUSHED.match(line))]
    assert [f[0] for f in flushed] == list(range(BATCHES)), "batches lost or repeated"
    assert not [line for line in out.lines if line.startswith("FLUSH-FAILED")]
    data = disk.read_bytes()
    bad = [
        sector
        for _, first, count in flushed
        for sector in range(first, first + count)
        if data[sector * 512 : (sector + 1) * 512] != blk_pattern(seed, sector)
    ]
    assert bad == [], f"{len(bad)} flushed sectors do not hold their data: {bad[:8]}"
    if capture is not None:
        tx = next(b for b in out.benches if b.name == "net-tx")
        assert tx.ops == FRAMES and int(tx.fields.get("errors", "0")) == 0, tx
        seqs = sorted(
            int(found.group(1))
            for frame in capture.test_frames("BENCH")
            if (found := _FRAME_SEQ.search(frame))
        )
        assert seqs == list(range(FRAMES)), (
            f"{len(seqs)} frames, {len(set(seqs))} distinct, of {FRAMES}"
        )
    else:
        pytest.skip("the network half needs root and /dev/net/tun; the disk half passed")
