"""The built-in guest under strato: every device check passes, the host sees what the guest did.

The main runs boot `guest/build/strato-guest.elf` with the `strato` command, as CI and users
run it: the serial port in a file, the virtio console on strato's standard input and output
(`--console tty`, pipes), a disk, rng, and as root a tap. The host answers the guest's READY
lines (frames on the tap for `net-rx`, a typed line for `console-rx`) and checks what the
guest did from outside: the disk file, the frames on the tap, the console output, the exit
status. The same machine also runs in-process (`strato.vmm.runner.run`, the embedding API),
on a pseudo-terminal, with a read-only disk, and with failures the guest must report.

`test_guest_qemu.py` runs the guest under QEMU, and `test_same_devices_under_qemu_for_comparison`
here runs the exact twin of a strato run: a check that passes there and fails here is strato's
bug. The time from start to the guest's DONE line of every run is printed in the session
summary and appended to `strato_vm.TIMINGS_FILE`.
"""

from __future__ import annotations

import enum
import itertools
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from strato.vmm.stop import EXIT_EMULATION_FAILURE, EXIT_GUEST_CRASH, EXIT_OK
from tests.guest.harness import (
    CONSOLE_INPUT,
    GuestOutput,
    HostResponder,
    Ready,
    ReadyHandler,
    RunResult,
    TestLine,
    check_blk_disk,
    parse_fields,
    run_guest,
)
from tests.guest.hostnet import (
    PacketCapture,
    TapDevice,
    can_make_taps,
    mac_bytes,
    udp_checksum_ok,
)
from tests.guest.qemu import ConsoleClient, QemuMachine, fast_firmware, kvm_usable, qemu_path
from tests.guest.strato_vm import (
    StratoMachine,
    record_timing,
    run_cli_with_console,
    run_in_process,
)

pytestmark = [
    pytest.mark.kvm,
    pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is not available"),
    pytest.mark.timeout(120),
]

# A serial the guest cannot have made up: blk-id must report exactly this.
DISK_SERIAL = "strato-ci-disk7"
DISK_SIZE = 1 << 20
# The guest fails by a triple fault after DONE. Where KVM is nested on PVM (the CI machines)
# that surfaces as KVM_EXIT_INTERNAL_ERROR, which strato reports as an emulation failure (4);
# with hardware virtualization it is a triple fault (3). Both are "the guest crashed".
CRASH_STATUSES = (EXIT_GUEST_CRASH, EXIT_EMULATION_FAILURE)
# The host answers READY lines (host=1 runs console-rx and net-rx without naming them); a
# missing answer must not cost the default 20 s per READY line.
HOST_TIMEOUT = "host=1 host-timeout=5000"
# The 8 frames of the guest's net-tx check (guest/net.c).
TX_SIZES = [60, 128, 1514, 64, 300, 1000, 61, 1514]
_tap_ids = itertools.count()


def mq_answer_frames(ready: Ready) -> list[bytes]:
    """The host's answers to `READY net-mq mac= pairs= frames= sport= dport=`: for each pair k,
    `frames` IPv4/UDP frames on the reverse of the flow pair k sent (192.0.2.2:dport+k ->
    192.0.2.1:sport+k), text `STRATO-NET-MQ-RX pair=<k> seq=<n> ` (guest/net.c)."""
    f = ready.fields
    out = []
    for seq in range(int(f["frames"])):
        for k in range(int(f["pairs"])):
            text = f"STRATO-NET-MQ-RX pair={k} seq={seq} ".encode()
            udp = struct.pack("!HHHH", int(f["dport"]) + k, int(f["sport"]) + k, 8 + len(text), 0)
            ip = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(text), 0, 0, 64, 17, 0,
                bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1]),
            )  # fmt: skip
            eth = mac_bytes(f["mac"]) + bytes.fromhex("020000000001") + b"\x08\x00"
            frame = eth + ip + udp + text
            out.append(frame + bytes(max(0, 60 - len(frame))))
    return out


