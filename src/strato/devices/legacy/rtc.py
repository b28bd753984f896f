"""The CMOS RTC and its 128 bytes of RAM (ports 0x70 index, 0x71 data), an MC146818.

Time is the host's UTC clock plus an offset the guest can change by writing the time registers
(hwclock does: set B.SET, write the fields, clear B.SET; the fields are held while SET is on).
Values come in BCD or binary and 12- or 24-hour form as register B says. Register A's
update-in-progress bit is set only in the last 244 us of each second, as on the chip, so a guest
that waits for it to clear never waits long. Register D always reports valid RAM (VRT).
There is no IRQ 8 (no periodic, alarm or update interrupts), as in Cloud Hypervisor.

The RAM carries the memory sizes firmware (SeaBIOS, and QEMU's layout) reads: 0x15/0x16 base
memory in KiB, 0x17/0x18 and 0x30/0x31 memory above 1 MiB in KiB (capped), 0x34/0x35 memory
between 16 MiB and 4 GiB in 64 KiB units, 0x5b-0x5d memory above 4 GiB in 64 KiB units, and
0x5f the number of CPUs minus one.

Bit 7 of an index write (NMI disable) selects nothing: the index is the low 7 bits. It is only
remembered for Cloud Hypervisor's reset quirk: writing 0 to register 0x0F through index 0x8F
(Linux's `machine_real_restart`) calls `on_reset`, if given.

Hostile-guest budget: every port access costs O(1) time and no host memory beyond the 128-byte
CMOS array; the log lines a guest can trigger are rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from strato._sys.ratelog import RateLimitedLog
from strato.devices.legacy._common import (
    BYTE,
    bool_field,
    bytes_field,
    int_field,
    open_bus,
    u8_field,
)

log = logging.getLogger(__name__)
# Guest-triggerable log lines, each rate-limited (a guest must not flood the host log).
_log_reset = RateLimitedLog(log)
_log_invalid = RateLimitedLog(log)

RTC_PORT = 0x70
RTC_PORT_LEN = 2
RTC_IRQ = 8  # not raised; for the ACPI/MP tables' benefit
INDEX_OFFSET = 0
DATA_OFFSET = 1
INDEX_MASK = 0x7F
INDEX_NMI_DISABLE = 0x80
CMOS_SIZE = 128

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_WEEKDAY = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_SHUTDOWN_STATUS = 0x0F
REG_CENTURY = 0x32  # the FADT's "century" field points here

A_UIP = 0x80
A_WRITABLE = 0x7F
DEFAULT_A = 0x26  # 32.768 kHz time base, 1024 Hz rate
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
DEFAULT_B = B_24H  # BCD, 24-hour
D_VRT = 0x80
HOUR_PM = 0x80

# Memory size fields.
CMOS_BASE_MEM_LOW = 0x15
CMOS_BASE_MEM_HIGH = 0x16
CMOS_EXT_MEM_LOW = 0x17
CMOS_EXT_MEM_HIGH = 0x18
CMOS_EXT_MEM_ACTUAL_LOW = 0x30
CMOS_EXT_MEM_ACTUAL_HIGH = 0x31
CMOS_MEM_ABOVE_16M_LOW = 0x34
CMOS_MEM_ABOVE_16M_HIGH = 0x35
CMOS_MEM_ABOVE_4G_LOW = 0x5B
CMOS_MEM_ABOVE_4G_MID = 0x5C
CMOS_MEM_ABOVE_4G_HIGH = 0x5D
CMOS_CPU_COUNT = 0x5F

# UIP is held for the last 244 us of each second (8 cycles of the 32.768 kHz base).
UIP_HOLD_NS = 8 * 1_000_000_000 // 32768

_NS = 1_000_000_000
_TIME_FIELDS = ("second", "minute", "hour", "day", "month", "year")
_FIELD_OF_REGISTER = {
    REG_SECONDS: "second",
    REG_MINUTES: "minute",
    REG_HOURS: "hour",
    REG_DAY_OF_MONTH: "day",
    REG_MONTH: "month",
    REG_YEAR: "year",
    REG_CENTURY: "year",
}
_DAY = 86400


def memory_fields(mem_below_4g: int, mem_above_4g: int, cpus: int = 1) -> dict[int, int]:
    """The CMOS bytes that describe memory (sizes in bytes) and the CPU count."""
    kib_above_1m = min(max(mem_below_4g - (1 << 20), 0) >> 10, 0xFFFF)
    above_16m = min(max(mem_below_4g - (16 << 20), 0) >> 16, 0xFFFF)
    above_4g = min(max(mem_above_4g, 0) >> 16, 0xFFFFFF)
    return {
        CMOS_BASE_MEM_LOW: 640 & 0xFF,
        CMOS_BASE_MEM_HIGH: 640 >> 8,
        CMOS_EXT_MEM_LOW: kib_above_1m & 0xFF,
        CMOS_EXT_MEM_HIGH: kib_above_1m >> 8,
        CMOS_EXT_MEM_ACTUAL_LOW: kib_above_1m & 0xFF,
        CMOS_EXT_MEM_ACTUAL_HIGH: kib_above_1m >> 8,
        CMOS_MEM_ABOVE_16M_LOW: above_16m & 0xFF,
        CMOS_MEM_ABOVE_16M_HIGH: above_16m >> 8,
        CMOS_MEM_ABOVE_4G_LOW: above_4g & 0xFF,
        CMOS_MEM_ABOVE_4G_MID: (above_4g >> 8) & 0xFF,
        CMOS_MEM_ABOVE_4G_HIGH: above_4g >> 16,
        CMOS_CPU_COUNT: min(max(cpus, 1) - 1, 0xFF),
    }


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (any year; out-of-range days roll)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    mp = (month + 9) % 12
    doy = (153 * mp + 2) // 5 + day - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def split_time(seconds: int) -> dict[str, int]:
    """Broken-down UTC time of `seconds` since the epoch (weekday 1 = Sunday, as the RTC)."""
    days, rest = divmod(seconds, _DAY)
    year, month, day = civil_from_days(days)
    return {
        "second": rest % 60,
        "minute": rest // 60 % 60,
        "hour": rest // 3600,
        "day": day,
        "month": month,
        "year": year,
        "weekday": (days + 4) % 7 + 1,  # 1970-01-01 was a Thursday
    }


def join_time(fields: Mapping[str, int]) -> int:
    days = days_from_civil(fields["year"], fields["month"], fields["day"])
    return days * _DAY + fields["hour"] * 3600 + fields["minute"] * 60 + fields["second"]


def to_bcd(value: int) -> int:
    return (value // 10) << 4 | value % 10


def from_bcd(value: int) -> int | None:
    hi, lo = value >> 4, value & 0xF
    return None if hi > 9 or lo > 9 else hi * 10 + lo


class CmosRtc:
    """The RTC/CMOS on the PIO bus at RTC_PORT (length RTC_PORT_LEN).

    mem_below_4g / mem_above_4g: guest RAM in bytes below the 32-bit hole and above 4 GiB.
    clock: the host's UTC time in ns since the epoch (injectable for tests).
    """

    def __init__(
        self,
        mem_below_4g: int = 0,
        mem_above_4g: int = 0,
        *,
        cpus: int = 1,
        on_reset: Callable[[], object] | None = None,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._clock = clock
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.index = 0
        self.nmi_disabled = False
        self.ram = bytearray(CMOS_SIZE)
        for reg, value in memory_fields(mem_below_4g, mem_above_4g, cpus).items():
            self.ram[reg] = value
        self.reg_a = DEFAULT_A
        self.reg_b = DEFAULT_B
        self.offset_s = 0  # guest time minus host time, in seconds
        self.held: dict[str, int] | None = None  # the time fields while B.SET is on

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            return open_bus(size)
        with self._lock:
            if offset == INDEX_OFFSET:
                return BYTE[self.index]
            if offset == DATA_OFFSET:
                return BYTE[self._read_register(self.index)]
        return open_bus(size)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        value = data[0]
        reset = False
        with self._lock:
            if offset == INDEX_OFFSET:
                self.index = value & INDEX_MASK
                self.nmi_disabled = bool(value & INDEX_NMI_DISABLE)
            elif offset == DATA_OFFSET:
                reset = (
                    self._on_reset is not None
                    and self.index == REG_SHUTDOWN_STATUS
                    and self.nmi_disabled
                    and value == 0
                )
                if not reset:
                    self._write_register(self.index, value)
        if reset and self._on_reset is not None:
            _log_reset.log(logging.INFO, "cmos: reset requested through the shutdown status byte")
            self._on_reset()

    # -- time ----------------------------------------------------------------------------

    def guest_time(self) -> dict[str, int]:
        """The broken-down time the guest reads now."""
        with self._lock:
            return dict(self._current_fields())

    def _current_fields(self) -> dict[str, int]:
        if self.held is not None:
            return self.held
        return split_time(self._clock() // _NS + self.offset_s)

    def _set_fields(self, fields: dict[str, int]) -> None:
        self.offset_s = join_time(fields) - self._clock() // _NS

    def _encode(self, value: int) -> int:
        return value if self.reg_b & B_DM_BINARY else to_bcd(value)

    def _decode(self, value: int) -> int | None:
        return value if self.reg_b & B_DM_BINARY else from_bcd(value)

    def _encode_hour(self, hour: int) -> int:
        if self.reg_b & B_24H:
            return self._encode(hour)
        pm = HOUR_PM if hour >= 12 else 0
        return self._encode(hour % 12 or 12) | pm

    def _decode_hour(self, value: int) -> int | None:
        if self.reg_b & B_24H:
            return self._decode(value)
        hour = self._decode(value & ~HOUR_PM)
        if hour is None or not 1 <= hour <= 12:
            return None
        return hour % 12 + (12 if value & HOUR_PM else 0)

    # -- registers -----------------------------------------------------------------------

    def _read_register(self, reg: int) -> int:
        if reg == REG_A:
            return self.reg_a | (A_UIP if self._update_in_progress() else 0)
        if reg == REG_B:
            return self.reg_b
        if reg == REG_C:
            return 0  # no interrupt flags: no IRQ 8 sources are emulated
        if reg == REG_D:
            return D_VRT
        field = _FIELD_OF_REGISTER.get(reg)
        if field is None and reg != REG_WEEKDAY:
            return self.ram[reg]
        now = self._current_fields()
        if reg == REG_HOURS:
            return self._encode_hour(now["hour"])
        if reg == REG_WEEKDAY:
            return self._encode(now["weekday"])
        if reg == REG_YEAR:
            return self._encode(now["year"] % 100)
        if reg == REG_CENTURY:
            return self._encode(now["year"] // 100 % 100)
        return self._encode(now[field])  # type: ignore[index]

    def _write_register(self, reg: int, value: int) -> None:
        if reg == REG_A:
            self.reg_a = value & A_WRITABLE
        elif reg == REG_B:
            self._write_b(value)
        elif reg in (REG_C, REG_D):
            pass  # read-only
        elif reg == REG_WEEKDAY:
            pass  # derived from the date
        elif reg in _FIELD_OF_REGISTER:
            self._write_time(reg, value)
        else:
            self.ram[reg] = value

    def _write_b(self, value: int) -> None:
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE on the chip
            if self.held is None:
                self.held = dict(self._current_fields())
        elif self.held is not None:
            held, self.held = self.held, None
            self._set_fields(held)
        self.reg_b = value

    def _write_time(self, reg: int, value: int) -> None:
        decoded = self._decode_hour(value) if reg == REG_HOURS else self._decode(value)
        limits = {
            REG_SECONDS: (0, 59),
            REG_MINUTES: (0, 59),
            REG_HOURS: (0, 23),
            REG_DAY_OF_MONTH: (1, 31),
            REG_MONTH: (1, 12),
            REG_YEAR: (0, 99),
            REG_CENTURY: (0, 99),
        }
        lo, hi = limits[reg]
        if decoded is None or not lo <= decoded <= hi:
            _log_invalid.log(
                logging.DEBUG, "cmos: ignoring invalid value %#04x for register %#04x", value, reg
            )
            return
        fields = dict(self._current_fields())
        if reg == REG_YEAR:
            fields["year"] = fields["year"] // 100 * 100 + decoded
        elif reg == REG_CENTURY:
            fields["year"] = decoded * 100 + fields["year"] % 100
        else:
            fields[_FIELD_OF_REGISTER[reg]] = decoded
        if self.held is not None:
            fields["weekday"] = split_time(join_time(fields))["weekday"]
            self.held = fields
        else:
            self._set_fields(fields)

    def _update_in_progress(self) -> bool:
        if self.reg_b & B_SET:
            return False  # updates are halted
        return self._clock() % _NS >= _NS - UIP_HOLD_NS

    # -- snapshot ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "index": self.index,
                "nmi_disabled": self.nmi_disabled,
                "ram": list(self.ram),
                "reg_a": self.reg_a,
                "reg_b": self.reg_b,
                "offset_s": self.offset_s,
                "held": None if self.held is None else [self.held[k] for k in _TIME_FIELDS],
            }

    def restore(self, state: Mapping[str, Any]) -> None:
        index = int_field(state, "index", 0, INDEX_MASK)
        nmi_disabled = bool_field(state, "nmi_disabled")
        ram = bytes_field(state, "ram", CMOS_SIZE)
        if len(ram) != CMOS_SIZE:
            raise ValueError(f"snapshot field 'ram': expected {CMOS_SIZE} bytes")
        reg_a = u8_field(state, "reg_a")
        reg_b = u8_field(state, "reg_b")
        offset_s = int_field(state, "offset_s", -(1 << 62), 1 << 62)
        raw_held = state.get("held")
        held: dict[str, int] | None = None
        if raw_held is not None:
            if (
                not isinstance(raw_held, list)
                or len(raw_held) != len(_TIME_FIELDS)
                or any(type(v) is not int or abs(v) > 1 << 40 for v in raw_held)
            ):
                raise ValueError("snapshot field 'held': expected six ints")
            held = dict(zip(_TIME_FIELDS, raw_held, strict=True))
            held["weekday"] = split_time(join_time(held))["weekday"]
        with self._lock:
            self.index = index
            self.nmi_disabled = nmi_disabled
            self.ram = bytearray(ram)
            self.reg_a = reg_a & A_WRITABLE
            self.reg_b = reg_b
            self.offset_s = offset_s
            self.held = held
