"""The built-in guest under QEMU: every device check passes, the host sees what the guest sent.

These runs are the reference for the same guest under strato: QEMU's virtio-*-pci devices
with disable-legacy=on follow the virtio spec, so a failure here is the guest's fault.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.guest.conftest import TIMINGS
from tests.guest.harness import (
    CONSOLE_INPUT,
    RX_BENCH_FRAMES,
    GuestOutput,
    HostResponder,
    RunResult,
    check_blk_disk,
    parse_fields,
    run_guest,
)
from tests.guest.hostnet import (
    PacketCapture,
    TapDevice,
    can_make_taps,
    udp_checksum_ok,
)
from tests.guest.qemu import ConsoleClient, QemuMachine, fast_firmware, kvm_usable, qemu_path

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(qemu_path() is None, reason="qemu-system-x86_64 is not installed"),
    pytest.mark.timeout(180),
]

ACCEL = "kvm" if kvm_usable() else "tcg"
# SeaBIOS runs emulated on the development machines (seconds); qboot boots in a blink but
# leaves BAR assignment to the guest. The main run uses both; the others use the fast one.
FIRMWARE = fast_firmware()
DISK_SERIAL = "strato-disk0"
_tap_ids = itertools.count()


@dataclass
class Run:
    result: RunResult
    out: GuestOutput
    disk: Path
    capture: PacketCapture | None
    console: ConsoleClient | None
    rx_sent: int


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short: unix socket paths must fit in 108 bytes.
    with tempfile.TemporaryDirectory(prefix="stg") as d:
        yield Path(d)


def boot(
    request: pytest.FixtureRequest,
    elf: Path,
    workdir: Path,
    append: str,
    *,
    accel: str = ACCEL,
    firmware: str = FIRMWARE,
    cpu: str = "qemu64",
    cpus: int = 1,
    readonly: bool = False,
    net: bool = True,
    console: bool = True,
    rng: bool = True,
    disk: bool = True,
    timeout: float = 90.0,
    answer: bool = True,
) -> Run:
    """Boot the guest with the devices asked for, answer its READY lines (unless not
    `answer`; `host=1` tells the guest that someone does), return the run."""
    disk_path = workdir / "disk.raw"
    disk_path.write_bytes(bytes(1 << 20))
    machine = QemuMachine(
        kernel=elf,
        append=f"host=1 {append}".strip() if answer else append,
        accel=accel,
        firmware=firmware,
        cpu=cpu,
        cpus=cpus,
        disk=disk_path if disk else None,
        disk_serial=DISK_SERIAL,
        disk_readonly=readonly,
        rng=rng,
        console_socket=workdir / "con.sock" if console else None,
    )
    with ExitStack() as stack:
        capture = None
        if net and can_make_taps():
            tap = stack.enter_context(TapDevice(f"stg{os.getpid() % 100000}n{next(_tap_ids)}"))
            machine.tap = tap.name
            capture = PacketCapture(tap.name).start()
            stack.callback(capture.stop)
        client = ConsoleClient(workdir / "con.sock") if console else None
        responder = HostResponder(
            send_frame=capture.send if capture is not None else None,
            console_write=client.write if client is not None else None,
        )
        if client is not None:
            # QEMU creates the socket at start-up; connect as soon as it is there.
            stack.callback(client.close)
        argv = machine.command()
        result = run_guest(
            argv,
            timeout=timeout,
            on_ready=responder.handlers() if answer else {},
            after_start=client.connect if client is not None else None,
        )
        label = f"{accel}/{firmware}"
        TIMINGS.append((request.node.name, label, result.seconds_to_done or float("nan")))
        return Run(result, result.output, disk_path, capture, client, responder.rx_frames_sent)


def main_variants() -> list[tuple[str, str, str]]:
    """(accelerator, firmware, extra command line) for the all-devices run."""
    accels = ["kvm", "tcg"] if kvm_usable() else ["tcg"]
    variants = [(accels[0], "seabios", "")]
    if fast_firmware() == "qboot":
        # 64-bit BARs moved to 1 TiB, where strato puts them: exercises the high mapping.
        variants.append((accels[0], "qboot", "bar64=1T"))
    if len(accels) > 1:
        variants.append(("tcg", "seabios", ""))
    return variants


@pytest.mark.parametrize(
    ("accel", "firmware", "append"),
    main_variants(),
    ids=lambda v: v or "default",
)
def test_all_devices_pass(
    request: pytest.FixtureRequest,
    guest_elf: Path,
    workdir: Path,
    accel: str,
    firmware: str,
    append: str,
) -> None:
    net = can_make_taps()
    # 1 TiB needs more than qemu64's 40 physical address bits.
    cpu = "qemu64,phys-bits=42" if "bar64" in append else "qemu64"
    run = boot(
        request, guest_elf, workdir, append, accel=accel, firmware=firmware, cpu=cpu, net=net
    )
    out = run.out
    required = ["serial", "pci", "blk-id", "blk-rw", "blk-flush", "blk-eod", "rng", "irq"]
    required += ["console-tx", "console-rx"]
    if net:
        required += ["net-tx", "net-csum", "net-rx"]
    out.check(required)
    assert run.result.returncode == 0, f"QEMU exit status {run.result.returncode}"
    assert out.result("blk-id").fields["serial"] == DISK_SERIAL
    # The writes reached the disk file, with the data the guest says it wrote.
    assert check_blk_disk(run.disk, out.result("blk-rw")) == []
    assert run.console is not None
    assert "STRATO-CONSOLE-TX hello from strato-guest" in run.console.text()
    assert out.result("console-rx").fields["got"] == CONSOLE_INPUT
    # Every queue that completed work raised its own MSI-X vector (checked in the guest).
    irq = out.result("irq").detail
    for queue in ("blk.q0", "rng.q0", "console.q0", "console.q1"):
        assert queue in irq
    assert "mask=ok" in irq
    if "bar64" in append:
        assert "mem64@0x10000000000/" in out.text(), "64-bit BARs were not moved to 1 TiB"
    if net:
        assert run.capture is not None
        sent = run.capture.test_frames("TX")
        assert len(sent) == 8, f"host saw {len(sent)} of the guest's 8 frames"
        assert sorted(len(f) for f in sent) == sorted([60, 128, 1514, 64, 300, 1000, 61, 1514])
        csum = run.capture.csum_frames()
        assert len(csum) == 1
        assert udp_checksum_ok(csum[0].frame, csum[0].csum_not_ready)
        assert out.result("net-csum").fields["offload"] == "1"
        assert out.result("net-rx").fields["frames"] == str(run.rx_sent)
    else:
        pytest.skip("net checks need root and /dev/net/tun; the other devices passed")


def test_read_only_disk_refuses_writes(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    run = boot(
        request, guest_elf, workdir, "tests=blk", readonly=True, net=False, console=False, rng=False
    )
    run.out.check(["blk-id", "blk-rw", "blk-ro", "blk-eod"])
    assert run.out.result("blk-ro").fields["write-status"] == "IOERR"
    assert run.out.result("blk-rw").fields.get("ro") == "1"
    assert run.disk.read_bytes() == bytes(1 << 20), "a read-only disk changed"


def test_polling_mode(request: pytest.FixtureRequest, guest_elf: Path, workdir: Path) -> None:
    net = can_make_taps()
    run = boot(request, guest_elf, workdir, "irq=poll", net=net)
    required = ["serial", "pci", "blk-rw", "rng", "console-tx", "console-rx"]
    run.out.check(required + (["net-tx", "net-rx"] if net else []))
    assert run.out.named("irq") == [], "irq=poll must not run the MSI-X check"
    assert run.out.result("rng").fields["vector"] == "0x0"
    assert run.out.result("console-tx").fields["vector"] == "0x0"


@pytest.mark.parametrize(("append", "source"), [("", "madt"), ("cpus=2", "cmdline")])
def test_two_vcpus(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path, append: str, source: str
) -> None:
    run = boot(
        request,
        guest_elf,
        workdir,
        f"tests=smp,serial {append}",
        cpus=2,
        net=False,
        console=False,
    )
    run.out.check(["smp", "serial"])
    smp = run.out.result("smp")
    assert smp.fields["cpus"] == "2"
    assert smp.fields["apic_ids"] == "0,1"
    assert smp.fields["source"] == source


def test_failure_exits_through_isa_debug_exit(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    # A console line nobody types fails the run on purpose; a missing device is only skipped.
    append = "tests=serial,net,console-rx host-timeout=500"
    run = boot(request, guest_elf, workdir, append, net=False, answer=False)
    (failed,) = run.out.failures()
    assert failed.name == "console-rx" and 'got=""' in failed.detail
    (skipped,) = run.out.skipped
    assert skipped.name == "net" and "no virtio-net device" in skipped.detail
    assert run.out.done is not None and (run.out.done.failed, run.out.done.skipped) == (1, 1)
    assert run.result.returncode == 3  # isa-debug-exit: (1 << 1) | 1


@pytest.mark.parametrize(("fault", "vector"), [("pf", "14"), ("ud", "6")])
def test_exception_is_reported_and_stops_the_vm(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path, fault: str, vector: str
) -> None:
    run = boot(request, guest_elf, workdir, f"fault={fault}", net=False, console=False)
    assert run.out.fatal, run.out.text()
    fields = parse_fields(run.out.fatal[0].message)
    assert fields["vector"] == vector
    assert int(fields["rip"], 16) >= 0x100000  # in the guest image
    if fault == "pf":
        assert fields["cr2"] == "0x8000000000"
    assert run.out.done is not None and run.out.done.failed == 1
    assert run.result.returncode == 5  # isa-debug-exit: (2 << 1) | 1


def test_benchmarks_run_and_report(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    net = can_make_taps()
    benches = "bench=blk-randread,qd=16,bs=4k,ops=400 bench=blk-seqwrite,bs=64k,qd=4,ops=40"
    if net:
        benches += " bench=net-tx,size=64,ops=500 bench=net-rx"
    run = boot(request, guest_elf, workdir, benches, net=net, console=False)
    run.out.check()
    by_name = {b.name: b for b in run.out.benches}
    assert by_name["blk-randread"].ops == 400
    assert by_name["blk-randread"].bytes == 400 * 4096
    assert by_name["blk-seqwrite"].ops == 40
    assert by_name["blk-seqwrite"].bytes == 40 * 65536
    for b in run.out.benches:
        assert b.seconds > 0
    if net:
        assert by_name["net-tx"].ops == 500
        assert run.capture is not None
        assert len(run.capture.test_frames("BENCH")) == 500
        assert by_name["net-rx"].ops == RX_BENCH_FRAMES


def test_power_is_skipped_without_a_ged_and_end_poweroff_uses_the_fadt(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    """q35 has no ACPI GED: `tests=power` is a SKIP line, not a failure. `end=poweroff` finds
    q35's PM1a control block in the FADT and SLP_TYP in its \\_S5: QEMU powers off (exit 0)
    without the guest falling back to a reset (which prints WARN ... resetting instead)."""
    append = "tests=serial,power end=poweroff"
    run = boot(request, guest_elf, workdir, append, net=False, console=False, answer=False)
    run.out.check(["serial"])
    (skip,) = run.out.skipped
    assert skip.name == "power" and "ACPI0013" in skip.detail
    assert run.result.returncode == 0, run.result.stderr
    assert not [line for line in run.out.lines if "resetting instead" in line], run.out.text()
