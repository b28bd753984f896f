"""strato is killed with SIGKILL in the middle of a write storm.

The built-in guest's `blk-flushstorm` writes batches of requests to fresh sectors, flushes
after each batch, and prints `FLUSHED seq= sector= sectors=` once the flush completed OK. The
host kills strato after some of those lines, reads whatever else the guest had printed, and
checks that every batch the guest saw flushed is in the image file, sector by sector.

Guest-visible completion must mean the data left strato: no write is acknowledged from a
buffer that a killed process would lose.
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.faults.guestrun import strato_args, strato_command
from tests.guest.harness import blk_pattern

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

KILL_AFTER = 100  # FLUSHED lines seen before the kill
_FLUSHED = re.compile(r"FLUSHED seq=(\d+) sector=(\d+) sectors=(\d+)\r?\n")  # whole lines
_SEED = re.compile(r"BENCH-START blk-flushstorm .*seed=0x([0-9a-f]+)")


def run_and_kill(argv: list[str], kill_after: int, timeout: float) -> tuple[str, int, str]:
    """Run `argv`, SIGKILL it after `kill_after` FLUSHED lines; (stdout, status, stderr)."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    out = bytearray()
    err = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, out)
    sel.register(proc.stderr, selectors.EVENT_READ, err)
    deadline = time.monotonic() + timeout
    killed = False
    try:
        while sel.get_map():
            assert time.monotonic() < deadline, "no storm to kill:\n" + out.decode(errors="replace")
            for key, _ in sel.select(0.5):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(data)
            if not killed and len(_FLUSHED.findall(out.decode(errors="replace"))) >= kill_after:
                proc.send_signal(signal.SIGKILL)  # then read what was already printed
                killed = True
        status = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    return out.decode(errors="replace"), status, err.decode(errors="replace")


@pytest.mark.parametrize("direct", ["off", "on"])
def test_every_flushed_batch_survives_sigkill(guest_elf: Path, tmp_path: Path, direct: str) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    args = strato_args(
        guest_elf,
        "bench=blk-flushstorm,qd=8,bs=4096,seconds=30",
        disk=f"path={disk},direct={direct}",
    )
    stdout, status, stderr = run_and_kill(strato_command(args), KILL_AFTER, timeout=60)
    assert status == -signal.SIGKILL, (status, stderr)
    seed_match = _SEED.search(stdout)
    assert seed_match, stdout
    seed = int(seed_match.group(1), 16)
    batches = [tuple(map(int, m)) for m in _FLUSHED.findall(stdout)]
    assert len(batches) >= KILL_AFTER and "FLUSH-FAILED" not in stdout, stdout
    assert [seq for seq, _, _ in batches] == list(range(len(batches)))
    missing: list[tuple[int, int]] = []
    with open(disk, "rb") as f:
        for seq, first, count in batches:
            f.seek(first * 512)
            data = f.read(count * 512)
            for i in range(count):
                if data[i * 512 : (i + 1) * 512] != blk_pattern(seed, first + i):
                    missing.append((seq, first + i))
    print(f"direct={direct}: {len(batches)} flushed batches seen, all on disk: {not missing}")
    assert not missing, f"{len(missing)} flushed sectors lost, first: {missing[:5]}"
