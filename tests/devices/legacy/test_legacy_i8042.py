"""The i8042 driven like Linux's i8042 driver and the kernel's reboot path."""

from __future__ import annotations

import json

import pytest

from strato.devices.legacy import i8042 as k
from strato.devices.legacy.i8042 import I8042
from strato.interrupts import CountingTrigger

DATA, CMD = k.DATA_OFFSET, k.COMMAND_OFFSET


class Ctl:
    def __init__(self) -> None:
        self.resets = 0
        self.kbd = CountingTrigger()
        self.aux = CountingTrigger()
        self.dev = I8042(on_reset=self.reset, kbd_irq=self.kbd, aux_irq=self.aux)

    def reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.dev.read(CMD, 1)[0]

    def data(self) -> int:
        return self.dev.read(DATA, 1)[0]

    def command(self, cmd: int, param: int | None = None) -> None:
        self.dev.write(CMD, bytes([cmd]))
        if param is not None:
            self.dev.write(DATA, bytes([param]))

    def send(self, value: int) -> None:
        self.dev.write(DATA, bytes([value]))

    def drain(self) -> list[int]:
        """i8042_flush: read while OBF, at most the controller's buffer size."""
        out = []
        for _ in range(k.BUFFER_SIZE + 1):
            if not self.status() & k.STATUS_OBF:
                break
            out.append(self.data())
        return out


def test_pulse_reset_calls_on_reset_exactly_once() -> None:
    c = Ctl()
    c.command(k.CMD_PULSE_RESET)
    assert c.resets == 1
    c.command(0xFF)  # pulse no line
    c.command(0xF1)  # pulse lines 1-3, not reset
    c.send(k.CMD_PULSE_RESET)  # 0xFE on the data port is a keyboard byte, not a reset
    assert c.resets == 1
    c.command(0xF0)  # all four lines, including reset
    assert c.resets == 2


def test_writing_output_port_with_reset_low_resets() -> None:
    c = Ctl()
    c.command(k.CMD_READ_OUTP)
    outp = c.data()
    assert outp & k.OUTP_RESET
    c.command(k.CMD_WRITE_OUTP, outp | k.OUTP_A20)  # the A20 dance must not reset
    assert c.resets == 0
    c.command(k.CMD_WRITE_OUTP, outp & ~k.OUTP_RESET)
    assert c.resets == 1


def test_reset_without_callback_is_harmless() -> None:
    dev = I8042()
    dev.write(CMD, bytes([k.CMD_PULSE_RESET]))
    assert dev.resets == 1


def test_linux_controller_probe() -> None:
    c = Ctl()
    assert c.drain() == []
    # i8042_controller_selftest
    c.command(k.CMD_SELF_TEST)
    assert c.status() & k.STATUS_OBF
    assert c.data() == k.SELF_TEST_OK
    # i8042_controller_init: read the command byte, write it back changed.
    c.command(k.CMD_READ_CTR)
    ctr = c.data()
    assert ctr == k.DEFAULT_CTR
    assert c.status() & k.STATUS_CMD
    new_ctr = (ctr | k.CTR_XLATE) & ~k.CTR_KBD_INT
    c.command(k.CMD_WRITE_CTR, new_ctr)
    assert not c.status() & k.STATUS_CMD
    c.command(k.CMD_READ_CTR)
    assert c.data() == new_ctr
    # Keyboard interface test.
    c.command(k.CMD_KBD_TEST)
    assert c.data() == k.INTERFACE_TEST_OK
    # Controller replies do not interrupt.
    assert c.kbd.count == 0 and c.aux.count == 0
    assert c.resets == 0


def test_aux_loopback_and_absent_mouse() -> None:
    c = Ctl()
    c.command(k.CMD_WRITE_CTR, k.DEFAULT_CTR | k.CTR_AUX_INT)
    c.command(k.CMD_WRITE_AUX_OUTBUF, 0x5A)  # i8042_check_aux's loop test
    status = c.status()
    assert status & k.STATUS_OBF and status & k.STATUS_AUX_OBF
    assert c.aux.count == 1 and c.kbd.count == 0
    assert c.data() == 0x5A
    assert not c.status() & k.STATUS_AUX_OBF
    c.command(k.CMD_WRITE_AUX, 0xF2)  # GET_ID to the mouse: nobody home
    assert c.status() & k.STATUS_AUX_OBF
    assert c.data() == k.KBD_RESEND
    c.command(k.CMD_AUX_DISABLE)
    c.command(k.CMD_READ_CTR)
    assert c.data() & k.CTR_AUX_DISABLE
    c.command(k.CMD_AUX_ENABLE)
    c.command(k.CMD_READ_CTR)
    assert not c.data() & k.CTR_AUX_DISABLE


