/*
 * virtio 1.x over the modern PCI transport (virtio spec 4.1), split
 * virtqueues (2.7), written from the specification. Runs at CPL 3: the
 * capability structures are MMIO in the device's BARs.
 */
#include "guest.h"

struct virtio_dev virtio_devs[MAX_VIRTIO];
int virtio_count;
static u8 next_vector = VEC_IRQ_BASE;
bool vector_given[256]; /* every vector a device was ever given (a bigger re-setup moves it) */

#define PCI_CAP_VENDOR 0x09
#define PCI_CAP_MSIX 0x11
#define VIRTIO_PCI_CAP_COMMON_CFG 1
#define VIRTIO_PCI_CAP_NOTIFY_CFG 2
#define VIRTIO_PCI_CAP_ISR_CFG 3
#define VIRTIO_PCI_CAP_DEVICE_CFG 4

const char *virtio_type_name(u32 type)
{
	switch (type) {
	case VIRTIO_ID_NET:
		return "net";
	case VIRTIO_ID_BLOCK:
		return "blk";
	case VIRTIO_ID_CONSOLE:
		return "console";
	case VIRTIO_ID_RNG:
		return "rng";
	default:
		return "other";
	}
}

static void fail(struct virtio_dev *d, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(d->err, sizeof(d->err), fmt, ap);
	va_end(ap);
}

/* ---- capability discovery --------------------------------------------------- */
static void probe_one(struct pci_dev *p)
{
	if (virtio_count >= MAX_VIRTIO)
		return;
	struct virtio_dev *d = &virtio_devs[virtio_count++];
	memset(d, 0, sizeof(*d));
	d->pci = p;
	/* 0x1040 + id for modern devices; transitional ones carry the id in the subsystem. */
	d->type = p->device >= 0x1040 ? p->device - 0x1040u : p->subsys;
	bool mapped[6] = {false};
	for (u8 pos = pci_find_cap(p, PCI_CAP_VENDOR, 0); pos;
	     pos = pci_find_cap(p, PCI_CAP_VENDOR, pos)) {
		u8 type = pci_read8(p, pos + 3);
		u8 bar = pci_read8(p, pos + 4);
		u32 off = pci_read32(p, pos + 8);
		u32 len = pci_read32(p, pos + 12);
		if (bar > 5 || p->bar[bar].io || !p->bar[bar].size)
			continue; /* only memory BARs are used here */
		if ((u64)off + len > p->bar[bar].size || p->bar[bar].addr == 0)
			continue;
		u64 addr = p->bar[bar].addr + off;
		if (!mapped[bar]) {
			if (!map_mmio(p->bar[bar].addr, p->bar[bar].size)) {
				fail(d, "cannot map bar%u at 0x%lx", bar, p->bar[bar].addr);
				return;
			}
			mapped[bar] = true;
		}
		/* The first structure of each type is the one to use (4.1.4.1). */
		switch (type) {
		case VIRTIO_PCI_CAP_COMMON_CFG:
			if (!d->common && len >= 56)
				d->common = addr;
			break;
		case VIRTIO_PCI_CAP_NOTIFY_CFG:
			if (!d->notify) {
				d->notify = addr;
				d->notify_len = len;
				d->notify_mult = pci_read32(p, pos + 16);
			}
			break;
		case VIRTIO_PCI_CAP_ISR_CFG:
			if (!d->isr)
				d->isr = addr;
			break;
		case VIRTIO_PCI_CAP_DEVICE_CFG:
			if (!d->devcfg) {
				d->devcfg = addr;
				d->devcfg_len = len;
			}
			break;
		}
	}
	if (!d->common || !d->notify || !d->isr) {
		fail(d, "missing virtio capabilities (common=%d notify=%d isr=%d): legacy-only device?",
		     d->common != 0, d->notify != 0, d->isr != 0);
		return;
	}
	u8 msix = pci_find_cap(p, PCI_CAP_MSIX, 0);
	if (msix) {
		u16 ctrl = pci_read16(p, msix + 2);
		u32 table = pci_read32(p, msix + 4);
		u32 pba = pci_read32(p, msix + 8);
		struct pci_bar *tb = &p->bar[table & 7], *pb = &p->bar[pba & 7];
		u16 size = (ctrl & 0x7ff) + 1;
		if ((table & 7) < 6 && (pba & 7) < 6 && tb->size && pb->size && !tb->io &&
		    (table & ~7U) + size * 16UL <= tb->size && map_mmio(tb->addr, tb->size) &&
		    map_mmio(pb->addr, pb->size)) {
			d->msix_cap = msix;
			d->msix_size = size;
			d->msix_table = tb->addr + (table & ~7U);
			d->msix_pba = pb->addr + (pba & ~7U);
		}
	}
}

