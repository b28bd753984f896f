"""The CMOS RTC read and set the way Linux's mc146818 code does it."""

from __future__ import annotations

import calendar
import datetime as dt
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.devices.legacy import rtc as r
from strato.devices.legacy.rtc import CmosRtc

NS = 1_000_000_000


class Clock:
    def __init__(self, when: dt.datetime, frac_ns: int = 500_000_000) -> None:
        self.ns = calendar.timegm(when.utctimetuple()) * NS + frac_ns

    def __call__(self) -> int:
        return self.ns


def cmos_read(dev: CmosRtc, reg: int) -> int:
    dev.write(r.INDEX_OFFSET, bytes([reg]))
    return dev.read(r.DATA_OFFSET, 1)[0]


def cmos_write(dev: CmosRtc, reg: int, value: int) -> None:
    dev.write(r.INDEX_OFFSET, bytes([reg]))
    dev.write(r.DATA_OFFSET, bytes([value]))


def read_time(dev: CmosRtc) -> dict[str, int]:
    """mc146818_get_time: wait for UIP to clear, read the fields, decode per register B."""
    deadline = time.monotonic() + 2
    while cmos_read(dev, r.REG_A) & r.A_UIP:
        assert time.monotonic() < deadline, "UIP stuck"
    raw = {
        "second": cmos_read(dev, r.REG_SECONDS),
        "minute": cmos_read(dev, r.REG_MINUTES),
        "hour": cmos_read(dev, r.REG_HOURS),
        "day": cmos_read(dev, r.REG_DAY_OF_MONTH),
        "month": cmos_read(dev, r.REG_MONTH),
        "year": cmos_read(dev, r.REG_YEAR),
        "century": cmos_read(dev, r.REG_CENTURY),
    }
    b = cmos_read(dev, r.REG_B)
    pm = raw["hour"] & r.HOUR_PM if not b & r.B_24H else 0
    raw["hour"] &= ~r.HOUR_PM if not b & r.B_24H else 0xFF
    if not b & r.B_DM_BINARY:
        raw = {k: (v >> 4) * 10 + (v & 0xF) for k, v in raw.items()}
    if not b & r.B_24H:
        raw["hour"] = raw["hour"] % 12 + (12 if pm else 0)
    raw["year"] += raw.pop("century") * 100
    return raw


def test_reads_host_utc_time_in_bcd() -> None:
    dev = CmosRtc()
    before = time.time()
    got = read_time(dev)
    after = time.time()
    when = dt.datetime(
        got["year"],
        got["month"],
        got["day"],
        got["hour"],
        got["minute"],
        got["second"],
        tzinfo=dt.UTC,
    ).timestamp()
    assert int(before) - 1 <= when <= after + 1
    assert cmos_read(dev, r.REG_B) == r.DEFAULT_B  # BCD, 24-hour


def test_known_time_bcd_binary_12h() -> None:
    dev = CmosRtc(clock=Clock(dt.datetime(2024, 2, 29, 13, 45, 30)))
    assert cmos_read(dev, r.REG_SECONDS) == 0x30
    assert cmos_read(dev, r.REG_MINUTES) == 0x45
    assert cmos_read(dev, r.REG_HOURS) == 0x13
    assert cmos_read(dev, r.REG_WEEKDAY) == 5  # Thursday (1 = Sunday)
    assert cmos_read(dev, r.REG_DAY_OF_MONTH) == 0x29
    assert cmos_read(dev, r.REG_MONTH) == 0x02
    assert cmos_read(dev, r.REG_YEAR) == 0x24
    assert cmos_read(dev, r.REG_CENTURY) == 0x20
    cmos_write(dev, r.REG_B, r.B_24H | r.B_DM_BINARY)
    assert cmos_read(dev, r.REG_SECONDS) == 30
    assert cmos_read(dev, r.REG_HOURS) == 13
    assert cmos_read(dev, r.REG_YEAR) == 24
    assert cmos_read(dev, r.REG_CENTURY) == 20
    cmos_write(dev, r.REG_B, r.B_DM_BINARY)  # 12-hour binary
    assert cmos_read(dev, r.REG_HOURS) == 1 | r.HOUR_PM
    cmos_write(dev, r.REG_B, 0)  # 12-hour BCD
    assert cmos_read(dev, r.REG_HOURS) == 0x01 | r.HOUR_PM
    assert read_time(dev) == {
        "second": 30,
        "minute": 45,
        "hour": 13,
        "day": 29,
        "month": 2,
        "year": 2024,
    }


