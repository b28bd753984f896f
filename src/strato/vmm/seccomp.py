"""Seccomp filters, one per thread kind, as Cloud Hypervisor has them (`--seccomp true|false|log`).

Every strato thread runs under an allow list of system calls:

- `main`: the main thread (and the VMM thread of the REST API). It builds VMs, so it needs the
  most. It is installed first, on the main thread, before any guest code runs, and every thread
  created afterwards inherits it. Seccomp filters stack (a call must pass all of a thread's
  filters), so `main` is the upper bound of every other kind.
- `vcpu`: a vCPU thread: KVM_RUN and the device emulation that runs on guest exits.
- `events`: the device event loop: virtio queues, disks, taps, the rng source, the console.
- `api`: the HTTP server of the REST API: accepts, reads and answers on unix sockets.

The other kinds are installed from inside their thread (a thread-start hook, no TSYNC), before
the thread runs anything else. The filters are compiled once with libseccomp (the `pyseccomp`
binding) and loaded with the raw `seccomp(2)` call, so nothing but one system call runs in a
thread to install its filter.

`true` makes a forbidden call raise SIGSYS (SECCOMP_RET_TRAP). The handler here writes one line
naming the system call and the thread to stderr (and the log file) and exits with status
`EXIT_SECCOMP_VIOLATION`. `log` lets every call through and has the kernel log the forbidden ones
(SECCOMP_RET_LOG: see `dmesg` or the audit log). `false` installs nothing.

Python itself needs a common set in every thread (memory allocation, the GIL's futexes,
signals, thread exit): `BASELINE`. In the vcpu, events and api kinds, opening or looking up a
file fails with EACCES instead of ending strato: that is what a lazy import or a traceback's
source lookup does, and both must degrade (no source lines, an ImportError) rather than kill.

Arguments are filtered where a call is dangerous with the wrong ones (the threat model is
Firecracker's: a guest that took over a vCPU or device thread):

- No thread maps memory executable or makes a mapping executable: `mmap` and `mprotect` with
  PROT_EXEC fail with EPERM (`REFUSED`: a lazy import of an extension module after the filters
  then fails as an ImportError instead of ending strato). Everything that needs executable
  memory is done before the first filter: the SIGSYS handler (a ctypes callback: a libffi
  closure), libseccomp, and `PRELOAD`, the extension modules strato imports lazily.
- Signals only to strato itself (`tgkill` with tgid == getpid()) and only the vCPU kick and
  SIGABRT (glibc's abort()); no `tkill`, `kill` or `rt_sigqueueinfo`. `prlimit64` only on
  strato itself (pid 0 or getpid()). The filters are compiled per process for that reason.
- ioctl on its request: a vCPU thread only KVM_RUN and what devices do on guest writes.
- No `connect` or `bind`: the API socket is bound before the main filter goes on, and strato
  connects to nothing. Sockets are AF_UNIX stream sockets only (a datagram socket could
  `sendto` any socket path).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from strato.devices.backends import netif
from strato.vmm.stop import EXIT_SECCOMP_VIOLATION, EXIT_VMM_ERROR

log = logging.getLogger(__name__)

KINDS = ("main", "vcpu", "events", "api")
MODES = ("true", "false", "log")

# 128 + SIGSYS: what a shell reports for Cloud Hypervisor, which dies by SIGSYS.

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class SeccompError(RuntimeError):
    """A filter could not be built or installed."""


@dataclass(frozen=True)
class Cond:
    """`(argument[arg] & mask) == value`."""

    arg: int
    value: int
    mask: int = _U64


@dataclass(frozen=True)
class Allow:
    """Allow `syscall`; with `when`, only for arguments matching one of the alternatives
    (each a tuple of conditions that must all hold)."""

    syscall: str
    why: str
    when: tuple[tuple[Cond, ...], ...] = ()


@dataclass(frozen=True)
class Refuse:
    """Make `syscall` fail with `err` (in mode "true"; under "log" it is logged and let
    through like any call off the list) for arguments matching one of the alternatives."""

    syscall: str
    err: int
    why: str
    when: tuple[tuple[Cond, ...], ...] = ()


def _args(*alternatives: Cond) -> tuple[tuple[Cond, ...], ...]:
    return tuple((c,) for c in alternatives)


def _ioctls(*requests: int) -> tuple[tuple[Cond, ...], ...]:
    # The kernel takes the request as an unsigned int: compare the low 32 bits only, so that a
    # sign-extended request cannot slip past and a zero-extended one is not refused.
    return _args(*(Cond(1, r & _U32, _U32) for r in requests))


# -- ioctl request numbers ---------------------------------------------------------------------
def _kvm(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAE << 8) | nr


_NONE, _W, _R = 0, 1, 2
KVM_RUN = _kvm(_NONE, 0x80, 0)
KVM_IRQ_LINE = _kvm(_W, 0x61, 8)
KVM_SET_GSI_ROUTING = _kvm(_W, 0x6A, 8)
KVM_IRQFD = _kvm(_W, 0x76, 32)
KVM_IOEVENTFD = _kvm(_W, 0x79, 64)
KVM_SIGNAL_MSI = _kvm(_W, 0xA5, 32)
# A vCPU's own state: set up by the main thread when it builds the VM (main allows every KVM
# request); no vCPU thread calls them, so the vcpu filter refuses them (a compromised vCPU
# thread must not rewrite another vCPU's registers).
VCPU_STATE_IOCTLS = (
    _kvm(_R, 0x81, 144),  # KVM_GET_REGS
    _kvm(_W, 0x82, 144),  # KVM_SET_REGS
    _kvm(_R, 0x83, 312),  # KVM_GET_SREGS
    _kvm(_W, 0x84, 312),  # KVM_SET_SREGS
    _kvm(_R | _W, 0x88, 8),  # KVM_GET_MSRS
    _kvm(_W, 0x89, 8),  # KVM_SET_MSRS
    _kvm(_R, 0x8C, 416),  # KVM_GET_FPU
    _kvm(_W, 0x8D, 416),  # KVM_SET_FPU
    _kvm(_R, 0x8E, 1024),  # KVM_GET_LAPIC
    _kvm(_W, 0x8F, 1024),  # KVM_SET_LAPIC
    _kvm(_R, 0x98, 4),  # KVM_GET_MP_STATE
    _kvm(_W, 0x99, 4),  # KVM_SET_MP_STATE
    _kvm(_R, 0x9F, 64),  # KVM_GET_VCPU_EVENTS
    _kvm(_W, 0xA0, 64),  # KVM_SET_VCPU_EVENTS
    _kvm(_R, 0xA4, 4096),  # KVM_GET_XSAVE
    _kvm(_W, 0xA5, 4096),  # KVM_SET_XSAVE
    _kvm(_R, 0xA6, 392),  # KVM_GET_XCRS
    _kvm(_W, 0xA7, 392),  # KVM_SET_XCRS
)
TCGETS, TCSETS, TCSETSW, TCSETSF = 0x5401, 0x5402, 0x5403, 0x5404
TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX = 0x5413, 0x541B, 0x5421, 0x5450, 0x5451
TUNSETIFF, TUNSETOFFLOAD, TUNGETIFF = 0x400454CA, 0x400454D0, 0x800454D2
TUNSETVNETHDRSZ = 0x400454D8
TUNSETQUEUE = 0x400454D9  # virtio-net attaches/detaches multiqueue tap queues

# -- other argument values ---------------------------------------------------------------------
CLONE_THREAD = 0x00010000
AF_UNIX = 1
SOCK_STREAM, SOCK_TYPE_MASK = 1, 0xF  # the type argument also carries SOCK_CLOEXEC/NONBLOCK
PROT_EXEC = 0x4
KICK_SIGNAL = int(signal.SIGRTMIN)  # strato.vmm.vcpu.KICK_SIGNAL (a test checks they agree)
SIGNALS_SENT = (KICK_SIGNAL, int(signal.SIGABRT))  # the kick; glibc's abort() raises SIGABRT
PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS = 15, 16, 38
F_GETFD, F_SETFD, F_GETFL, F_SETFL = 1, 2, 3, 4
SECCOMP_SET_MODE_FILTER = 1

# -- the allow lists -------------------------------------------------------------------------
BASELINE: tuple[Allow, ...] = (
    Allow("brk", "the C allocator grows the heap"),
    Allow(
        "mmap",
        "Python's and the C allocator's arenas, thread stacks (never executable)",
        _args(Cond(2, 0, PROT_EXEC)),
    ),
    Allow("munmap", "allocator arenas released; mmap objects finalised on any thread"),
    Allow("mremap", "realloc of large blocks"),
    Allow(
        "mprotect",
        "the C allocator grows per-thread arenas; guard pages (never to executable)",
        _args(Cond(2, 0, PROT_EXEC)),
    ),
    Allow("madvise", "the allocator returns pages; glibc frees an exiting thread's stack"),
    Allow("futex", "the GIL, locks, conditions, thread joins"),
    Allow("rt_sigreturn", "return from a signal handler (the vCPU kick, SIGTERM)"),
    Allow("rt_sigprocmask", "glibc masks signals around pthread_kill and thread exit"),
    Allow("restart_syscall", "a sleep or wait interrupted by a signal is restarted"),
    Allow("sched_yield", "lock spinning in glibc and CPython"),
    Allow("clock_gettime", "time.monotonic() where the vDSO falls back to a system call"),
    Allow("gettimeofday", "time.time() where the vDSO falls back to a system call"),
    Allow("clock_nanosleep", "time.sleep()"),
    Allow("nanosleep", "time.sleep() in older glibc"),
    Allow("getpid", "log records; pthread_kill"),
    Allow("gettid", "threading's native ids"),
    Allow("write", "log lines to stderr or the log file; eventfd signals"),
    Allow("close", "finalizers close fds on whichever thread drops the last reference"),
    Allow("exit", "the thread ends"),
    Allow("exit_group", "the process ends (including from the SIGSYS handler)"),
)

# Every kind: executable memory is refused with EPERM (a late dlopen fails, an ImportError).
REFUSED: tuple[Refuse, ...] = (
    Refuse("mmap", errno.EPERM, "no executable mappings", _args(Cond(2, PROT_EXEC, PROT_EXEC))),
    Refuse(
        "mprotect", errno.EPERM, "nothing made executable", _args(Cond(2, PROT_EXEC, PROT_EXEC))
    ),
)

# Calls that fail with EACCES instead of ending strato in the vcpu, events and api kinds: file
# lookups that Python's lazy imports and traceback source lines make (see the module doc).
SOFT_DENIED: tuple[str, ...] = (
    "open",
    "openat",
    "openat2",
    "stat",
    "lstat",
    "newfstatat",
    "statx",
    "readlink",
    "readlinkat",
    "access",
    "faccessat",
    "faccessat2",
    "getcwd",
)

_DATA_PLANE: tuple[Allow, ...] = (
    Allow("read", "eventfds, timerfds, taps, the rng source, console input"),
    Allow("readv", "tap frames and rng bytes into guest buffers"),
    Allow("writev", "tap frames out of guest buffers"),
    Allow("pread64", "disk reads"),
    Allow("preadv", "disk reads into guest buffers"),
    Allow("preadv2", "disk reads into guest buffers (Python's os.preadv)"),
    Allow("pwrite64", "disk writes"),
    Allow("pwritev", "disk writes from guest buffers"),
    Allow("pwritev2", "disk writes from guest buffers (Python's os.pwritev)"),
    Allow("fdatasync", "virtio-blk flush"),
    Allow("fsync", "virtio-blk flush"),
    Allow("fallocate", "virtio-blk discard and write-zeroes"),
    Allow("epoll_ctl", "devices (un)register their fds with the event loop"),
    Allow("timerfd_settime", "rate limiters arm their refill timers"),
    Allow("timerfd_gettime", "rate limiters read their timers"),
)


def _signals_to_self(pid: int) -> Allow:
    return Allow(
        "tgkill",
        "stopping the VM kicks every vCPU out of KVM_RUN (pthread_kill); abort(): strato's own "
        "threads only (tgid == getpid()), the kick signal and SIGABRT only",
        tuple((Cond(0, pid, _U32), Cond(2, sig, _U32)) for sig in SIGNALS_SENT),
    )


VCPU: tuple[Allow, ...] = (
    *_DATA_PLANE,
    Allow(
        "ioctl",
        "KVM_RUN; MSI-X routes (a pending vector delivered when the guest unmasks it), "
        "ioeventfds moved with a BAR, INTx lines raised by legacy devices on guest writes",
        _ioctls(KVM_RUN, KVM_SET_GSI_ROUTING, KVM_IOEVENTFD, KVM_IRQ_LINE),
    ),
)

EVENTS: tuple[Allow, ...] = (
    *_DATA_PLANE,
    Allow("epoll_wait", "the event loop waits"),
    Allow("epoll_pwait", "the event loop waits (glibc's epoll_wait on some builds)"),
    Allow("eventfd2", "devices activated on the loop create their wake-up eventfds"),
    Allow("timerfd_create", "rate limiter timers created when a device is activated"),
    Allow(
        "ioctl",
        "INTx lines raised by devices; MSI-X routes pushed before a vector fires; tap offloads "
        "set by virtio-net's activation and control queue",
        _ioctls(KVM_IRQ_LINE, KVM_SET_GSI_ROUTING, TUNSETOFFLOAD, TUNSETQUEUE),
    ),
)

API: tuple[Allow, ...] = (
    Allow("epoll_wait", "the server waits on its sockets (selectors)"),
    Allow("epoll_pwait", "the server waits on its sockets (glibc's epoll_wait on some builds)"),
    Allow("epoll_ctl", "connections come and go from the selector"),
    Allow("accept4", "new connections"),
    Allow("recvfrom", "requests"),
    Allow("recvmsg", "requests"),
    Allow("sendto", "answers"),
    Allow("sendmsg", "answers"),
    Allow("shutdown", "half-closing a connection before it is closed"),
    Allow("getsockname", "socket addresses of accepted connections"),
    Allow("getpeername", "socket addresses of accepted connections"),
    Allow("getsockopt", "socket errors"),
    Allow("read", "the wake-up eventfd"),
    Allow("ioctl", "non-blocking accepted sockets", _ioctls(FIONBIO, FIOCLEX)),
    Allow(
        "fcntl",
        "non-blocking and close-on-exec flags",
        _args(*(Cond(1, c, _U32) for c in (F_GETFD, F_SETFD, F_GETFL, F_SETFL))),
    ),
)

# The process's bound (every thread runs under it): the main thread, the API's VMM thread, the
# serial, terminal and event-monitor threads. It still opens files with O_CREAT (the serial and
# console files of every build: reboots, `vm.create`) and unlinks (the API socket at exit):
# seccomp cannot look at a path, landlock limits them. What it no longer has: bind, connect,
# non-stream or non-unix sockets, flock and umask (the API socket is bound before the filter).
MAIN: tuple[Allow, ...] = (
    *_DATA_PLANE,
    *(
        Allow(name, "config files, the kernel, disks, /dev/kvm (landlock limits the paths)")
        for name in SOFT_DENIED
    ),
    Allow("lseek", "file sizes and positions"),
    Allow("fstat", "open files"),
    Allow("getdents64", "directory listings (imports)"),
    Allow("fcntl", "fd flags, duplicates"),
    Allow("dup", "the console duplicates its output fd"),
    Allow("dup2", "the console duplicates its output fd"),
    Allow("dup3", "the console duplicates its output fd"),
    Allow("unlink", "the API socket and its lock file are removed at exit"),
    Allow("unlinkat", "the API socket and its lock file are removed at exit"),
    Allow("ftruncate", "shared guest memory (memfd) is sized"),
    Allow("memfd_create", "shared guest memory"),
    Allow("statfs", "file system details"),
    Allow("fstatfs", "file system details"),
    Allow(
        "ioctl",
        "KVM (every request of type 0xAE: /dev/kvm, VM and vCPU fds); the terminal; tap setup",
        (
            (Cond(1, 0xAE00, 0xFF00),),
            *_ioctls(TCGETS, TCSETS, TCSETSW, TCSETSF, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX),
            *_ioctls(FIOCLEX, TUNSETIFF, TUNSETOFFLOAD, TUNGETIFF, TUNSETVNETHDRSZ, TUNSETQUEUE),
            # A tap strato creates: address, netmask, MAC, MTU, up (strato.devices.backends.netif).
            *_ioctls(*netif.REQUESTS),
        ),
    ),
    Allow("epoll_create1", "event loops, selectors"),
    Allow("epoll_wait", "selectors (the API server, waits)"),
    Allow("epoll_pwait", "selectors (the API server, waits)"),
    Allow("eventfd2", "irqfds, ioeventfds, wake-ups"),
    Allow("timerfd_create", "rate limiter timers"),
    Allow("pipe2", "wake-up pipes (terminal input)"),
    Allow("poll", "waiting for one fd"),
    Allow("ppoll", "waiting for one fd"),
    Allow("select", "terminal input, blocking serial output"),
    Allow("pselect6", "terminal input, blocking serial output"),
    Allow(
        "clone",
        "threads only: CLONE_THREAD must be set (no fork, no exec)",
        _args(Cond(0, CLONE_THREAD, CLONE_THREAD)),
    ),
    Allow("set_robust_list", "a new thread registers its robust futex list"),
    Allow("rseq", "a new thread registers its restartable sequences"),
    Allow("rt_sigaction", "signal handlers (kick signal, SIGTERM, SIGINT, SIGSYS)"),
    Allow("sigaltstack", "signal stacks"),
    Allow(
        "prctl",
        "thread names; no_new_privs before installing a filter",
        _args(*(Cond(0, o, _U32) for o in (PR_SET_NAME, PR_GET_NAME, PR_SET_NO_NEW_PRIVS))),
    ),
    Allow("seccomp", "each thread adds its own filter (filters only ever add restrictions)"),
    Allow("landlock_create_ruleset", "landlock (only ever adds restrictions)"),
    Allow("landlock_add_rule", "landlock (only ever adds restrictions)"),
    Allow("landlock_restrict_self", "landlock (only ever adds restrictions)"),
    Allow(
        "socket",
        "AF_UNIX stream sockets only (the REST API's listener is made before the filter)",
        ((Cond(0, AF_UNIX, _U32), Cond(1, SOCK_STREAM, SOCK_TYPE_MASK)),),
    ),
    Allow("listen", "an inherited --api-socket fd=N listens"),
    Allow("accept4", "API connections"),
    Allow("getsockname", "socket addresses"),
    Allow("getpeername", "socket addresses"),
    Allow("getsockopt", "socket options (an inherited --api-socket fd)"),
    Allow("shutdown", "closing connections"),
    Allow("recvfrom", "sockets"),
    Allow("recvmsg", "sockets"),
    Allow("sendto", "sockets"),
    Allow("sendmsg", "sockets"),
    Allow("getrandom", "os.urandom (random MAC addresses), hash seeds of new interpreters"),
    Allow("getuid", "user ids (paths, permissions)"),
    Allow("geteuid", "user ids (paths, permissions)"),
    Allow("getgid", "group ids"),
    Allow("getegid", "group ids"),
    Allow("uname", "platform details"),
)


def _per_process(kind: str, pid: int) -> tuple[Allow, ...]:
    """The rules that name strato's own pid (the filters are compiled per process)."""
    if kind == "api":
        return ()
    signals = (_signals_to_self(pid),)
    if kind != "main":
        return signals
    limits = Allow(
        "prlimit64",
        "getrlimit/setrlimit on strato itself only (pid 0 or getpid())",
        _args(Cond(0, 0, _U32), Cond(0, pid, _U32)),
    )
    return (*signals, limits)