void virtio_probe(void)
{
	virtio_count = 0;
	for (int i = 0; i < pci_count; i++) {
		struct pci_dev *p = &pci_devs[i];
		if (p->vendor == 0x1af4 && p->device >= 0x1000 && p->device <= 0x107f)
			probe_one(p);
	}
}

struct virtio_dev *virtio_find(u32 type, int nth)
{
	for (int i = 0; i < virtio_count; i++)
		if (virtio_devs[i].type == type && nth-- == 0)
			return &virtio_devs[i];
	return NULL;
}

/* ---- register access ---------------------------------------------------------- */
static u8 common_r8(struct virtio_dev *d, u32 off) { return mmio_read8(d->common + off); }
static u16 common_r16(struct virtio_dev *d, u32 off) { return mmio_read16(d->common + off); }
static u32 common_r32(struct virtio_dev *d, u32 off) { return mmio_read32(d->common + off); }
static void common_w8(struct virtio_dev *d, u32 off, u8 v) { mmio_write8(d->common + off, v); }
static void common_w16(struct virtio_dev *d, u32 off, u16 v) { mmio_write16(d->common + off, v); }
static void common_w32(struct virtio_dev *d, u32 off, u32 v) { mmio_write32(d->common + off, v); }
static void common_w64(struct virtio_dev *d, u32 off, u64 v)
{
	common_w32(d, off, (u32)v);
	common_w32(d, off + 4, (u32)(v >> 32));
}

u8 virtio_cfg_read8(struct virtio_dev *d, u32 off)
{
	return off < d->devcfg_len ? mmio_read8(d->devcfg + off) : 0;
}
u16 virtio_cfg_read16(struct virtio_dev *d, u32 off)
{
	return off + 2 <= d->devcfg_len ? mmio_read16(d->devcfg + off) : 0;
}
u32 virtio_cfg_read32(struct virtio_dev *d, u32 off)
{
	return off + 4 <= d->devcfg_len ? mmio_read32(d->devcfg + off) : 0;
}
/* A 64-bit field is two reads: retry until config_generation is stable (4.1.4.3.1). */
u64 virtio_cfg_read64(struct virtio_dev *d, u32 off)
{
	for (int tries = 0; tries < 16; tries++) {
		u8 gen = common_r8(d, VCOMMON_CFGGEN);
		u64 v = virtio_cfg_read32(d, off) | ((u64)virtio_cfg_read32(d, off + 4) << 32);
		if (common_r8(d, VCOMMON_CFGGEN) == gen)
			return v;
	}
	return 0;
}

bool virtio_has(struct virtio_dev *d, u64 feature)
{
	return (d->features & feature) != 0;
}

/* ---- MSI-X ---------------------------------------------------------------------- */
static void msix_write_entry(struct virtio_dev *d, u16 entry, u8 vector)
{
	u64 e = d->msix_table + entry * 16UL;
	mmio_write32(e + 12, 1); /* masked while it changes */
	mmio_write32(e + 0, 0xfee00000U | (bsp_apic_id << 12)); /* fixed, physical destination */
	mmio_write32(e + 4, 0);
	mmio_write32(e + 8, vector); /* edge, fixed delivery */
	mmio_write32(e + 12, 0);
}

void msix_mask(struct virtio_dev *d, u16 entry, bool masked)
{
	mmio_write32(d->msix_table + entry * 16UL + 12, masked ? 1 : 0);
}

bool msix_pending(struct virtio_dev *d, u16 entry)
{
	return (mmio_read32(d->msix_pba + (entry / 32) * 4UL) >> (entry % 32)) & 1;
}

/*
 * Enable MSI-X. With enough table entries, entry 0 takes config changes and
 * entry i+1 queue i; with fewer (QEMU's virtio-serial has 2), config changes
 * get none and queue i takes entry i; queues beyond the table are polled.
 */
