"""Default guests for strato: Debian's cloud kernel and a busybox initramfs.

A leaf utility (it imports nothing else from strato) used by the CLI and the tests::

    guest = ensure_default_guest()
    # guest.kernel.bzimage, guest.kernel.vmlinux, guest.initramfs, guest.cmdline, guest.marker

``python -m strato.images`` builds it (if not cached) and prints the paths.
"""

from strato.images.cpio import CpioWriter
from strato.images.debian import DebianKernel, ensure_busybox, ensure_debian_kernel
from strato.images.errors import ImageError
from strato.images.initramfs import (
    DEFAULT_CMDLINE,
    END_MARKER,
    MARKER,
    DefaultGuest,
    ensure_default_guest,
)

__all__ = [
    "DEFAULT_CMDLINE",
    "END_MARKER",
    "MARKER",
    "CpioWriter",
    "DebianKernel",
    "DefaultGuest",
    "ImageError",
    "ensure_busybox",
    "ensure_debian_kernel",
    "ensure_default_guest",
]
