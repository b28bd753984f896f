"""Reading kernel and initramfs files: path or open binary file, with truncation checks."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from strato.boot.errors import BootError

__all__ = ["ImageSource", "open_image", "read_at", "read_into", "size_of"]

ImageSource = str | os.PathLike[str] | BinaryIO


def _name(source: ImageSource) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    return str(getattr(source, "name", "<file>"))


@contextmanager
def open_image(source: ImageSource, what: str) -> Iterator[tuple[BinaryIO, str]]:
    """Yield (binary file, name for messages). A path is opened and closed here."""
    name = _name(source)
    if not isinstance(source, str | os.PathLike):
        yield source, name
        return
    try:
        f = open(source, "rb")
    except OSError as e:
        raise BootError(f"cannot open {what} {name}: {e.strerror or e}") from e
    with f:
        yield f, name


def size_of(f: BinaryIO) -> int:
    try:
        return f.seek(0, io.SEEK_END)
    except OSError as e:
        raise BootError(f"cannot seek in {getattr(f, 'name', 'file')}: {e}") from e


def read_at(f: BinaryIO, offset: int, length: int) -> bytes:
    """Up to `length` bytes at `offset` (short at end of file)."""
    f.seek(offset)
    out = bytearray()
    while len(out) < length:
        chunk = f.read(length - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def read_into(f: BinaryIO, offset: int, view: memoryview, what: str, name: str) -> None:
    """Fill `view` from `offset`, or raise BootError if the file ends first."""
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])  # type: ignore[attr-defined]
        if not n:
            raise BootError(
                f"{what} {name} is truncated: expected {len(view)} bytes at offset "
                f"{offset:#x}, the file ends after {done}"
            )
        done += n
