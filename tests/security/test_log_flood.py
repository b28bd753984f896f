"""A guest cannot flood the host log: every log line it can trigger is rate-limited.

Each case drives one guest-triggerable log line thousands of times the way a guest would (port
and MMIO writes through the real buses, virtio rings in real guest memory) and counts the lines
that reach the logger: `burst` in the window, then one summary line with the exact number of
the rest. The rate limiter's clock is frozen (no sleeps), so the window never opens during the
flood and the counts are exact.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from strato._sys import ratelog
from strato.bus import Bus
from strato.devices.legacy.debug_port import DEBUG_PORT, DebugPort
from strato.devices.legacy.i8042 import COMMAND_OFFSET, I8042, I8042_PORT
from strato.devices.legacy.power import (
    ACPI_SHUTDOWN_PORT,
    RESET_VALUE,
    SHUTDOWN_VALUE,
    SLP_EN,
    SLP_TYP_SHIFT,
    AcpiShutdown,
)
from strato.devices.legacy.rtc import (
    INDEX_NMI_DISABLE,
    REG_SECONDS,
    REG_SHUTDOWN_STATUS,
    RTC_PORT,
    CmosRtc,
)
from strato.devices.virtio.console import Console
from strato.devices.virtio.net import (
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_HOST_TSO4,
    Net,
)
from strato.events import EventLoop
from strato.memory import GuestMemory
from strato.pci.configuration import BarMove
from strato.virtio.device import VIRTIO_F_VERSION_1
from strato.virtio.testing import VirtioDriver
from tests.pci.helpers import ECAM_BASE, FakeIoEvents, FakeVirtioDevice
from tests.pci.test_pci_bus import SimpleDevice
from tests.pci.test_virtio_pci import Setup

FLOOD = 3000  # triggers per case
SUMMARY = "%d similar messages suppressed"
V1 = 1 << VIRTIO_F_VERSION_1
FEATURES_OK = 8
DRIVER_OK = 4


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self, template: str) -> list[logging.LogRecord]:
        return [r for r in self.records if r.msg == template]

    def bytes(self) -> int:
        fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        return sum(len(fmt.format(r)) + 1 for r in self.records)


_epochs = itertools.count(1)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The rate limiter's clock, frozen far beyond any window a previous test opened."""
    now = [time.monotonic() + 1e6 * next(_epochs)]
    monkeypatch.setattr(ratelog, "time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


@pytest.fixture
def capture() -> Iterator[Capture]:
    logger = logging.getLogger("strato")
    handler = Capture()
    old = logger.level
    logger.setLevel(logging.DEBUG)  # debug lines a guest triggers count too
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old)


@dataclass
class Flood:
    trigger: Callable[[], object]
    template: str  # the log call's format string
    per_trigger: int = 1  # lines one trigger would log without a limit
    burst: int = 10
    close: Callable[[], None] = lambda: None


def assert_bounded(flood: Flood, capture: Capture, clock: list[float]) -> None:
    flood.trigger()  # the first line of a fresh window (and a summary of any older one)
    capture.records.clear()
    for _ in range(FLOOD):
        flood.trigger()
    lines = capture.lines(flood.template)
    # burst lines in the window, of which the first trigger logged its own
    left = flood.burst - flood.per_trigger
    assert len(lines) == left, f"{flood.template!r}: {len(lines)} lines"
    assert len(capture.records) <= flood.burst + 1, [r.getMessage() for r in capture.records]
    assert capture.bytes() < (flood.burst + 1) * 1024  # kilobytes (tracebacks too), not MB
    # the next window opens with one line that counts the rest exactly
    clock[0] += 3600
    capture.records.clear()
    flood.trigger()
    suppressed = FLOOD * flood.per_trigger - left
    assert [r.args for r in capture.lines(SUMMARY)] == [(suppressed,)]
    assert len(capture.lines(flood.template)) == flood.per_trigger


# -- legacy devices, through the PIO bus ------------------------------------------------------
def pio_with(device: Any, port: int, length: int) -> Bus:
    bus = Bus("pio")
    bus.insert(device, port, length)
    return bus


