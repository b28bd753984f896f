"""Cloud Hypervisor's debug port 0x80: the guest writes a byte, the VMM timestamps it.

Code ranges (Cloud Hypervisor's DebugIoPortRange): 0x00-0x1f firmware, 0x20-0x3f bootloader,
0x40-0x5f kernel, 0x60-0x7f userspace, the rest custom. Cloud Hypervisor's boot-time tests use
0x40 for "kernel started" and 0x41 for "userspace started" (both in the kernel range).

Each write records (code, ns since `start_ns`) in a bounded list and logs it; the first
occurrence of each code is kept separately (at most 256 entries) so `wait_for` still finds it
after the list has wrapped. Linux may also use port 0x80 as an I/O delay (`outb_p`); those
writes land here too, which is why only the first of each code is logged at INFO.
Reads return 0xff: Cloud Hypervisor leaves the read buffer untouched and logs an error; a port
nobody drives reads as all ones on a PC.

Hostile-guest budget: a write costs O(1) time and at most one `DebugPortEvent` in a list of
`max_events` (4096 by default) plus one per distinct code (256); its log line is rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from strato._sys.ratelog import RateLimitedLog
from strato.devices.legacy._common import open_bus

log = logging.getLogger(__name__)
# Guest-triggerable log lines, rate-limited: the first of each code (at most 256 lines, but
# in a burst) and every repeat (Linux may use port 0x80 as an I/O delay: thousands a second).
_log_first = RateLimitedLog(log, burst=64)
_log_repeat = RateLimitedLog(log)

DEBUG_PORT = 0x80
DEBUG_PORT_LEN = 1

FIRMWARE_CODES = range(0x00, 0x20)
BOOTLOADER_CODES = range(0x20, 0x40)
KERNEL_CODES = range(0x40, 0x60)
USERSPACE_CODES = range(0x60, 0x80)
CODE_KERNEL_START = 0x40
CODE_USERSPACE_START = 0x41

DEFAULT_MAX_EVENTS = 4096


def code_range(code: int) -> str:
    """The component a code belongs to, as Cloud Hypervisor names it."""
    if code in FIRMWARE_CODES:
        return "Firmware"
    if code in BOOTLOADER_CODES:
        return "Bootloader"
    if code in KERNEL_CODES:
        return "Kernel"
    if code in USERSPACE_CODES:
        return "Userspace"
    return "Custom"


@dataclass(frozen=True)
class DebugPortEvent:
    code: int
    timestamp_ns: int  # since the device's start_ns


class DebugPort:
    """The debug port on the PIO bus at DEBUG_PORT (length DEBUG_PORT_LEN).

    start_ns: the reference point, in `clock` units (time.monotonic_ns by default), usually
        when the VMM started; None means now.
    """

    def __init__(
        self,
        start_ns: int | None = None,
        *,
        max_events: int = DEFAULT_MAX_EVENTS,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        if max_events <= 0:
            raise ValueError("max_events must be positive")
        self._clock = clock
        self.start_ns = clock() if start_ns is None else start_ns
        self.events: deque[DebugPortEvent] = deque(maxlen=max_events)
        self.first: dict[int, DebugPortEvent] = {}
        self.count = 0  # writes ever seen, including those the bounded list forgot
        self._cond = threading.Condition()

    def read(self, offset: int, size: int) -> bytes:
        return open_bus(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not data:
            return
        code = data[0]  # a wider write carries its code in the low byte
        event = DebugPortEvent(code, self._clock() - self.start_ns)
        with self._cond:
            self.events.append(event)
            self.count += 1
            first = code not in self.first
            if first:
                self.first[code] = event
            self._cond.notify_all()
        level = logging.INFO if first else logging.DEBUG
        if not log.isEnabledFor(level):
            return
        (_log_first if first else _log_repeat).log(
            level,
            "[Debug I/O port: %s code %#x] %d.%06d seconds",
            code_range(code),
            code,
            event.timestamp_ns // 1_000_000_000,
            event.timestamp_ns // 1000 % 1_000_000,
        )

    def wait_for(self, code: int, timeout: float | None) -> DebugPortEvent | None:
        """The first write of `code`, waiting up to `timeout` seconds for it; None on timeout."""
        with self._cond:
            if self._cond.wait_for(lambda: code in self.first, timeout):
                return self.first[code]
            return None

    def state(self) -> dict[str, Any]:
        with self._cond:
            return {
                "count": self.count,
                "events": [[e.code, e.timestamp_ns] for e in self.events],
                "first": [[e.code, e.timestamp_ns] for e in self.first.values()],
            }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Reload the recorded events (timestamps stay relative to the original start)."""
        count = state.get("count")
        if type(count) is not int or count < 0:
            raise ValueError("snapshot field 'count': expected a non-negative int")
        events = _events(state, "events", self.events.maxlen or DEFAULT_MAX_EVENTS)
        first = _events(state, "first", 256)
        with self._cond:
            self.count = count
            self.events.clear()
            self.events.extend(events)
            self.first = {e.code: e for e in first}
            self._cond.notify_all()


def _events(state: Mapping[str, Any], key: str, max_len: int) -> list[DebugPortEvent]:
    raw = state.get(key)
    if not isinstance(raw, list):
        raise ValueError(f"snapshot field {key!r}: expected a list")
    out = []
    for entry in raw[-max_len:]:
        if (
            not isinstance(entry, list)
            or len(entry) != 2
            or type(entry[0]) is not int
            or not 0 <= entry[0] <= 0xFF
            or type(entry[1]) is not int
        ):
            raise ValueError(f"snapshot field {key!r}: bad entry {entry!r}")
        out.append(DebugPortEvent(entry[0], entry[1]))
    return out
