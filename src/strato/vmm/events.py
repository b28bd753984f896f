"""The event monitor (`--event-monitor path=...|fd=N`): a JSON event stream as Cloud Hypervisor
writes it (its event_monitor crate).

Each event is one pretty-printed JSON object followed by a blank line:

    {
      "timestamp": {
        "secs": 0,
        "nanos": 52371
      },
      "source": "vm",
      "event": "booted",
      "properties": null
    }

`timestamp` is the time since the monitor was opened (Rust's Duration serialisation).
Emitting never blocks the caller: events go through a bounded queue to a writer thread, and
when the reader of a pipe falls behind, events past the bound are dropped and counted.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from strato._sys.files import open_private
from strato.vmm.config import ConfigError

log = logging.getLogger(__name__)

_CLOSE = object()


def format_event(
    elapsed_ns: int, source: str, event: str, properties: Mapping[str, str] | None = None
) -> str:
    """One event as Cloud Hypervisor prints it (serde_json's pretty printer: 2-space indent)."""
    record = {
        "timestamp": {"secs": elapsed_ns // 1_000_000_000, "nanos": elapsed_ns % 1_000_000_000},
        "source": source,
        "event": event,
        "properties": dict(properties) if properties is not None else None,
    }
    return json.dumps(record, indent=2, ensure_ascii=False)


def parse_events(text: str) -> list[dict[str, object]]:
    """Split a monitor stream back into event objects (for tests and tools)."""
    decoder = json.JSONDecoder()
    out: list[dict[str, object]] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        obj, pos = decoder.raw_decode(text, pos)
        out.append(obj)


class EventMonitor:
    """Writes events to a file descriptor from its own thread. Thread-safe `emit`."""

    def __init__(
        self,
        fd: int,
        *,
        max_pending: int = 1024,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._fd = fd
        self._clock = clock
        self._start = clock()
        self._queue: queue.Queue[object] = queue.Queue(max_pending)
        self.dropped = 0
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="event-monitor", daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> EventMonitor:
        """Create or truncate `path` (as Cloud Hypervisor does) and write events to it."""
        fd = open_private(path, os.O_WRONLY, truncate=True)
        return cls(fd)

    @classmethod
    def from_option(cls, value: str) -> EventMonitor:
        """`--event-monitor path=PATH` or `fd=N` (the fd is taken over and closed on close())."""
        key, sep, arg = value.partition("=")
        if not sep or key not in ("path", "fd") or not arg:
            raise ConfigError(f"--event-monitor {value}: expected path=PATH or fd=N")
        if key == "fd":
            try:
                fd = int(arg)
                os.fstat(fd)
            except ValueError:
                raise ConfigError(f"--event-monitor fd={arg}: not a number") from None
            except OSError as e:
                raise ConfigError(f"--event-monitor fd={arg}: {e.strerror}") from None
            return cls(fd)
        try:
            return cls.open(Path(arg))
        except OSError as e:
            raise ConfigError(f"--event-monitor path={arg}: {e.strerror}") from None

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        log.info(
            "Event: source = %s event = %s %s",
            source,
            event,
            ", ".join(f"{k} = {v}" for k, v in (properties or {}).items()),
        )
        if self._closed:
            return
        text = format_event(self._clock() - self._start, source, event, properties)
        try:
            self._queue.put_nowait(text)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting at most `timeout`), then close the descriptor."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put_nowait(_CLOSE)
        except queue.Full:
            pass  # the writer sees _closed once the queue is drained
        self._thread.join(timeout)

    def _close_fd(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass

    def _run(self) -> None:
        try:
            while True:
                try:
                    item = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._closed:
                        return
                    continue
                if item is _CLOSE:
                    return
                assert isinstance(item, str)
                if not self._write((item + "\n\n").encode()):
                    return
        finally:
            self._close_fd()

    def _write(self, data: bytes) -> bool:
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except BlockingIOError:
            with self._lock:
                self.dropped += 1
        except OSError as e:
            log.warning("event monitor: cannot write (%s); no more events are written", e)
            self._closed = True
            return False
        return True


class EventSink(Protocol):
    """What the VMM emits events to: an EventMonitor, or NullEventMonitor."""

    def emit(
        self, source: str, event: str, properties: Mapping[str, str] | None = None
    ) -> None: ...

    def close(self, timeout: float = 2.0) -> None: ...


class NullEventMonitor:
    """The monitor used without `--event-monitor`: events only go to the log."""

    dropped = 0

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        log.info(
            "Event: source = %s event = %s %s",
            source,
            event,
            ", ".join(f"{k} = {v}" for k, v in (properties or {}).items()),
        )

    def close(self, timeout: float = 2.0) -> None:
        pass
