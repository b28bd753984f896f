"""Per-vCPU CPUID: the host's supported leaves, patched with this vCPU's identity and topology.

Topology: one socket, `nr_vcpus` cores, one thread per core; the APIC ID (and x2APIC ID) of a
vCPU is its index. The VMM gets the entries from KVM_GET_SUPPORTED_CPUID, runs them through
`patch_cpuid` for each vCPU and hands the result to KVM_SET_CPUID2.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from strato.boot.errors import BootError

__all__ = [
    "KVM_CPUID_FLAG_SIGNIFCANT_INDEX",
    "MAX_VCPUS",
    "CpuidEntry",
    "patch_cpuid",
]

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1  # sic, the kernel's spelling
MAX_VCPUS = 254  # xAPIC IDs 0..253, the IOAPIC takes the next one, 255 is broadcast

LEAF_FEATURES = 0x1
LEAF_CACHE_PARAMS = 0x4
LEAF_TOPOLOGY = 0xB
LEAF_TOPOLOGY_V2 = 0x1F

_ECX_HYPERVISOR = 1 << 31
_EDX_HTT = 1 << 28
_LEVEL_SMT = 1
_LEVEL_CORE = 2


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _features(e: CpuidEntry, vcpu_id: int, nr_vcpus: int) -> CpuidEntry:
    # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
    ebx = (e.ebx & 0x0000FFFF) | (min(nr_vcpus, 0xFF) << 16) | (vcpu_id << 24)
    edx = e.edx | _EDX_HTT if nr_vcpus > 1 else e.edx & ~_EDX_HTT
    return replace(e, ebx=ebx, ecx=e.ecx | _ECX_HYPERVISOR, edx=edx)


def _cache_params(e: CpuidEntry, nr_vcpus: int) -> CpuidEntry:
    if e.eax & 0x1F == 0:  # no more caches
        return e
    level = (e.eax >> 5) & 0x7
    sharing = 0 if level <= 2 else min(nr_vcpus - 1, 0xFFF)  # L1/L2 per core, L3 per package
    cores = min(nr_vcpus - 1, 0x3F)
    eax = (e.eax & 0x00003FFF) | (sharing << 14) | (cores << 26)
    return replace(e, eax=eax)


def _topology(e: CpuidEntry, vcpu_id: int, nr_vcpus: int) -> CpuidEntry:
    if e.index == 0:  # SMT level: one thread per core
        eax, ebx, ecx = 0, 1, (_LEVEL_SMT << 8)
    elif e.index == 1:  # core level: all vCPUs in one package
        eax, ebx, ecx = (nr_vcpus - 1).bit_length(), nr_vcpus, (_LEVEL_CORE << 8) | 1
    else:  # no further levels
        eax, ebx, ecx = 0, 0, e.index & 0xFF
    return replace(e, eax=eax, ebx=ebx, ecx=ecx, edx=vcpu_id)


def patch_cpuid(entries: Iterable[CpuidEntry], vcpu_id: int, nr_vcpus: int) -> list[CpuidEntry]:
    """A new list with leaves 1, 4, 0xB and 0x1F set for `vcpu_id` of `nr_vcpus`.

    Everything else (KVM's signature at 0x40000000 included) is passed through unchanged.
    """
    if not 1 <= nr_vcpus <= MAX_VCPUS:
        raise BootError(f"the number of vCPUs must be 1..{MAX_VCPUS}, not {nr_vcpus}")
    if not 0 <= vcpu_id < nr_vcpus:
        raise BootError(f"vCPU id {vcpu_id} is out of range for {nr_vcpus} vCPUs")
    out = []
    for e in entries:
        if e.function == LEAF_FEATURES:
            e = _features(e, vcpu_id, nr_vcpus)
        elif e.function == LEAF_CACHE_PARAMS:
            e = _cache_params(e, nr_vcpus)
        elif e.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
            e = _topology(e, vcpu_id, nr_vcpus)
        out.append(e)
    return out
