/* virtio-blk: functional checks and the block benchmarks. */
#include "guest.h"

#define VIRTIO_BLK_F_SIZE_MAX (1UL << 1)
#define VIRTIO_BLK_F_SEG_MAX (1UL << 2)
#define VIRTIO_BLK_F_RO (1UL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1UL << 6)
#define VIRTIO_BLK_F_FLUSH (1UL << 9)
#define VIRTIO_BLK_F_MQ (1UL << 12)
#define BLK_MQ_MAX 8

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8

#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1
#define VIRTIO_BLK_S_UNSUPP 2

#define STATUS_TIMEOUT 0x100
#define STATUS_NOSPACE 0x101
#define STATUS_UNTOUCHED 0xee /* what the status byte holds until the device writes it */

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* One request's driver-owned memory: header, status byte (device-writable). */
struct blk_slot {
	struct blk_hdr hdr;
	u8 status;
	u8 pad[15];
	void *data;
	u64 bytes;
	bool write;
};

struct blk {
	struct virtio_dev *vd;
	struct virtq *q;
	u64 capacity; /* 512-byte sectors */
	u32 unit;     /* logical block size */
	u32 spu;      /* sectors per unit */
	bool ro;
	const char *name;
};

static const char *status_name(u32 s)
{
	switch (s) {
	case VIRTIO_BLK_S_OK:
		return "OK";
	case VIRTIO_BLK_S_IOERR:
		return "IOERR";
	case VIRTIO_BLK_S_UNSUPP:
		return "UNSUPP";
	case STATUS_TIMEOUT:
		return "timeout";
	case STATUS_NOSPACE:
		return "no-descriptors";
	case STATUS_UNTOUCHED:
		return "not-written";
	default:
		return "other";
	}
}

static bool blk_open(struct blk *b, struct virtio_dev *vd, char *err, usize errlen)
{
	memset(b, 0, sizeof(*b));
	b->vd = vd;
	b->name = pci_name(vd->pci);
	u64 wanted = VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH |
		     VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX;
	if (!virtio_setup(vd, wanted, 1, 256)) {
		snprintf(err, errlen, "setup: %s", vd->err);
		return false;
	}
	b->q = &vd->vq[0];
	b->capacity = virtio_cfg_read64(vd, 0);
	b->unit = 512;
	if (virtio_has(vd, VIRTIO_BLK_F_BLK_SIZE)) {
		u32 bs = virtio_cfg_read32(vd, 20);
		if (bs >= 512 && bs <= 65536 && !(bs & (bs - 1)))
			b->unit = bs;
	}
	b->spu = b->unit / 512;
	b->ro = virtio_has(vd, VIRTIO_BLK_F_RO);
	return true;
}

/*
 * One synchronous request. The data is split into `nseg` descriptors (and
 * sent through an indirect table when asked) to exercise chains.
 */
static u32 blk_rw(struct blk *b, u32 type, u64 sector, void *data, u32 len, int nseg, bool indirect)
{
	static struct blk_slot slot __attribute__((aligned(64)));
	struct vbuf out[VQ_MAX_INDIRECT], in[VQ_MAX_INDIRECT];
	int nout = 0, nin = 0;
	bool to_device = type == VIRTIO_BLK_T_OUT;
	slot.hdr.type = type;
	slot.hdr.reserved = 0;
	slot.hdr.sector = sector;
	slot.status = STATUS_UNTOUCHED;
	out[nout++] = (struct vbuf){&slot.hdr, sizeof(slot.hdr)};
	if (len) {
		nseg = MAX(1, MIN(nseg, VQ_MAX_INDIRECT - 2));
		u32 seg = ALIGN_UP(len / (u32)nseg, 512);
		for (u32 off = 0; off < len; off += seg) {
			struct vbuf v = {(u8 *)data + off, MIN(seg, len - off)};
			if (to_device)
				out[nout++] = v;
			else
				in[nin++] = v;
		}
	}
	in[nin++] = (struct vbuf){&slot.status, 1};
	if (!vq_add(b->q, out, nout, in, nin, &slot, indirect))
		return STATUS_NOSPACE;
	vq_kick(b->q);
	u32 used_len;
	void *tok = vq_wait_get(b->q, &used_len, deadline_ms(cfg.timeout_ms));
	if (tok != &slot)
		return STATUS_TIMEOUT;
	return slot.status;
}

