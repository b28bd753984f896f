"""virtio-console (virtio 1.2, 5.3), port 0 only: receiveq 0 (to the guest), transmitq 1.

Output goes to a sink (a file, a tty, a pipe, or nowhere) without ever blocking the event loop:
the guest's bytes are copied into a bounded buffer and its buffers returned at once; the buffer
is written out non-blocking, and what does not fit while the sink is slow is dropped and counted.
Input comes from a readable fd (a tty) and/or `enqueue_input()`, through a bounded buffer; when
that buffer is full the fd is no longer read (back-pressure rather than loss).

Threads: everything here runs on the event loop thread, including the emergency write (the
transport runs device-config writes as loop jobs); only `enqueue_input()` may be called from
any thread (it takes `_in_lock` and wakes the loop).

Hostile-guest budget, whatever the guest declares:
- memory per request: nothing in proportion to the guest's lengths. Output is written from
  the guest's buffers (zero-copy) and at most `output_limit` bytes wait in the output buffer;
  at most `MAX_CHAIN_OUTPUT` bytes of one transmit chain are taken, the rest is dropped and
  counted (Linux's driver sends at most 32 KiB per buffer). Input waits in a buffer of at most
  `input_limit` bytes.
- loop time per kick: at most `TX_BURST` transmit chains, `TX_BYTES_PER_KICK` bytes written
  to the sink (one write per chain, gathered in a fixed `MAX_CHAIN_OUTPUT`-byte scratch
  buffer), at most `RX_BURST` receive chains, and chains of `BUFFERS_PER_KICK` descriptors in
  all (plus the last chain, which the virtqueue bounds); the rest of the ring waits for the
  next loop iteration (the wake eventfd), so other devices get their turn.
"""

from __future__ import annotations

import os
import select
import stat
import struct
import threading
from typing import Any

from strato._sys import EventFd
from strato._sys.files import open_private
from strato.devices.virtio.base import VirtioDeviceBase
from strato.virtio.device import TYPE_CONSOLE
from strato.virtio.queue import ChainError

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

RX_QUEUE = 0
TX_QUEUE = 1
TX_BURST = 256  # transmit chains per kick
RX_BURST = 256  # receive chains per wakeup
TX_BYTES_PER_KICK = 1 << 20  # bytes written to the sink per kick before yielding
MAX_CHAIN_OUTPUT = 64 * 1024  # bytes taken from one transmit chain; the rest is dropped
# Guest buffers (descriptors) handled per kick, whatever the chain count: a chain costs loop
# time in proportion to its descriptors.
BUFFERS_PER_KICK = 2048

_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
_EMERG_WR_OFFSET = 8


def _reopen(fd: int, flags: int) -> int:
    """A new non-blocking open file description of what `fd` refers to (ttys, pipes).

    O_NONBLOCK on a shared description (the VMM's stdout) would break everyone else using it;
    reopening through /proc gives us our own. Sockets cannot be reopened: they get a dup set
    non-blocking, which is then shared.
    """
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return os.dup(fd)
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        new = os.dup(fd)
        os.set_blocking(new, False)
        return new


