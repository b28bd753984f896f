"""Creates the VM's devices from its config and owns them: legacy and ACPI devices on the PIO
and MMIO buses, the PCI root, and virtio devices on virtio-pci."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from strato.boot.acpi import constants as acpi
from strato.devices.backends.raw import DiskError, RawFile
from strato.devices.backends.tap import TapError, open_tap
from strato.devices.legacy.ged import AcpiGed
from strato.devices.legacy.power import AcpiPmTimer, AcpiShutdown
from strato.devices.rate_limiter import rate_limiter_from
from strato.devices.virtio.block import Block
from strato.devices.virtio.console import Console
from strato.devices.virtio.net import Net
from strato.devices.virtio.rng import Rng
from strato.interrupts import IrqLineTrigger
from strato.interrupts.msi import MsiRouting
from strato.memory.layout import LAYOUT
from strato.pci.bus import PciConfigIo, PciConfigMmio, PciRoot, intx_gsi
from strato.virtio.device import VirtioDevice
from strato.virtio.pci import VirtioPciDevice
from strato.vmm.config import ConfigError, ConsoleMode, VmConfig
from strato.vmm.machine import Machine
from strato.vmm.routing import KvmRouting

log = logging.getLogger(__name__)


@dataclass(eq=False)
class VirtioEntry:
    id: str
    kind: str
    device: VirtioDevice
    transport: VirtioPciDevice
    slot: int


@dataclass(eq=False)
class DeviceManager:
    machine: Machine
    routing: MsiRouting
    pci: PciRoot
    virtio: list[VirtioEntry] = field(default_factory=list)
    ged: AcpiGed | None = None
    console: Console | None = None
    _closers: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, machine: Machine) -> DeviceManager:
        routing = MsiRouting(KvmRouting(machine.vm))
        routing.commit()
        pci = PciRoot(machine.mmio, machine.pio)
        machine.pio.insert(PciConfigIo(pci), acpi.PCI_CONFIG_IO_PORT, acpi.PCI_CONFIG_IO_LEN)
        machine.mmio.insert(PciConfigMmio(pci), LAYOUT.pci_ecam, LAYOUT.pci_ecam_size)
        return cls(machine, routing, pci)

    # -- ACPI platform devices -------------------------------------------------------------------
    def add_acpi_devices(self, on_poweroff: Any, on_reset: Any) -> None:
        m = self.machine
        m.pio.insert(
            AcpiShutdown(on_poweroff=on_poweroff, on_reset=on_reset),
            acpi.ACPI_SHUTDOWN_PORT,
            acpi.ACPI_SHUTDOWN_PORT_LEN,
        )
        m.pio.insert(AcpiPmTimer(), acpi.ACPI_PM_TIMER_PORT, acpi.ACPI_PM_TIMER_PORT_LEN)
        self.ged = AcpiGed(m.irqfd_trigger(acpi.GED_IRQ))
        m.mmio.insert(self.ged, acpi.GED_MMIO_ADDRESS, acpi.GED_MMIO_SIZE)

    # -- virtio ----------------------------------------------------------------------------------
    def add_virtio(self, kind: str, device: VirtioDevice, id: str | None = None) -> VirtioEntry:
        m = self.machine
        slot = self.pci.next_free_slot()
        gsi = intx_gsi(slot)
        transport = VirtioPciDevice(
            device,
            self.routing,
            m.memory,
            m.loop,
            m.vm,
            intx=IrqLineTrigger(gsi, m.vm.irq_line),
            intx_line=gsi,
        )
        self.pci.add_device(transport, slot)
        entry = VirtioEntry(id or f"_{kind}{len(self.virtio)}", kind, device, transport, slot)
        self.virtio.append(entry)
        return entry

    def add_config_devices(self, config: VmConfig) -> None:
        for i, d in enumerate(config.disks):
            try:
                disk = RawFile(str(d.path), readonly=d.readonly, direct=d.direct)
            except (DiskError, OSError) as e:
                raise ConfigError(f"--disk path={d.path}: {e}") from None
            self._closers.append(disk)
            dev = Block(
                disk,
                serial=d.serial,
                num_queues=d.num_queues,
                queue_size=d.queue_size,
                rate_limiter=rate_limiter_from(d.rate_limiter),
            )
            self._closers.append(dev)  # its rate limiter's timer
            self.add_virtio("disk", dev, d.id or f"_disk{i}")
        for i, n in enumerate(config.net):
            where = f"--net tap={n.tap}" if n.tap is not None else "--net"
            if n.num_queues < 2 or n.num_queues % 2:
                raise ConfigError(
                    f"--net num_queues={n.num_queues}: must be even (one rx and one tx per pair)"
                )
            try:
                # One tap fd per queue pair (IFF_MULTI_QUEUE when there are several); a
                # missing tap is created (and goes away with the VM: a reboot creates it again).
                taps = open_tap(
                    n.tap,
                    n.num_queues // 2,
                    ip=n.ip,
                    mask=n.mask,
                    host_mac=n.host_mac,
                    mtu=n.mtu,
                )
            except TapError as e:
                raise ConfigError(f"{where}: {e.strerror}") from None
            self._closers.extend(taps)
            try:
                net = Net(
                    taps,
                    mac=n.mac,
                    queue_size=n.queue_size,
                    rx_rate_limiter=rate_limiter_from(n.rate_limiter),
                    tx_rate_limiter=rate_limiter_from(n.rate_limiter),
                )
            except TapError as e:  # detaching the queues of the pairs not yet in use
                raise ConfigError(f"{where}: {e.strerror}") from None
            self._closers.append(net)  # its rate limiters' timers
            self.add_virtio("net", net, n.id or f"_net{i}")
        if config.rng is not None:
            try:
                rng = Rng(str(config.rng.src))
            except OSError as e:
                raise ConfigError(f"--rng src={config.rng.src}: {e.strerror}") from None
            self._closers.append(rng)
            self.add_virtio("rng", rng, "__rng")
        c = config.console
        if c.mode in (ConsoleMode.TTY, ConsoleMode.FILE, ConsoleMode.NULL):
            output: int | str | None
            if c.mode is ConsoleMode.TTY:
                output = 1
            elif c.mode is ConsoleMode.FILE:
                output = str(c.file)
            else:
                output = os.devnull
            try:
                self.console = Console(output=output)
            except OSError as e:
                raise ConfigError(f"--console file={c.file}: {e.strerror}") from None
            self._closers.append(self.console)
            self.add_virtio("console", self.console, "__console")
        elif c.mode is ConsoleMode.PTY:
            raise ConfigError("--console pty: not supported yet; use tty, file=PATH, null or off")

    def slot_gsis(self) -> list[int]:
        return [intx_gsi(e.slot) for e in self.virtio]

    def counters(self) -> dict[str, dict[str, int]]:
        return {e.id: dict(e.device.counters()) for e in self.virtio}

    def close(self) -> None:
        for e in self.virtio:
            try:
                e.transport.close()
            except Exception:
                log.exception("closing %s", e.id)
        for c in self._closers:
            try:
                c.close()
            except Exception:
                log.exception("closing %r", c)
