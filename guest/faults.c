/*
 * Workloads for the host's fault tests (tests/faults):
 *
 *   bench=blk-flushstorm[,qd=N][,bs=B][,seconds=S|ops=N][,region=R]
 *       Batches of qd writes of bs bytes at increasing sectors (never the same sector twice),
 *       each batch followed by a FLUSH. After every flush that completed OK (and every write
 *       of its batch OK) the guest prints
 *           FLUSHED seq=<n> sector=<first> sectors=<count>
 *       so a host that kills the VMM can check that every reported batch is on the disk: the
 *       data is blk_pattern(seed, sector) with the seed from BENCH-START. A failed batch prints
 *       FLUSH-FAILED seq=<n> status=<..> and the storm goes on with the next sectors.
 *   bench=serial-flood[,seconds=S|ops=N][,size=L]
 *       Lines of L bytes (default 100) on COM1 as fast as the UART takes them.
 *
 * Both end with BENCH-END <name> ops=<batches|lines> bytes=<n>.
 */
#include "guest.h"

#define VIRTIO_BLK_F_FLUSH (1UL << 9)
#define VIRTIO_BLK_F_BLK_SIZE (1UL << 6)
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define STATUS_UNTOUCHED 0xee
#define STATUS_TIMEOUT 0x100

struct storm_req {
	u32 type, reserved;
	u64 sector;
	u8 status;
	u8 pad[15];
};

static void storm_fill(u8 *buf, u32 seed, u64 sector, u64 nsectors)
{
	u32 *w = (u32 *)buf;
	for (u64 s = 0; s < nsectors; s++)
		for (u32 i = 0; i < 128; i++)
			w[s * 128 + i] = pattern_word(seed, sector + s, i);
}

/* Wait until `n` requests came back; returns the first non-OK status (or OK). */
static u32 storm_collect(struct virtq *q, u64 n)
{
	u32 worst = VIRTIO_BLK_S_OK;
	while (n) {
		if (!vq_wait(q, deadline_ms(cfg.timeout_ms)))
			return STATUS_TIMEOUT;
		u32 len;
		struct storm_req *r;
		while ((r = vq_get(q, &len)) != NULL) {
			if (r->status != VIRTIO_BLK_S_OK && worst == VIRTIO_BLK_S_OK)
				worst = r->status;
			n--;
		}
	}
	return worst;
}

