/*
 * The C code that runs at CPL 0: descriptor set-up on each CPU and the
 * exception report. Everything else runs at CPL 3.
 */
#include "guest.h"

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

/*
 * The TSSes sit side by side, followed by one I/O permission bitmap that
 * every TSS reaches through its own iomap_base: all ports allowed. On real
 * hardware IOPL 3 already grants CPL 3 the ports; PVM (the nested KVM on the
 * development machines) ignores IOPL for user mode but honours the bitmap.
 */
#define TSS_STRIDE 112
static struct {
	u8 tss[MAX_CPUS][TSS_STRIDE];
	u8 iomap[8192 + 1]; /* one bit per port, 0 = allowed; then the 0xff terminator */
} tss_area __attribute__((aligned(64), section(".data"))) = {.iomap[8192] = 0xff};

extern u8 kstacks[];
extern u64 idt[];

void idt_init(void)
{
	for (u64 v = 0; v < 256; v++) {
		u64 addr = (u64)isr_table + v * ISR_STRIDE;
		u64 attr = 0x8e; /* present, DPL 0, 64-bit interrupt gate */
		idt[2 * v] = (addr & 0xffff) | ((u64)SEL_KCODE << 16) | (attr << 40) |
			     (((addr >> 16) & 0xffff) << 48);
		idt[2 * v + 1] = addr >> 32;
	}
}

void cpu_tss_init(u64 cpu)
{
	struct tss *t = (struct tss *)tss_area.tss[cpu];
	u64 base = (u64)t;
	u64 iomap = (u64)tss_area.iomap - base;
	u64 limit = iomap + sizeof(tss_area.iomap) - 1;
	t->rsp[0] = (u64)kstacks + (cpu + 1) * KSTACK_SIZE;
	t->iomap_base = (u16)iomap;
	u64 *desc = &gdt[SEL_TSS0 / 8 + 2 * cpu];
	desc[0] = (limit & 0xffff) | ((base & 0xffffff) << 16) | (0x89UL << 40) |
		  (((limit >> 16) & 0xf) << 48) | (((base >> 24) & 0xff) << 56);
	desc[1] = base >> 32;
}

struct exc_frame {
	u64 rax, rbx, rcx, rdx, rsi, rdi, rbp, r8, r9, r10, r11, r12, r13, r14, r15;
	u64 vector, error, rip, cs, rflags, rsp, ss;
};

__attribute__((noreturn)) void exception_report(struct exc_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	u32 apic = *(volatile u32 *)(LAPIC_BASE + 0x20) >> 24;
	printf("\nFATAL exception vector=%lu error=0x%lx rip=0x%lx cs=0x%lx rflags=0x%lx "
	       "rsp=0x%lx cr2=0x%lx apic=%u\n",
	       f->vector, f->error, f->rip, f->cs, f->rflags, f->rsp, cr2, apic);
	printf("FATAL regs rax=0x%lx rbx=0x%lx rcx=0x%lx rdx=0x%lx rsi=0x%lx rdi=0x%lx rbp=0x%lx\n",
	       f->rax, f->rbx, f->rcx, f->rdx, f->rsi, f->rdi, f->rbp);
	printf("DONE pass=%d fail=%d\n", tests_passed, tests_failed + 1);
	serial_drain();
	outb(DEBUG_EXIT_PORT, EXIT_EXCEPTION);
	/* Not QEMU: stop with a triple fault (empty IDT + int3). */
	static const struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) empty = {0, 0};
	__asm__ volatile("lidt %0; int3" ::"m"(empty));
	for (;;)
		__asm__ volatile("cli; hlt");
}