def acpi_sleep_type() -> Flood:
    pio = pio_with(AcpiShutdown(), ACPI_SHUTDOWN_PORT, 4)
    value = bytes([SLP_EN | 1 << SLP_TYP_SHIFT])  # S1: not supported
    return Flood(
        lambda: pio.write(ACPI_SHUTDOWN_PORT, value),
        "acpi: sleep type %d is not supported; waking at once",
    )


def acpi_reset() -> Flood:
    pio = pio_with(AcpiShutdown(on_reset=lambda: None), ACPI_SHUTDOWN_PORT, 4)
    return Flood(
        lambda: pio.write(ACPI_SHUTDOWN_PORT, bytes([RESET_VALUE])),
        "acpi: guest requested reset",
    )


def acpi_poweroff() -> Flood:
    pio = pio_with(AcpiShutdown(on_poweroff=lambda: None), ACPI_SHUTDOWN_PORT, 4)
    return Flood(
        lambda: pio.write(ACPI_SHUTDOWN_PORT, bytes([SHUTDOWN_VALUE])),
        "acpi: guest requested power off (S5)",
    )


def i8042_unknown_command() -> Flood:
    pio = pio_with(I8042(), I8042_PORT, 5)
    return Flood(
        lambda: pio.write(I8042_PORT + COMMAND_OFFSET, b"\xc1"),
        "i8042: ignoring command %#04x",
    )


def i8042_reset() -> Flood:
    pio = pio_with(I8042(on_reset=lambda: None), I8042_PORT, 5)
    return Flood(
        lambda: pio.write(I8042_PORT + COMMAND_OFFSET, b"\xfe"),
        "i8042: guest pulsed the reset line",
    )


def cmos_invalid_value() -> Flood:
    pio = pio_with(CmosRtc(), RTC_PORT, 2)

    def trigger() -> None:
        pio.write(RTC_PORT, bytes([REG_SECONDS]))
        pio.write(RTC_PORT + 1, b"\x99")  # BCD 99 seconds

    return Flood(trigger, "cmos: ignoring invalid value %#04x for register %#04x")


def cmos_reset() -> Flood:
    pio = pio_with(CmosRtc(on_reset=lambda: None), RTC_PORT, 2)

    def trigger() -> None:
        pio.write(RTC_PORT, bytes([REG_SHUTDOWN_STATUS | INDEX_NMI_DISABLE]))
        pio.write(RTC_PORT + 1, b"\x00")

    return Flood(trigger, "cmos: reset requested through the shutdown status byte")


def debug_port_repeats() -> Flood:
    pio = pio_with(DebugPort(), DEBUG_PORT, 1)
    pio.write(DEBUG_PORT, b"\x40")  # the first of a code has its own (INFO) line
    return Flood(
        lambda: pio.write(DEBUG_PORT, b"\x40"),
        "[Debug I/O port: %s code %#x] %d.%06d seconds",
    )


def debug_port_first_codes() -> Flood:
    """Every code's first write is an INFO line: 256 of them, limited like the rest."""
    port = DebugPort()
    codes = iter(range(1 << 30))

    def trigger() -> None:
        code = next(codes)
        if code % 256 == 0:  # a new device: every code is new again
            port.__init__()  # type: ignore[misc]
        port.write(0, bytes([code % 256]))

    return Flood(trigger, "[Debug I/O port: %s code %#x] %d.%06d seconds", burst=64)


# -- PCI, through ECAM --------------------------------------------------------------------------
def bar_move_refused() -> Flood:
    st = Setup()
    a, b = SimpleDevice(), SimpleDevice()
    sa, _ = st.root.add_device(a), st.root.add_device(b)
    base = ECAM_BASE + (sa << 15)
    st.mmio.write(base + 0x04, b"\x02\x00")
    onto_b = struct.pack("<I", b.bars()[0].address)
    return Flood(
        lambda: st.mmio.write(base + 0x10, onto_b),
        "PCI %02x BAR %d: cannot move %#x -> %#x (%s); keeping the old address",
        close=st.close,
    )


class BrokenConfig(SimpleDevice):
    def config_read(self, offset: int, size: int) -> int:
        if offset == 0x40:
            raise RuntimeError("broken register")
        return super().config_read(offset, size)

    def config_write(self, offset: int, data: bytes) -> list[BarMove]:
        if offset == 0x40:
            raise RuntimeError("broken register")
        return super().config_write(offset, data)


