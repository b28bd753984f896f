"""The x86 boot protocol's zero page: struct boot_params and struct setup_header.

Declared from linux/arch/x86/include/uapi/asm/bootparam.h (packed, little endian). Parts of
boot_params strato never fills (screen, APM, EDD, EFI, ...) are kept as opaque byte arrays of
the right size so every offset matches the kernel's.
"""

from __future__ import annotations

import ctypes

__all__ = [
    "BOOT_FLAG_MAGIC",
    "CAN_USE_HEAP",
    "E820_MAX_ENTRIES_ZEROPAGE",
    "HDRS_MAGIC",
    "KEEP_SEGMENTS",
    "LOADED_HIGH",
    "SETUP_HEADER_OFFSET",
    "TYPE_OF_LOADER_UNDEFINED",
    "XLF_CAN_BE_LOADED_ABOVE_4G",
    "XLF_KERNEL_64",
    "BootE820Entry",
    "BootParams",
    "SetupHeader",
]

HDRS_MAGIC = 0x53726448  # "HdrS" read as a little-endian u32
BOOT_FLAG_MAGIC = 0xAA55
SETUP_HEADER_OFFSET = 0x1F1
TYPE_OF_LOADER_UNDEFINED = 0xFF  # "a boot loader without an assigned id"
E820_MAX_ENTRIES_ZEROPAGE = 128

# loadflags
LOADED_HIGH = 1 << 0
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7

# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class SetupHeader(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", _u8),
        ("root_flags", _u16),
        ("syssize", _u32),
        ("ram_size", _u16),
        ("vid_mode", _u16),
        ("root_dev", _u16),
        ("boot_flag", _u16),
        ("jump", _u16),
        ("header", _u32),
        ("version", _u16),
        ("realmode_swtch", _u32),
        ("start_sys_seg", _u16),
        ("kernel_version", _u16),
        ("type_of_loader", _u8),
        ("loadflags", _u8),
        ("setup_move_size", _u16),
        ("code32_start", _u32),
        ("ramdisk_image", _u32),
        ("ramdisk_size", _u32),
        ("bootsect_kludge", _u32),
        ("heap_end_ptr", _u16),
        ("ext_loader_ver", _u8),
        ("ext_loader_type", _u8),
        ("cmd_line_ptr", _u32),
        ("initrd_addr_max", _u32),
        ("kernel_alignment", _u32),
        ("relocatable_kernel", _u8),
        ("min_alignment", _u8),
        ("xloadflags", _u16),
        ("cmdline_size", _u32),
        ("hardware_subarch", _u32),
        ("hardware_subarch_data", _u64),
        ("payload_offset", _u32),
        ("payload_length", _u32),
        ("setup_data", _u64),
        ("pref_address", _u64),
        ("init_size", _u32),
        ("handover_offset", _u32),
        ("kernel_info_offset", _u32),
    ]

    @property
    def setup_sectors(self) -> int:
        """512-byte sectors of real-mode setup code (0 means 4, for ancient kernels)."""
        return int(self.setup_sects) or 4

    @property
    def version_str(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


class BootE820Entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", _u64), ("size", _u64), ("type", _u32)]


_SETUP_HEADER_END = SETUP_HEADER_OFFSET + ctypes.sizeof(SetupHeader)


class BootParams(ctypes.LittleEndianStructure):
    """struct boot_params, the 4096-byte "zero page"."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", _u8 * 0x40),  # 0x000
        ("apm_bios_info", _u8 * 0x14),  # 0x040
        ("_pad2", _u8 * 4),  # 0x054
        ("tboot_addr", _u64),  # 0x058
        ("ist_info", _u8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", _u64),  # 0x070
        ("_pad3", _u8 * 8),  # 0x078
        ("hd0_info", _u8 * 16),  # 0x080
        ("hd1_info", _u8 * 16),  # 0x090
        ("sys_desc_table", _u8 * 16),  # 0x0a0
        ("olpc_ofw_header", _u8 * 16),  # 0x0b0
        ("ext_ramdisk_image", _u32),  # 0x0c0
        ("ext_ramdisk_size", _u32),  # 0x0c4
        ("ext_cmd_line_ptr", _u32),  # 0x0c8
        ("_pad4", _u8 * 112),  # 0x0cc
        ("cc_blob_address", _u32),  # 0x13c
        ("edid_info", _u8 * 0x80),  # 0x140
        ("efi_info", _u8 * 0x20),  # 0x1c0
        ("alt_mem_k", _u32),  # 0x1e0
        ("scratch", _u32),  # 0x1e4
        ("e820_entries", _u8),  # 0x1e8
        ("eddbuf_entries", _u8),  # 0x1e9
        ("edd_mbr_sig_buf_entries", _u8),  # 0x1ea
        ("kbd_status", _u8),  # 0x1eb
        ("secure_boot", _u8),  # 0x1ec
        ("_pad5", _u8 * 2),  # 0x1ed
        ("sentinel", _u8),  # 0x1ef
        ("_pad6", _u8 * 1),  # 0x1f0
        ("hdr", SetupHeader),  # 0x1f1
        ("_pad7", _u8 * (0x290 - _SETUP_HEADER_END)),
        ("edd_mbr_sig_buffer", _u32 * 16),  # 0x290
        ("e820_table", BootE820Entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2d0
        ("_pad8", _u8 * 48),  # 0xcd0
        ("eddbuf", _u8 * (6 * 82)),  # 0xd00
        ("_pad9", _u8 * 276),  # 0xeec
    ]
