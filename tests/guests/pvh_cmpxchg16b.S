/* An instruction that KVM's instruction emulator cannot run: `lock cmpxchg16b` from 64-bit
 * code at CPL 0. On hosts that emulate guest kernel mode (PVM) KVM stops with an emulation
 * failure; with hardware virtualization it runs natively and the guest prints CX16 ok.
 * Output:
 *   LONG64 cmpxchg16b next
 *   CX16 ok                       (only where the instruction runs)
 */
    .include "pvh_common.S"

main:
    mov $main64, %eax
    jmp enter_long_mode

    .code64
main64:
    PUTS64 "LONG64 cmpxchg16b next\n"
    lea cx16_target(%rip), %rdi
    xor %eax, %eax                  /* RDX:RAX = 0 = the current value: the exchange happens */
    xor %edx, %edx
    mov $1, %ebx
    xor %ecx, %ecx
    lock cmpxchg16b (%rdi)
    PUTS64 "CX16 ok\n"
    jmp reset64

    .data
    .p2align 4
cx16_target:
    .quad 0, 0
