"""Random register traffic: no device raises, state stays bounded and snapshots round-trip."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.bus import Bus
from strato.devices.legacy import (
    ACPI_PM_TIMER_PORT,
    ACPI_PM_TIMER_PORT_LEN,
    ACPI_SHUTDOWN_PORT,
    ACPI_SHUTDOWN_PORT_LEN,
    COM1_PORT,
    DEBUG_PORT,
    DEBUG_PORT_LEN,
    GED_SIZE,
    I8042,
    I8042_PORT,
    I8042_PORT_LEN,
    RTC_PORT,
    RTC_PORT_LEN,
    SERIAL_PORT_LEN,
    AcpiGed,
    AcpiPmTimer,
    AcpiShutdown,
    CmosRtc,
    ConsoleLog,
    DebugPort,
    Serial,
)
from strato.devices.legacy import i8042 as k
from strato.devices.legacy import serial as s
from strato.devices.legacy.serial_output import NullSink
from strato.interrupts import CountingTrigger

ops = st.lists(
    st.one_of(
        st.tuples(st.just("r"), st.integers(-2, 10), st.integers(0, 8)),
        st.tuples(st.just("w"), st.integers(-2, 10), st.binary(min_size=0, max_size=8)),
        st.tuples(st.just("in"), st.just(0), st.binary(min_size=0, max_size=100)),
    ),
    max_size=200,
)


def drive(dev: Any, seq: list[tuple[str, int, Any]], check: Callable[[], None]) -> None:
    for kind, offset, arg in seq:
        if kind == "r":
            data = dev.read(offset, arg)
            assert isinstance(data, bytes) and len(data) == arg
        elif kind == "w":
            dev.write(offset, arg)
        elif hasattr(dev, "enqueue_input"):
            n = dev.enqueue_input(arg)
            assert 0 <= n <= len(arg)
        check()


def roundtrip(dev: Any, fresh: Any) -> None:
    state = json.loads(json.dumps(dev.state()))
    fresh.restore(state)
    assert fresh.state() == state


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(ops)
def test_serial(seq: list[tuple[str, int, Any]]) -> None:
    sink = NullSink()
    console = ConsoleLog(capacity=64)
    dev = Serial(CountingTrigger(), sink)
    dev.add_watcher(console)

    def check() -> None:
        assert len(dev.rx) <= s.FIFO_SIZE
        assert len(console._buf) <= 2 * console.capacity
        assert dev.ier <= s.IER_MASK and dev.mcr <= s.MCR_MASK

    drive(dev, seq, check)
    roundtrip(dev, Serial(CountingTrigger()))


@fuzz
@given(ops)
def test_serial_level_triggered(seq: list[tuple[str, int, Any]]) -> None:
    trig = CountingTrigger()
    dev = Serial(trig, level_triggered=True)

    def check() -> None:
        # The line is high exactly when IIR would report an interrupt.
        assert trig.level == (dev._interrupt_id() != s.IIR_NO_INT)

    drive(dev, seq, check)


@fuzz
@given(ops)
def test_i8042(seq: list[tuple[str, int, Any]]) -> None:
    resets: list[int] = []
    dev = I8042(on_reset=lambda: resets.append(1), kbd_irq=CountingTrigger())

    def check() -> None:
        assert len(dev.buffer) <= k.BUFFER_SIZE

    drive(dev, seq, check)
    dev.trigger_ctrl_alt_del()
    check()
    roundtrip(dev, I8042())


@fuzz
@given(ops)
def test_rtc(seq: list[tuple[str, int, Any]]) -> None:
    dev = CmosRtc(1 << 30, 1 << 32, on_reset=lambda: None)

    def check() -> None:
        assert len(dev.ram) == 128 and 0 <= dev.index < 128

    drive(dev, seq, check)
    roundtrip(dev, CmosRtc())


@fuzz
@given(ops)
def test_debug_port(seq: list[tuple[str, int, Any]]) -> None:
    dev = DebugPort(max_events=16)

    def check() -> None:
        assert len(dev.events) <= 16 and len(dev.first) <= 256

    drive(dev, seq, check)
    roundtrip(dev, DebugPort(max_events=16))


@fuzz
@given(ops)
def test_power_and_ged(seq: list[tuple[str, int, Any]]) -> None:
    shutdown = AcpiShutdown(on_poweroff=lambda: None, on_reset=lambda: None)
    drive(shutdown, seq, lambda: None)
    roundtrip(shutdown, AcpiShutdown())
    ged = AcpiGed(CountingTrigger())
    drive(ged, seq, lambda: None)
    roundtrip(ged, AcpiGed(CountingTrigger()))
    timer = AcpiPmTimer()
    drive(timer, seq, lambda: None)


def test_pio_layout_has_no_overlaps() -> None:
    bus = Bus("pio")
    bus.insert(Serial(CountingTrigger()), COM1_PORT, SERIAL_PORT_LEN)
    bus.insert(I8042(), I8042_PORT, I8042_PORT_LEN)
    bus.insert(CmosRtc(), RTC_PORT, RTC_PORT_LEN)
    bus.insert(DebugPort(), DEBUG_PORT, DEBUG_PORT_LEN)
    bus.insert(AcpiShutdown(), ACPI_SHUTDOWN_PORT, ACPI_SHUTDOWN_PORT_LEN)
    bus.insert(AcpiPmTimer(), ACPI_PM_TIMER_PORT, ACPI_PM_TIMER_PORT_LEN)
    assert bus.read(0x64, 1) is not None  # i8042 status through the bus
    assert bus.read(COM1_PORT + s.LSR, 1) == bytes([s.LSR_THRE | s.LSR_TEMT])
    mmio = Bus("mmio")
    mmio.insert(AcpiGed(CountingTrigger()), 0xFED0_0000, GED_SIZE)
