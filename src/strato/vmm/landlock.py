"""Landlock: strato confines its own file access to the paths its configuration names.

When it applies (Cloud Hypervisor has landlock opt-in everywhere):

- Command line, no `--api-socket`: on by default where the kernel has Landlock, since every
  path is known at start; `--landlock off` turns it off; `--landlock` (or `--landlock on`)
  makes a kernel without Landlock an error instead of a silent skip.
- `--api-socket`: opt-in with `--landlock`, as in Cloud Hypervisor, because the paths of a VM
  that `vm.create` brings later are not known at start: they must be among the paths strato
  starts with (a VM given on the command line, `--landlock-rules`). A `vm.create` naming
  another path is refused at vm.boot with a LandlockError naming it. The API socket is bound
  and its lock taken before strato confines itself, so no right on the socket's directory is
  granted: strato can neither create, remove nor replace a socket there (another VM's
  included); its own socket file stays behind at exit and the next start removes it as stale.
  The `--event-monitor` file is created before too, and is the one more path granted.

Either way `apply` runs on the main thread before any other thread exists, so every thread
strato ever has (vCPUs, event loop, HTTP server, event monitor) is confined.

The paths: kernel, initramfs, firmware, disks, serial and console files, the rng source,
/dev/kvm, /dev/net/tun with a network, the terminal it was started on, and the
`--landlock-rules` paths. A later open of any other path fails with EACCES (PermissionError).
Files already open (stdin/stdout/stderr, the log file, the API socket, the event monitor) stay
usable. strato is Python: it also keeps read access to the interpreter's own code (the standard
library, site-packages and strato's package), which it may still import lazily. Nothing else.

Landlock restricts the calling thread and the threads it creates afterwards. The rights come
from the kernel's ABI: every file system right the running kernel knows is handled (so none is
left open by accident), and on ABI 6+ abstract unix sockets and signals are scoped to strato
too.

The binding is a small ctypes layer over the three system calls (landlock_create_ruleset 444,
landlock_add_rule 445, landlock_restrict_self 446 on x86_64): PyPI's `landlock` package is an
alpha (1.0.0.dev5) that detects errors by a stale errno and gives a file rule the rights of a
directory (EINVAL).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from strato._sys.files import open_private
from strato.memory.layout import host_phys_bits
from strato.vmm.config import ConfigError, ConsoleMode, LandlockRuleConfig, VmConfig

log = logging.getLogger(__name__)

SYS_LANDLOCK_CREATE_RULESET = 444
SYS_LANDLOCK_ADD_RULE = 445
SYS_LANDLOCK_RESTRICT_SELF = 446
LANDLOCK_CREATE_RULESET_VERSION = 1 << 0
LANDLOCK_RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

# File system access rights (uapi/linux/landlock.h) and the ABI that introduced each.
EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
_ABI1_FS = (1 << 13) - 1
_FS_BY_ABI = {1: _ABI1_FS, 2: _ABI1_FS | REFER, 3: _ABI1_FS | REFER | TRUNCATE}
# Rights that only make sense on a file (a rule for a file with any other right is EINVAL).
_FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV

# Scopes (ABI 6): abstract unix sockets and signals stay within strato's own domain.
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0
SCOPE_SIGNAL = 1 << 1

# Cloud Hypervisor's "r" and "w" (vmm/src/landlock.rs: AccessFs::from_read / from_write).
READ = EXECUTE | READ_FILE | READ_DIR
WRITE = (
    WRITE_FILE
    | REMOVE_DIR
    | REMOVE_FILE
    | MAKE_CHAR
    | MAKE_DIR
    | MAKE_REG
    | MAKE_SOCK
    | MAKE_FIFO
    | MAKE_BLOCK
    | MAKE_SYM
    | REFER
    | TRUNCATE
    | IOCTL_DEV
)
# The interpreter's code: read files and list directories, nothing else.
CODE = READ_FILE | READ_DIR

RULE_SYNTAX = "path=<path/to/{file/dir}>,access=[rw]"


class LandlockError(ConfigError):
    """Landlock is unavailable, or a rule cannot be added (a configuration error: exit 2)."""


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # the kernel's struct is __attribute__((packed))
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _call(*args: object) -> int:
    ctypes.set_errno(0)
    ret = int(_syscall(*args))
    if ret < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return ret


def abi_version() -> int:
    """The kernel's Landlock ABI version; LandlockError when the kernel has none."""
    try:
        return _call(
            ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
            ctypes.c_void_p(None),
            ctypes.c_size_t(0),
            ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION),
        )
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise LandlockError(
                "--landlock: this kernel has no Landlock (landlock_create_ruleset: ENOSYS); "
                "it needs Linux 5.13 or later built with CONFIG_SECURITY_LANDLOCK=y"
            ) from None
        if e.errno == errno.EOPNOTSUPP:
            raise LandlockError(
                "--landlock: Landlock is disabled on this host (landlock_create_ruleset: "
                "EOPNOTSUPP); add landlock to the kernel's lsm= boot parameter"
            ) from None
        raise LandlockError(f"--landlock: landlock_create_ruleset: {e.strerror}") from None


