/*
 * strato-guest: reads its command line from hvm_start_info, checks the
 * devices it finds, runs the benchmarks asked for, prints DONE and stops the
 * VM. Entered at CPL 3 from start.S.
 */
#include "guest.h"

u64 boot_rsdp;
u32 bsp_apic_id;

/* RAM usable for the heap: the memory-map region holding the image, below 3 GiB. */
static u64 heap_limit(struct hvm_start_info *si, bool valid)
{
	u64 image_end = (u64)_end;
	if (valid && si->version >= 1 && si->memmap_paddr && si->memmap_entries < 1024) {
		struct hvm_memmap_entry *m = (void *)si->memmap_paddr;
		for (u32 i = 0; i < si->memmap_entries; i++)
			if (m[i].type == 1 && m[i].addr <= image_end &&
			    m[i].addr + m[i].size > image_end)
				return MIN(m[i].addr + m[i].size, 3 * GiB);
	}
	return 64 * MiB; /* no memory map: assume a small machine */
}

static void serial_test(void)
{
	if (!test_selected("serial"))
		return;
	serial_drain();
	u8 lsr = inb(COM1 + 5);
	/* The scratch register is optional on 8250-class UARTs: reported, not required. */
	outb(COM1 + 7, 0x5a);
	u8 s1 = inb(COM1 + 7);
	outb(COM1 + 7, 0xa5);
	u8 s2 = inb(COM1 + 7);
	bool lsr_ok = lsr != 0xff && (lsr & 0x60) == 0x60 && !(lsr & 0x80);
	test_result("serial", lsr_ok, "lsr=0x%02x scratch=%s", lsr,
		    s1 == 0x5a && s2 == 0xa5 ? "ok" : "missing");
}

__attribute__((noreturn)) void user_main(struct hvm_start_info *si)
{
	memset(__bss_start, 0, (usize)(__bss_end - __bss_start));
	serial_init();
	bool valid = si && (u64)si < 4 * GiB && si->magic == HVM_START_MAGIC;
	const char *cmdline = "";
	if (valid && si->cmdline_paddr && si->cmdline_paddr < 4 * GiB)
		cmdline = (const char *)si->cmdline_paddr;
	cmdline_parse(cmdline); /* copies it: low memory is ours from now on */
	if (valid)
		boot_rsdp = si->rsdp_paddr;
	if (valid)
		memmap_save(si);
	u64 heap_end = heap_limit(si, valid);
	heap_init((u64)_end, heap_end);

	pic_disable();
	bsp_apic_id = lapic_id();
	lapic_init();
	sys_set_if(true);
	time_init();
	/* A newline first: firmware may have left a partial line on the port. */
	printf("\nBOOT strato-guest start_info=%s cmdline=\"%s\" heap=%luMiB tsc_khz=%lu tsc=%s "
	       "irq=%s apic=%u\n",
	       valid ? "ok" : "missing", cfg.cmdline, (heap_end - (u64)_end) / MiB, tsc_khz,
	       tsc_source, cfg.irq_msix ? "msix" : "poll", bsp_apic_id);

	if (!strcmp(cfg.fault, "pf"))
		(void)*(volatile u64 *)0x8000000000UL; /* 512 GiB: not mapped */
	else if (!strcmp(cfg.fault, "ud"))
		__asm__ volatile("ud2");
	serial_test();
	pci_scan();
	pci_test();
	virtio_probe();
	for (int i = 0; i < virtio_count; i++) {
		struct virtio_dev *d = &virtio_devs[i];
		printf("VIRTIO %s %s%s%s\n", pci_name(d->pci), virtio_type_name(d->type),
		       d->err[0] ? " error: " : "", d->err);
	}
	blk_tests();
	net_tests();
	rng_tests();
	console_tests();
	irq_tests();
	smp_tests();
	highmem_tests();
	reboot_tests();
	for (int i = 0; i < cfg.nbench; i++)
		run_bench(&cfg.bench[i]);
	power_tests(); /* last: a pass ends the run by powering off */
	finish();
}