class Mode(enum.Enum):
    CLI_CONSOLE = "strato"  # the command, serial to a file, console on stdin/stdout pipes
    TERMINAL = "strato (terminal)"  # the same with a pseudo-terminal as stdin and stdout
    CLI = "strato (serial on stdout)"  # the command, console to a file
    IN_PROCESS = "strato (in-process)"  # strato.vmm.runner.run, input via enqueue_input


@dataclass
class Run:
    result: RunResult
    out: GuestOutput
    disk: Path
    disk_before: bytes
    console: bytes
    capture: PacketCapture | None
    rx_sent: int

    def console_text(self) -> str:
        return self.console.decode("utf-8", "replace")


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="sts") as d:
        yield Path(d)


def make_disk(path: Path) -> bytes:
    """A disk whose every byte is known (not zeros: a stray write of zeros must show)."""
    data = bytes((i * 7 + (i >> 9)) & 0xFF for i in range(DISK_SIZE))
    path.write_bytes(data)
    return data


def boot(
    request: pytest.FixtureRequest,
    machine: StratoMachine,
    workdir: Path,
    mode: Mode,
    *,
    net: bool = False,
    timeout: float = 60.0,
) -> Run:
    """Boot `machine` with a disk (and a tap), answer its READY lines, return the run."""
    machine.disk = workdir / "disk.raw"
    machine.disk_serial = DISK_SERIAL
    disk_before = make_disk(machine.disk)
    console_file = workdir / "console.out"
    if mode is Mode.CLI:
        machine.console_file = console_file
    elif mode in (Mode.CLI_CONSOLE, Mode.TERMINAL):
        machine.console_tty = True
        machine.serial_file = workdir / "serial.out"
    with ExitStack() as stack:
        capture = None
        if net:
            tap = stack.enter_context(TapDevice(f"sts{os.getpid() % 100000}n{next(_tap_ids)}"))
            machine.tap = tap.name
            capture = PacketCapture(tap.name).start()
            stack.callback(capture.stop)
        send = capture.send if capture is not None else None
        console = b""
        if mode is Mode.IN_PROCESS:
            responders: list[HostResponder] = []

            def handlers(vm: object) -> Mapping[str, ReadyHandler]:
                device = vm.device_manager.console  # type: ignore[attr-defined]
                write: Callable[[bytes], None] | None = None
                if device is not None:

                    def write(data: bytes) -> None:
                        taken = device.enqueue_input(data)
                        assert taken == len(data), f"console took {taken} of {len(data)} bytes"

                responders.append(HostResponder(send_frame=send, console_write=write))
                return responders[0].handlers()

            machine.console_file = console_file
            ip = run_in_process(machine, timeout, handlers)
            assert not ip.handler_errors, ip.handler_errors
            result = ip.run
            rx_sent = responders[0].rx_frames_sent if responders else 0
        elif mode is Mode.CLI:
            responder = HostResponder(send_frame=send)
            result = run_guest(machine.command(), timeout=timeout, on_ready=responder.handlers())
            rx_sent = responder.rx_frames_sent
        else:
            typed: list[Callable[[bytes], None]] = []
            responder = HostResponder(send_frame=send, console_write=lambda d: typed[0](d))
            cr = run_cli_with_console(
                machine, timeout, responder.handlers(), typed, terminal=mode is Mode.TERMINAL
            )
            result, console, rx_sent = cr.run, cr.console, responder.rx_frames_sent
        if machine.console_file is not None and machine.console_file.exists():
            console = machine.console_file.read_bytes()
        record_timing(request.node.name, mode.value, result)
        return Run(result, result.output, machine.disk, disk_before, console, capture, rx_sent)