_KIND_EXTRAS: dict[str, tuple[Allow, ...]] = {
    "main": MAIN,
    "vcpu": VCPU,
    "events": EVENTS,
    "api": API,
}

# clone3 takes its flags in memory, where a filter cannot look: answer ENOSYS so that glibc
# falls back to clone(2), whose flags are checked (threads yes, fork no).
_ENOSYS_CALLS = ("clone3",)


def rules(kind: str, pid: int | None = None) -> tuple[Allow, ...]:
    """The allow list of a thread kind: the baseline plus the kind's own calls, for the
    process `pid` (default: this one)."""
    if kind not in _KIND_EXTRAS:
        raise ValueError(f"unknown seccomp thread kind {kind!r} (one of {', '.join(KINDS)})")
    return BASELINE + _KIND_EXTRAS[kind] + _per_process(kind, pid or os.getpid())


def allowed_syscalls(kind: str) -> list[str]:
    """The names of the system calls `kind` allows (some only with given arguments)."""
    return sorted({a.syscall for a in rules(kind)})


def soft_denied(kind: str) -> tuple[str, ...]:
    return () if kind == "main" else SOFT_DENIED


# -- building (libseccomp) -------------------------------------------------------------------
def _libseccomp() -> Any:
    try:
        import pyseccomp  # type: ignore[import-untyped]
    except (ImportError, RuntimeError) as e:  # RuntimeError: libseccomp.so.2 is missing
        raise SeccompError(
            f"seccomp filters need libseccomp (the pyseccomp package and libseccomp.so.2): {e}"
        ) from None
    return pyseccomp


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--seccomp {mode}: expected true, false or log")


