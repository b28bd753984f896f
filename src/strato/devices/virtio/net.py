"""virtio-net (virtio 1.2, 5.1) on a tap, with one or more queue pairs.

RX: each active queue pair's tap fd sits on the event loop; when it is readable, each frame is
read with readv straight into the writable buffers of one chain of that pair's rx queue (the
12-byte virtio_net_hdr_v1 comes from the tap itself). When the guest has no rx buffers left in
a pair, that pair's fd is masked on the loop (frames wait in the tap's queue, nothing spins and
nothing is dropped here) until the guest notifies the rx queue. TX: each tx chain's readable
buffers go to the pair's own tap fd with one writev.

Multiqueue (Cloud Hypervisor's `num_queues` = 2 x queue pairs): with more than one pair the tap
is opened once per pair with IFF_MULTI_QUEUE, and the device offers VIRTIO_NET_F_MQ with the
control queue (VIRTIO_NET_F_CTRL_VQ; `max_virtqueue_pairs` in the config space). Queues are
rx0, tx0, rx1, tx1, ..., then the control queue (index 2 x pairs with MQ negotiated, 2 without,
5.1.2). After activation only pair 0 is used; VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n makes pairs
0..n-1 active. The tap queues of the other pairs are detached (the kernel steers no frames to
them) and their fds are off the loop: those pairs stay idle, a kick on them is ignored and
their buffers wait until the pair is active again. The control queue answers VIRTIO_NET_OK or
VIRTIO_NET_ERR; every command other than MQ_VQ_PAIRS_SET (classes RX, MAC, VLAN, ANNOUNCE,
GUEST_OFFLOADS, MQ RSS/HASH: none of their features is offered) is answered ERR. With one pair
the device is as before: two queues, no control queue.

Rate limiters (one per direction for the whole device, Cloud Hypervisor's semantics) take one op
and the frame's bytes per frame, whatever the pair; once one runs dry the next frames of every
pair wait (tx in the ring, rx in the tap) until its timer fires. Counters are per device. A tap
whose interface is deleted under us reports EPOLLERR forever: its fds leave the event loop, and
from then on tx frames are dropped (counted) and nothing is received.

Hostile-guest budget (what one request or one kick can cost the host, whatever the guest
declares):
- memory per request: nothing in proportion to the guest's lengths. A tx frame longer than
  `MAX_TX_FRAME` is dropped before its data is touched; a frame of more than IOV_MAX buffers is
  gathered into the tap's one reusable scratch buffer of `MAX_TX_FRAME` bytes. An rx frame is
  read straight into guest buffers plus a fixed `_RX_TAIL`-byte tail that only detects
  truncation. A control request copies at most `CTRL_MAX_REQUEST` + 1 bytes of its readable
  part (a longer one is answered ERR) and writes the one-byte ack. The per-chain list of buffer
  views is the virtqueue's (one per descriptor).
- loop time per kick: at most `TX_BURST` tx frames (each one writev of at most `MAX_TX_FRAME`
  bytes) or `RX_BURST` rx frames of one pair, and chains of `BUFFERS_PER_KICK` descriptors in
  all (plus the last chain, which the virtqueue bounds); more work waits for the next loop
  iteration (tx through a self-wake eventfd, rx through the tap staying readable), so other
  devices get their turn. A rate limiter's timer serves each active pair once (the same bound
  per pair). A control queue kick serves at most `size` requests within the base class's
  per-turn descriptor budget (the rest on the next turn); a VQ_PAIRS_SET costs one TUNSETQUEUE
  and one epoll change per pair whose state changes (at most `max_pairs`).
An rx frame longer than the guest's buffers is dropped and counted (`rx_truncated`,
`rx_dropped`), never handed over cut short. A malformed control request (too short, too long,
no room for the ack, an out-of-range pair count) is answered ERR, or returned unused when it
has no writable byte; it never raises. Feature combinations the spec forbids (5.1.3.1) are
refused at FEATURES_OK (`feature_conflict`).
"""

from __future__ import annotations

import os
import select
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from strato._sys import EventFd
from strato.devices.backends.tap import (
    MAX_FRAME,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_TSO_ECN,
    TUN_F_UFO,
    VNET_HDR_SIZE,
    Tap,
    TapError,
)
from strato.devices.rate_limiter import RateLimiter, TokenType
from strato.devices.virtio.base import IOV_MAX, VirtioDeviceBase
from strato.virtio.device import TYPE_NET
from strato.virtio.queue import ChainError, DescriptorChain

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
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_MQ = 22

