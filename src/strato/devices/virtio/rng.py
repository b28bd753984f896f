"""virtio-rng / entropy device (virtio 1.2, 5.4): fills the driver's buffers from a source file.

The source is opened non-blocking and never blocks the event loop: when it has no bytes ready
(a starved /dev/random, an empty FIFO) the chain stays in its queue and the source's fd is
registered on the loop; the queue is served again once the fd is readable.

Budget per request: no host buffer at all (readv goes straight into guest memory), at most
MAX_REQUEST bytes and IOV_MAX buffers per request, so one request holds the loop for one
readv of at most 64 KiB; per turn the `_drain` budget of the base class applies.
"""

from __future__ import annotations

import os
import select
from typing import Any

from strato.devices.virtio.base import IOV_MAX, NotReady, VirtioDeviceBase
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
            self._fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise OSError(e.errno, f"rng source {source}: {e.strerror}") from None
        self._waiting = False  # the source fd is on the loop: a chain waits for entropy
        self.stats = {"read_bytes": 0, "read_ops": 0}

    def close(self) -> None:
        super().close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _process(self, queue_index: int) -> None:
        if not self._waiting:  # else the source's readiness resumes the queue
            self._drain(queue_index, self._fill)

    def _on_reset(self) -> None:
        self._waiting = False  # _stop unregisters the fd with the others

    def _fill(self, chain: DescriptorChain) -> int:
        writer = chain.writer()
        # readv takes at most IOV_MAX buffers: fill those, leave the rest of a longer chain.
        views = writer.take(min(writer.remaining, MAX_REQUEST))[:IOV_MAX]
        if not views:
            return 0
        try:
            n = os.readv(self._fd, views)
        except BlockingIOError:
            self._wait_for_source()
            raise NotReady from None
        self.stats["read_bytes"] += n
        self.stats["read_ops"] += 1
        return n

    def _wait_for_source(self) -> None:
        if not self._waiting:
            self._register(self._fd, self._on_source_ready, select.EPOLLIN)
            self._waiting = True

    def _on_source_ready(self, mask: int) -> None:
        self._unregister(self._fd)
        self._waiting = False
        self.process_queue(0)

    def state(self) -> dict[str, Any]:
        s = super().state()
        s["source"] = self.source
        return s
