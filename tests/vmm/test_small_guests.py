"""Small PVH guests on the real /dev/kvm, through the `strato` command and in-process (layer 2 of
TESTING.md).

The guests are GNU as sources in tests/guests (pvh_*.S, linked with pvh.ld), assembled at test
time. Each one prints a few lines on COM1 and resets the machine through the i8042, which
strato turns into exit status 0 under --no-reboot. Their CPL 0 code, which KVM emulates on the
CI hosts (PLATFORM.md), is a few thousand instructions at most: each run takes about a second.
The real-mode guest is tested in test_machine_kvm.py.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strato.cli.main import main
from strato.devices.legacy.serial_output import ConsoleLog
from strato.kvm import VcpuFd
from strato.vmm.builder import DEFAULT_CMDLINE, build_vm
from strato.vmm.config import (
    ConsoleConfig,
    ConsoleMode,
    CpusConfig,
    MemoryConfig,
    PayloadConfig,
    VmConfig,
)
from strato.vmm.exit_handler import _unknown_io
from strato.vmm.platform import PVM_NOTE, kvm_emulates_kernel_mode
from strato.vmm.runner import run
from strato.vmm.stop import (
    EXIT_CONFIG_ERROR,
    EXIT_EMULATION_FAILURE,
    EXIT_GUEST_CRASH,
    EXIT_OK,
    StopReason,
)
from strato.vmm.vm import Vm
from tests.guests.asm import build_elf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

# KVM emulates guest kernel mode here (PVM): some failures surface differently (see below).
PVM = kvm_emulates_kernel_mode()
MEMORY = 64 << 20
RUN_TIMEOUT = 120.0  # seconds; every guest here is done in about one
PVM_NOTE_LINE = f"strato: WARNING: {PVM_NOTE}"

# A triple fault is KVM_EXIT_SHUTDOWN with hardware virtualization (StopReason.TRIPLE_FAULT,
# status 3). On this PVM host KVM reports it as an emulation failure (internal error, suberror
# 1) at the instruction whose exception could not be delivered, which strato maps to 4.
TRIPLE_FAULT_STATUS = EXIT_EMULATION_FAILURE if PVM else EXIT_GUEST_CRASH
TRIPLE_FAULT_REASON = StopReason.EMULATION_FAILURE if PVM else StopReason.TRIPLE_FAULT

GuestBuilder = Callable[..., Path]


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestBuilder:
    """guest(name, *ld_args) -> the linked ELF (built once per module and argument list)."""
    root = tmp_path_factory.mktemp("guests")
    built: dict[tuple[str, ...], Path] = {}

    def build(name: str, *ld_args: str) -> Path:
        key = (name, *ld_args)
        if key not in built:
            out = root / f"variant{len(built)}"
            out.mkdir()
            built[key] = build_elf(name, out, list(ld_args))
        return built[key]

    return build


@dataclass
class Result:
    status: int
    serial: str
    stdout: str
    stderr: str

    def stderr_lines(self) -> list[str]:
        """stderr without the one-time note about this host's emulating KVM."""
        return [line for line in self.stderr.splitlines() if line != PVM_NOTE_LINE]


def strato(kernel: Path, tmp_path: Path, *args: str, cpus: int = 1) -> Result:
    """Run the `strato` command on `kernel` with the serial port in a file."""
    serial = tmp_path / "serial.out"
    argv = [
        sys.executable, "-m", "strato.cli.main", "--kernel", str(kernel),
        "--serial", f"file={serial}", "--console", "off", "--no-reboot",
        "--cpus", f"boot={cpus}", "--memory", f"size={MEMORY >> 20}M", *args,
    ]  # fmt: skip
    p = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    text = serial.read_text(errors="replace") if serial.exists() else ""
    return Result(p.returncode, text, p.stdout, p.stderr)


