"""Where the serial console's bytes go, without ever blocking the vCPU thread.

The UART reports THRE|TEMT at all times, so a guest never waits for its output to drain; a slow
terminal or disk must therefore not stall the vCPU either. Each sink that talks to the outside
world appends to a bounded in-memory buffer that one writer thread drains with blocking writes.
When the buffer is full, new bytes are dropped and counted in `dropped`: memory stays bounded
and the vCPU never waits on the host's I/O.

`ConsoleLog` is a watcher (see `Serial.add_watcher`) that keeps the tail of the output and lets
tests and the CLI wait for a marker to appear.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import BinaryIO

from strato._sys.files import open_private

log = logging.getLogger(__name__)

# Bytes a background sink holds while its destination catches up. A console line is ~100 bytes;
# this is several screens, and small enough to not matter.
DEFAULT_SINK_CAPACITY = 64 * 1024


class SerialOutput(ABC):
    """A destination for console bytes. `write` never blocks and never raises."""

    def __init__(self) -> None:
        self.written = 0  # bytes handed to the destination
        self.dropped = 0  # bytes discarded: destination too slow, failed or closed

    @abstractmethod
    def write(self, data: bytes) -> None: ...

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything accepted so far reached the destination; False on timeout."""
        return True

    def close(self) -> None:  # noqa: B027 (optional hook: most sinks hold nothing)
        """Flush (briefly) and release the destination."""


class NullSink(SerialOutput):
    """Discards everything (counted in `written`: it was consumed, not dropped)."""

    def write(self, data: bytes) -> None:
        self.written += len(data)


class CallbackSink(SerialOutput):
    """Calls `fn(data)` on the vCPU thread. `fn` must be quick and must not block."""

    def __init__(self, fn: Callable[[bytes], object]) -> None:
        super().__init__()
        self._fn = fn
        self._failed = False

    def write(self, data: bytes) -> None:
        try:
            self._fn(data)
        except Exception:
            self.dropped += len(data)
            if not self._failed:
                self._failed = True
                log.exception("serial output callback failed; dropping its output")
            return
        self.written += len(data)


class BackgroundSink(SerialOutput):
    """A bounded buffer drained by one writer thread; subclasses say how to emit a chunk.

    Memory is bounded by twice `capacity`: the buffer, plus the chunk being written.
    """

    def __init__(self, capacity: int = DEFAULT_SINK_CAPACITY, name: str = "serial-out") -> None:
        super().__init__()
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._busy = False  # the writer holds a chunk outside the buffer
        self._closed = False
        self._failed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @abstractmethod
    def _emit(self, chunk: bytes) -> None:
        """Write all of `chunk` to the destination (may block); raise OSError if it is gone."""

    def _release(self) -> None:
        """Free the destination once the writer thread has stopped."""

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def write(self, data: bytes) -> None:
        with self._cond:
            if self._closed or self._failed:
                self.dropped += len(data)
                return
            room = self.capacity - len(self._buf)
            if room < len(data):
                self.dropped += len(data) - room
                data = data[:room]
                if not data:
                    return
            was_empty = not self._buf
            self._buf += data
            if was_empty:  # the writer only sleeps on an empty buffer
                self._cond.notify_all()

    def flush(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._failed or (not self._buf and not self._busy), timeout
            )

    def close(self, timeout: float = 1.0) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            # Stuck in a write to a stalled destination: leave the daemon thread to it.
            log.warning("serial output: writer still blocked after %.1fs; not waiting", timeout)
            return
        self._release()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._buf) or self._closed)
                if not self._buf:  # closed and drained
                    return
                chunk = bytes(self._buf)
                self._buf.clear()
                self._busy = True
            try:
                self._emit(chunk)
            except (OSError, ValueError) as e:  # ValueError: a closed Python stream
                with self._cond:
                    self._failed = True
                    self._busy = False
                    self.dropped += len(chunk) + len(self._buf)
                    self._buf.clear()
                    self._cond.notify_all()
                log.warning("serial output failed (%s); dropping further output", e)
                return
            with self._cond:
                self.written += len(chunk)
                self._busy = False
                self._cond.notify_all()


