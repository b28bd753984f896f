"""A 16550A UART (COM1 at port 0x3f8, IRQ 4) as a state machine.

Transmission is instantaneous: THR and the shift register are always empty (LSR.THRE|TEMT), a
byte written to THR goes straight to the output sink (which never blocks, see serial_output) and
the THR-empty interrupt condition comes back at once. Input arrives from a host thread through
`enqueue_input` into a 64-byte receive FIFO.

Interrupts. The four 16550 sources, highest priority first: receiver line status (overrun, when
IER.ELSI), received data available (FIFO not empty, IER.ERBFI), THR empty (IER.ETBEI; set when
ETBEI is turned on and after every transmitted byte, cleared by an IIR read that reports it or a
THR write), modem status (a delta bit in MSR, IER.EDSSI). IIR reports the highest one pending.
With an edge trigger (irqfd, as Firecracker and Cloud Hypervisor wire the 8250) the device fires
each time a source becomes pending that was not pending before; Linux's 8250 handler then loops
on IIR until nothing is pending, so no condition is lost. With `level_triggered=True` the
trigger's line follows "any enabled source pending" instead.

Threads: the vCPU threads call read/write, an input thread calls enqueue_input; one lock guards
the registers. Output and watchers run after the lock is released, so a watcher may call back
into the device (for example to type a reply to a prompt).

Hostile-guest budget: every register access costs O(1) time; host memory is the `FIFO_SIZE`
(64) byte receive FIFO, and transmitted bytes go straight to the output sink (which bounds its
own buffer). The watcher-failure log line is rate-limited.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from strato._sys.ratelog import RateLimitedLog
from strato.devices.legacy._common import (
    BYTE,
    bool_field,
    bytes_field,
    open_bus,
    u8_field,
)
from strato.devices.legacy.serial_output import (
    CallbackSink,
    ConsoleLog,
    FileSink,
    NullSink,
    OutputLike,
    SerialOutput,
    StreamSink,
    TtySink,
    as_output,
)
from strato.interrupts import LevelTrigger, Trigger

__all__ = [
    "COM1_IRQ",
    "COM1_PORT",
    "FIFO_SIZE",
    "SERIAL_PORT_LEN",
    "CallbackSink",
    "ConsoleLog",
    "FileSink",
    "NullSink",
    "Serial",
    "SerialOutput",
    "StreamSink",
    "TtySink",
]

log = logging.getLogger(__name__)
# Guest-triggerable (the guest's output reaches the watchers): rate-limited.
_log_watcher = RateLimitedLog(log)

COM1_PORT = 0x3F8
COM1_IRQ = 4
COM2_PORT = 0x2F8
COM2_IRQ = 3
SERIAL_PORT_LEN = 8

FIFO_SIZE = 64  # receive FIFO depth (as vm-superio); the bound on buffered input

# Register offsets. With LCR.DLAB set, offsets 0 and 1 are the divisor latch.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F  # the 16550A has no more

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0  # both bits set: what Linux's autoconfig calls a 16550A

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_TRIGGER_MASK = 0xC0

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F

# Modem inputs outside loopback: a null-modem cable to a host that is always ready.
MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS

# Bits of the internal "pending and enabled" mask, one per source.
_P_MS = 1
_P_THRE = 2
_P_RDA = 4
_P_RLS = 8

DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock
DEFAULT_LCR = 0x03  # 8N1
DEFAULT_MCR = MCR_OUT2


class Serial:
    """A 16550A UART on the PIO bus: `read(offset, size)` / `write(offset, data)`.

    trigger: the UART's interrupt (IRQ 4 for COM1). With `level_triggered=True` it must be a
        LevelTrigger and its line follows the pending state.
    out: where transmitted bytes go: a SerialOutput (NullSink, FileSink, TtySink ...), a
        binary stream (written from a background thread), a callable (called on the vCPU
        thread; must not block) or None (discard).
    """

    def __init__(
        self, trigger: Trigger, out: OutputLike = None, *, level_triggered: bool = False
    ) -> None:
        if level_triggered and not isinstance(trigger, LevelTrigger):
            raise TypeError("level_triggered needs a LevelTrigger (with set_level)")
        self._trigger = trigger
        self._level_trigger = cast(LevelTrigger, trigger) if level_triggered else None
        self.output: SerialOutput = as_output(out)
        self._watchers: tuple[Callable[[bytes], object], ...] = ()
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # input FIFO has room again
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.dll = DEFAULT_DIVISOR & 0xFF
        self.dlm = DEFAULT_DIVISOR >> 8
        self.ier = 0
        self.lcr = DEFAULT_LCR
        self.mcr = DEFAULT_MCR
        self.scr = 0
        self.fcr = 0  # FIFO enable and trigger level bits, as last written
        self.overrun = False  # LSR.OE, sticky until LSR is read
        self.msr_delta = 0
        self.thre_pending = False
        self.rx: deque[int] = deque()
        self._pending = 0  # sources pending and enabled after the last update

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size != 1 or not 0 <= offset < SERIAL_PORT_LEN:
            return open_bus(size)
        with self._lock:
            value = self._read_register(offset)
            self._update_irq()
        return BYTE[value]

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1 or not 0 <= offset < SERIAL_PORT_LEN:
            return
        with self._lock:
            sent = self._write_register(offset, data[0])
            self._update_irq()
        if sent:
            self._emit(data)

    # -- host side -----------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest to receive; returns how many fit in the FIFO.

        In loopback mode the serial input is disconnected and nothing is accepted.
        """
        with self._lock:
            if self.mcr & MCR_LOOP:
                return 0
            n = min(FIFO_SIZE - len(self.rx), len(data))
            if n > 0:
                self.rx.extend(data[:n])
                self._update_irq()
            return max(n, 0)

    def fifo_capacity(self) -> int:
        """Free bytes in the receive FIFO."""
        with self._lock:
            return FIFO_SIZE - len(self.rx)

    def wait_for_space(self, timeout: float | None = None) -> bool:
        """Block an input thread until the FIFO can take a byte; False on timeout."""
        with self._space:
            return self._space.wait_for(
                lambda: len(self.rx) < FIFO_SIZE and not self.mcr & MCR_LOOP, timeout
            )

    def add_watcher(self, watcher: Callable[[bytes], object]) -> None:
        """Call `watcher(chunk)` with every chunk of output, on the vCPU thread (keep it quick)."""
        with self._lock:
            self._watchers = (*self._watchers, watcher)

    def remove_watcher(self, watcher: Callable[[bytes], object]) -> None:
        with self._lock:
            self._watchers = tuple(w for w in self._watchers if w is not watcher)

    def close(self) -> None:
        """Flush and release the output sink."""
        self.output.close()

    # -- snapshot ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "dll": self.dll,
                "dlm": self.dlm,
                "ier": self.ier,
                "lcr": self.lcr,
                "mcr": self.mcr,
                "scr": self.scr,
                "fcr": self.fcr,
                "overrun": self.overrun,
                "msr_delta": self.msr_delta,
                "thre_pending": self.thre_pending,
                "rx": list(self.rx),
            }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Load registers from `state()`; raises ValueError on a malformed snapshot.

        Interrupt conditions pending in the snapshot are raised again, since an edge in
        flight when the snapshot was taken is lost.
        """
        fields = {k: u8_field(state, k) for k in ("dll", "dlm", "ier", "lcr", "mcr", "scr", "fcr")}
        overrun = bool_field(state, "overrun")
        thre_pending = bool_field(state, "thre_pending")
        msr_delta = u8_field(state, "msr_delta")
        rx = bytes_field(state, "rx", FIFO_SIZE)
        with self._lock:
            self.dll, self.dlm = fields["dll"], fields["dlm"]
            self.ier = fields["ier"] & IER_MASK
            self.lcr = fields["lcr"]
            self.mcr = fields["mcr"] & MCR_MASK
            self.scr = fields["scr"]
            self.fcr = fields["fcr"] & (FCR_ENABLE_FIFO | FCR_TRIGGER_MASK)
            self.overrun = overrun
            self.msr_delta = msr_delta & MSR_DELTA_MASK
            self.thre_pending = thre_pending
            self.rx = deque(rx)
            self._pending = 0
            if self._level_trigger is not None:
                self._pending = self._pending_sources()
                self._level_trigger.set_level(bool(self._pending))
            else:
                self._update_irq()
            self._space.notify_all()

    # -- registers -----------------------------------------------------------------------

    def _read_register(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR:
            if dlab:
                return self.dll
            if not self.rx:
                return 0
            value = self.rx.popleft()
            self._space.notify_all()
            return value
        if offset == IER:
            return self.dlm if dlab else self.ier
        if offset == IIR:
            ident = self._interrupt_id()
            if ident == IIR_THRI:  # reading IIR acknowledges THR empty, and only that
                self.thre_pending = False
            return ident | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE_FIFO else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            value = LSR_THRE | LSR_TEMT
            if self.rx:
                value |= LSR_DR
            if self.overrun:
                value |= LSR_OE
                self.overrun = False
            return value
        if offset == MSR:
            value = self._modem_inputs() | self.msr_delta
            self.msr_delta = 0
            return value
        return self.scr

    def _write_register(self, offset: int, value: int) -> bool:
        """Apply a register write; True if `value` was transmitted to the output."""
        dlab = self.lcr & LCR_DLAB
        if offset == THR:
            if dlab:
                self.dll = value
                return False
            return self._transmit(value)
        if offset == IER:
            if dlab:
                self.dlm = value
            else:
                # Turning ETBEI on with THR empty raises THRE again even if an IIR read had
                # acknowledged it (Linux's startup THRE test relies on this; so does Windows).
                if value & IER_ETBEI and not self.ier & IER_ETBEI:
                    self.thre_pending = True
                self.ier = value & IER_MASK
        elif offset == FCR:
            self.fcr = value & (FCR_ENABLE_FIFO | FCR_TRIGGER_MASK)
            if value & FCR_CLEAR_RCVR:
                self.rx.clear()
                self._space.notify_all()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            before = self._modem_inputs()
            was_loop = self.mcr & MCR_LOOP
            self.mcr = value & MCR_MASK
            self._note_modem_change(before, self._modem_inputs())
            if was_loop and not self.mcr & MCR_LOOP:
                self._space.notify_all()
        elif offset == SCR:
            self.scr = value
        # LSR and MSR writes (factory test modes) are ignored.
        return False

    def _transmit(self, value: int) -> bool:
        # The byte leaves THR and the shift register at once: THR is empty again.
        self.thre_pending = True
        if not self.mcr & MCR_LOOP:
            return True
        # Loopback: the transmitter feeds the receiver.
        if len(self.rx) < FIFO_SIZE:
            self.rx.append(value)
        else:
            self.overrun = True
        return False

    def _modem_inputs(self) -> int:
        if not self.mcr & MCR_LOOP:
            return MSR_CONNECTED
        # Loopback wires RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        mcr = self.mcr
        return (
            (MSR_CTS if mcr & MCR_RTS else 0)
            | (MSR_DSR if mcr & MCR_DTR else 0)
            | (MSR_RI if mcr & MCR_OUT1 else 0)
            | (MSR_DCD if mcr & MCR_OUT2 else 0)
        )

    def _note_modem_change(self, before: int, after: int) -> None:
        changed = before ^ after
        if changed & MSR_CTS:
            self.msr_delta |= MSR_DCTS
        if changed & MSR_DSR:
            self.msr_delta |= MSR_DDSR
        if changed & MSR_DCD:
            self.msr_delta |= MSR_DDCD
        if before & MSR_RI and not after & MSR_RI:  # trailing edge only
            self.msr_delta |= MSR_TERI

    # -- interrupts ----------------------------------------------------------------------

    def _pending_sources(self) -> int:
        ier = self.ier
        pending = 0
        if ier & IER_ELSI and self.overrun:
            pending |= _P_RLS
        if ier & IER_ERBFI and self.rx:
            pending |= _P_RDA
        if ier & IER_ETBEI and self.thre_pending:
            pending |= _P_THRE
        if ier & IER_EDSSI and self.msr_delta:
            pending |= _P_MS
        return pending

    def _interrupt_id(self) -> int:
        pending = self._pending_sources()
        if pending & _P_RLS:
            return IIR_RLSI
        if pending & _P_RDA:
            return IIR_RDI
        if pending & _P_THRE:
            return IIR_THRI
        if pending & _P_MS:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        """Signal the interrupt after a state change (called with the lock held)."""
        before = self._pending
        now = self._pending_sources()
        self._pending = now
        if self._level_trigger is not None:
            if bool(now) != bool(before):
                self._level_trigger.set_level(bool(now))
        elif now & ~before:
            self._trigger.trigger()

    # -- output --------------------------------------------------------------------------

    def _emit(self, data: bytes) -> None:
        self.output.write(data)
        for watcher in self._watchers:
            try:
                watcher(data)
            except Exception:
                _log_watcher.error("serial watcher %r failed; removing it", watcher, exc_info=True)
                self.remove_watcher(watcher)
