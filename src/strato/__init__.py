"""strato: a virtual machine monitor in Python on Linux KVM.

The embedding API::

    import strato
    cfg = strato.VmConfig(payload=strato.PayloadConfig(kernel=Path("vmlinuz")), no_reboot=True)
    stop = strato.run(cfg)             # boot and wait for the guest to stop
    vm = strato.build_vm(cfg)          # or drive a Vm yourself: vm.start(), vm.wait(), ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from strato.vmm.builder import build_vm
    from strato.vmm.config import (
        ConfigError,
        ConsoleConfig,
        ConsoleMode,
        CpusConfig,
        DiskConfig,
        MemoryConfig,
        NetConfig,
        PayloadConfig,
        RngConfig,
        VmConfig,
    )
    from strato.vmm.runner import run
    from strato.vmm.stop import Stop, StopReason
    from strato.vmm.vm import Vm, VmState

_LAZY = {
    "build_vm": "strato.vmm.builder",
    "run": "strato.vmm.runner",
    "Stop": "strato.vmm.stop",
    "StopReason": "strato.vmm.stop",
    "Vm": "strato.vmm.vm",
    "VmState": "strato.vmm.vm",
    **{
        name: "strato.vmm.config"
        for name in (
            "ConfigError ConsoleConfig ConsoleMode CpusConfig DiskConfig MemoryConfig "
            "NetConfig PayloadConfig RngConfig VmConfig"
        ).split()
    },
}

__all__ = [
    "ConfigError",
    "ConsoleConfig",
    "ConsoleMode",
    "CpusConfig",
    "DiskConfig",
    "MemoryConfig",
    "NetConfig",
    "PayloadConfig",
    "RngConfig",
    "Stop",
    "StopReason",
    "Vm",
    "VmConfig",
    "VmState",
    "__version__",
    "build_vm",
    "run",
]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import strato` stays cheap (start-up time is a feature).
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'strato' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