static void fill_pattern(u8 *buf, u32 seed, u64 sector, u64 nsectors)
{
	u32 *w = (u32 *)buf;
	for (u64 s = 0; s < nsectors; s++)
		for (u32 i = 0; i < 128; i++)
			w[s * 128 + i] = pattern_word(seed, sector + s, i);
}

static bool check_pattern(const u8 *buf, u32 seed, u64 sector, u64 nsectors, u64 *bad_sector)
{
	const u32 *w = (const u32 *)buf;
	for (u64 s = 0; s < nsectors; s++)
		for (u32 i = 0; i < 128; i++)
			if (w[s * 128 + i] != pattern_word(seed, sector + s, i)) {
				*bad_sector = sector + s;
				return false;
			}
	return true;
}

/* One request on queue `q`, not waited for: its own slot (the caller keeps them apart). */
static bool blk_submit(struct virtq *q, struct blk_slot *slot, u32 type, u64 sector, void *data,
		       u32 len)
{
	slot->hdr = (struct blk_hdr){.type = type, .sector = sector};
	slot->status = STATUS_UNTOUCHED;
	struct vbuf out[2] = {{&slot->hdr, sizeof(slot->hdr)}, {data, len}};
	struct vbuf in[2] = {{data, len}, {&slot->status, 1}};
	bool write = type == VIRTIO_BLK_T_OUT;
	return write ? vq_add(q, out, 2, in + 1, 1, slot, false)
		     : vq_add(q, out, 1, in, 2, slot, false);
}

/* Wait (until the deadline) for `vector` to count past `before`. */
static bool wait_vector(u8 vector, u32 before, u64 deadline)
{
	for (;;) {
		u64 seen = irq_seq;
		mb(); /* read the sequence before the count: an interrupt between wakes the wait */
		if (irq_counts[vector] != before)
			return true;
		if (expired(deadline))
			return false;
		wait_for_interrupt(seen);
	}
}

/*
 * blk-mq (the device offers VIRTIO_BLK_F_MQ): every queue it has (up to BLK_MQ_MAX) set up
 * with its own vector; one write per queue, all in flight at once, then each unit read back
 * through the next queue. Each queue must complete exactly its own requests.
 */
static void blk_mq_test(struct blk *b, u8 *buf, u8 *buf2)
{
	struct virtio_dev *vd = b->vd;
	const char *dev = b->name;
	u16 offered = virtio_cfg_read16(vd, 34);
	int nq = MIN((int)offered, BLK_MQ_MAX);
	u64 wanted = VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH |
		     VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_MQ;
	if (nq < 2 || !virtio_setup(vd, wanted, nq, 256)) {
		test_result("blk-mq", false, "dev=%s num_queues=%u setup: %s", dev, offered,
			    nq < 2 ? "fewer than 2 queues" : vd->err);
		return;
	}
	static struct blk_slot slots[BLK_MQ_MAX] __attribute__((aligned(64)));
	u32 seed = (u32)rdtsc() | 1;
	u64 first = 16 * b->spu; /* past blk-rw's units 0-8 */
	u32 unit = b->unit;
	bool ok = true;
	int wrong_queue = 0;
	for (int pass = 0; pass < 2 && ok; pass++) {
		bool write = pass == 0;
		for (int i = 0; i < nq; i++) {
			u64 sector = first + (u64)i * b->spu;
			int qi = write ? i : (i + 1) % nq;
			u8 *data = (write ? buf : buf2) + (u64)i * unit;
			if (write)
				fill_pattern(data, seed, sector, b->spu);
			ok &= blk_submit(&vd->vq[qi], &slots[i],
					 write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN, sector, data, unit);
		}
		u32 irqs_before[BLK_MQ_MAX];
		for (int i = 0; i < nq; i++)
			irqs_before[i] = irq_counts[vd->vq[i].vector];
		for (int i = 0; i < nq; i++)
			vq_kick(&vd->vq[i]);
		for (int i = 0; i < nq && ok; i++) {
			int qi = write ? i : (i + 1) % nq;
			u64 deadline = deadline_ms(cfg.timeout_ms);
			/* Each queue's own interrupt first: taking a completion before the device
			 * decided to notify moves used_event past it, and the device then rightly
			 * sends none (EVENT_IDX), which would leave this queue's vector unproven. */
			if (vd->vq[qi].vector)
				wait_vector(vd->vq[qi].vector, irqs_before[qi], deadline);
			void *tok = vq_wait_get(&vd->vq[qi], NULL, deadline);
			if (tok != &slots[i])
				wrong_queue++;
			ok &= tok == &slots[i] && slots[i].status == VIRTIO_BLK_S_OK;
		}
	}
	u64 bad = 0;
	for (int i = 0; i < nq && ok; i++)
		ok &= check_pattern(buf2 + (u64)i * unit, seed, first + (u64)i * b->spu, b->spu, &bad);
	char counts[160];
	int len = 0;
	counts[0] = 0;
	for (int i = 0; i < nq; i++)
		len += snprintf(counts + len, sizeof(counts) - (usize)MIN(len, (int)sizeof(counts)),
				"%s%lu", i ? "," : "", vd->vq[i].completions);
	test_result("blk-mq", ok,
		    "dev=%s queues=%d offered=%u seed=0x%x written=%lu:%lu completions=%s "
		    "wrong_queue=%d bad=%lu",
		    dev, nq, offered, seed, first, (u64)nq * b->spu, counts, wrong_queue, bad);
	b->q = &vd->vq[0]; /* the later checks go on through queue 0 */
}

