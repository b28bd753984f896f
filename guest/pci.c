/* PCI bus 0 through configuration mechanism #1 (ports 0xCF8/0xCFC): scan, BARs, capabilities. */
#include "guest.h"

struct pci_dev pci_devs[MAX_PCI];
int pci_count;

static u32 cfg_addr(struct pci_dev *d, u8 off)
{
	return 0x80000000U | ((u32)d->bus << 16) | ((u32)d->dev << 11) | ((u32)d->fn << 8) |
	       (off & 0xfc);
}

u32 pci_read32(struct pci_dev *d, u8 off)
{
	outl(0xcf8, cfg_addr(d, off));
	return inl(0xcfc);
}

u16 pci_read16(struct pci_dev *d, u8 off)
{
	outl(0xcf8, cfg_addr(d, off));
	return inw(0xcfc + (off & 2));
}

u8 pci_read8(struct pci_dev *d, u8 off)
{
	outl(0xcf8, cfg_addr(d, off));
	return inb(0xcfc + (off & 3));
}

void pci_write32(struct pci_dev *d, u8 off, u32 v)
{
	outl(0xcf8, cfg_addr(d, off));
	outl(0xcfc, v);
}

void pci_write16(struct pci_dev *d, u8 off, u16 v)
{
	outl(0xcf8, cfg_addr(d, off));
	outw(0xcfc + (off & 2), v);
}

void pci_write8(struct pci_dev *d, u8 off, u8 v)
{
	outl(0xcf8, cfg_addr(d, off));
	outb(0xcfc + (off & 3), v);
}

/* Walk the capability list; bounded so a looping list cannot hang the guest. */
u8 pci_find_cap(struct pci_dev *d, u8 id, u8 start)
{
	if (!(pci_read16(d, 0x06) & 0x10))
		return 0;
	u8 pos = start ? pci_read8(d, start + 1) : pci_read8(d, 0x34);
	for (int guard = 0; pos >= 0x40 && guard < 48; guard++) {
		pos &= 0xfc;
		if (pci_read8(d, pos) == id)
			return pos;
		pos = pci_read8(d, pos + 1);
	}
	return 0;
}

const char *pci_name(struct pci_dev *d)
{
	static char names[MAX_PCI][12];
	char *n = names[d - pci_devs];
	snprintf(n, 12, "%02x:%02x.%x", d->bus, d->dev, d->fn);
	return n;
}

/* Read and size the six BARs of a type-0 header, with decoding off while sizing. */
static void read_bars(struct pci_dev *d)
{
	u16 cmd = pci_read16(d, 0x04);
	pci_write16(d, 0x04, cmd & ~0x3);
	for (int i = 0; i < 6; i++) {
		u8 off = 0x10 + 4 * i;
		u32 orig = pci_read32(d, off);
		pci_write32(d, off, 0xffffffff);
		u32 probe = pci_read32(d, off);
		pci_write32(d, off, orig);
		struct pci_bar *b = &d->bar[i];
		if (probe == 0)
			continue; /* not implemented */
		if (orig & 1) {
			b->io = true;
			b->addr = orig & ~3U;
			b->size = (~(probe & ~3U) + 1) & 0xffff;
			continue;
		}
		b->prefetch = (orig & 8) != 0;
		u64 mask = probe & ~0xfU;
		b->addr = orig & ~0xfU;
		if (((orig >> 1) & 3) == 2 && i < 5) {
			b->is64 = true;
			u32 orig_hi = pci_read32(d, off + 4);
			pci_write32(d, off + 4, 0xffffffff);
			u32 probe_hi = pci_read32(d, off + 4);
			pci_write32(d, off + 4, orig_hi);
			mask |= (u64)probe_hi << 32;
			b->addr |= (u64)orig_hi << 32;
			b->size = ~mask + 1;
			i++; /* the upper half is not a BAR of its own */
		} else {
			b->size = (u32)(~(u32)mask + 1);
		}
	}
	pci_write16(d, 0x04, cmd);
}

/*
 * Minimal firmware (qboot) leaves BARs unassigned. Give those addresses the
 * way SeaBIOS does on q35: memory from 0xc0000000 up to the IOAPIC at
 * 0xfec00000, I/O from 0xc000, largest first, around what is already taken.
 */
#define MEM_WINDOW_START 0xc0000000UL
#define MEM_WINDOW_END 0xfec00000UL
#define IO_WINDOW_START 0xc000UL
#define IO_WINDOW_END 0x10000UL

static bool overlaps_assigned(u64 addr, u64 size, bool io)
{
	for (int i = 0; i < pci_count; i++)
		for (int b = 0; b < 6; b++) {
			struct pci_bar *bar = &pci_devs[i].bar[b];
			if (bar->size && bar->addr && bar->io == io && addr < bar->addr + bar->size &&
			    bar->addr < addr + size)
				return true;
		}
	return false;
}

static u64 find_space(u64 size, bool io)
{
	u64 start = io ? IO_WINDOW_START : MEM_WINDOW_START, end = io ? IO_WINDOW_END : MEM_WINDOW_END;
	for (u64 a = ALIGN_UP(start, size); a + size <= end; a += size)
		if (!overlaps_assigned(a, size, io))
			return a;
	return 0;
}

