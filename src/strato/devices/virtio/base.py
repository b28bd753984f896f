"""What every virtio device shares: features, config space, activation, the guarded data plane.

A device subclasses `VirtioDeviceBase` and supplies its config bytes and a `_process(i)` that
walks queue i (usually through `_drain`). The base class is the device boundary for hostile
input: a malformed chain is returned unused and logged (rate-limited); a corrupt queue, or any
unexpected error, stops that queue and raises DEVICE_NEEDS_RESET through the transport. Nothing
escapes `process_queue()` or an event-loop callback, so the VMM keeps running.

Work per loop turn (the budget every device inherits through `_drain`): one pass serves at most
`size` chains and stops once the chains it served reach TURN_DESCRIPTORS descriptors (a refused
chain counts as `size`) or TURN_BYTES data bytes (as counted by the device), so a turn parses at
most TURN_DESCRIPTORS + `size` descriptors however fast the driver refills the ring. What is
left is resumed on the next loop turn through the device's own eventfd, after every other ready
fd had its turn. Per chain the virtqueue bounds
memory to `size` descriptors and views (see strato.virtio.queue); each device states what it
adds per request in its own docstring.
"""

from __future__ import annotations

import logging
import select
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from strato._sys.eventfd import EventFd
from strato._sys.ratelog import RateLimitedLog
from strato.virtio.device import (
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioInterrupt,
)
from strato.virtio.queue import ChainError, DescriptorChain, Queue, QueueError

if TYPE_CHECKING:
    from strato.events import EventLoop
    from strato.memory import GuestMemory

log = logging.getLogger("strato.devices.virtio")

# Most buffers one readv/writev/preadv takes (UIO_MAXIOV); a chain may have more.
IOV_MAX = 1024

# Descriptors one `_drain` pass may serve before it yields the loop (see the module docstring):
# a few ms of parsing; a well-formed ring of 256 three-descriptor requests fits in one pass.
TURN_DESCRIPTORS = 8192
# Data bytes one pass may move (devices that move data count it in `_turn_bytes`); a device
# moving more for one request splits it into pieces of at most this, one per turn.
TURN_BYTES = 4 << 20


class NotReady(Exception):
    """Raised by a chain handler that cannot serve the chain yet (e.g. no entropy): the chain
    stays in the queue and the device resumes the queue itself when it can."""


class InProgress(Exception):
    """Raised by a chain handler that keeps the chain to finish it over later turns (a large
    transfer): `_drain` stops and resumes the queue on the next turn; the device returns the
    chain itself when done."""


COMMON_FEATURES = (
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC)
)


