"""An epoll event loop on its own thread.

Subscribers register file descriptors (ioeventfds, taps, sockets) with a callback that gets the
ready event mask. A callback that raises is logged and unregistered: one broken device must not
stop the others or the VMM.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from strato._sys.eventfd import EventFd

log = logging.getLogger(__name__)

Callback = Callable[[int], None]

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT


class EventLoop:
    def __init__(self, name: str = "strato-events") -> None:
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._stop = EventFd()
        self._epoll.register(self._stop.fd, select.EPOLLIN)
        self._thread: threading.Thread | None = None
        self._running = False
        self._lock = threading.Lock()
        self.on_thread_start: Callable[[], None] | None = None  # e.g. install seccomp

    def register(self, fd: int, callback: Callback, events: int = select.EPOLLIN) -> None:
        with self._lock:
            if fd in self._callbacks:
                raise ValueError(f"fd {fd} is already registered")
            self._callbacks[fd] = callback
            self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        with self._lock:
            if self._callbacks.pop(fd, None) is not None:
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    def run_once(self, timeout: float = -1) -> int:
        """Dispatch one batch of ready fds; returns how many callbacks ran."""
        ran = 0
        try:
            ready = self._epoll.poll(timeout)
        except InterruptedError:
            return 0
        for fd, mask in ready:
            if fd == self._stop.fd:
                self._stop.read()
                continue
            cb = self._callbacks.get(fd)
            if cb is None:
                continue
            try:
                cb(mask)
                ran += 1
            except Exception:
                log.exception("event handler for fd %d failed; it is removed", fd)
                self.unregister(fd)
        return ran

    def run(self) -> None:
        self._running = True
        if self.on_thread_start is not None:
            self.on_thread_start()
        while self._running:
            self.run_once()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._stop.write(1)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        self._stop.close()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread


def drain(fd: int) -> None:
    """Read an eventfd's counter so level-triggered epoll stops reporting it."""
    try:
        os.read(fd, 8)
    except BlockingIOError:
        pass
