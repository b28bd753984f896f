/* Constants shared by the assembly entry code and the C code. */
#ifndef STRATO_GUEST_LAYOUT_H
#define STRATO_GUEST_LAYOUT_H

#define LOAD_ADDR 0x100000 /* the ELF is linked and loaded at 1 MiB */

/* GDT selectors. */
#define SEL_KCODE 0x08   /* 64-bit kernel code */
#define SEL_KDATA 0x10   /* flat data, usable in 32- and 64-bit mode */
#define SEL_UDATA 0x18   /* user data (DPL 3) */
#define SEL_UCODE 0x20   /* 64-bit user code (DPL 3) */
#define SEL_KCODE32 0x28 /* 32-bit kernel code, for the AP trampoline */
#define SEL_TSS0 0x30    /* one 16-byte TSS descriptor per CPU from here */

#define MAX_CPUS 16
#define KSTACK_SHIFT 14 /* 16 KiB kernel stack per CPU */
#define KSTACK_SIZE (1 << KSTACK_SHIFT)
#define AP_USTACK_SIZE 0x8000
#define BSP_USTACK_SIZE 0x40000

/* User RFLAGS: IOPL=3 (port I/O at CPL 3; see also the TSS I/O bitmap), IF=0, bit 1. */
#define USER_RFLAGS 0x3002

/* Interrupt vectors. */
#define VEC_TIMER 0x30       /* LAPIC timer: wakes `hlt` so every wait has a deadline */
#define VEC_IRQ_BASE 0x40    /* MSI-X vectors handed to virtio queues: 0x40..0x7e */
#define VEC_IRQ_LAST 0x7e
#define VEC_GED 0x7f         /* the ACPI GED's IOAPIC pin (tests=power) */
#define VEC_SPURIOUS 0xff
#define ISR_STRIDE 32        /* every interrupt stub is 32 bytes apart */

/*
 * Syscalls (number in rax, arguments in rdi/rsi/rdx): the few things CPL 3
 * cannot do itself. CPL 3 calls syscall_trap, a `ud2`: PVM (the nested KVM on
 * the development machines) answers `int n` from user mode with #UD, while
 * exceptions always arrive, so the #UD handler is the way in.
 * CPL 3 never runs cli/sti: PVM ignores IOPL for user mode, so interrupt
 * enabling goes through SYS_SET_IF and waiting through SYS_WAIT.
 */
#define SYS_WAIT 1         /* if *(u64 *)rdi == rsi: sti; hlt; cli (race-free wait) */
#define SYS_FLUSH_TLB 2    /* reload CR3 after page-table edits */
#define SYS_PARK 3         /* cli; hlt forever (APs, end of run) */
#define SYS_WRMSR 4        /* wrmsr(rdi=msr, rsi=low, rdx=high) */
#define SYS_RDMSR 5        /* rax = rdmsr(rdi) */
#define SYS_TRIPLE_FAULT 6 /* load an empty IDT and raise int3 */
#define SYS_SET_IF 7       /* rdi != 0: return to CPL 3 with interrupts enabled */

/* Real-mode trampoline for the APs (SIPI vector = address >> 12). */
#define AP_TRAMPOLINE 0x8000

/* Values written to QEMU's isa-debug-exit (port 0xf4): exit status (v << 1) | 1. */
#define DEBUG_EXIT_PORT 0xf4
#define EXIT_TESTS_FAILED 1 /* QEMU exits 3 */
#define EXIT_EXCEPTION 2    /* QEMU exits 5 */

#endif
