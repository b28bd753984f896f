"""Landlock: `--landlock` confines strato's file access to its configuration's paths and the
`--landlock-rules` ones; bad rules are configuration errors.

A landlocked thread stays landlocked, so every restricted run is a child process.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from strato.vmm import landlock
from strato.vmm.config import (
    ConfigError,
    ConsoleConfig,
    ConsoleMode,
    DiskConfig,
    LandlockRuleConfig,
    PayloadConfig,
    VmConfig,
)
from tests.security.test_seccomp import PROBE, guest_flags, needs_kvm, run


def _landlock_abi() -> int:
    try:
        return landlock.abi_version()
    except ConfigError:
        return 0


needs_landlock = pytest.mark.skipif(_landlock_abi() < 1, reason="the kernel has no Landlock")
SYNTAX = "(syntax: path=<path/to/{file/dir}>,access=[rw])"


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stll") as d:
        yield Path(d)


def strato(*args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "strato.cli.main", *args])


# -- rules and their syntax -------------------------------------------------------------------
def test_a_rule_parses_as_cloud_hypervisor_writes_it() -> None:
    assert landlock.parse_rule("path=/tmp/x,access=rw") == LandlockRuleConfig(Path("/tmp/x"), "rw")
    assert landlock.parse_rule("access=r,path=/a b") == LandlockRuleConfig(Path("/a b"), "r")
    assert landlock.parse_access("r") == landlock.READ
    assert landlock.parse_access("w") == landlock.WRITE
    assert landlock.parse_access("rw") == landlock.READ | landlock.WRITE


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("path=/tmp", f"--landlock-rules 'path=/tmp': path and access are both required {SYNTAX}"),
        ("access=rw", f"--landlock-rules 'access=rw': path and access are both required {SYNTAX}"),
        ("path=,access=r", "--landlock-rules 'path=,access=r': path and access are both required"),
        ("path=/tmp,access=x", "--landlock-rules access=x: expected r, w or rw"),
        ("path=/tmp,access=rwx", "--landlock-rules access=rwx: expected r, w or rw"),
        ("path=/tmp,mode=rw", "--landlock-rules 'path=/tmp,mode=rw': unknown parameter 'mode'"),
        ("/tmp", f"--landlock-rules '/tmp': '/tmp' is not key=value {SYNTAX}"),
        ("path=/a,path=/b,access=r", "--landlock-rules 'path=/a,path=/b,access=r': 'path' given"),
    ],
)
def test_bad_rules_are_refused_with_the_option_and_value(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        landlock.parse_rule(value)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize(
    ("rule", "line"),
    [
        (
            "path=/tmp",
            "strato: error: --landlock-rules 'path=/tmp': path and access are both required "
            f"{SYNTAX}\n",
        ),
        ("path=/tmp,access=x", "strato: error: --landlock-rules access=x: expected r, w or rw\n"),
        (
            "path=/no/such/dir,access=r",
            "strato: error: --landlock-rules path=/no/such/dir: no such file or directory\n",
        ),
    ],
)
def test_a_bad_rule_on_the_command_line_is_a_config_error(
    workdir: Path, rule: str, line: str
) -> None:
    kernel = workdir / "kernel"
    kernel.write_bytes(b"x")
    r = strato("--kernel", str(kernel), "--landlock", "--landlock-rules", rule)
    assert r.returncode == 2
    assert r.stderr == line


def test_landlock_rules_take_several_values_and_repeat(workdir: Path) -> None:
    from strato.cli.args import build_parser, config_from_args

    a, b, c = (str(workdir / n) for n in "abc")
    argv = ["--kernel", "k", "--landlock", "--landlock-rules", f"path={a},access=r"]
    argv += [f"path={b},access=rw", "--landlock-rules", f"path={c},access=w"]
    config = config_from_args(build_parser().parse_args(argv))
    assert config.landlock is True and config.seccomp == "true"
    assert config.landlock_rules == (
        LandlockRuleConfig(Path(a), "r"),
        LandlockRuleConfig(Path(b), "rw"),
        LandlockRuleConfig(Path(c), "w"),
    )
    plain = config_from_args(build_parser().parse_args(["--kernel", "k", "--seccomp", "log"]))
    assert plain.landlock is False and plain.landlock_rules == () and plain.seccomp == "log"
    # `--landlock on|off`: a bare --landlock is "on"; the default (None) is decided by mode.
    for flag, want in ((["--landlock", "on"], "on"), (["--landlock", "off"], "off"), ([], None)):
        ns = build_parser().parse_args(["--kernel", "k", *flag])
        assert ns.landlock == want
        assert config_from_args(ns).landlock is (want == "on")


def test_the_config_gives_every_path_it_uses(workdir: Path) -> None:
    disk, ro = workdir / "d.raw", workdir / "ro.raw"
    config = VmConfig(
        payload=PayloadConfig(kernel=workdir / "k", initramfs=workdir / "i"),
        disks=(DiskConfig(path=disk), DiskConfig(path=ro, readonly=True)),
        serial=ConsoleConfig(ConsoleMode.FILE, workdir / "serial.log"),
        console=ConsoleConfig(ConsoleMode.NULL),
        landlock_rules=(LandlockRuleConfig(workdir, "r"),),
    )
    got = {(r.path, r.access) for r in landlock.rules_for_config(config) if r.why != "Python code"}
    rw = landlock.READ | landlock.WRITE
    assert got == {
        (Path("/dev/kvm"), rw),
        (workdir / "k", landlock.READ),
        (workdir / "i", landlock.READ),
        (disk, rw),
        (ro, landlock.READ),
        (workdir / "serial.log", rw),
        (Path(os.devnull), rw),
        (workdir, landlock.READ),
    }
    code = [r.path for r in landlock.rules_for_config(config) if r.why == "Python code"]
    import strato

    assert any(Path(strato.__file__).resolve().is_relative_to(p) for p in code)
    # Code and shared libraries only: nothing under /etc but the dynamic loader's cache.
    assert all(p != Path("/") for p in code)
    assert [p for p in code if p.is_relative_to(Path("/etc"))] == [Path("/etc/ld.so.cache")]


def test_a_kernel_without_landlock_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_landlock(*args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(landlock, "_call", no_landlock)
    with pytest.raises(ConfigError, match=r"--landlock: this kernel has no Landlock .*5\.13"):
        landlock.abi_version()

    def disabled(*args: object) -> int:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(landlock, "_call", disabled)
    with pytest.raises(ConfigError, match="Landlock is disabled on this host"):
        landlock.abi_version()


def test_handled_rights_follow_the_abi() -> None:
    assert landlock.handled_access(1) & landlock.TRUNCATE == 0
    assert landlock.handled_access(3) & landlock.TRUNCATE
    assert landlock.handled_access(4) & landlock.IOCTL_DEV == 0
    assert landlock.handled_access(7) & landlock.IOCTL_DEV


# -- restricted runs ---------------------------------------------------------------------------
@needs_landlock
def test_after_apply_a_path_outside_the_config_is_refused(workdir: Path) -> None:
    """In a child: apply the config's rules, then open what the config names and what not."""
    kernel, extra, other = workdir / "kernel", workdir / "extra", workdir / "other"
    for f in (kernel, other):
        f.write_bytes(b"x")
    extra.mkdir()
    (extra / "inside").write_bytes(b"y")
    script = f"""
from pathlib import Path
from strato.vmm import landlock
from strato.vmm.config import (
    ConsoleConfig, ConsoleMode, LandlockRuleConfig, PayloadConfig, VmConfig)
cfg = VmConfig(payload=PayloadConfig(kernel=Path({str(kernel)!r})), landlock=True,
               console=ConsoleConfig(ConsoleMode.OFF),
               landlock_rules=(LandlockRuleConfig(Path({str(extra)!r}), "rw"),))
landlock.apply(cfg)
assert open({str(kernel)!r}, "rb").read() == b"x"
assert open({str(extra / "inside")!r}, "rb").read() == b"y"
open({str(extra / "new")!r}, "wb").write(b"z")   # rw on a directory: create inside it
for p in ("/etc/hostname", {str(other)!r}):
    try:
        open(p, "rb")
    except PermissionError:
        print("refused", p)
try:
    open({str(kernel)!r}, "r+b")                      # read-only rule: no writing
except PermissionError:
    print("refused write", {str(kernel)!r})
import json, email.mime.text                          # lazy imports still work
print("imports ok")
"""
    r = run([sys.executable, "-c", script])
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "refused /etc/hostname",
        f"refused {other}",
        f"refused write {kernel}",
        "imports ok",
    ]


