/* PVH to 64-bit long mode: from the PVH entry state, build page tables and a GDT (pvh_common's
 * enter_long_mode), switch to long mode and print from 64-bit code, then reset.
 * Output:
 *   PVH32 entering long mode
 *   LONG64 hello
 *   EFER <16 hex digits>          (LME and LMA must be set)
 *   WIDE <16 hex digits>          (a 64-bit immediate: only 64-bit code prints it whole)
 *   BYE
 */
    .include "pvh_common.S"

main:
    PUTS "PVH32 entering long mode\n"
    mov $main64, %eax
    jmp enter_long_mode

    .code64
main64:
    PUTS64 "LONG64 hello\n"
    PUTS64 "EFER "
    mov $MSR_EFER, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    call puthex64
    PUTS64 "\nWIDE "
    movabs $0x0123456789abcdef, %rax
    call puthex64
    PUTS64 "\nBYE\n"
    jmp reset64