static void blk_test_device(struct virtio_dev *vd)
{
	struct blk b;
	char err[128];
	if (!blk_open(&b, vd, err, sizeof(err))) {
		test_result("blk", false, "dev=%s %s", pci_name(vd->pci), err);
		return;
	}
	const char *dev = b.name;
	printf("INFO blk dev=%s capacity=%lu unit=%u ro=%d features=0x%lx msix=%d vector=0x%x "
	       "qsize=%u\n",
	       dev, b.capacity, b.unit, b.ro, vd->features, vd->msix, b.q->vector, b.q->size);
	u8 *buf = heap_alloc(64 * KiB, 4096);
	u8 *buf2 = heap_alloc(64 * KiB, 4096);
	if (!buf || !buf2) {
		test_result("blk", false, "dev=%s out of memory", dev);
		return;
	}
	bool indirect = vq_can_indirect(b.q);

	if (test_selected("blk-id")) {
		memset(buf, 0, 32);
		u32 st = blk_rw(&b, VIRTIO_BLK_T_GET_ID, 0, buf, 20, 1, false);
		char serial[21];
		int n = 0;
		for (; n < 20 && buf[n]; n++)
			serial[n] = (buf[n] > 0x20 && buf[n] < 0x7f) ? (char)buf[n] : '?';
		serial[n] = 0;
		test_result("blk-id", st == VIRTIO_BLK_S_OK, "dev=%s serial=%s status=%s", dev,
			    n ? serial : "(empty)", status_name(st));
	}

	u64 spu = b.spu;
	u64 last = (b.capacity / spu) * spu - spu; /* start of the last whole unit */
	if (test_selected("blk-rw")) {
		if (b.capacity < 16 * spu) {
			test_result("blk-rw", false, "dev=%s capacity %lu sectors is too small", dev,
				    b.capacity);
		} else if (b.ro) {
			u32 st = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf, b.unit * 2, 2, indirect);
			test_result("blk-rw", st == VIRTIO_BLK_S_OK, "dev=%s ro=1 read status=%s", dev,
				    status_name(st));
		} else {
			u32 seed = (u32)rdtsc() | 1;
			/* Writes: unit 0 alone, units 1..8 in one request (4 segments, indirect
			 * when offered), the last unit. Reads: units 0..8 in one request, the last. */
			const char *step = "";
			u32 st = VIRTIO_BLK_S_OK;
			u64 bad = 0;
			fill_pattern(buf, seed, 0, spu);
			st = blk_rw(&b, VIRTIO_BLK_T_OUT, 0, buf, b.unit, 1, false);
			if (st != VIRTIO_BLK_S_OK)
				step = "write unit 0";
			if (!*step) {
				fill_pattern(buf, seed, spu, 8 * spu);
				st = blk_rw(&b, VIRTIO_BLK_T_OUT, spu, buf, 8 * b.unit, 4, indirect);
				if (st != VIRTIO_BLK_S_OK)
					step = "write units 1-8";
			}
			if (!*step) {
				fill_pattern(buf, seed, last, spu);
				st = blk_rw(&b, VIRTIO_BLK_T_OUT, last, buf, b.unit, 1, false);
				if (st != VIRTIO_BLK_S_OK)
					step = "write last unit";
			}
			if (!*step) {
				memset(buf2, 0, 9 * b.unit);
				st = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf2, 9 * b.unit, 3, false);
				if (st != VIRTIO_BLK_S_OK)
					step = "read units 0-8";
				else if (!check_pattern(buf2, seed, 0, 9 * spu, &bad))
					step = "compare units 0-8";
			}
			if (!*step) {
				memset(buf2, 0, b.unit);
				st = blk_rw(&b, VIRTIO_BLK_T_IN, last, buf2, b.unit, 1, indirect);
				if (st != VIRTIO_BLK_S_OK)
					step = "read last unit";
				else if (!check_pattern(buf2, seed, last, spu, &bad))
					step = "compare last unit";
			}
			if (*step)
				test_result("blk-rw", false, "dev=%s failed at %s: status=%s bad-sector=%lu",
					    dev, step, status_name(st), bad);
			else
				test_result("blk-rw", true,
					    "dev=%s seed=0x%x written=0:%lu,%lu:%lu,%lu:%lu indirect=%d",
					    dev, seed, spu, spu, 8 * spu, last, spu, indirect);
		}
	}

	if (test_selected("blk-flush") && virtio_has(vd, VIRTIO_BLK_F_FLUSH)) {
		u32 st = blk_rw(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0, false);
		test_result("blk-flush", st == VIRTIO_BLK_S_OK, "dev=%s status=%s", dev,
			    status_name(st));
	}

	if (test_selected("blk-ro") && b.ro) {
		/* A read-only disk refuses writes with IOERR and keeps its data. */
		u32 st0 = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf2, b.unit, 1, false);
		fill_pattern(buf, 0x12345678, 0, spu);
		if (!memcmp(buf, buf2, b.unit))
			buf[0] ^= 0xff;
		u32 st = blk_rw(&b, VIRTIO_BLK_T_OUT, 0, buf, b.unit, 1, false);
		u32 st2 = blk_rw(&b, VIRTIO_BLK_T_IN, 0, buf, b.unit, 1, false);
		bool same = !memcmp(buf, buf2, b.unit);
		test_result("blk-ro", st0 == VIRTIO_BLK_S_OK && st == VIRTIO_BLK_S_IOERR &&
					      st2 == VIRTIO_BLK_S_OK && same,
			    "dev=%s write-status=%s data-unchanged=%d", dev, status_name(st), same);
	}

	if (test_selected("blk-mq") && (vd->dev_features & VIRTIO_BLK_F_MQ) && !b.ro)
		blk_mq_test(&b, buf, buf2);

	if (test_selected("blk-eod")) {
		/* A read starting at the capacity must not succeed. */
		u32 st = blk_rw(&b, VIRTIO_BLK_T_IN, b.capacity, buf, b.unit, 1, false);
		test_result("blk-eod", st == VIRTIO_BLK_S_IOERR || st == VIRTIO_BLK_S_UNSUPP,
			    "dev=%s sector=%lu status=%s", dev, b.capacity, status_name(st));
	}
	if (b.q->bad_used)
		test_result("blk", false, "dev=%s the device returned %lu bad used elements", dev,
			    b.q->bad_used);
}