def config(kernel: Path, *, cpus: int = 1, cmdline: str | None = None) -> VmConfig:
    return VmConfig(
        payload=PayloadConfig(kernel=kernel, cmdline=cmdline),
        cpus=CpusConfig(boot_vcpus=cpus, max_vcpus=cpus),
        memory=MemoryConfig(size=MEMORY),
        serial=ConsoleConfig(ConsoleMode.NULL),  # replaced by the ConsoleLog passed in
        console=ConsoleConfig(ConsoleMode.OFF),
        no_reboot=True,
    )


def assert_no_traceback(r: Result) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == ""


# -- 1. 32-bit protected mode (the PVH entry state) and the i8042 reset -------------------------


def test_pvh_entry_prints_and_resets_cleanly(guest: GuestBuilder, tmp_path: Path) -> None:
    r = strato(guest("pvh_hello"), tmp_path)
    assert r.status == EXIT_OK, r.stderr
    lines = r.serial.splitlines()
    assert lines[0] == "PVH32 hello"
    # The PVH entry state: protected mode on, paging off.
    cr0 = int(lines[1].removeprefix("CR0 "), 16)
    assert cr0 & 1 and not cr0 & (1 << 31), lines[1]
    assert lines[2:] == ["START_INFO magic ok", f"CMDLINE [{DEFAULT_CMDLINE}]", "BYE"]
    assert r.stderr_lines() == []
    assert_no_traceback(r)


def test_pvh_entry_in_process_stops_on_reset(guest: GuestBuilder) -> None:
    console = ConsoleLog()
    stop = run(config(guest("pvh_hello")), serial_out=console, timeout=RUN_TIMEOUT)
    assert stop.reason is StopReason.RESET, stop
    assert stop.exit_status == EXIT_OK
    assert console.data().endswith(b"BYE\n")


class EnoughBoots(Exception):
    pass


def test_reset_reboots_and_keeps_serial_output(guest: GuestBuilder, tmp_path: Path) -> None:
    serial = tmp_path / "serial.out"
    cfg = replace(
        config(guest("pvh_hello")),
        serial=ConsoleConfig(ConsoleMode.FILE, serial),
        no_reboot=False,
    )
    boots = 0

    def started(vm: Vm) -> None:
        nonlocal boots
        boots += 1
        if boots == 3:  # the guest resets at once, so strato reboots it: stop on the third boot
            raise EnoughBoots

    with pytest.raises(EnoughBoots):
        run(cfg, on_started=started, timeout=RUN_TIMEOUT)
    # The first two boots ran to their reset, so printed all of their output, and a reboot
    # must not truncate the serial file.
    assert serial.read_text().count("PVH32 hello\n") >= 2


# -- 2. long mode set up by the guest from the PVH entry state ----------------------------------


def test_guest_enters_long_mode_from_pvh_entry(guest: GuestBuilder, tmp_path: Path) -> None:
    r = strato(guest("pvh_long"), tmp_path)
    assert r.status == EXIT_OK, r.stderr
    lines = r.serial.splitlines()
    assert lines[:2] == ["PVH32 entering long mode", "LONG64 hello"]
    efer = int(lines[2].removeprefix("EFER "), 16)
    assert efer & 0x100 and efer & 0x400, f"LME and LMA must be set: {lines[2]}"
    assert lines[3:] == ["WIDE 0123456789abcdef", "BYE"]
    assert_no_traceback(r)


# -- 4. port and MMIO exits, both ways ----------------------------------------------------------


def test_port_and_mmio_to_nowhere_read_all_ones(guest: GuestBuilder, tmp_path: Path) -> None:
    r = strato(guest("pvh_io"), tmp_path)
    assert r.status == EXIT_OK, r.stderr
    assert r.serial == (
        "PORT8 ff PORT16 ffff PORT32 ffffffff\n"
        "MMIO32 ffffffff MMIO8 ff\n"
        "REP INSB ffffffff\n"
        "REP OUTSB ok\n"
        "BYE\n"
    )  # fmt: skip
    log = r.stderr_lines()
    assert "strato: WARNING: unhandled port read 0x99 (reads as all-ones)" in log
    assert "strato: WARNING: unhandled port write 0x99 <- 5a" in log
    assert "strato: WARNING: unhandled MMIO write at 0xd0000000 <- 78563412" in log
    assert "strato: WARNING: unhandled MMIO read at 0xd0000008 (reads as all-ones)" in log
    assert_no_traceback(r)


