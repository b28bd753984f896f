"""Addresses and values the ACPI tables share with the devices that implement them.

They follow Cloud Hypervisor (vmm/src/device_manager.rs, devices/src/acpi.rs) so that the
power-management devices in `strato.devices.legacy` (power.py, ged.py) and these tables agree
without importing each other.
"""

from __future__ import annotations

# OEM identification in every table header
OEM_ID = b"STRATO"
OEM_TABLE_ID_PREFIX = b"SV"  # + 4-character signature, e.g. b"SVFACP  " padded to 8
OEM_REVISION = 1
CREATOR_ID = b"STRA"
CREATOR_REVISION = 1
HYPERVISOR_VENDOR = b"STRATOVM"  # FADT "Hypervisor Vendor Identity"

# AcpiShutdownDevice: one byte at I/O port 0x600 serves as the FADT's sleep control register,
# sleep status register and reset register (8-bit System I/O GAS each).
ACPI_SHUTDOWN_PORT = 0x600
ACPI_SHUTDOWN_PORT_LEN = 4
SLEEP_CONTROL_REG_PORT = ACPI_SHUTDOWN_PORT
SLEEP_STATUS_REG_PORT = ACPI_SHUTDOWN_PORT
RESET_REG_PORT = ACPI_SHUTDOWN_PORT
RESET_VALUE = 0x01
# Writing SLP_TYP (bits 2-4) = the \_S5 value with SLP_EN (bit 5) powers off: 5 << 2 | 1 << 5.
S5_SLEEP_TYPE = 5
SLP_TYP_SHIFT = 2
SLP_EN = 1 << 5
S5_SHUTDOWN_VALUE = S5_SLEEP_TYPE << SLP_TYP_SHIFT | SLP_EN  # 0x34

# ACPI PM timer (X_PM_TMR_BLK): a 32-bit counter at 3.579545 MHz on I/O port 0x608.
ACPI_PM_TIMER_PORT = 0x608
ACPI_PM_TIMER_PORT_LEN = 4

# Generic Event Device (ACPI0013): a one-byte MMIO register whose read returns and clears the
# pending event bits, and an edge-triggered, active-high interrupt. Cloud Hypervisor allocates
# both dynamically; strato fixes them here. The register sits in the free space between the
# ECAM (0xE800_0000 + 256 MiB) and the IOAPIC, outside the PCI windows.
GED_MMIO_ADDRESS = 0xFE00_0000
GED_MMIO_SIZE = 1
GED_IRQ = 5
GED_CPU_DEVICES_CHANGED = 1 << 0
GED_MEMORY_DEVICES_CHANGED = 1 << 1
GED_PCI_DEVICES_CHANGED = 1 << 2
GED_POWER_BUTTON = 1 << 3

# COM1
COM1_PORT = 0x3F8
COM1_PORT_LEN = 8
COM1_IRQ = 4

# PCI INTx: INTA# of slot s is routed to GSI PCI_INTX_GSI_BASE + s % PCI_INTX_GSI_COUNT
# (level, active low), the same rule as strato.pci.bus.intx_gsi.
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSI_COUNT = 8

# PCI config access ports (reserved in the root bridge's _CRS)
PCI_CONFIG_IO_PORT = 0xCF8
PCI_CONFIG_IO_LEN = 8

# The ECAM area one bus needs (32 devices x 8 functions x 4 KiB)
ECAM_BYTES_PER_BUS = 1 << 20
