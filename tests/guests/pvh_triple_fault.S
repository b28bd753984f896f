/* Triple fault: load an IDT with limit 0 and raise int3. The breakpoint cannot be delivered
 * (#GP), neither can the #GP (#DF), nor the #DF: the CPU shuts down.
 * Output:
 *   TRIPLE FAULT next
 */
    .include "pvh_common.S"

main:
    PUTS "TRIPLE FAULT next\n"
    lidtl empty_idt
    int3
    PUTS "still alive after int3\n"
    ret

    .section .rodata
    .p2align 3
empty_idt:
    .word 0                         /* limit 0: no vector is inside the table */
    .long 0
    .text
