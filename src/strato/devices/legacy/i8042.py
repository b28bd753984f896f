"""A minimal i8042 keyboard controller (ports 0x60 and 0x64), as in Firecracker.

Enough for a guest to probe the controller, reset the machine (command 0xFE, or any pulse of
output line 0, or writing the output port with bit 0 clear) and receive Ctrl-Alt-Del. The
device sits on [0x60, 0x65): offset 0 is the data port, offset 4 the status (read) / command
(write) port; offset 1 is port B (0x61), answered with bit 5 set as kvmtool and Cloud Hypervisor
do, for when no in-kernel PIT claims it (Linux's TSC calibration polls that bit).

The keyboard behind it is a dumb one that acknowledges commands (0xFA) and answers reset
(0xFA 0xAA), identify (0xFA 0xAB 0x83) and echo. There is no mouse: bytes sent to the aux
device (0xD4) are answered with 0xFE (resend), which makes Linux's psmouse give up quickly;
Firecracker passes `i8042.noaux` (and `i8042.nomux i8042.nopnp i8042.dumbkbd`) so Linux does
not probe the aux port at all, which is also recommended here.

Controller command replies do not raise IRQ 1 (the guest polls the status register for them);
keyboard data does, when the command byte enables it.

Hostile-guest budget: every port access costs O(1) time and no host memory beyond the
`BUFFER_SIZE`-byte (16) output buffer; the log lines a guest can trigger are rate-limited.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from strato._sys.ratelog import RateLimitedLog
from strato.devices.legacy._common import BYTE, bool_field, int_field, open_bus, u8_field
from strato.interrupts import Trigger

log = logging.getLogger(__name__)
# Guest-triggerable log lines, each rate-limited (a guest must not flood the host log).
_log_command = RateLimitedLog(log)
_log_reset = RateLimitedLog(log)

I8042_PORT = 0x60
I8042_PORT_LEN = 5  # 0x60..0x64
KBD_IRQ = 1
AUX_IRQ = 12

DATA_OFFSET = 0  # port 0x60
PORT_B_OFFSET = 1  # port 0x61
COMMAND_OFFSET = 4  # port 0x64: status on read, command on write

PORT_B_VALUE = 0x20  # bit 5: PIT channel 2 output

# Controller commands (written to port 0x64).
CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTP = 0xD0
CMD_WRITE_OUTP = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE  # 0xF0-0xFF pulse output lines 0-3 (a 0 bit pulses); line 0 is reset

# Commands whose parameter byte follows on port 0x60.
_TWO_BYTE_COMMANDS = frozenset(
    {CMD_WRITE_CTR, CMD_WRITE_OUTP, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF, CMD_WRITE_AUX}
)

SELF_TEST_OK = 0x55
INTERFACE_TEST_OK = 0x00

# Status register bits.
STATUS_OBF = 0x01  # output buffer full: a byte waits on port 0x60
STATUS_IBF = 0x02  # input buffer full: never, we consume writes at once
STATUS_SYS = 0x04  # system flag (mirrors the command byte)
STATUS_CMD = 0x08  # the last write went to the command port
STATUS_UNLOCKED = 0x10  # keyboard not inhibited
STATUS_AUX_OBF = 0x20  # the byte on port 0x60 comes from the aux device

# Command byte ("CTR") bits.
CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40  # translate to scancode set 1

DEFAULT_CTR = CTR_KBD_INT | CTR_SYS
OUTP_RESET = 0x01  # output port bit 0: the CPU reset line, active low
OUTP_A20 = 0x02
DEFAULT_OUTP = OUTP_RESET | OUTP_A20

# Keyboard commands and replies.
KBD_CMD_SET_LEDS = 0xED
KBD_CMD_ECHO = 0xEE
KBD_CMD_SCANCODE_SET = 0xF0
KBD_CMD_GET_ID = 0xF2
KBD_CMD_SET_RATE = 0xF3
KBD_CMD_RESET = 0xFF
_KBD_COMMANDS_WITH_PARAM = frozenset({KBD_CMD_SET_LEDS, KBD_CMD_SCANCODE_SET, KBD_CMD_SET_RATE})
KBD_ACK = 0xFA
KBD_RESEND = 0xFE
KBD_BAT_OK = 0xAA
KBD_ID = (0xAB, 0x83)

BUFFER_SIZE = 16  # output bytes queued for the guest (Firecracker's bound)

# Ctrl, Alt, Del pressed then released, in scancode set 2 (untranslated) and set 1.
CTRL_ALT_DEL_SET2 = bytes([0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14])
CTRL_ALT_DEL_SET1 = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])


class I8042:
    """The i8042 on the PIO bus at I8042_PORT (length I8042_PORT_LEN).

    on_reset: called (outside the device lock) each time the guest pulses the reset line.
    kbd_irq / aux_irq: optional IRQ 1 / IRQ 12 triggers for keyboard / aux data.
    """

    def __init__(
        self,
        on_reset: Callable[[], object] | None = None,
        kbd_irq: Trigger | None = None,
        aux_irq: Trigger | None = None,
    ) -> None:
        self._on_reset = on_reset
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._lock = threading.Lock()
        self.ctr = DEFAULT_CTR
        self.outp = DEFAULT_OUTP
        self.last_was_command = False
        self.pending_command: int | None = None  # a two-byte command waiting for its byte
        self.kbd_pending_command: int | None = None  # keyboard command waiting for its byte
        self.scancode_set = 2
        self.buffer: deque[tuple[int, bool]] = deque()  # (byte, from aux device)
        self.resets = 0

    # -- bus interface -------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        if size != 1:
            return open_bus(size)
        with self._lock:
            if offset == COMMAND_OFFSET:
                return BYTE[self._status()]
            if offset == DATA_OFFSET:
                return BYTE[self._read_data()]
        if offset == PORT_B_OFFSET:
            return BYTE[PORT_B_VALUE]
        return open_bus(size)

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            return
        with self._lock:
            if offset == COMMAND_OFFSET:
                reset = self._command(data[0])
            elif offset == DATA_OFFSET:
                reset = self._write_data(data[0])
            else:
                return  # port B writes (speaker gate) and the unused ports
        if reset:
            self._reset()

    # -- host side -----------------------------------------------------------------------

    def trigger_ctrl_alt_del(self) -> bool:
        """Type Ctrl-Alt-Del (press and release); False if the output buffer has no room."""
        with self._lock:
            keys = CTRL_ALT_DEL_SET1 if self.ctr & CTR_XLATE else CTRL_ALT_DEL_SET2
            if BUFFER_SIZE - len(self.buffer) < len(keys):
                return False
            self.buffer.extend((b, False) for b in keys)
            self._raise_for_head()
            return True

    # -- snapshot ------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "ctr": self.ctr,
                "outp": self.outp,
                "last_was_command": self.last_was_command,
                "pending_command": self.pending_command,
                "kbd_pending_command": self.kbd_pending_command,
                "scancode_set": self.scancode_set,
                "buffer": [[b, aux] for b, aux in self.buffer],
            }

    def restore(self, state: Mapping[str, Any]) -> None:
        ctr = u8_field(state, "ctr")
        outp = u8_field(state, "outp")
        last_was_command = bool_field(state, "last_was_command")
        pending = _optional_byte(state, "pending_command")
        kbd_pending = _optional_byte(state, "kbd_pending_command")
        scancode_set = int_field(state, "scancode_set", 1, 3)
        raw = state.get("buffer")
        if not isinstance(raw, list) or len(raw) > BUFFER_SIZE:
            raise ValueError(f"snapshot field 'buffer': at most {BUFFER_SIZE} entries")
        buffer: list[tuple[int, bool]] = []
        for entry in raw:
            if (
                not isinstance(entry, list)
                or len(entry) != 2
                or type(entry[0]) is not int
                or not 0 <= entry[0] <= 0xFF
                or type(entry[1]) is not bool
            ):
                raise ValueError(f"snapshot field 'buffer': bad entry {entry!r}")
            buffer.append((entry[0], entry[1]))
        with self._lock:
            self.ctr, self.outp = ctr, outp
            self.last_was_command = last_was_command
            self.pending_command = pending
            self.kbd_pending_command = kbd_pending
            self.scancode_set = scancode_set
            self.buffer = deque(buffer)
            self._raise_for_head()

    # -- registers -----------------------------------------------------------------------

    def _status(self) -> int:
        status = STATUS_UNLOCKED | (self.ctr & CTR_SYS)
        if self.last_was_command:
            status |= STATUS_CMD
        if self.buffer:
            status |= STATUS_OBF
            if self.buffer[0][1]:
                status |= STATUS_AUX_OBF
        return status

    def _read_data(self) -> int:
        if not self.buffer:
            return 0
        value, _ = self.buffer.popleft()
        self._raise_for_head()  # more data waiting: interrupt again, as Firecracker does
        return value

    def _command(self, cmd: int) -> bool:
        """Handle a controller command; True if it pulses the reset line."""
        self.last_was_command = True
        self.pending_command = None
        if cmd in _TWO_BYTE_COMMANDS:
            self.pending_command = cmd
        elif cmd == CMD_READ_CTR:
            self._reply(self.ctr)
        elif cmd == CMD_READ_OUTP:
            self._reply(self.outp)
        elif cmd == CMD_SELF_TEST:
            self.ctr |= CTR_SYS
            self._reply(SELF_TEST_OK)
        elif cmd in (CMD_KBD_TEST, CMD_AUX_TEST):
            self._reply(INTERFACE_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self.ctr |= CTR_KBD_DISABLE
        elif cmd == CMD_KBD_ENABLE:
            self.ctr &= ~CTR_KBD_DISABLE
        elif cmd == CMD_AUX_DISABLE:
            self.ctr |= CTR_AUX_DISABLE
        elif cmd == CMD_AUX_ENABLE:
            self.ctr &= ~CTR_AUX_DISABLE
        elif cmd >= 0xF0:
            return not cmd & OUTP_RESET  # pulse output lines; bit 0 clear pulses reset
        else:
            _log_command.log(logging.DEBUG, "i8042: ignoring command %#04x", cmd)
        return False

    def _write_data(self, value: int) -> bool:
        """Handle a byte written to port 0x60; True if it resets the machine."""
        self.last_was_command = False
        cmd, self.pending_command = self.pending_command, None
        if cmd == CMD_WRITE_CTR:
            self.ctr = value
        elif cmd == CMD_WRITE_OUTP:
            self.outp = value
            return not value & OUTP_RESET
        elif cmd == CMD_WRITE_KBD_OUTBUF:
            self._push(value, aux=False)
        elif cmd == CMD_WRITE_AUX_OUTBUF:
            self._push(value, aux=True)
        elif cmd == CMD_WRITE_AUX:
            self._push(KBD_RESEND, aux=True)  # no mouse behind the aux port
        else:
            self._keyboard(value)
        return False

    def _keyboard(self, value: int) -> None:
        """A byte for the keyboard itself: answer like a plain AT keyboard."""
        cmd, self.kbd_pending_command = self.kbd_pending_command, None
        if cmd is not None:  # the parameter of SET_LEDS / SCANCODE_SET / SET_RATE
            self._flush()
            self._push(KBD_ACK, aux=False)
            if cmd == KBD_CMD_SCANCODE_SET:
                if value == 0:
                    self._push(self.scancode_set, aux=False)
                elif value in (1, 2, 3):
                    self.scancode_set = value
            return
        self._flush()
        if value == KBD_CMD_ECHO:
            self._push(KBD_CMD_ECHO, aux=False)
            return
        self._push(KBD_ACK, aux=False)
        if value == KBD_CMD_RESET:
            self.scancode_set = 2
            self._push(KBD_BAT_OK, aux=False)
        elif value == KBD_CMD_GET_ID:
            for b in KBD_ID:
                self._push(b, aux=False)
        elif value in _KBD_COMMANDS_WITH_PARAM:
            self.kbd_pending_command = value

    # -- buffer and interrupts ------------------------------------------------------------

    def _reply(self, value: int) -> None:
        """A controller reply: replaces whatever was queued (as Firecracker), no interrupt."""
        self._flush()
        self.buffer.append((value, False))

    def _flush(self) -> None:
        self.buffer.clear()

    def _push(self, value: int, *, aux: bool) -> None:
        """Queue a byte from the keyboard or aux device and raise its interrupt."""
        if len(self.buffer) >= BUFFER_SIZE:
            return  # a full controller loses the byte
        was_empty = not self.buffer
        self.buffer.append((value, aux))
        if was_empty:
            self._raise_for_head()

    def _raise_for_head(self) -> None:
        if not self.buffer:
            return
        if self.buffer[0][1]:
            if self._aux_irq is not None and self.ctr & CTR_AUX_INT:
                self._aux_irq.trigger()
        elif self._kbd_irq is not None and self.ctr & CTR_KBD_INT:
            self._kbd_irq.trigger()

    def _reset(self) -> None:
        self.resets += 1
        _log_reset.log(logging.INFO, "i8042: guest pulsed the reset line")
        if self._on_reset is not None:
            self._on_reset()


def _optional_byte(state: Mapping[str, Any], key: str) -> int | None:
    if state.get(key) is None:
        if key not in state:
            raise ValueError(f"snapshot field {key!r} missing")
        return None
    return u8_field(state, key)
