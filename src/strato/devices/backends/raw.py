"""A raw disk image (a regular file or a block device), read and written in place.

I/O goes straight between the file and the caller's buffers with preadv/pwritev (the buffers
are memoryviews of guest memory), looping over short transfers. With `direct=True` the file is
opened O_DIRECT; buffers the kernel cannot take directly (not aligned to `alignment` in address
or length) go through an aligned bounce buffer instead.

Budget per call, whatever the caller's buffers look like: at most one BOUNCE_SIZE bounce
buffer (allocated on first unaligned O_DIRECT transfer, reused, looped over for larger
transfers) and one _ZERO_CHUNK zero buffer (write_zeroes without fallocate support); no copy of
the caller's data otherwise. Each preadv/pwritev system call takes at most IOV_MAX buffers, so a
list longer than the kernel's limit is transferred in pieces rather than refused.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import stat
from collections.abc import Sequence

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

Buffers = Sequence[memoryview]
_ZERO_CHUNK = 1 << 20
BOUNCE_SIZE = 1 << 20  # bytes: the O_DIRECT bounce buffer, a multiple of any sane alignment
IOV_MAX = 1024  # buffers per preadv/pwritev (UIO_MAXIOV)


class DiskError(OSError):
    """A disk image that cannot be opened or used, with its path in the message."""


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate(fd, mode, offset, length) < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate: {os.strerror(err)}")


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """The buffers left after the first n bytes were transferred."""
    i = 0
    while n and n >= len(views[i]):
        n -= len(views[i])
        i += 1
    rest = views[i:]
    if n:
        rest[0] = rest[0][n:]
    return rest


def _host_address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class RawFile:
    """A raw image opened once; `size` is fixed at open (images are not resized under us)."""

    def __init__(
        self, path: str, readonly: bool = False, direct: bool = False, alignment: int = 512
    ) -> None:
        self.path = path
        self.readonly = readonly
        self.direct = direct
        self.alignment = alignment
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(path, flags)
        except OSError as e:
            raise DiskError(e.errno, f"disk {path}: {e.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self._bounce: mmap.mmap | None = None
        self._zeros: mmap.mmap | None = None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for m in (self._bounce, self._zeros):
            if m is not None:
                m.close()
        self._bounce = self._zeros = None

    def __enter__(self) -> RawFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- data --------------------------------------------------------------------------------
    def preadv(self, buffers: Buffers, offset: int) -> int:
        """Fill `buffers` from `offset`; returns the bytes read (fewer only at end of file)."""
        views = [v for v in buffers if len(v)]
        if self.direct and not self._direct_ok(views, offset):
            return self._bounce_read(views, offset)
        n = os.preadv(self.fd, views[:IOV_MAX], offset) if views else 0
        if n == 0 or (len(views) <= IOV_MAX and n == sum(map(len, views))):
            return n
        total = n  # short read, or more than IOV_MAX buffers: go on from where it stopped
        views = _advance(views, n)
        while views:
            n = os.preadv(self.fd, views[:IOV_MAX], offset + total)
            if n == 0:
                break
            total += n
            views = _advance(views, n)
        return total

    def pwritev(self, buffers: Buffers, offset: int) -> int:
        """Write all of `buffers` at `offset`; returns the bytes written."""
        views = [v for v in buffers if len(v)]
        if self.direct and not self._direct_ok(views, offset):
            return self._bounce_write(views, offset)
        total = 0
        want = sum(map(len, views))
        while views:
            n = os.pwritev(self.fd, views[:IOV_MAX], offset + total)
            if n == 0:
                raise OSError(errno.EIO, f"disk {self.path}: write made no progress")
            total += n
            if total == want:
                break
            views = _advance(views, n)
        return total

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def discard(self, offset: int, length: int) -> None:
        """Let the host reclaim the range (a hole); advisory, so unsupported is fine."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        """Make the range read as zeros: a hole if allowed, else zero-range, else plain writes."""
        modes = [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
        if may_unmap:
            modes.insert(0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if self._zeros is None:
            self._zeros = mmap.mmap(-1, _ZERO_CHUNK)  # anonymous: zero-filled, page aligned
        zeros = memoryview(self._zeros)
        try:
            done = 0
            while done < length:
                n = min(_ZERO_CHUNK, length - done)
                self.pwritev([zeros[:n]], offset + done)
                done += n
        finally:
            zeros.release()

    # -- O_DIRECT ---------------------------------------------------------------------------
    def _direct_ok(self, views: list[memoryview], offset: int) -> bool:
        a = self.alignment
        if offset % a:
            return False
        for v in views:
            if len(v) % a or v.readonly or _host_address(v) % a:
                return False
        return True

    def _bounce_buffer(self) -> memoryview:
        """The bounce buffer: BOUNCE_SIZE bytes (or one alignment unit if that is larger),
        page aligned as O_DIRECT wants, made once and kept."""
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, max(BOUNCE_SIZE, self.alignment, mmap.PAGESIZE))
        return memoryview(self._bounce)

    def _bounce_read(self, views: list[memoryview], offset: int) -> int:
        # Read whole aligned blocks around the request, a bounce buffer at a time, and copy
        # the part asked for into the caller's buffers.
        a = self.alignment
        want = sum(len(v) for v in views)
        buf = self._bounce_buffer()
        chunk = len(buf) - len(buf) % a
        vi = voff = 0  # where the next byte goes: views[vi][voff]
        done = 0  # bytes of the request delivered
        try:
            while done < want:
                pos = offset + done
                start = pos - pos % a
                end = min(start + chunk, -(-(offset + want) // a) * a)
                got = 0
                while got < end - start:
                    n = os.preadv(self.fd, [buf[got : end - start]], start + got)
                    if n == 0:
                        break
                    got += n
                left = min(want - done, got - (pos - start))
                if left <= 0:
                    break  # end of file
                src = pos - start
                done += left
                while left:
                    v = views[vi]
                    k = min(len(v) - voff, left)
                    v[voff : voff + k] = buf[src : src + k]
                    src += k
                    left -= k
                    voff += k
                    if voff == len(v):
                        vi += 1
                        voff = 0
                if got < end - start:
                    break  # end of file inside this block
            return done
        finally:
            buf.release()

    def _bounce_write(self, views: list[memoryview], offset: int) -> int:
        a = self.alignment
        want = sum(len(v) for v in views)
        if offset % a or want % a:
            # Read-modify-write would race with other writers; the guest sends whole sectors.
            raise OSError(errno.EINVAL, f"disk {self.path}: unaligned O_DIRECT write")
        buf = self._bounce_buffer()
        chunk = len(buf) - len(buf) % a
        vi = voff = 0  # the next byte to write: views[vi][voff]
        done = 0
        try:
            while done < want:
                size = min(chunk, want - done)
                pos = 0
                while pos < size:
                    v = views[vi]
                    k = min(len(v) - voff, size - pos)
                    buf[pos : pos + k] = v[voff : voff + k]
                    pos += k
                    voff += k
                    if voff == len(v):
                        vi += 1
                        voff = 0
                put = 0
                while put < size:
                    n = os.pwritev(self.fd, [buf[put:size]], offset + done + put)
                    if n == 0:
                        raise OSError(errno.EIO, f"disk {self.path}: write made no progress")
                    put += n
                done += size
            return want
        finally:
            buf.release()
