"""virtio-net (virtio 1.2, 5.1) on a tap, one queue pair.

RX: the tap fd sits on the event loop; when it is readable, each frame is read with readv
straight into the writable buffers of one rx chain (the 12-byte virtio_net_hdr_v1 comes from
the tap itself). When the guest has no rx buffers left, the tap is masked on the loop (frames
wait in the tap's queue, nothing spins and nothing is dropped here) until the guest notifies
the rx queue. TX: each tx chain's readable buffers go to the tap with one writev.

Rate limiters (one per direction, Cloud Hypervisor's semantics) take one op and the frame's
bytes per frame; once one runs dry the next frames wait (tx in the ring, rx in the tap) until
its timer fires. A tap whose interface is deleted under us reports EPOLLERR forever: it leaves
the event loop, and from then on tx frames are dropped (counted) and nothing is received.
"""

from __future__ import annotations

import os
import select
import struct
from typing import Any

from strato.devices.backends.tap import (
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HDR_SIZE,
    Tap,
)
from strato.devices.rate_limiter import RateLimiter, TokenType
from strato.devices.virtio.base import IOV_MAX, VirtioDeviceBase
from strato.virtio.device import TYPE_NET
from strato.virtio.queue import ChainError

# Feature bits (5.1.3)
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16

VIRTIO_NET_S_LINK_UP = 1

RX_QUEUE = 0
TX_QUEUE = 1
RX_BURST = 256  # frames per wakeup before yielding to the other fds on the loop

_CONFIG = struct.Struct("<6sHHH")  # mac, status, max_virtqueue_pairs, mtu
_NUM_BUFFERS_OFFSET = 10


def parse_mac(mac: str | bytes) -> bytes:
    if isinstance(mac, bytes):
        raw = mac
    else:
        parts = mac.split(":")
        if len(parts) != 6:
            raise ValueError(f"MAC address {mac!r}: expected six hex bytes separated by ':'")
        raw = bytes(int(p, 16) for p in parts)
    if len(raw) != 6:
        raise ValueError(f"MAC address {mac!r}: expected 6 bytes")
    return raw


