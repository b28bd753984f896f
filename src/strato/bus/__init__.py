"""Port I/O and MMIO buses: address ranges mapped to devices, with overlap checks."""

from strato.bus.bus import Bus, BusDevice, BusError

__all__ = ["Bus", "BusDevice", "BusError"]
