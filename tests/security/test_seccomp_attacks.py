"""Seccomp as an attacker meets it: a thread taken over (a vCPU by a guest exploit, a device
thread, the HTTP thread, or the whole VMM) tries what an exploit does next.

Each attempt runs in a forked child that installs the filters a real thread of that kind runs
under (main, then its own kind: filters stack) and makes one raw system call. A refused call
either ends the child with EXIT_SECCOMP_VIOLATION and the SIGSYS message (the default action,
SECCOMP_RET_TRAP), or fails with the errno the filter gives (EPERM for executable memory,
EACCES for file lookups off the main thread). The allowed calls next to each one still work.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.vmm import seccomp
from strato.vmm.stop import EXIT_SECCOMP_VIOLATION
from strato.vmm.vcpu import KICK_SIGNAL

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

SYS = {
    "mmap": 9,
    "mprotect": 10,
    "ioctl": 16,
    "socket": 41,
    "connect": 42,
    "bind": 49,
    "unlink": 87,
    "gettid": 186,
    "tkill": 200,
    "tgkill": 234,
    "openat": 257,
    "prlimit64": 302,
}
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
AT_FDCWD = -100
RLIMIT_NOFILE = 7
KVM_SET_REGS = seccomp.VCPU_STATE_IOCTLS[1]
KVM_GET_REGS = seccomp.VCPU_STATE_IOCTLS[0]
KVM_CREATE_VCPU = 0xAE41


def sys(name: str, *args: int) -> int:
    """The raw system call: its result, or -errno."""
    ret = libc.syscall(ctypes.c_long(SYS[name]), *(ctypes.c_long(a) for a in args))
    return int(ret) if ret >= 0 else -ctypes.get_errno()


@dataclass
class Outcome:
    status: int  # the child's exit status
    result: int | None  # what the call returned (-errno on failure), None if it never returned
    stderr: str

    @property
    def trapped(self) -> bool:
        return self.status == EXIT_SECCOMP_VIOLATION and "forbidden system call" in self.stderr


def attempt(kind: str, call: Callable[[], int], mode: str = "true") -> Outcome:
    """Run `call` in a forked child under the filters of a `kind` thread."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only os._exit leaves it
        try:
            os.dup2(err_w, 2)
            signal.signal(KICK_SIGNAL, lambda signum, frame: None)  # as strato installs it
            seccomp.install("main", mode)
            if kind != "main":
                seccomp.install(kind, mode)
            os.write(out_w, str(call()).encode())
            os._exit(0)
        except BaseException as e:
            os.write(2, f"child failed: {e!r}\n".encode())
            os._exit(1)
    os.close(out_w)
    os.close(err_w)
    with os.fdopen(out_r, "rb") as out, os.fdopen(err_r, "rb") as err:
        result, stderr = out.read().decode(), err.read().decode()
    _, status = os.waitpid(pid, 0)
    return Outcome(os.waitstatus_to_exitcode(status), int(result) if result else None, stderr)


def refused_by_trap(kind: str, call: Callable[[], int], name: str) -> None:
    o = attempt(kind, call)
    assert o.trapped, o
    assert o.result is None, o
    assert f"made the forbidden system call {name} ({SYS[name]}), refused by the {kind} filter" in (
        o.stderr
    )


def allowed(kind: str, call: Callable[[], int]) -> int:
    o = attempt(kind, call)
    assert o.status == 0 and o.result is not None, o
    return o.result


KINDS = seccomp.KINDS


@pytest.fixture(scope="module", autouse=True)
def compiled() -> None:
    seccomp.prepare("true")  # libseccomp loaded and the SIGSYS handler made before any fork
    seccomp.install_sigsys_handler()


@pytest.fixture(scope="module")
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process an attacker would like to signal or change."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


# -- executable memory ---------------------------------------------------------------------------
def _mmap(prot: int) -> int:
    return sys("mmap", 0, mmap.PAGESIZE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)


def _mprotect_after_mmap(prot: int) -> int:
    addr = _mmap(PROT_READ | PROT_WRITE)
    assert addr > 0
    return sys("mprotect", addr, mmap.PAGESIZE, prot)


