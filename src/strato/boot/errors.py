"""The one exception the boot code raises."""


class BootError(Exception):
    """The guest cannot be booted as asked: a bad kernel image, initramfs, command line or
    machine shape. The message says what is wrong in terms the user can act on."""
