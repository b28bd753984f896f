"""An owned file descriptor: closed once, usable as a context manager and by select/epoll."""

from __future__ import annotations

import os
from typing import Self


class OwnedFd:
    fd: int = -1

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
