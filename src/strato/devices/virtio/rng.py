"""virtio-rng / entropy device (virtio 1.2, 5.4): fills the driver's buffers from a source file."""

from __future__ import annotations

import os
from typing import Any

from strato.devices.virtio.base import IOV_MAX, VirtioDeviceBase
from strato.virtio.device import TYPE_RNG
from strato.virtio.queue import DescriptorChain

MAX_REQUEST = 64 * 1024  # bytes per request: bounds the time one request holds the loop


class Rng(VirtioDeviceBase):
    device_type = TYPE_RNG
    name = "virtio-rng"

    def __init__(self, source: str = "/dev/urandom", queue_size: int = 256) -> None:
        super().__init__([queue_size], 0)
        self.source = source
        try:
            self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise OSError(e.errno, f"rng source {source}: {e.strerror}") from None
        self.stats = {"read_bytes": 0, "read_ops": 0}

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _process(self, queue_index: int) -> None:
        self._drain(queue_index, self._fill)

    def _fill(self, chain: DescriptorChain) -> int:
        writer = chain.writer()
        # readv takes at most IOV_MAX buffers: fill those, leave the rest of a longer chain.
        views = writer.take(min(writer.remaining, MAX_REQUEST))[:IOV_MAX]
        if not views:
            return 0
        try:
            n = os.readv(self._fd, views)
        except BlockingIOError:
            n = 0
        self.stats["read_bytes"] += n
        self.stats["read_ops"] += 1
        return n

    def state(self) -> dict[str, Any]:
        s = super().state()
        s["source"] = self.source
        return s