def _conditions(sc: Any, alternative: tuple[Cond, ...]) -> list[Any]:
    return [
        sc.Arg(c.arg, sc.MASKED_EQ, c.mask, c.value)
        if c.mask != _U64
        else sc.Arg(c.arg, sc.EQ, c.value)
        for c in alternative
    ]


def build(kind: str, mode: str, pid: int | None = None) -> bytes:
    """Compile the filter of `kind` for `mode` ("true" or "log") into a BPF program, for the
    process `pid` (default: this one; the signal and prlimit64 rules name it)."""
    check_mode(mode)
    if mode == "false":
        raise ValueError("--seccomp false has no filter")
    sc = _libseccomp()
    default = sc.TRAP if mode == "true" else sc.LOG
    f = sc.SyscallFilter(default)
    f.set_attr(sc.Attr.ACT_BADARCH, default)
    f.set_attr(sc.Attr.CTL_NNP, 0)  # install() sets it
    allow = rules(kind, pid)
    for a in allow:
        nr = _syscall_number(a.syscall)
        if nr is None:
            continue
        if not a.when:
            f.add_rule(sc.ALLOW, nr)
            continue
        for alternative in a.when:
            f.add_rule(sc.ALLOW, nr, *_conditions(sc, alternative))
    allowed = {a.syscall for a in allow}
    # Under "log" these fall to the default action (logged and let through), like the rest.
    for r in REFUSED if mode == "true" else ():
        nr = _syscall_number(r.syscall)
        if nr is not None:
            for alternative in r.when:
                f.add_rule(sc.ERRNO(r.err), nr, *_conditions(sc, alternative))
    for name in soft_denied(kind) if mode == "true" else ():
        nr = _syscall_number(name)
        if nr is not None and name not in allowed:
            f.add_rule(sc.ERRNO(errno.EACCES), nr)
    for name in _ENOSYS_CALLS:
        nr = _syscall_number(name)
        if nr is not None:
            f.add_rule(sc.ERRNO(errno.ENOSYS), nr)
    fd = os.memfd_create(f"strato-seccomp-{kind}", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:
            f.export_bpf(out)
        bpf = os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)
    if not bpf or len(bpf) % 8:
        raise SeccompError(f"libseccomp produced an invalid {kind} filter ({len(bpf)} bytes)")
    return bpf


