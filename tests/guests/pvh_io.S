/* Port and MMIO exits both ways, from 32-bit protected mode (paging off, so every address is
 * guest-physical).
 * - IN from port 0x99, where nothing is: 8, 16 and 32 bits, printed; an OUT to it too.
 * - MMIO at 0xD0000000 (in the 32-bit MMIO hole): a 32-bit write of 0x12345678, a 16-bit write
 *   of 0xBEEF at +4, then a 32-bit read at +0 and an 8-bit read at +8, printed.
 * - String I/O: `rep insb` of 4 bytes from port 0x99, printed, and the line itself written to
 *   COM1 with `rep outsb` (KVM may hand several elements to the VMM in one exit).
 * Output:
 *   PORT8 <2> PORT16 <4> PORT32 <8>
 *   MMIO32 <8> MMIO8 <2>
 *   REP INSB <8 hex digits: the 4 bytes, last one first>
 *   REP OUTSB ok
 *   BYE
 */
    .include "pvh_common.S"

    .set NOWHERE_PORT, 0x99
    .set MMIO_BASE, 0xd0000000

main:
    PUTS "PORT8 "
    mov $NOWHERE_PORT, %dx
    in %dx, %al
    mov $2, %ecx
    call puthex
    PUTS " PORT16 "
    in %dx, %ax
    mov $4, %ecx
    call puthex
    PUTS " PORT32 "
    in %dx, %eax
    mov $8, %ecx
    call puthex
    mov $0x5a, %al
    out %al, %dx
    PUTS "\n"

    movl $0x12345678, MMIO_BASE
    movw $0xbeef, MMIO_BASE + 4
    PUTS "MMIO32 "
    mov MMIO_BASE, %eax
    mov $8, %ecx
    call puthex
    PUTS " MMIO8 "
    movzbl MMIO_BASE + 8, %eax
    mov $2, %ecx
    call puthex
    PUTS "\nREP INSB "
    mov $NOWHERE_PORT, %dx
    mov $ins_buffer, %edi
    mov $4, %ecx
    cld
    rep insb
    mov ins_buffer, %eax
    mov $8, %ecx
    call puthex
    PUTS "\n"
    mov $COM1, %dx
    mov $outs_line, %esi
    mov $(outs_line_end - outs_line), %ecx
    rep outsb
    PUTS "BYE\n"
    ret

    .section .rodata
outs_line:
    .ascii "REP OUTSB ok\n"
outs_line_end:

    .data
    .p2align 2
ins_buffer:
    .long 0
    .text
