from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.boot import BootError, Cmdline
from strato.boot._common import cmdline_bytes
from strato.boot.layout import LAYOUT


def test_insert_and_insert_str_join_with_spaces() -> None:
    c = Cmdline(64)
    c.insert_str("console=ttyS0")
    c.insert("root", "/dev/vda")
    c.insert("loglevel", 8)
    c.insert_str("  quiet  ")
    assert str(c) == "console=ttyS0 root=/dev/vda loglevel=8 quiet"
    assert c.as_bytes() == b"console=ttyS0 root=/dev/vda loglevel=8 quiet\0"
    assert len(c) == len(str(c))


def test_value_with_spaces_is_quoted() -> None:
    c = Cmdline(64)
    c.insert("dyndbg", "file virtio.c +p")
    assert str(c) == 'dyndbg="file virtio.c +p"'


def test_capacity_counts_the_nul() -> None:
    c = Cmdline(4)
    c.insert_str("abc")
    assert c.as_bytes() == b"abc\0"
    with pytest.raises(BootError, match="too long"):
        Cmdline(3).insert_str("abc")


def test_too_long_leaves_the_line_unchanged() -> None:
    c = Cmdline(16)
    c.insert_str("console=ttyS0")
    with pytest.raises(BootError, match="too long"):
        c.insert("root", "/dev/vda")
    assert str(c) == "console=ttyS0"


@pytest.mark.parametrize("text", ["a\0b", "tab\there", "new\nline", "caf\u00e9", "\x7f"])
def test_bad_characters_are_rejected(text: str) -> None:
    with pytest.raises(BootError, match="position"):
        Cmdline(100).insert_str(text)


@pytest.mark.parametrize(
    ("key", "value"),
    [("", "x"), ("a b", "x"), ("a=b", "x"), ('a"', "x"), ("k", 'v"q'), ("k", "a\0")],
)
def test_bad_key_or_value_is_rejected(key: str, value: str) -> None:
    with pytest.raises(BootError):
        Cmdline(100).insert(key, value)


def test_zero_capacity_is_rejected() -> None:
    with pytest.raises(BootError, match="capacity"):
        Cmdline(0)


def test_from_str() -> None:
    assert Cmdline.from_str("a=1 b", 10).as_bytes() == b"a=1 b\0"


@given(st.lists(st.text(max_size=30), max_size=8), st.integers(min_value=1, max_value=120))
def test_any_input_either_fits_or_raises_boot_error(parts: list[str], capacity: int) -> None:
    c = Cmdline(capacity)
    accepted: list[str] = []
    for part in parts:
        try:
            c.insert_str(part)
        except BootError:
            continue
        if part.strip(" "):
            accepted.append(part.strip(" "))
    raw = c.as_bytes()
    assert len(raw) <= capacity
    assert raw.endswith(b"\0") and raw.count(b"\0") == 1
    assert raw[:-1].decode("ascii") == " ".join(accepted)


@given(st.text(max_size=20), st.text(max_size=20))
def test_insert_never_raises_anything_but_boot_error(key: str, value: str) -> None:
    c = Cmdline(40)
    try:
        c.insert(key, value)
    except BootError:
        assert str(c) == ""
        return
    assert str(c).startswith(f"{key}=")


def test_loader_cmdline_forms() -> None:
    assert cmdline_bytes(b"a=1\0", LAYOUT) == b"a=1"
    assert cmdline_bytes("a=1", LAYOUT) == b"a=1"
    assert cmdline_bytes(Cmdline.from_str("a=1", 8), LAYOUT) == b"a=1"
    with pytest.raises(BootError, match="NUL byte at position 1"):
        cmdline_bytes(b"a\0b", LAYOUT)
    with pytest.raises(BootError, match="non-ASCII"):
        cmdline_bytes("caf\u00e9", LAYOUT)
    with pytest.raises(BootError, match="too long"):
        cmdline_bytes(b"x" * LAYOUT.cmdline_max, LAYOUT)