@pytest.mark.parametrize(("hour", "bcd12"), [(0, 0x12), (11, 0x11), (12, 0x92), (23, 0x91)])
def test_twelve_hour_edges(hour: int, bcd12: int) -> None:
    dev = CmosRtc(clock=Clock(dt.datetime(2025, 1, 1, hour, 0, 0)))
    cmos_write(dev, r.REG_B, 0)
    assert cmos_read(dev, r.REG_HOURS) == bcd12
    assert read_time(dev)["hour"] == hour


def test_uip_only_near_the_end_of_a_second() -> None:
    clock = Clock(dt.datetime(2025, 1, 1), frac_ns=NS - 100_000)
    dev = CmosRtc(clock=clock)
    assert cmos_read(dev, r.REG_A) == r.DEFAULT_A | r.A_UIP
    clock.ns += 200_000  # the second ticked over
    assert cmos_read(dev, r.REG_A) == r.DEFAULT_A
    cmos_write(dev, r.REG_A, 0xFF)  # UIP is read-only
    clock.ns = clock.ns // NS * NS + NS // 2
    assert cmos_read(dev, r.REG_A) == 0x7F


def test_status_registers_c_and_d() -> None:
    dev = CmosRtc()
    assert cmos_read(dev, r.REG_C) == 0
    assert cmos_read(dev, r.REG_D) == r.D_VRT
    cmos_write(dev, r.REG_D, 0)
    assert cmos_read(dev, r.REG_D) == r.D_VRT


def test_guest_sets_the_time_like_hwclock() -> None:
    clock = Clock(dt.datetime(2024, 6, 1, 12, 0, 0))
    dev = CmosRtc(clock=clock)
    b = cmos_read(dev, r.REG_B)
    cmos_write(dev, r.REG_B, b | r.B_SET)
    for reg, value in [
        (r.REG_SECONDS, 0x56),
        (r.REG_MINUTES, 0x34),
        (r.REG_HOURS, 0x12),
        (r.REG_DAY_OF_MONTH, 0x31),
        (r.REG_MONTH, 0x12),
        (r.REG_YEAR, 0x99),
        (r.REG_CENTURY, 0x19),
    ]:
        cmos_write(dev, reg, value)
    clock.ns += 10 * NS  # held while SET is on
    assert cmos_read(dev, r.REG_SECONDS) == 0x56
    assert cmos_read(dev, r.REG_A) & r.A_UIP == 0
    cmos_write(dev, r.REG_B, b)
    assert read_time(dev) == {
        "second": 56,
        "minute": 34,
        "hour": 12,
        "day": 31,
        "month": 12,
        "year": 1999,
    }
    clock.ns += 5 * NS  # and it runs again
    assert read_time(dev) == {
        "second": 1,
        "minute": 35,
        "hour": 12,
        "day": 31,
        "month": 12,
        "year": 1999,
    }
    assert cmos_read(dev, r.REG_WEEKDAY) == 6  # 1999-12-31 was a Friday


def test_invalid_time_writes_are_ignored() -> None:
    dev = CmosRtc(clock=Clock(dt.datetime(2024, 6, 1, 12, 0, 0)))
    cmos_write(dev, r.REG_SECONDS, 0x5A)  # not BCD
    cmos_write(dev, r.REG_MONTH, 0x13)  # no month 13
    cmos_write(dev, r.REG_HOURS, 0x24)
    assert read_time(dev) == {
        "second": 0,
        "minute": 0,
        "hour": 12,
        "day": 1,
        "month": 6,
        "year": 2024,
    }