static void assign_bars(void)
{
	for (;;) {
		/* The largest unassigned BAR next keeps every alignment satisfiable. */
		struct pci_dev *best = NULL;
		int best_bar = -1;
		for (int i = 0; i < pci_count; i++)
			for (int b = 0; b < 6; b++) {
				struct pci_bar *bar = &pci_devs[i].bar[b];
				if (bar->size && !bar->addr &&
				    (!best || bar->size > best->bar[best_bar].size)) {
					best = &pci_devs[i];
					best_bar = b;
				}
			}
		if (!best)
			return;
		struct pci_bar *bar = &best->bar[best_bar];
		u64 addr = find_space(bar->size, bar->io);
		if (!addr) {
			printf("WARN PCI %s bar%d: no room for 0x%lx bytes\n", pci_name(best), best_bar,
			       bar->size);
			bar->size = 0;
			continue;
		}
		u8 off = (u8)(0x10 + 4 * best_bar);
		u32 low = pci_read32(best, off);
		pci_write32(best, off, (u32)addr | (low & (bar->io ? 0x3 : 0xf)));
		if (bar->is64)
			pci_write32(best, off + 4, (u32)(addr >> 32));
		bar->addr = addr;
		pci_write16(best, 0x04, pci_read16(best, 0x04) | (bar->io ? 0x1 : 0x2));
		printf("PCI %s bar%d assigned 0x%lx\n", pci_name(best), best_bar, addr);
	}
}

/* bar64=ADDR: place every 64-bit memory BAR from ADDR up (as strato does at 1 TiB). */
static void move_bar64(u64 base)
{
	u64 next = base;
	for (int i = 0; i < pci_count; i++) {
		struct pci_dev *d = &pci_devs[i];
		for (int b = 0; b < 6; b++) {
			struct pci_bar *bar = &d->bar[b];
			if (!bar->size || bar->io || !bar->is64)
				continue;
			u64 addr = ALIGN_UP(next, bar->size);
			u16 cmd = pci_read16(d, 0x04);
			pci_write16(d, 0x04, cmd & ~0x2);
			u8 off = (u8)(0x10 + 4 * b);
			pci_write32(d, off, (u32)addr | (pci_read32(d, off) & 0xf));
			pci_write32(d, off + 4, (u32)(addr >> 32));
			pci_write16(d, 0x04, cmd);
			bar->addr = addr;
			next = addr + bar->size;
		}
	}
}

void pci_scan(void)
{
	pci_count = 0;
	for (u8 dev = 0; dev < 32; dev++) {
		for (u8 fn = 0; fn < 8; fn++) {
			if (pci_count >= MAX_PCI)
				return;
			struct pci_dev *d = &pci_devs[pci_count];
			memset(d, 0, sizeof(*d));
			d->dev = dev;
			d->fn = fn;
			u16 vendor = pci_read16(d, 0x00);
			if (vendor == 0xffff || vendor == 0) {
				if (fn == 0)
					break;
				continue;
			}
			d->vendor = vendor;
			d->device = pci_read16(d, 0x02);
			u32 class = pci_read32(d, 0x08);
			d->rev = class & 0xff;
			d->progif = (class >> 8) & 0xff;
			d->subclass = (class >> 16) & 0xff;
			d->class = class >> 24;
			d->hdr = pci_read8(d, 0x0e);
			if ((d->hdr & 0x7f) == 0) {
				d->subsys_vendor = pci_read16(d, 0x2c);
				d->subsys = pci_read16(d, 0x2e);
				read_bars(d);
			}
			pci_count++;
			if (fn == 0 && !(d->hdr & 0x80))
				break; /* single-function device */
		}
	}
	assign_bars();
	if (cfg.bar64)
		move_bar64(cfg.bar64);
}

void pci_test(void)
{
	int bad = 0, virtio = 0;
	char why[96] = "";
	for (int i = 0; i < pci_count; i++) {
		struct pci_dev *d = &pci_devs[i];
		char bars[160];
		int n = 0;
		bars[0] = 0;
		for (int b = 0; b < 6; b++) {
			struct pci_bar *bar = &d->bar[b];
			if (!bar->size)
				continue;
			n += snprintf(bars + n, sizeof(bars) - (usize)MIN(n, (int)sizeof(bars)),
				      " bar%d=%s@0x%lx/0x%lx", b,
				      bar->io ? "io" : (bar->is64 ? "mem64" : "mem32"), bar->addr,
				      bar->size);
			/* A BAR's size is a power of two and its address a multiple of it. */
			if (bar->size & (bar->size - 1) || (bar->addr & (bar->size - 1))) {
				bad++;
				snprintf(why, sizeof(why), "%s bar%d addr=0x%lx size=0x%lx", pci_name(d),
					 b, bar->addr, bar->size);
			}
		}
		if (d->vendor == 0x1af4)
			virtio++;
		printf("PCI %s %04x:%04x class=%02x.%02x.%02x%s\n", pci_name(d), d->vendor, d->device,
		       d->class, d->subclass, d->progif, bars);
	}
	if (!test_selected("pci"))
		return;
	if (pci_count == 0)
		test_result("pci", false, "no device on bus 0");
	else
		test_result("pci", bad == 0, "devices=%d virtio=%d%s%s", pci_count, virtio,
			    bad ? " bad-bar=" : "", why);
}
