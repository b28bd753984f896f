"""`--event-monitor` on the plain command line (no `--api-socket`): the events Cloud Hypervisor
writes (vmm starting, vm booting/booted, vm shutdown with the reason, vmm shutdown), to a file
or an inherited descriptor; and `--log-file`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strato.vmm.events import parse_events
from strato.vmm.platform import kvm_emulates_kernel_mode
from strato.vmm.stop import EXIT_EMULATION_FAILURE, EXIT_GUEST_CRASH, EXIT_OK
from tests.guests.asm import build_elf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

RUN_TIMEOUT = 120.0  # seconds; each run takes about one
CRASH = EXIT_EMULATION_FAILURE if kvm_emulates_kernel_mode() else EXIT_GUEST_CRASH


@pytest.fixture(scope="module")
def guests(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("guests")
    return {name: build_elf(name, d, []) for name in ("pvh_hello", "pvh_triple_fault")}


def strato(
    kernel: Path, tmp_path: Path, *args: str, pass_fds: tuple[int, ...] = ()
) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable, "-m", "strato.cli.main", "--kernel", str(kernel),
        "--serial", f"file={tmp_path / 'serial.log'}", "--console", "off",
        "--memory", "size=32M", "--no-reboot", *args,
    ]  # fmt: skip
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, pass_fds=pass_fds
    )


def test_events_to_a_file(guests: dict[str, Path], tmp_path: Path) -> None:
    monitor = tmp_path / "events.json"
    r = strato(guests["pvh_hello"], tmp_path, "--event-monitor", f"path={monitor}")
    assert r.returncode == EXIT_OK, r.stderr
    events = parse_events(monitor.read_text())
    assert [(e["source"], e["event"]) for e in events] == [
        ("vmm", "starting"),
        ("vm", "booting"),
        ("vm", "booted"),
        ("vm", "shutdown"),
        ("vmm", "shutdown"),
    ]
    assert events[3]["properties"] == {
        "reason": "reset",
        "message": "the guest reset the machine (i8042)",
    }
    stamps = [
        (t["secs"], t["nanos"]) for t in (e["timestamp"] for e in events) if isinstance(t, dict)
    ]
    assert len(stamps) == len(events) and stamps == sorted(stamps)


def test_events_to_an_inherited_descriptor(guests: dict[str, Path], tmp_path: Path) -> None:
    r_fd, w_fd = os.pipe()
    try:
        r = strato(
            guests["pvh_triple_fault"], tmp_path, "--event-monitor", f"fd={w_fd}", pass_fds=(w_fd,)
        )
        os.close(w_fd)
        w_fd = -1
        with os.fdopen(r_fd) as f:
            r_fd = -1
            events = parse_events(f.read())
    finally:
        for fd in (r_fd, w_fd):
            if fd >= 0:
                os.close(fd)
    assert r.returncode == CRASH, r.stderr
    shutdown = [e for e in events if (e["source"], e["event"]) == ("vm", "shutdown")]
    assert len(shutdown) == 1
    props = shutdown[0]["properties"]
    assert isinstance(props, dict)
    assert props["reason"] in ("triple-fault", "emulation-failure")
    assert (events[0]["source"], events[0]["event"]) == ("vmm", "starting")
    assert (events[-1]["source"], events[-1]["event"]) == ("vmm", "shutdown")


def test_log_file_takes_the_log(guests: dict[str, Path], tmp_path: Path) -> None:
    log = tmp_path / "strato.log"
    log.write_text("an earlier line\n")
    r = strato(guests["pvh_hello"], tmp_path, "--log-file", str(log), "-v")
    assert r.returncode == EXIT_OK
    assert r.stderr == ""
    text = log.read_text()
    assert text.startswith("an earlier line\n")  # appended to
    assert "strato: INFO: VM stopped:" in text


def test_bad_event_monitor_value(guests: dict[str, Path], tmp_path: Path) -> None:
    r = strato(guests["pvh_hello"], tmp_path, "--event-monitor", "file=x")
    assert r.returncode == 2
    assert "strato: error: --event-monitor file=x: expected path=PATH or fd=N" in r.stderr
    assert not Path("file=x").exists()  # a refused value creates nothing (in the cwd)
