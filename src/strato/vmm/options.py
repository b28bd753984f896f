"""Parsing Cloud Hypervisor's option strings ("size=512M,shared=on") into config objects.

Used by the command line and by anything else that takes CH-style strings. Every error names
the option and the value that was wrong.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from strato.vmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    RateLimiterConfig,
    RngConfig,
)

T = TypeVar("T")

_SIZE = re.compile(r"^(\d+)([KMGT]?)$")
SIZE_EXAMPLES = "512M, 1G, 65536K"  # each one a valid --memory size (tests/cli check it)
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


def split_options(option: str, value: str, known: tuple[str, ...]) -> dict[str, str]:
    """Split "a=1,b=2" into a dict, rejecting unknown and repeated keys."""
    out: dict[str, str] = {}
    if value.strip() == "":
        raise ConfigError(f"--{option}: empty value")
    if "\x00" in value:
        raise ConfigError(f"--{option}: must not contain a NUL character")
    for part in value.split(","):
        if "=" not in part:
            raise ConfigError(f"--{option} {value!r}: {part!r} is not key=value")
        key, _, val = part.partition("=")
        if key not in known:
            raise ConfigError(
                f"--{option} {value!r}: unknown parameter {key!r} (known: {', '.join(known)})"
            )
        if key in out:
            raise ConfigError(f"--{option} {value!r}: {key!r} given twice")
        out[key] = val
    return out


def parse_size(option: str, key: str, value: str) -> int:
    m = _SIZE.match(value)
    if not m or len(m.group(1)) > 20:
        raise ConfigError(f"--{option} {key}={value}: not a size (examples: {SIZE_EXAMPLES})")
    n = int(m.group(1))
    return n << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def parse_bool(option: str, key: str, value: str) -> bool:
    if value in ("on", "true"):
        return True
    if value in ("off", "false"):
        return False
    raise ConfigError(f"--{option} {key}={value}: expected on or off")


def parse_int(option: str, key: str, value: str, lo: int = 0, hi: int = 1 << 63) -> int:
    if len(value) > 40:
        raise ConfigError(f"--{option} {key}={value[:40]}...: not an integer")
    try:
        n = int(value, 0)
    except ValueError:
        raise ConfigError(f"--{option} {key}={value}: not an integer") from None
    if not lo <= n <= hi:
        raise ConfigError(f"--{option} {key}={value}: must be between {lo} and {hi}")
    return n


def _get(d: dict[str, str], key: str, conv: Callable[[str], T], default: T) -> T:
    return conv(d[key]) if key in d else default


def parse_cpus(value: str) -> CpusConfig:
    d = split_options("cpus", value, ("boot", "max", "topology", "kvm_hyperv", "max_phys_bits"))
    boot = _get(d, "boot", lambda v: parse_int("cpus", "boot", v, 1, 254), 1)
    maxv = _get(d, "max", lambda v: parse_int("cpus", "max", v, 1, 254), boot)
    if maxv < boot:
        raise ConfigError(f"--cpus max={maxv}: must be at least boot={boot}")
    return CpusConfig(boot_vcpus=boot, max_vcpus=maxv)


def parse_memory(value: str) -> MemoryConfig:
    d = split_options("memory", value, ("size", "shared", "hugepages", "mergeable", "prefault"))
    size = _get(d, "size", lambda v: parse_size("memory", "size", v), 512 << 20)
    if size < (16 << 20):
        raise ConfigError(f"--memory size={d.get('size')}: at least 16M is needed")
    if size % 4096:
        raise ConfigError(f"--memory size={d.get('size')}: must be a multiple of 4K")
    return MemoryConfig(
        size=size,
        shared=_get(d, "shared", lambda v: parse_bool("memory", "shared", v), False),
        hugepages=_get(d, "hugepages", lambda v: parse_bool("memory", "hugepages", v), False),
    )


def parse_console(option: str, value: str) -> ConsoleConfig:
    """`off`, `null`, `tty`, `pty`, `file=PATH` (Cloud Hypervisor's syntax)."""
    if value == "off":
        return ConsoleConfig(ConsoleMode.OFF)
    if value == "null":
        return ConsoleConfig(ConsoleMode.NULL)
    if value == "tty":
        return ConsoleConfig(ConsoleMode.TTY)
    if value == "pty":
        return ConsoleConfig(ConsoleMode.PTY)
    if "\x00" in value:
        raise ConfigError(f"--{option}: must not contain a NUL character")
    if value.startswith("file="):
        path = value[len("file=") :]
        if not path:
            raise ConfigError(f"--{option} file=: a path is required")
        return ConsoleConfig(ConsoleMode.FILE, Path(path))
    raise ConfigError(f"--{option} {value}: expected off, null, tty, pty or file=PATH")


_RATE_KEYS = (
    "bw_size",
    "bw_one_time_burst",
    "bw_refill_time",
    "ops_size",
    "ops_one_time_burst",
    "ops_refill_time",
)


def _rate_limiter(option: str, d: dict[str, str]) -> RateLimiterConfig | None:
    if not any(k in d for k in _RATE_KEYS):
        return None
    vals = {k: parse_int(option, k, d[k]) for k in _RATE_KEYS if k in d}
    return RateLimiterConfig(**vals)


def parse_disk(value: str) -> DiskConfig:
    d = split_options(
        "disk",
        value,
        ("path", "readonly", "direct", "num_queues", "queue_size", "id", "serial", *_RATE_KEYS),
    )
    if "path" not in d or not d["path"]:
        raise ConfigError(f"--disk {value!r}: path= is required")
    qs = _get(d, "queue_size", lambda v: parse_int("disk", "queue_size", v, 1, 32768), 128)
    if qs & (qs - 1):
        raise ConfigError(f"--disk queue_size={qs}: must be a power of two")
    serial = d.get("serial")
    if serial is not None and len(serial.encode()) > 20:
        raise ConfigError(f"--disk serial={serial}: at most 20 bytes")
    return DiskConfig(
        path=Path(d["path"]),
        readonly=_get(d, "readonly", lambda v: parse_bool("disk", "readonly", v), False),
        direct=_get(d, "direct", lambda v: parse_bool("disk", "direct", v), False),
        num_queues=_get(d, "num_queues", lambda v: parse_int("disk", "num_queues", v, 1, 64), 1),
        queue_size=qs,
        id=d.get("id"),
        serial=serial,
        rate_limiter=_rate_limiter("disk", d),
    )


def parse_net(value: str) -> NetConfig:
    d = split_options(
        "net",
        value,
        (
            "tap",
            "mac",
            "host_mac",
            "ip",
            "mask",
            "mtu",
            "num_queues",
            "queue_size",
            "id",
            *_RATE_KEYS,
        ),
    )
    for key in ("mac", "host_mac"):
        if key in d and not _MAC.match(d[key]):
            raise ConfigError(f"--net {key}={d[key]}: not a MAC address (12:34:56:78:9a:bc)")
    for key, check in (("ip", ipaddress.IPv4Address), ("mask", ipaddress.IPv4Address)):
        if key in d:
            try:
                check(d[key])
            except ValueError:
                raise ConfigError(f"--net {key}={d[key]}: not an IPv4 address") from None
    nq = _get(d, "num_queues", lambda v: parse_int("net", "num_queues", v, 2, 64), 2)
    if nq % 2:
        raise ConfigError(f"--net num_queues={nq}: must be even (one rx and one tx per pair)")
    qs = _get(d, "queue_size", lambda v: parse_int("net", "queue_size", v, 2, 32768), 256)
    if qs & (qs - 1):
        raise ConfigError(f"--net queue_size={qs}: must be a power of two")
    if "tap" in d and (not d["tap"] or len(d["tap"]) > 15):
        raise ConfigError(f"--net tap={d['tap']}: interface names are 1 to 15 characters")
    return NetConfig(
        tap=d.get("tap"),
        mac=d.get("mac"),
        host_mac=d.get("host_mac"),
        ip=d.get("ip", "192.168.249.1"),
        mask=d.get("mask", "255.255.255.0"),
        mtu=_get(d, "mtu", lambda v: parse_int("net", "mtu", v, 68, 65535), None),
        num_queues=nq,
        queue_size=qs,
        id=d.get("id"),
        rate_limiter=_rate_limiter("net", d),
    )


def parse_rng(value: str) -> RngConfig:
    """`src=PATH` (default /dev/urandom). An empty value is an error, not "no device"."""
    if value.strip() == "":
        raise ConfigError(
            f"--rng {value!r}: empty value (expected src=PATH, e.g. src=/dev/urandom)"
        )
    d = split_options("rng", value, ("src", "iommu"))
    if "src" in d and not d["src"]:
        raise ConfigError("--rng src=: a path is required (e.g. src=/dev/urandom)")
    return RngConfig(src=Path(d.get("src", "/dev/urandom")))
