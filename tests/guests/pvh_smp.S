/* Several vCPUs: the BSP copies a real-mode trampoline to 0x8000 and starts the APs the way a
 * kernel does, with INIT-SIPI-SIPI through its local APIC's ICR (in-kernel LAPIC). Each AP
 * goes to 32-bit protected mode, reads its APIC ID from the LAPIC ID register (CPUID is not
 * reliable at CPL 0 on every host), sets that bit in a shared mask with `lock bts`, counts
 * itself in with `lock incl` and halts. The BSP waits (a bounded spin) for NCPUS - 1 APs and
 * prints the mask in order. NCPUS comes from the linker: ld --defsym NCPUS=<n>.
 * Output:
 *   SMP BSP up
 *   APS <number of APs that checked in>       (followed by TIMEOUT if the spin ran out)
 *   CPUS <APIC IDs in increasing order, space separated>
 *   BYE
 */
    .include "pvh_common.S"

    .set TRAMPOLINE, 0x8000             /* below 1 MiB, page aligned: SIPI vector 0x08 */
    .set LAPIC_ID, 0xfee00020
    .set LAPIC_ICR_LOW, 0xfee00300
    .set LAPIC_ICR_HIGH, 0xfee00310
    .set ICR_ALL_BUT_SELF, 0xc0000      /* destination shorthand 11 */
    .set ICR_LEVEL_ASSERT, 0x4000
    .set ICR_INIT, 0x500
    .set ICR_STARTUP, 0x600
    .set SPIN_LIMIT, 5000000            /* ~13 s where CPL 0 is emulated; APs need milliseconds */

main:
    PUTS "SMP BSP up\n"
    mov $trampoline, %esi
    mov $TRAMPOLINE, %edi
    mov $(trampoline_end - trampoline), %ecx
    cld
    rep movsb

    mov LAPIC_ID, %eax
    shr $24, %eax
    lock btsl %eax, cpu_mask

    movl $0, LAPIC_ICR_HIGH
    movl $(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_INIT), LAPIC_ICR_LOW
    movl $(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12)), LAPIC_ICR_LOW
    movl $(ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_STARTUP | (TRAMPOLINE >> 12)), LAPIC_ICR_LOW

    mov $NCPUS, %edx
    dec %edx
    mov $SPIN_LIMIT, %ecx
1:  cmp %edx, aps_arrived
    jae 2f
    loop 1b
2:  PUTS "APS "
    mov aps_arrived, %eax
    call putdec
    cmp %edx, %eax
    jae 3f
    PUTS "\nTIMEOUT"
3:  PUTS "\nCPUS"
    xor %ebx, %ebx
4:  bt %ebx, cpu_mask
    jnc 5f
    PUTS " "
    mov %ebx, %eax
    call putdec
5:  inc %ebx
    cmp $32, %ebx
    jb 4b
    PUTS "\nBYE\n"
    ret

/* Copied to TRAMPOLINE and run there by each AP in real mode, CS = TRAMPOLINE >> 4, IP = 0:
 * only offsets from `trampoline` are used until the far jump to the 32-bit code above 1 MiB. */
    .code16
trampoline:
    cli
    lgdtl %cs:(trampoline_gdt_desc - trampoline)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE32, $ap_main
    .p2align 2
trampoline_gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt
trampoline_end:

    .code32
ap_main:
    mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov LAPIC_ID, %eax
    shr $24, %eax
    lock btsl %eax, cpu_mask
    lock incl aps_arrived
1:  cli
    hlt
    jmp 1b

    .data
    .p2align 2
cpu_mask:
    .long 0
aps_arrived:
    .long 0
