"""The boot recipe, one linear function: memory -> VM -> vCPUs -> devices -> kernel -> run.

Reading `build_vm` top to bottom tells how a strato VM comes to be (Firecracker's builder.rs
is the model).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from strato.boot import BootError, load_kernel, setup_boot_cpu, write_mptable
from strato.boot.acpi import build_acpi_tables
from strato.devices.legacy.debug_port import DebugPort
from strato.devices.legacy.i8042 import I8042, I8042_PORT, I8042_PORT_LEN
from strato.devices.legacy.rtc import RTC_PORT, RTC_PORT_LEN, CmosRtc
from strato.devices.legacy.serial import Serial
from strato.devices.legacy.serial_output import (
    FileSink,
    NullSink,
    OutputLike,
    SerialOutput,
    TtySink,
)
from strato.memory.layout import LAYOUT
from strato.vmm import cpu_setup, landlock, seccomp
from strato.vmm.config import ConfigError, ConsoleMode, VmConfig
from strato.vmm.device_manager import DeviceManager
from strato.vmm.machine import Machine
from strato.vmm.stop import Stop, StopReason
from strato.vmm.vm import Vm

log = logging.getLogger(__name__)

COM1_PORT = 0x3F8
COM1_GSI = 4
DEBUG_PORT = 0x80

DEFAULT_CMDLINE = "console=ttyS0 reboot=k panic=1"


@dataclass
class BootTimes:
    """Monotonic timestamps (ns) of the boot recipe's steps, for `strato -v` and benchmarks."""

    start: int = field(default_factory=time.monotonic_ns)
    steps: list[tuple[str, int]] = field(default_factory=list)

    def mark(self, step: str) -> None:
        self.steps.append((step, time.monotonic_ns()))

    def report(self) -> str:
        prev = self.start
        parts = []
        for name, t in self.steps:
            parts.append(f"{name} {(t - prev) / 1e6:.1f} ms")
            prev = t
        since = process_age_ms()
        if since is not None and self.steps:
            age_at_last = since - (time.monotonic_ns() - self.steps[-1][1]) / 1e6
            parts.append(f"{age_at_last:.0f} ms after the process started")
        return ", ".join(parts)


