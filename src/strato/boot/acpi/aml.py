"""A small AML encoder (ACPI 6.5, chapter 20): each function returns the bytes of one term.

Enough for a microVM's DSDT: names, methods with a few expressions, packages, integers,
strings, buffers, resource templates, devices and scopes, operation regions and fields.
Objects nest by passing the bytes of the inner terms:

    device("_SB_.COM1", name("_HID", eisa_id("PNP0501")), name("_CRS", resource_template(
        io(0x3F8, 0x3F8, 1, 8), irq_no_flags(4))))
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
ALIAS_OP = 0x06
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
STRING_PREFIX = 0x0D
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
METHOD_OP = 0x14
DUAL_NAME_PREFIX = 0x2E
MULTI_NAME_PREFIX = 0x2F
EXT_OP_PREFIX = 0x5B
ROOT_CHAR = 0x5C
PARENT_PREFIX = 0x5E
LOCAL0_OP = 0x60
ARG0_OP = 0x68
STORE_OP = 0x70
ADD_OP = 0x72
AND_OP = 0x7B
OR_OP = 0x7D
NOTIFY_OP = 0x86
LAND_OP = 0x90
LNOT_OP = 0x92
LEQUAL_OP = 0x93
IF_OP = 0xA0
ELSE_OP = 0xA1
RETURN_OP = 0xA4
ONES_OP = 0xFF
# extended (after 0x5B)
MUTEX_OP = 0x01
OP_REGION_OP = 0x80
FIELD_OP = 0x81
DEVICE_OP = 0x82

# Operation region spaces
SYSTEM_MEMORY = 0x00
SYSTEM_IO = 0x01
PCI_CONFIG = 0x02

# Field access types and update rules
ACCESS_ANY = 0
ACCESS_BYTE = 1
ACCESS_WORD = 2
ACCESS_DWORD = 3
ACCESS_QWORD = 4
UPDATE_PRESERVE = 0
UPDATE_WRITE_AS_ONES = 1
UPDATE_WRITE_AS_ZEROS = 2

_NAME_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class AmlError(ValueError):
    """A name, value or length that AML cannot encode."""


# -- package length and names -----------------------------------------------------------------
def pkg_length(length: int, include_self: bool = True) -> bytes:
    """PkgLength encoding of `length` bytes (plus the length bytes themselves if include_self)."""
    for n in range(1, 5):
        total = length + (n if include_self else 0)
        limit = 0x3F if n == 1 else 1 << (4 + 8 * (n - 1))
        if total < limit or (n == 1 and total <= 0x3F):
            break
    else:
        raise AmlError(f"package of {length} bytes is too long")
    if n == 1:
        return bytes([total])
    out = [((n - 1) << 6) | (total & 0xF)]
    total >>= 4
    for _ in range(n - 1):
        out.append(total & 0xFF)
        total >>= 8
    return bytes(out)


def _name_seg(seg: str) -> bytes:
    raw = seg.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise AmlError(f"name segment {seg!r} must be 1-4 characters")
    raw = raw.ljust(4, b"_")
    if raw[0] in b"0123456789" or not set(raw) <= _NAME_CHARS:
        raise AmlError(f"invalid name segment {seg!r}")
    return raw


def name_string(path: str) -> bytes:
    r"""A NameString: optional '\' or '^'s, then dot-separated segments (padded with '_')."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = b"\\", path[1:]
    else:
        while path.startswith("^"):
            prefix += b"^"
            path = path[1:]
    if not path:
        return prefix + b"\x00"  # NullName
    segs = [_name_seg(s) for s in path.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError("path has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# -- data objects -------------------------------------------------------------------------------
def integer(value: int) -> bytes:
    """The shortest encoding of an integer (Zero, One, Ones, Byte/Word/DWord/QWord const)."""
    if value < 0 or value >= 1 << 64:
        raise AmlError(f"integer {value} out of range")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def ones() -> bytes:
    return bytes([ONES_OP])


def string(value: str) -> bytes:
    raw = value.encode("ascii")
    if b"\x00" in raw or any(c > 0x7F for c in raw):
        raise AmlError("AML strings are ASCII without NUL")
    return bytes([STRING_PREFIX]) + raw + b"\x00"


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def package(*elements: bytes) -> bytes:
    """Package(){...}: each element is the bytes of a data object (integer(), string()...)."""
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def eisa_id(eisa: str) -> bytes:
    """EISAID("PNP0A08"): three letters and four hex digits, compressed into a DWord."""
    if len(eisa) != 7 or not eisa[:3].isalpha() or not eisa[:3].isupper():
        raise AmlError(f"invalid EISA id {eisa!r}")
    try:
        product = int(eisa[3:], 16)
    except ValueError:
        raise AmlError(f"invalid EISA id {eisa!r}") from None
    c = [ord(ch) - 0x40 for ch in eisa[:3]]
    value = (c[0] << 26) | (c[1] << 21) | (c[2] << 16) | product
    return integer(int.from_bytes(value.to_bytes(4, "big"), "little"))


# -- named objects ------------------------------------------------------------------------------
def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def scope(path: str, *children: bytes) -> bytes:
    body = name_string(path) + b"".join(children)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *children: bytes) -> bytes:
    body = name_string(path) + b"".join(children)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


def method(
    path: str, nargs: int, *body: bytes, serialized: bool = False, sync_level: int = 0
) -> bytes:
    if not 0 <= nargs <= 7 or not 0 <= sync_level <= 15:
        raise AmlError("a method has 0-7 arguments and sync level 0-15")
    flags = nargs | (0x08 if serialized else 0) | (sync_level << 4)
    inner = name_string(path) + bytes([flags]) + b"".join(body)
    return bytes([METHOD_OP]) + pkg_length(len(inner)) + inner


def op_region(path: str, space: int, offset: int, length: int) -> bytes:
    return (
        bytes([EXT_OP_PREFIX, OP_REGION_OP])
        + name_string(path)
        + bytes([space])
        + integer(offset)
        + integer(length)
    )


def field(
    region: str,
    fields: list[tuple[str | None, int]],
    access: int = ACCESS_BYTE,
    lock: bool = False,
    update: int = UPDATE_PRESERVE,
) -> bytes:
    """Field(region, access, lock, update) { NAME, bits ... }; a None name reserves bits."""
    flags = access | (0x10 if lock else 0) | (update << 5)
    units = b""
    for fname, bits in fields:
        if fname is None:
            units += b"\x00" + pkg_length(bits, include_self=False)
        else:
            units += _name_seg(fname) + pkg_length(bits, include_self=False)
    body = name_string(region) + bytes([flags]) + units
    return bytes([EXT_OP_PREFIX, FIELD_OP]) + pkg_length(len(body)) + body


# -- method bodies ------------------------------------------------------------------------------
def local(n: int) -> bytes:
    if not 0 <= n <= 7:
        raise AmlError("Local0-Local7")
    return bytes([LOCAL0_OP + n])


def arg(n: int) -> bytes:
    if not 0 <= n <= 6:
        raise AmlError("Arg0-Arg6")
    return bytes([ARG0_OP + n])


def path(p: str) -> bytes:
    """A reference to a named object (as an operand)."""
    return name_string(p)


def null_target() -> bytes:
    return b"\x00"


def store(source: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + source + target


def and_(a: bytes, b: bytes, target: bytes = b"\x00") -> bytes:
    return bytes([AND_OP]) + a + b + target


def or_(a: bytes, b: bytes, target: bytes = b"\x00") -> bytes:
    return bytes([OR_OP]) + a + b + target


def lequal(a: bytes, b: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + a + b


def if_(predicate: bytes, *body: bytes) -> bytes:
    inner = predicate + b"".join(body)
    return bytes([IF_OP]) + pkg_length(len(inner)) + inner


def else_(*body: bytes) -> bytes:
    inner = b"".join(body)
    return bytes([ELSE_OP]) + pkg_length(len(inner)) + inner


def notify(obj: bytes, value: bytes) -> bytes:
    return bytes([NOTIFY_OP]) + obj + value


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


def call(p: str, *args: bytes) -> bytes:
    """A method invocation: its name then its arguments."""
    return name_string(p) + b"".join(args)


# -- resource descriptors (ACPI 6.5, 6.4) --------------------------------------------------------
END_TAG = 0x79


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate(){...}: a Buffer of descriptors closed by an End Tag (checksum 0)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))


def _large(tag: int, body: bytes) -> bytes:
    return bytes([0x80 | tag]) + struct.pack("<H", len(body)) + body


def io(minimum: int, maximum: int, alignment: int, length: int, decode16: bool = True) -> bytes:
    """IO(Decode16, min, max, align, len): the small I/O port descriptor."""
    return bytes([0x47, 1 if decode16 else 0]) + struct.pack(
        "<HHBB", minimum, maximum, alignment, length
    )


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags(){irq}: an ISA IRQ 0-15, edge-triggered, active high."""
    if not 0 <= irq <= 15:
        raise AmlError("ISA IRQs are 0-15")
    return bytes([0x22]) + struct.pack("<H", 1 << irq)


def memory32_fixed(base: int, length: int, writeable: bool = True) -> bytes:
    return _large(0x06, struct.pack("<BII", 1 if writeable else 0, base, length))


def extended_interrupt(
    *interrupts: int,
    consumer: bool = True,
    edge: bool = True,
    active_low: bool = False,
    shared: bool = False,
) -> bytes:
    """Interrupt(ResourceConsumer, Edge|Level, ActiveHigh|Low, Exclusive|Shared){...}."""
    if not 1 <= len(interrupts) <= 255:
        raise AmlError("1-255 interrupts")
    flags = (
        (1 if consumer else 0)
        | (2 if edge else 0)
        | (4 if active_low else 0)
        | (8 if shared else 0)
    )
    body = bytes([flags, len(interrupts)]) + b"".join(struct.pack("<I", i) for i in interrupts)
    return _large(0x09, body)


# Address space resource types and flags
_RESOURCE_MEMORY = 0
_RESOURCE_IO = 1
_RESOURCE_BUS = 2
_GENERAL_FLAGS = 0x0C  # MinFixed | MaxFixed, PosDecode, ResourceProducer... (consumer bit 0)


def _address_space(
    tag: int,
    fmt: str,
    rtype: int,
    type_flags: int,
    minimum: int,
    maximum: int,
    translation: int,
    producer: bool,
) -> bytes:
    if maximum < minimum:
        raise AmlError("address range maximum below minimum")
    general = _GENERAL_FLAGS | (0 if producer else 1)
    length = maximum - minimum + 1
    body = bytes([rtype, general, type_flags]) + struct.pack(
        "<" + fmt * 5, 0, minimum, maximum, translation, length
    )
    return _large(tag, body)


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, min, max, 0, len)."""
    return _address_space(0x08, "H", _RESOURCE_BUS, 0, minimum, maximum, 0, True)


def word_io(minimum: int, maximum: int, translation: int = 0) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _address_space(0x08, "H", _RESOURCE_IO, 3, minimum, maximum, translation, True)


def dword_io(minimum: int, maximum: int, translation: int = 0) -> bytes:
    return _address_space(0x07, "I", _RESOURCE_IO, 3, minimum, maximum, translation, True)


def _memory_flags(cacheable: bool, prefetchable: bool, writeable: bool) -> int:
    cache = 3 if prefetchable else (1 if cacheable else 0)
    return (cache << 1) | (1 if writeable else 0)


def dword_memory(
    minimum: int,
    maximum: int,
    cacheable: bool = False,
    prefetchable: bool = False,
    writeable: bool = True,
    translation: int = 0,
) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)."""
    return _address_space(
        0x07,
        "I",
        _RESOURCE_MEMORY,
        _memory_flags(cacheable, prefetchable, writeable),
        minimum,
        maximum,
        translation,
        True,
    )


def qword_memory(
    minimum: int,
    maximum: int,
    cacheable: bool = False,
    prefetchable: bool = False,
    writeable: bool = True,
    translation: int = 0,
) -> bytes:
    """QWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, ...)."""
    return _address_space(
        0x0A,
        "Q",
        _RESOURCE_MEMORY,
        _memory_flags(cacheable, prefetchable, writeable),
        minimum,
        maximum,
        translation,
        True,
    )
