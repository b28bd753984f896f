"""A guest floods its serial port while nobody reads strato's output.

The guest's `bench=serial-flood` prints lines as fast as the UART takes them. strato's serial
sink is a bounded buffer drained by a writer thread; with the destination stalled (a pipe
nobody reads) the writer blocks, the buffer fills, and further bytes are dropped and counted.
What must hold: the vCPU never waits on the host's output (the guest finishes its flood and
powers off, and strato exits 0), memory stays bounded (the buffer never grows past its
capacity), and the watchers of the UART still see every byte.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from strato.devices.legacy.serial_output import TtySink
from tests.faults.guestrun import run_in_process, strato_args, strato_command

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

PIPE_SIZE = 4096  # the smallest pipe Linux makes (one page)


def stalled_pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def test_flood_into_a_stalled_pipe_in_process(guest_elf: Path) -> None:
    r, w = stalled_pipe()
    sink = TtySink(w, capacity=2048)
    peak = [0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.005):
            peak[0] = max(peak[0], sink.buffered)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        args = strato_args(guest_elf, "bench=serial-flood,seconds=2")
        run = run_in_process(args, timeout=60, serial_out=sink)
    finally:
        sampling.set()
        sampler.join()
        os.close(r)  # the blocked writer gets EPIPE and ends
        sink.close()
        os.close(w)
    out = run.output
    (flood,) = [b for b in out.benches if b.name == "serial-flood"]
    print(
        f"guest printed {flood.bytes} bytes in {flood.seconds:.2f} s; sink: written="
        f"{sink.written} dropped={sink.dropped} peak buffered={peak[0]}"
    )
    assert run.stop.exit_status == 0, run.stop
    assert out.done is not None and out.done.failed == 0
    assert flood.ops > 0 and flood.bytes > 2 * (PIPE_SIZE + sink.capacity), "too little flood"
    assert sink.dropped > 0 and peak[0] <= sink.capacity
    assert sink.written <= 2 * PIPE_SIZE  # the pipe took a page or so; the rest was dropped
    flood_lines = [line for line in out.lines if line.startswith("FLOOD ")]
    assert len(flood_lines) == flood.ops  # the UART's watchers saw every line


def test_flood_into_a_stalled_stdout(guest_elf: Path, tmp_path: Path) -> None:
    """The `strato` command with its serial console on a pipe nobody reads exits 0 on its own,
    and its resident memory does not grow with the flood."""
    r, w = stalled_pipe()
    stderr_path = tmp_path / "stderr"
    args = strato_args(guest_elf, "bench=serial-flood,seconds=3")
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            strato_command(args), stdin=subprocess.DEVNULL, stdout=w, stderr=err
        )
    os.close(w)
    rss: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while proc.poll() is None:
            assert time.monotonic() < deadline, "strato never finished: its vCPU is blocked?"
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                break
            for line in status.splitlines():
                if line.startswith("VmRSS:"):
                    rss.append(int(line.split()[1]))
            time.sleep(0.05)  # sampling interval
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(r)
    stderr = stderr_path.read_text(errors="replace")
    print(f"strato exit {code}; VmRSS samples {len(rss)}: first {rss[:1]} kB, peak {max(rss)} kB")
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    flooding = rss[len(rss) // 2 :]  # the second half of the run: booted, flooding
    assert len(flooding) >= 5, rss
    grown = max(flooding) - min(flooding)
    assert grown < 8 << 10, f"RSS grew by {grown} kB while the guest flooded"