@needs_landlock
def test_the_command_line_wires_landlock_and_landlock_rules(workdir: Path) -> None:
    kernel, allowed, other = workdir / "kernel", workdir / "allowed", workdir / "other"
    for f in (kernel, allowed, other):
        f.write_bytes(b"x")
    flags = ["--kernel", str(kernel), "--console", "off"]
    paths = ["/etc/hostname", str(other), str(allowed), str(kernel)]
    rules = ["--landlock-rules", f"path={allowed},access=r"]
    r = run([sys.executable, str(PROBE), "open", *paths, "--", *flags, "--landlock", *rules])
    assert r.returncode == 0, r.stderr
    assert re.findall(r"PROBE open (\S+) (\S+)", r.stderr) == [
        ("/etc/hostname", "EACCES"),
        (str(other), "EACCES"),
        (str(allowed), "ok"),
        (str(kernel), "ok"),
    ]
    # Without --landlock it is on too (the default without --api-socket) ...
    r = run([sys.executable, str(PROBE), "open", *paths, "--", *flags, *rules])
    assert r.returncode == 0, r.stderr
    assert [s for _, s in re.findall(r"PROBE open (\S+) (\S+)", r.stderr)] == [
        "EACCES",
        "EACCES",
        "ok",
        "ok",
    ]
    # ... and `--landlock off` turns it off: the same opens all work.
    r = run([sys.executable, str(PROBE), "open", *paths, "--", *flags, "--landlock", "off"])
    assert r.returncode == 0, r.stderr
    assert [s for _, s in re.findall(r"PROBE open (\S+) (\S+)", r.stderr)] == ["ok"] * 4


