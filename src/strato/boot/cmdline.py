"""A capacity-checked kernel command line (in the spirit of linux-loader's `Cmdline`)."""

from __future__ import annotations

from strato.boot.errors import BootError

__all__ = ["Cmdline", "check_cmdline_text"]


def _describe(ch: str) -> str:
    return "a NUL byte" if ch == "\0" else f"the character {ch!r}"


def check_cmdline_text(text: str, what: str = "kernel command line") -> None:
    """Raise BootError unless `text` is printable ASCII (spaces allowed)."""
    for pos, ch in enumerate(text):
        if not (" " <= ch <= "~"):
            raise BootError(
                f"{what} contains {_describe(ch)} at position {pos}; "
                "only printable ASCII characters and spaces are allowed"
            )


class Cmdline:
    """A kernel command line that never grows past `capacity` bytes.

    `capacity` counts the terminating NUL, as the kernel's buffer does: a capacity of 2048
    holds 2047 characters.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise BootError(f"kernel command line capacity must be at least 1 byte, not {capacity}")
        self.capacity = capacity
        self._line = ""

    @classmethod
    def from_str(cls, text: str, capacity: int) -> Cmdline:
        cmdline = cls(capacity)
        cmdline.insert_str(text)
        return cmdline

    def _append(self, part: str) -> None:
        new = f"{self._line} {part}" if self._line else part
        if len(new) + 1 > self.capacity:
            raise BootError(
                f"kernel command line too long: {len(new)} characters plus the terminating NUL "
                f"do not fit in {self.capacity} bytes (while adding {part[:40]!r})"
            )
        self._line = new

    def insert(self, key: str, value: str | int) -> None:
        """Append `key=value`. A value with spaces is quoted, as the kernel parser expects."""
        if not key:
            raise BootError("kernel command line parameter name is empty")
        check_cmdline_text(key, f"kernel command line parameter name {key!r}")
        for bad in (" ", "=", '"'):
            if bad in key:
                raise BootError(
                    f"kernel command line parameter name {key!r} must not contain {bad!r}"
                )
        text = str(value)
        check_cmdline_text(text, f"value of kernel command line parameter {key!r}")
        if '"' in text:
            raise BootError(f"value of kernel command line parameter {key!r} must not contain '\"'")
        if " " in text:
            text = f'"{text}"'
        self._append(f"{key}={text}")

    def insert_str(self, text: str) -> None:
        """Append free text (one or more parameters); surrounding spaces are dropped."""
        check_cmdline_text(text)
        text = text.strip(" ")
        if text:
            self._append(text)

    def as_bytes(self) -> bytes:
        """The command line as the guest reads it: ASCII, NUL-terminated."""
        return self._line.encode("ascii") + b"\0"

    def __str__(self) -> str:
        return self._line

    def __len__(self) -> int:
        """Characters, without the terminating NUL."""
        return len(self._line)

    def __repr__(self) -> str:
        return f"Cmdline({self._line!r}, capacity={self.capacity})"
