"""Fuzz targets "bzimage", "elf" and "cmdline": kernel images and command lines.

Images are built field by field (tests/boot/synth.py) with boundary values in every header
field the loaders read, then a few bytes flipped. For any image, command line and initramfs:
- loading ends in a LoadedKernel or a BootError, nothing else;
- a successful load writes guest memory only where it says (the kernel's range, the command
  line buffer, the zero page / PVH info page, the initramfs), with the entry point inside the
  kernel and every range inside RAM;
- the command line in guest memory is exactly what was asked, NUL-terminated.
The existing loader tests feed random and truncated bytes; this adds the structure-aware
fields and the where-did-it-write check. Inputs that once failed live in
tests/fuzz/corpus/{bzimage,elf}/ and are replayed.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, cast

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from strato.boot import BootError, LoadedKernel, load_kernel
from strato.boot._common import cmdline_bytes
from strato.boot.cmdline import Cmdline
from strato.boot.layout import LAYOUT, PVH_INFO_AREA_SIZE
from strato.memory import GuestMemory
from tests.boot.synth import EM_386, EM_X86_64, ET_DYN, ET_EXEC, make_bzimage, make_elf, note
from tests.fuzz._support import corpus_params, count, fuzz_settings

MiB = 1 << 20
RAM = 24 * MiB


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory.anonymous([(0, RAM)])
    yield mem
    mem.close()


def _zero(mem: GuestMemory) -> None:
    mem.fill(0, RAM, 0)


def check_writes(mem: GuestMemory, allowed: list[tuple[int, int]]) -> None:
    """Guest memory started zeroed: every byte outside `allowed` must still be zero."""
    edges = sorted((max(0, a), min(RAM, a + n)) for a, n in allowed if n > 0)
    pos = 0
    for start, end in [*edges, (RAM, RAM)]:
        if start > pos:
            gap = mem.read(pos, start - pos)
            assert gap.count(0) == len(gap), (
                f"write outside the loader's ranges in [{pos:#x}, {start:#x})"
            )
        pos = max(pos, end)


def load_checked(
    mem: GuestMemory, image: bytes, cmdline: Any, initrd: bytes | None
) -> LoadedKernel | None:
    _zero(mem)
    try:
        k = load_kernel(
            mem, io.BytesIO(image), cmdline, io.BytesIO(initrd) if initrd is not None else None
        )
    except BootError:
        return None
    assert 0 < k.kernel_start < k.kernel_end <= RAM
    assert k.kernel_start <= k.entry < k.kernel_end
    assert k.kernel_start >= LAYOUT.high_ram
    cmd = mem.read(k.cmdline_addr, k.cmdline_size + 1)
    assert cmd[-1] == 0 and 0 not in cmd[:-1]
    assert k.cmdline_size + 1 <= LAYOUT.cmdline_max
    if initrd is not None:
        assert k.initramfs_size == len(initrd) and k.initramfs_addr % 4096 == 0
        assert k.kernel_end <= k.initramfs_addr and k.initramfs_addr + len(initrd) <= RAM
        assert mem.read(k.initramfs_addr, len(initrd)) == initrd
    allowed = [
        (k.kernel_start, k.kernel_end - k.kernel_start),
        (k.cmdline_addr, k.cmdline_size + 1),
        (k.boot_info, PVH_INFO_AREA_SIZE),
        (k.initramfs_addr, k.initramfs_size),
    ]
    check_writes(mem, allowed)
    return k


def mutate(image: bytes, flips: list[tuple[int, int]]) -> bytes:
    out = bytearray(image)
    for pos, value in flips:
        if out:
            out[pos % len(out)] = value  # the magic (bytes 0-3) may go too, rarely
    return bytes(out)


flips = st.lists(st.tuples(st.integers(4, 2**16), st.integers(0, 255)), max_size=3)
initrds = st.none() | st.sampled_from([b"", b"x" * 100, b"\x07" * 5000])
cmdlines: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(["", "console=ttyS0", "console=ttyS0 quiet", "a" * 2047]),
    st.sampled_from(["", "console=ttyS0", "a" * 0x10000, "é", "a\x00b", b"x\x00", b"x\x00\x00"]),
    st.binary(max_size=40),
    st.text(max_size=40),
)

# -- bzImage ---------------------------------------------------------------------------------
U32_EDGES = [0, 1, 0x200, 0x1000, 0x100000, 0x1000000, 0x7FFFFFFF, 0xFFFFFFFF]
bz_fields = st.fixed_dictionaries(
    {},
    optional={
        "setup_sects": st.sampled_from([0, 1, 4, 63, 255]),
        "syssize": st.sampled_from([0, 1, 0x100, 0xFFFF, 0x0FFFFFFF, 0xFFFFFFFF]),
        "version": st.sampled_from([0, 0x205, 0x206, 0x20B, 0x20C, 0x20F, 0xFFFF]),
        "loadflags": st.sampled_from([0, 1, 0x81, 0xFF]),
        "xloadflags": st.sampled_from([0, 1, 2, 0xFFFF]),
        "kernel_alignment": st.sampled_from([*U32_EDGES, 3, 0x200001]),
        "relocatable_kernel": st.sampled_from([0, 1, 255]),
        "pref_address": st.sampled_from([0, 0x100000, 0x1000000, 23 * MiB, 2**32, 2**64 - 1]),
        "init_size": st.sampled_from(U32_EDGES),
        "cmdline_size": st.sampled_from([0, 1, 10, 0x7FF, 0xFFFFFFFF]),
        "initrd_addr_max": st.sampled_from(U32_EDGES),
        "jump": st.sampled_from([0x6AEB, 0x00EB, 0x62EB, 0xFFEB]),
        "header": st.sampled_from([0x53726448, 0]),
    },
)


@fuzz_settings(200)
@given(fields=bz_fields, flips=st.just([]) | flips, cmdline=cmdlines, initrd=initrds)
@example(
    fields={"pref_address": 23 * MiB, "init_size": 0xFFFFFFFF}, flips=[], cmdline="", initrd=None
)
@example(fields={"syssize": 0xFFFFFFFF}, flips=[], cmdline="x", initrd=b"x")
def test_bzimage_loader(
    memory: GuestMemory,
    fields: dict[str, int],
    flips: list[tuple[int, int]],
    cmdline: Any,
    initrd: bytes | None,
) -> None:
    count("bzimage")
    image = mutate(make_bzimage(**cast(dict[str, Any], fields)), flips)
    k = load_checked(memory, image, cmdline, initrd)
    if k is not None:
        assert k.entry == k.kernel_start + 0x200


@pytest.mark.parametrize("image", corpus_params("bzimage"))
def test_bzimage_corpus(memory: GuestMemory, image: bytes) -> None:
    count("bzimage")
    load_checked(memory, image, "console=ttyS0", b"initrd")


# -- ELF (PVH) -------------------------------------------------------------------------------
paddrs = st.sampled_from([0, 0xFFFFF, MiB, 2 * MiB, RAM - 0x100, RAM, 2**32, 2**64 - 0x1000])
segment = st.tuples(
    paddrs, st.binary(max_size=64), st.sampled_from([0, 1, 64, 0x1000, 2**32, 2**63])
)
plausible_segment = st.tuples(
    st.sampled_from([MiB, 2 * MiB]),
    st.binary(min_size=1, max_size=64),
    st.sampled_from([64, 0x1000]),
)
segments = st.one_of(
    st.lists(segment, max_size=3),
    st.tuples(plausible_segment, st.lists(segment, max_size=1)).map(lambda t: [t[0], *t[1]]),
    plausible_segment.map(lambda seg: [seg]),
)
notes = st.one_of(
    st.sampled_from([b""]),
    st.sampled_from([MiB, 2 * MiB]).map(lambda e: note(b"Xen", 18, e.to_bytes(8, "little"))),
    st.sampled_from([MiB, 2 * MiB]).map(lambda e: note(b"Xen", 18, e.to_bytes(8, "little"))),
    st.tuples(st.sampled_from([MiB, 2 * MiB, RAM, 2**32 + MiB]), st.sampled_from([4, 8, 2])).map(
        lambda t: note(b"Xen", 18, t[0].to_bytes(8, "little")[: t[1]])
    ),
    st.binary(max_size=40),
)
extra_phdrs = st.lists(
    st.tuples(
        st.sampled_from([1, 4, 0x6474E551, 0x70000000]),
        st.sampled_from([0, 0x40, 2**63, 2**64 - 1]),
        paddrs,
        st.sampled_from([0, 1, 2**21, 2**64 - 1]),
        st.sampled_from([0, 1, 2**21, 2**64 - 1]),
    ),
    max_size=2,
)


@fuzz_settings(200)
@given(
    segs=segments,
    notes_=notes,
    extra=extra_phdrs,
    kind=st.sampled_from(
        [(64, EM_X86_64, ET_EXEC), (32, EM_386, ET_EXEC), (64, EM_X86_64, ET_DYN)]
    ),
    flips=flips,
    cmdline=cmdlines,
    initrd=initrds,
)
@example(  # a segment whose memsz runs past the end of RAM
    segs=[(2 * MiB, b"\x90", 2**63)], notes_=note(b"Xen", 18, (2 * MiB).to_bytes(8, "little")),
    extra=[], kind=(64, EM_X86_64, ET_EXEC), flips=[], cmdline="", initrd=None,
)  # fmt: skip
def test_elf_pvh_loader(
    memory: GuestMemory,
    segs: list[tuple[int, bytes, int]],
    notes_: bytes,
    extra: list[tuple[int, int, int, int, int]],
    kind: tuple[int, int, int],
    flips: list[tuple[int, int]],
    cmdline: Any,
    initrd: bytes | None,
) -> None:
    count("elf")
    elf_class, machine, etype = kind
    if elf_class == 32:  # a 32-bit file holds 32-bit fields
        segs = [(p & 0xFFFF_FFFF, d, m & 0xFFFF_FFFF) for p, d, m in segs]
        extra = [(t, *(v & 0xFFFF_FFFF for v in rest)) for t, *rest in extra]  # type: ignore[misc]
    image = make_elf(
        segs, notes_, elf_class=elf_class, machine=machine, etype=etype, extra_phdrs=extra
    )
    load_checked(memory, mutate(image, flips), cmdline, initrd)


@pytest.mark.parametrize("image", corpus_params("elf"))
def test_elf_corpus(memory: GuestMemory, image: bytes) -> None:
    count("elf")
    load_checked(memory, image, "console=ttyS0", b"initrd")


# -- the kernel command line -----------------------------------------------------------------
@fuzz_settings(600)
@given(
    raw=cmdlines,
    parts=st.lists(
        st.tuples(st.text(max_size=10), st.text(max_size=10) | st.integers()), max_size=5
    ),
    capacity=st.integers(1, 80),
)
@example(raw="a" * (LAYOUT.cmdline_max - 1), parts=[], capacity=1)
@example(raw=b"abc\x00", parts=[("k", 'a "b"')], capacity=80)
def test_kernel_command_line(raw: Any, parts: list[tuple[str, Any]], capacity: int) -> None:
    count("cmdline")
    try:
        out = cmdline_bytes(raw, LAYOUT)
    except BootError:
        pass
    else:
        assert 0 not in out and len(out) + 1 <= LAYOUT.cmdline_max
        expected = raw.encode("ascii") if isinstance(raw, str) else bytes(raw)
        assert out == expected.removesuffix(b"\0")
    c = Cmdline(capacity)
    for key, value in parts:
        before = str(c)
        try:
            c.insert(key, value)
        except BootError:
            assert str(c) == before  # a refused parameter leaves the line as it was
            continue
        assert len(c) + 1 <= capacity
        line = c.as_bytes()
        assert line.endswith(b"\0") and all(0x20 <= b <= 0x7E for b in line[:-1])
        assert f"{key}=" in str(c)