static bool msix_enable(struct virtio_dev *d, int nq)
{
	if (!d->msix_cap || d->msix_size < 1)
		return false;
	int entries = MIN((int)d->msix_size, nq + 1);
	if (d->vec_count < entries) {
		/* A block of CPU vectors per device, kept across re-initialisations. */
		entries = MIN(entries, VEC_IRQ_LAST + 1 - (int)next_vector);
		if (entries < 1)
			return false;
		d->vec_base = next_vector;
		d->vec_count = (u8)entries;
		next_vector = (u8)(next_vector + entries);
		for (int v = d->vec_base; v < d->vec_base + entries; v++)
			vector_given[v] = true;
	}
	entries = MIN(entries, (int)d->vec_count);
	bool with_config = entries >= nq + 1;
	struct pci_dev *p = d->pci;
	u16 ctrl = pci_read16(p, d->msix_cap + 2);
	pci_write16(p, d->msix_cap + 2, ctrl | 0x8000 | 0x4000); /* enable, function-masked */
	for (int e = 0; e < entries; e++)
		msix_write_entry(d, (u16)e, (u8)(d->vec_base + e));
	for (int i = 0; i < nq; i++) {
		int e = with_config ? i + 1 : i;
		d->vq[i].msix_entry = e < entries ? (u16)e : VIRTIO_MSI_NO_VECTOR;
		d->vq[i].vector = e < entries ? (u8)(d->vec_base + e) : 0;
	}
	pci_write16(p, d->msix_cap + 2, (ctrl | 0x8000) & ~0x4000);
	d->config_vector = with_config ? d->vec_base : 0;
	common_w16(d, VCOMMON_MSIX, with_config ? 0 : VIRTIO_MSI_NO_VECTOR);
	d->config_entry = common_r16(d, VCOMMON_MSIX);
	return true;
}

/* ---- setup --------------------------------------------------------------------- */
void virtio_reset(struct virtio_dev *d)
{
	common_w8(d, VCOMMON_STATUS, 0);
	/* The reset is complete when the status reads back 0 (4.1.4.3.2). */
	u64 end = deadline_ms(1000);
	while (common_r8(d, VCOMMON_STATUS) != 0 && !expired(end))
		cpu_relax();
}

static void set_status(struct virtio_dev *d, u8 bits)
{
	common_w8(d, VCOMMON_STATUS, common_r8(d, VCOMMON_STATUS) | bits);
}

static bool setup_queue(struct virtio_dev *d, struct virtq *q, u16 index, u16 max_qsize)
{
	/* msix_enable() chose the entry and vector; the rest starts from zero. */
	u16 entry = d->msix ? q->msix_entry : VIRTIO_MSI_NO_VECTOR;
	u8 vector = d->msix ? q->vector : 0;
	memset(q, 0, sizeof(*q));
	q->dev = d;
	q->index = index;
	common_w16(d, VCOMMON_Q_SELECT, index);
	u16 size = common_r16(d, VCOMMON_Q_SIZE);
	if (size == 0) {
		fail(d, "queue %u not available", index);
		return false;
	}
	if (common_r16(d, VCOMMON_Q_ENABLE)) {
		fail(d, "queue %u enabled after reset", index);
		return false;
	}
	size = MIN(size, MIN(max_qsize, (u16)VQ_MAX_SIZE));
	while (size & (size - 1)) /* split rings: a power of two */
		size &= size - 1;
	q->size = size;
	q->desc = heap_alloc(16UL * size, 4096);
	q->avail = heap_alloc(6UL + 2UL * size, 4096);
	q->used = heap_alloc(6UL + 8UL * size, 4096);
	q->tokens = heap_alloc(8UL * size, 8);
	if (d->features & VIRTIO_F_INDIRECT_DESC)
		q->indirect = heap_alloc(16UL * VQ_MAX_INDIRECT * size, 4096);
	if (!q->desc || !q->avail || !q->used || !q->tokens ||
	    ((d->features & VIRTIO_F_INDIRECT_DESC) && !q->indirect)) {
		fail(d, "out of memory for queue %u", index);
		return false;
	}
	for (u16 i = 0; i < size; i++)
		q->desc[i].next = (u16)(i + 1);
	q->free_head = 0;
	q->num_free = size;
	common_w16(d, VCOMMON_Q_SIZE, size);
	common_w64(d, VCOMMON_Q_DESCLO, (u64)q->desc);
	common_w64(d, VCOMMON_Q_AVAILLO, (u64)q->avail);
	common_w64(d, VCOMMON_Q_USEDLO, (u64)q->used);
	u64 noff = (u64)common_r16(d, VCOMMON_Q_NOFF) * d->notify_mult;
	if (noff + 2 > d->notify_len) {
		fail(d, "queue %u notify offset 0x%lx outside the notify structure", index, noff);
		return false;
	}
	q->notify_addr = d->notify + noff;
	q->msix_entry = VIRTIO_MSI_NO_VECTOR;
	if (vector && entry != VIRTIO_MSI_NO_VECTOR) {
		common_w16(d, VCOMMON_Q_MSIX, entry);
		/* Reading back NO_VECTOR means the device could not take it: poll this queue. */
		if (common_r16(d, VCOMMON_Q_MSIX) == entry) {
			q->msix_entry = entry;
			q->vector = vector;
		}
	}
	volatile u16 *used_event = &q->avail->ring[size];
	if (d->features & VIRTIO_F_EVENT_IDX)
		*used_event = q->vector ? 0 : 0x8000; /* polled queues ask for no interrupt */
	else if (!q->vector)
		q->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
	common_w16(d, VCOMMON_Q_ENABLE, 1);
	q->ready = true;
	return true;
}

