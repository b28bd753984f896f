"""Cloud Hypervisor's VmConfig JSON (the body of `vm.create`, the `config` of `vm.info`) to and
from strato's VmConfig dataclasses.

Parsing is strict where Cloud Hypervisor's serde is lenient: every error names the field by
its JSON path (`disks[0].queue_size`). Three kinds of field exist:
- supported: parsed, type-checked and range-checked;
- known to Cloud Hypervisor but not implemented by strato: accepted only with Cloud
  Hypervisor's default value (what its own clients send when they do not use the feature),
  rejected otherwise with a message saying strato does not support it;
- unknown: rejected, naming the field and listing the known ones.

Two departures from Cloud Hypervisor, both documented in openapi.yaml: `"rng": null` means
"no virtio-rng device" (Cloud Hypervisor always has one; an absent `rng` keeps that default),
and strato-only fields (`no_reboot`, `acpi`) are not part of the JSON.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from strato.vmm.config import (
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    DiskConfig,
    MemoryConfig,
    NetConfig,
    PayloadConfig,
    RateLimiterConfig,
    RngConfig,
    VmConfig,
)

U8 = (1 << 8) - 1
U16 = (1 << 16) - 1
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1

_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


class ConfigJsonError(ValueError):
    """A VmConfig JSON document that cannot be used; `path` is the offending field."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


# -- type helpers --------------------------------------------------------------------------------


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'string "{shown}"'
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _int(path: str, value: object, lo: int = 0, hi: int = U64) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigJsonError(path, f"invalid type: {_describe(value)}, expected an integer")
    if not lo <= value <= hi:
        raise ConfigJsonError(path, f"{value} is out of range (expected {lo} to {hi})")
    return value