class Probe:
    """A test device: records accesses; each read of (offset, size) takes the next value queued
    for it in `answers` (0 once they run out)."""

    def __init__(self, answers: dict[tuple[int, int], list[int]]) -> None:
        self.answers = answers
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        queued = self.answers.get((offset, size)) or [0]
        return queued.pop(0).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def test_port_and_mmio_exits_reach_devices(guest: GuestBuilder) -> None:
    # Port 0x99: inb, inw, inl, then rep insb of 4 bytes.
    port = Probe({(0, 1): [0x42, 0x11, 0x22, 0x33, 0x44], (0, 2): [0x1234], (0, 4): [0xDEADBEEF]})
    mmio = Probe({(0, 4): [0xCAFEF00D], (8, 1): [0x7E]})
    console = ConsoleLog()
    vm = build_vm(config(guest("pvh_io")), serial_out=console)
    try:
        vm.machine.pio.insert(port, 0x99, 1)
        vm.machine.mmio.insert(mmio, 0xD000_0000, 0x1000)
        vm.start()
        stop = vm.wait(RUN_TIMEOUT)
    finally:
        serial = vm.devices.get("serial")
        vm.shutdown()
        if serial is not None:
            serial.close()
    assert stop is not None and stop.reason is StopReason.RESET, stop
    assert port.reads == [(0, 1), (0, 2), (0, 4)] + [(0, 1)] * 4
    assert port.writes == [(0, b"\x5a")]
    assert mmio.writes == [(0, (0x12345678).to_bytes(4, "little")), (4, b"\xef\xbe")]
    assert mmio.reads == [(0, 4), (8, 1)]
    assert console.data() == (
        b"PORT8 42 PORT16 1234 PORT32 deadbeef\n"
        b"MMIO32 cafef00d MMIO8 7e\n"
        b"REP INSB 44332211\n"
        b"REP OUTSB ok\n"
        b"BYE\n"
    )  # fmt: skip


# -- 5. the command line, through hvm_start_info ------------------------------------------------


@pytest.mark.parametrize(
    "cmdline",
    [
        "strato small guest test key=value x.y=z",
        "",
        'quoted="a b" ~!@#$%^&*()_+{}|:<>?`-=[]\\;\',./',
        " ".join(f"p{i}=v{i}" for i in range(400)),  # ~3.5 KB
    ],
    ids=["words", "empty", "punctuation", "long"],
)
def test_cmdline_reaches_guest(guest: GuestBuilder, tmp_path: Path, cmdline: str) -> None:
    r = strato(guest("pvh_hello"), tmp_path, "--cmdline", cmdline)
    assert r.status == EXIT_OK, r.stderr
    assert f"START_INFO magic ok\nCMDLINE [{cmdline}]\nBYE\n" in r.serial
    assert_no_traceback(r)


# -- 6. triple fault ----------------------------------------------------------------------------


def test_triple_fault_exit_status_and_one_line(guest: GuestBuilder, tmp_path: Path) -> None:
    r = strato(guest("pvh_triple_fault"), tmp_path)
    assert r.serial == "TRIPLE FAULT next\n"  # and not "still alive after int3"
    assert r.status == TRIPLE_FAULT_STATUS, r.stderr
    if PVM:
        # The emulator gives up on the int3 (0xcc) whose #BP it could not deliver.
        crash = re.compile(
            r"strato: ERROR: VM stopped: KVM internal error: emulation failure "
            r"\(instruction bytes cc( [0-9a-f]{2})*\) \(vCPU 0\)"
        )
    else:
        crash = re.compile(
            r"strato: ERROR: VM stopped: the guest triple-faulted \(CPU shutdown\) \(vCPU 0\)"
        )
    lines = r.stderr_lines()
    assert len(lines) == 1 and crash.fullmatch(lines[0]), lines
    assert_no_traceback(r)