/* What the device offers, read after a reset (the driver may need it to choose nq). */
u64 virtio_offered(struct virtio_dev *d)
{
	if (d->err[0])
		return 0;
	struct pci_dev *p = d->pci;
	pci_write16(p, 0x04, pci_read16(p, 0x04) | 0x0002 | 0x0004 | 0x0400);
	virtio_reset(d);
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);
	common_w32(d, VCOMMON_DFSELECT, 0);
	u64 f = common_r32(d, VCOMMON_DF);
	common_w32(d, VCOMMON_DFSELECT, 1);
	f |= (u64)common_r32(d, VCOMMON_DF) << 32;
	virtio_reset(d);
	return f;
}

bool virtio_setup(struct virtio_dev *d, u64 wanted, int nq, u16 max_qsize)
{
	if (d->err[0])
		return false;
	struct pci_dev *p = d->pci;
	/* Memory decoding and bus mastering on; legacy INTx off (MSI-X or polling). */
	pci_write16(p, 0x04, pci_read16(p, 0x04) | 0x0002 | 0x0004 | 0x0400);
	virtio_reset(d);
	if (common_r8(d, VCOMMON_STATUS) != 0) {
		fail(d, "device did not reset");
		return false;
	}
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);
	common_w32(d, VCOMMON_DFSELECT, 0);
	u64 f = common_r32(d, VCOMMON_DF);
	common_w32(d, VCOMMON_DFSELECT, 1);
	f |= (u64)common_r32(d, VCOMMON_DF) << 32;
	d->dev_features = f;
	if (!(f & VIRTIO_F_VERSION_1)) {
		fail(d, "no VIRTIO_F_VERSION_1 (features 0x%lx)", f);
		set_status(d, VIRTIO_STATUS_FAILED);
		return false;
	}
	/* ACCESS_PLATFORM is fine: without an IOMMU, addresses are guest-physical. */
	d->features = f & (wanted | VIRTIO_F_VERSION_1 | VIRTIO_F_EVENT_IDX |
			   VIRTIO_F_INDIRECT_DESC | VIRTIO_F_ACCESS_PLATFORM);
	common_w32(d, VCOMMON_GFSELECT, 0);
	common_w32(d, VCOMMON_GF, (u32)d->features);
	common_w32(d, VCOMMON_GFSELECT, 1);
	common_w32(d, VCOMMON_GF, (u32)(d->features >> 32));
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	if (!(common_r8(d, VCOMMON_STATUS) & VIRTIO_STATUS_FEATURES_OK)) {
		fail(d, "FEATURES_OK not accepted (offered 0x%lx, asked 0x%lx)", f, d->features);
		set_status(d, VIRTIO_STATUS_FAILED);
		return false;
	}
	d->num_queues = common_r16(d, VCOMMON_NUMQ);
	if (nq > d->num_queues) {
		fail(d, "device has %u queues, need %d", d->num_queues, nq);
		set_status(d, VIRTIO_STATUS_FAILED);
		return false;
	}
	d->vq = heap_alloc(sizeof(struct virtq) * (u64)nq, 64);
	d->nvq = nq;
	d->config_entry = VIRTIO_MSI_NO_VECTOR;
	if (cfg.irq_msix)
		d->msix = msix_enable(d, nq);
	for (int i = 0; i < nq; i++) {
		if (!setup_queue(d, &d->vq[i], (u16)i, max_qsize)) {
			set_status(d, VIRTIO_STATUS_FAILED);
			return false;
		}
	}
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
	if (common_r8(d, VCOMMON_STATUS) & VIRTIO_STATUS_NEEDS_RESET) {
		fail(d, "device needs reset after DRIVER_OK");
		return false;
	}
	return true;
}

/* ---- split virtqueue ------------------------------------------------------------ */
bool vq_can_indirect(struct virtq *q)
{
	return q->indirect != NULL;
}

