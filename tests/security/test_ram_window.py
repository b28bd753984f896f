"""Guest RAM never reaches the 64-bit PCI window (the guest would read RAM where a BAR is) nor
leaves the host's physical address space: the largest RAM that fits is accepted, one page more
is refused with the message naming the size and the limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from strato.memory.layout import (
    LAYOUT,
    address_space_end,
    host_phys_bits,
    max_ram_size,
    ram_end,
    ram_size_error,
)
from strato.pci.allocator import PciAllocator
from strato.vmm.config import ConfigError, MemoryConfig, PayloadConfig, VmConfig

GiB = 1 << 30
PAGE = 4096


def config(size: int, tmp_path: Path) -> VmConfig:
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"x")
    return VmConfig(payload=PayloadConfig(kernel=kernel), memory=MemoryConfig(size=size))


def test_the_largest_ram_ends_exactly_where_the_window_starts() -> None:
    assert max_ram_size() == 1023 * GiB
    assert ram_end(max_ram_size()) == LAYOUT.mmio64_start == PciAllocator.from_layout().mmio64.base
    assert ram_size_error(max_ram_size(), phys_bits=48) is None


def test_one_page_more_is_refused_with_the_limit_named(tmp_path: Path) -> None:
    size = max_ram_size() + PAGE
    with pytest.raises(ConfigError) as e:
        config(size, tmp_path).validate()
    assert str(e.value) == (
        f"--memory size={size}: Failed to allocate a memory range: guest RAM would end at "
        "0x10000001000, past the 64-bit PCI window at 0x10000000000; at most "
        "1098437885952 bytes (1023 GiB) fit"
    )


@pytest.mark.parametrize("size", [1 << 40, 2 << 40, 1 << 50])
def test_ram_at_or_past_one_tib_is_refused(size: int) -> None:
    reason = ram_size_error(size, phys_bits=52)
    assert reason is not None and "past the 64-bit PCI window at 0x10000000000" in reason


def test_ram_past_the_hosts_physical_address_bits_is_refused() -> None:
    # A 39-bit host (512 GiB): RAM must end below 2^39 - 64 KiB.
    top = address_space_end(39)
    fits = top - GiB  # RAM above 4 GiB starts at 4 GiB: size = end - 1 GiB
    assert ram_end(fits) == top
    assert ram_size_error(fits, phys_bits=39) is None
    reason = ram_size_error(fits + PAGE, phys_bits=39)
    assert reason == (
        f"Failed to allocate a memory range: guest RAM would end at {top + PAGE:#x}, past the "
        f"host's 39-bit physical address space; at most {fits} bytes fit"
    )


def test_the_host_phys_bits_are_read_and_checked(tmp_path: Path) -> None:
    bits = host_phys_bits()
    assert bits is None or 32 <= bits <= 52
    config(512 << 20, tmp_path).validate()  # an ordinary size passes