class FdSink(BackgroundSink):
    """Writes to a file descriptor; closes it on `close()` only if it owns it."""

    def __init__(
        self, fd: int, *, own: bool, capacity: int = DEFAULT_SINK_CAPACITY, name: str = "serial-out"
    ) -> None:
        self.fd = fd
        self._own = own
        super().__init__(capacity, name)

    def _emit(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                # Someone else made the fd non-blocking: wait for room rather than spin.
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def _release(self) -> None:
        if self._own:
            os.close(self.fd)


class FileSink(FdSink):
    """Writes to a file it creates (truncating, like Cloud Hypervisor's `--serial file=`)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        append: bool = False,
        capacity: int = DEFAULT_SINK_CAPACITY,
    ) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        self.path = os.fspath(path)
        super().__init__(
            open_private(self.path, flags, truncate=not append), own=True, capacity=capacity
        )


class TtySink(FdSink):
    """Writes to a terminal (or pipe) fd it does not own, e.g. 1 for stdout.

    The fd is left in blocking mode (it is shared with the shell that started us); the writer
    thread absorbs the blocking and the bounded buffer drops what a slow terminal cannot take.
    """

    def __init__(self, fd: int, *, capacity: int = DEFAULT_SINK_CAPACITY) -> None:
        super().__init__(fd, own=False, capacity=capacity, name="serial-tty")


class StreamSink(BackgroundSink):
    """Writes to a Python binary stream (write + flush on the writer thread)."""

    def __init__(self, stream: BinaryIO, *, capacity: int = DEFAULT_SINK_CAPACITY) -> None:
        self.stream = stream
        super().__init__(capacity, "serial-stream")

    def _emit(self, chunk: bytes) -> None:
        self.stream.write(chunk)
        self.stream.flush()


OutputLike = SerialOutput | BinaryIO | Callable[[bytes], object] | None


def as_output(out: OutputLike) -> SerialOutput:
    """Adapt what a caller passes as `out` to a sink."""
    if out is None:
        return NullSink()
    if isinstance(out, SerialOutput):
        return out
    if hasattr(out, "write"):
        return StreamSink(out)  # type: ignore[arg-type]
    if callable(out):
        return CallbackSink(out)
    raise TypeError(f"not a serial output: {out!r}")


class ConsoleLog:
    """A watcher keeping the last `capacity` bytes of output; threads can wait for a marker.

    Offsets are absolute (bytes since creation), so `wait_for(marker, since=log.total)` only
    matches output produced after that point. A marker is only found while it is retained.
    """

    def __init__(self, capacity: int = 1 << 20) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.total = 0
        self._buf = bytearray()
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self._cond:
            self._buf += chunk
            self.total += len(chunk)
            if len(self._buf) > 2 * self.capacity:  # trim in batches: amortised O(1) per byte
                del self._buf[: len(self._buf) - self.capacity]
            self._cond.notify_all()

    def data(self) -> bytes:
        """The retained output (at most `capacity` bytes)."""
        with self._cond:
            return bytes(self._buf[-self.capacity :])

    def find(self, marker: bytes, since: int = 0) -> int:
        """Absolute offset of the first `marker` at or after `since`, or -1."""
        with self._cond:
            return self._find(marker, since)

    def _find(self, marker: bytes, since: int) -> int:
        start = self.total - len(self._buf)
        i = self._buf.find(marker, max(since - start, 0))
        return -1 if i < 0 else start + i

    def wait_for(self, marker: bytes, timeout: float, since: int = 0) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            pos = since
            while True:
                if self._find(marker, pos) >= 0:
                    return True
                # Next time only look at what is new, plus a marker's worth of overlap.
                pos = max(pos, self.total - len(marker) + 1)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
