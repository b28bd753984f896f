"""Fuzz targets "serial" (16550A at COM1) and "i8042": port I/O from a hostile guest.

Accesses go through a real PIO bus at the real ports, at every width (1, 2, 4 and odd ones)
and at the ports around each device, interleaved with host input. For any sequence:
- nothing raises, every read returns exactly the bytes asked for, the FIFOs stay bounded;
- a snapshot taken at any point and restored into a fresh device behaves exactly like the
  original from then on (same reads, same output, same resets);
- afterwards a guest that re-initialises the device the usual way gets it working (the serial
  port transmits and receives, the i8042 passes its self-test).
tests/devices/legacy/test_legacy_fuzz.py drives the devices directly with state invariants;
this adds the bus, the lockstep snapshot check and the recovery check.
"""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from strato.bus import Bus
from strato.devices.legacy import COM1_PORT, I8042, I8042_PORT, SERIAL_PORT_LEN, Serial
from strato.devices.legacy import i8042 as kbd
from strato.devices.legacy import serial as uart
from strato.interrupts import CountingTrigger
from tests.fuzz._support import count, fuzz_settings

Op = tuple[str, int, Any]


def ops(base: int, length: int, interesting: list[int]) -> st.SearchStrategy[list[Op]]:
    port = st.integers(base - 2, base + length + 1)
    value = st.sampled_from(interesting) | st.integers(0, 255)
    data = st.one_of(
        value.map(lambda v: bytes([v])),
        st.binary(min_size=0, max_size=5),
    )
    return st.lists(
        st.one_of(
            st.tuples(st.just("in"), port, st.sampled_from([1, 1, 1, 2, 4, 0, 3])),
            st.tuples(st.just("out"), port, data),
            st.tuples(st.just("host"), st.just(0), st.binary(max_size=80)),
            st.tuples(st.just("snapshot"), st.just(0), st.none()),
        ),
        min_size=10,
        max_size=150,
    )


class Machine:
    """One device on a PIO bus with what it did to the outside world recorded."""

    def __init__(self, kind: str, state: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.out = bytearray()
        self.resets = 0
        self.irq = CountingTrigger()
        self.bus = Bus("pio")
        self.dev: Serial | I8042
        if kind == "serial":
            self.dev = Serial(self.irq, self.out.extend)
            self.bus.insert(self.dev, COM1_PORT, SERIAL_PORT_LEN)
        else:
            self.dev = I8042(on_reset=self._reset, kbd_irq=self.irq)
            self.bus.insert(self.dev, I8042_PORT, kbd.I8042_PORT_LEN)
        if state is not None:
            self.dev.restore(state)

    def _reset(self) -> None:
        self.resets += 1

    def step(self, op: Op) -> object:
        kind, port, arg = op
        if kind == "in":
            got = self.bus.read(port, arg)
            assert got is None or len(got) == arg
            return got
        if kind == "out":
            return self.bus.write(port, arg)
        if kind == "host":
            if isinstance(self.dev, Serial):
                return self.dev.enqueue_input(arg)
            return self.dev.trigger_ctrl_alt_del()
        return None

    def check(self) -> None:
        if isinstance(self.dev, Serial):
            assert len(self.dev.rx) <= uart.FIFO_SIZE
            assert self.dev.ier <= uart.IER_MASK and self.dev.mcr <= uart.MCR_MASK
        else:
            assert len(self.dev.buffer) <= kbd.BUFFER_SIZE


def run_lockstep(kind: str, seq: list[Op]) -> Machine:
    a = Machine(kind)
    b: Machine | None = None
    for op in seq:
        if op[0] == "snapshot":
            b = Machine(kind, a.dev.state())
            assert b.dev.state() == a.dev.state()
            a.out.clear()
            a.resets = 0
            continue
        got = a.step(op)
        a.check()
        if b is not None:
            assert b.step(op) == got, op
            assert (bytes(b.out), b.resets) == (bytes(a.out), a.resets)
    return a


def _serial_works(m: Machine) -> None:
    bus, out = m.bus, m.out
    bus.write(COM1_PORT + uart.LCR, b"\x03")  # 8N1, DLAB off
    bus.write(COM1_PORT + uart.MCR, b"\x0b")  # DTR, RTS, OUT2; loopback off
    bus.write(COM1_PORT + uart.FCR, b"\x07")  # FIFO on, both cleared
    out.clear()
    bus.write(COM1_PORT + uart.THR, b"Z")
    assert bytes(out) == b"Z"
    assert isinstance(m.dev, Serial)
    assert m.dev.enqueue_input(b"k") == 1
    assert bus.read(COM1_PORT + uart.LSR, 1) == bytes([uart.LSR_DR | uart.LSR_THRE | uart.LSR_TEMT])
    assert bus.read(COM1_PORT + uart.RBR, 1) == b"k"


def _i8042_works(m: Machine) -> None:
    bus = m.bus
    bus.write(I8042_PORT + kbd.COMMAND_OFFSET, bytes([kbd.CMD_SELF_TEST]))
    status = bus.read(I8042_PORT + kbd.COMMAND_OFFSET, 1)
    assert status is not None and status[0] & kbd.STATUS_OBF
    assert bus.read(I8042_PORT + kbd.DATA_OFFSET, 1) == bytes([kbd.SELF_TEST_OK])


SERIAL_VALUES = [0x80, 0x03, 0x0F, 0x10, 0x1F, 0x07, 0xC7, 0x02, 0x00, 0xFF]
I8042_VALUES = [0x20, 0x60, 0xAA, 0xAB, 0xAD, 0xAE, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xFE, 0xFF]
I8042_VALUES += [0xED, 0xEE, 0xF0, 0xF2, 0xF3, 0x00, 0x01]


@fuzz_settings(250)
@given(seq=ops(COM1_PORT, SERIAL_PORT_LEN, SERIAL_VALUES))
@example(  # loopback with a full FIFO, then a snapshot: the overrun and FIFO carry over
    seq=[("out", COM1_PORT + 4, b"\x10")]
    + [("out", COM1_PORT, b"x")] * 70
    + [("snapshot", 0, None), ("in", COM1_PORT + 5, 1), ("in", COM1_PORT, 1)]
)
def test_serial_port_io(seq: list[Op]) -> None:
    count("serial")
    _serial_works(run_lockstep("serial", seq))


@fuzz_settings(250)
@given(seq=ops(I8042_PORT, kbd.I8042_PORT_LEN, I8042_VALUES))
@example(  # a two-byte command pending across a snapshot, then its parameter
    seq=[("out", I8042_PORT + 4, b"\xd1"), ("snapshot", 0, None), ("out", I8042_PORT, b"\x00")]
)
def test_i8042_port_io(seq: list[Op]) -> None:
    count("i8042")
    m = run_lockstep("i8042", seq)
    _i8042_works(m)
