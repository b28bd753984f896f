"""The contract between a virtio device and its transport (PCI or MMIO).

The transport owns feature negotiation registers, the status state machine, queue
configuration and notifications (one ioeventfd per queue, dispatched on the event loop); the
device owns its configuration space and its data plane. The transport calls `activate()` once
the driver sets DRIVER_OK, `process_queue()` when a queue is notified, and `reset()` when the
driver writes status 0.

Every device states a budget in its docstring and keeps it whatever the driver writes: the
host memory one request may take (a constant: bounce and scratch buffers of fixed size, reused,
looped over; never a copy sized by the guest's lengths) and the work one call of
`process_queue()` or one event-loop callback may do (bounded by the queue size and a fixed
number of bytes; what is left waits for a later loop turn). tests/budgets measures both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from strato.events import EventLoop
    from strato.memory import GuestMemory
    from strato.virtio.queue import Queue

# Device status bits (virtio 1.2, 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Device-independent feature bits
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# Device types (virtio 1.2, 5)
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_CONSOLE = 3
TYPE_RNG = 4
TYPE_BALLOON = 5
TYPE_VSOCK = 19
TYPE_FS = 26
TYPE_PMEM = 27


class VirtioInterrupt(Protocol):
    """How a device tells the driver something happened; the transport implements it."""

    def signal_used_queue(self, queue_index: int) -> None: ...

    def signal_config_change(self) -> None: ...

    def set_needs_reset(self) -> None:
        """The device hit a driver error it cannot recover from (virtio 1.2, 2.1.1)."""
        ...


class VirtioDevice(Protocol):
    device_type: int

    @property
    def queue_max_sizes(self) -> list[int]:
        """Maximum size of each queue; the number of queues is len() of this."""
        ...

    @property
    def device_features(self) -> int:
        """Feature bits the device offers (VERSION_1, EVENT_IDX, INDIRECT_DESC included)."""
        ...

    def ack_features(self, features: int) -> None:
        """The features the driver accepted (a subset of device_features)."""
        ...

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(
        self,
        mem: GuestMemory,
        interrupt: VirtioInterrupt,
        queues: list[Queue],
        loop: EventLoop,
    ) -> None:
        """Start the data plane. Called on the event-loop-owning thread before any notify."""
        ...

    def process_queue(self, queue_index: int) -> None:
        """The driver notified queue `queue_index`. Runs on the event loop thread."""
        ...

    def reset(self) -> None:
        """Stop the data plane and forget negotiated state; the device can be activated again."""
        ...

    def counters(self) -> dict[str, int]:
        """Cumulative I/O counters for `vm.counters` (read_bytes, write_ops, rx_frames, ...)."""
        ...

    def state(self) -> dict[str, Any]: ...

    def restore(self, state: dict[str, Any]) -> None: ...