def process_age_ms() -> float | None:
    """How long ago this process started (Linux /proc), for start-up reports."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return (uptime - start_ticks / os.sysconf("SC_CLK_TCK")) * 1000


def serial_output(config: VmConfig) -> SerialOutput:
    mode = config.serial.mode
    if mode is ConsoleMode.TTY:
        return TtySink(1)
    if mode is ConsoleMode.FILE:
        assert config.serial.file is not None
        try:
            return FileSink(config.serial.file)
        except OSError as e:
            raise ConfigError(f"--serial file={config.serial.file}: {e.strerror}") from None
    if mode is ConsoleMode.PTY:
        raise ConfigError("--serial pty: not supported yet; use tty, file=PATH, null or off")
    return NullSink()


def build_vm(
    config: VmConfig,
    *,
    serial_out: OutputLike | None = None,
    times: BootTimes | None = None,
) -> Vm:
    """Build a VM from `config`, ready to `start()`. Raises ConfigError or BootError."""
    config.validate()
    times = times or BootTimes()
    nr_vcpus = config.cpus.boot_vcpus

    # 1. The machine: KVM VM, guest memory, in-kernel irqchip and PIT, vCPU fds.
    machine = Machine.create(config.memory.size, nr_vcpus, config.memory.shared)
    times.mark("vm")
    vm = Vm(machine)
    try:
        # 2. Legacy devices on the PIO bus.
        def reset() -> None:
            vm.request_stop(Stop(StopReason.RESET, "the guest reset the machine (i8042)"))

        if config.serial.mode is not ConsoleMode.OFF:
            out = serial_out if serial_out is not None else serial_output(config)
            serial = Serial(machine.irqfd_trigger(COM1_GSI), out)
            machine.pio.insert(serial, COM1_PORT, 8)
            vm.devices["serial"] = serial
        machine.pio.insert(I8042(on_reset=reset), I8042_PORT, I8042_PORT_LEN)
        low = min(config.memory.size, LAYOUT.mmio32_start)
        high = max(0, config.memory.size - LAYOUT.mmio32_start)
        machine.pio.insert(CmosRtc(low, high, cpus=nr_vcpus), RTC_PORT, RTC_PORT_LEN)
        debug = DebugPort(times.start)
        machine.pio.insert(debug, DEBUG_PORT, 1)
        vm.devices["debug_port"] = debug

        # 3. ACPI platform devices, the PCI root and the virtio devices.
        dm = DeviceManager.create(machine)
        vm.device_manager = dm
        vm.on_close.append(dm.close)

        def poweroff() -> None:
            vm.request_stop(Stop(StopReason.POWEROFF, "the guest powered off (ACPI S5)"))

        def acpi_reset() -> None:
            vm.request_stop(Stop(StopReason.RESET, "the guest reset the machine (ACPI)"))

        if config.acpi:
            dm.add_acpi_devices(poweroff, acpi_reset)
        dm.add_config_devices(config)
        times.mark("devices")

        # 4. Platform tables (MP table for kernels without ACPI, ACPI tables), then the payload.
        write_mptable(machine.memory, nr_vcpus)
        rsdp = 0
        if config.acpi:
            rsdp = build_acpi_tables(machine.memory, LAYOUT, nr_vcpus, pci_slot_gsis=dm.slot_gsis())
        payload = config.payload
        assert payload.kernel is not None
        cmdline = payload.cmdline if payload.cmdline is not None else DEFAULT_CMDLINE
        kernel = load_kernel(
            machine.memory,
            Path(payload.kernel),
            cmdline,
            payload.initramfs,
            rsdp_addr=rsdp,
            reserved=[(LAYOUT.pci_ecam, LAYOUT.pci_ecam_size)],
        )
        times.mark("load")

        # 5. vCPUs: CPUID and MSRs for all, LINT0/1 for all, boot state for the BSP.
        base_cpuid = cpu_setup.host_cpuid(machine.kvm)
        state = setup_boot_cpu(machine.memory, kernel)
        for fd in machine.vcpus:
            cpu_setup.set_cpuid(fd, base_cpuid, nr_vcpus)
            cpu_setup.set_msrs(fd, state.msrs)
            cpu_setup.set_lint(fd)
        cpu_setup.set_boot_state(machine.vcpus[0], state)
        times.mark("vcpus")
        vm.boot_times = times
        return vm
    except BaseException:
        for close in vm.on_close:
            close()
        machine.close()
        raise


class VmBuilder:
    """Builds the VMs of one config, boot after boot: one serial output shared by all of them (a
    reboot must not truncate or reopen the serial file), and every VM's vCPU and event-loop
    threads confined by the config's seccomp mode as they start. Used by the runner and by the
    API's controller."""

    def __init__(self, serial_out: OutputLike | None = None) -> None:
        self._given = serial_out  # the caller's: never closed here
        self._config: VmConfig | None = None
        self._out: SerialOutput | None = None

    def __call__(self, config: VmConfig, *, times: BootTimes | None = None) -> Vm:
        # Before anything is opened: under landlock a path outside the rules is refused by
        # name (a vm.create over the API may name any path).
        config.validate()
        landlock.enforce(config)
        if self._given is None and config is not self._config:
            self.close()
            self._out = serial_output(config)
        self._config = config
        out = self._given if self._given is not None else self._out
        vm = build_vm(config, serial_out=out, times=times)
        vm.thread_hooks.update(seccomp.thread_hooks(config.seccomp))
        return vm

    def close(self) -> None:
        """Close the serial output this builder opened (if any)."""
        out, self._out, self._config = self._out, None, None
        if out is not None:
            out.close()


__all__ = ["BootError", "BootTimes", "ConfigError", "VmBuilder", "build_vm"]
