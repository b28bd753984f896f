/*
 * PVH entry, long mode, descriptor tables, interrupt stubs and syscalls.
 *
 * Everything here runs at CPL 0, which the development machines emulate one
 * instruction at a time, so it is kept to the minimum: static page tables,
 * a GDT in .data, one pass over the IDT, then iretq to CPL 3 where the real
 * work runs natively.
 */
#include "layout.h"

/* ---- The Xen ELF note that makes this a PVH kernel --------------------- */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4			/* namesz: "Xen\0" */
	.long 8			/* descsz */
	.long 18		/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry		/* readers take 32 or 64 bits: both see the entry */

/* ---- 32-bit entry: protected mode, paging off, EBX = hvm_start_info ----- */
	.section .text.entry, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	/* Only the bootstrap processor boots; any other CPU sent here parks. */
	mov $0x1b, %ecx		/* IA32_APIC_BASE, bit 8 = BSP */
	rdmsr
	test $0x100, %eax
	jz park32
	lgdt gdt_ptr
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov $(kstacks + KSTACK_SIZE), %esp
	mov %ebx, %esi		/* start_info, handed to user_main */
	xor %edi, %edi		/* CPU index 0 */

/* Common to the BSP and the APs: edi = CPU index, esp = its kernel stack. */
enter_long_mode:
	mov $pml4, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $0x20, %eax		/* PAE */
	mov %eax, %cr4
	mov $0xc0000080, %ecx	/* EFER */
	rdmsr
	or $0x100, %eax		/* LME */
	wrmsr
	mov %cr0, %eax
	or $0x80000001, %eax	/* PG | PE */
	mov %eax, %cr0
	ljmp $SEL_KCODE, $long_mode

park32:
	cli
1:	hlt
	jmp 1b

/* APs arrive here from the real-mode trampoline, in 32-bit protected mode. */
ap_entry32:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	mov $1, %edi
	lock xadd %edi, ap_next_index
	cmp $MAX_CPUS, %edi
	jae park32
	lea 1(%edi), %eax
	shl $KSTACK_SHIFT, %eax
	add $kstacks, %eax
	mov %eax, %esp
	jmp enter_long_mode

	.code64
long_mode:
	mov $SEL_KDATA, %eax
	mov %eax, %ds
	mov %eax, %es
	mov %eax, %ss
	xor %eax, %eax
	mov %eax, %fs
	mov %eax, %gs
	mov %edi, %r12d		/* CPU index (callee-saved across C calls) */
	mov %esi, %ebx		/* start_info (BSP) */
	lea 1(%r12), %rax
	shl $KSTACK_SHIFT, %rax
	lea kstacks(%rax), %rsp
	test %r12, %r12
	jnz 1f
	call idt_init		/* once, on the BSP */
1:	mov %r12, %rdi
	call cpu_tss_init	/* this CPU's TSS (RSP0) and its GDT descriptor */
	lidt idt_ptr
	mov %r12d, %eax
	shl $4, %eax
	add $SEL_TSS0, %eax
	ltr %ax
	/* Drop to CPL 3 with IOPL 3: user_main(start_info) or ap_main(index). */
	test %r12, %r12
	jnz 2f
	mov $(bsp_ustack + BSP_USTACK_SIZE), %rax
	mov $user_main, %rcx
	mov %rbx, %rdi
	jmp 3f
2:	mov %r12, %rax
	shl $15, %rax		/* AP_USTACK_SIZE */
	lea ap_ustacks(%rax), %rax
	mov $ap_main, %rcx
	mov %r12, %rdi
3:	push $(SEL_UDATA | 3)
	push %rax
	push $USER_RFLAGS
	push $(SEL_UCODE | 3)
	push %rcx
	iretq

/* ---- Interrupt stubs: one per vector, ISR_STRIDE bytes apart ------------ */
	.balign ISR_STRIDE
	.globl isr_table
isr_table:
	.set vec, 0
	.rept 256
	.set stub_start, .
	.if vec == 6
	jmp ud_entry
	.elseif vec == VEC_SPURIOUS
	iretq
	.elseif (vec >= 0x20) && (vec < 0x30)
	/* The masked 8259s' range: only a spurious IRQ 7/15 can land here. */
	incl irq_counts + 4 * vec(%rip)
	iretq
	.elseif (vec >= VEC_TIMER) && (vec <= VEC_GED)
	/* A device or timer interrupt: count it, end it at the LAPIC, return. */
	push %rax
	incl irq_counts + 4 * vec(%rip)
	incq irq_seq(%rip)
	mov $0xfee000b0, %eax
	movl $0, (%rax)
	pop %rax
	iretq
	.else
	.if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
	.else
	push $0			/* no error code: keep one frame layout */
	.endif
	push $vec
	jmp exc_common
	.endif
	.org stub_start + ISR_STRIDE, 0xcc	/* fails to assemble if a stub is too big */
	.set vec, vec + 1
	.endr

/* Exceptions (and unexpected vectors): report and stop, never return. */
exc_common:
	push %r15
	push %r14
	push %r13
	push %r12
	push %r11
	push %r10
	push %r9
	push %r8
	push %rbp
	push %rdi
	push %rsi
	push %rdx
	push %rcx
	push %rbx
	push %rax
	mov %rsp, %rdi
	cld
	and $-16, %rsp
	call exception_report
1:	cli
	hlt
	jmp 1b

