"""`handle_exit` on every kind of exit, with real buses: what each exit does and which Stop
(reason, message, vCPU) ends the VM. Written against the mutants the older tests let live."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from strato._sys.ratelog import RateLimitedLog
from strato.bus import Bus
from strato.kvm import exits as x
from strato.kvm import ioctls as k
from strato.vmm import exit_handler
from strato.vmm.exit_handler import handle_exit
from strato.vmm.stop import EXIT_GUEST_CRASH, EXIT_OK, Stop, StopReason


class Vcpu:
    """The vCPU side of an exit: where handle_exit puts the data a read returns."""

    def __init__(self, id: int = 3) -> None:
        self.id = id
        self.io_in: list[tuple[int, bytes]] = []
        self.mmio_read: list[bytes] = []

    def set_io_in_data(self, offset: int, data: bytes) -> None:
        self.io_in.append((offset, data))

    def set_mmio_read_data(self, data: bytes) -> None:
        self.mmio_read.append(data)


class Register:
    """A device that records writes and answers reads with a counter pattern."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes((offset + i + 0x10) & 0xFF for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


Buses = tuple[Bus, Bus, Register, Register]


@pytest.fixture
def buses() -> Buses:
    pio, mmio = Bus("pio"), Bus("mmio")
    port_dev, mmio_dev = Register(), Register()
    pio.insert(port_dev, 0x3F8, 8)
    mmio.insert(mmio_dev, 0xD000_0000, 0x1000)
    return pio, mmio, port_dev, mmio_dev


@pytest.fixture
def unknown_io_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A fresh limiter: the module's one may have spent its burst in an earlier test.
    monkeypatch.setattr(exit_handler, "_unknown_io", RateLimitedLog(exit_handler.log, 100, 60.0))
    yield


def run(exit: x.VcpuExit, buses: Buses, vcpu: Vcpu) -> Stop | None:
    pio, mmio, _, _ = buses
    return handle_exit(exit, vcpu, pio, mmio)


# -- exits that end the VM --------------------------------------------------------------------
def test_cpu_shutdown_is_a_triple_fault_crash_not_a_power_off(buses: Buses) -> None:
    stop = run(x.Shutdown(), buses, Vcpu(2))
    assert stop == Stop(StopReason.TRIPLE_FAULT, "the guest triple-faulted (CPU shutdown)", 2)
    assert stop.is_crash and stop.exit_status == EXIT_GUEST_CRASH


@pytest.mark.parametrize(
    ("event", "reason", "message"),
    [
        (k.KVM_SYSTEM_EVENT_SHUTDOWN, StopReason.POWEROFF, "the guest powered off"),
        (k.KVM_SYSTEM_EVENT_RESET, StopReason.RESET, "the guest asked for a reset"),
        (k.KVM_SYSTEM_EVENT_CRASH, StopReason.GUEST_PANIC, "the guest reported a crash"),
        (7, StopReason.INTERNAL_ERROR, "unknown system event 7"),
        (0, StopReason.INTERNAL_ERROR, "unknown system event 0"),
    ],
)
def test_system_events_map_to_their_stop(
    buses: Buses, event: int, reason: StopReason, message: str
) -> None:
    assert run(x.SystemEvent(event, 0), buses, Vcpu(1)) == Stop(reason, message, 1)


def test_only_the_power_off_event_exits_0() -> None:
    assert Stop(StopReason.POWEROFF, "").exit_status == EXIT_OK
    assert Stop(StopReason.TRIPLE_FAULT, "").exit_status == EXIT_GUEST_CRASH


@pytest.mark.parametrize(
    ("suberror", "reason", "what"),
    [
        (k.KVM_INTERNAL_ERROR_EMULATION, StopReason.EMULATION_FAILURE, "emulation failure"),
        (
            k.KVM_INTERNAL_ERROR_SIMUL_EX,
            StopReason.TRIPLE_FAULT,
            "exception while delivering an exception",
        ),
        (k.KVM_INTERNAL_ERROR_DELIVERY_EV, StopReason.TRIPLE_FAULT, "event delivery failure"),
        (4, StopReason.INTERNAL_ERROR, "suberror 4"),
    ],
)
def test_internal_errors_map_to_their_stop(
    buses: Buses, suberror: int, reason: StopReason, what: str
) -> None:
    stop = run(x.InternalError(suberror, (0x1,)), buses, Vcpu(0))
    assert stop == Stop(reason, f"KVM internal error: {what} data 0x1", 0)


def test_failed_entry_names_the_hardware_reason_and_cpu(buses: Buses) -> None:
    stop = run(x.FailEntry(0x80000021, 5), buses, Vcpu(4))
    assert stop == Stop(
        StopReason.INTERNAL_ERROR, "VM entry failed: hardware reason 0x80000021 on cpu 5", 4
    )


def test_an_unknown_exit_reason_is_an_internal_error(buses: Buses) -> None:
    stop = run(x.Unknown(99), buses, Vcpu(6))
    assert stop == Stop(StopReason.INTERNAL_ERROR, "unexpected KVM exit reason 99", 6)


