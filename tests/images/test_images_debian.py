"""The Debian kernel and the default guest, fetched once into the per-user cache."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from elftools.elf.elffile import ELFFile

from strato.images import (
    DebianKernel,
    DefaultGuest,
    ImageError,
    ensure_busybox,
    ensure_debian_kernel,
    ensure_default_guest,
)
from strato.images import apt as apt_module
from strato.images.cache import cache_root, version_key
from strato.images.initramfs import DEFAULT_MODULES, write_initramfs
from tests.images.cpio_reader import read_newc

PHYS32_ENTRY = 18  # XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry point


def parse_notes(data: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, descriptor) of each ELF note: 4-byte-aligned name and descriptor."""
    notes = []
    pos = 0
    while pos + 12 <= len(data):
        namesz, descsz, kind = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        notes.append(
            (data[name_at : name_at + namesz].rstrip(b"\0"), kind, data[desc_at : desc_at + descsz])
        )
        pos = desc_at + (descsz + 3) // 4 * 4
    return notes


def test_bzimage_has_setup_header(debian_kernel: DebianKernel) -> None:
    head = debian_kernel.bzimage.read_bytes()[:0x250]
    assert head[0x202:0x206] == b"HdrS"
    assert struct.unpack_from("<H", head, 0x206)[0] >= 0x020C  # 64-bit boot protocol era
    assert head[0x1FE:0x200] == b"\x55\xaa"


def test_version_names_the_files(debian_kernel: DebianKernel) -> None:
    assert re.fullmatch(r"[0-9][0-9.]*-[0-9]+-cloud-amd64", debian_kernel.version)
    assert debian_kernel.bzimage.parent.name == debian_kernel.version
    virtio = debian_kernel.modules_dir / "kernel/drivers/virtio"
    assert any(virtio.glob("virtio_pci.ko*"))


def test_vmlinux_is_a_pvh_bootable_x86_64_elf(debian_kernel: DebianKernel) -> None:
    with debian_kernel.vmlinux.open("rb") as f:
        elf = ELFFile(f)
        assert elf.elfclass == 64
        assert elf["e_machine"] == "EM_X86_64"
        load = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        notes = [
            note
            for seg in elf.iter_segments()
            if seg["p_type"] == "PT_NOTE"
            for note in parse_notes(bytes(seg.data()))
        ]
        descs = [desc for name, kind, desc in notes if (name, kind) == (b"Xen", PHYS32_ENTRY)]
        assert len(descs) == 1
        (entry,) = struct.unpack_from("<I", descs[0])
        # The 32-bit PVH entry point lies in a loaded segment, by physical address.
        assert any(s["p_paddr"] <= entry < s["p_paddr"] + s["p_filesz"] for s in load)


