"""Detect a host whose KVM emulates guest kernel mode (PVM) and say so once, in plain words."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

_warned = False

PVM_NOTE = (
    "this host's KVM is nested on PVM (/sys/module/kvm_pvm): guest kernel-mode code is "
    "emulated instruction by instruction (about 1000x slower than hardware virtualization), "
    "guest user-mode code runs at full speed, and a stock Linux kernel stops at an emulation "
    "failure before userspace. strato keeps working; expect a Linux boot to take minutes."
)


def kvm_emulates_kernel_mode(sysfs: Path = Path("/sys/module")) -> bool:
    return (sysfs / "kvm_pvm").exists()


def warn_if_emulated() -> bool:
    """Log PVM_NOTE once per process when the host is PVM; returns whether it is."""
    global _warned
    emulated = kvm_emulates_kernel_mode()
    if emulated and not _warned:
        _warned = True
        log.warning("%s", PVM_NOTE)
    return emulated
