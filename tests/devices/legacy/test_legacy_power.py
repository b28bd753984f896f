"""ACPI shutdown/reset register, PM timer and GED, driven as Linux's ACPICA drives them."""

from __future__ import annotations

import json

import pytest

from strato.devices.legacy import ged as g
from strato.devices.legacy import power as pw
from strato.devices.legacy.ged import AcpiGed
from strato.devices.legacy.power import AcpiPmTimer, AcpiShutdown
from strato.interrupts import CountingTrigger


class Calls:
    def __init__(self) -> None:
        self.poweroff = 0
        self.reset = 0

    def make(self) -> AcpiShutdown:
        def off() -> None:
            self.poweroff += 1

        def rst() -> None:
            self.reset += 1

        return AcpiShutdown(on_poweroff=off, on_reset=rst)


def test_constants_follow_cloud_hypervisor() -> None:
    assert pw.ACPI_SHUTDOWN_PORT == 0x600
    assert pw.SLEEP_CONTROL_REG == pw.SLEEP_STATUS_REG == pw.RESET_REG == 0x600
    assert pw.RESET_VALUE == 1
    assert pw.SHUTDOWN_VALUE == 0x34
    assert pw.ACPI_PM_TIMER_PORT == 0x608


def test_linux_s5_sequence_powers_off_once() -> None:
    calls = Calls()
    dev = calls.make()
    # acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP|SLP_EN.
    dev.write(0, bytes([pw.WAK_STS]))
    assert calls.poweroff == 0
    dev.write(0, bytes([pw.S5_SLP_TYP << pw.SLP_TYP_SHIFT | pw.SLP_EN]))
    assert (calls.poweroff, calls.reset) == (1, 0)


def test_s5_without_slp_en_does_nothing() -> None:
    calls = Calls()
    dev = calls.make()
    dev.write(0, bytes([pw.S5_SLP_TYP << pw.SLP_TYP_SHIFT]))
    assert (calls.poweroff, calls.reset) == (0, 0)


def test_reset_register() -> None:
    calls = Calls()
    dev = calls.make()
    dev.write(0, bytes([pw.RESET_VALUE]))
    assert (calls.poweroff, calls.reset) == (0, 1)


def test_unsupported_sleep_state_wakes_at_once() -> None:
    calls = Calls()
    dev = calls.make()
    assert dev.read(0, 1) == b"\x00"
    dev.write(0, bytes([3 << pw.SLP_TYP_SHIFT | pw.SLP_EN]))  # S3
    assert calls.poweroff == 0
    assert dev.read(0, 1)[0] & pw.WAK_STS  # Linux's wait loop ends
    dev.write(0, bytes([pw.WAK_STS]))  # write-1-to-clear
    assert dev.read(0, 1) == b"\x00"
    state = json.loads(json.dumps(dev.state()))
    dev.restore(state)
    assert dev.state() == state


def test_odd_accesses_are_ignored() -> None:
    calls = Calls()
    dev = calls.make()
    dev.write(1, bytes([pw.RESET_VALUE]))
    dev.write(0, bytes([pw.RESET_VALUE, 0]))
    dev.write(0, b"")
    assert dev.read(0, 4) == b"\xff" * 4
    assert dev.read(2, 1) == b"\xff"
    assert (calls.poweroff, calls.reset) == (0, 0)
    AcpiShutdown().write(0, bytes([pw.SHUTDOWN_VALUE]))  # no callbacks: harmless


def test_pm_timer_counts_at_3_579545_mhz_and_wraps() -> None:
    now = [10**12]
    timer = AcpiPmTimer(clock=lambda: now[0])
    assert timer.read(0, 4) == b"\x00" * 4
    now[0] += 1_000_000_000
    assert int.from_bytes(timer.read(0, 4), "little") == pw.PM_TIMER_HZ
    assert timer.read(0, 2) == pw.PM_TIMER_HZ.to_bytes(4, "little")[:2]
    assert timer.read(2, 4) == b"\xff" * 4
    now[0] += (1 << 32) * 1_000_000_000 // pw.PM_TIMER_HZ + 1
    assert int.from_bytes(timer.read(0, 4), "little") < 2 * pw.PM_TIMER_HZ  # wrapped
    state = timer.state()
    later = AcpiPmTimer(clock=lambda: now[0])
    later.restore(json.loads(json.dumps(state)))
    assert abs(later.counter() - state["counter"]) <= 1


def test_ged_power_button() -> None:
    trig = CountingTrigger()
    ged = AcpiGed(trig)
    assert ged.read(0, 1) == b"\x00"
    ged.power_button()
    assert trig.count == 1
    # _EVT -> ESCN reads GDAT once: bits reported, then cleared.
    assert ged.read(0, 1)[0] == g.GED_POWER_BUTTON == 1 << 3
    assert ged.read(0, 1) == b"\x00"
    ged.notify(g.GED_CPU_DEVICES_CHANGED)
    ged.notify(g.GED_PCI_DEVICES_CHANGED)
    assert trig.count == 3
    assert ged.read(0, 1)[0] == g.GED_CPU_DEVICES_CHANGED | g.GED_PCI_DEVICES_CHANGED
    assert ged.read(0, 4) == b"\xff" * 4
    ged.write(0, b"\xff")
    assert ged.read(0, 1) == b"\x00"


def test_ged_restore_reraises_pending_events() -> None:
    ged = AcpiGed(CountingTrigger())
    ged.power_button()
    state = json.loads(json.dumps(ged.state()))
    trig = CountingTrigger()
    ged2 = AcpiGed(trig)
    ged2.restore(state)
    assert trig.count == 1
    assert ged2.read(0, 1)[0] == g.GED_POWER_BUTTON
    with pytest.raises(ValueError):
        ged2.restore({"pending": -1})