def no_subprocess(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError(f"a cached call ran a command: {args}")


def test_second_call_uses_the_cache_only(
    debian_kernel: DebianKernel, default_guest: DefaultGuest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    assert ensure_debian_kernel() == debian_kernel
    assert ensure_default_guest() == default_guest


def test_default_guest_initramfs_content(default_guest: DefaultGuest) -> None:
    kernel = default_guest.kernel
    entries = {e.name: e for e in read_newc(default_guest.initramfs.read_bytes())}
    init = entries["init"]
    assert init.kind == "file" and init.mode & stat.S_IXUSR
    script = init.data.decode()
    assert script.startswith("#!/bin/sh\n")
    assert default_guest.marker in script and default_guest.end_marker in script
    assert "poweroff -f" in script

    busybox = entries["bin/busybox"]
    assert busybox.data.startswith(b"\x7fELF") and busybox.mode & stat.S_IXUSR
    for applet in ("sh", "mount", "insmod", "poweroff", "echo", "cat", "ls", "grep"):
        assert entries[f"bin/{applet}"].kind == "symlink"
        assert entries[f"bin/{applet}"].data == b"busybox"
    console = entries["dev/console"]
    assert (console.kind, console.rdevmajor, console.rdevminor) == ("chr", 5, 1)
    for d in ("proc", "sys", "dev"):
        assert entries[d].kind == "dir"

    base = f"lib/modules/{kernel.version}/kernel"
    wanted = [
        "drivers/virtio/virtio_ring.ko",
        "drivers/virtio/virtio.ko",
        "drivers/virtio/virtio_pci_modern_dev.ko",
        "drivers/virtio/virtio_pci_legacy_dev.ko",
        "drivers/virtio/virtio_pci.ko",
        "drivers/block/virtio_blk.ko",
        "net/core/failover.ko",
        "drivers/net/net_failover.ko",
        "drivers/net/virtio_net.ko",
        "drivers/char/virtio_console.ko",
        "drivers/char/hw_random/virtio-rng.ko",
    ]
    for rel in wanted:
        module = entries[f"{base}/{rel}"]
        assert module.data.startswith(b"\x7fELF"), rel  # stored uncompressed
    # /init loads every module after the modules it depends on.
    loads = re.findall(r"^insmod \S+/(\S+\.ko) ", script, re.MULTILINE)
    assert loads.index("virtio_ring.ko") < loads.index("virtio.ko") < loads.index("virtio_pci.ko")
    assert loads.index("failover.ko") < loads.index("net_failover.ko")
    assert loads.index("net_failover.ko") < loads.index("virtio_net.ko")


def test_init_script_parses_with_busybox_sh(default_guest: DefaultGuest, tmp_path: Path) -> None:
    entries = {e.name: e for e in read_newc(default_guest.initramfs.read_bytes())}
    busybox = tmp_path / "busybox"
    busybox.write_bytes(entries["bin/busybox"].data)
    busybox.chmod(0o755)
    (tmp_path / "init").write_bytes(entries["init"].data)
    done = subprocess.run(
        [str(busybox), "sh", "-n", str(tmp_path / "init")], capture_output=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_system_cpio_lists_the_initramfs(default_guest: DefaultGuest, system_cpio: str) -> None:
    done = subprocess.run(
        [system_cpio, "-it", "-F", str(default_guest.initramfs)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = done.stdout.splitlines()
    assert "init" in names and "bin/busybox" in names
    assert any(n.endswith("/virtio_pci.ko") for n in names)


def test_initramfs_is_reproducible(default_guest: DefaultGuest, tmp_path: Path) -> None:
    busybox = ensure_busybox()
    write_initramfs(tmp_path / "a", default_guest.kernel, busybox, DEFAULT_MODULES)
    write_initramfs(tmp_path / "b", default_guest.kernel, busybox, DEFAULT_MODULES)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert (tmp_path / "a").read_bytes() == default_guest.initramfs.read_bytes()


def test_command_line_entry_point(default_guest: DefaultGuest) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "strato.images", "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    fields = json.loads(done.stdout)
    assert fields["initramfs"] == str(default_guest.initramfs)
    assert fields["bzimage"] == str(default_guest.kernel.bzimage)
    assert fields["vmlinux"] == str(default_guest.kernel.vmlinux)
    assert fields["cmdline"] == default_guest.cmdline == "console=ttyS0 reboot=k panic=1"


# -- errors and cache location, without the network ----------------------------------------


def test_clear_error_without_apt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ImageError, match="apt-get, apt-cache, dpkg-deb not found"):
        ensure_debian_kernel(tmp_path)


def test_clear_error_when_lists_need_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(apt_module, "package_known", lambda name: False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ImageError, match="sudo apt-get update"):
        ensure_busybox(tmp_path)


def test_cache_root_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "strato"
    assert (tmp_path / "xdg" / "strato").is_dir()
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/is/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "strato"
    assert cache_root(tmp_path / "given") == tmp_path / "given"


def test_version_order() -> None:
    versions = ["6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", "6.1.0-10-cloud-amd64"]
    assert max(versions, key=version_key) == "6.1.0-56-cloud-amd64"
    assert sorted(versions, key=version_key)[0] == "6.1.0-9-cloud-amd64"


# -- the guest really runs: QEMU's TCG emulator boots it (KVM here cannot, see PLATFORM.md) --


@pytest.mark.qemu
@pytest.mark.parametrize("image", ["bzimage", "vmlinux"])
def test_guest_boots_to_its_report_under_qemu(
    default_guest: DefaultGuest, image: str, tmp_path: Path
) -> None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    disk = tmp_path / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    kernel = getattr(default_guest.kernel, image)
    cmd = [
        qemu, "-accel", "tcg", "-cpu", "qemu64", "-m", "256", "-smp", "2",
        "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(default_guest.initramfs),
        "-append", default_guest.cmdline,
        "-drive", f"file={disk},format=raw,if=none,id=d0",
        "-device", "virtio-blk-pci,drive=d0",
        "-netdev", "hubport,id=n0,hubid=0", "-device", "virtio-net-pci,netdev=n0",
        "-device", "virtio-rng-pci",
        "-device", "virtio-serial-pci",
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, errors="replace", timeout=240, check=False
    )
    out = done.stdout
    assert default_guest.marker in out, out[-3000:]
    assert default_guest.end_marker in out, out[-3000:]
    assert not re.search(r"insmod \S+ failed", out), out
    report = dict(
        line.removeprefix("strato-guest: ").split("=", 1)
        for line in out.splitlines()
        if line.startswith("strato-guest: ") and "=" in line and " virtio " not in line
    )
    assert report["kernel"] == default_guest.kernel.version
    assert report["cpus"] == "2"
    assert 150_000 < int(report["mem_total_kb"]) <= 256 * 1024
    assert report["block"].split() == ["vda"]
    assert "eth0" in report["net"].split()
    assert report["hwrng"] == "virtio_rng.0"
    drivers = sorted(re.findall(r" driver=(\S+)", out))
    assert drivers == ["virtio_blk", "virtio_console", "virtio_net", "virtio_rng"]
    assert done.returncode == 0