@pytest.mark.parametrize("kind", KINDS)
def test_no_thread_maps_memory_executable(kind: str) -> None:
    assert attempt(kind, lambda: _mmap(PROT_READ | PROT_EXEC)).result == -errno.EPERM
    assert attempt(kind, lambda: _mmap(PROT_READ | PROT_WRITE | PROT_EXEC)).result == -errno.EPERM
    assert allowed(kind, lambda: _mmap(PROT_READ | PROT_WRITE)) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_no_thread_makes_memory_executable(kind: str) -> None:
    o = attempt(kind, lambda: _mprotect_after_mmap(PROT_READ | PROT_EXEC))
    assert o.result == -errno.EPERM, o
    assert allowed(kind, lambda: _mprotect_after_mmap(PROT_READ)) == 0


def test_log_mode_lets_executable_memory_through() -> None:
    """--seccomp log logs instead of refusing (the kernel's audit log has the call)."""
    o = attempt("vcpu", lambda: _mmap(PROT_READ | PROT_EXEC), mode="log")
    assert o.status == 0 and o.result is not None and o.result > 0, o


def _unloaded_extension_module() -> str:
    import importlib.machinery
    import importlib.util

    for name in ("syslog", "_lsprof", "_crypt", "audioop", "_dbm", "_gdbm", "readline", "_lzma"):
        spec = importlib.util.find_spec(name)
        loader = spec.loader if spec is not None else None
        if name not in sys_modules() and isinstance(
            loader, importlib.machinery.ExtensionFileLoader
        ):
            return name
    pytest.skip("no extension module left unloaded in this Python")


def sys_modules() -> dict[str, object]:
    import sys as sys_module

    return dict(sys_module.modules)


def test_a_late_extension_import_fails_instead_of_ending_strato() -> None:
    """The main thread's lazy import of a shared library (dlopen maps it executable) is an
    ImportError, not a SIGSYS; what strato imports late is loaded before the filters."""
    name = _unloaded_extension_module()

    def late_import() -> int:
        try:
            __import__(name)
        except ImportError:
            return -errno.EPERM
        return 0

    assert attempt("main", late_import).result == -errno.EPERM
    assert set(seccomp.PRELOAD) <= set(sys_modules())


# -- signals and limits --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["main", "vcpu", "events"])
def test_signals_reach_only_strato_and_only_the_kick(
    kind: str, bystander: subprocess.Popen[bytes]
) -> None:
    other = bystander.pid
    refused_by_trap(kind, lambda: sys("tgkill", other, other, signal.SIGKILL), "tgkill")
    refused_by_trap(kind, lambda: sys("tgkill", other, other, KICK_SIGNAL), "tgkill")

    def to_self(sig: int) -> int:
        return sys("tgkill", os.getpid(), sys("gettid"), sig)

    refused_by_trap(kind, lambda: to_self(signal.SIGUSR1), "tgkill")
    refused_by_trap(kind, lambda: sys("tkill", other, signal.SIGKILL), "tkill")
    assert allowed(kind, lambda: to_self(KICK_SIGNAL)) == 0
    assert bystander.poll() is None


def test_the_api_thread_sends_no_signal_at_all() -> None:
    refused_by_trap("api", lambda: sys("tgkill", os.getpid(), sys("gettid"), KICK_SIGNAL), "tgkill")


def test_resource_limits_only_of_strato_itself(bystander: subprocess.Popen[bytes]) -> None:
    old = (ctypes.c_uint64 * 2)()
    refused_by_trap(
        "main",
        lambda: sys("prlimit64", bystander.pid, RLIMIT_NOFILE, 0, ctypes.addressof(old)),
        "prlimit64",
    )
    assert (
        allowed("main", lambda: sys("prlimit64", 0, RLIMIT_NOFILE, 0, ctypes.addressof(old))) == 0
    )
    assert allowed(
        "main", lambda: sys("prlimit64", os.getpid(), RLIMIT_NOFILE, 0, ctypes.addressof(old))
    ) == 0  # fmt: skip
    for kind in ("vcpu", "events", "api"):
        refused_by_trap(
            kind, lambda: sys("prlimit64", 0, RLIMIT_NOFILE, 0, ctypes.addressof(old)), "prlimit64"
        )


