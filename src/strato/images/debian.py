"""Debian's cloud kernel and static busybox, downloaded with apt and cached per user.

Cache layout (``cache_root()``):

- ``kernels/<release>/``: ``bzImage`` (the package's vmlinuz), ``vmlinux`` (the ELF inside
  it, for PVH boot), ``config``, ``modules/`` (the package's ``lib/modules/<release>``),
  ``package`` (which .deb it came from).
- ``busybox/<version>/busybox``.

Without ``refresh`` a call that finds anything in the cache uses the newest cached entry and
runs no apt command at all; with ``refresh`` it asks apt for the newest package (running
``apt-get update`` only if apt-cache does not know the package) and downloads it if new.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from strato.images import apt
from strato.images.bzimage import extract_vmlinux, parse_setup_header
from strato.images.cache import (
    cache_lock,
    cache_root,
    newest_entry,
    publish,
    staging_dir,
    version_key,
)
from strato.images.errors import ImageError

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
_KERNEL_PACKAGE = re.compile(r"linux-image-(?P<release>[0-9][^ ]*-cloud-amd64)(-unsigned)?")


@dataclass(frozen=True)
class DebianKernel:
    bzimage: Path
    vmlinux: Path
    modules_dir: Path  # lib/modules/<version>: kernel/..., modules.order, modules.builtin
    version: str  # the kernel release (uname -r), e.g. 6.1.0-56-cloud-amd64


def _kernel_from_dir(directory: Path) -> DebianKernel | None:
    kernel = DebianKernel(
        bzimage=directory / "bzImage",
        vmlinux=directory / "vmlinux",
        modules_dir=directory / "modules",
        version=directory.name,
    )
    if kernel.bzimage.is_file() and kernel.vmlinux.is_file() and kernel.modules_dir.is_dir():
        return kernel
    return None


def newest_kernel_release() -> str:
    """The release of the newest cloud kernel apt knows (``6.1.0-56-cloud-amd64``)."""
    apt.require_tools()
    apt.ensure_known(KERNEL_METAPACKAGE)
    for dep in apt.depends_of(KERNEL_METAPACKAGE):
        match = _KERNEL_PACKAGE.fullmatch(dep)
        if match:
            return match["release"]
    # The metapackage names no image package: take the highest versioned one apt has.
    releases = {
        m["release"]
        for name in apt.search_names(r"^linux-image-[0-9].*-cloud-amd64(-unsigned)?$")
        if (m := _KERNEL_PACKAGE.fullmatch(name))
    }
    if not releases:
        raise ImageError(f"apt knows no linux-image-*-cloud-amd64 package ({KERNEL_METAPACKAGE})")
    return max(releases, key=version_key)


def ensure_debian_kernel(cache_dir: Path | None = None, *, refresh: bool = False) -> DebianKernel:
    """Debian's cloud kernel as bzImage, vmlinux and modules, from the cache or apt."""
    root = cache_root(cache_dir)
    kernels = root / "kernels"
    if not refresh:
        newest = newest_entry(kernels)
        if newest is not None and (cached := _kernel_from_dir(newest)) is not None:
            return cached
    release = newest_kernel_release()
    with cache_lock(root):
        cached = _kernel_from_dir(kernels / release)
        if cached is not None:
            return cached
        with staging_dir(root) as staging:
            _fetch_kernel(release, staging)
            publish(staging / "entry", kernels / release)
    kernel = _kernel_from_dir(kernels / release)
    assert kernel is not None
    return kernel


def _fetch_kernel(release: str, staging: Path) -> None:
    package = f"linux-image-{release}"
    deb = apt.download_first([package, f"{package}-unsigned"], staging)
    unpacked = staging / "deb"
    apt.deb_extract(deb, unpacked)
    vmlinuz = unpacked / "boot" / f"vmlinuz-{release}"
    modules = next(
        (
            d
            for d in (unpacked / "lib/modules" / release, unpacked / "usr/lib/modules" / release)
            if d.is_dir()
        ),
        None,
    )
    if not vmlinuz.is_file() or modules is None:
        raise ImageError(f"{deb.name} has no boot/vmlinuz-{release} or lib/modules/{release}")

    entry = staging / "entry"
    entry.mkdir()
    image = vmlinuz.read_bytes()
    parse_setup_header(image)  # fails early and clearly on something that is no bzImage
    (entry / "vmlinux").write_bytes(extract_vmlinux(image))
    shutil.move(vmlinuz, entry / "bzImage")
    config = unpacked / "boot" / f"config-{release}"
    if config.is_file():
        shutil.move(config, entry / "config")
    shutil.move(modules, entry / "modules")
    version = apt.deb_field(deb, "Version")
    (entry / "package").write_text(f"{apt.deb_field(deb, 'Package')} {version}\n")


def ensure_busybox(cache_dir: Path | None = None, *, refresh: bool = False) -> Path:
    """A static x86-64 busybox binary from Debian's busybox-static, cached."""
    root = cache_root(cache_dir)
    store = root / "busybox"
    if not refresh:
        newest = newest_entry(store)
        if newest is not None and (newest / "busybox").is_file():
            return newest / "busybox"
    apt.require_tools()
    apt.ensure_known(BUSYBOX_PACKAGE)
    version = apt.candidate_version(BUSYBOX_PACKAGE).replace(":", "_")
    final = store / version / "busybox"
    with cache_lock(root):
        if final.is_file():
            return final
        with staging_dir(root) as staging:
            deb = apt.download(BUSYBOX_PACKAGE, staging)
            unpacked = staging / "deb"
            apt.deb_extract(deb, unpacked)
            binary = next(
                (
                    p
                    for p in (unpacked / "bin/busybox", unpacked / "usr/bin/busybox")
                    if p.is_file()
                ),
                None,
            )
            if binary is None:
                raise ImageError(f"{deb.name} has no bin/busybox")
            entry = staging / "entry"
            entry.mkdir()
            shutil.move(binary, entry / "busybox")
            publish(entry, store / version)
    return final
