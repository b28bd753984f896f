from __future__ import annotations

import struct

import pytest

from strato.boot import BootError, build_mptable, write_mptable
from strato.boot.layout import mptable_limit
from strato.memory import GuestMemory
from strato.memory.layout import LAYOUT


def parse(table: bytes) -> dict[str, object]:
    assert table[:4] == b"_MP_" and sum(table[:16]) % 256 == 0
    physptr, length, spec = struct.unpack_from("<IBB", table, 4)
    assert (length, spec) == (1, 4)
    config = table[physptr - LAYOUT.mptable :]
    sig, size, spec, _, oem, product, _, _, count, lapic, _ = struct.unpack_from(
        "<4sHBB8s12sIHHII", config
    )
    assert sig == b"PCMP" and spec == 4 and sum(config[:size]) % 256 == 0
    assert (oem, product) == (b"STRATO  ", b"STRATO VM   ")
    assert physptr + size == LAYOUT.mptable + len(table)
    entries: list[tuple[int, bytes]] = []
    off = 44
    while off < size:
        kind = config[off]
        n = 20 if kind == 0 else 8
        entries.append((kind, config[off : off + n]))
        off += n
    assert off == size and len(entries) == count
    return {"lapic": lapic, "entries": entries}


@pytest.mark.parametrize("n", [1, 2, 7, 254])
def test_table_lists_every_vcpu_the_ioapic_and_the_isa_irqs(n: int) -> None:
    table = parse(build_mptable(n))
    assert table["lapic"] == LAYOUT.lapic
    entries = table["entries"]
    assert isinstance(entries, list)
    cpus = [struct.unpack("<BBBBII8x", e) for k, e in entries if k == 0]
    assert [c[1] for c in cpus] == list(range(n))
    assert [c[3] for c in cpus] == [3] + [1] * (n - 1)  # enabled, BSP flag on 0
    (bus,) = [e for k, e in entries if k == 1]
    assert bus[2:8] == b"ISA   "
    (ioapic,) = [struct.unpack("<BBBBI", e) for k, e in entries if k == 2]
    assert (ioapic[1], ioapic[3], ioapic[4]) == (n, 1, LAYOUT.ioapic)
    irqs = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 3]
    assert [(i[4], i[5], i[6]) for i in irqs] == [(irq, n, irq) for irq in range(16)]
    lints = [struct.unpack("<BBHBBBB", e) for k, e in entries if k == 4]
    assert [(i[1], i[5], i[6]) for i in lints] == [(3, 0, 0), (1, 0xFF, 1)]  # ExtINT, NMI


def test_too_many_vcpus() -> None:
    with pytest.raises(BootError, match=r"1\.\.254"):
        build_mptable(255)
    with pytest.raises(BootError):
        build_mptable(0)


def test_254_vcpus_fit_before_the_acpi_area() -> None:
    assert LAYOUT.mptable + len(build_mptable(254)) <= mptable_limit()


def test_written_into_guest_memory(mem128: GuestMemory) -> None:
    size = write_mptable(mem128, 4)
    assert mem128.read(LAYOUT.mptable, size) == build_mptable(4)
    assert LAYOUT.mptable == 639 * 1024  # where Linux scans for "_MP_"


def test_memory_too_small_for_the_table() -> None:
    mem = GuestMemory.anonymous([(0, 0x9FC00)])
    try:
        with pytest.raises(BootError, match="does not cover"):
            write_mptable(mem, 1)
    finally:
        mem.close()