/* #UD: a syscall when it comes from syscall_trap, else a real exception. */
ud_entry:
	cmpq $syscall_trap, (%rsp)
	jne 1f
	addq $2, (%rsp)		/* resume after the ud2 */
	jmp syscall_entry
1:	push $0
	push $6
	jmp exc_common

/* The syscall instruction for CPL 3: rax = number, rdi/rsi/rdx = arguments. */
	.globl syscall_trap
syscall_trap:
	ud2
	ret

/* Clobbers rax, rcx, rdx. */
syscall_entry:
	cmp $SYS_WAIT, %rax
	je sys_wait
	cmp $SYS_SET_IF, %rax
	je sys_set_if
	cmp $SYS_FLUSH_TLB, %rax
	je sys_flush_tlb
	cmp $SYS_WRMSR, %rax
	je sys_wrmsr
	cmp $SYS_RDMSR, %rax
	je sys_rdmsr
	cmp $SYS_PARK, %rax
	je sys_park
	cmp $SYS_TRIPLE_FAULT, %rax
	je sys_triple_fault
	mov $-1, %rax
	iretq
sys_wait:
	/* The gate cleared IF, so an interrupt arriving after the caller read
	 * *rdi shows up here as a changed value; sti's one-instruction shadow
	 * makes "enable and halt" atomic. */
	cmp %rsi, (%rdi)
	jne 1f
	sti
	hlt
	cli
1:	iretq
sys_set_if:
	andq $~0x200, 16(%rsp)	/* the saved RFLAGS */
	test %rdi, %rdi
	jz 1f
	orq $0x200, 16(%rsp)
1:	iretq
sys_flush_tlb:
	mov %cr3, %rax
	mov %rax, %cr3
	iretq
sys_wrmsr:
	mov %edi, %ecx
	mov %esi, %eax
	wrmsr
	iretq
sys_rdmsr:
	mov %edi, %ecx
	rdmsr
	shl $32, %rdx
	or %rdx, %rax
	iretq
sys_park:
	cli
1:	hlt
	jmp 1b
sys_triple_fault:
	lidt empty_idt_ptr
	int3
	jmp sys_park

/* ---- Real-mode trampoline for the APs, copied to AP_TRAMPOLINE ---------- */
	.code16
	.globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
	cli
	cld
	mov %cs, %ax
	mov %ax, %ds
	lgdtl tramp_gdt_ptr - ap_trampoline_start
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $SEL_KCODE32, $ap_entry32
	.balign 8
tramp_gdt_ptr:
	.word gdt_end - gdt - 1
	.long gdt
ap_trampoline_end:
	.code64

/* ---- Data ---------------------------------------------------------------- */
	.section .data, "aw"
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff	/* SEL_KCODE: 64-bit, DPL 0 */
	.quad 0x00cf92000000ffff	/* SEL_KDATA: flat, DPL 0 */
	.quad 0x00cff2000000ffff	/* SEL_UDATA: flat, DPL 3 */
	.quad 0x00affa000000ffff	/* SEL_UCODE: 64-bit, DPL 3 */
	.quad 0x00cf9a000000ffff	/* SEL_KCODE32: flat 32-bit, DPL 0 */
	.fill MAX_CPUS * 2, 8, 0	/* SEL_TSS0..: filled by cpu_tss_init */
gdt_end:
	.balign 8
	.word 0
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt
	.balign 8
	.word 0
idt_ptr:
	.word 256 * 16 - 1
	.quad idt
	.balign 8
	.word 0
empty_idt_ptr:
	.word 0
	.quad 0
	.balign 4
ap_next_index:
	.long 1

/*
 * Identity-mapped page tables, built by the assembler so no CPL 0 time goes
 * into filling them: 4 KiB pages for the first 2 MiB (page 0 too: firmware
 * puts the PVH memory map there), 2 MiB pages up to 3 GiB (write-back) and over the
 * 3-4 GiB MMIO hole (PCD|PWT: uncached). Every entry has the U bit: CPL 3
 * code touches RAM and device registers directly. Higher MMIO (64-bit BARs)
 * is mapped at run time by map_mmio().
 */
	.balign 4096
	.globl pml4, pdpt_low
pml4:
	.quad pdpt_low + 0x7
	.fill 511, 8, 0
pdpt_low:
	.quad pd_low + 0x0000 + 0x7
	.quad pd_low + 0x1000 + 0x7
	.quad pd_low + 0x2000 + 0x7
	.quad pd_low + 0x3000 + 0x7
	.fill 508, 8, 0
	.globl pd_low
pd_low:
	.quad pt_first + 0x7
	.set i, 1
	.rept 1535
	.quad (i << 21) | 0x87		/* P | RW | US | PS */
	.set i, i + 1
	.endr
	.rept 512
	.quad (i << 21) | 0x9f		/* P | RW | US | PWT | PCD | PS */
	.set i, i + 1
	.endr
pt_first:
	.set i, 0
	.rept 512
	.quad (i << 12) | 0x7
	.set i, i + 1
	.endr

/* ---- Memory nobody needs zeroed (fully written before use) ------------- */
	.section .kstack, "aw", @nobits
	.balign 4096
	.globl idt
idt:
	.skip 256 * 16
	.globl kstacks
kstacks:
	.skip KSTACK_SIZE * (MAX_CPUS + 1)
	.balign 4096
bsp_ustack:
	.skip BSP_USTACK_SIZE
ap_ustacks:
	.skip AP_USTACK_SIZE * MAX_CPUS
