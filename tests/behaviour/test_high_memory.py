"""A guest larger than 3 GiB on shared memory: RAM above the 32-bit hole works.

`--memory size=3584M,shared=on`: strato puts 3 GiB below the MMIO hole and 512 MiB above
4 GiB, on a shared memory file. The guest (`tests=highmem`) finds the high region in its PVH
memory map, writes a pattern of their address to pages spread over it and reads them back.
Guest memory costs the host only the pages touched: the process stays far below 3.5 GiB.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from strato.vmm.stop import StopReason
from tests.behaviour.vmrun import Boot, boot
from tests.guest.harness import Event, TestLine

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
    pytest.mark.timeout(120),
]

MEMORY_MIB = 3584
HIGH_BYTES = (MEMORY_MIB - 3072) << 20


def rss_bytes() -> int:
    """This process's resident memory, shared memory included (smaps_rollup's Rss)."""
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss line in /proc/self/smaps_rollup")


def test_ram_above_4_gib_on_shared_memory(guest_elf: Path) -> None:
    rss_at_check: list[int] = []

    def measure(event: Event, _boot: Boot) -> None:
        if isinstance(event, TestLine) and event.name == "highmem":
            rss_at_check.append(rss_bytes())  # the VM still exists: its memory is mapped

    args = [
        "--kernel", str(guest_elf), "--cmdline", "tests=highmem",
        "--memory", f"size={MEMORY_MIB}M,shared=on",
        "--console", "off", "--serial", "null", "--no-reboot",
    ]  # fmt: skip
    run = boot(args, timeout=60, on_event=measure)
    assert not run.errors, run.errors
    out = run.output
    out.check(["highmem"])
    line = out.result("highmem")
    assert line.fields["regions"] == "1", line
    assert int(line.fields["high_bytes"]) == HIGH_BYTES, line
    assert int(line.fields["top"], 16) == (4 << 30) + HIGH_BYTES, line
    assert line.fields["pages"] == "8" and line.fields["bad"] == "0", line
    assert run.stop.reason is StopReason.RESET and run.stop.exit_status == 0, run.stop
    # Only what was touched is resident: far below the 3.5 GiB the guest was given.
    assert rss_at_check and rss_at_check[0] < 512 << 20, rss_at_check


def test_without_high_memory_the_check_is_skipped_not_failed(guest_elf: Path) -> None:
    args = [
        "--kernel", str(guest_elf), "--cmdline", "tests=highmem", "--memory", "size=64M",
        "--console", "off", "--serial", "null", "--no-reboot",
    ]  # fmt: skip
    run = boot(args, timeout=60)
    (skip,) = run.output.skipped
    assert skip.name == "highmem" and "no RAM above 4 GiB" in skip.detail
    assert run.output.tests == [] and run.stop.exit_status == 0
