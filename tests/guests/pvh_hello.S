/* PVH hello: prints from the 32-bit protected-mode entry state, checks hvm_start_info and
 * prints the command line it names, then returns (pvh_common resets through the i8042).
 * Output:
 *   PVH32 hello
 *   CR0 <8 hex digits>
 *   START_INFO magic ok | START_INFO magic bad <8 hex digits>
 *   CMDLINE [<the command line>]
 *   BYE
 */
    .include "pvh_common.S"

    .set HVM_START_INFO_MAGIC, 0x336ec578
    .set START_INFO_CMDLINE, 24             /* u64 cmdline_paddr */

main:
    PUTS "PVH32 hello\n"
    PUTS "CR0 "
    mov %cr0, %eax
    mov $8, %ecx
    call puthex
    PUTS "\n"

    mov start_info, %ebx
    mov (%ebx), %eax
    cmp $HVM_START_INFO_MAGIC, %eax
    jne bad_magic
    PUTS "START_INFO magic ok\n"
    PUTS "CMDLINE ["
    mov START_INFO_CMDLINE(%ebx), %esi      /* below 4 GiB: the high half is zero */
    call puts
    PUTS "]\n"
    jmp done
bad_magic:
    PUTS "START_INFO magic bad "
    mov $8, %ecx
    call puthex
    PUTS "\n"
done:
    PUTS "BYE\n"
    ret