def test_triple_fault_in_process(guest: GuestBuilder) -> None:
    console = ConsoleLog()
    stop = run(config(guest("pvh_triple_fault")), serial_out=console, timeout=RUN_TIMEOUT)
    assert stop.reason is TRIPLE_FAULT_REASON, stop
    assert stop.vcpu == 0
    assert stop.is_crash
    assert console.data() == b"TRIPLE FAULT next\n"


# -- 7. an instruction KVM's emulator cannot run ------------------------------------------------


@pytest.mark.skipif(
    not PVM,
    reason="lock cmpxchg16b only fails where KVM emulates guest kernel mode (/sys/module/kvm_pvm)",
)
def test_emulation_failure_exit_status_and_instruction_bytes(
    guest: GuestBuilder, tmp_path: Path
) -> None:
    r = strato(guest("pvh_cmpxchg16b"), tmp_path)
    assert r.serial == "LONG64 cmpxchg16b next\n"
    assert r.status == EXIT_EMULATION_FAILURE, r.stderr
    lines = r.stderr_lines()
    # f0 48 0f c7 0f: lock cmpxchg16b (%rdi); then the bytes that follow it.
    crash = re.compile(
        r"strato: ERROR: VM stopped: KVM internal error: emulation failure "
        r"\(instruction bytes f0 48 0f c7 0f( [0-9a-f]{2})*\) \(vCPU 0\)"
    )
    assert len(lines) == 1 and crash.fullmatch(lines[0]), lines
    assert_no_traceback(r)


# -- 8. several vCPUs started with INIT-SIPI-SIPI -----------------------------------------------


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_aps_start_and_report_their_apic_ids(
    guest: GuestBuilder, tmp_path: Path, cpus: int
) -> None:
    r = strato(guest("pvh_smp", f"--defsym=NCPUS={cpus}"), tmp_path, cpus=cpus)
    assert r.status == EXIT_OK, r.stderr
    lines = r.serial.splitlines()
    assert lines[0] == "SMP BSP up"
    assert lines[1] == f"APS {cpus - 1}", r.serial  # TIMEOUT follows otherwise
    ids = lines[2].split()
    assert ids[0] == "CPUS"
    assert [int(i) for i in ids[1:]] == list(range(cpus))
    assert lines[3:] == ["BYE"]
    assert_no_traceback(r)


# -- 9. addresses that are neither RAM nor a device ---------------------------------------------


def test_unmapped_accesses_keep_running_and_log_bounded(
    guest: GuestBuilder, tmp_path: Path
) -> None:
    r = strato(guest("pvh_unmapped"), tmp_path)
    assert r.status == EXIT_OK, r.stderr
    assert r.serial == "HIGH ffffffff\nHOLE ffffffff\nFLOOD done\nBYE\n"
    unhandled = [line for line in r.stderr_lines() if "unhandled MMIO" in line]
    assert unhandled[:3] == [
        "strato: WARNING: unhandled MMIO write at 0xbffff000 <- a5a5a5a5",
        "strato: WARNING: unhandled MMIO read at 0xbffff000 (reads as all-ones)",
        "strato: WARNING: unhandled MMIO read at 0xd0000000 (reads as all-ones)",
    ]
    # 203 unhandled accesses; the log takes a burst per period (two, if a slow host straddles
    # a period boundary).
    assert len(unhandled) <= 2 * _unknown_io.burst, len(unhandled)
    assert_no_traceback(r)


# -- 10. bad input: exit status 2, one line, before any KVM_RUN ---------------------------------


def kernel_end(elf: Path) -> int:
    """Where the guest's last PT_LOAD segment ends (read independently of strato's loader)."""
    with elf.open("rb") as f:
        return max(
            int(s["p_paddr"] + s["p_memsz"])
            for s in ELFFile(f).iter_segments()
            if s["p_type"] == "PT_LOAD"
        )


