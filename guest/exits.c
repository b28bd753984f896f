/*
 * Exit benchmarks: one VM exit per guest instruction, handled by the VMM in userspace.
 *
 *   bench=pio-exits[,ops=N][,port=P][,size=1|2|4]
 *                                      N x `out` of `size` bytes (default 4) to port P (default
 *                                      0xcf8, PCI CONFIG_ADDRESS: every PC VMM implements it;
 *                                      0x3ff with size=1 is the 16550 scratch register)
 *   bench=mmio-exits[,ops=N][,addr=A]  N x 32-bit `mov` to address A (default: the first virtio
 *                                      device's common configuration `device_feature_select`;
 *                                      any other address is mapped uncached first, so an
 *                                      unassigned one measures the VMM's "nobody there" path)
 *   bench=idle[,seconds=S]             sleep S seconds on the LAPIC timer (for memory sampling)
 *
 * Defaults: ops=100000. The guest times the loop with the TSC (guest_us in BENCH-END).
 */
#include "guest.h"

#define EXITS_DEFAULT_OPS 100000UL
#define PCI_CONFIG_ADDRESS 0xcf8

static void exits_end(const char *name, u64 ops, u64 t0)
{
	u64 us = tsc_to_us(rdtsc() - t0);
	u64 ns_per_exit = ops ? us * 1000 / ops : 0;
	printf("BENCH-END %s ops=%lu bytes=0 guest_us=%lu ns_per_exit=%lu\n", name, ops, us,
	       ns_per_exit);
}

static void pio_exits(struct bench_cfg *b)
{
	u64 ops = b->ops ? b->ops : EXITS_DEFAULT_OPS;
	u16 port = (u16)(b->port ? b->port : PCI_CONFIG_ADDRESS);
	u64 width = b->size == 1 || b->size == 2 ? b->size : 4;
	u32 saved = port == PCI_CONFIG_ADDRESS ? inl(port) : 0;
	printf("BENCH-START pio-exits port=0x%x width=%lu\n", port, width);
	u64 t0 = rdtsc();
	if (width == 1)
		for (u64 i = 0; i < ops; i++)
			outb(port, 0x5a);
	else if (width == 2)
		for (u64 i = 0; i < ops; i++)
			outw(port, 0x5a5a);
	else
		for (u64 i = 0; i < ops; i++)
			outl(port, 0x80000000U); /* bus 0 dev 0 fn 0 reg 0: harmless to latch */
	exits_end("pio-exits", ops, t0);
	if (port == PCI_CONFIG_ADDRESS)
		outl(port, saved);
}

static void mmio_exits(struct bench_cfg *b)
{
	u64 ops = b->ops ? b->ops : EXITS_DEFAULT_OPS;
	u64 addr = b->addr;
	const char *target = "unassigned";
	if (!addr) {
		struct virtio_dev *d = virtio_count ? &virtio_devs[0] : NULL;
		if (!d || !d->common) {
			test_result("bench", false, "mmio-exits: no virtio device (give addr=)");
			return;
		}
		addr = d->common + VCOMMON_DFSELECT;
		target = "virtio-common-dfselect";
	} else if (!map_mmio(addr & ~0xfffUL, 4096)) {
		test_result("bench", false, "mmio-exits: cannot map 0x%lx", addr);
		return;
	}
	printf("BENCH-START mmio-exits addr=0x%lx target=%s\n", addr, target);
	u64 t0 = rdtsc();
	for (u64 i = 0; i < ops; i++)
		mmio_write32(addr, 0); /* device_feature_select = 0: what a driver writes first */
	exits_end("mmio-exits", ops, t0);
}

static void idle(struct bench_cfg *b)
{
	u64 seconds = b->seconds ? b->seconds : 2;
	printf("BENCH-START idle seconds=%lu\n", seconds);
	u64 t0 = rdtsc(), end = t0 + ms_to_tsc(seconds * 1000);
	u64 wakeups = 0;
	while (!expired(end)) {
		wait_for_interrupt(irq_seq);
		wakeups++;
	}
	printf("BENCH-END idle ops=%lu bytes=0 guest_us=%lu\n", wakeups, tsc_to_us(rdtsc() - t0));
}

bool exits_bench(struct bench_cfg *b)
{
	if (!strcmp(b->name, "pio-exits"))
		pio_exits(b);
	else if (!strcmp(b->name, "mmio-exits"))
		mmio_exits(b);
	else if (!strcmp(b->name, "idle"))
		idle(b);
	else
		return false;
	return true;
}
