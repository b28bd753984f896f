"""virtio devices: block, net, rng, console (each a `strato.virtio.device.VirtioDevice`)."""

from strato.devices.virtio.base import VirtioDeviceBase
from strato.devices.virtio.block import Block
from strato.devices.virtio.console import Console
from strato.devices.virtio.net import Net
from strato.devices.virtio.rng import Rng

__all__ = ["Block", "Console", "Net", "Rng", "VirtioDeviceBase"]
