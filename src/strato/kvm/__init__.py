"""Typed access to the KVM API: Kvm (system), VmFd, VcpuFd and typed exits. No policy."""

from strato.kvm import exits, ioctls
from strato.kvm.fds import Kvm, KvmError, VcpuFd, VmFd, default_irq_routing, msi_route

__all__ = [
    "Kvm",
    "KvmError",
    "VcpuFd",
    "VmFd",
    "default_irq_routing",
    "exits",
    "ioctls",
    "msi_route",
]
