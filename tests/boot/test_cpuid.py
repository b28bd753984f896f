from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.boot import BootError, CpuidEntry, patch_cpuid

HOST = [
    CpuidEntry(0x0, 0, 0, 0x1F, 0x756E6547, 0x6C65746E, 0x49656E69),
    CpuidEntry(0x1, 0, 0, 0x000806C1, 0x07100800, 0x7FFAFBFF, 0xBFEBFBFF),
    CpuidEntry(0x4, 0, 1, 0x1C004121, 0x01C0003F, 0x3F, 0),  # L1d, 8 threads, 8 cores on host
    CpuidEntry(0x4, 3, 1, 0x1C03C163, 0x03C0003F, 0x3FFF, 6),  # L3
    CpuidEntry(0x4, 4, 1, 0, 0, 0, 0),  # end of the cache list
    CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 7),
    CpuidEntry(0xB, 1, 1, 4, 8, 0x201, 7),
    CpuidEntry(0xB, 2, 1, 0, 0, 2, 7),
    CpuidEntry(0x1F, 0, 1, 1, 2, 0x100, 7),
    CpuidEntry(0x1F, 1, 1, 4, 8, 0x201, 7),
    CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
]


def by_key(entries: list[CpuidEntry]) -> dict[tuple[int, int], CpuidEntry]:
    return {(e.function, e.index): e for e in entries}


@given(st.integers(1, 254).flatmap(lambda n: st.tuples(st.integers(0, n - 1), st.just(n))))
def test_identity_and_topology(args: tuple[int, int]) -> None:
    vcpu, n = args
    out = by_key(patch_cpuid(HOST, vcpu, n))
    leaf1 = out[(1, 0)]
    assert leaf1.ebx >> 24 == vcpu
    assert (leaf1.ebx >> 16) & 0xFF == n
    assert leaf1.ebx & 0xFFFF == HOST[1].ebx & 0xFFFF
    assert leaf1.ecx & (1 << 31)
    assert bool(leaf1.edx & (1 << 28)) == (n > 1)
    assert leaf1.eax == HOST[1].eax
    for leaf in (0xB, 0x1F):
        smt, core = out[(leaf, 0)], out[(leaf, 1)]
        assert (smt.eax, smt.ebx, smt.ecx, smt.edx) == (0, 1, 0x100, vcpu)
        assert (core.ebx, core.ecx, core.edx) == (n, 0x201, vcpu)
        assert 1 << core.eax >= n and (core.eax == 0 or 1 << (core.eax - 1) < n)
    assert (out[(0xB, 2)].eax, out[(0xB, 2)].ebx, out[(0xB, 2)].ecx) == (0, 0, 2)
    l1, l3 = out[(4, 0)], out[(4, 3)]
    assert l1.eax >> 26 == min(n - 1, 63) and (l1.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == n - 1
    assert l1.eax & 0x3FFF == HOST[2].eax & 0x3FFF
    assert out[(4, 4)] == HOST[4]
    assert out[(0, 0)] == HOST[0] and out[(0x40000000, 0)] == HOST[-1]


def test_input_is_not_modified() -> None:
    before = list(HOST)
    patch_cpuid(HOST, 1, 2)
    assert HOST == before


@pytest.mark.parametrize(("vcpu", "n"), [(0, 0), (0, 255), (2, 2), (-1, 4)])
def test_bad_arguments(vcpu: int, n: int) -> None:
    with pytest.raises(BootError):
        patch_cpuid(HOST, vcpu, n)
