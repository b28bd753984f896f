"""Cloud Hypervisor's VmConfig JSON <-> VmConfig: accepted documents, round trips, and errors
that name the field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

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
from strato.vmm.config_json import ConfigJsonError, vm_config_from_json, vm_config_to_json

MINIMAL: dict[str, Any] = {"payload": {"kernel": "/k"}}

# What Cloud Hypervisor itself prints in vm.info for a VM with a disk and a network device:
# every field it knows, at its defaults. A tool that reads a config back and re-creates the
# VM sends this.
CH_ECHO: dict[str, Any] = {
    "cpus": {
        "boot_vcpus": 2,
        "max_vcpus": 2,
        "kvm_hyperv": False,
        "max_phys_bits": 46,
        "features": {"amx": False},
        "nested": True,
        "core_scheduling": "Vm",
    },
    "memory": {
        "size": 536870912,
        "mergeable": False,
        "hotplug_method": "Acpi",
        "shared": True,
        "hugepages": False,
        "prefault": False,
        "reserve": False,
        "thp": True,
    },
    "payload": {"kernel": "/boot/vmlinux", "cmdline": "console=ttyS0 root=/dev/vda1"},
    "disks": [
        {
            "path": "/images/root.raw",
            "readonly": False,
            "direct": False,
            "iommu": False,
            "num_queues": 1,
            "queue_size": 128,
            "vhost_user": False,
            "id": "_disk0",
            "disable_io_uring": False,
            "disable_aio": False,
            "pci_segment": 0,
            "backing_files": False,
            "sparse": True,
            "image_type": "Raw",
            "lock_granularity": "ByteRange",
        }
    ],
    "net": [
        {
            "tap": "tap0",
            "ip": "192.168.249.1",
            "mask": "255.255.255.0",
            "mac": "12:34:56:78:9a:bc",
            "iommu": False,
            "num_queues": 2,
            "queue_size": 256,
            "vhost_user": False,
            "vhost_mode": "Client",
            "id": "_net1",
            "pci_segment": 0,
            "offload_tso": True,
            "offload_ufo": True,
            "offload_csum": True,
        }
    ],
    "rng": {"src": "/dev/urandom", "iommu": False},
    "serial": {"mode": "Null"},
    "console": {"mode": "Tty", "iommu": False},
    "debug_console": {"mode": "Off", "iobase": 233},
    "iommu": False,
    "watchdog": False,
    "pvpanic": False,
    "landlock_enable": False,
}


def test_minimal_config_gets_cloud_hypervisors_defaults() -> None:
    cfg = vm_config_from_json(MINIMAL)
    assert cfg.payload.kernel == Path("/k")
    assert cfg.cpus == CpusConfig()
    assert cfg.memory == MemoryConfig()
    assert cfg.rng == RngConfig()  # Cloud Hypervisor always has a virtio-rng
    assert cfg.serial.mode is ConsoleMode.NULL and cfg.console.mode is ConsoleMode.TTY
    assert cfg.disks == () and cfg.net == ()


def test_cloud_hypervisor_echo_is_accepted() -> None:
    cfg = vm_config_from_json(CH_ECHO)
    assert cfg.cpus == CpusConfig(boot_vcpus=2, max_vcpus=2)
    assert cfg.memory == MemoryConfig(size=512 << 20, shared=True)
    assert cfg.disks == (DiskConfig(path=Path("/images/root.raw"), id="_disk0"),)
    assert cfg.net[0].tap == "tap0" and cfg.net[0].mac == "12:34:56:78:9a:bc"
    assert cfg.payload.cmdline == "console=ttyS0 root=/dev/vda1"


def test_rate_limiter_json_shape() -> None:
    doc = copy.deepcopy(MINIMAL)
    doc["disks"] = [
        {
            "path": "/d",
            "rate_limiter_config": {
                "bandwidth": {"size": 1000, "one_time_burst": 10, "refill_time": 100},
                "ops": {"size": 5, "refill_time": 1},
            },
        }
    ]
    rl = vm_config_from_json(doc).disks[0].rate_limiter
    assert rl == RateLimiterConfig(1000, 10, 100, 5, 0, 1)
    back = vm_config_to_json(vm_config_from_json(doc))["disks"][0]["rate_limiter_config"]
    assert back["bandwidth"] == {"size": 1000, "one_time_burst": 10, "refill_time": 100}


def test_rng_null_means_no_device_and_round_trips() -> None:
    cfg = vm_config_from_json({**MINIMAL, "rng": None})
    assert cfg.rng is None
    assert vm_config_to_json(cfg)["rng"] is None
    assert vm_config_from_json(vm_config_to_json(cfg)) == cfg


_no_nul = st.characters(blacklist_characters="\x00")  # a command line cannot hold NUL
_names = st.text("abcdefgh0123456789_-", min_size=1, max_size=12)
_paths = _names.map(lambda n: Path("/tmp") / n)
_console = st.one_of(
    st.sampled_from([ConsoleMode.OFF, ConsoleMode.NULL, ConsoleMode.TTY, ConsoleMode.PTY]).map(
        lambda m: ConsoleConfig(m)
    ),
    _paths.map(lambda p: ConsoleConfig(ConsoleMode.FILE, p)),
)
_limiter = st.one_of(st.none(), st.builds(RateLimiterConfig, *([st.integers(0, 1 << 40)] * 6)))
_disks = st.builds(
    DiskConfig,
    path=_paths,
    readonly=st.booleans(),
    direct=st.booleans(),
    num_queues=st.integers(1, 64),
    queue_size=st.sampled_from([1, 2, 64, 128, 32768]),
    id=st.one_of(st.none(), _names),
    serial=st.one_of(st.none(), _names),
    rate_limiter=_limiter,
)
_macs = st.lists(st.integers(0, 255), min_size=6, max_size=6).map(
    lambda b: ":".join(f"{x:02x}" for x in b)
)
_nets = st.builds(
    NetConfig,
    tap=st.one_of(st.none(), _names),
    mac=st.one_of(st.none(), _macs),
    host_mac=st.one_of(st.none(), _macs),
    ip=st.sampled_from(["192.168.249.1", "10.0.0.1", "fd00::1"]),
    mask=st.sampled_from(["255.255.255.0", "255.0.0.0"]),
    mtu=st.one_of(st.none(), st.integers(68, 65535)),
    num_queues=st.sampled_from([2, 4, 64]),
    queue_size=st.sampled_from([2, 256, 32768]),
    id=st.one_of(st.none(), _names),
    rate_limiter=_limiter,
)


@st.composite
def _configs(draw: st.DrawFn) -> VmConfig:
    boot = draw(st.integers(1, 254))
    return VmConfig(
        payload=PayloadConfig(
            kernel=draw(st.one_of(st.none(), _paths)),
            cmdline=draw(st.one_of(st.none(), st.text(_no_nul, max_size=50))),
            initramfs=draw(st.one_of(st.none(), _paths)),
            firmware=draw(st.one_of(st.none(), _paths)),
        ),
        cpus=CpusConfig(boot, draw(st.integers(boot, 254))),
        memory=MemoryConfig(
            size=draw(st.integers(4096, 1 << 28)) * 4096,
            shared=draw(st.booleans()),
            hugepages=draw(st.booleans()),
        ),
        serial=draw(_console),
        console=draw(_console),
        disks=tuple(draw(st.lists(_disks, max_size=3))),
        net=tuple(draw(st.lists(_nets, max_size=3))),
        rng=draw(st.one_of(st.none(), _paths.map(RngConfig))),
    )


@given(_configs())
def test_round_trip_through_json(cfg: VmConfig) -> None:
    doc = json.loads(json.dumps(vm_config_to_json(cfg)))
    assert vm_config_from_json(doc) == cfg


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_any_json_is_a_config_or_a_config_json_error(doc: Any) -> None:
    for candidate in (
        doc,
        {"payload": doc},
        {"payload": {"kernel": "/k"}, "cpus": doc},
        {"payload": {}, "disks": [doc]},
        {"payload": {}, "net": doc},
    ):
        try:
            cfg = vm_config_from_json(candidate)
        except ConfigJsonError as e:
            # An error names where it is (the path is a prefix of the message) and says what.
            assert e.message, candidate
            assert str(e).startswith(e.path) and str(e).endswith(e.message), str(e)
        else:  # an accepted document is a config that survives a round trip
            assert isinstance(cfg, VmConfig)
            assert vm_config_from_json(json.loads(json.dumps(vm_config_to_json(cfg)))) == cfg


def _with(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with `value` set at a dotted path (list indexes as numbers)."""
    doc: Any = copy.deepcopy({**MINIMAL, "disks": [{"path": "/d"}], "net": [{}]})
    keys = path.split(".")
    node = doc
    for k in keys[:-1]:
        node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
    node[keys[-1]] = value
    return doc