def pci_config_read_fails() -> Flood:
    st = Setup()
    slot = st.root.add_device(BrokenConfig())
    addr = ECAM_BASE + (slot << 15) + 0x40
    return Flood(
        lambda: st.mmio.read(addr, 4),
        "PCI %02x:%02x.%x config read at %#x failed",
        close=st.close,
    )


def pci_config_write_fails() -> Flood:
    st = Setup()
    slot = st.root.add_device(BrokenConfig())
    addr = ECAM_BASE + (slot << 15) + 0x40
    return Flood(
        lambda: st.mmio.write(addr, b"\0\0\0\0"),
        "PCI %02x:%02x.%x config write at %#x failed",
        close=st.close,
    )


# -- the virtio-pci transport, through BAR 0 ---------------------------------------------------
def queue_enable_refused() -> Flood:
    st = Setup()
    d = st.driver
    assert d.negotiate()
    d.common_write(0x16, 2, 0)
    d.common_write(0x18, 2, 3)  # not a power of two
    return Flood(
        lambda: d.common_write(0x1C, 2, 1),
        "virtio-pci: queue %d enable refused: invalid configuration",
        close=st.close,
    )


def features_flood(device: FakeVirtioDevice, features: int, template: str) -> Flood:
    st = Setup(device)
    d = st.driver
    d.reset()
    d.add_status(1)
    d.add_status(2)
    d.set_driver_features(features)

    def trigger() -> None:
        d.common_write(0x14, 1, 1 | 2 | FEATURES_OK)
        assert not d.status & FEATURES_OK  # refused: the bit does not stick

    return Flood(trigger, template, close=st.close)


def features_not_offered() -> Flood:
    dev = FakeVirtioDevice()
    return features_flood(
        dev,
        dev.features | 1 << 40,
        "virtio-pci: driver accepted features %#x the device did not offer",
    )


def features_without_version_1() -> Flood:
    dev = FakeVirtioDevice()
    return features_flood(dev, dev.features & ~V1, "virtio-pci: driver did not accept VERSION_1")


class NetLikeDevice(FakeVirtioDevice):
    """Offers virtio-net's offload bits and checks their dependencies as virtio-net does."""

    feature_conflict = staticmethod(Net.feature_conflict)


def features_conflict() -> Flood:
    dev = NetLikeDevice()
    dev.features |= 1 << VIRTIO_NET_F_CSUM | 1 << VIRTIO_NET_F_HOST_TSO4
    return features_flood(
        dev, V1 | 1 << VIRTIO_NET_F_HOST_TSO4, "virtio-pci: features %#x refused: %s"
    )


def status_backwards() -> Flood:
    st = Setup()
    d = st.driver
    d.reset()
    d.add_status(1)
    d.add_status(2)
    return Flood(
        lambda: d.common_write(0x14, 1, 1),
        "virtio-pci: status %#x -> %#x goes backwards; ignored",
        close=st.close,
    )


def activation_fails() -> Flood:
    st = Setup(FakeVirtioDevice(fail_activate=True))
    d = st.driver

    def trigger() -> None:
        assert d.negotiate()
        d.add_status(DRIVER_OK)

    return Flood(trigger, "virtio-pci: device activation failed", close=st.close)


class FailingIoEvents(FakeIoEvents):
    def register_ioevent(self, eventfd: int, addr: int, length: int, datamatch: int | None) -> None:
        raise OSError(17, "File exists")

    def unregister_ioevent(
        self, eventfd: int, addr: int, length: int, datamatch: int | None
    ) -> None:
        pass


def ioeventfd_register_fails() -> Flood:
    st = Setup()
    cfg = st.driver.cfg
    bar = st.transport.bar_address
    moves = iter(range(1 << 30))

    def trigger() -> None:  # the guest moves BAR 0 back and forth
        new = bar + 0x10_0000 * (next(moves) % 2 ^ 1)
        cfg.write(0x10, 4, (new & 0xFFFF_FFFF) | 0xC)
        cfg.write(0x14, 4, new >> 32)

    st.transport.ioevents = FailingIoEvents()
    return Flood(
        trigger,
        "virtio-pci: registering ioeventfd at %#x: %s",
        per_trigger=len(st.device.sizes),
        close=st.close,
    )