bool vq_add(struct virtq *q, const struct vbuf *out, int nout, const struct vbuf *in, int nin,
	    void *token, bool indirect)
{
	int total = nout + nin;
	if (total <= 0 || !token)
		return false;
	if (indirect && (!q->indirect || total > VQ_MAX_INDIRECT))
		indirect = false;
	if (q->num_free < (indirect ? 1 : total))
		return false;
	u16 head = q->free_head;
	if (indirect) {
		struct virtq_desc *t = &q->indirect[(u64)head * VQ_MAX_INDIRECT];
		for (int k = 0; k < total; k++) {
			const struct vbuf *b = k < nout ? &out[k] : &in[k - nout];
			t[k].addr = (u64)b->addr;
			t[k].len = b->len;
			t[k].flags = (k < nout ? 0 : VIRTQ_DESC_F_WRITE) |
				     (k + 1 < total ? VIRTQ_DESC_F_NEXT : 0);
			t[k].next = (u16)(k + 1);
		}
		q->desc[head].addr = (u64)t;
		q->desc[head].len = (u32)(16 * total);
		q->desc[head].flags = VIRTQ_DESC_F_INDIRECT;
		q->free_head = q->desc[head].next;
		q->num_free--;
	} else {
		/* The free list is linked through `next`, so a chain reuses the links. */
		u16 i = head;
		for (int k = 0; k < total; k++) {
			const struct vbuf *b = k < nout ? &out[k] : &in[k - nout];
			volatile struct virtq_desc *dsc = &q->desc[i];
			dsc->addr = (u64)b->addr;
			dsc->len = b->len;
			dsc->flags = (k < nout ? 0 : VIRTQ_DESC_F_WRITE) |
				     (k + 1 < total ? VIRTQ_DESC_F_NEXT : 0);
			i = dsc->next;
		}
		q->free_head = i;
		q->num_free = (u16)(q->num_free - total);
	}
	q->tokens[head] = token;
	q->avail->ring[q->avail_idx % q->size] = head;
	barrier(); /* x86 keeps stores in order; the compiler must too */
	q->avail_idx++;
	q->avail->idx = q->avail_idx;
	return true;
}

/* vring_need_event (2.7.10): did new_idx just pass event_idx? */
static bool need_event(u16 event, u16 new_idx, u16 old)
{
	return (u16)(new_idx - event - 1) < (u16)(new_idx - old);
}

void vq_kick(struct virtq *q)
{
	mb(); /* the avail index must be visible before reading the device's wish */
	u16 old = q->kicked_idx, now = q->avail_idx;
	q->kicked_idx = now;
	if (old == now)
		return;
	bool notify;
	if (q->dev->features & VIRTIO_F_EVENT_IDX)
		notify = need_event(*(volatile u16 *)&q->used->ring[q->size], now, old);
	else
		notify = !(q->used->flags & VIRTQ_USED_F_NO_NOTIFY);
	if (notify) {
		mmio_write16(q->notify_addr, q->index);
		q->notifications++;
	}
}

bool vq_has_used(struct virtq *q)
{
	return q->used->idx != q->last_used;
}

void *vq_get(struct virtq *q, u32 *len)
{
	while (q->used->idx != q->last_used) {
		barrier(); /* read the element after the index (x86 keeps loads in order) */
		volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
		u32 id = e->id, l = e->len;
		q->last_used++;
		volatile u16 *used_event = &q->avail->ring[q->size];
		if (q->dev->features & VIRTIO_F_EVENT_IDX)
			*used_event = q->vector ? q->last_used : (u16)(q->last_used + 0x8000);
		if (id >= q->size || !q->tokens[id]) {
			q->bad_used++; /* the device returned a head it does not own */
			continue;
		}
		u16 i = (u16)id;
		u16 count = 1;
		while ((q->desc[i].flags & VIRTQ_DESC_F_NEXT) && count < q->size) {
			i = q->desc[i].next;
			count++;
		}
		q->desc[i].next = q->free_head;
		q->free_head = (u16)id;
		q->num_free = (u16)(q->num_free + count);
		void *token = q->tokens[id];
		q->tokens[id] = NULL;
		q->completions++;
		if (len)
			*len = l;
		return token;
	}
	return NULL;
}

bool vq_wait(struct virtq *q, u64 deadline)
{
	for (;;) {
		if (vq_has_used(q))
			return true;
		if (expired(deadline))
			return false;
		if (q->vector) {
			u64 seen = irq_seq;
			mb(); /* used_event was written before; now re-read the used index */
			if (vq_has_used(q))
				return true;
			wait_for_interrupt(seen);
		} else {
			cpu_relax();
		}
	}
}

void *vq_wait_get(struct virtq *q, u32 *len, u64 deadline)
{
	if (!vq_wait(q, deadline))
		return NULL;
	return vq_get(q, len);
}