def handled_access(abi: int) -> int:
    """Every file system right the kernel's ABI knows."""
    if abi >= 5:
        return _FS_BY_ABI[3] | IOCTL_DEV
    return _FS_BY_ABI[min(abi, 3)]


def parse_access(access: str, what: str = "--landlock-rules") -> int:
    """Cloud Hypervisor's access strings: "r", "w" or "rw"."""
    if access not in ("r", "w", "rw", "wr"):
        raise ConfigError(f"{what} access={access}: expected r, w or rw")
    return (READ if "r" in access else 0) | (WRITE if "w" in access else 0)


def parse_rule(value: str) -> LandlockRuleConfig:
    """One `--landlock-rules` value: "path=<path>,access=r|w|rw"."""
    fields: dict[str, str] = {}
    for part in value.split(","):
        key, eq, val = part.partition("=")
        if not eq:
            raise ConfigError(
                f"--landlock-rules {value!r}: {part!r} is not key=value (syntax: {RULE_SYNTAX})"
            )
        if key not in ("path", "access"):
            raise ConfigError(
                f"--landlock-rules {value!r}: unknown parameter {key!r} (syntax: {RULE_SYNTAX})"
            )
        if key in fields:
            raise ConfigError(f"--landlock-rules {value!r}: {key!r} given twice")
        fields[key] = val
    if not fields.get("path") or "access" not in fields:
        raise ConfigError(
            f"--landlock-rules {value!r}: path and access are both required (syntax: {RULE_SYNTAX})"
        )
    parse_access(fields["access"])
    return LandlockRuleConfig(Path(fields["path"]), fields["access"])


@dataclass(frozen=True)
class Rule:
    path: Path
    access: int
    why: str


def _terminal_paths() -> list[Path]:
    """What stdin and stdout are, when they are files or devices a console may reopen."""
    out: list[Path] = []
    for fd in (0, 1):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/") and Path(target).exists():
            out.append(Path(target))
    return out


def python_paths() -> list[Path]:
    """Where the interpreter and strato load code from."""
    import strato

    paths = {Path(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.add(Path(strato.__file__).resolve().parent)
    # Extension modules imported later load shared libraries (binascii needs libz): the
    # system's library directories and the dynamic loader's cache, read-only.
    lib_dirs = ["/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache"]
    paths.update(Path(d) for d in lib_dirs)
    paths.add(Path(sys.base_prefix) / "lib")
    for name, module in list(sys.modules.items()):
        # Editable installs and .pth entries: the directory of each imported top-level package.
        f = getattr(module, "__file__", None)
        if f and "." not in name and name != "__main__":
            p = Path(f).resolve().parent
            paths.add(p if p.name != "__pycache__" else p.parent)
    found = sorted(p for p in paths if p.exists() and p != Path("/"))
    return [p for p in found if not any(q != p and p.is_relative_to(q) for q in found)]


def rules_for_config(
    config: VmConfig, extra: Iterable[Rule] = (), *, code: bool = True
) -> list[Rule]:
    """The paths `config` makes strato use, with their rights (Cloud Hypervisor's list), and
    (with `code`) the interpreter's code."""
    r: list[Rule] = [Rule(Path("/dev/kvm"), READ | WRITE, "KVM")]
    p = config.payload
    for what, path in (("kernel", p.kernel), ("initramfs", p.initramfs), ("firmware", p.firmware)):
        if path is not None:
            r.append(Rule(Path(path), READ, what))
    for d in config.disks:
        r.append(Rule(Path(d.path), READ if d.readonly else READ | WRITE, "disk"))
    if config.rng is not None:
        r.append(Rule(Path(config.rng.src), READ, "rng source"))
    for name, c in (("serial", config.serial), ("console", config.console)):
        if c.mode is ConsoleMode.FILE and c.file is not None:
            r.append(Rule(Path(c.file), READ | WRITE, f"{name} file"))
        elif c.mode is ConsoleMode.NULL:
            r.append(Rule(Path(os.devnull), READ | WRITE, f"{name} (null)"))
        elif c.mode is ConsoleMode.TTY:
            r.extend(Rule(t, READ | WRITE, f"{name} (terminal)") for t in _terminal_paths())
    if config.net:
        r.append(Rule(Path("/dev/net/tun"), READ | WRITE, "tap devices"))
    for rule in config.landlock_rules:
        r.append(Rule(Path(rule.path), parse_access(rule.access), "--landlock-rules"))
    if code:
        r.extend(Rule(path, CODE, "Python code") for path in python_paths())
    r.extend(extra)
    return r


def _create_outputs(config: VmConfig) -> None:
    # A rule needs an existing path: create the serial and console files now, as strato would
    # (without following a symlink, mode 0600: strato._sys.files).
    for name, c in (("serial", config.serial), ("console", config.console)):
        if c.mode is ConsoleMode.FILE and c.file is not None:
            try:
                os.close(open_private(c.file))
            except OSError as e:
                raise ConfigError(f"--{name} file={c.file}: {e.strerror}") from None


def restrict_self(rules: Iterable[Rule]) -> int:
    """Restrict the calling thread (and the threads it creates later) to `rules`.
    Returns the ABI version used."""
    abi = abi_version()
    handled = handled_access(abi)
    attr = _RulesetAttr(handled_access_fs=handled)
    size = ctypes.sizeof(_RulesetAttr)
    if abi >= 6:
        attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
    else:
        size = 16 if abi >= 4 else 8  # older kernels refuse fields they do not know
    try:
        ruleset = _call(
            ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET),
            ctypes.byref(attr),
            ctypes.c_size_t(size),
            ctypes.c_uint32(0),
        )
    except OSError as e:
        raise LandlockError(f"--landlock: creating the ruleset: {e.strerror}") from None
    try:
        for rule in rules:
            _add_rule(ruleset, rule, handled)
        if _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise LandlockError(f"--landlock: no_new_privs: {os.strerror(ctypes.get_errno())}")
        try:
            _call(
                ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)
            )
        except OSError as e:
            raise LandlockError(f"--landlock: landlock_restrict_self: {e.strerror}") from None
    finally:
        os.close(ruleset)
    return abi