def msix_routing_fails() -> Flood:
    st = Setup()
    d = st.driver
    d.enable_msix()

    def refuse(entries: list[Any]) -> None:
        raise OSError(22, "Invalid argument")

    st.backend.set_gsi_routing = refuse  # type: ignore[method-assign]

    def close() -> None:
        del st.backend.set_gsi_routing
        st.close()

    data = iter(range(1 << 30))
    entry = d.msix_table_addr(0)
    return Flood(
        lambda: st.mmio.write(entry + 8, struct.pack("<I", 0x40 + next(data) % 64)),
        "MSI-X vector %d: routing update failed",
        close=close,
    )


def console_config_write_ignored() -> Flood:
    con = Console()
    st = Setup(con)  # type: ignore[arg-type]
    d = st.driver

    def close() -> None:
        st.close()
        con.close()

    return Flood(
        lambda: d.write(4, 0, 4, 0x1234),  # DEVICE_CFG offset 0: cols, read-only
        "%s: ignored config write at %#x (%d bytes)",
        close=close,
    )


def console_bad_transmit_chain(mem: GuestMemory) -> Flood:
    con = Console()
    loop = EventLoop()
    drv = VirtioDriver(con, mem)
    drv.activate(loop)
    tx = drv[1]

    def close() -> None:
        con.reset()
        con.close()
        loop.close()

    def trigger() -> None:
        tx.add_chain([(1 << 40, 16)])  # a buffer outside guest memory
        drv.kick(1)
        tx.get_used()

    return Flood(trigger, "%s: bad transmit chain: %s", close=close)


CASES: dict[str, Callable[[], Flood]] = {
    "acpi_sleep_type": acpi_sleep_type,
    "acpi_reset": acpi_reset,
    "acpi_poweroff": acpi_poweroff,
    "i8042_unknown_command": i8042_unknown_command,
    "i8042_reset": i8042_reset,
    "cmos_invalid_value": cmos_invalid_value,
    "cmos_reset": cmos_reset,
    "debug_port_repeats": debug_port_repeats,
    "debug_port_first_codes": debug_port_first_codes,
    "bar_move_refused": bar_move_refused,
    "pci_config_read_fails": pci_config_read_fails,
    "pci_config_write_fails": pci_config_write_fails,
    "queue_enable_refused": queue_enable_refused,
    "features_not_offered": features_not_offered,
    "features_without_version_1": features_without_version_1,
    "features_conflict": features_conflict,
    "status_backwards": status_backwards,
    "activation_fails": activation_fails,
    "ioeventfd_register_fails": ioeventfd_register_fails,
    "msix_routing_fails": msix_routing_fails,
    "console_config_write_ignored": console_config_write_ignored,
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_guest_cannot_flood_the_log(case: str, capture: Capture, clock: list[float]) -> None:
    flood = CASES[case]()
    try:
        assert_bounded(flood, capture, clock)
    finally:
        flood.close()


def test_console_bad_chains_cannot_flood_the_log(capture: Capture, clock: list[float]) -> None:
    mem = GuestMemory.anonymous([(0, 8 << 20)])
    flood = console_bad_transmit_chain(mem)
    try:
        assert_bounded(flood, capture, clock)
    finally:
        flood.close()
        mem.close()


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a tap")
def test_net_bad_chains_cannot_flood_the_log(capture: Capture, clock: list[float]) -> None:
    from strato.devices.backends.tap import Tap
    from tests.taps import host_tap

    mem = GuestMemory.anonymous([(0, 8 << 20)])
    loop = EventLoop()
    with host_tap("stf") as name:
        net = Net(Tap(name))
        drv = VirtioDriver(net, mem)
        drv.activate(loop)
        tx = drv[1]

        def trigger() -> None:
            tx.add_chain([(1 << 40, 64)])
            drv.kick(1)
            tx.get_used()

        try:
            assert_bounded(Flood(trigger, "%s: bad tx chain: %s"), capture, clock)
            assert net.counters()["tx_dropped"] == FLOOD + 2
        finally:
            net.reset()
            net.close()
            net.tap.close()
            loop.close()
            mem.close()
