"""The 0x80 debug port: timestamps, bounded history, waiting for a code."""

from __future__ import annotations

import json
import logging
import threading
import time

import pytest

from strato.devices.legacy import debug_port as d
from strato.devices.legacy.debug_port import DebugPort, DebugPortEvent


def test_timestamps_are_monotonic_and_relative_to_start() -> None:
    start = time.monotonic_ns()
    dev = DebugPort(start)
    for code in range(0x20):
        dev.write(0, bytes([code]))
    stamps = [e.timestamp_ns for e in dev.events]
    assert stamps == sorted(stamps)
    assert 0 <= stamps[0] <= time.monotonic_ns() - start
    assert [e.code for e in dev.events] == list(range(0x20))


def test_injected_clock() -> None:
    now = [1000]
    dev = DebugPort(start_ns=400, clock=lambda: now[0])
    dev.write(0, bytes([d.CODE_KERNEL_START]))
    now[0] = 5000
    dev.write(0, bytes([d.CODE_USERSPACE_START]))
    assert list(dev.events) == [DebugPortEvent(0x40, 600), DebugPortEvent(0x41, 4600)]
    default = DebugPort(clock=lambda: now[0])
    assert default.start_ns == 5000


def test_history_is_bounded_but_first_occurrences_are_kept() -> None:
    dev = DebugPort(max_events=8)
    dev.write(0, bytes([d.CODE_KERNEL_START]))
    for _ in range(1000):
        dev.write(0, b"\x00")  # outb_p I/O delays
    assert len(dev.events) == 8
    assert dev.count == 1001
    assert len(dev.first) == 2
    event = dev.wait_for(d.CODE_KERNEL_START, timeout=0)
    assert event is not None and event.code == d.CODE_KERNEL_START


def test_wait_for_across_threads() -> None:
    dev = DebugPort()

    def guest() -> None:
        for code in (0x01, 0x20, d.CODE_KERNEL_START, d.CODE_USERSPACE_START):
            dev.write(0, bytes([code]))

    t = threading.Thread(target=guest)
    t.start()
    event = dev.wait_for(d.CODE_USERSPACE_START, timeout=10)
    t.join()
    assert event is not None
    kernel = dev.wait_for(d.CODE_KERNEL_START, timeout=0)
    assert kernel is not None and kernel.timestamp_ns <= event.timestamp_ns
    assert dev.wait_for(0x99, timeout=0.01) is None


def test_reads_open_bus_and_odd_writes() -> None:
    dev = DebugPort()
    assert dev.read(0, 1) == b"\xff"
    assert dev.read(0, 4) == b"\xff" * 4
    dev.write(0, b"")
    dev.write(1, b"\x40")
    assert dev.count == 0
    dev.write(0, b"\x41\x00")  # outw: low byte is the code
    assert dev.events[-1].code == 0x41


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (0x00, "Firmware"),
        (0x1F, "Firmware"),
        (0x20, "Bootloader"),
        (0x40, "Kernel"),
        (0x41, "Kernel"),
        (0x60, "Userspace"),
        (0x7F, "Userspace"),
        (0x80, "Custom"),
    ],
)
def test_code_ranges(code: int, name: str) -> None:
    assert d.code_range(code) == name


def test_logs_like_cloud_hypervisor(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=d.__name__)
    dev = DebugPort()
    dev.write(0, b"\x40")
    dev.write(0, b"\x40")  # repeats go to DEBUG
    messages = [rec.getMessage() for rec in caplog.records]
    assert len(messages) == 1
    assert messages[0].startswith("[Debug I/O port: Kernel code 0x40]")


def test_state_roundtrip() -> None:
    dev = DebugPort(max_events=4)
    for code in range(10):
        dev.write(0, bytes([code]))
    state = json.loads(json.dumps(dev.state()))
    dev2 = DebugPort(max_events=4)
    dev2.restore(state)
    assert dev2.state() == dev.state()
    assert dev2.wait_for(0, timeout=0) == dev.first[0]
    with pytest.raises(ValueError):
        dev2.restore({**state, "events": [[256, 0]]})
