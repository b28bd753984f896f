"""The Debian cloud kernel booted by the `strato` command, both ways (bzImage and PVH), with 1
and 2 vCPUs.

Where KVM emulates guest kernel mode (PVM, see PLATFORM.md) the kernel only gets as far as its
serial console before an emulation failure, so each boot is followed until `printk: console
[ttyS0] enabled` and then stopped with SIGTERM. The guest may be stopping on its own (that
emulation failure) when the signal arrives: strato then ends with the guest's status (4) and
says why on stderr; otherwise with 0 for the stop by signal. Never by the signal itself. On
hosts with hardware virtualization the same boots go on to the initramfs, which prints the
guest's marker and powers off.

The selected boots run concurrently (each is minutes of emulated kernel code here); only the
selected ones run: `-k bzimage-2` boots one kernel, not four.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.vmm.platform import kvm_emulates_kernel_mode
from strato.vmm.stop import EXIT_EMULATION_FAILURE, EXIT_OK

pytestmark = [
    pytest.mark.linux,
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

# slub_debug=F keeps SLUB off its cmpxchg16b fast path, which the PVM emulator cannot run
# (PLATFORM.md): without it the kernel stops before it enables its console.
CMDLINE = "console=ttyS0 slub_debug=F reboot=k panic=1 i8042.noaux"
CONSOLE_ENABLED = "printk: console [ttyS0] enabled"
DEADLINE = 1500.0  # seconds for all boots together, on 2 shared cores
EMULATED = kvm_emulates_kernel_mode()  # PVM: the kernel stops before userspace


@dataclass
class Boot:
    name: str
    kernel: Path
    cpus: int
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    stopped_by_test: bool = False
    returncode: int | None = None
    stderr: str = ""

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""


NAMES = ["bzimage-1", "bzimage-2", "pvh-1", "pvh-2"]


def _selected(request: pytest.FixtureRequest) -> set[str]:
    """The boots the selected tests of this module need (all four when run whole)."""
    wanted: set[str] = set()
    for item in request.session.items:
        callspec = getattr(item, "callspec", None)
        if getattr(item, "module", None) is request.module and callspec is not None:
            wanted.add(callspec.params.get("name"))
    return wanted & set(NAMES) or set(NAMES)


@pytest.fixture(scope="module")
def boots(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Boot]:
    from strato.images import ensure_default_guest

    guest = ensure_default_guest()
    d = tmp_path_factory.mktemp("linux")
    wanted = _selected(request)
    plan = [
        Boot(name, guest.kernel.bzimage if name.startswith("bzimage") else guest.kernel.vmlinux,
             int(name[-1]), d / f"{name}.log")
        for name in NAMES
        if name in wanted
    ]  # fmt: skip
    for b in plan:
        cmd = [
            sys.executable, "-m", "strato.cli.main",
            "--kernel", str(b.kernel),
            "--initramfs", str(guest.initramfs),
            "--cmdline", CMDLINE,
            "--cpus", f"boot={b.cpus}",
            "--memory", "size=128M",
            "--serial", f"file={b.log}",
            "--console", "off",
            "--no-reboot",
        ]  # fmt: skip
        b.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE
    pending = list(plan)
    while pending and time.monotonic() < deadline:
        for b in list(pending):
            assert b.proc is not None
            if b.proc.poll() is not None:
                pending.remove(b)
            elif EMULATED and CONSOLE_ENABLED in b.text():
                b.stopped_by_test = True
                b.proc.send_signal(signal.SIGTERM)
                pending.remove(b)
        time.sleep(0.5)  # polling interval of the loop above, not a wait for correctness
    for b in plan:
        assert b.proc is not None
        if b.proc.poll() is None and b in pending:
            b.proc.kill()
        try:
            _, err = b.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            b.proc.kill()
            _, err = b.proc.communicate()
        b.returncode = b.proc.returncode
        b.stderr = err.decode(errors="replace")
    return {b.name: b for b in plan}


def _check(boot: Boot) -> str:
    text = boot.text()
    assert CONSOLE_ENABLED in text, (
        f"{boot.name}: the console never came up.\n--- serial (tail):\n{text[-3000:]}"
        f"\n--- stderr:\n{boot.stderr[-2000:]}"
    )
    # Exactly the command line given, and the memory size given (the e820 map ends at 128 MiB).
    lines = re.findall(r"Kernel command line: (.*)", text)
    assert lines and lines[0].strip() == CMDLINE, lines
    assert re.search(r"BIOS-e820: \[mem 0x0000000000100000-0x0000000007ffffff\] usable", text), (
        text[:3000]
    )
    assert "Traceback" not in boot.stderr, boot.stderr
    if EMULATED:
        # The kernel ends at an emulation failure soon after its console comes up, and the
        # test's SIGTERM (sent when it sees the console line, if it sees it first) races that.
        # Whichever came first decides, and strato says which: 0 for the stop by signal, or 4
        # with the failure named on stderr. Never a death by signal.
        assert boot.returncode in (EXIT_OK, EXIT_EMULATION_FAILURE), (
            boot.returncode,
            boot.stderr[-2000:],
        )
        stopped_itself = "VM stopped: KVM internal error" in boot.stderr
        assert stopped_itself == (boot.returncode == EXIT_EMULATION_FAILURE), boot.stderr[-2000:]
    else:  # hardware virtualization: the initramfs ran and powered off
        assert not boot.stopped_by_test
        assert "STRATO-GUEST-OK" in text, text[-3000:]
        assert boot.returncode == 0, (boot.returncode, boot.stderr[-2000:])
    return text


@pytest.mark.parametrize("name", NAMES)
def test_debian_kernel_reaches_console(boots: dict[str, Boot], name: str) -> None:
    text = _check(boots[name])
    cpus = boots[name].cpus
    # The kernel found strato's ACPI tables and every vCPU in the MADT (this kernel has no MP
    # table support: CONFIG_X86_MPPARSE is off in Debian's cloud flavour).
    assert re.search(r"ACPI: RSDP 0x00000000000E0000", text), re.findall(r"ACPI: .*", text)
    for table in ("XSDT", "FACP", "DSDT", "APIC", "MCFG"):
        assert f"ACPI: {table} " in text, table
    assert f"smpboot: Allowing {cpus} CPUs" in text, re.findall(r"smpboot: .*", text)
