"""A guest that resets at once reboots in a loop (as under Cloud Hypervisor): every reboot is
counted and logged (rate-limited), the count is visible (`Stop.reboots` from the runner,
`reboots` in vm.info through the API), and the loop ends at the reboot cap with the
documented message and status 1.

The guest is `pvh_hello` (tests/guests) without --no-reboot: it prints five lines and resets
through the i8042, about 50 ms per boot here. The cap is lowered through a parameter
(`run(max_reboots=...)`, `VmmController.reboots`) instead of waiting for 1000 boots.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest

from strato.vmm.config import ConsoleConfig, ConsoleMode, MemoryConfig, PayloadConfig, VmConfig
from strato.vmm.controller import VmmController, VmmError
from strato.vmm.events import parse_events
from strato.vmm.runner import run
from strato.vmm.stop import EXIT_OK, EXIT_VMM_ERROR, MAX_REBOOTS, Reboots, StopReason
from tests.guests.asm import build_elf

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

DEADLINE = 120.0  # seconds; each case here takes about one


class Recorder:
    """An EventSink that keeps (source, event, properties)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, str] | None]] = []

    def emit(self, source: str, event: str, properties: Mapping[str, str] | None = None) -> None:
        self.events.append((source, event, dict(properties) if properties else None))

    def close(self, timeout: float = 2.0) -> None:
        pass

    def names(self) -> list[str]:
        return [f"{s} {e}" for s, e, _ in self.events]


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_elf("pvh_hello", tmp_path_factory.mktemp("guest"), [])


def config(kernel: Path, serial: Path) -> VmConfig:
    return VmConfig(
        payload=PayloadConfig(kernel=kernel),
        memory=MemoryConfig(size=32 << 20),
        serial=ConsoleConfig(ConsoleMode.FILE, serial),
        console=ConsoleConfig(ConsoleMode.OFF),
        no_reboot=False,
    )


def test_the_cap_is_documented_and_large() -> None:
    assert MAX_REBOOTS == 1000  # README: "after 1000 reboots"
    assert Reboots().limit == MAX_REBOOTS


def test_reboot_cap_on_the_runner(
    hello: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    events = Recorder()
    serial = tmp_path / "serial.log"
    with caplog.at_level(logging.INFO):
        stop = run(config(hello, serial), max_reboots=5, events=events)
    assert stop.reason is StopReason.VMM_ERROR
    assert stop.message == "the guest reset 6 times; giving up after 5 reboots"
    assert stop.exit_status == EXIT_VMM_ERROR
    assert stop.reboots == 5
    assert serial.read_text().count("BYE\n") == 6  # the first boot and five reboots
    assert events.names() == (
        ["vm booting", "vm booted"] + ["vm rebooting", "vm rebooted"] * 5 + ["vm shutdown"]
    )
    assert events.events[-1][2] == {"reason": "vmm-error", "message": stop.message}
    logged = [r.getMessage() for r in caplog.records if "rebooting it" in r.getMessage()]
    assert logged == [f"the guest reset; rebooting it (reboot {n})" for n in range(1, 6)]
    assert all(
        r.levelno == logging.WARNING for r in caplog.records if "rebooting it" in r.getMessage()
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"VM stopped: {stop.message}"]  # said once, on stderr for the command


def test_reboot_log_is_rate_limited(
    hello: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        stop = run(config(hello, tmp_path / "serial.log"), max_reboots=30)
    elapsed = time.monotonic() - started
    assert stop.reboots == 30
    lines = [r for r in caplog.records if "rebooting it" in r.getMessage()]
    # RateLimitedLog: at most 10 lines per 5 s window (and the first one is always there).
    assert lines[0].getMessage().endswith("(reboot 1)")
    assert len(lines) <= 10 * (int(elapsed / 5.0) + 1), [r.getMessage() for r in lines]
    assert len(lines) < 30


def test_no_reboot_counts_nothing(hello: Path, tmp_path: Path) -> None:
    cfg = replace(config(hello, tmp_path / "serial.log"), no_reboot=True)
    stop = run(cfg, max_reboots=5)
    assert (stop.reason, stop.reboots, stop.exit_status) == (StopReason.RESET, 0, EXIT_OK)


def test_reboots_are_counted_through_the_api(hello: Path, tmp_path: Path) -> None:
    events = Recorder()
    controller = VmmController(events=events)
    controller.reboots = Reboots(limit=4)
    controller.start()
    try:
        controller.create(config(hello, tmp_path / "serial.log"))
        controller.boot()
        deadline = time.monotonic() + DEADLINE
        seen = 0
        while not controller.wait(0.05) and time.monotonic() < deadline:
            try:
                seen = max(seen, controller.info()["reboots"])
            except VmmError:
                pass  # the VMM is shutting down: vm.info has no VM any more
        assert controller.wait(0), "the VMM did not stop at the reboot cap"
    finally:
        controller.close()
    assert 1 <= seen <= 4
    assert controller.reboots.count == 4
    assert controller.exit_stop is not None
    assert controller.exit_stop.message == "the guest reset 5 times; giving up after 4 reboots"
    assert controller.exit_status == EXIT_VMM_ERROR
    names = events.names()
    assert names.count("vm rebooted") == 4
    shutdown = [p for s, e, p in events.events if (s, e) == ("vm", "shutdown")]
    assert shutdown[0] == {"reason": "vmm-error", "message": controller.exit_stop.message}


def test_reboots_on_the_command_line(hello: Path, tmp_path: Path) -> None:
    """`strato` without --no-reboot: each reboot logged on stderr and written to the event
    monitor; SIGTERM ends the loop with status 0."""
    monitor = tmp_path / "events.json"
    argv = [
        sys.executable, "-m", "strato.cli.main", "--kernel", str(hello),
        "--serial", f"file={tmp_path / 'serial.log'}", "--console", "off",
        "--memory", "size=32M", "--event-monitor", f"path={monitor}",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            text = monitor.read_text() if monitor.exists() else ""
            if text.count('"rebooted"') >= 3:
                break
            time.sleep(0.02)  # polling interval
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == EXIT_OK, err
    assert "strato: WARNING: the guest reset; rebooting it (reboot 1)" in err.splitlines()
    events = [(e["source"], e["event"]) for e in parse_events(monitor.read_text())]
    assert events[:4] == [("vmm", "starting"), ("vm", "booting"), ("vm", "booted"),
                          ("vm", "rebooting")]  # fmt: skip
    assert events.count(("vm", "rebooted")) >= 3
    assert events[-2:] == [("vm", "shutdown"), ("vmm", "shutdown")]