BAD: list[tuple[Any, str, str]] = [
    ([], "", "expected an object"),
    ({"cpus": {"boot_vcpus": 1, "max_vcpus": 1}}, "payload", "missing field"),
    (_with("payload", "vmlinux"), "payload", "expected an object"),
    (_with("payload.kernel", 7), "payload.kernel", "expected a string"),
    (_with("payload.kernel", ""), "payload.kernel", "must not be empty"),
    (_with("payload.kernel", "/a\x00b"), "payload.kernel", "NUL"),
    (_with("payload.igvm", "/x"), "payload.igvm", "not supported"),
    (_with("payload.kernal", "/k"), "payload.kernal", "unknown field `kernal`"),
    (_with("cpus", {"boot_vcpus": 2}), "cpus.max_vcpus", "missing field"),
    (_with("cpus", {"boot_vcpus": "2", "max_vcpus": 2}), "cpus.boot_vcpus", 'string "2"'),
    (_with("cpus", {"boot_vcpus": True, "max_vcpus": 2}), "cpus.boot_vcpus", "boolean"),
    (_with("cpus", {"boot_vcpus": 1.5, "max_vcpus": 2}), "cpus.boot_vcpus", "number 1.5"),
    (_with("cpus", {"boot_vcpus": 0, "max_vcpus": 2}), "cpus.boot_vcpus", "out of range"),
    (_with("cpus", {"boot_vcpus": 255, "max_vcpus": 255}), "cpus.boot_vcpus", "out of range"),
    (_with("cpus", {"boot_vcpus": 4, "max_vcpus": 2}), "cpus.max_vcpus", "less than"),
    (
        _with("cpus", {"boot_vcpus": 1, "max_vcpus": 1, "topology": {}}),
        "cpus.topology",
        "not supported",
    ),
    (
        _with("cpus", {"boot_vcpus": 1, "max_vcpus": 1, "kvm_hyperv": True}),
        "cpus.kvm_hyperv",
        "not supported",
    ),
    (
        _with("cpus", {"boot_vcpus": 1, "max_vcpus": 1, "hyperthreads": 2}),
        "cpus.hyperthreads",
        "unknown field",
    ),
    (_with("memory", {"size": "512M"}), "memory.size", "expected an integer"),
    (_with("memory", {"size": 1 << 20}), "memory.size", "out of range"),
    (_with("memory", {"size": (16 << 20) + 1}), "memory.size", "multiple of 4096"),
    (_with("memory", {"size": 1 << 70}), "memory.size", "out of range"),
    (_with("memory", {"size": 16 << 20, "shared": "yes"}), "memory.shared", "boolean"),
    (
        _with("memory", {"size": 16 << 20, "hotplug_size": 1 << 30}),
        "memory.hotplug_size",
        "not supported",
    ),
    (_with("memory", {"size": 16 << 20, "zones": [{}]}), "memory.zones", "not supported"),
    (_with("disks", {"path": "/d"}), "disks", "expected an array"),
    (_with("disks", [{}]), "disks[0].path", "missing field"),
    (_with("disks.0.queue_size", 100), "disks[0].queue_size", "power of two"),
    (_with("disks.0.queue_size", 0), "disks[0].queue_size", "out of range"),
    (_with("disks.0.num_queues", 0), "disks[0].num_queues", "out of range"),
    (_with("disks.0.serial", "x" * 21), "disks[0].serial", "20 bytes"),
    (_with("disks.0.vhost_user", True), "disks[0].vhost_user", "not supported"),
    (_with("disks.0.image_type", "Qcow2"), "disks[0].image_type", "not supported"),
    (_with("disks.0.readonly", 1), "disks[0].readonly", "expected a boolean"),
    (
        _with("disks.0.rate_limiter_config", {"bandwidth": {"size": 1}}),
        "disks[0].rate_limiter_config.bandwidth.refill_time",
        "missing field",
    ),
    (
        _with("disks.0.rate_limiter_config", {"bw_size": 1}),
        "disks[0].rate_limiter_config.bw_size",
        "unknown field",
    ),
    (_with("net.0.mac", "12:34:56"), "net[0].mac", "not a MAC address"),
    (_with("net.0.ip", "300.1.1.1"), "net[0].ip", "not an IP address"),
    (_with("net.0.num_queues", 3), "net[0].num_queues", "odd"),
    (_with("net.0.queue_size", 255), "net[0].queue_size", "power of two"),
    (_with("net.0.mtu", 10), "net[0].mtu", "out of range"),
    (_with("net.0.tap", "a-very-long-tap-name"), "net[0].tap", "1 to 15"),
    (_with("net.0.fds", [3]), "net[0].fds", "not supported"),
    (_with("net.0.vhost_mode", "Server"), "net[0].vhost_mode", "not supported"),
    (_with("rng", {}), "rng.src", "missing field"),
    (_with("rng", {"src": "/dev/urandom", "iommu": True}), "rng.iommu", "not supported"),
    (_with("serial", {"mode": "Serial"}), "serial.mode", "unknown variant"),
    (_with("serial", {"mode": "File"}), "serial.file", "missing field"),
    (_with("serial", {"mode": "Socket", "socket": "/s"}), "serial.socket", "not supported"),
    (_with("console", {}), "console.mode", "missing field"),
    (_with("console", {"mode": "tty"}), "console.mode", "unknown variant"),
    (_with("vsock", {"cid": 3, "socket": "/v"}), "vsock", "not supported"),
    (_with("fs", [{"tag": "t", "socket": "/s"}]), "fs", "not supported"),
    (_with("platform", {"num_pci_segments": 2}), "platform", "not supported"),
    (_with("iommu", True), "iommu", "not supported"),
    (_with("no_reboot", True), "no_reboot", "unknown field"),
    (_with("kernel", "/k"), "kernel", "unknown field `kernel`"),
]


@pytest.mark.parametrize(
    ("doc", "field", "words"), BAD, ids=[f"{i}:{b[1]}" for i, b in enumerate(BAD)]
)
def test_bad_config_names_the_field(doc: Any, field: str, words: str) -> None:
    with pytest.raises(ConfigJsonError) as e:
        vm_config_from_json(doc)
    assert e.value.path == field, str(e.value)
    assert words in str(e.value)
    assert str(e.value).startswith(field)


def test_unknown_field_lists_the_known_ones() -> None:
    with pytest.raises(ConfigJsonError) as e:
        vm_config_from_json(_with("cpus", {"boot_vcpus": 1, "max_vcpus": 1, "bogus": 1}))
    assert "`boot_vcpus`" in str(e.value) and "`max_vcpus`" in str(e.value)
