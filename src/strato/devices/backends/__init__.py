"""Host backends for devices: raw disk images and tap interfaces."""

from strato.devices.backends.raw import DiskError, RawFile
from strato.devices.backends.tap import Tap, TapError

__all__ = ["DiskError", "RawFile", "Tap", "TapError"]
