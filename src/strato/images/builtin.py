"""The built-in test guest: a freestanding PVH ELF built from the repository's guest/ directory.

It is compiled with the system gcc and binutils (``make -C guest``); make keeps it
cached. What the guest does and how it reports is described in guest/README.md::

    elf = ensure_builtin_guest()  # Path to guest/build/strato-guest.elf
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

from strato.images.errors import ImageError

GUEST_DIR = Path(__file__).resolve().parents[3] / "guest"
ELF_NAME = "strato-guest.elf"
_TOOLS = ("make", "gcc", "ld")


def builtin_guest_path(guest_dir: Path = GUEST_DIR) -> Path:
    """Where the ELF is (or will be) built."""
    return guest_dir / "build" / ELF_NAME


def ensure_builtin_guest(guest_dir: Path = GUEST_DIR, timeout: float = 300.0) -> Path:
    """Build the guest if its sources changed (make decides) and return the ELF's path."""
    if not (guest_dir / "Makefile").is_file():
        raise ImageError(
            f"the built-in guest's sources are not at {guest_dir} "
            "(it is built from a strato source checkout)"
        )
    missing = [tool for tool in _TOOLS if shutil.which(tool) is None]
    if missing:
        raise ImageError(
            f"building the built-in guest needs {', '.join(missing)}: "
            "install gcc, binutils and make (Debian: apt-get install build-essential)"
        )
    build = guest_dir / "build"
    build.mkdir(exist_ok=True)
    # One build at a time: tests in parallel processes may all ask for the guest.
    with open(build / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            result = subprocess.run(
                ["make", "-C", str(guest_dir), "--no-print-directory"],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ImageError(f"building the built-in guest took more than {timeout:.0f} s") from e
    elf = builtin_guest_path(guest_dir)
    if result.returncode != 0 or not elf.is_file():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise ImageError(f"building the built-in guest failed (make -C {guest_dir}):\n{tail}")
    return elf
