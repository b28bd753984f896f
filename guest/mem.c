/*
 * tests=highmem: RAM above 4 GiB (past the 32-bit MMIO hole), from the PVH memory map.
 * A few 4 KiB pages spread over each high region (first, last, evenly between) are mapped
 * (paging.c, 2 MiB pages), written with a pattern of their address, and read back after all
 * were written: memory that aliased another page, or a page the VMM did not back, shows. Only
 * the pages touched cost the host memory.
 */
#include "guest.h"

#define MAX_MEMMAP 32
#define SAMPLES 8

static struct hvm_memmap_entry memmap[MAX_MEMMAP];
static u32 memmap_count;

void memmap_save(struct hvm_start_info *si)
{
	if (si->version < 1 || !si->memmap_paddr || si->memmap_paddr >= 4 * GiB)
		return;
	const struct hvm_memmap_entry *m = (const void *)si->memmap_paddr;
	memmap_count = MIN(si->memmap_entries, (u32)MAX_MEMMAP);
	memcpy(memmap, m, memmap_count * sizeof(*m));
}

static u64 page_word(u64 page, u32 i)
{
	return (page ^ 0x53545241544f4d45UL) + i * 0x9e3779b97f4a7c15UL;
}

void highmem_tests(void)
{
	if (!test_named("highmem"))
		return;
	u64 pages[4 * SAMPLES];
	u32 npages = 0, regions = 0;
	u64 high_bytes = 0, top = 0;
	for (u32 r = 0; r < memmap_count; r++) {
		const struct hvm_memmap_entry *e = &memmap[r];
		if (e->type != 1 || e->addr + e->size <= 4 * GiB)
			continue;
		u64 start = ALIGN_UP(MAX(e->addr, 4 * GiB), 4096);
		u64 end = (e->addr + e->size) & ~4095UL;
		if (end <= start)
			continue;
		regions++;
		high_bytes += end - start;
		top = MAX(top, end);
		u64 span = (end - start) / 4096 - 1;
		for (u32 k = 0; k < SAMPLES && npages < ARRAY_SIZE(pages); k++)
			pages[npages++] = start + span * k / (SAMPLES - 1) * 4096;
	}
	if (!regions) {
		test_skip("highmem", "no RAM above 4 GiB in the memory map");
		return;
	}
	for (u32 p = 0; p < npages; p++)
		if (!map_mmio(pages[p], 4096)) {
			test_result("highmem", false, "cannot map 0x%lx", pages[p]);
			return;
		}
	for (u32 p = 0; p < npages; p++) {
		volatile u64 *w = (volatile u64 *)pages[p];
		for (u32 i = 0; i < 512; i++)
			w[i] = page_word(pages[p], i);
	}
	u32 bad = 0;
	u64 first_bad = 0;
	for (u32 p = 0; p < npages; p++) {
		volatile u64 *w = (volatile u64 *)pages[p];
		for (u32 i = 0; i < 512; i++)
			if (w[i] != page_word(pages[p], i)) {
				if (!bad++)
					first_bad = pages[p] + i * 8;
				break;
			}
	}
	test_result("highmem", bad == 0 && npages > 0,
		    "regions=%u high_bytes=%lu top=0x%lx pages=%u bad=%u first_bad=0x%lx", regions,
		    high_bytes, top, npages, bad, first_bad);
}
