"""A guest reset with a disk and a NIC: the data survives, the devices work again after it.

The built-in guest with `tests=blk,net,reboot`: on the first boot its disk and network checks
pass and `reboot` writes a marker (and a pattern) to the middle of the disk and flushes it;
the run ends with the guest's reset, which strato (no --no-reboot) turns into a reboot. On the
second boot the same checks pass again on the re-initialised devices, `reboot` finds the
first boot's marker with every byte intact and the guest powers off: strato exits 0.
"""

from __future__ import annotations

import os
import struct
from contextlib import ExitStack
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_OK, StopReason
from tests.behaviour.vmrun import Boot, boot
from tests.guest.harness import Event, HostResponder, Ready, check_blk_disk
from tests.guest.hostnet import PacketCapture, TapDevice, can_make_taps

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]

DISK_SIZE = 1 << 20
BLK_CHECKS = ["blk-id", "blk-rw", "blk-flush", "blk-eod"]
NET_CHECKS = ["net-tx", "net-csum", "net-rx"]


def test_reboot_keeps_the_disk_and_the_devices_work_again(guest_elf: Path, workdir: Path) -> None:
    net = can_make_taps()
    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(DISK_SIZE))
    with ExitStack() as stack:
        args = [
            "--kernel", str(guest_elf), "--memory", "size=64M",
            "--cmdline", "tests=blk,net,reboot host=1 host-timeout=5000",
            "--disk", f"path={disk},serial=reboot-disk", "--console", "off", "--serial", "null",
        ]  # fmt: skip
        capture = None
        if net:
            tap = stack.enter_context(TapDevice(f"stbr{os.getpid() % 100000}"))
            capture = PacketCapture(tap.name).start()
            stack.callback(capture.stop)
            args += ["--net", f"tap={tap.name},mac=52:54:00:12:34:57"]
        responder = HostResponder(send_frame=capture.send if capture is not None else None)
        handlers = responder.handlers()

        def answer(event: Event, _boot: Boot) -> None:
            if isinstance(event, Ready) and event.what in handlers:
                handlers[event.what](event)

        run = boot(args, timeout=90, on_event=answer)
    assert not run.errors, run.errors
    assert len(run.boots) == 2, run.text()
    first, second = (b.output for b in run.boots)
    required = BLK_CHECKS + (NET_CHECKS if net else []) + ["reboot"]
    first.check(required)
    second.check(required)
    wrote, found = first.result("reboot"), second.result("reboot")
    assert (wrote.fields["boot"], found.fields["boot"]) == ("1", "2")
    assert found.fields["found"] == "boot1" and found.fields["data"] == "ok"
    assert found.fields["seed"] == wrote.fields["seed"]
    assert found.fields["sector"] == wrote.fields["sector"]
    # The marker is in the file too, and the second boot's blk-rw data.
    sector = int(wrote.fields["sector"])
    raw = disk.read_bytes()[sector * 512 : sector * 512 + 32]
    assert raw[:20] == b"STRATO-REBOOT-MARKER"
    assert struct.unpack_from("<II", raw, 24) == (1, int(wrote.fields["seed"], 16))
    assert check_blk_disk(disk, second.result("blk-rw")) == []
    assert second.result("blk-id").fields["serial"] == "reboot-disk"
    if capture is not None:
        # Each boot sent its 8 frames and received the host's 4.
        assert len(capture.test_frames("TX")) == 16
        assert responder.rx_frames_sent == 8
        for out in (first, second):
            assert out.result("net-rx").fields["frames"] == "4"
    assert run.stop.reason is StopReason.POWEROFF and run.stop.exit_status == EXIT_OK, run.stop
    if not net:
        pytest.skip("net checks need root and /dev/net/tun; the disk survived the reboot")
