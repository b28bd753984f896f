"""Why a VM stopped, and the process exit status each reason maps to."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StopReason(enum.Enum):
    POWEROFF = "poweroff"  # the guest powered off (ACPI S5, KVM system event)
    RESET = "reset"  # the guest asked for a reset (i8042 0xFE, ACPI reset register)
    TRIPLE_FAULT = "triple-fault"
    EMULATION_FAILURE = "emulation-failure"  # KVM could not emulate an instruction
    INTERNAL_ERROR = "internal-error"  # another KVM internal error, or a failed VM entry
    GUEST_PANIC = "guest-panic"  # KVM_SYSTEM_EVENT_CRASH (pvpanic)
    VMM_ERROR = "vmm-error"  # strato itself failed
    REQUESTED = "requested"  # the VMM was asked to stop (API, signal)


# Process exit statuses of the `strato` command. 2 is argparse's for usage errors and is used
# for every configuration error.
EXIT_OK = 0
EXIT_VMM_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_GUEST_CRASH = 3  # triple fault, guest panic
EXIT_EMULATION_FAILURE = 4  # emulation failure or another KVM internal error
EXIT_SECCOMP_VIOLATION = 159  # 128 + SIGSYS: a thread made a system call its filter forbids

_EXIT_STATUS = {
    StopReason.POWEROFF: EXIT_OK,
    StopReason.RESET: EXIT_OK,
    StopReason.REQUESTED: EXIT_OK,
    StopReason.TRIPLE_FAULT: EXIT_GUEST_CRASH,
    StopReason.GUEST_PANIC: EXIT_GUEST_CRASH,
    StopReason.EMULATION_FAILURE: EXIT_EMULATION_FAILURE,
    StopReason.INTERNAL_ERROR: EXIT_EMULATION_FAILURE,
    StopReason.VMM_ERROR: EXIT_VMM_ERROR,
}


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    message: str
    vcpu: int | None = None

    @property
    def exit_status(self) -> int:
        return _EXIT_STATUS[self.reason]

    @property
    def is_crash(self) -> bool:
        return self.exit_status != EXIT_OK
