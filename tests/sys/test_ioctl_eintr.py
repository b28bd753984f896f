"""ioctl restarts on EINTR (a SIGTERM during KVM_CREATE_VM ended strato with status 1), except
where the caller asks for EINTR: KVM_RUN, which a signal interrupts to kick a vCPU."""

from __future__ import annotations

import ctypes
import errno
import importlib
from collections.abc import Callable

import pytest

# The module, not the function of the same name that strato._sys re-exports.
sysioctl = importlib.import_module("strato._sys.ioctl")


def interrupted_then(
    calls: list[int], times: int, result: int, err: int = errno.EINTR
) -> Callable[..., int]:
    """A stand-in for libc's ioctl that fails `times` times with `err`, then returns `result`."""

    def fake(fd: object, request: object, arg: object) -> int:
        calls.append(1)
        if len(calls) <= times:
            ctypes.set_errno(err)
            return -1
        return result

    return fake


@pytest.mark.parametrize(
    "call",
    [
        lambda: sysioctl.ioctl(3, 0x1234, None, what="KVM_CREATE_VM"),
        lambda: sysioctl.ioctl(3, 0x1234, ctypes.c_uint64(0), what="KVM_CREATE_VM"),
        lambda: sysioctl.ioctl_int(3, 0x1234, 7, what="KVM_CREATE_VM"),
        lambda: sysioctl.ioctl_ptr(3, 0x1234, 0x1000, what="KVM_CREATE_VM"),
    ],
)
def test_eintr_is_restarted(monkeypatch: pytest.MonkeyPatch, call: Callable[[], int]) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sysioctl, "_ioctl", interrupted_then(calls, 3, 5))
    assert call() == 5
    assert len(calls) == 4


def test_eintr_reaches_a_caller_that_asks_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sysioctl, "_ioctl", interrupted_then(calls, 1, 0))
    with pytest.raises(sysioctl.SysError) as e:
        sysioctl.ioctl_int(3, 0x1234, what="KVM_RUN", restart=False)
    assert e.value.errno == errno.EINTR and e.value.what == "KVM_RUN"
    assert len(calls) == 1


def test_other_errors_are_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(sysioctl, "_ioctl", interrupted_then(calls, 1, 0, errno.EBADF))
    with pytest.raises(sysioctl.SysError, match="KVM_CREATE_VM: Bad file descriptor"):
        sysioctl.ioctl(3, 0x1234, what="KVM_CREATE_VM")
    assert len(calls) == 1
