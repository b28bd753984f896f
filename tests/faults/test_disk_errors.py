"""Host I/O errors under a virtio-blk disk: the guest sees VIRTIO_BLK_S_IOERR, strato lives.

- Disk full: the image is a sparse file on a 1 MiB tmpfs, so writes past ~1 MiB of data fail
  with ENOSPC.
- File-size limit: strato runs with RLIMIT_FSIZE below the image's size, so writes past the
  limit fail with EFBIG, and the kernel also sends SIGXFSZ, whose default action kills the
  process. strato is started with SIGXFSZ at its default action and must ignore it (CPython
  sets it to SIG_IGN at start-up), so it is an I/O error like any other.

The guest writes the whole disk sequentially (some writes fail), wraps around (writes to
blocks that already exist succeed again), then reads: the device keeps serving after errors.
It then ends its run the way it ends any run with a failed check: a triple fault, which strato
reports and exits on with the crash status. What must not happen: strato killed by a signal,
a VMM error, a hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.guestrun import crash_status, strato_args, strato_command, wrapped
from tests.guest.harness import GuestOutput, RunResult, run_guest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

DISK_SIZE = 8 << 20
WORKLOAD = (
    "bench=blk-seqwrite,qd=4,bs=65536,seconds=2"
    " bench=blk-seqread,qd=4,bs=65536,seconds=1,region=512K"
)


def bench(out: GuestOutput, name: str) -> tuple[int, int]:
    """(ops, errors) of the BENCH-END line of `name`."""
    (b,) = [b for b in out.benches if b.name == name]
    return b.ops, int(b.fields.get("errors", "0"))


def check_served_through_errors(r: RunResult, host_error: str) -> None:
    out = r.output
    assert r.returncode is not None, "strato did not exit:\n" + r.stderr
    assert r.returncode >= 0, f"strato was killed by {signal.Signals(-r.returncode).name}"
    assert r.returncode == crash_status(), (r.returncode, r.stderr)
    writes, write_errors = bench(out, "blk-seqwrite")
    reads, read_errors = bench(out, "blk-seqread")
    print(f"seqwrite ops={writes} errors={write_errors}; seqread ops={reads} errors={read_errors}")
    assert write_errors > 0, out.text()  # the guest saw IOERR
    assert writes > 0 and reads > 0 and read_errors == 0, out.text()
    assert [t.name for t in out.failures()] == ["bench"], out.text()
    assert host_error in r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.root
def test_disk_full_gives_the_guest_ioerr(guest_elf: Path, small_fs: Path) -> None:
    disk = small_fs / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)  # sparse: 8 MiB of image on 1 MiB of filesystem
    args = strato_args(guest_elf, WORKLOAD, disk=f"path={disk}")
    r = run_guest(strato_command(args), timeout=90)
    check_served_through_errors(r, "No space left on device")


def test_file_size_limit_gives_the_guest_ioerr(guest_elf: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(DISK_SIZE)
    args = strato_args(guest_elf, WORKLOAD, disk=f"path={disk}")
    r = run_guest(wrapped(strato_command(args), fsize=1 << 20), timeout=90)
    check_served_through_errors(r, "File too large")