@needs_kvm
@needs_landlock
@pytest.mark.kvm
def test_the_builtin_guest_passes_every_device_check_under_landlock(
    guest_elf: Path, workdir: Path
) -> None:
    """Landlock and seccomp together (the default), with a console file strato creates."""
    r = strato(*guest_flags(guest_elf, workdir), "--landlock")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^DONE pass=\d+ fail=0( skip=0)?$", r.stdout, re.M), r.stdout[-3000:]
    assert "TEST blk-rw PASS" in r.stdout and "TEST console-tx PASS" in r.stdout
    assert (workdir / "console.log").read_bytes()


# -- API mode: `--api-socket --landlock` -----------------------------------------------------
@needs_landlock
def test_a_confined_strato_cannot_touch_any_socket_in_the_socket_directory(
    workdir: Path,
) -> None:
    """As `strato --api-socket --landlock` does: the socket is bound (and its lock taken)
    before confining, so no right on its directory is granted. Then, from any thread: another
    VM's socket in the same directory can be neither removed nor replaced, no socket or file
    can be created there, and a VM naming a path outside the rules is refused by name."""
    kernel, allowed = workdir / "kernel", workdir / "allowed"
    kernel.write_bytes(b"x")
    allowed.mkdir()
    outside = workdir / "outside.raw"
    outside.write_bytes(bytes(4096))
    other = workdir / "other-vm.sock"
    other_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other_server.bind(str(other))
    other_server.listen(1)
    script = f"""
import os, socket, threading
from pathlib import Path
from strato.api.server import prebind
from strato.vmm import landlock
from strato.vmm.config import (
    ConsoleConfig, ConsoleMode, DiskConfig, LandlockRuleConfig, PayloadConfig, VmConfig)
d = Path({str(workdir)!r})
prebind(d / "api.sock")
vm = VmConfig(payload=PayloadConfig(kernel=Path({str(kernel)!r})),
              serial=ConsoleConfig(ConsoleMode.FILE, d / "serial.log"),
              console=ConsoleConfig(ConsoleMode.OFF), landlock=True,
              landlock_rules=(LandlockRuleConfig(Path({str(allowed)!r}), "rw"),))
landlock.apply(vm)

def attempt(what, fn):
    try:
        fn()
        print(what, "done")
    except PermissionError:
        print(what, "EACCES")
    except landlock.LandlockError as e:
        print(what, "refused:", e)

def vmm():
    attempt("remove other socket", lambda: os.unlink(d / "other-vm.sock"))
    attempt("remove own socket", lambda: os.unlink(d / "api.sock"))
    attempt("remove own lock", lambda: os.unlink(d / "api.sock.lock"))
    s = socket.socket(socket.AF_UNIX)
    attempt("bind new socket", lambda: s.bind(str(d / "new.sock")))
    attempt("rename over other socket", lambda: os.rename(d / "serial.log", d / "other-vm.sock"))
    attempt("create file", lambda: open(d / "new-file", "wb"))
    attempt("write serial file", lambda: open(d / "serial.log", "ab").write(b"ok"))
    attempt("create in rule dir", lambda: open(Path({str(allowed)!r}) / "f", "wb").close())
    attempt("open outside disk", lambda: open({str(outside)!r}, "r+b"))
    attempt("vm with outside disk", lambda: landlock.enforce(
        VmConfig(payload=vm.payload, console=vm.console, serial=vm.serial,
                 disks=(DiskConfig(path=Path({str(outside)!r})),))))
    attempt("vm inside the rules", lambda: landlock.enforce(
        VmConfig(payload=vm.payload, console=vm.console,
                 serial=ConsoleConfig(ConsoleMode.FILE, Path({str(allowed)!r}) / "s.log"))))

t = threading.Thread(target=vmm)     # a thread started later: confined too
t.start()
t.join()
attempt("main thread creates a file", lambda: open(d / "main-file", "wb").close())
"""
    try:
        r = run([sys.executable, "-c", script])
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [
            "remove other socket EACCES",
            "remove own socket EACCES",
            "remove own lock EACCES",
            "bind new socket EACCES",
            "rename over other socket EACCES",
            "create file EACCES",
            "write serial file done",
            "create in rule dir done",
            "open outside disk EACCES",
            f"vm with outside disk refused: --landlock: disk {outside}: Permission denied: "
            "outside the paths strato was started with (landlock); start it with "
            f"--landlock-rules path={outside},access=rw to allow it",
            "vm inside the rules done",
            "main thread creates a file EACCES",
        ]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(other))  # the other VM's socket: untouched, still served
        client.close()
        assert stat.S_ISSOCK(os.lstat(workdir / "api.sock").st_mode)
        assert not (workdir / "new.sock").exists() and not (workdir / "new-file").exists()
    finally:
        other_server.close()


