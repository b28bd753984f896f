"""SIGTERM and SIGINT at any point of a `strato` run: strato always ends with its own exit
status, never by the signal's default action (the Linux boot test once saw exit -15 when its
SIGTERM arrived while the guest was stopping on its own).

The documented statuses (README, "Exit status"): a signal stops the VM and strato exits 0; a
guest that stopped on its own before the signal keeps its own status (a crash: 3, or 4 on PVM
hosts), and strato's stderr then names the crash.

The runs are small PVH guests (about 0.1 s of guest time each) from tests/guests:
- `pvh_hello` without --no-reboot resets at once, forever: start, run, reboot and teardown
  follow each other every ~50 ms, so a sweep of delays lands in all of them;
- `pvh_hello` with --no-reboot stops on its own (exit 0), and `pvh_triple_fault` crashes: a
  signal there races the guest's own stop, and the signal sent right after strato logs
  "VM stopped" lands in teardown and interpreter exit.

Signals sent from process start (delay 0 included) need strato started with them blocked, as
a careful launcher does: Python's own start-up (before any strato code runs) has the default
action, like any program's; strato unblocks them once its handlers are in place. Without the
block, the sweep starts when strato's handler is installed (SigCgt in /proc/PID/status).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from strato.vmm.platform import kvm_emulates_kernel_mode
from strato.vmm.stop import EXIT_EMULATION_FAILURE, EXIT_GUEST_CRASH, EXIT_OK
from tests.guests.asm import build_elf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

CRASH = EXIT_EMULATION_FAILURE if kvm_emulates_kernel_mode() else EXIT_GUEST_CRASH
EXIT_DEADLINE = 60.0  # seconds for strato to end after the signal (it takes well under 1)
# Delays (seconds) from process start or from handler installation: start-up, the first boot,
# the reboots that follow, and the guest's own stop all fall in this range.
DELAYS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("guests")
    return {name: build_elf(name, d, []) for name in ("pvh_hello", "pvh_triple_fault")}


def _block_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def start(
    kernel: Path, tmp_path: Path, *extra: str, blocked: bool = False
) -> subprocess.Popen[str]:
    argv = [
        sys.executable, "-m", "strato.cli.main", "--kernel", str(kernel),
        "--serial", f"file={tmp_path / 'serial.log'}", "--console", "off",
        "--memory", "size=32M", *extra,
    ]  # fmt: skip
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_block_stop_signals if blocked else None,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"strato did not end within {EXIT_DEADLINE} s of the signal:\n{err}")
    return proc.returncode, err


def wait_for_handler(proc: subprocess.Popen[str]) -> None:
    """Until strato catches SIGTERM (SigCgt; it installs both handlers at once, and Python
    itself catches SIGINT from its start, so that bit says nothing), or it ended."""
    deadline = time.monotonic() + EXIT_DEADLINE
    bit = 1 << (signal.SIGTERM - 1)
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            return
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & bit:
            return
        time.sleep(0.001)  # polling interval
    assert proc.poll() is not None, "strato never installed its handler"


def check(status: int, stderr: str, allowed: Sequence[int]) -> None:
    assert status >= 0, f"strato died of signal {-status}:\n{stderr}"
    assert status in allowed, (status, stderr)
    assert "Traceback" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr
    # A crash status only with the crash named (the guest stopped first); never otherwise.
    assert ("ERROR: VM stopped" in stderr) == (status != EXIT_OK), stderr


def signal_after(proc: subprocess.Popen[str], signum: int, delay: float) -> None:
    time.sleep(delay)  # the point of the run the signal lands in: coverage, not correctness
    proc.send_signal(signum)


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", DELAYS)
def test_signal_from_process_start_while_rebooting(
    guests: dict[str, Path], tmp_path: Path, signum: int, delay: float
) -> None:
    """From exec on (signals blocked by the launcher): parse, build, boot, reboot loop."""
    proc = start(guests["pvh_hello"], tmp_path, blocked=True)
    signal_after(proc, signum, delay)
    check(*finish(proc), allowed=[EXIT_OK])


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", DELAYS[::2])
def test_signal_after_handler_while_rebooting(
    guests: dict[str, Path], tmp_path: Path, signum: int, delay: float
) -> None:
    """Started as a shell starts it (nothing blocked): from the handler's installation on."""
    proc = start(guests["pvh_hello"], tmp_path)
    wait_for_handler(proc)
    signal_after(proc, signum, delay)
    check(*finish(proc), allowed=[EXIT_OK])


@pytest.mark.parametrize("guest", ["pvh_hello", "pvh_triple_fault"])
@pytest.mark.parametrize("delay", DELAYS[1::2])
def test_sigterm_races_the_guests_own_stop(
    guests: dict[str, Path], tmp_path: Path, guest: str, delay: float
) -> None:
    """--no-reboot: the guest stops on its own (reset: 0; triple fault: a crash) around the
    time the signal arrives; whichever is first decides the status."""
    proc = start(guests[guest], tmp_path, "--no-reboot", blocked=True)
    signal_after(proc, signal.SIGTERM, delay)
    allowed = [EXIT_OK] if guest == "pvh_hello" else [EXIT_OK, CRASH]
    check(*finish(proc), allowed=allowed)


def _on_stderr_line(
    proc: subprocess.Popen[str], needle: str, then: Callable[[], None]
) -> tuple[threading.Thread, list[str]]:
    """Read stderr on a thread; call `then` at once when a line contains `needle`."""
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        fired = False
        for line in proc.stderr:
            lines.append(line)
            if not fired and needle in line:
                fired = True
                then()

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, lines


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("after", [0.0, 0.01, 0.02, 0.04])
@pytest.mark.parametrize("guest", ["pvh_hello", "pvh_triple_fault"])
def test_signal_during_teardown_and_exit(
    guests: dict[str, Path], tmp_path: Path, guest: str, after: float, signum: int
) -> None:
    """The signal sent `after` seconds past strato's "VM stopped" line: teardown, the end of
    main() and the interpreter's exit (where CPython puts default handlers back)."""
    proc = start(guests[guest], tmp_path, "--no-reboot", "-v")

    def send() -> None:
        time.sleep(after)  # coverage of teardown and exit, not correctness
        if proc.poll() is None:
            proc.send_signal(signum)

    reader, lines = _on_stderr_line(proc, "VM stopped", send)
    try:
        status = proc.wait(timeout=EXIT_DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("strato did not end")
    reader.join(EXIT_DEADLINE)
    stderr = "".join(lines)
    assert any("VM stopped" in line for line in lines), stderr
    assert status >= 0, f"strato died of signal {-status}:\n{stderr}"
    assert status == (EXIT_OK if guest == "pvh_hello" else CRASH), stderr
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("delay", DELAYS[::2])
def test_signal_with_the_api_socket(
    guests: dict[str, Path], tmp_path: Path, signum: int, delay: float
) -> None:
    """`--api-socket` with a VM on the command line: the signal shuts the VMM down as
    vmm.shutdown does (exit 0), at any point from exec on."""
    sock = tmp_path / "api.sock"
    proc = start(guests["pvh_hello"], tmp_path, "--api-socket", f"path={sock}", blocked=True)
    signal_after(proc, signum, delay)
    check(*finish(proc), allowed=[EXIT_OK])
