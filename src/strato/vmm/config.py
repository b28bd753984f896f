"""VM configuration as frozen dataclasses. Field names follow Cloud Hypervisor's VmConfig
(vmm/src/vm_config.rs and its OpenAPI description) so that a config round-trips through the
REST API unchanged."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from strato.memory.layout import host_phys_bits, ram_size_error


class ConfigError(ValueError):
    """A configuration that cannot be built, with a message naming the option and value."""


class ConsoleMode(enum.Enum):
    OFF = "Off"
    NULL = "Null"
    TTY = "Tty"
    FILE = "File"
    PTY = "Pty"
    SOCKET = "Socket"


@dataclass(frozen=True)
class PayloadConfig:
    kernel: Path | None = None
    cmdline: str | None = None
    initramfs: Path | None = None
    firmware: Path | None = None


@dataclass(frozen=True)
class CpuTopology:
    """Cloud Hypervisor's `cpus.topology`: the product of the four is at least max_vcpus."""

    threads_per_core: int = 1
    cores_per_die: int = 1
    dies_per_package: int = 1
    packages: int = 1


DEFAULT_MAX_PHYS_BITS = 46  # Cloud Hypervisor's default `cpus.max_phys_bits`


@dataclass(frozen=True)
class CpusConfig:
    boot_vcpus: int = 1
    max_vcpus: int = 1
    topology: CpuTopology | None = None
    kvm_hyperv: bool = False
    max_phys_bits: int = DEFAULT_MAX_PHYS_BITS
    nested: bool = True


@dataclass(frozen=True)
class MemoryConfig:
    size: int = 512 << 20
    shared: bool = False
    hugepages: bool = False
    hugepage_size: int | None = None
    mergeable: bool = False
    prefault: bool = False
    thp: bool = True
    hotplug_method: str = "Acpi"  # "Acpi" | "VirtioMem"
    hotplug_size: int | None = None  # address space kept for vm.resize (issue 14)
    hotplugged_size: int | None = None


@dataclass(frozen=True)
class ConsoleConfig:
    mode: ConsoleMode = ConsoleMode.NULL
    file: Path | None = None  # mode File: the file; mode Pty: the pty's path once created
    socket: Path | None = None  # mode Socket: the unix socket strato listens on
    id: str | None = None  # the virtio console's device id
    pci_segment: int = 0


@dataclass(frozen=True)
class RateLimiterConfig:
    bw_size: int = 0
    bw_one_time_burst: int = 0
    bw_refill_time: int = 0
    ops_size: int = 0
    ops_one_time_burst: int = 0
    ops_refill_time: int = 0


@dataclass(frozen=True)
class DiskConfig:
    path: Path
    readonly: bool = False
    direct: bool = False
    num_queues: int = 1
    queue_size: int = 128
    id: str | None = None
    serial: str | None = None
    rate_limiter: RateLimiterConfig | None = None
    pci_segment: int = 0


@dataclass(frozen=True)
class NetConfig:
    tap: str | None = None
    mac: str | None = None
    host_mac: str | None = None
    ip: str = "192.168.249.1"
    mask: str = "255.255.255.0"
    mtu: int | None = None
    num_queues: int = 2
    queue_size: int = 256
    id: str | None = None
    rate_limiter: RateLimiterConfig | None = None
    pci_segment: int = 0
    # Tap queue fds handed over by the client (`--net fd=[...]`, SCM_RIGHTS with vm.add-net):
    # used instead of opening `tap`; one rx/tx queue pair per fd.
    fds: tuple[int, ...] | None = None
    offload_tso: bool = True
    offload_ufo: bool = True
    offload_csum: bool = True


@dataclass(frozen=True)
class RngConfig:
    src: Path = Path("/dev/urandom")
    id: str | None = None
    pci_segment: int = 0


@dataclass(frozen=True)
class VsockConfig:
    """`--vsock cid=N,socket=PATH`: virtio-vsock with Cloud Hypervisor's hybrid vsock on PATH."""

    cid: int
    socket: Path
    id: str | None = None
    pci_segment: int = 0


@dataclass(frozen=True)
class PlatformConfig:
    num_pci_segments: int = 1


@dataclass(frozen=True)
class LandlockRuleConfig:
    """`--landlock-rules path=...,access=r|w|rw`: one more path strato may use (Cloud
    Hypervisor's LandlockConfig)."""

    path: Path
    access: str


@dataclass(frozen=True)
class VmConfig:
    payload: PayloadConfig = field(default_factory=PayloadConfig)
    cpus: CpusConfig = field(default_factory=CpusConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    serial: ConsoleConfig = field(default_factory=lambda: ConsoleConfig(ConsoleMode.NULL))
    console: ConsoleConfig = field(default_factory=lambda: ConsoleConfig(ConsoleMode.TTY))
    disks: tuple[DiskConfig, ...] = ()
    net: tuple[NetConfig, ...] = ()
    rng: RngConfig | None = None
    vsock: VsockConfig | None = None
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    no_reboot: bool = False
    acpi: bool = True
    seccomp: str = "true"  # "true" | "false" | "log" (strato.vmm.seccomp)
    landlock: bool = False
    landlock_rules: tuple[LandlockRuleConfig, ...] = ()

    def validate(self) -> None:
        """Check what can be checked without touching KVM; raise ConfigError naming the field."""
        p = self.payload
        if p.kernel is None and p.firmware is None:
            raise ConfigError("a payload is required: --kernel (or --firmware)")
        files = (("kernel", p.kernel), ("initramfs", p.initramfs), ("firmware", p.firmware))
        for what, path in files:
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{what} {path}: no such file")
        if not 1 <= self.cpus.boot_vcpus <= 254:
            raise ConfigError(f"--cpus boot={self.cpus.boot_vcpus}: must be between 1 and 254")
        if self.cpus.max_vcpus < self.cpus.boot_vcpus:
            raise ConfigError(
                f"--cpus max={self.cpus.max_vcpus}: must be at least boot={self.cpus.boot_vcpus}"
            )
        if self.memory.size < (16 << 20):
            raise ConfigError(f"--memory size={self.memory.size}: at least 16M is needed")
        if self.memory.size % 4096:
            raise ConfigError(f"--memory size={self.memory.size}: must be a multiple of 4 KiB")
        too_big = ram_size_error(self.memory.size, host_phys_bits())
        if too_big is not None:
            raise ConfigError(f"--memory size={self.memory.size}: {too_big}")
        for c, name in ((self.serial, "serial"), (self.console, "console")):
            if c.mode is ConsoleMode.FILE and c.file is None:
                raise ConfigError(f"--{name} file=: a path is required")
        for d in self.disks:
            if not Path(d.path).exists():
                raise ConfigError(f"--disk path={d.path}: no such file")
        if self.seccomp not in ("true", "false", "log"):
            raise ConfigError(f"--seccomp {self.seccomp}: expected true, false or log")
        for r in self.landlock_rules:
            if r.access not in ("r", "w", "rw"):
                raise ConfigError(f"--landlock-rules access={r.access}: expected r, w or rw")
            if not Path(r.path).exists():
                raise ConfigError(f"--landlock-rules path={r.path}: no such file or directory")
