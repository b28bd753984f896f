"""The per-user cache that holds downloaded packages and built guests.

Every cached item is built in a staging directory under ``<root>/tmp`` and renamed into
place when complete, so a directory that exists under its final name is whole. A lock file
serialises builders (two test processes, or a test and the CLI).
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def cache_root(cache_dir: Path | None = None) -> Path:
    """``cache_dir``, else ``$XDG_CACHE_HOME/strato``, else ``~/.cache/strato`` (created)."""
    if cache_dir is None:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        # The XDG spec says to ignore a relative value.
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
        cache_dir = base / "strato"
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir


@contextmanager
def cache_lock(root: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache while building into it."""
    with (root / ".lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


@contextmanager
def staging_dir(root: Path) -> Iterator[Path]:
    """A scratch directory on the cache's file system, removed afterwards."""
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=tmp))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def publish(staged: Path, final: Path) -> None:
    """Move a complete ``staged`` directory to ``final`` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staged, final)


def version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort key that orders ``6.1.0-9`` before ``6.1.0-56`` (digit runs compare as numbers)."""
    return tuple(
        (int(part), "") if part.isdigit() else (-1, part)
        for part in re.findall(r"\d+|\D+", version)
    )


def newest_entry(directory: Path) -> Path | None:
    """The complete entry of ``directory`` with the highest version-like name, if any."""
    if not directory.is_dir():
        return None
    entries = [p for p in directory.iterdir() if p.is_dir()]
    return max(entries, key=lambda p: version_key(p.name), default=None)
