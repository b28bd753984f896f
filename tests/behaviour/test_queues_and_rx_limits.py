"""More than one queue, and receive rate limits, with the built-in guest.

- A disk with `num_queues=4`: the guest's `blk-mq` check sets up every queue with its own
  MSI-X vector, has one write per queue in flight at once, reads each unit back through
  another queue; each queue completes exactly its own requests and raises its own vector.
- A NIC with an rx rate limit: the host floods the tap with more frames than the limit lets
  through in the guest's one-second window (`bench=net-rx,seconds=1`); the guest counts what
  arrived. The count is bounded by the bucket plus the refill rate over the guest's measured
  time, and is well above one bucket (the limiter's timer resumed delivery again and again).
- A NIC with `num_queues=4` on a multiqueue tap: the device offers VIRTIO_NET_F_MQ with two
  pairs and the control queue (5 queues). The guest's `net-mq` check has out-of-range pair
  counts refused and two pairs accepted through the control queue, sends two frames on each
  pair (each pair its own UDP flow) and receives the host's answers to each flow on the pair
  that sent it (the tap steers a flow to the queue it was last sent from): the frames of every
  pair arrive on the tap, and those the host writes arrive through every pair. The tap has no
  IP address; every frame stays on it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_OK
from tests.behaviour.vmrun import Boot, boot
from tests.guest.harness import Event, Ready, check_blk_disk, parse_fields
from tests.guest.hostnet import PacketCapture, TapDevice, can_make_taps, rx_test_frame
from tests.guest.test_strato_guest import mq_answer_frames

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]

MAC = "52:54:00:12:34:59"
FLOOD_FRAMES = 800  # below the tap's default queue of 1000: the host's side drops none
VIRTIO_NET_F_MQ = 1 << 22


def test_a_four_queue_disk_uses_every_queue(guest_elf: Path, workdir: Path) -> None:
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    args = [
        "--kernel", str(guest_elf), "--memory", "size=64M", "--cmdline", "tests=blk,irq",
        "--disk", f"path={disk},num_queues=4", "--console", "off", "--serial", "null",
        "--no-reboot",
    ]  # fmt: skip
    run = boot(args, timeout=60)
    out = run.output
    out.check(["blk-rw", "blk-mq", "irq"])
    mq = out.result("blk-mq")
    assert (mq.fields["queues"], mq.fields["offered"]) == ("4", "4"), mq
    # One write and one read on each queue: each completed exactly its own two.
    assert mq.fields["completions"] == "2,2,2,2" and mq.fields["wrong_queue"] == "0", mq
    # Every queue raised its own vector for what it completed (queue 0 also did blk-eod).
    counts = dict(item.split("=", 1) for item in out.result("irq").fields["counts"].split(","))
    assert sorted(counts) == ["blk.q0", "blk.q1", "blk.q2", "blk.q3"], counts
    vectors = {c.split(":")[0] for c in counts.values()}
    assert len(vectors) == 4, counts
    for queue in ("blk.q1", "blk.q2", "blk.q3"):
        irqs, done = counts[queue].split(":")[1].split("/")
        assert int(done) == 2 and int(irqs) >= 1, counts
    # The data went through to the file: blk-mq's units and blk-rw's.
    assert check_blk_disk(disk, mq) == []  # its seed= and written= say what is where
    assert check_blk_disk(disk, out.result("blk-rw")) == []
    assert run.stop.exit_status == EXIT_OK, run.stop


@pytest.fixture
def tap_capture() -> Iterator[tuple[str, PacketCapture]]:
    if not can_make_taps():
        pytest.skip("needs root and /dev/net/tun for a tap")
    with ExitStack() as stack:
        tap = stack.enter_context(TapDevice(f"stbq{os.getpid() % 100000}"))
        capture = PacketCapture(tap.name).start()
        stack.callback(capture.stop)
        yield tap.name, capture


@pytest.mark.root
@pytest.mark.parametrize(
    ("limits", "size", "unit", "bucket", "per_second"),
    [
        ("ops_size=50,ops_refill_time=100", 64, "ops", 50, 500),
        ("bw_size=50000,bw_refill_time=100", 1000, "bytes", 50000, 500000),
    ],
    ids=["ops", "bandwidth"],
)
def test_rx_rate_limit_shapes_what_the_guest_receives(
    guest_elf: Path,
    tap_capture: tuple[str, PacketCapture],
    limits: str,
    size: int,
    unit: str,
    bucket: int,
    per_second: int,
) -> None:
    tap, capture = tap_capture
    sent: list[int] = []

    def flood(event: Event, _boot: Boot) -> None:
        if isinstance(event, Ready) and event.what == "net-rx-bench":
            for seq in range(FLOOD_FRAMES):
                capture.send(rx_test_frame(MAC, seq, size, tag="RXB"))
            sent.append(FLOOD_FRAMES)

    args = [
        "--kernel", str(guest_elf), "--memory", "size=64M",
        "--cmdline", "bench=net-rx,seconds=1 host-timeout=10000",
        "--net", f"tap={tap},mac={MAC},{limits}",
        "--console", "off", "--serial", "null", "--no-reboot",
    ]  # fmt: skip
    run = boot(args, timeout=60, on_event=flood)
    assert not run.errors, run.errors
    out = run.output
    out.check()
    (b,) = out.benches
    assert sent == [FLOOD_FRAMES]
    seconds = int(b.fields["guest_us"]) / 1e6
    done = b.ops if unit == "ops" else b.bytes
    per_frame = 1 if unit == "ops" else size
    # The bucket, the refill over the guest's time, and one frame more each time the bucket
    # ran dry (Cloud Hypervisor's rule: a frame that fits in part still goes), plus 10 %.
    limit = (bucket + per_second * seconds + per_frame * seconds * 10) * 1.1
    assert done <= limit, f"{done} {unit} in {seconds:.2f} s: more than the limit {limit:.0f}"
    assert done > bucket + per_second * 0.2, f"{done} {unit}: the limiter never resumed rx"
    assert b.ops < FLOOD_FRAMES, "every frame arrived within the window: nothing was limited"
    assert b.bytes == b.ops * size  # whole frames only
    print(f"rx {limits}: {done} {unit} in {seconds:.2f} s (bound {limit:.0f})")


@pytest.fixture
def mq_tap_capture() -> Iterator[tuple[str, PacketCapture]]:
    """A tap made with multi_queue (no IP address, IPv6 off) and a capture on it."""
    if not can_make_taps():
        pytest.skip("needs root and /dev/net/tun for a tap")
    name = f"stbm{os.getpid() % 100000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "multi_queue"], check=True)
    with ExitStack() as stack:
        stack.callback(
            subprocess.run, ["ip", "link", "del", name], check=False, capture_output=True
        )
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        capture = PacketCapture(name).start()
        stack.callback(capture.stop)
        yield name, capture


@pytest.mark.root
def test_a_four_queue_nic_offers_four_queues(
    guest_elf: Path, mq_tap_capture: tuple[str, PacketCapture]
) -> None:
    tap, capture = mq_tap_capture
    answered: list[int] = []

    def answer(event: Event, _boot: Boot) -> None:
        if isinstance(event, Ready) and event.what == "net-mq":
            frames = mq_answer_frames(event)
            for f in frames:
                capture.send(f)
            answered.append(len(frames))

    args = [
        "--kernel", str(guest_elf), "--memory", "size=64M", "--cmdline", "tests=net-tx,net-mq",
        "--net", f"tap={tap},mac={MAC},num_queues=4", "--console", "off", "--serial", "null",
        "--no-reboot",
    ]  # fmt: skip
    run = boot(args, timeout=60, on_event=answer)
    assert not run.errors, run.errors
    run.output.check(["net-tx", "net-mq"])
    (info,) = [line for line in run.output.lines if line.startswith("INFO net ")]
    fields = parse_fields(info)
    assert int(fields["offered"], 16) & VIRTIO_NET_F_MQ, info
    assert int(fields["features"], 16) & VIRTIO_NET_F_MQ, info  # negotiated
    assert fields["queues"] == "5" and fields["pairs"] == "2", info  # 2 pairs + control
    mq = run.output.result("net-mq")
    # 0 and 3 pairs refused (VIRTIO_NET_ERR), 2 accepted, back to 1 at the end.
    assert (mq.fields["set0"], mq.fields["set_over"]) == ("1", "1"), mq
    assert (mq.fields["set_max"], mq.fields["set1"]) == ("0", "0"), mq
    # Guest -> host: each pair's frames reached the tap.
    for pair in range(2):
        sent = [c for c in capture.snapshot() if b"STRATO-NET-MQ pair=%d " % pair in c.frame]
        assert len(sent) == 2, f"pair {pair}: {len(sent)} of its 2 frames on the tap"
    assert mq.fields["tx"] == "2,2", mq
    # Host -> guest: the answers to each pair's flow came in through that pair.
    assert answered == [4]
    assert mq.fields["rx"] == "2,2" and mq.fields["wrong_pair"] == "0", mq
    assert run.stop.exit_status == EXIT_OK, run.stop
    print(info, mq, sep="\n")
