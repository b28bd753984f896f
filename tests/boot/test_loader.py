from __future__ import annotations

import io
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.boot import BootError, BootMode, detect_boot_mode, load_kernel
from strato.memory import GuestMemory
from strato.memory.layout import MiB

from .synth import make_bzimage, make_elf, pvh_note


def test_detects_by_magic() -> None:
    assert detect_boot_mode(io.BytesIO(make_bzimage())) is BootMode.LINUX64
    elf = make_elf([(2 * MiB, b"\xf4", 1)], pvh_note(2 * MiB))
    assert detect_boot_mode(io.BytesIO(elf)) is BootMode.PVH
    with pytest.raises(BootError, match="neither a bzImage nor an ELF"):
        detect_boot_mode(io.BytesIO(b"#!/bin/sh\n"))


def test_dispatches_and_passes_options(mem128: GuestMemory) -> None:
    k = load_kernel(mem128, io.BytesIO(make_bzimage()), b"a", rsdp_addr=0xE0000,
                    reserved=[(100 * MiB, MiB)])  # fmt: skip
    assert k.mode is BootMode.LINUX64 and k.rsdp_addr == 0xE0000
    assert any(e.addr == 100 * MiB for e in k.e820)
    elf = make_elf([(2 * MiB, b"\xf4", 1)], pvh_note(2 * MiB))
    k = load_kernel(mem128, io.BytesIO(elf), b"a", rsdp_addr=0xE0000)
    assert k.mode is BootMode.PVH and k.rsdp_addr == 0xE0000


_MEM = GuestMemory.anonymous([(0, 16 * MiB)])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=1024), st.sampled_from([b"", b"\x7fELF", b"\x7fELF\x02\x01\x01"]))
def test_random_files_are_a_boot_error(data: bytes, prefix: bytes) -> None:
    with pytest.raises(BootError):
        load_kernel(_MEM, io.BytesIO(prefix + data), b"")


def test_boot_does_not_import_kvm() -> None:
    code = "import sys, strato.boot; print(sorted(m for m in sys.modules if m[:7] == 'strato.'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = eval(out.stdout)
    assert modules and not any(m.startswith(("strato.kvm", "strato.devices", "strato.vmm"))
                               for m in modules)  # fmt: skip