def check_net(run: Run) -> None:
    """What the host saw of the guest's network checks, and what the guest saw of ours."""
    assert run.capture is not None
    sent = run.capture.test_frames("TX")
    assert sorted(len(f) for f in sent) == sorted(TX_SIZES), (
        f"host saw {len(sent)} of the guest's 8 frames: sizes {sorted(len(f) for f in sent)}"
    )
    csum = run.capture.csum_frames()
    assert len(csum) == 1, f"{len(csum)} checksum frames on the tap"
    assert udp_checksum_ok(csum[0].frame, csum[0].csum_not_ready), csum[0]
    assert run.out.result("net-csum").fields["offload"] == "1", "CSUM was not negotiated"
    assert run.rx_sent == 4
    assert run.out.result("net-rx").fields["frames"] == str(run.rx_sent)


def check_disk_and_console(run: Run) -> None:
    out = run.out
    assert out.result("blk-id").fields["serial"] == DISK_SERIAL
    # The writes reached the file, with the data the guest says it wrote ...
    blk_rw = out.result("blk-rw")
    assert check_blk_disk(run.disk, blk_rw) == []
    # ... and nothing else changed.
    written = {
        s
        for extent in blk_rw.fields["written"].split(",")
        for first, count in [map(int, extent.split(":"))]
        for s in range(first, first + count)
    }
    after = run.disk.read_bytes()
    assert len(after) == DISK_SIZE
    untouched = [
        s
        for s in range(DISK_SIZE // 512)
        if s not in written
        and after[s * 512 : (s + 1) * 512] != run.disk_before[s * 512 : (s + 1) * 512]
    ]
    assert untouched == [], f"sectors changed that the guest did not write: {untouched[:10]}"
    assert "STRATO-CONSOLE-TX hello from strato-guest\n" in run.console_text()
    assert out.result("console-rx").fields["got"] == CONSOLE_INPUT


def irq_counts(line: TestLine) -> dict[str, tuple[int, int]]:
    """The irq check's `counts=queue=vector:irqs/completions,...` as {queue: (irqs, done)}."""
    counts: dict[str, tuple[int, int]] = {}
    for item in line.fields["counts"].split(","):
        queue, _, rest = item.partition("=")
        irqs, _, completions = rest.partition(":")[2].partition("/")
        counts[queue] = (int(irqs), int(completions))
    return counts


DEVICE_CHECKS = ["serial", "pci", "blk-id", "blk-rw", "blk-flush", "blk-eod", "rng", "console-tx"]
NET_CHECKS = ["net-tx", "net-csum", "net-rx"]


# ---- 1 and 2: every device, through the command -----------------------------------------------
def required_checks(*, irq: str, cpus: int, net: bool) -> list[str]:
    required = [*DEVICE_CHECKS, "console-rx"]
    required += ["irq"] if irq == "msix" else []
    required += ["smp"] if cpus > 1 else []
    return required + (NET_CHECKS if net else [])


def check_every_device(run: Run, *, irq: str, cpus: int, net: bool) -> None:
    out = run.out
    out.check(required_checks(irq=irq, cpus=cpus, net=net))
    # All passed: the guest resets through the i8042, which --no-reboot turns into exit 0.
    assert run.result.returncode == EXIT_OK, (run.result.returncode, run.result.stderr)
    boot_line = next(line for line in out.lines if line.startswith("BOOT "))
    assert parse_fields(boot_line)["irq"] == irq
    check_disk_and_console(run)
    if irq == "msix":
        irq_line = out.result("irq")
        counts = irq_counts(irq_line)
        for queue in ("blk.q0", "rng.q0", "console.q0", "console.q1"):
            assert queue in counts, irq_line
        # The receive queue raised its own vector for the line the host typed.
        assert counts["console.q0"][0] >= 1, irq_line
        if net:
            assert "net.q0" in counts and "net.q1" in counts, irq_line
        assert "mask=ok" in irq_line.detail
        assert out.result("rng").fields["vector"] != "0x0"
    else:
        assert out.named("irq") == [], "irq=poll must not run the MSI-X check"
        for name in ("rng", "console-tx", "console-rx"):
            assert out.result(name).fields["vector"] == "0x0", out.result(name)
    if cpus > 1:
        smp = out.result("smp")
        assert (smp.fields["cpus"], smp.fields["apic_ids"]) == ("2", "0,1")
        assert smp.fields["source"] == "madt"  # strato's ACPI MADT lists both vCPUs
    if net:
        check_net(run)


@pytest.mark.parametrize(
    ("cpus", "irq"),
    [(1, "msix"), (2, "msix"), (2, "poll")],
    ids=["1cpu-msix", "2cpus-msix", "2cpus-poll"],
)
def test_every_device_passes_under_the_strato_command(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path, cpus: int, irq: str
) -> None:
    """No tests=: the guest runs every check whose device is there; the host types the
    console line into strato's standard input (`--console tty`)."""
    net = can_make_taps()
    machine = StratoMachine(guest_elf, f"irq={irq} {HOST_TIMEOUT}", cpus=cpus)
    run = boot(request, machine, workdir, Mode.CLI_CONSOLE, net=net)
    check_every_device(run, irq=irq, cpus=cpus, net=net)
    if not net:
        pytest.skip("net checks need root and /dev/net/tun; every other device passed")


def test_every_check_passes_in_process(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    """The embedding API: `runner.run(on_started=...)`, console input by `enqueue_input`."""
    net = can_make_taps()
    machine = StratoMachine(guest_elf, HOST_TIMEOUT, cpus=2)
    run = boot(request, machine, workdir, Mode.IN_PROCESS, net=net)
    check_every_device(run, irq="msix", cpus=2, net=net)


def test_the_console_on_a_terminal(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    """`--console tty` on a real (pseudo-)terminal: strato puts it in raw mode and forwards it."""
    machine = StratoMachine(guest_elf, f"tests=console {HOST_TIMEOUT}", rng=False)
    run = boot(request, machine, workdir, Mode.TERMINAL)
    run.out.check(["console-tx", "console-rx"])
    assert run.result.returncode == EXIT_OK, run.result.stderr
    assert b"STRATO-CONSOLE-TX hello from strato-guest\n" in run.console
    assert run.out.result("console-rx").fields["got"] == CONSOLE_INPUT


# ---- 2: read-only disk --------------------------------------------------------------------------
def test_read_only_disk_refuses_writes_and_the_file_is_unchanged(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    machine = StratoMachine(guest_elf, HOST_TIMEOUT, disk_readonly=True)
    run = boot(request, machine, workdir, Mode.CLI_CONSOLE)
    run.out.check(["blk-id", "blk-rw", "blk-ro", "blk-eod", "blk-flush", "rng", "console-rx"])
    assert run.result.returncode == EXIT_OK, run.result.stderr
    info = [line for line in run.out.lines if line.startswith("INFO blk")]
    assert len(info) == 1 and parse_fields(info[0])["ro"] == "1", info
    assert run.out.result("blk-ro").fields["write-status"] == "IOERR"
    assert run.out.result("blk-rw").fields.get("ro") == "1"
    assert run.out.result("blk-id").fields["serial"] == DISK_SERIAL
    assert run.disk.read_bytes() == run.disk_before, "a read-only disk changed"


# ---- 3: a failure found by the guest fails the run, with the guest's detail ---------------------
def crashed(run: Run) -> None:
    """The guest's failure path: DONE with failures, then a crash strato reports once."""
    assert run.result.returncode in CRASH_STATUSES, (run.result.returncode, run.result.stderr)
    stops = [line for line in run.result.stderr.splitlines() if "VM stopped" in line]
    assert len(stops) == 1, run.result.stderr
    assert "ERROR" in stops[0]


def test_a_failing_check_fails_the_run_with_the_guests_detail(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    # blk-id's device is there (passes); net's is not (skipped); nobody types the console line
    # (fails).
    cmdline = "tests=serial,blk-id,net,console-rx host-timeout=1000"
    machine = StratoMachine(guest_elf, cmdline, rng=False)
    run = boot(request, machine, workdir, Mode.CLI)
    (failed,) = run.out.failures()
    assert failed.name == "console-rx" and 'got=""' in failed.detail
    (skipped,) = run.out.skipped
    assert skipped.name == "net" and "no virtio-net device" in skipped.detail
    assert run.out.result("blk-id").passed
    done = run.out.done
    assert done is not None and (done.passed, done.failed, done.skipped) == (2, 1, 1)
    crashed(run)
    # The harness turns it into a test failure that quotes the guest's line.
    with pytest.raises(AssertionError, match=r"TEST console-rx FAIL .*got=\"\""):
        run.out.check()


@pytest.mark.parametrize(("fault", "vector"), [("ud", "6"), ("pf", "14")])
def test_a_cpu_exception_stops_the_vm_with_the_guests_report(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path, fault: str, vector: str
) -> None:
    machine = StratoMachine(guest_elf, f"fault={fault}", rng=False)
    run = boot(request, machine, workdir, Mode.CLI)
    # The exception line, then a line of registers.
    assert [f.message.split()[0] for f in run.out.fatal] == ["exception", "regs"], run.out.text()
    fields = parse_fields(run.out.fatal[0].message)
    assert fields["vector"] == vector
    assert int(fields["rip"], 16) >= 0x100000  # in the guest image
    if fault == "pf":
        assert fields["cr2"] == "0x8000000000"
    assert run.out.done is not None and run.out.done.failed == 1
    assert run.out.tests == []  # the fault comes before the first check
    crashed(run)
    with pytest.raises(AssertionError, match=rf"FATAL exception vector={vector} "):
        run.out.check()


# ---- the same run under QEMU, for the time comparison -------------------------------------------
@pytest.mark.qemu
@pytest.mark.skipif(qemu_path() is None, reason="qemu-system-x86_64 is not installed")
def test_same_devices_under_qemu_for_comparison(
    request: pytest.FixtureRequest, guest_elf: Path, workdir: Path
) -> None:
    """test_every_device_passes_under_the_strato_command[2cpus-msix] under QEMU (q35, the
    fastest firmware installed): the same guest, command line, devices and host answers.
    It checks that the run passes there too; its start-to-DONE time is recorded next to
    strato's."""
    net = can_make_taps()
    disk = workdir / "disk.raw"
    make_disk(disk)
    machine = QemuMachine(
        kernel=guest_elf,
        append=HOST_TIMEOUT,
        firmware=fast_firmware(),
        cpus=2,
        disk=disk,
        disk_serial=DISK_SERIAL,
        console_socket=workdir / "con.sock",
    )
    with ExitStack() as stack:
        capture = None
        if net:
            tap = stack.enter_context(TapDevice(f"stq{os.getpid() % 100000}n{next(_tap_ids)}"))
            machine.tap = tap.name
            capture = PacketCapture(tap.name).start()
            stack.callback(capture.stop)
        client = ConsoleClient(workdir / "con.sock")
        stack.callback(client.close)
        responder = HostResponder(
            send_frame=capture.send if capture is not None else None, console_write=client.write
        )
        result = run_guest(
            machine.command(),
            timeout=90.0,
            on_ready=responder.handlers(),
            after_start=client.connect,
        )
    record_timing(request.node.name, f"qemu {machine.firmware}", result)
    result.output.check(required_checks(irq="msix", cpus=2, net=net))
    assert result.returncode == 0, result.stderr
    assert check_blk_disk(disk, result.output.result("blk-rw")) == []
    assert result.output.result("console-rx").fields["got"] == CONSOLE_INPUT


# ---- multiqueue NIC: net-mq under strato and under QEMU -----------------------------------------
MQ_MAC = "52:54:00:12:34:5a"
MQ_PAIRS = 4


@contextmanager
def multiqueue_tap(prefix: str) -> Iterator[str]:
    """A tap made with multi_queue (no IP address, IPv6 off), deleted afterwards."""
    name = f"{prefix}{os.getpid() % 100000}n{next(_tap_ids)}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap", "multi_queue"], check=True)
    try:
        with open(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6", "w") as f:
            f.write("1")
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)


def mq_command(vmm: str, guest_elf: Path, tap: str) -> list[str]:
    cmdline = "tests=net-tx,net-mq,irq host-timeout=5000"
    if vmm == "strato":
        machine = StratoMachine(guest_elf, cmdline, rng=False, memory_mib=128)
        machine.extra = ["--net", f"tap={tap},mac={MQ_MAC},num_queues={2 * MQ_PAIRS}"]
        return machine.command()
    vectors = 2 * MQ_PAIRS + 2  # a vector per queue, the control queue and config changes
    qemu = QemuMachine(kernel=guest_elf, append=cmdline, firmware=fast_firmware(), rng=False)
    qemu.extra = [
        "-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no,queues={MQ_PAIRS}",
        "-device", f"virtio-net-pci,disable-legacy=on,netdev=net0,mac={MQ_MAC},mq=on,"
        f"vectors={vectors}",
    ]  # fmt: skip
    return qemu.command()


@pytest.mark.root
@pytest.mark.skipif(not can_make_taps(), reason="needs root and /dev/net/tun for a tap")
@pytest.mark.parametrize("vmm", ["strato", pytest.param("qemu", marks=pytest.mark.qemu)])
def test_multiqueue_nic_carries_frames_on_every_pair(
    request: pytest.FixtureRequest, guest_elf: Path, vmm: str
) -> None:
    """A NIC with 4 queue pairs: the guest sets them through the control queue (out-of-range
    counts refused), sends on each pair and receives the host's answers to each pair's flow
    on that pair; QEMU's multiqueue virtio-net runs the same check as the reference."""
    if vmm == "qemu" and qemu_path() is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    with ExitStack() as stack:
        tap = stack.enter_context(multiqueue_tap("stmq"))
        capture = PacketCapture(tap).start()
        stack.callback(capture.stop)
        answered: list[int] = []

        def answer(ready: Ready) -> None:
            frames = mq_answer_frames(ready)
            for f in frames:
                capture.send(f)
            answered.append(len(frames))

        result = run_guest(
            mq_command(vmm, guest_elf, tap), timeout=90.0, on_ready={"net-mq": answer}
        )
        record_timing(request.node.name, vmm, result)
        out = result.output
        out.check(["net-tx", "net-mq", "irq"])
        assert result.returncode == 0, result.stderr
        (info,) = [line for line in out.lines if line.startswith("INFO net ")]
        assert parse_fields(info)["pairs"] == str(MQ_PAIRS), info
        assert parse_fields(info)["queues"] == str(2 * MQ_PAIRS + 1), info
        mq = out.result("net-mq")
        assert mq.fields["tx"] == ",".join(["2"] * MQ_PAIRS), mq
        assert mq.fields["rx"] == ",".join(["2"] * MQ_PAIRS), mq
        assert mq.fields["wrong_pair"] == "0" and answered == [2 * MQ_PAIRS], mq
        for pair in range(MQ_PAIRS):
            sent = [c for c in capture.snapshot() if b"STRATO-NET-MQ pair=%d " % pair in c.frame]
            assert len(sent) == 2, f"pair {pair}: {len(sent)} of its 2 frames on the tap"
        # Every queue that carried frames raised its own vector.
        counts = irq_counts(out.result("irq"))
        for q in range(2 * MQ_PAIRS):
            assert counts.get(f"net.q{q}", (0, 0))[1] >= 1, (q, counts)
        print(f"{vmm}: {mq}")