def test_memory_size_fields() -> None:
    dev = CmosRtc(mem_below_4g=3 << 30, mem_above_4g=2 << 30, cpus=4)
    above_16m = cmos_read(dev, 0x34) | cmos_read(dev, 0x35) << 8
    assert above_16m == ((3 << 30) - (16 << 20)) >> 16
    above_4g = cmos_read(dev, 0x5B) | cmos_read(dev, 0x5C) << 8 | cmos_read(dev, 0x5D) << 16
    assert above_4g == (2 << 30) >> 16
    assert cmos_read(dev, 0x30) | cmos_read(dev, 0x31) << 8 == 0xFFFF  # capped, in KiB
    assert cmos_read(dev, 0x15) | cmos_read(dev, 0x16) << 8 == 640
    assert cmos_read(dev, r.CMOS_CPU_COUNT) == 3
    small = CmosRtc(mem_below_4g=8 << 20)
    assert cmos_read(small, 0x34) == cmos_read(small, 0x35) == 0
    assert cmos_read(small, 0x30) | cmos_read(small, 0x31) << 8 == 7 * 1024
    huge = CmosRtc(mem_above_4g=1 << 50)
    assert (cmos_read(huge, 0x5B), cmos_read(huge, 0x5C), cmos_read(huge, 0x5D)) == (
        0xFF,
        0xFF,
        0xFF,
    )


def test_ram_and_nmi_bit() -> None:
    dev = CmosRtc()
    cmos_write(dev, 0x40, 0xAB)
    cmos_write(dev, 0x7F, 0xCD)
    dev.write(r.INDEX_OFFSET, bytes([0x80 | 0x40]))  # NMI disable bit: same register
    assert dev.read(r.DATA_OFFSET, 1) == b"\xab"
    assert dev.read(r.INDEX_OFFSET, 1) == b"\x40"
    assert cmos_read(dev, 0xFF) == 0xCD
    assert dev.read(r.DATA_OFFSET, 2) == b"\xff\xff"
    assert dev.read(5, 1) == b"\xff"


def test_shutdown_byte_reset_quirk() -> None:
    resets = []
    dev = CmosRtc(on_reset=lambda: resets.append(1))
    cmos_write(dev, r.REG_SHUTDOWN_STATUS, 0)  # Linux's SMP boot does this: no reset
    cmos_write(dev, r.REG_SHUTDOWN_STATUS, 0x0A)
    assert resets == []
    assert cmos_read(dev, r.REG_SHUTDOWN_STATUS) == 0x0A
    dev.write(r.INDEX_OFFSET, bytes([0x8F]))  # machine_real_restart
    dev.write(r.DATA_OFFSET, b"\x00")
    assert resets == [1]


def test_state_roundtrip() -> None:
    clock = Clock(dt.datetime(2024, 6, 1, 12, 0, 0))
    dev = CmosRtc(mem_below_4g=1 << 30, clock=clock)
    cmos_write(dev, r.REG_YEAR, 0x30)
    cmos_write(dev, 0x50, 7)
    cmos_write(dev, r.REG_B, r.B_24H | r.B_SET)
    cmos_write(dev, r.REG_MINUTES, 0x21)
    state = json.loads(json.dumps(dev.state()))
    dev2 = CmosRtc(clock=clock)
    dev2.restore(state)
    assert dev2.state() == dev.state()
    cmos_write(dev2, r.REG_B, r.B_24H)
    assert read_time(dev2) == {
        "second": 0,
        "minute": 21,
        "hour": 12,
        "day": 1,
        "month": 6,
        "year": 2030,
    }
    with pytest.raises(ValueError):
        dev2.restore({**state, "ram": [0] * 127})
    with pytest.raises(ValueError):
        dev2.restore({**state, "held": [1, 2]})


@given(st.integers(min_value=-719162, max_value=2932896))
def test_civil_date_conversion_matches_datetime(days: int) -> None:
    date = dt.date(1970, 1, 1) + dt.timedelta(days=days)
    assert r.civil_from_days(days) == (date.year, date.month, date.day)
    assert r.days_from_civil(date.year, date.month, date.day) == days
    assert r.split_time(days * 86400)["weekday"] == (date.isoweekday() % 7) + 1