class Console(VirtioDeviceBase):
    device_type = TYPE_CONSOLE
    name = "virtio-console"

    def __init__(
        self,
        *,
        output: int | str | None = None,
        input_fd: int | None = None,
        size: tuple[int, int] | None = None,
        queue_size: int = 256,
        output_limit: int = 64 * 1024,
        input_limit: int = 64 * 1024,
    ) -> None:
        features = 1 << VIRTIO_CONSOLE_F_EMERG_WRITE
        if size is not None:
            features |= 1 << VIRTIO_CONSOLE_F_SIZE
        super().__init__([queue_size, queue_size], features)
        self.size = size
        self.output_limit = output_limit
        self.input_limit = input_limit
        self._out_fd = -1
        self._out_regular = False
        if isinstance(output, str):
            self._out_fd = open_private(output, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        elif output is not None:
            self._out_fd = _reopen(output, os.O_WRONLY)
        if self._out_fd >= 0:
            self._out_regular = stat.S_ISREG(os.fstat(self._out_fd).st_mode)
        if input_fd is not None and stat.S_ISREG(os.fstat(input_fd).st_mode):
            raise ValueError("console input must be a tty, pipe or socket (use enqueue_input)")
        self._in_fd = _reopen(input_fd, os.O_RDONLY) if input_fd is not None else -1
        self._out = bytearray()
        self._out_watched = False
        self._in = bytearray()
        self._in_lock = threading.Lock()
        self._in_watched = False
        self._wake = EventFd()
        self._more_tx = False  # a kick left transmit chains for the next loop iteration
        self._tx_scratch = memoryview(bytearray(MAX_CHAIN_OUTPUT))
        self.stats = {"tx_bytes": 0, "rx_bytes": 0, "tx_dropped": 0, "rx_dropped": 0}

    def close(self) -> None:
        super().close()
        for fd in (self._out_fd, self._in_fd):
            if fd >= 0:
                os.close(fd)
        self._out_fd = self._in_fd = -1
        self._wake.close()

    def config_bytes(self) -> bytes:
        cols, rows = self.size or (0, 0)
        return _CONFIG.pack(cols, rows, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # emerg_wr: one character written before (or instead of) the queues are up.
        if offset == _EMERG_WR_OFFSET and len(data) == 4:
            self._emit(bytes([data[0]]))
            return
        super().write_config(offset, data)

    def resize(self, cols: int, rows: int) -> None:
        """New terminal size; tells the driver when it negotiated VIRTIO_CONSOLE_F_SIZE."""
        self.size = (cols, rows)
        if self.active and self.has_feature(VIRTIO_CONSOLE_F_SIZE) and self.interrupt:
            self.interrupt.signal_config_change()

    # -- lifecycle ---------------------------------------------------------------------------
    def _on_activate(self) -> None:
        # All or nothing: a failure part way leaves nothing registered and the device inactive.
        try:
            self._more_tx = False
            self._register(self._wake.fd, self._on_wake, select.EPOLLIN)
            if self._in_fd >= 0:
                self._register(self._in_fd, self._on_input, select.EPOLLIN)
                self._in_watched = True
            if self._out:
                self._flush()
            if self._in:
                self._wake.write(1)
        except BaseException:
            self._stop()
            raise

    def _on_reset(self) -> None:
        self._out_watched = False
        self._in_watched = False
        self._more_tx = False

    def _process(self, queue_index: int) -> None:
        if queue_index == TX_QUEUE:
            self._transmit_all()
        elif queue_index == RX_QUEUE:
            self._deliver()

    def _later(self) -> None:
        """Come back on the next loop iteration (the kick's budget is spent)."""
        self._wake.write(1)

    # -- output ------------------------------------------------------------------------------
    def _transmit_all(self) -> None:
        """Take up to TX_BURST chains / TX_BYTES_PER_KICK bytes from the transmit queue."""
        self._more_tx = False
        if self.broken[TX_QUEUE]:
            return
        q = self.queues[TX_QUEUE]
        mem = self.mem
        assert mem is not None
        chains = 0
        written = 0
        buffers = 0
        try:
            while True:
                q.disable_notification(mem)
                while (chain := q.pop(mem)) is not None:
                    if (
                        chains >= TX_BURST
                        or written >= TX_BYTES_PER_KICK
                        or buffers >= BUFFERS_PER_KICK
                    ):
                        q.undo_pop()
                        self._more_tx = True
                        self._later()
                        return
                    try:
                        buffers += len(chain.descriptors)
                        written += self._transmit(chain.readable_views())
                    except ChainError as e:
                        self._log.warning("%s: bad transmit chain: %s", self.name, e)
                    q.add_used(mem, chain.head_index, 0)
                    chains += 1
                if not q.enable_notification(mem):
                    break
        finally:
            if chains:
                self._notify(TX_QUEUE)
            self._flush()

    def _transmit(self, views: list[memoryview]) -> int:
        """Emit one chain's bytes (at most MAX_CHAIN_OUTPUT); returns how many were taken."""
        if len(views) == 1 and len(views[0]) <= MAX_CHAIN_OUTPUT:  # the usual: one buffer
            self._emit(views[0])
            return len(views[0])
        scratch = self._tx_scratch  # gathered, so one chain is one write to the sink
        pos = 0
        dropped = 0
        for v in views:
            n = len(v)
            if pos == MAX_CHAIN_OUTPUT:
                dropped += n
                continue
            take = min(n, MAX_CHAIN_OUTPUT - pos)
            scratch[pos : pos + take] = v[:take] if take < n else v
            pos += take
            dropped += n - take
        if pos:
            self._emit(scratch[:pos])
        if dropped:
            self.stats["tx_bytes"] += dropped
            self.stats["tx_dropped"] += dropped
            self._log.warning(
                "%s: transmit chain longer than %d bytes; the rest dropped",
                self.name,
                MAX_CHAIN_OUTPUT,
            )
        return pos

    def _emit(self, data: bytes | memoryview) -> None:
        self.stats["tx_bytes"] += len(data)
        if self._out_fd < 0:
            return
        if not self._out:  # nothing queued: straight to the sink, keep only what it refused
            data = data[self._write(data) :]
            if not data:
                return
        room = max(self.output_limit - len(self._out), 0)
        if len(data) > room:
            self.stats["tx_dropped"] += len(data) - room
            data = data[:room]
        self._out += data
        self._flush()

    def _write(self, data: bytes | bytearray | memoryview) -> int:
        """Write what the sink takes now; a broken sink swallows everything (counted)."""
        try:
            return os.write(self._out_fd, data)
        except BlockingIOError:
            return 0
        except OSError as e:
            self._log.warning("%s: output: %s; dropping %d bytes", self.name, e, len(data))
            self.stats["tx_dropped"] += len(data)
            return len(data)

    def _flush(self) -> None:
        while self._out:
            n = self._write(self._out)
            if n == 0:
                break
            del self._out[:n]
        want_watch = bool(self._out) and not self._out_regular and self.active
        if want_watch != self._out_watched:
            if want_watch:
                self._register(self._out_fd, self._on_output_ready, select.EPOLLOUT)
            else:
                self._unregister(self._out_fd)
            self._out_watched = want_watch

    def _on_output_ready(self, mask: int) -> None:
        self._flush()

    # -- input -------------------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest (any thread); returns how many fit, the rest is dropped."""
        with self._in_lock:
            room = max(self.input_limit - len(self._in), 0)
            taken = data[:room]
            self._in += taken
            self.stats["rx_dropped"] += len(data) - len(taken)
        if taken and self.active:
            self._wake.write(1)
        return len(taken)

    @property
    def pending_input(self) -> int:
        return len(self._in)

    def _on_wake(self, mask: int) -> None:
        self._wake.read()
        if self._more_tx:
            self._transmit_all()
        self._deliver()

    def _on_input(self, mask: int) -> None:
        with self._in_lock:
            room = self.input_limit - len(self._in)
        if room <= 0:
            self._watch_input(False)
            return
        try:
            data = os.read(self._in_fd, room)
        except BlockingIOError:
            return
        except OSError as e:
            self._log.warning("%s: input: %s; input closed", self.name, e)
            data = b""
        if not data:  # end of input
            self._unregister(self._in_fd)
            self._in_watched = False
            return
        with self._in_lock:
            self._in += data
        self._deliver()
        if len(self._in) >= self.input_limit:
            self._watch_input(False)  # full: leave the rest in the fd until the guest reads

    def _watch_input(self, on: bool) -> None:
        if self._in_fd < 0 or on == self._in_watched or self._in_fd not in self._fds:
            return
        assert self.loop is not None
        self.loop.modify(self._in_fd, select.EPOLLIN if on else 0)
        self._in_watched = on

    def _deliver(self) -> None:
        """Move pending input into the guest's receive buffers."""
        q = self.queues[RX_QUEUE]
        mem = self.mem
        assert mem is not None
        if self.broken[RX_QUEUE]:
            return
        used = 0
        buffers = 0
        try:
            while self._in:
                if used >= RX_BURST or buffers >= BUFFERS_PER_KICK:
                    self._later()  # _on_wake delivers the rest
                    break
                chain = q.pop(mem)
                if chain is None:
                    if q.enable_notification(mem):
                        continue
                    break
                written = 0
                try:
                    buffers += len(chain.descriptors)
                    writer = chain.writer()
                    with self._in_lock:
                        written = min(writer.remaining, len(self._in))
                        writer.write(self._in[:written])
                        del self._in[:written]
                except ChainError as e:
                    self._log.warning("%s: bad receive chain: %s", self.name, e)
                    written = 0
                q.add_used(mem, chain.head_index, written)
                used += 1
                self.stats["rx_bytes"] += written
        finally:
            if used:
                self._notify(RX_QUEUE)
            if len(self._in) < self.input_limit:
                self._watch_input(True)

    # -- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        s = super().state()
        with self._in_lock:
            s["pending_input"] = self._in.hex()
        s["pending_output"] = self._out.hex()
        s["size"] = list(self.size) if self.size else None
        return s

    def restore(self, state: dict[str, Any]) -> None:
        super().restore(state)
        with self._in_lock:
            self._in = bytearray.fromhex(str(state.get("pending_input", "")))[: self.input_limit]
        self._out = bytearray.fromhex(str(state.get("pending_output", "")))[: self.output_limit]
        size = state.get("size")
        if size:
            self.size = (int(size[0]), int(size[1]))