def _syscall_number(name: str) -> int | None:
    sc = _libseccomp()
    nr = int(sc.resolve_syscall(sc.Arch.NATIVE, name))
    if nr < 0:
        log.debug("seccomp: %s is unknown to this libseccomp; not in the filter", name)
        return None
    return nr


_programs: dict[tuple[str, str, int], bytes] = {}
_programs_lock = threading.Lock()


def program(kind: str, mode: str) -> bytes:
    """The compiled filter (cached: built once per process, from the thread that asks first;
    a forked child compiles its own, since the filters name the pid)."""
    with _programs_lock:
        key = (kind, mode, os.getpid())
        if key not in _programs:
            _programs[key] = build(kind, mode, key[2])
        return _programs[key]


# Extension modules strato imports lazily after the filters are on: loaded now, while a
# shared library may still be mapped executable (termios: the terminal input pump).
PRELOAD = ("termios",)


def prepare(mode: str, kinds: Iterable[str] = KINDS) -> None:
    """Compile the filters of `kinds` now (libseccomp is loaded, which runs ldconfig): call it
    before landlock, which would hide ldconfig, and before any filter is installed."""
    check_mode(mode)
    if mode == "false":
        return
    for kind in kinds:
        program(kind, mode)
    _load_names()
    # The one AF_INET socket (it can send nothing), for the addresses of the taps strato
    # creates: under the main filter no socket but an AF_UNIX stream one can be made.
    try:
        netif.open_control_socket()
    except OSError as e:
        log.debug("no interface control socket: %s", e)
    for name in PRELOAD:
        try:
            __import__(name)
        except ImportError:  # not built into this Python: nothing will import it later either
            pass