def _bool(path: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigJsonError(path, f"invalid type: {_describe(value)}, expected a boolean")
    return value


def _str(path: str, value: object, *, nonempty: bool = False) -> str:
    if not isinstance(value, str):
        raise ConfigJsonError(path, f"invalid type: {_describe(value)}, expected a string")
    if "\x00" in value:
        raise ConfigJsonError(path, "must not contain a NUL character")
    if nonempty and not value:
        raise ConfigJsonError(path, "must not be empty")
    return value


def _opt_str(path: str, value: object) -> str | None:
    return None if value is None else _str(path, value)


def _opt_path(path: str, value: object) -> Path | None:
    return None if value is None else Path(_str(path, value, nonempty=True))


def _list(path: str, value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigJsonError(path, f"invalid type: {_describe(value)}, expected an array")
    return value


# -- fields known to Cloud Hypervisor but not implemented: accepted at their default --------------

Accept = Callable[[object], bool]


def _default(default: object) -> Accept:
    """Null, or exactly the default (same JSON type: `0` is not `false`)."""

    def ok(value: object) -> bool:
        return value is None or (type(value) is type(default) and value == default)

    return ok


def _empty(value: object) -> bool:
    return value is None or value == [] or value == {}


def _any_int(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def _any_bool(value: object) -> bool:
    return value is None or isinstance(value, bool)


def _one_of(*choices: str) -> Accept:
    return lambda value: value is None or value in choices


def _object_at_defaults(defaults: Mapping[str, Accept]) -> Accept:
    def ok(value: object) -> bool:
        if value is None:
            return True
        if not isinstance(value, dict):
            return False
        return all(k in defaults and defaults[k](v) for k, v in value.items())

    return ok


_PCI_COMMON: dict[str, Accept] = {
    "iommu": _default(False),
    "pci_segment": _default(0),
    "pci_device_id": _default(None),
}

_PLATFORM_DEFAULTS: dict[str, Accept] = {
    "num_pci_segments": _default(1),
    "iommu_segments": _empty,
    "iommu_address_width_bits": _default(64),
    "system_serial_number": _default(None),
    "serial_number": _default(None),
    "system_uuid": _default(None),
    "uuid": _default(None),
    "oem_strings": _empty,
    "system_manufacturer": _default(None),
    "system_product_name": _default(None),
    "system_version": _default(None),
    "system_family": _default(None),
    "system_sku_number": _default(None),
    "chassis_asset_tag": _default(None),
    "tdx": _default(False),
    "sev_snp": _default(False),
    "iommufd": _default(False),
    "iommufd_fd": _default(None),
    "vfio_p2p_dma": _default(True),
}

_UNSUPPORTED: dict[str, dict[str, Accept]] = {
    "": {
        "rate_limit_groups": _empty,
        "balloon": _default(None),
        "fs": _empty,
        "generic_vhost_user": _empty,
        "pmem": _empty,
        "debug_console": _object_at_defaults(
            {"mode": _one_of("Off"), "file": _default(None), "iobase": _any_int}
        ),
        "devices": _empty,
        "user_devices": _empty,
        "vdpa": _empty,
        "vsock": _default(None),
        "pvmemcontrol": _default(None),
        "pvpanic": _default(False),
        "iommu": _default(False),
        "numa": _empty,
        "watchdog": _default(False),
        "rtc": _default(None),
        "gdb": _default(False),
        "pci_segments": _empty,
        "platform": _object_at_defaults(_PLATFORM_DEFAULTS),
        "tpm": _default(None),
        "landlock_enable": _default(False),
        "landlock_rules": _empty,
        "ivshmem": _default(None),
    },
    "payload": {
        "igvm": _default(None),
        "host_data": _default(None),
        "fw_cfg_config": _default(None),
    },
    "cpus": {
        "topology": _default(None),
        "kvm_hyperv": _default(False),
        # An upper bound on guest physical address bits: any value is satisfied by strato.
        "max_phys_bits": _any_int,
        "affinity": _empty,
        "features": _object_at_defaults({"amx": _default(False)}),
        "nested": _default(True),
        "core_scheduling": _one_of("Vm"),
        "profile": _one_of("Host"),
    },
    "memory": {
        "mergeable": _default(False),
        "hotplug_method": _one_of("Acpi"),
        "hotplug_size": _default(None),
        "hotplugged_size": _default(None),
        "hugepage_size": _default(None),
        "prefault": _default(False),
        "reserve": _default(False),
        "zones": _empty,
        "thp": _default(True),
    },
    "disks": {
        **_PCI_COMMON,
        "vhost_user": _default(False),
        "vhost_socket": _default(None),
        "rate_limit_group": _default(None),
        # Backend selection hints for Cloud Hypervisor's async I/O: strato uses neither.
        "disable_io_uring": _any_bool,
        "disable_aio": _any_bool,
        "queue_affinity": _empty,
        "backing_files": _default(False),
        "sparse": _default(True),
        # "Unknown" is Cloud Hypervisor's autodetect default; strato opens every image as raw.
        "image_type": _one_of("Raw", "Unknown"),
        "lock_granularity": _one_of("ByteRange"),
    },
    "net": {
        **_PCI_COMMON,
        "vhost_user": _default(False),
        "vhost_socket": _default(None),
        "vhost_mode": _one_of("Client"),
        "fds": _default(None),
        "offload_tso": _default(True),
        "offload_ufo": _default(True),
        "offload_csum": _default(True),
    },
    "rng": {**_PCI_COMMON, "id": _default(None)},
    "serial": {"socket": _default(None)},
    "console": {**_PCI_COMMON, "socket": _default(None), "id": _default(None)},
}


def _fields(
    path: str, value: object, kind: str, supported: tuple[str, ...], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check an object's keys; return the supported ones that are present and not null."""
    if not isinstance(value, dict):
        raise ConfigJsonError(path, f"invalid type: {_describe(value)}, expected an object")
    unsupported = _UNSUPPORTED.get(kind, {})
    out: dict[str, Any] = {}
    for key, v in value.items():
        where = _join(path, key)
        if key in supported:
            if v is not None:
                out[key] = v
        elif key in unsupported:
            if not unsupported[key](v):
                raise ConfigJsonError(
                    where, f"{_describe(v)} is not supported by strato (leave it out)"
                )
        else:
            known = ", ".join(f"`{k}`" for k in (*supported, *unsupported))
            raise ConfigJsonError(where, f"unknown field `{key}`, expected one of {known}")
    for key in required:
        if key not in out:
            raise ConfigJsonError(_join(path, key), "missing field")
    return out


# -- JSON -> VmConfig ----------------------------------------------------------------------------


def _payload(path: str, value: object) -> PayloadConfig:
    f = _fields(path, value, "payload", ("kernel", "cmdline", "initramfs", "firmware"))
    return PayloadConfig(
        kernel=_opt_path(_join(path, "kernel"), f.get("kernel")),
        cmdline=_opt_str(_join(path, "cmdline"), f.get("cmdline")),
        initramfs=_opt_path(_join(path, "initramfs"), f.get("initramfs")),
        firmware=_opt_path(_join(path, "firmware"), f.get("firmware")),
    )


def _cpus(path: str, value: object) -> CpusConfig:
    f = _fields(path, value, "cpus", ("boot_vcpus", "max_vcpus"), ("boot_vcpus", "max_vcpus"))
    boot = _int(_join(path, "boot_vcpus"), f["boot_vcpus"], 1, 254)
    maxv = _int(_join(path, "max_vcpus"), f["max_vcpus"], 1, 254)
    if maxv < boot:
        raise ConfigJsonError(_join(path, "max_vcpus"), f"{maxv} is less than boot_vcpus {boot}")
    return CpusConfig(boot_vcpus=boot, max_vcpus=maxv)


def _memory(path: str, value: object) -> MemoryConfig:
    f = _fields(path, value, "memory", ("size", "shared", "hugepages"), ("size",))
    size = _int(_join(path, "size"), f["size"], 16 << 20)
    if size % 4096:
        raise ConfigJsonError(_join(path, "size"), f"{size} is not a multiple of 4096")
    return MemoryConfig(
        size=size,
        shared=_bool(_join(path, "shared"), f.get("shared", False)),
        hugepages=_bool(_join(path, "hugepages"), f.get("hugepages", False)),
    )


_BUCKET_KEYS = ("size", "one_time_burst", "refill_time")


def _bucket(path: str, value: object) -> tuple[int, int, int]:
    f = _fields(path, value, "bucket", _BUCKET_KEYS, ("size", "refill_time"))
    return (
        _int(_join(path, "size"), f["size"]),
        _int(_join(path, "one_time_burst"), f.get("one_time_burst", 0)),
        _int(_join(path, "refill_time"), f["refill_time"]),
    )


def _rate_limiter(path: str, value: object) -> RateLimiterConfig | None:
    if value is None:
        return None
    f = _fields(path, value, "rate_limiter", ("bandwidth", "ops"))
    bw = _bucket(_join(path, "bandwidth"), f["bandwidth"]) if "bandwidth" in f else (0, 0, 0)
    ops = _bucket(_join(path, "ops"), f["ops"]) if "ops" in f else (0, 0, 0)
    return RateLimiterConfig(
        bw_size=bw[0],
        bw_one_time_burst=bw[1],
        bw_refill_time=bw[2],
        ops_size=ops[0],
        ops_one_time_burst=ops[1],
        ops_refill_time=ops[2],
    )


def _power_of_two(path: str, n: int) -> int:
    if n & (n - 1):
        raise ConfigJsonError(path, f"{n} is not a power of two")
    return n


def _disk(path: str, value: object) -> DiskConfig:
    f = _fields(
        path,
        value,
        "disks",
        (
            "path",
            "readonly",
            "direct",
            "num_queues",
            "queue_size",
            "id",
            "serial",
            "rate_limiter_config",
        ),
        ("path",),
    )
    serial = _opt_str(_join(path, "serial"), f.get("serial"))
    if serial is not None and len(serial.encode()) > 20:
        raise ConfigJsonError(_join(path, "serial"), "at most 20 bytes")
    qs = _int(_join(path, "queue_size"), f.get("queue_size", 128), 1, 32768)
    return DiskConfig(
        path=Path(_str(_join(path, "path"), f["path"], nonempty=True)),
        readonly=_bool(_join(path, "readonly"), f.get("readonly", False)),
        direct=_bool(_join(path, "direct"), f.get("direct", False)),
        num_queues=_int(_join(path, "num_queues"), f.get("num_queues", 1), 1, 64),
        queue_size=_power_of_two(_join(path, "queue_size"), qs),
        id=_opt_str(_join(path, "id"), f.get("id")),
        serial=serial,
        rate_limiter=_rate_limiter(
            _join(path, "rate_limiter_config"), f.get("rate_limiter_config")
        ),
    )


def _ip(path: str, value: object) -> str:
    text = _str(path, value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise ConfigJsonError(path, f'"{text}" is not an IP address') from None
    return text


def _mac(path: str, value: object) -> str | None:
    if value is None:
        return None
    text = _str(path, value)
    if not _MAC.match(text):
        raise ConfigJsonError(path, f'"{text}" is not a MAC address (12:34:56:78:9a:bc)')
    return text


def _net(path: str, value: object) -> NetConfig:
    f = _fields(
        path,
        value,
        "net",
        (
            "tap",
            "ip",
            "mask",
            "mac",
            "host_mac",
            "mtu",
            "num_queues",
            "queue_size",
            "id",
            "rate_limiter_config",
        ),
    )
    tap = _opt_str(_join(path, "tap"), f.get("tap"))
    if tap is not None and not 1 <= len(tap) <= 15:
        raise ConfigJsonError(_join(path, "tap"), "interface names are 1 to 15 characters")
    nq = _int(_join(path, "num_queues"), f.get("num_queues", 2), 2, 64)
    if nq % 2:
        raise ConfigJsonError(_join(path, "num_queues"), f"{nq} is odd (one rx and one tx each)")
    qs = _int(_join(path, "queue_size"), f.get("queue_size", 256), 2, 32768)
    mtu = f.get("mtu")
    return NetConfig(
        tap=tap,
        mac=_mac(_join(path, "mac"), f.get("mac")),
        host_mac=_mac(_join(path, "host_mac"), f.get("host_mac")),
        ip=_ip(_join(path, "ip"), f.get("ip", "192.168.249.1")),
        mask=_ip(_join(path, "mask"), f.get("mask", "255.255.255.0")),
        mtu=None if mtu is None else _int(_join(path, "mtu"), mtu, 68, 65535),
        num_queues=nq,
        queue_size=_power_of_two(_join(path, "queue_size"), qs),
        id=_opt_str(_join(path, "id"), f.get("id")),
        rate_limiter=_rate_limiter(
            _join(path, "rate_limiter_config"), f.get("rate_limiter_config")
        ),
    )


def _rng(path: str, value: object) -> RngConfig:
    f = _fields(path, value, "rng", ("src",), ("src",))
    return RngConfig(src=Path(_str(_join(path, "src"), f["src"], nonempty=True)))


_MODES = {m.value: m for m in ConsoleMode}


def _console(path: str, value: object, kind: str) -> ConsoleConfig:
    f = _fields(path, value, kind, ("mode", "file"), ("mode",))
    mode_text = _str(_join(path, "mode"), f["mode"])
    mode = _MODES.get(mode_text)
    if mode is None:
        raise ConfigJsonError(
            _join(path, "mode"),
            f'unknown variant "{mode_text}", expected one of {", ".join(_MODES)}',
        )
    if mode is ConsoleMode.SOCKET:
        raise ConfigJsonError(_join(path, "mode"), '"Socket" is not supported by strato')
    file = _opt_path(_join(path, "file"), f.get("file"))
    if mode is ConsoleMode.FILE and file is None:
        raise ConfigJsonError(_join(path, "file"), 'missing field (required by mode "File")')
    return ConsoleConfig(mode=mode, file=file)


def vm_config_from_json(data: object) -> VmConfig:
    """Cloud Hypervisor's VmConfig JSON (already decoded) -> VmConfig. Raises ConfigJsonError."""
    f = _fields(
        "",
        data,
        "",
        ("payload", "cpus", "memory", "disks", "net", "rng", "serial", "console"),
        ("payload",),
    )
    defaults = VmConfig()
    if not isinstance(data, dict):  # for mypy; _fields checked it
        raise ConfigJsonError("", "expected an object")
    rng: RngConfig | None
    if "rng" not in data:
        rng = RngConfig()  # Cloud Hypervisor always has a virtio-rng on /dev/urandom
    elif data["rng"] is None:
        rng = None
    else:
        rng = _rng("rng", data["rng"])
    return VmConfig(
        payload=_payload("payload", f["payload"]),
        cpus=_cpus("cpus", f["cpus"]) if "cpus" in f else defaults.cpus,
        memory=_memory("memory", f["memory"]) if "memory" in f else defaults.memory,
        serial=_console("serial", f["serial"], "serial") if "serial" in f else defaults.serial,
        console=(
            _console("console", f["console"], "console") if "console" in f else defaults.console
        ),
        disks=tuple(
            _disk(f"disks[{i}]", d) for i, d in enumerate(_list("disks", f.get("disks", [])))
        ),
        net=tuple(_net(f"net[{i}]", n) for i, n in enumerate(_list("net", f.get("net", [])))),
        rng=rng,
    )


# -- VmConfig -> JSON ----------------------------------------------------------------------------


def _rate_limiter_json(r: RateLimiterConfig | None) -> dict[str, Any] | None:
    if r is None:
        return None
    out: dict[str, Any] = {}
    if r.bw_size or r.bw_refill_time or r.bw_one_time_burst:
        out["bandwidth"] = {
            "size": r.bw_size,
            "one_time_burst": r.bw_one_time_burst,
            "refill_time": r.bw_refill_time,
        }
    if r.ops_size or r.ops_refill_time or r.ops_one_time_burst:
        out["ops"] = {
            "size": r.ops_size,
            "one_time_burst": r.ops_one_time_burst,
            "refill_time": r.ops_refill_time,
        }
    return out


def _without_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


def _console_json(c: ConsoleConfig) -> dict[str, Any]:
    return _without_none({"mode": c.mode.value, "file": None if c.file is None else str(c.file)})


def vm_config_to_json(config: VmConfig) -> dict[str, Any]:
    """VmConfig -> Cloud Hypervisor's VmConfig JSON (a dict ready for json.dumps)."""
    p = config.payload
    out: dict[str, Any] = {
        "cpus": {"boot_vcpus": config.cpus.boot_vcpus, "max_vcpus": config.cpus.max_vcpus},
        "memory": {
            "size": config.memory.size,
            "shared": config.memory.shared,
            "hugepages": config.memory.hugepages,
        },
        "payload": _without_none(
            {
                "kernel": None if p.kernel is None else str(p.kernel),
                "cmdline": p.cmdline,
                "initramfs": None if p.initramfs is None else str(p.initramfs),
                "firmware": None if p.firmware is None else str(p.firmware),
            }
        ),
        "serial": _console_json(config.serial),
        "console": _console_json(config.console),
        "rng": None if config.rng is None else {"src": str(config.rng.src)},
    }
    if config.disks:
        out["disks"] = [
            _without_none(
                {
                    "path": str(d.path),
                    "readonly": d.readonly,
                    "direct": d.direct,
                    "num_queues": d.num_queues,
                    "queue_size": d.queue_size,
                    "id": d.id,
                    "serial": d.serial,
                    "rate_limiter_config": _rate_limiter_json(d.rate_limiter),
                }
            )
            for d in config.disks
        ]
    if config.net:
        out["net"] = [
            _without_none(
                {
                    "tap": n.tap,
                    "ip": n.ip,
                    "mask": n.mask,
                    "mac": n.mac,
                    "host_mac": n.host_mac,
                    "mtu": n.mtu,
                    "num_queues": n.num_queues,
                    "queue_size": n.queue_size,
                    "id": n.id,
                    "rate_limiter_config": _rate_limiter_json(n.rate_limiter),
                }
            )
            for n in config.net
        ]
    return out
