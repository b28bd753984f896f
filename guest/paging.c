/*
 * Mapping device memory: the static tables in start.S cover 0-4 GiB; 64-bit
 * BARs (QEMU places them high, strato at 1 TiB) get identity-mapped 2 MiB
 * pages here, uncached and user-accessible. CPL 3 writes the tables (they are
 * ordinary user-accessible memory) and asks CPL 0 only to reload CR3.
 */
#include "guest.h"

#define PTE_P 0x1UL
#define PTE_RW 0x2UL
#define PTE_US 0x4UL
#define PTE_PWT 0x8UL
#define PTE_PCD 0x10UL
#define PTE_PS 0x80UL
#define PTE_ADDR 0x000ffffffffff000UL
#define TABLE_FLAGS (PTE_P | PTE_RW | PTE_US)
#define POOL_PAGES 32

static u64 pool[POOL_PAGES][512] __attribute__((aligned(4096)));
static int pool_used;

static u64 *next_table(u64 *entry)
{
	if (*entry & PTE_P)
		return (u64 *)(*entry & PTE_ADDR);
	if (pool_used >= POOL_PAGES)
		return NULL;
	u64 *t = pool[pool_used++];
	memset(t, 0, 4096);
	*entry = (u64)t | TABLE_FLAGS;
	return t;
}

bool map_mmio(u64 addr, u64 size)
{
	if (!size)
		return true;
	u64 start = addr & ~(2 * MiB - 1);
	u64 end = ALIGN_UP(addr + size, 2 * MiB);
	if (end <= start || end > (1UL << 48))
		return false;
	for (u64 a = start; a < end; a += 2 * MiB) {
		u64 *pdpt = next_table(&pml4[(a >> 39) & 511]);
		u64 *pd = pdpt ? next_table(&pdpt[(a >> 30) & 511]) : NULL;
		if (!pd)
			return false;
		u64 *pde = &pd[(a >> 21) & 511];
		if (a < 2 * MiB)
			continue; /* the first 2 MiB are 4 KiB pages; no device lives there */
		*pde = a | PTE_P | PTE_RW | PTE_US | PTE_PS | PTE_PWT | PTE_PCD;
	}
	sys_flush_tlb();
	return true;
}
