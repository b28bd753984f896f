/* ACPI power management through the FADT's registers (strato's AcpiShutdown at port 0x600):
 * the command line's first character picks what to do.
 *   's' -> write SLP_TYP=5 | SLP_EN (0x34) to the sleep control register: S5, power off
 *   'r' -> write the reset value (1) to the reset register: reboot
 * Prints "ACPI <c>" first; if the VM is still running afterwards it prints "STILL RUNNING". */
    .include "pvh_common.S"

    .set START_INFO_CMDLINE, 24
    .set ACPI_PORT, 0x600

main:
    mov start_info, %ebx
    mov START_INFO_CMDLINE(%ebx), %esi
    movzbl (%esi), %eax
    push %eax
    PUTS "ACPI "
    pop %eax
    push %eax
    call putc
    PUTS "\n"
    pop %eax
    mov $ACPI_PORT, %dx
    cmp $'s', %al
    je 1f
    mov $0x01, %al          /* reset value */
    out %al, %dx
    jmp 2f
1:  mov $0x34, %al          /* SLP_TYP = 5 << 2 | SLP_EN */
    out %al, %dx
2:  PUTS "STILL RUNNING\n"
    jmp halt_forever
