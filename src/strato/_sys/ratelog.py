"""One rate limit for every log line a guest can trigger (a guest must not flood the host log).

Each call site that a guest can reach owns a `RateLimitedLog`: at most `burst` lines per
`interval` seconds reach the logger; the rest are counted and summarised in one line when the
next window opens.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most `burst` messages per `interval` seconds; the rest are counted and summarised."""

    def __init__(self, logger: logging.Logger, burst: int = 10, interval: float = 5.0) -> None:
        self._logger = logger
        self.burst = burst
        self._interval = interval
        self._window = 0.0
        self._sent = 0
        self.suppressed = 0

    def log(self, level: int, msg: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now - self._window >= self._interval:
            if self.suppressed:
                self._logger.log(level, "%d similar messages suppressed", self.suppressed)
            self._window = now
            self._sent = 0
            self.suppressed = 0
        if self._sent < self.burst:
            self._sent += 1
            self._logger.log(level, msg, *args, exc_info=exc_info)
        else:
            self.suppressed += 1

    def __call__(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(logging.WARNING, msg, *args)

    def error(self, msg: str, *args: object, exc_info: bool = False) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)
