/* The legacy PIC (masked) and the local APIC (enabled, MMIO at 0xfee00000, from CPL 3). */
#include "guest.h"

#define LAPIC_ID 0x20
#define LAPIC_TPR 0x80
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_TIMER_INIT 0x380
#define LAPIC_TIMER_DIV 0x3e0

volatile u32 irq_counts[256];
volatile u64 irq_seq;

void pic_disable(void)
{
	/* Re-initialise both 8259s onto vectors 0x20-0x2f (not the exception range), all masked. */
	outb(0x20, 0x11);
	outb(0xa0, 0x11);
	outb(0x21, 0x20);
	outb(0xa1, 0x28);
	outb(0x21, 0x04);
	outb(0xa1, 0x02);
	outb(0x21, 0x01);
	outb(0xa1, 0x01);
	outb(0x21, 0xff);
	outb(0xa1, 0xff);
}

u32 lapic_id(void)
{
	return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
}

void lapic_init(void)
{
	mmio_write32(LAPIC_BASE + LAPIC_TPR, 0);
	mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | VEC_SPURIOUS); /* software enable */
	/*
	 * A slow periodic timer: it bounds every `hlt`, so a lost or missing
	 * device interrupt turns into a timeout instead of a hang.
	 */
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_DIV, 0x3); /* divide by 16 */
	mmio_write32(LAPIC_BASE + LAPIC_LVT_TIMER, (1 << 17) | VEC_TIMER);
	mmio_write32(LAPIC_BASE + LAPIC_TIMER_INIT, 0x200000);
}

void wait_for_interrupt(u64 seen_seq)
{
	sys_wait(&irq_seq, seen_seq);
}
