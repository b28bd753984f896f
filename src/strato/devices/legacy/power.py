"""ACPI power management for a hardware-reduced FADT, as Cloud Hypervisor lays it out.

Cloud Hypervisor's AcpiShutdownDevice is one byte at I/O port 0x600 that the FADT names as the
sleep control register, the sleep status register and the reset register alike (8-bit system
I/O Generic Address Structures):
- writing RESET_VALUE (1) resets the machine (the FADT's reset value is 1);
- writing SLP_EN (bit 5) with SLP_TYP (bits 2-4) = 5, the S5 value the DSDT's \\_S5 declares,
  powers it off (Linux writes exactly 0x34).
Other sleep states are not implemented; so that a guest which tries one anyway does not spin
forever in Linux's "wait for WAK_STS" loop, the device then reports WAK_STS (bit 7) set, as if
it had woken at once. WAK_STS is cleared by writing it (write-1-to-clear).

AcpiPmTimer is Cloud Hypervisor's PM timer at port 0x608: a free-running 32-bit counter at
3.579545 MHz (the FADT sets TMR_VAL_EXT).

Hostile-guest budget: every register access costs O(1) time and no host memory; the log lines
a guest can trigger (reset, power off, unsupported sleep types) are rate-limited.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from strato._sys.ratelog import RateLimitedLog
from strato.devices.legacy._common import BYTE, bool_field, int_field, open_bus

log = logging.getLogger(__name__)
# Guest-triggerable log lines, each rate-limited (a guest must not flood the host log).
_log_reset = RateLimitedLog(log)
_log_sleep = RateLimitedLog(log)
_log_poweroff = RateLimitedLog(log)

ACPI_SHUTDOWN_PORT = 0x600
ACPI_SHUTDOWN_PORT_LEN = 4  # Cloud Hypervisor maps 4 ports (and reserves 8)
SLEEP_CONTROL_REG = ACPI_SHUTDOWN_PORT
SLEEP_STATUS_REG = ACPI_SHUTDOWN_PORT
RESET_REG = ACPI_SHUTDOWN_PORT
RESET_VALUE = 0x01

SLP_TYP_SHIFT = 2
SLP_TYP_MASK = 0x1C
SLP_EN = 0x20
WAK_STS = 0x80
S5_SLP_TYP = 5
SHUTDOWN_VALUE = S5_SLP_TYP << SLP_TYP_SHIFT | SLP_EN  # 0x34

ACPI_PM_TIMER_PORT = 0x608
ACPI_PM_TIMER_PORT_LEN = 4
PM_TIMER_HZ = 3_579_545

_NS = 1_000_000_000


class AcpiShutdown:
    """The sleep control/status and reset register on the PIO bus at ACPI_SHUTDOWN_PORT.

    on_poweroff / on_reset: called (outside the device lock) when the guest asks for S5 / reset.
    """

    def __init__(
        self,
        on_poweroff: Callable[[], object] | None = None,
        on_reset: Callable[[], object] | None = None,
    ) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._lock = threading.Lock()
        self.wake_status = False

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or size != 1:
            return open_bus(size)
        with self._lock:
            return BYTE[WAK_STS if self.wake_status else 0]

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1:
            return
        value = data[0]
        if value == RESET_VALUE:
            _log_reset.log(logging.INFO, "acpi: guest requested reset")
            if self._on_reset is not None:
                self._on_reset()
            return
        with self._lock:
            if value & WAK_STS:
                self.wake_status = False
            if not value & SLP_EN:
                return
            sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if sleep_type != S5_SLP_TYP:
                _log_sleep.warning(
                    "acpi: sleep type %d is not supported; waking at once", sleep_type
                )
                self.wake_status = True
                return
        _log_poweroff.log(logging.INFO, "acpi: guest requested power off (S5)")
        if self._on_poweroff is not None:
            self._on_poweroff()

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"wake_status": self.wake_status}

    def restore(self, state: Mapping[str, Any]) -> None:
        wake_status = bool_field(state, "wake_status")
        with self._lock:
            self.wake_status = wake_status


class AcpiPmTimer:
    """The ACPI PM timer on the PIO bus at ACPI_PM_TIMER_PORT (a 4-byte register)."""

    def __init__(self, *, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self._clock = clock
        self._start_ns = clock()

    def counter(self) -> int:
        return (self._clock() - self._start_ns) * PM_TIMER_HZ // _NS & 0xFFFFFFFF

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size <= 0 or offset + size > ACPI_PM_TIMER_PORT_LEN:
            return open_bus(size)
        return self.counter().to_bytes(4, "little")[offset : offset + size]

    def write(self, offset: int, data: bytes) -> None:
        pass  # read-only

    def state(self) -> dict[str, Any]:
        return {"counter": self.counter()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue counting from the saved value."""
        counter = int_field(state, "counter", 0, 0xFFFFFFFF)
        self._start_ns = self._clock() - counter * _NS // PM_TIMER_HZ
