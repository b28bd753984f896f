/* virtio-rng: entropy arrives and differs between reads; also the MSI-X mask test. */
#include "guest.h"

static struct virtio_dev *rng_dev;
static u8 rng_buf[2][64] __attribute__((aligned(64)));

/* One request for `len` bytes; returns the length the device wrote, or -1. */
static i64 rng_read(struct virtq *q, u8 *buf, u32 len, bool wait_for_it)
{
	struct vbuf in = {buf, len};
	if (!vq_add(q, NULL, 0, &in, 1, buf, false))
		return -1;
	vq_kick(q);
	if (!wait_for_it)
		return 0;
	u32 got;
	void *tok = vq_wait_get(q, &got, deadline_ms(cfg.timeout_ms));
	return tok == buf ? (i64)got : -1;
}

static bool rng_open(char *err, usize errlen)
{
	if (rng_dev)
		return true;
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_RNG, 0);
	if (!vd) {
		snprintf(err, errlen, "no virtio-rng device");
		return false;
	}
	if (!virtio_setup(vd, 0, 1, 64)) {
		snprintf(err, errlen, "dev=%s setup: %s", pci_name(vd->pci), vd->err);
		return false;
	}
	rng_dev = vd;
	return true;
}

void rng_tests(void)
{
	if (!test_selected("rng"))
		return;
	if (!virtio_find(VIRTIO_ID_RNG, 0)) {
		if (test_explicit("rng"))
			test_skip("rng", "no virtio-rng device");
		return;
	}
	char err[128];
	if (!rng_open(err, sizeof(err))) {
		test_result("rng", false, "%s", err);
		return;
	}
	struct virtq *q = &rng_dev->vq[0];
	memset(rng_buf, 0, sizeof(rng_buf));
	i64 a = rng_read(q, rng_buf[0], 64, true);
	i64 b = rng_read(q, rng_buf[1], 64, true);
	bool arrived = a > 0 && b > 0 && a <= 64 && b <= 64;
	bool differ = arrived && memcmp(rng_buf[0], rng_buf[1], (usize)MIN(a, b)) != 0;
	test_result("rng", arrived && differ,
		    "dev=%s bytes=%ld+%ld differ=%d sample=%02x%02x%02x%02x%02x%02x%02x%02x vector=0x%x",
		    pci_name(rng_dev->pci), a, b, differ, rng_buf[0][0], rng_buf[0][1], rng_buf[0][2],
		    rng_buf[0][3], rng_buf[0][4], rng_buf[0][5], rng_buf[0][6], rng_buf[0][7],
		    q->vector);
}

/*
 * MSI-X per-vector masking (PCI spec): while an entry is masked the device
 * sets its pending bit instead of sending; unmasking delivers the message.
 * Returns false with a reason when the device does not behave so.
 */
bool rng_msix_mask_test(char *detail, usize n)
{
	char err[128];
	if (!rng_open(err, sizeof(err))) {
		snprintf(detail, n, "mask=skipped(%s)", err);
		return true;
	}
	struct virtq *q = &rng_dev->vq[0];
	if (!q->vector) {
		snprintf(detail, n, "mask=skipped(rng polled)");
		return true;
	}
	u16 entry = q->msix_entry;
	u32 before = irq_counts[q->vector];
	msix_mask(rng_dev, entry, true);
	if (rng_read(q, rng_buf[0], 16, false) < 0) {
		msix_mask(rng_dev, entry, false);
		snprintf(detail, n, "mask=FAIL(cannot queue a request)");
		return false;
	}
	/* Poll for completion: no interrupt may arrive while masked. */
	u64 end = deadline_ms(cfg.timeout_ms);
	while (!vq_has_used(q) && !expired(end))
		cpu_relax();
	bool completed = vq_has_used(q);
	/* The device sets the pending bit just after it publishes the used entry: on a busy
	 * host that can take a while, so wait for the bit (bounded) rather than a fixed time. */
	end = deadline_ms(cfg.timeout_ms);
	while (completed && !msix_pending(rng_dev, entry) && !expired(end))
		cpu_relax();
	delay_us(2000); /* time for a wrongly sent message to land */
	u32 masked_count = irq_counts[q->vector] - before;
	bool pending = msix_pending(rng_dev, entry);
	msix_mask(rng_dev, entry, false);
	/* Unmasked: the pending message is delivered. */
	end = deadline_ms(cfg.timeout_ms);
	while (irq_counts[q->vector] == before && !expired(end)) {
		u64 seen = irq_seq;
		if (irq_counts[q->vector] != before)
			break;
		wait_for_interrupt(seen);
	}
	u32 delivered = irq_counts[q->vector] - before;
	bool pending_after = msix_pending(rng_dev, entry);
	vq_get(q, NULL);
	bool ok = completed && masked_count == 0 && pending && delivered == 1 && !pending_after;
	snprintf(detail, n, "mask=%s(completed=%d while-masked=%u pba=%d delivered=%u pba-after=%d)",
		 ok ? "ok" : "FAIL", completed, masked_count, pending, delivered, pending_after);
	return ok;
}