static void flushstorm(struct bench_cfg *bc)
{
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_BLOCK, 0);
	if (!vd || !virtio_setup(vd, VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_BLK_SIZE, 1, 256)) {
		test_result("bench", false, "blk-flushstorm: no usable virtio-blk device");
		return;
	}
	if (!virtio_has(vd, VIRTIO_BLK_F_FLUSH)) {
		test_result("bench", false, "blk-flushstorm: the device does not offer FLUSH");
		return;
	}
	struct virtq *q = &vd->vq[0];
	u64 capacity = virtio_cfg_read64(vd, 0);
	u64 bs = ALIGN_UP(MAX(bc->bs, 512UL), 512UL);
	u64 qd = MAX(1UL, MIN(bc->qd, MIN(64UL, (u64)q->size / 3)));
	u64 region = bc->region ? MIN(bc->region / 512, capacity) : capacity;
	struct storm_req *reqs = heap_alloc(sizeof(struct storm_req) * (qd + 1), 64);
	u8 *data = heap_alloc(qd * bs, 4096);
	if (!reqs || !data || bs > 1 * MiB) {
		test_result("bench", false, "blk-flushstorm: out of memory for qd=%lu bs=%lu", qd, bs);
		return;
	}
	u32 seed = (u32)rdtsc() | 1;
	u64 spb = bs / 512, seconds = bc->ops && !bc->seconds ? 0 : bc->seconds;
	u64 batches = 0, bytes = 0, failed = 0, sector = 0;
	printf("BENCH-START blk-flushstorm qd=%lu bs=%lu seed=0x%x\n", qd, bs, seed);
	u64 t0 = rdtsc(), end = t0 + ms_to_tsc(seconds * 1000);
	for (u64 seq = 0;; seq++) {
		if ((bc->ops && seq >= bc->ops) || (seconds && expired(end)))
			break;
		u64 n = MIN(qd, (region - sector) / spb);
		if (!n)
			break; /* the region is used up: every sector is written once */
		for (u64 i = 0; i < n; i++) {
			struct storm_req *r = &reqs[i];
			u8 *buf = data + i * bs;
			r->type = VIRTIO_BLK_T_OUT;
			r->reserved = 0;
			r->sector = sector + i * spb;
			r->status = STATUS_UNTOUCHED;
			storm_fill(buf, seed, r->sector, spb);
			struct vbuf out[2] = {{r, 16}, {buf, (u32)bs}};
			struct vbuf in[1] = {{&r->status, 1}};
			if (!vq_add(q, out, 2, in, 1, r, false)) {
				n = i;
				break;
			}
		}
		vq_kick(q);
		u32 st = storm_collect(q, n);
		if (st == VIRTIO_BLK_S_OK) {
			struct storm_req *f = &reqs[qd];
			f->type = VIRTIO_BLK_T_FLUSH;
			f->reserved = 0;
			f->sector = 0;
			f->status = STATUS_UNTOUCHED;
			struct vbuf out[1] = {{f, 16}};
			struct vbuf in[1] = {{&f->status, 1}};
			if (!vq_add(q, out, 1, in, 1, f, false)) {
				st = STATUS_TIMEOUT;
			} else {
				vq_kick(q);
				st = storm_collect(q, 1);
			}
		}
		if (st == VIRTIO_BLK_S_OK) {
			printf("FLUSHED seq=%lu sector=%lu sectors=%lu\n", seq, sector, n * spb);
			batches++;
			bytes += n * bs;
		} else {
			printf("FLUSH-FAILED seq=%lu sector=%lu sectors=%lu status=0x%x\n", seq, sector,
			       n * spb, st);
			failed++;
			if (st == STATUS_TIMEOUT)
				break; /* requests may still be in flight: their buffers are not ours */
		}
		sector += n * spb;
	}
	u64 us = tsc_to_us(rdtsc() - t0);
	printf("BENCH-END blk-flushstorm ops=%lu bytes=%lu errors=%lu guest_us=%lu\n", batches,
	       bytes, failed, us);
	if (failed)
		test_result("bench", false, "blk-flushstorm: %lu batches failed", failed);
}

static void serial_flood(struct bench_cfg *bc)
{
	u64 size = MAX(MIN(bc->size != 1514 ? bc->size : 100UL, 200UL), 24UL);
	u64 seconds = bc->ops && !bc->seconds ? 0 : bc->seconds;
	char line[208];
	printf("BENCH-START serial-flood size=%lu\n", size);
	u64 lines = 0, bytes = 0, t0 = rdtsc(), end = t0 + ms_to_tsc(seconds * 1000);
	for (;;) {
		if ((bc->ops && lines >= bc->ops) || (seconds && expired(end)))
			break;
		int n = snprintf(line, sizeof(line), "FLOOD %lu ", lines);
		for (u64 i = (u64)n; i < size - 1; i++)
			line[i] = (char)('a' + (lines + i) % 26);
		line[size - 1] = '\n';
		serial_write(line, size);
		lines++;
		bytes += size;
	}
	u64 us = tsc_to_us(rdtsc() - t0);
	printf("BENCH-END serial-flood ops=%lu bytes=%lu guest_us=%lu\n", lines, bytes, us);
}

bool faults_bench(struct bench_cfg *b)
{
	if (!strcmp(b->name, "blk-flushstorm"))
		flushstorm(b);
	else if (!strcmp(b->name, "serial-flood"))
		serial_flood(b);
	else
		return false;
	return true;
}
