"""Module dependency closure from .modinfo, on small ELF objects assembled here."""

from __future__ import annotations

import lzma
import shutil
import subprocess
from pathlib import Path

import pytest

from strato.images.errors import ImageError
from strato.images.initramfs import modules_dep
from strato.images.kmod import modinfo, module_closure, module_index, module_name, read_module


def assemble(path: Path, lines: list[str]) -> None:
    """An ELF object whose .modinfo holds ``lines``, like a kernel module's."""
    if shutil.which("as") is None:
        pytest.skip("GNU as is not installed")
    src = path.with_suffix(".s")
    body = "".join(f'.asciz "{line}"\n' for line in lines)
    src.write_text(f'.section .modinfo,"a"\n{body}')
    subprocess.run(["as", "--64", "-o", str(path), str(src)], check=True)
    src.unlink()


def fake_module(modules_dir: Path, rel: str, depends: str, *, xz: bool = False) -> None:
    path = modules_dir / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    name = module_name(path.name)
    if xz:
        plain = path.with_name(path.name.removesuffix(".xz"))
        assemble(plain, [f"name={name}", f"depends={depends}", "license=GPL"])
        path.write_bytes(lzma.compress(plain.read_bytes()))
        plain.unlink()
    else:
        assemble(path, [f"name={name}", f"depends={depends}", "license=GPL"])


@pytest.fixture
def modules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "6.1.0-test"
    fake_module(d, "kernel/drivers/ring.ko", "")
    fake_module(d, "kernel/drivers/core.ko", "ring")
    fake_module(d, "kernel/drivers/pci-dev.ko.xz", "", xz=True)
    fake_module(d, "kernel/drivers/bus.ko", "ring,pci_dev,core")
    fake_module(d, "kernel/net/fail.ko", "")
    fake_module(d, "kernel/net/netdrv.ko", "core,fail")
    return d


def test_module_names() -> None:
    assert module_name("virtio-rng.ko") == "virtio_rng"
    assert module_name("virtio_pci.ko.zst") == "virtio_pci"
    with pytest.raises(ValueError):
        module_name("README")


def test_index_finds_plain_and_compressed(modules_dir: Path) -> None:
    index = module_index(modules_dir)
    assert set(index) == {"ring", "core", "pci_dev", "bus", "fail", "netdrv"}
    assert index["pci_dev"].name == "pci-dev.ko.xz"


def test_read_module_decompresses(modules_dir: Path) -> None:
    elf = read_module(modules_dir / "kernel/drivers/pci-dev.ko.xz")
    assert elf.startswith(b"\x7fELF")
    assert modinfo(elf)["name"] == "pci_dev"


def test_closure_puts_dependencies_first(modules_dir: Path) -> None:
    closure = module_closure(modules_dir, ["bus", "netdrv"])
    names = [m.name for m in closure]
    assert names == ["ring", "pci_dev", "core", "bus", "fail", "netdrv"]
    for i, module in enumerate(closure):
        assert all(dep in names[:i] for dep in module.depends)
    by_name = {m.name: m for m in closure}
    assert by_name["pci_dev"].relpath == "kernel/drivers/pci-dev.ko"  # compressed suffix dropped
    assert by_name["bus"].depends == ("ring", "pci_dev", "core")


def test_closure_accepts_dashed_names(modules_dir: Path) -> None:
    assert [m.name for m in module_closure(modules_dir, ["pci-dev"])] == ["pci_dev"]


def test_modules_dep_lists_whole_closure_last_loaded_first(modules_dir: Path) -> None:
    text = modules_dep(module_closure(modules_dir, ["netdrv"]))
    assert text.splitlines() == [
        "kernel/drivers/ring.ko:",
        "kernel/drivers/core.ko: kernel/drivers/ring.ko",
        "kernel/net/fail.ko:",
        "kernel/net/netdrv.ko: kernel/net/fail.ko kernel/drivers/core.ko kernel/drivers/ring.ko",
    ]


def test_missing_dependency(modules_dir: Path) -> None:
    fake_module(modules_dir, "kernel/x/orphan.ko", "nowhere")
    with pytest.raises(ImageError, match=r"nowhere .*needed by orphan"):
        module_closure(modules_dir, ["orphan"])


def test_missing_module(modules_dir: Path) -> None:
    with pytest.raises(ImageError, match=r"virtio_pci .*requested"):
        module_closure(modules_dir, ["virtio_pci"])


def test_cycle(modules_dir: Path) -> None:
    fake_module(modules_dir, "kernel/x/a.ko", "b")
    fake_module(modules_dir, "kernel/x/b.ko", "a")
    with pytest.raises(ImageError, match="cycle"):
        module_closure(modules_dir, ["a"])


def test_object_without_modinfo(tmp_path: Path) -> None:
    if shutil.which("as") is None:
        pytest.skip("GNU as is not installed")
    src = tmp_path / "x.s"
    src.write_text(".text\nnop\n")
    obj = tmp_path / "x.ko"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    with pytest.raises(ImageError, match=r"no \.modinfo"):
        modinfo(obj.read_bytes())
