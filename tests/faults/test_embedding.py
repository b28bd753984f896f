"""strato embedded in another program: `strato.vmm.runner.run` called from a worker thread.

A vCPU is kicked out of KVM_RUN with a real-time signal (SIGRTMIN) whose no-op handler can only
be installed from the main thread. When the first VM of a process runs on another thread the
handler is missing (strato logs "not on the main thread: vCPUs in KVM_RUN cannot be kicked"),
and the signal's default action would terminate the whole process when the VM stops. Found by
tests/load/test_many_vms.py; `strato.vmm.vcpu` now sends the kick only once its handler is
installed. This test keeps it that way: the process lives and the guest's run ends with 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

PROGRAM = """
import sys, threading
from strato.cli.args import build_parser, config_from_args
from strato.vmm.runner import run

args = ["--kernel", sys.argv[1], "--cmdline", "tests=serial", "--memory", "size=32M",
        "--serial", "null", "--console", "off", "--no-reboot"]
stops = []
worker = threading.Thread(
    target=lambda: stops.append(run(config_from_args(build_parser().parse_args(args)), timeout=60))
)
worker.start()
worker.join()
print("exit status", stops[0].exit_status)
"""


def test_run_on_a_worker_thread_does_not_kill_the_process(guest_elf: Path) -> None:
    p = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(guest_elf)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if p.returncode < 0:
        pytest.fail(f"the host process was killed by {signal.Signals(-p.returncode).name}")
    assert p.returncode == 0, p.stderr
    assert "exit status 0" in p.stdout
