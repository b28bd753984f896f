"""MSI-X table, masking and pending bits, and the MSI routing layer, with a recording backend."""

from __future__ import annotations

import json
import struct

import pytest

from strato.interrupts.msi import (
    FIRST_MSI_GSI,
    IRQCHIP_IOAPIC,
    IRQCHIP_PIC_MASTER,
    IRQCHIP_PIC_SLAVE,
    IrqchipRoute,
    MsiRoute,
    MsiRouting,
    legacy_irqchip_routes,
)
from strato.pci.msix import MsixTable, msix_capability_body, pba_size_bytes

from .helpers import FakeRoutingBackend

ADDR = 0xFEE0_0000


def setup(n: int = 4) -> tuple[FakeRoutingBackend, MsiRouting, MsixTable]:
    backend = FakeRoutingBackend()
    routing = MsiRouting(backend)
    group = routing.allocate_group(n)
    return backend, routing, MsixTable(n, group)


def program(table: MsixTable, vector: int, data: int, masked: bool = False) -> None:
    base = vector * 16
    table.write_table(base, struct.pack("<I", ADDR))
    table.write_table(base + 4, struct.pack("<I", 0))
    table.write_table(base + 8, struct.pack("<I", data))
    table.write_table(base + 12, struct.pack("<I", 1 if masked else 0))


# -- routing ---------------------------------------------------------------------------------------
def test_legacy_routes_match_kvm_defaults() -> None:
    routes = legacy_irqchip_routes()
    ioapic = [r for r in routes if r.irqchip == IRQCHIP_IOAPIC]
    assert [(r.gsi, r.pin) for r in ioapic] == [(g, g) for g in range(24)]
    master = [r for r in routes if r.irqchip == IRQCHIP_PIC_MASTER]
    slave = [r for r in routes if r.irqchip == IRQCHIP_PIC_SLAVE]
    assert [(r.gsi, r.pin) for r in master] == [(g, g) for g in range(8)]
    assert [(r.gsi, r.pin) for r in slave] == [(g, g - 8) for g in range(8, 16)]
    assert len(routes) == 40
    qemu_style = legacy_irqchip_routes(irq0_to_pin2=True)
    pins = [(r.gsi, r.pin) for r in qemu_style if r.irqchip == IRQCHIP_IOAPIC]
    assert pins[:3] == [(0, 2), (1, 1), (3, 3)] and len(pins) == 23


def test_vectors_get_gsis_from_24_and_irqfds() -> None:
    backend = FakeRoutingBackend()
    routing = MsiRouting(backend)
    a = routing.allocate_group(3)
    b = routing.allocate_group(2)
    assert [a.gsi(i) for i in range(3)] == [24, 25, 26]
    assert [b.gsi(i) for i in range(2)] == [27, 28]
    assert set(backend.irqfds) == {24, 25, 26, 27, 28}
    assert backend.tables == []  # nothing routed yet
    a.close()
    assert set(backend.irqfds) == {27, 28}
    c = routing.allocate_group(1)
    assert c.gsi(0) == FIRST_MSI_GSI  # freed GSIs are reused


def test_every_update_resends_the_whole_table_with_legacy_entries() -> None:
    backend = FakeRoutingBackend()
    routing = MsiRouting(backend)
    group = routing.allocate_group(2)
    group.update(0, ADDR, 0x41)
    group.update(1, ADDR | 0x1000, 0x42)
    assert len(backend.tables) == 2
    table = backend.table
    assert table[:40] == legacy_irqchip_routes()
    assert table[40:] == [MsiRoute(24, ADDR, 0, 0x41), MsiRoute(25, ADDR | 0x1000, 0, 0x42)]
    group.update(1, ADDR | 0x1000, 0x42)  # unchanged: no ioctl
    assert len(backend.tables) == 2
    group.update(0, (0x1 << 32) | ADDR, 0x43)
    assert backend.msi_routes()[24] == MsiRoute(24, ADDR, 1, 0x43)
    group.close()
    assert backend.msi_routes() == {}
    assert all(isinstance(r, IrqchipRoute) for r in backend.table)


def test_gsi_exhaustion() -> None:
    routing = MsiRouting(FakeRoutingBackend(), max_gsi=25)
    routing.allocate_group(2)
    with pytest.raises(RuntimeError):
        routing.allocate_group(1)


