/* Shared by the PVH test guests, which `.include "pvh_common.S"` first and define `main`.
 *
 * - the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (type 18) naming `pvh_start`;
 * - `pvh_start`: the PVH entry (32-bit protected mode, paging off, EBX = hvm_start_info). It
 *   saves EBX in `start_info`, loads the guest's own GDT, segments and stack (the PVH ABI only
 *   promises flat segments: the GDT behind them and the stack are the guest's business), calls
 *   `main`, then resets through the i8042;
 * - 32-bit serial output on COM1: putc (AL), puts (ESI), puthex (EAX, ECX digits), putdec
 *   (EAX), and the PUTS "text" macro;
 * - `reset`: 0xFE to port 0x64 (strato stops with exit status 0 under --no-reboot);
 * - `enter_long_mode` (EAX = a 64-bit entry point): identity-maps the first GiB with 2 MiB
 *   pages and switches to 64-bit mode; putc64 / puts64 / puthex64 / reset64 and PUTS64 there.
 * Everything here runs at CPL 0, which the CI hosts emulate: keep it short. */

    .set COM1, 0x3f8
    .set I8042_COMMAND, 0x64
    .set SEL_CODE32, 0x08
    .set SEL_DATA, 0x10
    .set SEL_CODE64, 0x18
    .set MSR_EFER, 0xc0000080
    .set EFER_LME, 0x100
    .set CR0_PG, 0x80000000
    .set CR4_PAE, 0x20

    .pushsection .note.Xen, "a", @note
    .p2align 2
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz: a 32-bit entry address */
    .long 18                        /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .popsection

    /* PUTS "text": print a string literal (escapes such as \n work). */
    .macro PUTS text:req
    .pushsection .rodata
9901:
    .asciz "\text"
    .popsection
    push %esi
    mov $9901b, %esi
    call puts
    pop %esi
    .endm

    .macro PUTS64 text:req
    .pushsection .rodata
9902:
    .asciz "\text"
    .popsection
    push %rsi
    lea 9902b(%rip), %rsi
    call puts64
    pop %rsi
    .endm

    .text
    .code32
    .globl pvh_start
pvh_start:
    cli
    mov %ebx, start_info
    lgdtl gdt_desc
    ljmp $SEL_CODE32, $1f
1:  mov $SEL_DATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov $stack_top, %esp
    call main
    /* fall through */
reset:
    mov $0xfe, %al
    out %al, $I8042_COMMAND
halt_forever:
    cli
    hlt
    jmp halt_forever

putc:
    push %edx
    mov $COM1, %dx
    out %al, %dx
    pop %edx
    ret

puts:
    push %eax
    push %esi
1:  lodsb
    test %al, %al
    jz 2f
    call putc
    jmp 1b
2:  pop %esi
    pop %eax
    ret

/* puthex: the low ECX hex digits of EAX, most significant first. */
puthex:
    pushal
    mov %eax, %edx
1:  dec %ecx
    js 2f
    mov %edx, %eax
    push %ecx
    shl $2, %ecx
    shr %cl, %eax
    pop %ecx
    and $0xf, %eax
    movb hex_digits(%eax), %al
    call putc
    jmp 1b
2:  popal
    ret

/* putdec: EAX in decimal. */
putdec:
    pushal
    mov $10, %ebx
    xor %ecx, %ecx
1:  xor %edx, %edx
    div %ebx
    push %edx
    inc %ecx
    test %eax, %eax
    jnz 1b
2:  pop %eax
    add $'0', %al
    call putc
    loop 2b
    popal
    ret

enter_long_mode:
    mov %eax, long_mode_target
    movl $(pdpt + 3), pml4          /* present | writable */
    movl $(page_dir + 3), pdpt
    mov $page_dir, %edi
    mov $0x83, %eax                 /* present | writable | 2 MiB page */
    mov $512, %ecx
1:  mov %eax, (%edi)
    add $0x200000, %eax
    add $8, %edi
    loop 1b
    mov %cr4, %eax
    or $CR4_PAE, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $EFER_LME, %eax
    wrmsr
    mov %cr0, %eax
    or $CR0_PG, %eax
    mov %eax, %cr0
    ljmp *long_mode_target          /* m16:32 -> 64-bit code segment */

    .code64
putc64:
    push %rdx
    mov $COM1, %dx
    out %al, %dx
    pop %rdx
    ret

puts64:
    push %rax
    push %rsi
1:  lodsb
    test %al, %al
    jz 2f
    call putc64
    jmp 1b
2:  pop %rsi
    pop %rax
    ret

/* puthex64: RAX as 16 hex digits. */
puthex64:
    push %rax
    push %rcx
    push %rdx
    push %r8
    mov %rax, %rdx
    mov $16, %r8d
    lea hex_digits(%rip), %rcx
1:  rol $4, %rdx
    mov %edx, %eax
    and $0xf, %eax
    movb (%rcx,%rax), %al
    call putc64
    dec %r8d
    jnz 1b
    pop %r8
    pop %rdx
    pop %rcx
    pop %rax
    ret

reset64:
    mov $0xfe, %al
    out %al, $I8042_COMMAND
1:  cli
    hlt
    jmp 1b
    .code32

    .section .rodata
hex_digits:
    .ascii "0123456789abcdef"

    .p2align 3
gdt:
    .quad 0
    .quad 0x00cf9b000000ffff        /* 0x08: flat 32-bit code */
    .quad 0x00cf93000000ffff        /* 0x10: flat data */
    .quad 0x00af9b000000ffff        /* 0x18: 64-bit code */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .data
    .p2align 2
start_info:
    .long 0
long_mode_target:
    .long 0                         /* offset, then the selector: a far pointer */
    .word SEL_CODE64

    .bss
    .p2align 12
pml4:
    .skip 4096
pdpt:
    .skip 4096
page_dir:
    .skip 4096
    .p2align 4
    .skip 4096
stack_top:

    .text
