"""strato's newc writer: round trip through an independent reader and through GNU cpio."""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.images.cpio import CpioWriter
from tests.images.cpio_reader import read_newc


def build(fill: object) -> bytes:
    out = io.BytesIO()
    with CpioWriter(out) as cpio:
        fill(cpio)  # type: ignore[operator]
    return out.getvalue()


def sample(cpio: CpioWriter) -> None:
    cpio.add_dir("/bin", 0o755)
    cpio.add_file("/bin/tool", b"\x7fELF-not-really", 0o755)
    cpio.add_symlink("/bin/sh", "tool")
    cpio.add_dir("tmp", 0o1777)
    cpio.add_device("/dev/console", 0o600, 5, 1)
    cpio.add_device("dev/sda", 0o660, 8, 0, block=True)
    cpio.add_file("etc/empty", b"")
    cpio.add_file("etc/three", b"abc", 0o600)


def test_round_trip_entries_and_order() -> None:
    entries = read_newc(build(sample))
    assert [(e.name, e.kind) for e in entries] == [
        ("bin", "dir"),
        ("bin/tool", "file"),
        ("bin/sh", "symlink"),
        ("tmp", "dir"),
        ("dev", "dir"),  # implicit parent, created before its first child
        ("dev/console", "chr"),
        ("dev/sda", "blk"),
        ("etc", "dir"),
        ("etc/empty", "file"),
        ("etc/three", "file"),
    ]
    by_name = {e.name: e for e in entries}
    assert by_name["bin/tool"].data == b"\x7fELF-not-really"
    assert stat.S_IMODE(by_name["bin/tool"].mode) == 0o755
    assert by_name["bin/sh"].data == b"tool"
    assert stat.S_IMODE(by_name["tmp"].mode) == 0o1777
    assert (by_name["dev/console"].rdevmajor, by_name["dev/console"].rdevminor) == (5, 1)
    assert stat.S_IMODE(by_name["dev/console"].mode) == 0o600
    assert (by_name["dev/sda"].rdevmajor, by_name["dev/sda"].rdevminor) == (8, 0)
    assert stat.S_IMODE(by_name["dev"].mode) == 0o755
    assert by_name["etc/three"].data == b"abc"
    assert all(e.uid == 0 and e.gid == 0 and e.mtime == 0 for e in entries)
    assert [e.ino for e in entries] == list(range(1, len(entries) + 1))
    assert all(e.nlink == (2 if e.kind == "dir" else 1) for e in entries)


def test_deterministic() -> None:
    assert build(sample) == build(sample)


def test_fixed_mtime() -> None:
    out = io.BytesIO()
    with CpioWriter(out, mtime=1_700_000_000) as cpio:
        cpio.add_file("a", b"x")
    assert read_newc(out.getvalue())[0].mtime == 1_700_000_000


@pytest.mark.parametrize("name", ["a", "ab", "abc", "abcd", "abcde"])
@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 8])
def test_padding_for_every_name_and_data_length(name: str, size: int) -> None:
    data = bytes(range(size))
    archive = build(lambda c: c.add_file(name, data))
    # Header 110 + name + NUL, padded to 4; data padded to 4; then the trailer.
    name_part = (110 + len(name) + 1 + 3) & ~3
    data_part = (size + 3) & ~3
    trailer = (110 + len("TRAILER!!!") + 1 + 3) & ~3
    assert len(archive) == name_part + data_part + trailer
    assert archive[name_part + data_part :].startswith(b"070701")
    [entry] = read_newc(archive)
    assert (entry.name, entry.data) == (name, data)


def test_header_is_ascii_hex() -> None:
    archive = build(lambda c: c.add_file("f", b"1234"))
    header = archive[:110]
    assert header[:6] == b"070701"
    assert all(chr(b) in "0123456789ABCDEF" for b in header[6:])
    assert int(header[6 + 8 * 6 : 6 + 8 * 7], 16) == 4  # filesize
    assert int(header[6 + 8 * 11 : 6 + 8 * 12], 16) == 2  # namesize "f\0"


def test_file_from_path_streams_its_content(tmp_path: Path) -> None:
    src = tmp_path / "blob"
    payload = os.urandom(3 * (1 << 20) + 5)  # crosses the copy chunk size
    src.write_bytes(payload)
    [entry] = read_newc(build(lambda c: c.add_file("blob", src, 0o755)))
    assert entry.data == payload
    assert stat.S_IMODE(entry.mode) == 0o755


