"""Many small VMs at once on a small host (the CI machines have 2 cores).

- 20 `strato` processes started together, each a 32 MiB built-in guest with a disk and an rng
  that runs its serial, PCI, block and rng checks: all of them finish and exit 0.
- The same in one process: 20 VMs through `strato.vmm.runner.run` on 20 threads, with a disk
  (rate limited, so each has a timerfd), an rng, and serial and console files. Afterwards the
  process holds exactly the file descriptors and threads it held before, and strato left no
  files behind (its temporary directory is empty, /dev/shm unchanged).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from strato.vmm.stop import Stop
from tests.faults.guestrun import strato_args, strato_command
from tests.guest.harness import GuestOutput, RunResult, run_guest

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not os.path.exists("/dev/kvm"), reason="needs /dev/kvm"),
]

VMS = 20
CHECKS = "tests=serial,pci,blk,rng"
REQUIRED = ("serial", "pci", "blk-rw", "rng")


def make_disk(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return path


def test_twenty_strato_processes_at_once(guest_elf: Path, tmp_path: Path) -> None:
    results: list[RunResult | None] = [None] * VMS

    def one(i: int) -> None:
        disk = make_disk(tmp_path / f"disk{i}.raw")
        args = strato_args(guest_elf, CHECKS, disk=f"path={disk}", rng=True)
        results[i] = run_guest(strato_command(args), timeout=240)

    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(VMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    elapsed = time.monotonic() - start
    done = [r.seconds_to_done for r in results if r is not None and r.seconds_to_done]
    print(
        f"{VMS} VMs: all done in {elapsed:.1f} s; start to DONE {min(done):.1f}..{max(done):.1f} s"
    )
    for i, r in enumerate(results):
        assert r is not None, f"VM {i}: no result"
        assert r.returncode == 0, f"VM {i}: status {r.returncode}\n{r.stderr}"
        r.output.check(REQUIRED)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the fd of the listing itself, gone already
    return fds


def extra_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


def run_vms_in_process(guest_elf: Path, work: Path, count: int) -> list[tuple[Stop, str]]:
    """`count` VMs on `count` threads at once; (stop, serial output) of each."""
    from strato.cli.args import build_parser, config_from_args
    from strato.vmm.runner import run

    results: list[tuple[Stop, str] | None] = [None] * count
    errors: list[str] = []

    def one(i: int) -> None:
        serial = work / f"serial{i}.txt"
        disk = make_disk(work / f"disk{i}.raw")
        args = strato_args(
            guest_elf,
            CHECKS,
            disk=f"path={disk},ops_size=1000,ops_refill_time=100",
            rng=True,
            serial=f"file={serial}",
            extra=["--console", f"file={work / f'console{i}.txt'}"],
        )
        try:
            config = config_from_args(build_parser().parse_args(args))
            stop = run(replace(config, no_reboot=True), timeout=240)
            results[i] = (stop, serial.read_text(errors="replace"))
        except Exception as e:
            errors.append(f"VM {i}: {e!r}")

    threads = [threading.Thread(target=one, args=(i,), name=f"vm{i}") for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_vms_in_process_leave_no_fds_threads_or_files(
    guest_elf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    work = tmp_path / "work"
    work.mkdir()
    # The vCPU kick signal's handler can only be installed from the main thread, and a VM
    # run on another thread without it kills the process when it stops (see
    # tests/faults/test_embedding.py): install it here, as an embedding application must.
    from strato.vmm.vcpu import install_kick_handler

    assert install_kick_handler()
    # Warm up: imports, logging, caches.
    ((stop, serial),) = run_vms_in_process(guest_elf, work, 1)
    assert stop.exit_status == 0, (stop, serial)

    fds_before = open_fds()
    threads_before = set(threading.enumerate())
    shm_before = set(os.listdir("/dev/shm"))
    start = time.monotonic()
    results = run_vms_in_process(guest_elf, work, VMS)
    elapsed = time.monotonic() - start
    for i, (stop, serial) in enumerate(results):
        assert stop.exit_status == 0, f"VM {i}: {stop}\n{serial}"
        GuestOutput.parse(serial).check(REQUIRED)

    # Writer threads of the serial and console files finish as their sinks close.
    deadline = time.monotonic() + 10
    while extra_threads(threads_before) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling for threads to end
    leftover = extra_threads(threads_before)
    fds_after = open_fds()
    leaked_fds = {fd: target for fd, target in fds_after.items() if fd not in fds_before}
    print(
        f"{VMS} VMs in one process: {elapsed:.1f} s; fds {len(fds_before)} -> {len(fds_after)},"
        f" threads {len(threads_before)} -> {len(threads_before) + len(leftover)}"
    )
    assert not leftover, [t.name for t in leftover]
    assert not leaked_fds, leaked_fds
    assert set(os.listdir(private_tmp)) == set()
    assert set(os.listdir("/dev/shm")) - shm_before == set()
