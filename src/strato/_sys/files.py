"""Files strato creates at a path its configuration names (serial and console files, the event
monitor, later snapshot files): one way to open them, so that none follows a planted symlink.

`open_private` opens with O_NOFOLLOW (a symlink as the last component is refused, never
followed: it could point at a file the user of strato did not mean to overwrite) and creates
with mode 0600 (what the guest writes is the VM owner's, whatever the umask). What may be at the
path already:

- nothing: a regular file is created;
- a regular file: it is used, and truncated when `truncate` is set (Cloud Hypervisor's
  File::create truncates it too);
- a terminal or a FIFO: it is used as is (a log pipe, `/dev/pts/N`);
- anything else (a symlink, a directory, a socket, a block device, a non-terminal character
  device such as /dev/mem): refused with an OSError whose strerror says what is there.

The type is checked with lstat before opening (so a device is never opened, which can have an
effect of its own) and again with fstat after (the path may change between the two).
"""

from __future__ import annotations

import errno
import os
import stat

PRIVATE_MODE = 0o600


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISCHR, "a character device that is not a terminal"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _refuse(path: str | os.PathLike[str], mode: int) -> OSError:
    code = errno.ELOOP if stat.S_ISLNK(mode) else errno.EINVAL
    if stat.S_ISDIR(mode):
        code = errno.EISDIR
    what = _kind(mode)
    return OSError(code, f"{what}; strato only writes to a regular file, a FIFO or a tty", path)


def _usable(mode: int, fd: int | None) -> bool:
    if stat.S_ISREG(mode) or stat.S_ISFIFO(mode):
        return True
    # A character device only if it is a terminal (checked on the open fd).
    return stat.S_ISCHR(mode) and (fd is None or os.isatty(fd))


def open_private(
    path: str | os.PathLike[str],
    flags: int = os.O_WRONLY,
    *,
    truncate: bool = False,
    mode: int = PRIVATE_MODE,
) -> int:
    """Open (creating it with `mode`) the file at `path` for strato's output; returns the fd.
    `flags` is the access mode plus O_APPEND / O_NONBLOCK as wanted; O_CREAT, O_NOFOLLOW and
    O_CLOEXEC are always added, O_TRUNC is never passed (see `truncate`). Raises OSError
    naming `path` when something other than a regular file, FIFO or tty is there."""
    try:
        before = os.lstat(path).st_mode
    except FileNotFoundError:
        before = None
    if before is not None and not _usable(before, None):
        raise _refuse(path, before)
    flags = (flags & ~os.O_TRUNC) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    if before is not None and not stat.S_ISREG(before):
        flags |= os.O_NOCTTY  # a terminal must not become strato's controlling terminal
    try:
        fd = os.open(path, flags, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # a symlink planted after the lstat
            raise _refuse(path, stat.S_IFLNK) from None
        raise
    try:
        st = os.fstat(fd)
        if not _usable(st.st_mode, fd):
            raise _refuse(path, st.st_mode)
        if truncate and stat.S_ISREG(st.st_mode):
            os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = ["PRIVATE_MODE", "open_private"]
