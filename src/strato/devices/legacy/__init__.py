"""Legacy x86 platform devices as state machines on the PIO/MMIO buses.

Each device is a `BusDevice` (`read(offset, size) -> bytes`, `write(offset, data)`) that raises
interrupts through a `Trigger` and reports VM-level requests (reset, power off) through
callbacks, so it runs in a unit test without KVM. Each has `state()` / `restore()`.

| device          | bus  | base   | length | irq |
|-----------------|------|--------|--------|-----|
| Serial (COM1)   | PIO  | 0x3f8  | 8      | 4   |
| I8042           | PIO  | 0x60   | 5      | 1   |
| CmosRtc         | PIO  | 0x70   | 2      | -   |
| DebugPort       | PIO  | 0x80   | 1      | -   |
| AcpiShutdown    | PIO  | 0x600  | 4      | -   |
| AcpiPmTimer     | PIO  | 0x608  | 4      | -   |
| AcpiGed         | MMIO | (VMM)  | 1      | (VMM) |
"""

from strato.devices.legacy.debug_port import DEBUG_PORT, DEBUG_PORT_LEN, DebugPort, DebugPortEvent
from strato.devices.legacy.ged import GED_POWER_BUTTON, GED_SIZE, AcpiGed
from strato.devices.legacy.i8042 import I8042, I8042_PORT, I8042_PORT_LEN
from strato.devices.legacy.power import (
    ACPI_PM_TIMER_PORT,
    ACPI_PM_TIMER_PORT_LEN,
    ACPI_SHUTDOWN_PORT,
    ACPI_SHUTDOWN_PORT_LEN,
    AcpiPmTimer,
    AcpiShutdown,
)
from strato.devices.legacy.rtc import RTC_PORT, RTC_PORT_LEN, CmosRtc
from strato.devices.legacy.serial import COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN, Serial
from strato.devices.legacy.serial_output import (
    CallbackSink,
    ConsoleLog,
    FileSink,
    NullSink,
    SerialOutput,
    StreamSink,
    TtySink,
)

__all__ = [
    "ACPI_PM_TIMER_PORT",
    "ACPI_PM_TIMER_PORT_LEN",
    "ACPI_SHUTDOWN_PORT",
    "ACPI_SHUTDOWN_PORT_LEN",
    "COM1_IRQ",
    "COM1_PORT",
    "DEBUG_PORT",
    "DEBUG_PORT_LEN",
    "GED_POWER_BUTTON",
    "GED_SIZE",
    "I8042",
    "I8042_PORT",
    "I8042_PORT_LEN",
    "RTC_PORT",
    "RTC_PORT_LEN",
    "SERIAL_PORT_LEN",
    "AcpiGed",
    "AcpiPmTimer",
    "AcpiShutdown",
    "CallbackSink",
    "CmosRtc",
    "ConsoleLog",
    "DebugPort",
    "DebugPortEvent",
    "FileSink",
    "NullSink",
    "Serial",
    "SerialOutput",
    "StreamSink",
    "TtySink",
]
