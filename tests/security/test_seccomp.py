"""Seccomp: the allow lists, a forbidden call in each thread kind, and whole runs under filters.

Runs that may end in SIGSYS happen in child processes (`probe.py`, or the `strato` command):
a filter cannot be removed from a thread, and the handler exits the process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from strato.vmm import seccomp
from strato.vmm.seccomp import KINDS, MODES
from strato.vmm.stop import EXIT_SECCOMP_VIOLATION

PROBE = Path(__file__).with_name("probe.py")
KVM = os.path.exists("/dev/kvm")
needs_kvm = pytest.mark.skipif(not KVM, reason="needs /dev/kvm")
DEVICE_TESTS = "tests=serial,pci,blk,rng,console-tx,irq,smp"


def run(args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=Path(__file__).parents[2],
    )


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="stsec") as d:
        yield Path(d)


def guest_flags(guest_elf: Path, workdir: Path, tests: str = DEVICE_TESTS) -> list[str]:
    disk = workdir / "disk.raw"
    if not disk.exists():
        disk.write_bytes(bytes(1 << 20))
    return [
        "--kernel", str(guest_elf),
        "--cmdline", tests,
        "--cpus", "boot=2",
        "--memory", "size=256M",
        "--disk", f"path={disk},serial=sec",
        "--rng", "src=/dev/urandom",
        "--serial", "tty",
        "--console", f"file={workdir / 'console.log'}",
        "--no-reboot",
    ]  # fmt: skip


# -- the allow lists -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_every_allowed_call_is_known_to_libseccomp_and_says_why(kind: str) -> None:
    import pyseccomp

    for rule in seccomp.rules(kind):
        assert pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, rule.syscall) >= 0, rule
        assert len(rule.why) > 5, rule


def _passes(conds: tuple[seccomp.Cond, ...], args: dict[int, int]) -> bool:
    return all((args.get(c.arg, 0) & c.mask) == c.value for c in conds)


@pytest.mark.parametrize("kind", ["vcpu", "events", "api"])
def test_main_allows_everything_the_other_kinds_allow(kind: str) -> None:
    """Filters stack: a thread runs under main's filter and its own, so its own list must not
    name anything main refuses (it would be dead, and the thread killed)."""
    main = {r.syscall: r for r in seccomp.rules("main")}
    for rule in seccomp.rules(kind):
        assert rule.syscall in main, f"{kind} allows {rule.syscall}, main does not"
        outer = main[rule.syscall]
        if not outer.when:
            continue
        assert rule.when, f"{kind} allows every {rule.syscall}, main only some"
        for alternative in rule.when:
            values = {c.arg: c.value for c in alternative}
            assert any(_passes(alt, values) for alt in outer.when), (kind, rule.syscall, values)


def test_the_kinds_are_small_next_to_main() -> None:
    main = set(seccomp.allowed_syscalls("main"))
    for kind in ("vcpu", "events", "api"):
        own = set(seccomp.allowed_syscalls(kind))
        assert len(own) < len(main) * 0.6, (kind, len(own), len(main))
    for forbidden in ("execve", "execveat", "fork", "vfork", "ptrace", "mount", "kexec_load"):
        assert all(forbidden not in seccomp.allowed_syscalls(k) for k in KINDS), forbidden
    assert "socket" not in seccomp.allowed_syscalls("vcpu")
    assert "openat" not in seccomp.allowed_syscalls("vcpu")


@pytest.mark.parametrize("mode", ["true", "log"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_filter_compiles(kind: str, mode: str) -> None:
    prog = seccomp.build(kind, mode)
    assert len(prog) % 8 == 0 and 8 < len(prog) < 4096 * 8


def test_bad_mode_and_kind_are_refused() -> None:
    with pytest.raises(ValueError, match="expected true, false or log"):
        seccomp.install("vcpu", "maybe")
    with pytest.raises(ValueError, match="unknown seccomp thread kind"):
        seccomp.rules("gpu")
    assert seccomp.thread_hook("vcpu", "false") is None
    assert seccomp.thread_hooks("false") == {}
    assert set(MODES) == {"true", "false", "log"}


def test_the_violation_message_names_the_call_the_thread_and_the_filter() -> None:
    msg = seccomp.violation_message(41, "vcpu0", "vcpu")
    assert msg == (
        "strato: error: seccomp: thread vcpu0 made the forbidden system call socket (41), "
        "refused by the vcpu filter; strato stops "
        f"(exit status {EXIT_SECCOMP_VIOLATION}). Run with "
        "--seccomp log to let it through, and report it.\n"
    )


# -- forbidden calls end strato, with the call and the thread named ------------------------------
@needs_kvm
@pytest.mark.kvm
@pytest.mark.parametrize(("kind", "thread"), [("vcpu", "vcpu0"), ("events", "strato-events")])
def test_a_forbidden_call_in_a_thread_ends_strato_with_its_name(
    guest_elf: Path, workdir: Path, kind: str, thread: str
) -> None:
    r = run([sys.executable, str(PROBE), f"{kind}-socket", *guest_flags(guest_elf, workdir)])
    assert r.returncode == EXIT_SECCOMP_VIOLATION, r.stderr
    assert f"PROBE {kind} filters=('{kind}',)" in r.stderr
    assert "PROBE survived" not in r.stderr
    assert (
        f"strato: error: seccomp: thread {thread} made the forbidden system call socket (41), "
        f"refused by the {kind} filter; strato stops (exit status {EXIT_SECCOMP_VIOLATION})."
    ) in r.stderr


@needs_kvm
@pytest.mark.kvm
def test_log_mode_lets_the_forbidden_call_through_and_the_guest_finishes(
    guest_elf: Path, workdir: Path
) -> None:
    flags = [*guest_flags(guest_elf, workdir), "--seccomp", "log"]
    r = run([sys.executable, str(PROBE), "vcpu-socket", *flags])
    assert "PROBE vcpu filters=('vcpu',)" in r.stderr
    assert "PROBE survived" in r.stderr
    assert "seccomp" not in r.stderr.replace("PROBE", "")
    assert re.search(r"^DONE pass=\d+ fail=0\b", r.stdout, re.M), r.stdout[-2000:]
    assert r.returncode == 0, r.stderr


@needs_kvm
@pytest.mark.kvm
def test_false_installs_no_filter(guest_elf: Path, workdir: Path) -> None:
    flags = [*guest_flags(guest_elf, workdir), "--seccomp", "false"]
    r = run([sys.executable, str(PROBE), "vcpu-socket", *flags])
    assert "PROBE vcpu filters=()" in r.stderr
    assert "PROBE survived" in r.stderr
    assert r.returncode == 0, r.stderr


def test_the_main_filter_allows_threads_but_not_fork(workdir: Path) -> None:
    kernel = workdir / "k"
    kernel.write_bytes(b"x")
    r = run([sys.executable, str(PROBE), "fork", "--kernel", str(kernel), "--console", "off"])
    assert "PROBE thread ran" in r.stderr  # clone3 -> ENOSYS -> clone(CLONE_THREAD): allowed
    assert "PROBE forked" not in r.stderr
    assert r.returncode == EXIT_SECCOMP_VIOLATION, r.stderr
    assert "thread MainThread made the forbidden system call clone (56)" in r.stderr
    assert "refused by the main filter" in r.stderr


# -- whole runs under the filters -----------------------------------------------------------------
def _filters_of(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            status = (task / "status").read_text()
        except OSError:
            continue
        m = re.search(r"^Seccomp_filters:\s+(\d+)", status, re.M)
        out[name] = max(out.get(name, 0), int(m.group(1)) if m else 0)
    return out


@needs_kvm
@pytest.mark.kvm
def test_the_builtin_guest_passes_every_device_check_with_seccomp_on(
    guest_elf: Path, workdir: Path
) -> None:
    """The default is on: every thread kind runs its real work (KVM_RUN, MSI-X, virtio queues,
    disk I/O, rng, console, serial, 2 vCPUs started by INIT-SIPI) and nothing is refused."""
    r = run([sys.executable, "-m", "strato.cli.main", *guest_flags(guest_elf, workdir)])
    assert r.returncode == 0, r.stderr
    assert "seccomp" not in r.stderr
    assert re.search(r"^DONE pass=\d+ fail=0\b", r.stdout, re.M), r.stdout[-3000:]
    for line in ("TEST blk-rw PASS", "TEST rng PASS", "TEST console-tx PASS", "TEST smp PASS"):
        assert line in r.stdout


@needs_kvm
@pytest.mark.kvm
def test_the_filters_are_in_place_while_the_guest_runs(guest_elf: Path, workdir: Path) -> None:
    """A guest that waits for console input (which never comes) keeps every thread alive."""
    flags = guest_flags(guest_elf, workdir, "tests=console-rx host-timeout=3000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "strato.cli.main", *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        filters: dict[str, int] = {}
        while time.monotonic() < deadline:
            filters = _filters_of(proc.pid)
            if {"vcpu0", "vcpu1", "strato-events"} <= filters.keys():
                break
            time.sleep(0.05)  # polling /proc until the threads exist
        main_name = Path(f"/proc/{proc.pid}/comm").read_text().strip()
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert filters.get("vcpu0") == 2 and filters.get("vcpu1") == 2, filters
    assert filters.get("strato-events") == 2, filters
    assert filters.get(main_name) == 1, filters


# -- the API thread ------------------------------------------------------------------------------
def _api_config(guest_elf: Path, workdir: Path) -> Any:
    from strato.vmm.config import (
        ConsoleConfig,
        ConsoleMode,
        DiskConfig,
        MemoryConfig,
        PayloadConfig,
        RngConfig,
        VmConfig,
    )

    disk = workdir / "disk.raw"
    disk.write_bytes(bytes(1 << 20))
    return VmConfig(
        payload=PayloadConfig(kernel=guest_elf, cmdline="tests=serial,pci,blk,rng,irq"),
        memory=MemoryConfig(size=256 << 20),
        disks=(DiskConfig(path=disk),),
        rng=RngConfig(),
        serial=ConsoleConfig(ConsoleMode.FILE, workdir / "serial.log"),
        console=ConsoleConfig(ConsoleMode.FILE, workdir / "console.log"),
        no_reboot=True,
    )


def _start_api(scenario: str, sock: Path, *flags: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(PROBE), scenario, "--api-socket", f"path={sock}", *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)  # polling for the socket file
    return proc


def _wait_for_done(serial: Path) -> None:
    deadline = time.monotonic() + 30
    while "DONE pass=" not in serial.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the guest's serial output


@needs_kvm
@pytest.mark.kvm
def test_the_api_thread_serves_a_whole_vm_life_under_its_filter(
    guest_elf: Path, workdir: Path
) -> None:
    """`strato --api-socket` as users run it (main filter on the process, api on the HTTP
    thread): create, boot, info, counters, garbage on a second connection, shutdown."""
    from strato.api.client import ApiClient, ApiError

    sock = workdir / "api.sock"
    proc = _start_api("api", sock)
    try:
        with ApiClient(sock, timeout=20) as api:
            assert api.ping()["version"]
            with pytest.raises(ApiError):
                api.info()  # 404: nothing created yet
            api.create(_api_config(guest_elf, workdir))
            api.boot()
            assert api.info()["state"] in ("Running", "Shutdown")
            api.counters()
            # Garbage on a second connection: an error answer, and the thread lives on.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
                raw.connect(str(sock))
                raw.sendall(b"NONSENSE / HTTP/9\r\n\r\n")
                raw.settimeout(10)
                assert raw.recv(100).startswith(b"HTTP/1.1 ")
            _wait_for_done(workdir / "serial.log")
            api.ping()
            api.shutdown_vmm()  # the API has no --no-reboot: the guest would boot again
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "PROBE api filters=('api',)" in err
    assert "seccomp" not in err.replace("PROBE", ""), err
    assert proc.returncode == 0, err
    assert re.search(r"^DONE pass=\d+ fail=0\b", (workdir / "serial.log").read_text(), re.M)


def test_a_forbidden_call_on_the_api_thread_ends_strato_with_its_name(workdir: Path) -> None:
    sock = workdir / "api.sock"
    proc = _start_api("api-socket", sock)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_SECCOMP_VIOLATION, err
    assert "PROBE api filters=('api',)" in err
    assert "PROBE survived" not in err
    assert (
        "strato: error: seccomp: thread http-server made the forbidden system call socket (41), "
        f"refused by the api filter; strato stops (exit status {EXIT_SECCOMP_VIOLATION})."
    ) in err


@needs_kvm
@pytest.mark.kvm
def test_vms_created_through_the_api_run_unfiltered_under_seccomp_false(
    guest_elf: Path, workdir: Path
) -> None:
    """`vm.create` has no seccomp field: the VM's threads get the VMM's --seccomp (before,
    they always got "true": a vCPU filter under --seccomp false)."""
    from strato.api.client import ApiClient

    sock = workdir / "api.sock"
    config = replace(_api_config(guest_elf, workdir), payload=replace(
        _api_config(guest_elf, workdir).payload, cmdline="tests=console-rx host-timeout=3000"
    ))  # fmt: skip
    proc = _start_api("api", sock, "--seccomp", "false")
    try:
        with ApiClient(sock, timeout=20) as api:
            api.create(config)
            api.boot()
            assert api.info()["state"] == "Running"
            seen = _filters_of(proc.pid)
            assert set(seen.values()) == {0}, seen  # (unfiltered threads keep the process name)
            assert len(list(Path(f"/proc/{proc.pid}/task").iterdir())) >= 5
            api.shutdown_vmm()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "forbidden system call" not in err


@pytest.mark.parametrize("mode", MODES)
def test_the_controller_gives_created_configs_the_vmm_seccomp_mode(mode: str) -> None:
    from strato.vmm.config import PayloadConfig, VmConfig
    from strato.vmm.controller import VmmController

    controller = VmmController(lambda config: None, seccomp=mode)  # type: ignore[arg-type,return-value]
    controller.start()
    try:
        controller.create(VmConfig(payload=PayloadConfig(kernel=Path(__file__))))
        assert controller.config is not None and controller.config.seccomp == mode
    finally:
        controller.close()


def test_syscall_names_come_from_libseccomp() -> None:
    assert seccomp.syscall_name(0) == "read" and seccomp.syscall_name(59) == "execve"
    assert seccomp.syscall_name(100000) == "syscall 100000"


def test_the_kick_signal_the_filters_allow_is_the_one_vcpus_are_kicked_with() -> None:
    from strato.vmm.vcpu import KICK_SIGNAL

    assert seccomp.KICK_SIGNAL == KICK_SIGNAL
    assert seccomp.KICK_SIGNAL in seccomp.SIGNALS_SENT


def test_the_filters_name_the_process_they_were_compiled_for() -> None:
    """tgkill and prlimit64 compare with the pid: a filter compiled for another process
    (a cached program after fork) would refuse strato's own kicks."""
    assert seccomp.build("vcpu", "true", pid=1234) != seccomp.build("vcpu", "true", pid=4321)
    assert seccomp.build("api", "true", pid=1234) == seccomp.build("api", "true", pid=4321)