void blk_tests(void)
{
	if (!virtio_find(VIRTIO_ID_BLOCK, 0)) {
		if (test_explicit("blk"))
			test_skip("blk", "no virtio-blk device");
		return;
	}
	if (!test_selected("blk-id") && !test_selected("blk-rw") && !test_selected("blk-flush") &&
	    !test_selected("blk-ro") && !test_selected("blk-eod"))
		return;
	for (int n = 0;; n++) {
		struct virtio_dev *vd = virtio_find(VIRTIO_ID_BLOCK, n);
		if (!vd)
			break;
		blk_test_device(vd);
	}
}

/* ---- benchmark: blk-{rand,seq}{read,write}, qd up to 64 ---------------------------- */
void blk_bench(struct bench_cfg *bc)
{
	const char *name = bc->name;
	bool write = !strcmp(name, "blk-randwrite") || !strcmp(name, "blk-seqwrite");
	bool random = !strcmp(name, "blk-randread") || !strcmp(name, "blk-randwrite");
	if (!write && !random && strcmp(name, "blk-seqread")) {
		test_result("bench", false, "unknown benchmark %s", name);
		return;
	}
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_BLOCK, 0);
	struct blk b;
	char err[128];
	if (!vd) {
		test_result("bench", false, "%s: no virtio-blk device", name);
		return;
	}
	if (!blk_open(&b, vd, err, sizeof(err))) {
		test_result("bench", false, "%s: %s", name, err);
		return;
	}
	if (write && b.ro) {
		test_result("bench", false, "%s: the disk is read-only", name);
		return;
	}
	u64 bs = ALIGN_UP(MAX(bc->bs, (u64)b.unit), b.unit);
	u64 region = bc->region ? MIN(bc->region, b.capacity * 512) : b.capacity * 512;
	u64 blocks = region / bs;
	bool indirect = bc->indirect && vq_can_indirect(b.q);
	u64 qd = MAX(1UL, MIN(bc->qd, 64UL));
	qd = MIN(qd, indirect ? b.q->size : b.q->size / 3UL);
	if (blocks == 0 || qd == 0 || bs > 16 * MiB) {
		test_result("bench", false, "%s: bs=%lu does not fit (capacity %lu sectors, qsize %u)",
			    name, bs, b.capacity, b.q->size);
		return;
	}
	struct blk_slot *slots = heap_alloc(sizeof(struct blk_slot) * qd, 64);
	/* A buffer per request when memory allows, else one shared buffer. */
	bool per_slot = heap_free_bytes() > qd * bs + 8 * MiB;
	u8 *shared = per_slot ? NULL : heap_alloc(bs, 4096);
	for (u64 i = 0; i < qd && slots; i++) {
		slots[i].data = per_slot ? heap_alloc(bs, 4096) : shared;
		if (!slots[i].data)
			slots = NULL;
		else
			memset(slots[i].data, 0x5a, bs);
	}
	if (!slots) {
		test_result("bench", false, "%s: out of memory for qd=%lu bs=%lu", name, qd, bs);
		return;
	}
	u64 rng = rdtsc() | 1, next_block = 0;
	u64 ops = 0, bytes = 0, errors = 0, submitted = 0, inflight = 0;
	u64 limit_ops = bc->ops;
	u64 seconds = limit_ops && !bc->seconds ? 0 : bc->seconds;
	u32 irqs0 = b.q->vector ? irq_counts[b.q->vector] : 0;
	u64 notif0 = b.q->notifications;
	printf("BENCH-START %s qd=%lu bs=%lu indirect=%d irq=%s\n", name, qd, bs, indirect,
	       b.q->vector ? "msix" : "poll");
	u64 t0 = rdtsc();
	u64 end = t0 + ms_to_tsc(seconds * 1000);
	bool stopping = false;
	for (;;) {
		/* Top the queue up to qd requests, then one notification for the batch. */
		while (!stopping && inflight < qd) {
			if ((limit_ops && submitted >= limit_ops) || (seconds && expired(end))) {
				stopping = true;
				break;
			}
			struct blk_slot *s = NULL;
			for (u64 i = 0; i < qd; i++)
				if (!slots[i].bytes) {
					s = &slots[i];
					break;
				}
			u64 blk = random ? rand64(&rng) % blocks : next_block++ % blocks;
			s->hdr.type = write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
			s->hdr.reserved = 0;
			s->hdr.sector = blk * (bs / 512);
			s->status = STATUS_UNTOUCHED;
			s->bytes = bs;
			struct vbuf out[2] = {{&s->hdr, sizeof(s->hdr)}, {s->data, (u32)bs}};
			struct vbuf in[2] = {{s->data, (u32)bs}, {&s->status, 1}};
			bool ok = write ? vq_add(b.q, out, 2, in + 1, 1, s, indirect)
					: vq_add(b.q, out, 1, in, 2, s, indirect);
			if (!ok) {
				s->bytes = 0;
				break;
			}
			submitted++;
			inflight++;
		}
		vq_kick(b.q);
		if (!inflight)
			break;
		if (!vq_wait(b.q, deadline_ms(cfg.timeout_ms))) {
			errors += inflight;
			printf("WARN %s: %lu requests timed out\n", name, inflight);
			break;
		}
		struct blk_slot *s;
		u32 len;
		while ((s = vq_get(b.q, &len)) != NULL) {
			if (s->status == VIRTIO_BLK_S_OK) {
				ops++;
				bytes += s->bytes;
			} else {
				errors++;
			}
			s->bytes = 0;
			inflight--;
		}
	}
	u64 us = tsc_to_us(rdtsc() - t0);
	printf("BENCH-END %s ops=%lu bytes=%lu errors=%lu guest_us=%lu notifications=%lu irqs=%u\n",
	       name, ops, bytes, errors, us, b.q->notifications - notif0,
	       (b.q->vector ? irq_counts[b.q->vector] : 0) - irqs0);
	if (errors)
		test_result("bench", false, "%s: %lu requests failed", name, errors);
}

