"""Build the small test guests in this folder with GNU as/ld at test time.

This folder is on the assembler's include path, so a guest can `.include "pvh_common.S"`.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def build_flat(name: str, out_dir: Path, base: int) -> bytes:
    """Assemble tests/guests/<name>.S and link it as a flat binary starting at `base`."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) are not installed")
    src = HERE / f"{name}.S"
    obj = out_dir / f"{name}.o"
    out = out_dir / f"{name}.bin"
    subprocess.run(["as", "--64", "-I", str(HERE), "-o", str(obj), str(src)], check=True)
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_x86_64",
            f"-Ttext={base:#x}",
            "--oformat",
            "binary",
            "-o",
            str(out),
            str(obj),
        ],
        check=True,
    )
    return out.read_bytes()


def build_elf(name: str, out_dir: Path, extra: list[str] | None = None) -> Path:
    """Assemble and link tests/guests/<name>.S as an ELF using tests/guests/pvh.ld."""
    if shutil.which("as") is None or shutil.which("ld") is None:
        pytest.skip("GNU binutils (as, ld) are not installed")
    src = HERE / f"{name}.S"
    obj = out_dir / f"{name}.o"
    out = out_dir / f"{name}.elf"
    subprocess.run(["as", "--64", "-I", str(HERE), "-o", str(obj), str(src)], check=True)
    subprocess.run(
        [
            "ld",
            "-m",
            "elf_x86_64",
            "-T",
            str(HERE / "pvh.ld"),
            "-o",
            str(out),
            str(obj),
            *(extra or []),
        ],
        check=True,
    )
    return out
