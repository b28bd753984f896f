"""Rate limits end to end: the built-in guest's benchmarks under `strato --disk/--net` limits.

The guest keeps its queue full for a second; the limiter lets through what the bucket holds
at the start (`size` + `one_time_burst`) plus `size` per `refill_time`, and throttled requests
wait in the queue (none fails, none is lost). Unlimited, the same workloads run at ~20000
disk reads and ~100000 frames per second here, far above the limits below.

Bounds are generous (tests check behaviour, not speed): at most the bucket plus the refill
rate over the guest's measured time plus 10 %, and clearly more than the first bucket, which
shows the limiter's timer resumed the queue again and again.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.guestrun import strato_args, strato_command
from tests.guest.harness import BenchResult, run_guest
from tests.taps import host_tap

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]


def run_bench(args: list[str]) -> BenchResult:
    r = run_guest(strato_command(args), timeout=90)
    assert r.returncode == 0, r.stderr + r.output.text()
    r.output.check()
    (b,) = r.output.benches
    assert int(b.fields.get("errors", "0")) == 0, r.output.text()
    return b


def guest_seconds(b: BenchResult) -> float:
    return int(b.fields["guest_us"]) / 1e6


@pytest.mark.parametrize(
    ("limits", "workload", "unit", "size", "burst", "per_second"),
    [
        ("ops_size=100,ops_refill_time=100", "blk-randread", "ops", 100, 0, 1000),
        (
            "ops_size=100,ops_refill_time=100,ops_one_time_burst=500",
            "blk-randread",
            "ops",
            100,
            500,
            1000,
        ),
        ("bw_size=409600,bw_refill_time=100", "blk-randwrite", "bytes", 409600, 0, 4096000),
    ],
    ids=["ops", "ops-burst", "bandwidth"],
)
def test_disk_rate_limit(
    guest_elf: Path,
    tmp_path: Path,
    limits: str,
    workload: str,
    unit: str,
    size: int,
    burst: int,
    per_second: int,
) -> None:
    disk = tmp_path / "disk.raw"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    args = strato_args(
        guest_elf, f"bench={workload},qd=8,bs=4096,seconds=1", disk=f"path={disk},{limits}"
    )
    b = run_bench(args)
    done = b.ops if unit == "ops" else b.bytes
    seconds = guest_seconds(b)
    limit = (size + burst + per_second * seconds) * 1.1
    print(f"{workload} {limits}: {done} {unit} in {seconds:.2f} s (bound {limit:.0f})")
    assert done <= limit
    assert done > size + burst + per_second * 0.2  # the timer kept resuming the queue


@pytest.fixture
def tap_name() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a tap")
    with host_tap("strl", quiet_ipv6=False) as name:
        yield name


@pytest.mark.root
@pytest.mark.parametrize(
    ("limits", "per_frame"),
    [("ops_size=20,ops_refill_time=100", 1), ("bw_size=30000,bw_refill_time=100", 1526)],
    ids=["ops", "bandwidth"],
)
def test_net_tx_rate_limit(guest_elf: Path, tap_name: str, limits: str, per_frame: int) -> None:
    """net-tx keeps the 256-entry transmit ring full for a second and then waits for it to
    drain; every frame it queued completes, at the limited rate."""
    args = strato_args(
        guest_elf,
        "bench=net-tx,size=1514,seconds=1",
        net=f"tap={tap_name},mac=52:54:00:12:34:56,{limits}",
    )
    b = run_bench(args)
    seconds = guest_seconds(b)
    size = 20 if per_frame == 1 else 30000
    per_second = size * 10
    # Each time the bucket runs dry one more frame still goes (Cloud Hypervisor's rule).
    frames = (size + per_second * seconds) / per_frame + seconds * 10
    print(f"net-tx {limits}: {b.ops} frames in {seconds:.2f} s (bound {frames * 1.1:.0f})")
    assert b.ops <= frames * 1.1
    assert b.ops > size / per_frame + 256 + 1  # more than one bucket and a ring: it resumed