def test_write_keyboard_output_buffer_raises_irq1() -> None:
    c = Ctl()
    c.command(k.CMD_WRITE_KBD_OUTBUF, 0x1C)
    assert c.kbd.count == 1
    assert c.status() & (k.STATUS_OBF | k.STATUS_AUX_OBF) == k.STATUS_OBF
    assert c.data() == 0x1C
    c.command(k.CMD_WRITE_CTR, 0)  # keyboard interrupt off
    c.command(k.CMD_WRITE_KBD_OUTBUF, 0x1C)
    assert c.kbd.count == 1
    assert c.data() == 0x1C


def test_keyboard_commands() -> None:
    c = Ctl()
    c.send(k.KBD_CMD_RESET)
    assert c.drain() == [k.KBD_ACK, k.KBD_BAT_OK]
    c.send(k.KBD_CMD_GET_ID)
    assert c.drain() == [k.KBD_ACK, *k.KBD_ID]
    c.send(k.KBD_CMD_SET_LEDS)
    assert c.drain() == [k.KBD_ACK]
    c.send(0xFF)  # LED bits, not a reset
    assert c.drain() == [k.KBD_ACK]
    c.send(k.KBD_CMD_SCANCODE_SET)
    assert c.drain() == [k.KBD_ACK]
    c.send(0)  # query the current set
    assert c.drain() == [k.KBD_ACK, 2]
    c.send(k.KBD_CMD_ECHO)
    assert c.drain() == [k.KBD_CMD_ECHO]
    c.send(0xF4)  # enable scanning
    assert c.drain() == [k.KBD_ACK]
    assert c.kbd.count >= 6


@pytest.mark.parametrize("xlate", [False, True])
def test_ctrl_alt_del(xlate: bool) -> None:
    c = Ctl()
    if xlate:
        c.command(k.CMD_WRITE_CTR, k.DEFAULT_CTR | k.CTR_XLATE)
    assert c.dev.trigger_ctrl_alt_del()
    assert c.kbd.count >= 1
    expected = k.CTRL_ALT_DEL_SET1 if xlate else k.CTRL_ALT_DEL_SET2
    assert bytes(c.drain()) == expected
    # While the guest does not read, only whole sequences that fit are queued.
    fitted = 0
    while c.dev.trigger_ctrl_alt_del():
        fitted += 1
    assert fitted == k.BUFFER_SIZE // len(expected)
    assert len(c.dev.buffer) <= k.BUFFER_SIZE
    assert c.resets == 0


def test_output_buffer_is_bounded() -> None:
    c = Ctl()
    for i in range(100):
        c.command(k.CMD_WRITE_KBD_OUTBUF, i)
        assert len(c.dev.buffer) <= k.BUFFER_SIZE
    assert c.drain() == list(range(k.BUFFER_SIZE))


def test_port_b_and_unused_ports() -> None:
    dev = I8042()
    assert dev.read(k.PORT_B_OFFSET, 1) == bytes([k.PORT_B_VALUE])
    assert dev.read(2, 1) == b"\xff"
    assert dev.read(DATA, 2) == b"\xff\xff"
    assert dev.read(DATA, 1) == b"\x00"  # empty buffer
    dev.write(k.PORT_B_OFFSET, b"\x03")
    dev.write(CMD, b"\xfe\xfe")  # wrong size: ignored
    assert dev.resets == 0


def test_state_roundtrip() -> None:
    c = Ctl()
    c.command(k.CMD_WRITE_CTR, 0x47)
    c.command(k.CMD_WRITE_KBD_OUTBUF, 0x11)
    c.command(k.CMD_WRITE_AUX_OUTBUF, 0x22)
    c.command(k.CMD_WRITE_OUTP)  # waiting for its parameter
    state = json.loads(json.dumps(c.dev.state()))
    kbd = CountingTrigger()
    dev2 = I8042(kbd_irq=kbd)
    dev2.restore(state)
    assert dev2.state() == c.dev.state()
    assert kbd.count == 1  # data waiting: interrupt raised again
    assert dev2.read(DATA, 1) == b"\x11"
    with pytest.raises(ValueError):
        dev2.restore({**state, "buffer": [[1, 2]]})
    with pytest.raises(ValueError):
        dev2.restore({**state, "pending_command": 999})