def bad_inputs(guest: GuestBuilder, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (strato arguments, the exact error line)."""
    hello = guest("pvh_hello")
    missing = tmp_path / "no-such-kernel"
    corrupt = tmp_path / "corrupt.bin"
    corrupt.write_bytes(bytes.fromhex("5a17c0de") * 1024)  # neither "\x7fELF" nor "HdrS"
    big = tmp_path / "big.cpio"
    big_size = MEMORY + (16 << 20)
    with big.open("wb") as f:  # sparse: the size is checked before anything is read
        f.truncate(big_size)
    end = kernel_end(hello)
    room = (MEMORY - end) / (1 << 20)
    long_cmdline = "x" * 70000
    return {
        "missing kernel": (
            ["--kernel", str(missing)],
            f"strato: error: --kernel {missing}: no such file",
        ),
        "corrupt kernel": (
            ["--kernel", str(corrupt)],
            f"strato: error: {corrupt} is neither a bzImage nor an ELF kernel",
        ),
        "initramfs bigger than RAM": (
            ["--kernel", str(hello), "--initramfs", str(big)],
            f"strato: error: initramfs {big} ({big_size / (1 << 20):.1f} MiB) does not fit in "
            f"guest memory: the space between the kernel's end ({end:#x}) and {MEMORY:#x} is "
            f"{room:.1f} MiB; give the guest more memory",
        ),
        "command line too long": (
            ["--kernel", str(hello), "--cmdline", long_cmdline],
            "strato: error: kernel command line too long: 70000 bytes plus the terminating NUL, "
            "strato's buffer holds 65536",
        ),
    }


BAD_INPUTS = [
    "missing kernel",
    "corrupt kernel",
    "initramfs bigger than RAM",
    "command line too long",
]


def common_args(tmp_path: Path) -> list[str]:
    return [
        "--serial", f"file={tmp_path / 'serial.out'}", "--console", "off", "--no-reboot",
        "--memory", f"size={MEMORY >> 20}M",
    ]  # fmt: skip


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(guest: GuestBuilder, tmp_path: Path, case: str) -> None:
    args, message = bad_inputs(guest, tmp_path)[case]
    argv = [sys.executable, "-m", "strato.cli.main", *common_args(tmp_path), *args]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    r = Result(p.returncode, "", p.stdout, p.stderr)
    assert r.status == EXIT_CONFIG_ERROR, r.stderr
    assert r.stderr_lines() == [message]
    assert_no_traceback(r)


@pytest.fixture
def kvm_runs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts KVM_RUN calls (and refuses them); restores the logging main() reconfigures."""
    calls: list[int] = []

    def refuse(self: VcpuFd) -> object:
        calls.append(self.id)
        raise AssertionError("KVM_RUN on bad input")

    monkeypatch.setattr(VcpuFd, "run", refuse)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield calls
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_stops_before_kvm_run(
    guest: GuestBuilder,
    tmp_path: Path,
    case: str,
    kvm_runs: list[int],
    capsys: pytest.CaptureFixture[str],
) -> None:
    args, message = bad_inputs(guest, tmp_path)[case]
    assert main([*common_args(tmp_path), *args]) == EXIT_CONFIG_ERROR
    assert kvm_runs == []
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line != PVM_NOTE_LINE] == [message]


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=st.binary(min_size=0, max_size=2048), elf_magic=st.booleans())
def test_random_kernel_bytes_exit_2_before_kvm_run(
    tmp_path: Path,
    kvm_runs: list[int],
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    elf_magic: bool,
) -> None:
    kernel = tmp_path / "random.bin"
    kernel.write_bytes((b"\x7fELF" if elf_magic else b"") + body)
    capsys.readouterr()
    assert main([*common_args(tmp_path), "--kernel", str(kernel)]) == EXIT_CONFIG_ERROR
    assert kvm_runs == []
    err = [line for line in capsys.readouterr().err.splitlines() if line != PVM_NOTE_LINE]
    assert len(err) == 1 and re.match(r"strato: error: \S", err[0]), err
