"""A strict newc reader written for the tests, independent of the writer's code."""

from __future__ import annotations

import stat
from dataclasses import dataclass

_FIELDS = (
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
)


@dataclass
class Entry:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdevmajor: int
    rdevminor: int
    data: bytes

    @property
    def kind(self) -> str:
        m = self.mode
        if stat.S_ISDIR(m):
            return "dir"
        if stat.S_ISREG(m):
            return "file"
        if stat.S_ISLNK(m):
            return "symlink"
        if stat.S_ISCHR(m):
            return "chr"
        if stat.S_ISBLK(m):
            return "blk"
        return "other"


def read_newc(archive: bytes) -> list[Entry]:
    """Parse a whole archive; checks magic, alignment and zero padding. Stops at the trailer."""
    entries: list[Entry] = []
    pos = 0
    while True:
        assert pos % 4 == 0, f"header at {pos} is not 4-byte aligned"
        header = archive[pos : pos + 110]
        assert len(header) == 110, "archive ends inside a header (no trailer?)"
        assert header[:6] == b"070701", f"bad magic {header[:6]!r} at {pos}"
        values = {field: int(header[6 + 8 * i : 14 + 8 * i], 16) for i, field in enumerate(_FIELDS)}
        assert values["check"] == 0
        name_end = pos + 110 + values["namesize"]
        raw_name = archive[pos + 110 : name_end]
        assert raw_name.endswith(b"\0") and b"\0" not in raw_name[:-1]
        name = raw_name[:-1].decode()
        data_start = (name_end + 3) & ~3
        assert archive[name_end:data_start] == b"\0" * (data_start - name_end)
        data_end = data_start + values["filesize"]
        data = archive[data_start:data_end]
        assert len(data) == values["filesize"], "archive ends inside file data"
        pos = (data_end + 3) & ~3
        assert archive[data_end:pos] == b"\0" * (pos - data_end)
        if name == "TRAILER!!!":
            assert values["filesize"] == 0
            return entries
        entries.append(
            Entry(
                name=name,
                ino=values["ino"],
                mode=values["mode"],
                uid=values["uid"],
                gid=values["gid"],
                nlink=values["nlink"],
                mtime=values["mtime"],
                rdevmajor=values["rdevmajor"],
                rdevminor=values["rdevminor"],
                data=data,
            )
        )