VIRTIO_NET_S_LINK_UP = 1

# The control queue (5.1.6.5): class, command, data (device-readable), then a one-byte ack.
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1
VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000
# The longest control request read: class + command + the largest data of a command we serve
# (VQ_PAIRS_SET's u16), with room to spare; anything longer is answered ERR.
CTRL_MAX_REQUEST = 64

RX_QUEUE = 0  # pair 0's queues; pair k uses 2k and 2k + 1
TX_QUEUE = 1
RX_BURST = 256  # frames per wakeup before yielding to the other fds on the loop
TX_BURST = 256  # frames per kick; the rest go on the next loop iteration
# Guest buffers (descriptors) handled per kick or wakeup, whatever the frame count: a chain
# costs loop time in proportion to its descriptors (parsing them, and the IOV_MAX gather).
BUFFERS_PER_KICK = 2048
MAX_TX_FRAME = VNET_HDR_SIZE + MAX_FRAME  # the longest tx chain we send (header included)
_RX_TAIL = 64  # bytes read past the guest's buffers: any at all means the frame was cut

# 5.1.3.1: a feature the driver accepts needs (one of) these accepted too.
FEATURE_NEEDS: dict[int, tuple[int, ...]] = {
    VIRTIO_NET_F_GUEST_TSO4: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_TSO6: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_GUEST_ECN: (VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6),
    VIRTIO_NET_F_GUEST_UFO: (VIRTIO_NET_F_GUEST_CSUM,),
    VIRTIO_NET_F_HOST_TSO4: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_TSO6: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_HOST_ECN: (VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6),
    VIRTIO_NET_F_HOST_UFO: (VIRTIO_NET_F_CSUM,),
    VIRTIO_NET_F_MQ: (VIRTIO_NET_F_CTRL_VQ,),
}

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


@dataclass(eq=False)
class QueuePair:
    """One rx/tx queue pair and the tap fd (queue) that carries its frames."""

    index: int
    tap: Tap
    rx_paused: bool = False  # no rx buffers: the fd is masked until the guest adds some
    tx_blocked: bool = False  # the tap was full: tx waits for EPOLLOUT
    failed: bool = False  # the tap reported an error: its fd left the loop for good
    armed: bool = False  # its fd is on the event loop

    @property
    def rx(self) -> int:
        return 2 * self.index

    @property
    def tx(self) -> int:
        return 2 * self.index + 1


