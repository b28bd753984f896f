/* Real mode: write "Hi" to port 0x3f8, read port 0x99 (unknown: all-ones) and echo it to 0x3f9,
 * write to MMIO 0x8000 (unmapped memory inside the first 64 KiB? no: RAM) ... then reset through
 * the i8042 (0xFE to port 0x64). */
    .code16
    .globl _start
_start:
    mov $0x3f8, %dx
    mov $'H', %al
    out %al, %dx
    mov $'i', %al
    out %al, %dx
    mov $0x99, %dx
    in %dx, %al
    mov $0x3f9, %dx
    out %al, %dx
    mov $0xfe, %al
    out %al, $0x64
1:  hlt
    jmp 1b
