"""A writer for cpio "newc" archives, the format Linux unpacks as an initramfs.

Each entry is a 110-byte ASCII header (magic ``070701`` and thirteen 8-digit hex fields),
the NUL-terminated name padded to a multiple of 4 bytes, then the data padded to 4 bytes.
The archive ends with an entry named ``TRAILER!!!``.

The output is deterministic: every entry has mtime ``mtime`` (0 by default), uid and gid 0,
and inode numbers that count up from 1 in the order entries are added. Names are stored
relative (``bin/busybox``), which the kernel treats as rooted at ``/`` and which keeps the
system ``cpio -i`` from writing outside its working directory.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

MAGIC = b"070701"
HEADER_SIZE = 110
TRAILER_NAME = "TRAILER!!!"
_MAX_FIELD = 0xFFFF_FFFF
_COPY_CHUNK = 1 << 20

FileContent = bytes | bytearray | memoryview | os.PathLike[str]


def _pad4(length: int) -> int:
    return (4 - length % 4) % 4


def _field(value: int, what: str) -> bytes:
    if not 0 <= value <= _MAX_FIELD:
        raise ValueError(f"cpio {what} {value} does not fit in 32 bits")
    return b"%08X" % value


def normalize_path(path: str) -> str:
    """Turn ``/a/b`` or ``a//b/`` into ``a/b``; reject empty names and ``..`` components."""
    parts = [p for p in PurePosixPath(path).parts if p not in ("/", ".")]
    if not parts:
        raise ValueError(f"cpio entry name {path!r} is empty")
    if ".." in parts:
        raise ValueError(f"cpio entry name {path!r} contains '..'")
    name = "/".join(parts)
    if "\0" in name:
        raise ValueError(f"cpio entry name {path!r} contains NUL")
    return name


class CpioWriter:
    """Writes a newc archive to ``file`` (which the caller owns and closes).

    Parent directories that were not added explicitly are created with mode 0755 before
    their first child, because the kernel's unpacker does not create missing parents.
    """

    def __init__(self, file: BinaryIO, *, mtime: int = 0) -> None:
        self._file = file
        self._mtime = mtime
        self._next_ino = 1
        self._names: dict[str, int] = {}  # name -> full mode
        self._closed = False

    # -- public entry kinds -------------------------------------------------------------

    def add_dir(self, path: str, mode: int = 0o755) -> None:
        name = normalize_path(path)
        full_mode = stat.S_IFDIR | stat.S_IMODE(mode)
        if self._names.get(name) == full_mode:
            return  # already there (for example as an implicit parent) with this mode
        self._begin(name)
        self._entry(name, full_mode, nlink=2)

    def add_file(self, path: str, content: FileContent, mode: int = 0o644) -> None:
        """Add a regular file whose data is ``content`` bytes or the file at ``content``."""
        name = normalize_path(path)
        full_mode = stat.S_IFREG | stat.S_IMODE(mode)
        self._begin(name)
        if isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
            self._entry(name, full_mode, filesize=len(data))
            self._write_data(data)
            return
        src = Path(content)
        with src.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._entry(name, full_mode, filesize=size)
            copied = 0
            while chunk := f.read(min(_COPY_CHUNK, size - copied)):
                self._file.write(chunk)
                copied += len(chunk)
            if copied != size:
                raise OSError(f"{src} changed size while being archived")
            self._file.write(b"\0" * _pad4(size))

    def add_symlink(self, path: str, target: str) -> None:
        name = normalize_path(path)
        data = os.fsencode(target)
        if not data:
            raise ValueError(f"symlink {path!r} has an empty target")
        self._begin(name)
        self._entry(name, stat.S_IFLNK | 0o777, filesize=len(data))
        self._write_data(data)

    def add_device(
        self, path: str, mode: int, major: int, minor: int, *, block: bool = False
    ) -> None:
        """Add a device node; character unless ``block`` or ``mode`` says S_IFBLK."""
        name = normalize_path(path)
        kind = stat.S_IFMT(mode)
        if kind == 0:
            kind = stat.S_IFBLK if block else stat.S_IFCHR
        elif kind not in (stat.S_IFCHR, stat.S_IFBLK):
            raise ValueError(f"device {path!r}: mode {mode:o} is not a device type")
        self._begin(name)
        self._entry(name, kind | stat.S_IMODE(mode), rdev=(major, minor))

    def close(self) -> None:
        """Write the trailer. Does not close the underlying file."""
        if self._closed:
            return
        self._header(TRAILER_NAME, ino=0, mode=0, nlink=1, filesize=0, rdev=(0, 0))
        self._closed = True

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()

    # -- internals ----------------------------------------------------------------------

    def _begin(self, name: str) -> None:
        if self._closed:
            raise ValueError("cpio archive is already closed")
        if name in self._names:
            raise ValueError(f"cpio entry {name!r} was already added")
        parent = PurePosixPath(name).parent
        missing: list[str] = []
        while str(parent) != ".":
            mode = self._names.get(str(parent))
            if mode is None:
                missing.append(str(parent))
            elif not stat.S_ISDIR(mode):
                raise ValueError(f"cpio entry {name!r}: parent {parent} is not a directory")
            parent = parent.parent
        for directory in reversed(missing):
            self._entry(directory, stat.S_IFDIR | 0o755, nlink=2)

    def _entry(
        self,
        name: str,
        mode: int,
        *,
        nlink: int = 1,
        filesize: int = 0,
        rdev: tuple[int, int] = (0, 0),
    ) -> None:
        ino = self._next_ino
        self._next_ino += 1
        self._names[name] = mode
        self._header(name, ino=ino, mode=mode, nlink=nlink, filesize=filesize, rdev=rdev)

    def _header(
        self, name: str, *, ino: int, mode: int, nlink: int, filesize: int, rdev: tuple[int, int]
    ) -> None:
        encoded = os.fsencode(name) + b"\0"
        header = b"".join(
            (
                MAGIC,
                _field(ino, "inode"),
                _field(mode, "mode"),
                _field(0, "uid"),
                _field(0, "gid"),
                _field(nlink, "nlink"),
                _field(self._mtime, "mtime"),
                _field(filesize, "file size"),
                _field(0, "dev major"),
                _field(0, "dev minor"),
                _field(rdev[0], "rdev major"),
                _field(rdev[1], "rdev minor"),
                _field(len(encoded), "name size"),
                _field(0, "checksum"),
            )
        )
        self._file.write(header + encoded + b"\0" * _pad4(HEADER_SIZE + len(encoded)))

    def _write_data(self, data: bytes) -> None:
        self._file.write(data + b"\0" * _pad4(len(data)))