class VirtioDeviceBase:
    """Common part of strato's virtio devices (implements the `VirtioDevice` protocol)."""

    device_type = 0
    name = "virtio"

    def __init__(self, queue_sizes: Sequence[int], features: int) -> None:
        self._queue_sizes = list(queue_sizes)
        self._features = features | COMMON_FEATURES
        self.acked_features = 0
        self.mem: GuestMemory | None = None
        self.interrupt: VirtioInterrupt | None = None
        self.queues: list[Queue] = []
        self.loop: EventLoop | None = None
        self.active = False
        self.broken: list[bool] = [False] * len(self._queue_sizes)
        self.needs_reset = False
        self.stats: dict[str, int] = {}
        self._fds: list[int] = []
        self._log = RateLimitedLog(log)
        self._resume: EventFd | None = None  # wakes the loop for queues left over budget
        self._resume_queues: set[int] = set()
        self._turn_bytes = 0  # data bytes moved in the current `_drain` pass

    # -- features and config ---------------------------------------------------------------
    @property
    def queue_max_sizes(self) -> list[int]:
        return list(self._queue_sizes)

    @property
    def device_features(self) -> int:
        return self._features

    def ack_features(self, features: int) -> None:
        self.acked_features = features & self._features

    def has_feature(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def config_bytes(self) -> bytes:
        """The device-specific configuration space (virtio 1.2, 5.x.4)."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        cfg = self.config_bytes()
        if offset < 0 or offset >= len(cfg):
            return bytes(size)
        data = cfg[offset : offset + size]
        return data + bytes(size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        # Read-only for every device here; a write is a driver bug, not worth more than a line.
        self._log.warning(
            "%s: ignored config write at %#x (%d bytes)", self.name, offset, len(data)
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def activate(
        self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        queues: list[Queue],
        loop: EventLoop,
    ) -> None:
        if len(queues) != len(self._queue_sizes):
            raise ValueError(
                f"{self.name}: {len(queues)} queues, expected {len(self._queue_sizes)}"
            )
        self.mem = mem
        self.interrupt = interrupt
        self.queues = queues
        self.loop = loop
        event_idx = self.has_feature(VIRTIO_F_RING_EVENT_IDX)
        for q in queues:
            q.event_idx = event_idx
        self.active = True
        if self._resume is not None:  # activated again without a reset: replace it
            self._unregister(self._resume.fd)
            self._resume.close()
        self._resume = EventFd()
        self._register(self._resume.fd, self._on_resume, select.EPOLLIN)
        self._on_activate()

    def _on_activate(self) -> None:
        """Start device-specific machinery (register fds on the loop, ...)."""

    def _stop(self) -> None:
        if self.active:
            self._on_reset()
        for fd in self._fds:
            if self.loop is not None:
                self.loop.unregister(fd)
        self._fds.clear()
        if self._resume is not None:
            self._resume.close()
            self._resume = None
        self._resume_queues.clear()
        self.active = False

    def close(self) -> None:
        """Release what the device holds for the VM's life (teardown; the loop may be stopped).

        Subclasses that hold more (timers, fds) extend this and call it.
        """
        if self._resume is not None:
            if self.loop is not None:
                self.loop.unregister(self._resume.fd)
            self._resume.close()
            self._resume = None

    def reset(self) -> None:
        self._stop()
        self.acked_features = 0
        self.mem = None
        self.interrupt = None
        self.queues = []
        self.broken = [False] * len(self._queue_sizes)
        self.needs_reset = False

    def _on_reset(self) -> None:
        """Stop device-specific machinery."""

    def _register(self, fd: int, callback: Callable[[int], None], events: int) -> None:
        assert self.loop is not None
        self.loop.register(fd, self._guarded_callback(callback), events)
        self._fds.append(fd)

    def _unregister(self, fd: int) -> None:
        if fd in self._fds:
            self._fds.remove(fd)
            if self.loop is not None:
                self.loop.unregister(fd)

    # -- the data plane boundary ----------------------------------------------------------
    def process_queue(self, queue_index: int) -> None:
        if not self.active or not 0 <= queue_index < len(self.queues):
            return
        if self.broken[queue_index]:
            return
        try:
            self._process(queue_index)
        except QueueError as e:
            self._fail_queue(queue_index, str(e))
        except Exception as e:  # a bug or a host failure: contain it to this device
            self._log.error("%s: queue %d failed: %r", self.name, queue_index, e, exc_info=True)
            self._fail_queue(queue_index, repr(e))

    def _process(self, queue_index: int) -> None:
        raise NotImplementedError

    def _guarded_callback(self, callback: Callable[[int], None]) -> Callable[[int], None]:
        def run(mask: int) -> None:
            if not self.active:
                return
            try:
                callback(mask)
            except QueueError as e:
                self._fail_device(str(e))
            except Exception as e:
                self._log.error("%s: event handler failed: %r", self.name, e, exc_info=True)
                self._fail_device(repr(e))

        return run

    def _fail_queue(self, queue_index: int, reason: str) -> None:
        self._log.error(
            "%s: queue %d stopped, device needs reset: %s", self.name, queue_index, reason
        )
        self.broken[queue_index] = True
        self._set_needs_reset()

    def _fail_device(self, reason: str) -> None:
        self._log.error("%s: device needs reset: %s", self.name, reason)
        self.broken = [True] * len(self.broken)
        self._set_needs_reset()

    def _set_needs_reset(self) -> None:
        if not self.needs_reset:
            self.needs_reset = True
            if self.interrupt is not None:
                self.interrupt.set_needs_reset()

    def _drain(
        self,
        queue_index: int,
        handle: Callable[[DescriptorChain], int],
        admit: Callable[[DescriptorChain], bool] | None = None,
    ) -> int:
        """Serve the available chains of a queue, within one turn's budget; `handle` returns
        the bytes written to the guest, or raises NotReady to leave the chain queued, or
        InProgress when it keeps the chain to finish on later turns.

        `admit` (a rate limiter) may refuse a chain for now: it stays in the queue and the
        caller resumes the queue later. Uses the disable / pop-all / re-enable dance so a
        buffer the driver adds while we work is never missed; past the budget the queue is
        resumed on the next loop turn instead. Raises the queue's interrupt if the driver
        wants one.
        """
        q = self.queues[queue_index]
        mem = self.mem
        assert mem is not None
        done = 0
        budget = TURN_DESCRIPTORS
        max_chains = q.size
        self._turn_bytes = 0
        stop = False
        while not stop:
            q.disable_notification(mem)
            while (chain := q.pop(mem)) is not None:
                if budget <= 0 or done >= max_chains or self._turn_bytes >= TURN_BYTES:
                    q.undo_pop()  # over this turn's budget: the next turn serves it
                    self._resume_later(queue_index)
                    stop = True
                    break
                if admit is not None and not admit(chain):
                    q.undo_pop()  # it waits where it is; the caller resumes the queue
                    stop = True
                    break
                try:
                    written = handle(chain)
                except NotReady:
                    q.undo_pop()
                    stop = True
                    break
                except InProgress:
                    self._resume_later(queue_index)
                    stop = True
                    break
                except ChainError as e:
                    self._log.warning("%s: queue %d: bad chain: %s", self.name, queue_index, e)
                    written = 0
                q.add_used(mem, chain.head_index, written)
                done += 1
                budget -= chain.cost
            if not stop and not q.enable_notification(mem):
                break
        if done:
            self._notify(queue_index)
        return done

    def _resume_later(self, queue_index: int) -> None:
        """Serve the rest of this queue on the loop's next turn."""
        self._resume_queues.add(queue_index)
        if self._resume is not None:
            self._resume.write(1)

    def _on_resume(self, mask: int) -> None:
        assert self._resume is not None
        self._resume.read()
        queues = sorted(self._resume_queues)
        self._resume_queues.clear()
        for i in queues:
            self.process_queue(i)

    def _notify(self, queue_index: int) -> None:
        mem = self.mem
        assert mem is not None and self.interrupt is not None
        if self.queues[queue_index].needs_notification(mem):
            self.interrupt.signal_used_queue(queue_index)

    # -- counters and snapshots -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return dict(self.stats)

    def state(self) -> dict[str, Any]:
        return {
            "acked_features": self.acked_features,
            "counters": dict(self.stats),
            "broken": list(self.broken),
            "needs_reset": self.needs_reset,
        }

    def restore(self, state: dict[str, Any]) -> None:
        features = int(state["acked_features"])
        if features & ~self._features:
            raise ValueError(f"{self.name}: snapshot has features {features:#x} we do not offer")
        self.acked_features = features
        for k, v in dict(state.get("counters", {})).items():
            if k in self.stats:
                self.stats[k] = int(v)
        broken = [bool(b) for b in state.get("broken", [])]
        if len(broken) == len(self._queue_sizes):
            self.broken = broken
        self.needs_reset = bool(state.get("needs_reset", False))