# -- sockets ---------------------------------------------------------------------------------------
@pytest.fixture
def listening() -> Iterator[Path]:
    """A unix socket someone serves (the docker socket, a systemd socket...)."""
    with tempfile.TemporaryDirectory(prefix="stsock") as d:
        path = Path(d) / "victim.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(path))
            s.listen(1)
            yield path


def _sockaddr(path: Path) -> ctypes.Array[ctypes.c_char]:
    raw = socket.AF_UNIX.to_bytes(2, "little") + str(path).encode() + b"\0"
    return ctypes.create_string_buffer(raw, len(raw))


def test_the_vmm_connects_to_no_socket(listening: Path) -> None:
    addr = _sockaddr(listening)

    def connect() -> int:
        fd = sys("socket", socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC, 0)
        assert fd >= 0  # a stream socket may still be made (socketpair-like uses)
        return sys("connect", fd, ctypes.addressof(addr), len(addr))

    def bind() -> int:
        fd = sys("socket", socket.AF_UNIX, socket.SOCK_STREAM, 0)
        return sys("bind", fd, ctypes.addressof(addr), len(addr))

    refused_by_trap("main", connect, "connect")
    refused_by_trap("main", bind, "bind")
    # A datagram socket could sendto any socket path without connect.
    refused_by_trap("main", lambda: sys("socket", socket.AF_UNIX, socket.SOCK_DGRAM, 0), "socket")
    refused_by_trap("main", lambda: sys("socket", socket.AF_INET, socket.SOCK_STREAM, 0), "socket")
    for kind in ("vcpu", "events", "api"):
        refused_by_trap(
            kind, lambda: sys("socket", socket.AF_UNIX, socket.SOCK_STREAM, 0), "socket"
        )


# -- ioctls ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_", [KVM_SET_REGS, KVM_GET_REGS, KVM_CREATE_VCPU, 0x5412])
def test_a_vcpu_thread_makes_no_ioctl_but_its_own(request_: int) -> None:
    """KVM_SET_REGS (rewrite another vCPU), KVM_CREATE_VCPU, TIOCSTI (0x5412: type into the
    terminal): refused before the fd is even looked at; KVM_RUN goes through (EBADF here)."""
    refused_by_trap("vcpu", lambda: sys("ioctl", -1, request_, 0), "ioctl")
    assert allowed("vcpu", lambda: sys("ioctl", -1, seccomp.KVM_RUN, 0)) == -errno.EBADF


@pytest.mark.parametrize("kind", ["events", "api"])
def test_no_other_thread_runs_a_vcpu(kind: str) -> None:
    refused_by_trap(kind, lambda: sys("ioctl", -1, seccomp.KVM_RUN, 0), "ioctl")


# -- files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vcpu", "events", "api"])
def test_threads_off_main_create_and_remove_no_file(kind: str, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    created = ctypes.create_string_buffer(str(tmp_path / "planted").encode())
    o = attempt(kind, lambda: sys("openat", AT_FDCWD, ctypes.addressof(created), 0o101, 0o600))
    assert o.result == -errno.EACCES, o  # O_WRONLY|O_CREAT: soft-denied (a lazy import's open)
    assert not (tmp_path / "planted").exists()
    name = ctypes.create_string_buffer(str(victim).encode())
    refused_by_trap(kind, lambda: sys("unlink", ctypes.addressof(name)), "unlink")
    assert victim.exists()


# -- the counts, for the record --------------------------------------------------------------------
# Firecracker's x86_64 filters (resources/seccomp/x86_64-unknown-linux-musl.json): distinct
# system calls per thread.
FIRECRACKER = {"vmm": 38, "api": 27, "vcpu": 21}


def test_each_kind_allows_fewer_calls_than_before_this_tightening() -> None:
    counts = {kind: len(seccomp.allowed_syscalls(kind)) for kind in KINDS}
    # vcpu/events/api stay within 2x Firecracker's (CPython needs more: the GIL, its allocator,
    # its signal handling); main is the whole VMM's bound and builds VMs.
    assert counts["vcpu"] <= 2 * FIRECRACKER["vcpu"], counts
    assert counts["api"] <= 2 * FIRECRACKER["api"], counts
    assert counts["events"] <= 2 * FIRECRACKER["vmm"], counts
    for gone in ("connect", "bind", "tkill", "kill"):
        assert gone not in seccomp.allowed_syscalls("main"), gone