def _add_rule(ruleset: int, rule: Rule, handled: int) -> None:
    try:
        fd = os.open(rule.path, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise LandlockError(f"--landlock: {rule.path} ({rule.why}): {e.strerror}") from None
    try:
        access = rule.access & handled
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FILE_RIGHTS
        if not access:
            return
        attr = _PathBeneathAttr(allowed_access=access, parent_fd=fd)
        try:
            _call(
                ctypes.c_long(SYS_LANDLOCK_ADD_RULE),
                ctypes.c_int(ruleset),
                ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH),
                ctypes.byref(attr),
                ctypes.c_uint32(0),
            )
        except OSError as e:
            raise LandlockError(
                f"--landlock: adding {rule.path} ({rule.why}): {e.strerror}"
            ) from None
    finally:
        os.close(fd)


def output_rule(path: Path, why: str) -> Rule:
    """Read-write access to a file strato creates later (created now, without following a
    symlink and with mode 0600: a rule needs a path)."""
    try:
        os.close(open_private(path))
    except OSError as e:
        raise ConfigError(f"{why} {path}: {e.strerror}") from None
    return Rule(path, READ | WRITE, why)


def available() -> bool:
    """Whether this kernel has Landlock (enabled)."""
    try:
        return abi_version() >= 1
    except LandlockError:
        return False


# The rules this process confined itself with (apply runs once, before any other thread).
_confined: list[Rule] | None = None


def confined_rules() -> list[Rule] | None:
    """The rules strato confined itself with, or None."""
    return _confined


def apply(config: VmConfig, extra: Iterable[Rule] = ()) -> list[Rule]:
    """Restrict strato to the paths of `config` (and `extra`) on the calling thread, which must
    be the main thread before any other strato thread starts. Returns the rules applied."""
    _create_outputs(config)
    host_phys_bits()  # cached from /proc now: landlock hides /proc from later config checks
    rules = rules_for_config(config, extra)
    abi = restrict_self(rules)
    global _confined
    _confined = rules
    log.info(
        "landlock (ABI %d): file access restricted to %s",
        abi,
        ", ".join(f"{r.path} ({r.why})" for r in rules if r.why != "Python code"),
    )
    return rules


def enforce(config: VmConfig) -> None:
    """Called before a VM is built from `config` (VmBuilder), before anything is opened: under
    landlock, a path of `config` outside the rules is refused by name (a clear error at
    vm.boot rather than a bare EACCES from somewhere in the build)."""
    if _confined is not None:
        check_config(config, _confined)


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _covers(rule: Rule, path: Path, need: int) -> bool:
    if rule.access & need != need:
        return False
    target, base = _real(path), _real(rule.path)
    return target == base or (base.is_dir() and target.is_relative_to(base))


def check_config(config: VmConfig, rules: Iterable[Rule]) -> None:
    """LandlockError naming the first path of `config` that `rules` do not grant."""
    given = [r for r in rules if r.why != "Python code"]
    for want in rules_for_config(config, code=False):
        need = want.access & (READ_FILE | WRITE_FILE)
        if not any(_covers(r, want.path, need) for r in given):
            access = "rw" if need & WRITE_FILE else "r"
            raise LandlockError(
                f"--landlock: {want.why} {want.path}: Permission denied: outside the paths "
                "strato was started with (landlock); start it with --landlock-rules "
                f"path={want.path},access={access} to allow it"
            )


__all__ = [
    "CODE",
    "READ",
    "RULE_SYNTAX",
    "WRITE",
    "LandlockError",
    "Rule",
    "abi_version",
    "apply",
    "available",
    "check_config",
    "confined_rules",
    "enforce",
    "output_rule",
    "parse_access",
    "parse_rule",
    "restrict_self",
    "rules_for_config",
]
