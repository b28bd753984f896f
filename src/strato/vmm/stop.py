"""Why a VM stopped, the process exit status each reason maps to, and the two things that end
a run from outside the guest's own stop: SIGTERM/SIGINT (`StopSignals`) and a guest that resets
forever (`Reboots`)."""

from __future__ import annotations

import enum
import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from strato._sys.ratelog import RateLimitedLog

log = logging.getLogger(__name__)


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
    reboots: int = 0  # set by the runner: the reboots (guest resets) before this stop

    @property
    def exit_status(self) -> int:
        return _EXIT_STATUS[self.reason]

    @property
    def is_crash(self) -> bool:
        return self.exit_status != EXIT_OK


MAX_REBOOTS = 1000  # a guest that resets forever is stopped after this many reboots


class Reboots:
    """Counts the reboots that guest resets cause, logs each one (rate-limited: a guest that
    resets at once would otherwise write a line per boot), and stops the loop at `limit`."""

    def __init__(self, limit: int = MAX_REBOOTS) -> None:
        self.limit = limit
        self.count = 0
        self._log = RateLimitedLog(log)

    def next(self) -> Stop | None:
        """The guest reset: None to reboot it (counted), or, past the limit, the final Stop."""
        if self.count >= self.limit:
            stop = Stop(
                StopReason.VMM_ERROR,
                f"the guest reset {self.count + 1} times; giving up after {self.limit} reboots",
            )
            log.error("VM stopped: %s", stop.message)  # once: the loop ends here
            return stop
        self.count += 1
        self._log.warning("the guest reset; rebooting it (reboot %d)", self.count)
        return None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """SIGTERM and SIGINT as a request to stop the VM, which the main thread acts on.

    The handler runs on the main thread between two bytecodes, possibly while that thread
    holds a lock (the VM's, an Event's, the logging module's), so it takes none and calls
    nothing: it records the first signal, and the start, wait and teardown steps look at
    `stop`. A signal is therefore never a default-action death and never re-enters teardown.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> None:
        """Handle SIGTERM/SIGINT from now on (main thread only). A launcher may start strato
        with both blocked, so that none is lost before this: they are unblocked here, and a
        pending one is handled at once."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def stop(self) -> Stop | None:
        """The stop a received signal asks for, or None."""
        if self.signum is None:
            return None
        return Stop(StopReason.REQUESTED, f"stopped by {signal.Signals(self.signum).name}")

    @staticmethod
    def ignore_from_now() -> None:
        """For the last steps of the command, once its exit status is decided: the interpreter's
        shutdown puts its handlers back to the default action (death by signal), so ignore
        both signals instead."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