def random_mac() -> bytes:
    """A random locally administered unicast address."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFE) | 0x02
    return bytes(raw)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


class Net(VirtioDeviceBase):
    device_type = TYPE_NET
    name = "virtio-net"

    def __init__(
        self,
        tap: Tap,
        *,
        mac: str | bytes | None = None,
        queue_size: int = 256,
        mtu: int | None = None,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        self.tap = tap
        self.mac = parse_mac(mac) if mac is not None else random_mac()
        self.mtu = mtu
        features = (
            (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_ECN)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_ECN)
            | (1 << VIRTIO_NET_F_MAC)
            | (1 << VIRTIO_NET_F_STATUS)
        )
        if tap.supports_ufo:
            features |= (1 << VIRTIO_NET_F_GUEST_UFO) | (1 << VIRTIO_NET_F_HOST_UFO)
        if mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        super().__init__([queue_size, queue_size], features)
        self.rx_paused = False
        self.tx_blocked = False
        # Cloud Hypervisor's net rate limiting: one limiter per direction, one op per frame
        # plus its bytes; the frame that empties the bucket still goes, the next ones wait.
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.rx_throttled = False
        self.tap_failed = False
        self.stats = {
            "rx_bytes": 0,
            "rx_frames": 0,
            "tx_bytes": 0,
            "tx_frames": 0,
            "tx_dropped": 0,
            "rx_dropped": 0,
        }

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, 1, self.mtu or 0)

    def tap_offload(self) -> int:
        """TUN_F_* flags that match the receive offloads the driver accepted."""
        if not self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            return 0
        flags = TUN_F_CSUM
        for bit, tun in (
            (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
            (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
            (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
            (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
        ):
            if self.has_feature(bit):
                flags |= tun
        return flags

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_activate(self) -> None:
        self.tap.set_offload(self.tap_offload())
        self.rx_paused = False
        self.tx_blocked = False
        self.rx_throttled = False
        if not self.tap_failed:
            self._register(self.tap.fd, self._on_tap, select.EPOLLIN)
        for rl, on_timer in (
            (self.rx_rate_limiter, self._on_rx_rate_timer),
            (self.tx_rate_limiter, self._on_tx_rate_timer),
        ):
            if rl is not None and (fd := rl.fileno()) is not None:
                self._register(fd, on_timer, select.EPOLLIN)

    def _on_reset(self) -> None:
        self.rx_paused = False
        self.tx_blocked = False
        self.rx_throttled = False
        for rl in (self.rx_rate_limiter, self.tx_rate_limiter):
            if rl is not None:
                rl.unblock()

    def close(self) -> None:
        """Release the rate limiters' timers (the tap is closed by its owner)."""
        for rl in (self.rx_rate_limiter, self.tx_rate_limiter):
            if rl is not None:
                rl.close()

    def _watch_tap(self) -> None:
        assert self.loop is not None
        if self.tap_failed:
            return  # no longer on the loop
        rx_off = self.rx_paused or self.rx_throttled
        events = (0 if rx_off else select.EPOLLIN) | (select.EPOLLOUT if self.tx_blocked else 0)
        self.loop.modify(self.tap.fd, events)

    def _on_rx_rate_timer(self, mask: int) -> None:
        assert self.rx_rate_limiter is not None
        self.rx_rate_limiter.event_handler()
        if self.rx_throttled:
            self.rx_throttled = False
            self._watch_tap()
            if not self.rx_paused and not self.broken[RX_QUEUE]:
                self._rx()

    def _on_tx_rate_timer(self, mask: int) -> None:
        assert self.tx_rate_limiter is not None
        self.tx_rate_limiter.event_handler()
        if not self.tx_blocked and not self.broken[TX_QUEUE]:
            self._tx()

    def _tap_gone(self) -> None:
        """The tap reports an error condition (e.g. its interface was deleted under us).

        epoll reports EPOLLERR whatever we ask for, so the fd must leave the loop or the loop
        spins. Transmits then fail (counted in tx_dropped), nothing is received; the guest and
        the other devices carry on.
        """
        self.tap_failed = True
        self._unregister(self.tap.fd)
        self._log.error(
            "%s: tap %s failed (interface deleted?); its frames are dropped from now on",
            self.name,
            self.tap.name,
        )

    def _on_tap(self, mask: int) -> None:
        if mask & (select.EPOLLERR | select.EPOLLHUP) and not mask & (
            select.EPOLLIN | select.EPOLLOUT
        ):
            self._tap_gone()
            return
        if mask & select.EPOLLOUT and self.tx_blocked:
            self.tx_blocked = False
            self._watch_tap()
            if not self.broken[TX_QUEUE]:
                self._tx()
        if (
            mask & select.EPOLLIN
            and not self.rx_paused
            and not self.rx_throttled
            and not self.broken[RX_QUEUE]
        ):
            self._rx()

    def _process(self, queue_index: int) -> None:
        if queue_index == RX_QUEUE:
            # The guest added rx buffers: take frames again if we had stopped.
            if self.rx_paused:
                self.rx_paused = False
                self._watch_tap()
            self._rx()
        elif queue_index == TX_QUEUE:
            if not self.tx_blocked:
                self._tx()

    # -- receive -----------------------------------------------------------------------------
    def _rx(self) -> None:
        if self.tap_failed:
            return  # nothing will ever arrive; the guest's buffers stay posted
        q = self.queues[RX_QUEUE]
        mem = self.mem
        assert mem is not None
        rl = self.rx_rate_limiter
        frames = 0
        try:
            while frames < RX_BURST:
                if rl is not None and rl.blocked:
                    self.rx_throttled = True  # frames wait in the tap until the timer
                    self._watch_tap()
                    break
                chain = q.pop(mem)
                if chain is None:
                    if q.enable_notification(mem):
                        continue  # buffers arrived while we looked
                    self.rx_paused = True  # wait for the guest's rx notify
                    self._watch_tap()
                    break
                try:
                    views = chain.writable_views()
                    if sum(map(len, views)) < VNET_HDR_SIZE:
                        raise ChainError("rx buffer smaller than the virtio-net header")
                    if len(views) > IOV_MAX:
                        # readv would fail with EINVAL and leave the frame queued: we would
                        # retry the same chain on the same frame forever.
                        raise ChainError(f"rx chain has {len(views)} buffers (> {IOV_MAX})")
                except ChainError as e:
                    self._log.warning("%s: bad rx chain: %s", self.name, e)
                    q.add_used(mem, chain.head_index, 0)
                    frames += 1
                    continue
                try:
                    n = self.tap.read_into(views)
                except BlockingIOError:
                    q.undo_pop()
                    break
                except OSError as e:
                    # EFAULT: the frame did not fit the buffers; the tap has dropped it.
                    q.undo_pop()
                    self.stats["rx_dropped"] += 1
                    self._log.warning("%s: tap %s read: %s", self.name, self.tap.name, e)
                    frames += 1
                    continue
                _set_num_buffers(views)
                q.add_used(mem, chain.head_index, n)
                if rl is not None and rl.consume(1, TokenType.OPS):
                    rl.consume(n, TokenType.BYTES)
                frames += 1
                self.stats["rx_frames"] += 1
                self.stats["rx_bytes"] += max(0, n - VNET_HDR_SIZE)
        finally:
            if frames:
                self._notify(RX_QUEUE)

    # -- transmit ----------------------------------------------------------------------------
    def _tx(self) -> None:
        q = self.queues[TX_QUEUE]
        mem = self.mem
        assert mem is not None
        rl = self.tx_rate_limiter
        sent = 0
        try:
            while True:
                q.disable_notification(mem)
                while (chain := q.pop(mem)) is not None:
                    if rl is not None and rl.blocked:
                        q.undo_pop()  # waits in the ring; the limiter's timer resumes us
                        return
                    try:
                        views = chain.readable_views()
                        size = sum(map(len, views))
                        if size < VNET_HDR_SIZE:
                            raise ChainError("tx frame shorter than the virtio-net header")
                    except ChainError as e:
                        self._log.warning("%s: bad tx chain: %s", self.name, e)
                        self.stats["tx_dropped"] += 1
                        q.add_used(mem, chain.head_index, 0)
                        sent += 1
                        continue
                    try:
                        self.tap.write_from(views)
                        self.stats["tx_frames"] += 1
                        self.stats["tx_bytes"] += size - VNET_HDR_SIZE
                        if rl is not None and rl.consume(1, TokenType.OPS):
                            rl.consume(size, TokenType.BYTES)
                    except BlockingIOError:
                        q.undo_pop()  # the tap is full: retry when it is writable
                        self.tx_blocked = True
                        self._watch_tap()
                        return
                    except OSError as e:  # e.g. EINVAL for a bad GSO header: drop the frame
                        self._log.warning("%s: tap %s write: %s", self.name, self.tap.name, e)
                        self.stats["tx_dropped"] += 1
                    q.add_used(mem, chain.head_index, 0)
                    sent += 1
                if not q.enable_notification(mem):
                    break
        finally:
            if sent:
                self._notify(TX_QUEUE)

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s = super().state()
        s["mac"] = format_mac(self.mac)
        for key, rl in (
            ("rx_rate_limiter", self.rx_rate_limiter),
            ("tx_rate_limiter", self.tx_rate_limiter),
        ):
            if rl is not None:
                s[key] = rl.state()
        return s

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        if "mac" in state:
            self.mac = parse_mac(str(state["mac"]))
        for key, rl in (
            ("rx_rate_limiter", self.rx_rate_limiter),
            ("tx_rate_limiter", self.tx_rate_limiter),
        ):
            if rl is not None and state.get(key) is not None:
                rl.restore(state[key])


def _set_num_buffers(views: list[memoryview]) -> None:
    """num_buffers = 1 (5.1.6.4: required without MRG_RXBUF; the tap leaves it alone)."""
    first = views[0] if views else None
    if first is not None and len(first) > _NUM_BUFFERS_OFFSET + 1:  # the usual: one buffer
        first[_NUM_BUFFERS_OFFSET] = 1
        first[_NUM_BUFFERS_OFFSET + 1] = 0
        return
    for offset, value in ((_NUM_BUFFERS_OFFSET, 1), (_NUM_BUFFERS_OFFSET + 1, 0)):
        pos = offset  # the u16 may straddle two buffers
        for v in views:
            if pos < len(v):
                v[pos] = value
                break
            pos -= len(v)