@needs_kvm
@needs_landlock
@pytest.mark.kvm
def test_vm_create_naming_a_disk_outside_the_rules_is_refused_by_name(
    guest_elf: Path, workdir: Path
) -> None:
    """`strato --api-socket --landlock` started under umask 000: the socket is 0600, and a
    vm.create whose disk is outside `--landlock-rules` fails at vm.boot with the path named;
    nothing was opened (the VM stays Created)."""
    from strato.api.client import ApiClient, ApiError

    vmdir, outside = workdir / "vm", workdir / "elsewhere"
    vmdir.mkdir()
    outside.mkdir()
    guest = vmdir / "guest.elf"
    guest.write_bytes(guest_elf.read_bytes())
    disk = outside / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    sock = workdir / "api.sock"
    argv = [sys.executable, "-m", "strato.cli.main", "--api-socket", f"path={sock}"]
    argv += ["--landlock", "--landlock-rules", f"path={vmdir},access=rw"]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.umask(0),
        cwd=Path(__file__).parents[2],
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the API socket never appeared"
            time.sleep(0.05)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        with ApiClient(sock) as api:
            api.create(
                {
                    "payload": {"kernel": str(guest), "cmdline": "tests=serial"},
                    "memory": {"size": 64 << 20},
                    "serial": {"mode": "File", "file": str(vmdir / "serial.log")},
                    "console": {"mode": "Off"},
                    "disks": [{"path": str(disk)}],
                }
            )
            with pytest.raises(ApiError) as e:
                api.boot()
            assert e.value.status == 400
            assert (
                f"--landlock: disk {disk}: Permission denied: outside the paths strato was "
                f"started with (landlock); start it with --landlock-rules path={disk},access=rw"
            ) in str(e.value)
            assert api.info()["state"] == "Created"
            assert not (vmdir / "serial.log").exists()
            api.shutdown_vmm()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()


def test_available_is_false_on_a_kernel_without_landlock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default (no --landlock flag, no --api-socket) skips landlock on such a kernel."""

    def no_landlock(*args: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(landlock, "_call", no_landlock)
    assert landlock.available() is False


def test_a_symlink_at_an_output_path_is_refused_before_confining(workdir: Path) -> None:
    """apply() creates the serial/console files (a rule needs a path) and output_rule() the
    event monitor's: neither follows a planted symlink; the error comes before any
    restriction (so this runs in the test process)."""
    victim = workdir / "victim"
    victim.write_bytes(b"keep")
    (workdir / "serial.log").symlink_to(victim)
    (workdir / "events.json").symlink_to(victim)
    config = VmConfig(
        payload=PayloadConfig(kernel=workdir / "k"),
        serial=ConsoleConfig(ConsoleMode.FILE, workdir / "serial.log"),
        console=ConsoleConfig(ConsoleMode.OFF),
    )
    with pytest.raises(ConfigError) as e:
        landlock.apply(config)
    assert str(e.value).startswith(f"--serial file={workdir / 'serial.log'}: a symbolic link;")
    with pytest.raises(ConfigError) as e:
        landlock.output_rule(workdir / "events.json", "--event-monitor")
    assert str(e.value).startswith(f"--event-monitor {workdir / 'events.json'}: a symbolic link;")
    assert victim.read_bytes() == b"keep"
    assert landlock.confined_rules() is None
