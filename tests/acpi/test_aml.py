"""The AML encoder: package lengths, integers, names, EISA ids, resource descriptors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.boot.acpi import aml


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of a PkgLength, as an AML interpreter reads it."""
    lead = data[0]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    value = lead & 0x0F
    for i in range(follow):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + follow


@given(st.integers(min_value=0, max_value=(1 << 28) - 5))
def test_pkg_length_round_trip(length: int) -> None:
    enc = aml.pkg_length(length)
    value, used = decode_pkg_length(enc)
    assert used == len(enc)
    assert value == length + used  # PkgLength counts itself
    # the shortest encoding is used
    if used > 1:
        assert length + used - 1 > (0x3F if used == 2 else (1 << (4 + 8 * (used - 2))) - 1)


@pytest.mark.parametrize(
    ("length", "encoded"),
    [
        (0, b"\x01"),
        (62, b"\x3f"),
        (63, b"\x41\x04"),
        (0xFFD, b"\x4f\xff"),
        (0xFFE, b"\x81\x00\x01"),
    ],
)
def test_pkg_length_boundaries(length: int, encoded: bytes) -> None:
    assert aml.pkg_length(length) == encoded


def test_field_lengths_do_not_count_themselves() -> None:
    assert aml.pkg_length(8, include_self=False) == b"\x08"
    assert aml.pkg_length(64, include_self=False) == b"\x40\x04"


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x00"),
        (1, b"\x01"),
        (2, b"\x0a\x02"),
        (0xFF, b"\x0a\xff"),
        (0x100, b"\x0b\x00\x01"),
        (0x1_0000, b"\x0c\x00\x00\x01\x00"),
        (1 << 40, b"\x0e" + struct.pack("<Q", 1 << 40)),
    ],
)
def test_integers(value: int, encoded: bytes) -> None:
    assert aml.integer(value) == encoded


def test_integer_range() -> None:
    with pytest.raises(aml.AmlError):
        aml.integer(-1)
    with pytest.raises(aml.AmlError):
        aml.integer(1 << 64)


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.eisa_id("PNP0C0C") == b"\x0c\x41\xd0\x0c\x0c"
    for bad in ("PNP0A0", "pnp0a03", "PNP0A0G"):
        with pytest.raises(aml.AmlError):
            aml.eisa_id(bad)


def test_names() -> None:
    assert aml.name_string("_HID") == b"_HID"
    assert aml.name_string("GED") == b"GED_"
    assert aml.name_string("\\_SB_") == b"\\_SB_"
    assert aml.name_string("\\_SB_.PWRB") == b"\\\x2e_SB_PWRB"
    assert aml.name_string("_SB_.PCI0.S00_") == b"\x2f\x03_SB_PCI0S00_"
    assert aml.name_string("^^FOO") == b"^^FOO_"
    assert aml.name_string("\\") == b"\\\x00"
    for bad in ("TOOLONG", "1ABC", "a b", "_SB_..X"):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)


def test_strings_packages_buffers() -> None:
    assert aml.string("COM1") == b"\x0dCOM1\x00"
    with pytest.raises(aml.AmlError):
        aml.string("a\x00b")
    assert aml.package(aml.integer(5), aml.integer(0)) == b"\x12\x05\x02\x0a\x05\x00"
    assert aml.buffer(b"\x01\x02") == b"\x11\x05\x0a\x02\x01\x02"
    assert aml.name("_UID", aml.integer(0)) == b"\x08_UID\x00"


def test_method_and_device_framing() -> None:
    m = aml.method("_EVT", 1, aml.return_(aml.integer(0)), serialized=True)
    assert m == b"\x14\x08_EVT\x09\xa4\x00"
    d = aml.device("PWRB", aml.name("_UID", aml.integer(0)))
    assert d[:2] == b"\x5b\x82" and d[3:7] == b"PWRB"
    assert decode_pkg_length(d[2:])[0] == len(d) - 2


def test_resource_descriptors() -> None:
    assert aml.io(0x3F8, 0x3F8, 1, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.memory32_fixed(0xE800_0000, 0x10_0000) == (
        b"\x86\x09\x00\x01" + struct.pack("<II", 0xE800_0000, 0x10_0000)
    )
    assert aml.extended_interrupt(5) == b"\x89\x06\x00\x03\x01\x05\x00\x00\x00"
    wbn = aml.word_bus_number(0, 0)
    assert wbn[0] == 0x88 and struct.unpack_from("<H", wbn, 1)[0] == 13 and wbn[3] == 2
    q = aml.qword_memory(1 << 40, (1 << 40) + (1 << 36) - 1)
    assert q[0] == 0x8A and struct.unpack_from("<H", q, 1)[0] == 43
    assert struct.unpack_from("<Q", q, 6 + 32)[0] == 1 << 36  # length field
    rt = aml.resource_template(aml.irq_no_flags(4))
    assert rt.endswith(b"\x79\x00")
    with pytest.raises(aml.AmlError):
        aml.irq_no_flags(16)
    with pytest.raises(aml.AmlError):
        aml.dword_memory(10, 5)