class Net(VirtioDeviceBase):
    device_type = TYPE_NET
    name = "virtio-net"

    def __init__(
        self,
        tap: Tap | Sequence[Tap],
        *,
        mac: str | bytes | None = None,
        queue_size: int = 256,
        mtu: int | None = None,
        rx_rate_limiter: RateLimiter | None = None,
        tx_rate_limiter: RateLimiter | None = None,
    ) -> None:
        """`tap` is one tap fd, or one per queue pair (`Tap.open_queues`)."""
        taps = [tap] if isinstance(tap, Tap) else list(tap)
        if not 1 <= len(taps) <= VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise ValueError(
                f"{len(taps)} queue pairs: expected 1..{VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX}"
            )
        if len(taps) > 1 and not all(t.multi_queue for t in taps):
            raise ValueError("several queue pairs need a multiqueue tap (Tap.open_queues)")
        self.taps = taps
        self.tap = taps[0]
        self.pairs = [QueuePair(i, t) for i, t in enumerate(taps)]
        self.max_pairs = len(taps)
        self.active_pairs = 1
        self._pairs_at_activation = 1  # 1, or what a snapshot had
        self.ctrl_queue: int | None = None  # its index once activated with CTRL_VQ
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
        if self.tap.supports_ufo:
            features |= (1 << VIRTIO_NET_F_GUEST_UFO) | (1 << VIRTIO_NET_F_HOST_UFO)
        if mtu is not None:
            features |= 1 << VIRTIO_NET_F_MTU
        queue_sizes = [queue_size] * (2 * self.max_pairs)
        if self.max_pairs > 1:
            features |= (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ)
            queue_sizes.append(queue_size)  # the control queue
        super().__init__(queue_sizes, features)
        # Cloud Hypervisor's net rate limiting: one limiter per direction, one op per frame
        # plus its bytes; the frame that empties the bucket still goes, the next ones wait.
        self.rx_rate_limiter = rx_rate_limiter
        self.tx_rate_limiter = tx_rate_limiter
        self.rx_throttled = False
        self._tx_more = EventFd()  # written when a kick left tx work for the next iteration
        self._tx_more_pairs: set[int] = set()
        self._rx_tail = memoryview(bytearray(_RX_TAIL))
        self.stats = {
            "rx_bytes": 0,
            "rx_frames": 0,
            "tx_bytes": 0,
            "tx_frames": 0,
            "tx_dropped": 0,
            "rx_dropped": 0,
            "rx_truncated": 0,
        }
        try:
            self._attach_pairs(1)  # until the driver asks for more, only pair 0 gets frames
        except TapError:
            self._tx_more.close()
            raise

    # -- what tests and the VMM look at ------------------------------------------------------
    @property
    def rx_paused(self) -> bool:
        return self.pairs[0].rx_paused

    @property
    def tx_blocked(self) -> bool:
        return any(p.tx_blocked for p in self.pairs)

    @property
    def tap_failed(self) -> bool:
        return any(p.failed for p in self.pairs)

    def config_bytes(self) -> bytes:
        return _CONFIG.pack(self.mac, VIRTIO_NET_S_LINK_UP, self.max_pairs, self.mtu or 0)

    @staticmethod
    def feature_conflict(features: int) -> str | None:
        """Why the driver may not accept `features` together (5.1.3.1), or None."""
        for bit, needs in FEATURE_NEEDS.items():
            if features >> bit & 1 and not any(features >> n & 1 for n in needs):
                return f"feature bit {bit} needs one of bits {list(needs)}"
        return None

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
        # All or nothing: a failure part way unregisters what was registered, and the device
        # is left inactive (activate() then raises to the transport).
        try:
            self.ctrl_queue = None
            if self.has_feature(VIRTIO_NET_F_CTRL_VQ):
                mq = self.has_feature(VIRTIO_NET_F_MQ)
                self.ctrl_queue = 2 * (self.max_pairs if mq else 1)  # 5.1.2
            # Offloads belong to the interface: set them through pair 0 (always attached).
            self.tap.set_offload(self.tap_offload())
            self.rx_throttled = False
            for p in self.pairs:
                p.rx_paused = p.tx_blocked = p.armed = False
            self._tx_more.read()  # a wake left over from before a reset
            self._tx_more_pairs.clear()
            self._register(self._tx_more.fd, self._on_tx_more, select.EPOLLIN)
            pairs = self._pairs_at_activation if self.has_feature(VIRTIO_NET_F_MQ) else 1
            self._pairs_at_activation = 1
            self.active_pairs = 1
            self._arm(self.pairs[0])
            if pairs > 1:
                self._set_active_pairs(pairs)
            for rl, on_timer in (
                (self.rx_rate_limiter, self._on_rx_rate_timer),
                (self.tx_rate_limiter, self._on_tx_rate_timer),
            ):
                if rl is not None and (fd := rl.fileno()) is not None:
                    self._register(fd, on_timer, select.EPOLLIN)
        except BaseException:
            self._stop()
            raise

    def _on_reset(self) -> None:
        self.rx_throttled = False
        for p in self.pairs:
            p.rx_paused = p.tx_blocked = p.armed = False
        self._tx_more_pairs.clear()
        for rl in (self.rx_rate_limiter, self.tx_rate_limiter):
            if rl is not None:
                rl.unblock()
        self.active_pairs = 1
        try:
            self._attach_pairs(1)
        except TapError as e:
            self._log.error("%s: reset: %s", self.name, e)

    def close(self) -> None:
        """Release the rate limiters' timers and the wake eventfd (the taps' owner closes them)."""
        super().close()
        for rl in (self.rx_rate_limiter, self.tx_rate_limiter):
            if rl is not None:
                rl.close()
        self._tx_more.close()

    # -- queue pairs -------------------------------------------------------------------------
    def _attach_pairs(self, count: int) -> None:
        """Tap queues of pairs < count attached, the others detached (multiqueue taps only).

        Attaches first and detaches after, so pair 0 keeps its queue whatever fails.
        """
        if self.max_pairs == 1:
            return
        for p in self.pairs:
            if p.index < count and not p.failed:
                p.tap.set_attached(True)
        for p in self.pairs:
            if p.index >= count and not p.failed:
                p.tap.set_attached(False)

    def _arm(self, p: QueuePair) -> None:
        """Put pair p's tap fd on the loop (reads when readable)."""
        if p.armed or p.failed:
            return

        def on_tap(mask: int) -> None:
            self._on_tap(p, mask)

        self._register(p.tap.fd, on_tap, select.EPOLLIN)
        p.armed = True
        self._watch_tap(p)

    def _disarm(self, p: QueuePair) -> None:
        if p.armed:
            self._unregister(p.tap.fd)
            p.armed = False
        p.rx_paused = p.tx_blocked = False
        self._tx_more_pairs.discard(p.index)

    def _set_active_pairs(self, count: int) -> bool:
        """Pairs 0..count-1 active, the rest idle (their tap queues detached, fds off the
        loop). False, with nothing changed, if a tap queue cannot be attached."""
        if count == self.active_pairs:
            return True
        try:
            self._attach_pairs(count)
        except TapError as e:
            self._log.warning("%s: %d queue pairs: %s", self.name, count, e)
            try:
                self._attach_pairs(self.active_pairs)
            except TapError:
                pass  # the tap is going away; pair 0's queue was never touched
            return False
        old = self.active_pairs
        self.active_pairs = count
        for p in self.pairs[count:old]:
            self._disarm(p)
        for p in self.pairs[old:count]:
            self._arm(p)
            # Frames the driver queued on this pair while it was idle go out now (next turn).
            self._tx_more_pairs.add(p.index)
        if count > old:
            self._tx_more.write(1)
        return True

    def _pair_of(self, queue_index: int) -> QueuePair | None:
        """The active pair that queue `queue_index` belongs to, or None (idle, or control)."""
        k = queue_index // 2
        if queue_index == self.ctrl_queue or k >= self.active_pairs:
            return None
        return self.pairs[k]

    # -- event loop callbacks ----------------------------------------------------------------
    def _watch_tap(self, p: QueuePair) -> None:
        assert self.loop is not None
        if not p.armed:
            return  # idle, or no longer on the loop
        # A stopped rx queue (needs reset) masks the tap too, or its frames spin the loop.
        rx_off = p.rx_paused or self.rx_throttled or self.broken[p.rx]
        events = (0 if rx_off else select.EPOLLIN) | (select.EPOLLOUT if p.tx_blocked else 0)
        self.loop.modify(p.tap.fd, events)

    def _active(self) -> list[QueuePair]:
        return self.pairs[: self.active_pairs]

    def _on_rx_rate_timer(self, mask: int) -> None:
        assert self.rx_rate_limiter is not None
        self.rx_rate_limiter.event_handler()
        if self.rx_throttled:
            self.rx_throttled = False
            for p in self._active():
                self._watch_tap(p)
            for p in self._active():
                if not p.rx_paused and not self.broken[p.rx] and not self.rx_throttled:
                    self._rx(p)

    def _on_tx_more(self, mask: int) -> None:
        self._tx_more.read()
        pending = sorted(self._tx_more_pairs)
        self._tx_more_pairs.clear()
        for k in pending:
            if k < self.active_pairs:
                p = self.pairs[k]
                if not p.tx_blocked and not self.broken[p.tx]:
                    self._tx(p)

    def _on_tx_rate_timer(self, mask: int) -> None:
        assert self.tx_rate_limiter is not None
        self.tx_rate_limiter.event_handler()
        for p in self._active():
            if not p.tx_blocked and not self.broken[p.tx]:
                self._tx(p)

    def _tap_gone(self, p: QueuePair) -> None:
        """The tap reports an error condition (e.g. its interface was deleted under us).

        epoll reports EPOLLERR whatever we ask for, so the fd must leave the loop or the loop
        spins. Transmits then fail (counted in tx_dropped), nothing is received; the guest and
        the other devices carry on.
        """
        p.failed = True
        if p.armed:
            self._unregister(p.tap.fd)
            p.armed = False
        self._log.error(
            "%s: tap %s (queue pair %d) failed (interface deleted?); its frames are dropped"
            " from now on",
            self.name,
            p.tap.name,
            p.index,
        )

    def _on_tap(self, p: QueuePair, mask: int) -> None:
        if not p.armed:
            return
        if mask & (select.EPOLLERR | select.EPOLLHUP) and not mask & (
            select.EPOLLIN | select.EPOLLOUT
        ):
            self._tap_gone(p)
            return
        if mask & select.EPOLLOUT and p.tx_blocked:
            p.tx_blocked = False
            self._watch_tap(p)
            if not self.broken[p.tx]:
                self._tx(p)
        if mask & select.EPOLLIN:
            if self.broken[p.rx]:
                self._watch_tap(p)  # the queue stopped since the tap was last armed
            elif not p.rx_paused and not self.rx_throttled:
                self._rx(p)

    def _process(self, queue_index: int) -> None:
        if queue_index == self.ctrl_queue:
            self._drain(queue_index, self._ctrl_request)
            return
        p = self._pair_of(queue_index)
        if p is None:
            return  # an idle pair (5.1.6.5.5: the driver must not use it) or no such queue
        if queue_index == p.rx:
            # The guest added rx buffers: take frames again if we had stopped.
            if p.rx_paused:
                p.rx_paused = False
                self._watch_tap(p)
            self._rx(p)
        elif not p.tx_blocked:
            self._tx(p)

    # -- control queue -----------------------------------------------------------------------
    def _ctrl_request(self, chain: DescriptorChain) -> int:
        """One control request: class, command, data; the ack goes in the first writable byte.

        Returns the bytes written (1). A chain without a writable byte cannot be answered: it
        is returned unused (ChainError, logged by `_drain`).
        """
        ack_views = chain.writable_views()
        ack = next((v for v in ack_views if len(v)), None)
        if ack is None:
            raise ChainError("control request without room for the ack")
        request = bytearray()
        total = 0
        for v in chain.readable_views():
            total += len(v)
            room = CTRL_MAX_REQUEST + 1 - len(request)
            if room > 0:
                request += v[:room]
        ack[0] = self._ctrl_command(bytes(request), total)
        return 1

    def _ctrl_command(self, request: bytes, total: int) -> int:
        """VIRTIO_NET_OK or VIRTIO_NET_ERR for one control request (`total` readable bytes)."""
        if total < 2:
            self._log.warning(
                "%s: control request of %d bytes (no class/command)", self.name, total
            )
            return VIRTIO_NET_ERR
        cls, cmd = request[0], request[1]
        if total > CTRL_MAX_REQUEST:
            self._log.warning(
                "%s: control class %d command %d: %d bytes, more than any we serve",
                self.name,
                cls,
                cmd,
                total,
            )
            return VIRTIO_NET_ERR
        data = request[2:total]
        if (
            cls == VIRTIO_NET_CTRL_MQ
            and cmd == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
            and self.has_feature(VIRTIO_NET_F_MQ)
        ):
            if len(data) != 2:
                self._log.warning(
                    "%s: MQ_VQ_PAIRS_SET with %d data bytes (expected 2)", self.name, len(data)
                )
                return VIRTIO_NET_ERR
            (pairs,) = struct.unpack("<H", data)
            if not VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN <= pairs <= self.max_pairs:
                self._log.warning(
                    "%s: MQ_VQ_PAIRS_SET %d outside 1..%d", self.name, pairs, self.max_pairs
                )
                return VIRTIO_NET_ERR
            for p in self.pairs[:pairs]:
                if not (self.queues[p.rx].ready and self.queues[p.tx].ready):
                    self._log.warning(
                        "%s: MQ_VQ_PAIRS_SET %d: queue pair %d is not enabled",
                        self.name,
                        pairs,
                        p.index,
                    )
                    return VIRTIO_NET_ERR
            return VIRTIO_NET_OK if self._set_active_pairs(pairs) else VIRTIO_NET_ERR
        self._log.warning("%s: unsupported control class %d command %d", self.name, cls, cmd)
        return VIRTIO_NET_ERR

    # -- receive -----------------------------------------------------------------------------
    def _rx(self, p: QueuePair) -> None:
        if p.failed:
            return  # nothing will ever arrive; the guest's buffers stay posted
        q = self.queues[p.rx]
        tap = p.tap
        mem = self.mem
        assert mem is not None
        rl = self.rx_rate_limiter
        frames = 0
        buffers = 0
        try:
            while frames < RX_BURST and buffers < BUFFERS_PER_KICK:
                if rl is not None and rl.blocked:
                    self.rx_throttled = True  # frames wait in the tap until the timer
                    for other in self._active():
                        self._watch_tap(other)
                    break
                chain = q.pop(mem)
                if chain is None:
                    if q.enable_notification(mem):
                        continue  # buffers arrived while we looked
                    p.rx_paused = True  # wait for the guest's rx notify
                    self._watch_tap(p)
                    break
                try:
                    buffers += len(chain.descriptors)
                    views = chain.writable_views()
                    capacity = sum(map(len, views))
                    if capacity < VNET_HDR_SIZE:
                        raise ChainError("rx buffer smaller than the virtio-net header")
                    if len(views) >= IOV_MAX:
                        # readv would fail with EINVAL and leave the frame queued: we would
                        # retry the same chain on the same frame forever (one iovec is ours).
                        raise ChainError(f"rx chain has {len(views)} buffers (>= {IOV_MAX})")
                except ChainError as e:
                    self._log.warning("%s: bad rx chain: %s", self.name, e)
                    q.add_used(mem, chain.head_index, 0)
                    frames += 1
                    continue
                try:
                    n = tap.read_into([*views, self._rx_tail])
                except BlockingIOError:
                    q.undo_pop()
                    break
                except OSError as e:
                    # EFAULT: the frame did not fit the buffers; the tap has dropped it.
                    q.undo_pop()
                    self.stats["rx_dropped"] += 1
                    self._log.warning("%s: tap %s read: %s", self.name, tap.name, e)
                    frames += 1
                    continue
                if n > capacity:
                    # Longer than the guest's buffers: the tap cut it. Drop it (the chain
                    # waits for the next frame); the guest never sees a truncated frame.
                    q.undo_pop()
                    self.stats["rx_dropped"] += 1
                    self.stats["rx_truncated"] += 1
                    self._log.warning(
                        "%s: rx frame longer than the guest's %d-byte buffer; dropped",
                        self.name,
                        capacity,
                    )
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
                self._notify(p.rx)

    # -- transmit ----------------------------------------------------------------------------
    def _tx(self, p: QueuePair) -> None:
        q = self.queues[p.tx]
        tap = p.tap
        mem = self.mem
        assert mem is not None
        rl = self.tx_rate_limiter
        sent = 0
        buffers = 0
        try:
            while True:
                q.disable_notification(mem)
                while (chain := q.pop(mem)) is not None:
                    if rl is not None and rl.blocked:
                        q.undo_pop()  # waits in the ring; the limiter's timer resumes us
                        return
                    if sent >= TX_BURST or buffers >= BUFFERS_PER_KICK:
                        q.undo_pop()  # this kick's share is used: go on next iteration
                        self._tx_more_pairs.add(p.index)
                        self._tx_more.write(1)
                        return
                    try:
                        buffers += len(chain.descriptors)
                        views = chain.readable_views()
                        size = sum(map(len, views))
                        if size < VNET_HDR_SIZE:
                            raise ChainError("tx frame shorter than the virtio-net header")
                        if size > MAX_TX_FRAME:  # refused before any of its data is read
                            raise ChainError(f"tx frame of {size} bytes > {MAX_TX_FRAME}")
                    except ChainError as e:
                        self._log.warning("%s: bad tx chain: %s", self.name, e)
                        self.stats["tx_dropped"] += 1
                        q.add_used(mem, chain.head_index, 0)
                        sent += 1
                        continue
                    try:
                        tap.write_from(views)
                        self.stats["tx_frames"] += 1
                        self.stats["tx_bytes"] += size - VNET_HDR_SIZE
                        if rl is not None and rl.consume(1, TokenType.OPS):
                            rl.consume(size, TokenType.BYTES)
                    except BlockingIOError:
                        q.undo_pop()  # the tap is full: retry when it is writable
                        p.tx_blocked = True
                        self._watch_tap(p)
                        return
                    except OSError as e:  # e.g. EINVAL for a bad GSO header: drop the frame
                        self._log.warning("%s: tap %s write: %s", self.name, tap.name, e)
                        self.stats["tx_dropped"] += 1
                    q.add_used(mem, chain.head_index, 0)
                    sent += 1
                if not q.enable_notification(mem):
                    break
        finally:
            if sent:
                self._notify(p.tx)

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s = super().state()
        s["mac"] = format_mac(self.mac)
        if self.max_pairs > 1:
            s["active_pairs"] = self.active_pairs
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
        pairs = int(state.get("active_pairs", 1))
        if not 1 <= pairs <= self.max_pairs:
            raise ValueError(f"{self.name}: snapshot has {pairs} active queue pairs")
        self._pairs_at_activation = pairs
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