# -- installing --------------------------------------------------------------------------------
class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
SYS_SECCOMP = 317  # x86_64

_installed = threading.local()
_thread_kinds: dict[int, str] = {}


def install(kind: str, mode: str) -> None:
    """Install the filter of `kind` on the calling thread (and the threads it creates later).

    `mode` "false" does nothing. Raises SeccompError when the kernel refuses the filter.
    """
    check_mode(mode)
    if mode == "false":
        return
    prog = program(kind, mode)
    if mode == "true":
        install_sigsys_handler()
    if threading.current_thread() is not threading.main_thread():
        # The thread's name in top -H and ps -L (the main thread's is the process's name).
        name = ctypes.create_string_buffer(threading.current_thread().name.encode()[:15])
        _prctl(PR_SET_NAME, ctypes.addressof(name), 0, 0, 0)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise SeccompError(f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
    buf = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // ctypes.sizeof(_SockFilter), ctypes.addressof(buf))
    _thread_kinds[threading.get_ident()] = kind
    ret = _syscall(
        ctypes.c_long(SYS_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(0),
        ctypes.byref(fprog),
    )
    if ret != 0:
        err = ctypes.get_errno()
        _thread_kinds.pop(threading.get_ident(), None)
        raise SeccompError(f"installing the {kind} seccomp filter: {os.strerror(err)}")
    kinds = getattr(_installed, "kinds", ())
    _installed.kinds = (*kinds, kind)
    log.debug("seccomp: %s filter (%s) on thread %s", kind, mode, threading.current_thread().name)


def installed_kinds() -> tuple[str, ...]:
    """The filters installed by this module on the calling thread, oldest first."""
    return tuple(getattr(_installed, "kinds", ()))


def thread_hook(kind: str, mode: str) -> Callable[[], None] | None:
    """A callable that installs `kind`'s filter on the thread that calls it (None for "false").

    The filter is compiled and the SIGSYS handler installed now, on the calling thread, so
    that the hook itself only makes the few calls the inherited filter allows.
    """
    check_mode(mode)
    if mode == "false":
        return None
    program(kind, mode)
    if mode == "true":
        install_sigsys_handler()

    def hook() -> None:
        try:
            install(kind, mode)
        except Exception as e:  # a thread that cannot be confined must not run guest work
            name = threading.current_thread().name
            os.write(2, f"strato: error: seccomp: thread {name}: {e}\n".encode())
            os._exit(EXIT_VMM_ERROR)

    return hook


def thread_hooks(
    mode: str, kinds: Iterable[str] = ("vcpu", "events")
) -> dict[str, Callable[[], None]]:
    """Hooks for `Vm.thread_hooks` ({"vcpu": ..., "events": ...}); empty for "false"."""
    hooks: dict[str, Callable[[], None]] = {}
    for kind in kinds:
        hook = thread_hook(kind, mode)
        if hook is not None:
            hooks[kind] = hook
    return hooks


# -- SIGSYS: say which call and which thread, then exit ----------------------------------------
class _SigsysInfo(ctypes.Structure):
    # siginfo_t for SIGSYS on x86_64: the union starts at offset 16.
    _fields_ = [
        ("si_signo", ctypes.c_int),
        ("si_errno", ctypes.c_int),
        ("si_code", ctypes.c_int),
        ("_pad", ctypes.c_int),
        ("call_addr", ctypes.c_void_p),
        ("syscall", ctypes.c_int),
        ("arch", ctypes.c_uint),
    ]


_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(_SigsysInfo), ctypes.c_void_p)


class _Sigaction(ctypes.Structure):
    _fields_ = [
        ("sa_sigaction", _HANDLER_TYPE),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


SIGSYS = 31
SA_SIGINFO = 0x4
_names: dict[int, str] = {}
_handler_lock = threading.Lock()
_handler: object = None  # the ctypes callback, kept alive for the life of the process


def syscall_name(nr: int) -> str:
    if not _names:
        _load_names()
    return _names.get(nr, f"syscall {nr}")


def _load_names() -> None:
    if _names:
        return
    sc = _libseccomp()
    for nr in range(512):
        try:
            _names[nr] = sc.resolve_syscall(sc.Arch.NATIVE, nr).decode()
        except ValueError:
            pass


def violation_message(nr: int, thread_name: str, kind: str | None) -> str:
    if kind:
        filt = f"the {kind} filter"
    else:  # a thread without a filter of its own (serial output, stdin, the VMM thread)
        main = _thread_kinds.get(threading.main_thread().ident or 0)
        filt = f"the {main} filter (inherited)" if main else "an inherited filter"
    return (
        f"strato: error: seccomp: thread {thread_name} made the forbidden system call "
        f"{syscall_name(nr)} ({nr}), refused by {filt}; strato stops (exit status "
        f"{EXIT_SECCOMP_VIOLATION}). Run with --seccomp log to let it through, and report it.\n"
    )


def _on_sigsys(signum: int, info: ctypes._Pointer[_SigsysInfo], context: int | None) -> None:
    # Runs on the thread that made the call, with its filter in force: only writes and exit.
    try:
        nr = info.contents.syscall
        ident = threading.get_ident()
        msg = violation_message(nr, threading.current_thread().name, _thread_kinds.get(ident))
        data = msg.encode()
        os.write(2, data)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.FileHandler) and h.stream is not None:
                os.write(h.stream.fileno(), data)
    finally:
        os._exit(EXIT_SECCOMP_VIOLATION)


def install_sigsys_handler() -> None:
    """Install the process-wide SIGSYS handler (idempotent; any thread)."""
    global _handler
    with _handler_lock:
        if _handler is not None:
            return
        _load_names()
        handler = _HANDLER_TYPE(_on_sigsys)
        act = _Sigaction()
        act.sa_sigaction = handler
        act.sa_flags = SA_SIGINFO
        sigaction = _libc.sigaction
        sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.c_void_p]
        sigaction.restype = ctypes.c_int
        if sigaction(SIGSYS, ctypes.byref(act), None) != 0:
            raise SeccompError(f"sigaction(SIGSYS): {os.strerror(ctypes.get_errno())}")
        _handler = handler


__all__ = [
    "KINDS",
    "MODES",
    "Allow",
    "Cond",
    "Refuse",
    "SeccompError",
    "allowed_syscalls",
    "build",
    "check_mode",
    "install",
    "install_sigsys_handler",
    "installed_kinds",
    "prepare",
    "program",
    "rules",
    "thread_hook",
    "thread_hooks",
]
