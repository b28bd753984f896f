"""The serial-line parser the guest tests (QEMU and strato) share."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.guest.harness import (
    BenchEnd,
    Done,
    Fatal,
    GuestOutput,
    Ready,
    TestLine,
    blk_pattern,
    check_blk_disk,
    parse_line,
)

SAMPLE = """\
SeaBIOS (version 1.16.2)
Booting from ROM..
BOOT strato-guest start_info=ok cmdline="tests=blk" heap=253MiB
TEST serial PASS lsr=0x60 scratch=ok
TEST blk-id PASS dev=00:01.0 serial=strato-disk0 status=OK
TEST blk-rw FAIL dev=00:01.0 failed at compare units 0-8: status=OK bad-sector=3
BENCH-START blk-randread qd=32 bs=4096 indirect=0 irq=msix
BENCH-END blk-randread ops=1000 bytes=4096000 errors=0 guest_us=5000
READY net-rx mac=52:54:00:12:34:56 frames=4
DONE pass=2 fail=1
"""


def test_parse_test_lines() -> None:
    line = parse_line("TEST blk-id PASS dev=00:01.0 serial=abc status=OK")
    assert isinstance(line, TestLine)
    assert (line.name, line.passed) == ("blk-id", True)
    assert line.fields == {"dev": "00:01.0", "serial": "abc", "status": "OK"}
    fail = parse_line("TEST net FAIL no virtio-net device")
    assert isinstance(fail, TestLine) and not fail.passed
    assert fail.detail == "no virtio-net device"


def test_skip_lines_are_neither_passes_nor_failures() -> None:
    skip = parse_line("TEST net SKIP no virtio-net device")
    assert isinstance(skip, TestLine) and skip.skipped and not skip.passed
    assert str(skip) == "TEST net SKIP no virtio-net device"
    out = GuestOutput.parse(
        "TEST serial PASS lsr=0x60\nTEST net SKIP no virtio-net device\nDONE pass=1 fail=0 skip=1"
    )
    assert [t.name for t in out.tests] == ["serial"] and out.failures() == []
    assert [t.name for t in out.skipped] == ["net"]
    assert out.done is not None and out.done.skipped == 1
    out.check(["serial"])
    with pytest.raises(AssertionError, match="no TEST net line"):
        out.check(["net"])  # a skipped check is not a check that ran
    # An older guest's DONE line, without skip=, still parses.
    done = parse_line("DONE pass=2 fail=0")
    assert isinstance(done, Done) and done.skipped == 0


def test_events_found_after_firmware_output_on_the_same_line() -> None:
    line = parse_line("Booting from ROM..TEST serial PASS lsr=0x60")
    assert isinstance(line, TestLine) and line.name == "serial"


def test_quoted_values() -> None:
    line = parse_line('TEST console-rx PASS dev=00:03.0 got="hello host" bytes=10')
    assert isinstance(line, TestLine)
    assert line.fields["got"] == "hello host"


def test_other_events() -> None:
    assert parse_line("DONE pass=3 fail=0") == Done(3, 0)
    ready = parse_line("READY console-rx")
    assert isinstance(ready, Ready) and ready.what == "console-rx"
    end = parse_line("BENCH-END net-tx ops=10 bytes=640 guest_us=9")
    assert isinstance(end, BenchEnd) and (end.ops, end.bytes) == (10, 640)
    assert isinstance(parse_line("FATAL exception vector=14"), Fatal)
    assert parse_line("PCI 00:01.0 1af4:1042") is None
    assert parse_line("TEST blk MAYBE x") is None
    assert parse_line("BENCH-END blk ops=x bytes=1") is None
    assert parse_line("TESTING something") is None


def test_guest_output_collects_a_run() -> None:
    out = GuestOutput()
    for i, line in enumerate(SAMPLE.splitlines()):
        out.add(line, t=float(i))
    assert [t.name for t in out.tests] == ["serial", "blk-id", "blk-rw"]
    assert [t.name for t in out.failures()] == ["blk-rw"]
    assert out.done == Done(2, 1, 9.0)
    (bench,) = out.benches
    assert (bench.name, bench.ops, bench.seconds) == ("blk-randread", 1000, 1.0)
    assert bench.fields["qd"] == "32" and bench.ops_per_second == 1000.0
    assert out.ready[0].fields["mac"] == "52:54:00:12:34:56"
    assert out.result("blk-id").fields["serial"] == "strato-disk0"
    with pytest.raises(AssertionError, match="blk-rw FAIL"):
        out.check()


def test_check_wants_done_and_the_required_names() -> None:
    out = GuestOutput.parse("TEST serial PASS lsr=0x60\n")
    with pytest.raises(AssertionError, match="no DONE line"):
        out.check()
    out.add("DONE pass=1 fail=0")
    out.check(required=["serial"])
    with pytest.raises(AssertionError, match="no TEST rng line"):
        out.check(required=["rng"])


def test_blk_pattern_depends_on_seed_and_sector() -> None:
    # That it equals what the guest writes is checked on the disk file after a QEMU run.
    data = blk_pattern(1, 0)
    assert len(data) == 512
    assert data != blk_pattern(1, 1) and data != blk_pattern(2, 0)


def test_check_blk_disk(tmp_path: Path) -> None:
    disk = tmp_path / "d.raw"
    disk.write_bytes(blk_pattern(7, 0) + blk_pattern(7, 1) + bytes(512) + blk_pattern(7, 3))
    line = parse_line("TEST blk-rw PASS seed=0x7 written=0:2,2:2")
    assert isinstance(line, TestLine)
    assert check_blk_disk(disk, line) == [2]


@given(st.text())
def test_parse_line_never_raises(text: str) -> None:
    parse_line(text)
