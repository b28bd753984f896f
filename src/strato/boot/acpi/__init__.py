"""ACPI tables for strato's x86_64 machine: RSDP, XSDT, FADT (hardware-reduced), MADT, MCFG and
a DSDT written in AML (`aml.py`). Import by full path: `from strato.boot.acpi import ...`."""

from strato.boot.acpi.builder import (
    AcpiError,
    AcpiTables,
    build_acpi_tables,
    build_tables,
    default_slot_gsis,
    write_tables,
)

__all__ = [
    "AcpiError",
    "AcpiTables",
    "build_acpi_tables",
    "build_tables",
    "default_slot_gsis",
    "write_tables",
]