@pytest.mark.parametrize("exit", [x.Hlt(), x.Interrupted()])
def test_hlt_and_interrupted_keep_running_and_touch_nothing(buses: Buses, exit: object) -> None:
    vcpu = Vcpu()
    assert run(exit, buses, vcpu) is None  # type: ignore[arg-type]
    _, _, port_dev, mmio_dev = buses
    assert (vcpu.io_in, vcpu.mmio_read, port_dev.writes, mmio_dev.writes) == ([], [], [], [])


# -- port I/O -------------------------------------------------------------------------------
def test_port_write_reaches_the_device_at_its_offset(buses: Buses) -> None:
    _, _, port_dev, _ = buses
    assert run(x.IoOut(0x3FB, b"\x83", 1), buses, Vcpu()) is None
    assert port_dev.writes == [(3, b"\x83")]


def test_word_port_write_is_one_write(buses: Buses) -> None:
    _, _, port_dev, _ = buses
    assert run(x.IoOut(0x3F8, b"\x01\x02", 2), buses, Vcpu()) is None
    assert port_dev.writes == [(0, b"\x01\x02")]


def test_string_port_write_is_one_write_per_element(buses: Buses) -> None:
    _, _, port_dev, _ = buses
    assert run(x.IoOut(0x3F8, b"abcd", 1), buses, Vcpu()) is None
    assert port_dev.writes == [(0, b"a"), (0, b"b"), (0, b"c"), (0, b"d")]
    port_dev.writes.clear()
    assert run(x.IoOut(0x3F9, b"abcdef", 2), buses, Vcpu()) is None
    assert port_dev.writes == [(1, b"ab"), (1, b"cd"), (1, b"ef")]


def test_port_write_to_nowhere_is_logged_once_with_port_and_data(
    buses: Buses, unknown_io_log: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=exit_handler.log.name):
        assert run(x.IoOut(0x80, b"\x42", 1), buses, Vcpu()) is None
    assert [r.getMessage() for r in caplog.records] == ["unhandled port write 0x80 <- 42"]


def test_string_port_write_to_nowhere_logs_once_and_stops(
    buses: Buses, unknown_io_log: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=exit_handler.log.name):
        assert run(x.IoOut(0x80, b"abcdefgh", 2), buses, Vcpu()) is None
    assert [r.getMessage() for r in caplog.records] == ["unhandled port write 0x80"]


def test_port_read_returns_the_device_bytes_at_the_data_offset(buses: Buses) -> None:
    vcpu = Vcpu()
    _, _, port_dev, _ = buses
    assert run(x.IoIn(0x3FA, 2, 1, 0x1000), buses, vcpu) is None
    assert vcpu.io_in == [(0x1000, bytes([0x12, 0x13]))]
    assert port_dev.reads == [(2, 2)]


def test_string_port_read_reads_count_elements(buses: Buses) -> None:
    vcpu = Vcpu()
    _, _, port_dev, _ = buses
    assert run(x.IoIn(0x3F9, 1, 3, 8), buses, vcpu) is None
    assert vcpu.io_in == [(8, b"\x11\x11\x11")]
    assert port_dev.reads == [(1, 1)] * 3


@pytest.mark.parametrize("size", [1, 2, 4])
def test_port_read_from_nowhere_is_all_ones_and_logged(
    buses: Buses, unknown_io_log: None, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    vcpu = Vcpu()
    with caplog.at_level(logging.WARNING, logger=exit_handler.log.name):
        assert run(x.IoIn(0x60, size, 2, 16), buses, vcpu) is None
    assert vcpu.io_in == [(16, b"\xff" * size * 2)]
    assert [r.getMessage() for r in caplog.records] == [
        "unhandled port read 0x60 (reads as all-ones)"
    ] * 2


# -- MMIO -----------------------------------------------------------------------------------
def test_mmio_write_and_read_reach_the_device(buses: Buses) -> None:
    vcpu = Vcpu()
    _, _, _, mmio_dev = buses
    assert run(x.MmioWrite(0xD000_0010, b"\x01\x02\x03\x04"), buses, vcpu) is None
    assert mmio_dev.writes == [(0x10, b"\x01\x02\x03\x04")]
    assert run(x.MmioRead(0xD000_0004, 4), buses, vcpu) is None
    assert vcpu.mmio_read == [bytes([0x14, 0x15, 0x16, 0x17])]


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_mmio_read_from_nowhere_is_all_ones_and_logged(
    buses: Buses, unknown_io_log: None, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    vcpu = Vcpu()
    with caplog.at_level(logging.WARNING, logger=exit_handler.log.name):
        assert run(x.MmioRead(0xFEE0_0000, size), buses, vcpu) is None
    assert vcpu.mmio_read == [b"\xff" * size]
    assert [r.getMessage() for r in caplog.records] == [
        "unhandled MMIO read at 0xfee00000 (reads as all-ones)"
    ]


def test_mmio_write_to_nowhere_is_logged_with_address_and_data(
    buses: Buses, unknown_io_log: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=exit_handler.log.name):
        assert run(x.MmioWrite(0x1234, b"\xab\xcd"), buses, Vcpu()) is None
    assert [r.getMessage() for r in caplog.records] == ["unhandled MMIO write at 0x1234 <- abcd"]
