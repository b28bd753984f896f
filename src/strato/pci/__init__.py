"""PCI: configuration space, the root bus (0xCF8/0xCFC and ECAM), BAR allocation, MSI-X."""

from strato.pci.allocator import AddressAllocator, AllocationError, PciAllocator
from strato.pci.bus import (
    PciConfigIo,
    PciConfigMmio,
    PciHostBridge,
    PciRoot,
    intx_gsi,
)
from strato.pci.configuration import (
    BarKind,
    BarMove,
    BarSpec,
    PciConfigError,
    PciConfiguration,
)
from strato.pci.device import BarRegion, BarWindow, PciDevice
from strato.pci.msix import MsixTable, MsixVectorSink

__all__ = [
    "AddressAllocator",
    "AllocationError",
    "BarKind",
    "BarMove",
    "BarRegion",
    "BarSpec",
    "BarWindow",
    "MsixTable",
    "MsixVectorSink",
    "PciAllocator",
    "PciConfigError",
    "PciConfigIo",
    "PciConfigMmio",
    "PciConfiguration",
    "PciDevice",
    "PciHostBridge",
    "PciRoot",
    "intx_gsi",
]