# -- MSI-X table -----------------------------------------------------------------------------------
def test_capability_body() -> None:
    body = msix_capability_body(3, 0, 0x8000, 0, 0x48000)
    assert body == struct.pack("<HII", 2, 0x8000, 0x48000)
    assert pba_size_bytes(3) == 8 and pba_size_bytes(65) == 16
    with pytest.raises(ValueError):
        msix_capability_body(3, 0, 0x8004, 0, 0)


def test_entries_start_masked_and_disabled() -> None:
    backend, _, table = setup()
    for v in range(4):
        assert table.read_table(16 * v + 12, 4) == struct.pack("<I", 1)
    assert not table.fire(0)
    assert table.read_pba(0, 8) == struct.pack("<Q", 0b1)
    assert backend.tables == []


def test_fire_delivers_through_the_irqfd_when_live() -> None:
    backend, _, table = setup()
    program(table, 2, 0x45)
    assert backend.tables == []  # MSI-X still disabled: no route yet
    table.set_message_control(0x8000)
    assert backend.msi_routes()[26] == MsiRoute(26, ADDR, 0, 0x45)
    assert table.fire(2)
    assert backend.fired(26) == 1
    assert backend.fired(24) == 0
    assert not table.fire(0)  # vector 0 is still masked
    assert table.read_pba(0, 4) == struct.pack("<I", 0b1)


def test_masked_vector_sets_pending_and_unmask_delivers() -> None:
    backend, _, table = setup()
    table.set_message_control(0x8000)
    program(table, 1, 0x50, masked=True)
    assert not table.fire(1)
    assert not table.fire(1)
    assert table.read_pba(0, 8) == struct.pack("<Q", 0b10)
    assert backend.fired(25) == 0
    table.write_table(16 + 12, struct.pack("<I", 0))  # unmask
    assert backend.fired(25) == 1  # one message for the pending bit
    assert table.read_pba(0, 8) == bytes(8)
    assert backend.msi_routes()[25].data == 0x50


def test_function_mask() -> None:
    backend, _, table = setup()
    program(table, 0, 0x60)
    table.set_message_control(0xC000)  # enabled, function masked
    assert not table.fire(0)
    assert table.read_pba(0, 4) == struct.pack("<I", 1)
    assert backend.fired(24) == 0
    table.set_message_control(0x8000)
    assert backend.fired(24) == 1
    assert table.fire(0) and backend.fired(24) == 1
    table.set_message_control(0x0000)  # disabled: nothing is delivered
    assert not table.fire(0) and backend.fired(24) == 0


def test_64bit_table_accesses_and_bad_shapes() -> None:
    _, _, table = setup()
    table.write_table(16, struct.pack("<Q", 0x1_FEE0_1000))
    table.write_table(24, struct.pack("<II", 0x77, 0xFFFF_FFFF))
    assert table.read_table(16, 8) == struct.pack("<Q", 0x1_FEE0_1000)
    assert table.read_table(24, 8) == struct.pack("<II", 0x77, 1)  # reserved ctl bits read 0
    assert table.read_table(20, 4) == struct.pack("<I", 1)
    # wrong sizes, misaligned, out of range: no effect, zeros back
    before = table.state()
    for off, data in (
        (1, b"\x01\x02\x03\x04"),
        (16, b"\x01"),
        (4 * 16, b"\x01\x00\x00\x00"),
        (18, b"\x00\x00"),
    ):
        table.write_table(off, data)
    assert table.state() == before
    assert table.read_table(2, 4) == bytes(4)
    assert table.read_table(1 << 20, 4) == bytes(4)
    assert table.read_table(0, 2) == bytes(2)
    table.write_pba(0, bytes(8))
    assert table.read_pba(3, 4) == bytes(4)


def test_state_restore_reroutes() -> None:
    _, routing, table = setup()
    program(table, 3, 0x99)
    table.set_message_control(0x8000)
    state = json.loads(json.dumps(table.state()))
    backend2 = FakeRoutingBackend()
    table2 = MsixTable(4, MsiRouting(backend2).allocate_group(4))
    table2.restore(state)
    assert table2.enabled
    assert backend2.msi_routes()[27] == MsiRoute(27, ADDR, 0, 0x99)
    with pytest.raises(ValueError):
        MsixTable(2, routing.allocate_group(2)).restore(state)