def test_close_is_idempotent_and_final() -> None:
    out = io.BytesIO()
    cpio = CpioWriter(out)
    cpio.add_file("a", b"1")
    cpio.close()
    size = len(out.getvalue())
    cpio.close()
    assert len(out.getvalue()) == size
    with pytest.raises(ValueError, match="closed"):
        cpio.add_file("b", b"2")


def test_add_dir_again_with_same_mode_is_a_no_op() -> None:
    def fill(c: CpioWriter) -> None:
        c.add_file("d/f", b"")
        c.add_dir("d", 0o755)

    assert [e.name for e in read_newc(build(fill))] == ["d", "d/f"]


@pytest.mark.parametrize(
    ("fill", "message"),
    [
        (lambda c: (c.add_file("a", b""), c.add_file("/a", b"")), "already added"),
        (lambda c: (c.add_file("d/f", b""), c.add_dir("d", 0o700)), "already added"),
        (lambda c: c.add_file("a/../../etc/passwd", b""), r"'\.\.'"),
        (lambda c: c.add_file("/", b""), "empty"),
        (lambda c: c.add_symlink("l", ""), "empty target"),
        (lambda c: (c.add_file("f", b""), c.add_file("f/g", b"")), "not a directory"),
        (lambda c: c.add_device("d", stat.S_IFREG | 0o600, 1, 1), "not a device"),
        (lambda c: c.add_device("d", 0o600, 1 << 32, 1), "32 bits"),
    ],
)
def test_rejects_bad_entries(fill: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build(fill)


names = st.lists(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12).filter(
        lambda s: s not in (".", "..")
    ),
    min_size=1,
    max_size=4,
).map("/".join)


@given(st.dictionaries(names, st.binary(max_size=70), max_size=12))
def test_round_trip_property(files: dict[str, bytes]) -> None:
    def fill(c: CpioWriter) -> None:
        for name, data in files.items():
            try:
                c.add_file(name, data)
            except ValueError:
                pass  # a name that is also another file's parent directory

    entries = read_newc(build(fill))
    read_files = {e.name: e.data for e in entries if e.kind == "file"}
    for name, data in read_files.items():
        assert files[name] == data
    # Every file is present unless an earlier file occupies one of its parent paths.
    for name in files:
        if name not in read_files:
            parents = ["/".join(name.split("/")[:i]) for i in range(1, name.count("/") + 1)]
            assert any(p in read_files for p in parents) or name in {
                e.name for e in entries if e.kind == "dir"
            }


def test_system_cpio_extracts_it(system_cpio: str, tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(build(sample))
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        [system_cpio, "-idv", "--no-absolute-filenames", "-F", str(archive)],
        cwd=out,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = [line for line in done.stderr.splitlines() if not line.endswith("blocks")]
    expected = ["bin", "bin/tool", "bin/sh", "tmp", "dev", "dev/console", "dev/sda", "etc"]
    assert listed == [*expected, "etc/empty", "etc/three"]
    assert (out / "bin/tool").read_bytes() == b"\x7fELF-not-really"
    assert stat.S_IMODE((out / "bin/tool").stat().st_mode) == 0o755
    assert os.readlink(out / "bin/sh") == "tool"
    assert (out / "etc/three").read_bytes() == b"abc"
    assert (out / "etc/empty").read_bytes() == b""
    assert stat.S_IMODE((out / "tmp").stat().st_mode) == 0o1777
    if os.geteuid() == 0:  # only root can create device nodes
        console = (out / "dev/console").lstat()
        assert stat.S_ISCHR(console.st_mode)
        assert (os.major(console.st_rdev), os.minor(console.st_rdev)) == (5, 1)
        sda = (out / "dev/sda").lstat()
        assert stat.S_ISBLK(sda.st_mode)
        assert (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)


def test_system_cpio_lists_it(system_cpio: str, tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(build(sample))
    done = subprocess.run(
        [system_cpio, "-itv", "-F", str(archive)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("drwxr-xr-x") and lines[0].endswith(" bin")
    assert any(line.startswith("crw-------") and " 5,   1 " in line for line in lines)
    assert any(line.endswith("bin/sh -> tool") for line in lines)