/* ---- tests=reboot: data written before a reset is there after it ---------------------- */
#define MARKER_MAGIC "STRATO-REBOOT-MARKER"

struct marker {
	char magic[24];
	u32 boot; /* the boot that wrote it */
	u32 seed;
};

/*
 * The sector in the middle of the first disk tells the boots apart. No marker: the first
 * boot writes one (marker + pattern, then FLUSH), reads it back and the run ends with its
 * usual reset. A marker from boot 1: the second boot checks every byte of it and, passing,
 * powers off at the end so the VMM stops instead of booting a third time.
 */
void reboot_tests(void)
{
	if (!test_named("reboot"))
		return;
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_BLOCK, 0);
	if (!vd) {
		test_skip("reboot", "no virtio-blk device");
		return;
	}
	struct blk b;
	char err[128];
	u8 *buf = heap_alloc(4096, 4096);
	if (!buf || !blk_open(&b, vd, err, sizeof(err))) {
		test_result("reboot", false, "dev=%s %s", pci_name(vd->pci), buf ? err : "no memory");
		return;
	}
	const char *dev = b.name;
	u64 sector = (b.capacity / 2) & ~(u64)(b.spu - 1);
	struct marker *m = (struct marker *)buf;
	u32 st = blk_rw(&b, VIRTIO_BLK_T_IN, sector, buf, b.unit, 1, false);
	if (st != VIRTIO_BLK_S_OK) {
		test_result("reboot", false, "dev=%s read sector=%lu status=%s", dev, sector,
			    status_name(st));
		return;
	}
	if (!memcmp(m->magic, MARKER_MAGIC, sizeof(MARKER_MAGIC))) {
		u32 seed = m->seed, boot = m->boot;
		u64 bad = 0;
		/* The rest of the unit after the marker: the pattern of its seed. */
		bool same = check_pattern(buf + 512, seed, sector + 1, b.spu - 1, &bad);
		u8 first[512];
		fill_pattern(first, seed, sector, 1);
		same = same && !memcmp(buf + sizeof(*m), first + sizeof(*m), 512 - sizeof(*m));
		bool ok = boot == 1 && same;
		test_result("reboot", ok, "dev=%s boot=2 found=boot%u seed=0x%x sector=%lu data=%s", dev,
			    boot, seed, sector, same ? "ok" : "changed");
		power_off_at_end = ok;
		return;
	}
	u32 seed = (u32)rdtsc() | 1;
	fill_pattern(buf, seed, sector, b.spu);
	memset(m, 0, sizeof(*m));
	memcpy(m->magic, MARKER_MAGIC, sizeof(MARKER_MAGIC));
	m->boot = 1;
	m->seed = seed;
	u8 *copy = heap_alloc(4096, 4096);
	st = blk_rw(&b, VIRTIO_BLK_T_OUT, sector, buf, b.unit, 1, false);
	u32 fl = st == VIRTIO_BLK_S_OK && virtio_has(vd, VIRTIO_BLK_F_FLUSH)
			 ? blk_rw(&b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 1, false)
			 : st;
	u32 rd = copy ? blk_rw(&b, VIRTIO_BLK_T_IN, sector, copy, b.unit, 1, false) : STATUS_NOSPACE;
	bool ok = st == VIRTIO_BLK_S_OK && fl == VIRTIO_BLK_S_OK && rd == VIRTIO_BLK_S_OK &&
		  !memcmp(copy, buf, b.unit);
	test_result("reboot", ok, "dev=%s boot=1 wrote seed=0x%x sector=%lu write=%s flush=%s", dev,
		    seed, sector, status_name(st), status_name(fl));
}
