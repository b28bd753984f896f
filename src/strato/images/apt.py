"""Thin wrappers around Debian's apt-get, apt-cache and dpkg-deb."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from strato.images.errors import ImageError

_APT_TOOLS = ("apt-get", "apt-cache", "dpkg-deb")


def require_tools(tools: Sequence[str] = _APT_TOOLS) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ImageError(
            f"{', '.join(missing)} not found: building the default guest needs a Debian-based "
            "host with apt (or pass --kernel/--initramfs of your own)"
        )


def run(cmd: Sequence[str], *, cwd: Path | None = None) -> str:
    """Run ``cmd``; return its stdout, or raise ImageError with its stderr."""
    try:
        done = subprocess.run(list(cmd), cwd=cwd, capture_output=True, check=False)
    except OSError as e:
        raise ImageError(f"cannot run {cmd[0]}: {e}") from e
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        raise ImageError(f"{' '.join(cmd)} failed (exit {done.returncode}): {err}")
    return done.stdout.decode(errors="replace")


def package_known(name: str) -> bool:
    """Whether apt's package lists have a downloadable ``name`` (no network)."""
    done = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", name], capture_output=True, check=False
    )
    return done.returncode == 0 and bool(done.stdout.strip())


def candidate_version(name: str) -> str:
    """The version ``apt-get download name`` would fetch (no network)."""
    for line in run(["apt-cache", "show", "--no-all-versions", name]).splitlines():
        if line.startswith("Version:"):
            return line.partition(":")[2].strip()
    raise ImageError(f"apt-cache shows no version for {name}")


def update_lists() -> None:
    """``apt-get update``: the one step here that needs root and the network."""
    if os.geteuid() != 0:
        raise ImageError(
            "apt's package lists do not know the packages strato needs; run "
            "'sudo apt-get update' once, then try again"
        )
    # Wait for another apt run (an install on the same machine) instead of failing at once.
    run(["apt-get", "-o", "DPkg::Lock::Timeout=120", "update"])


def ensure_known(name: str) -> None:
    """Make sure apt-cache knows ``name``, running ``apt-get update`` once if it does not."""
    if package_known(name):
        return
    update_lists()
    if not package_known(name):
        raise ImageError(f"Debian package {name} is not available from this host's apt sources")


def depends_of(package: str) -> list[str]:
    """The package names that ``package`` depends on (first alternative of each)."""
    names = []
    for line in run(["apt-cache", "depends", package]).splitlines():
        key, _, value = line.strip().partition(":")
        if key in ("Depends", "|Depends") and value.strip() and not value.strip().startswith("<"):
            names.append(value.strip())
    return names


def search_names(pattern: str) -> list[str]:
    """Package names matching the regular expression ``pattern`` (``apt-cache search``)."""
    out = run(["apt-cache", "search", "--names-only", pattern])
    return [line.split(" - ", 1)[0].strip() for line in out.splitlines() if line.strip()]


def download(name: str, dest: Path) -> Path:
    """``apt-get download name`` into ``dest``; return the .deb file."""
    before = set(dest.glob("*.deb"))
    cmd = ["apt-get", "download"]
    if os.geteuid() == 0:
        # apt drops to user _apt for downloads, which cannot write a private cache dir.
        cmd += ["-o", "APT::Sandbox::User=root"]
    run([*cmd, name], cwd=dest)
    new = sorted(set(dest.glob("*.deb")) - before)
    if len(new) != 1:
        raise ImageError(f"apt-get download {name} produced {len(new)} .deb files, expected 1")
    return new[0]


def download_first(names: Sequence[str], dest: Path) -> Path:
    """Download the first of ``names`` that apt can fetch."""
    errors = []
    for name in names:
        try:
            return download(name, dest)
        except ImageError as e:
            errors.append(str(e))
    raise ImageError("could not download any of " + ", ".join(names) + ": " + "; ".join(errors))


def deb_field(deb: Path, field: str) -> str:
    return run(["dpkg-deb", "--field", str(deb), field]).strip()


def deb_extract(deb: Path, dest: Path) -> None:
    run(["dpkg-deb", "-x", str(deb), str(dest)])
