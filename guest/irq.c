/* MSI-X delivery: each queue's vector counted what its completions raised. */
#include "guest.h"

bool rng_msix_mask_test(char *detail, usize n);

void irq_tests(void)
{
	if (!test_selected("irq"))
		return;
	if (!cfg.irq_msix) {
		if (test_explicit("irq"))
			test_skip("irq", "irq=poll: no interrupts configured");
		return;
	}
	char detail[320];
	int len = 0, vectors = 0;
	bool ok = true;
	detail[0] = 0;
	bool assigned[256] = {false};
	for (int i = 0; i < virtio_count; i++) {
		struct virtio_dev *d = &virtio_devs[i];
		if (!d->msix)
			continue;
		for (int v = 0; v < d->vec_count; v++)
			assigned[d->vec_base + v] = true;
		for (int qi = 0; qi < d->nvq; qi++) {
			struct virtq *q = &d->vq[qi];
			if (!q->vector)
				continue;
			u32 count = irq_counts[q->vector];
			vectors++;
			/* A queue that completed work in interrupt mode must have raised its vector. */
			if (q->completions && !count)
				ok = false;
			len += snprintf(detail + len, sizeof(detail) - (usize)MIN(len, (int)sizeof(detail)),
					"%s%s.q%d=0x%x:%u/%lu", len ? "," : "", virtio_type_name(d->type), qi,
					q->vector, count, q->completions);
		}
	}
	/* Nothing may arrive on a vector no device was given. */
	u32 stray = 0;
	for (int v = VEC_IRQ_BASE; v <= VEC_IRQ_LAST; v++)
		if (!assigned[v] && !vector_given[v])
			stray += irq_counts[v];
	char mask[128];
	bool mask_ok = rng_msix_mask_test(mask, sizeof(mask));
	if (!vectors) {
		/* By default this check needs a device with MSI-X, like the others need theirs. */
		if (test_explicit("irq"))
			test_result("irq", false, "no queue got an MSI-X vector");
		return;
	}
	test_result("irq", ok && stray == 0 && mask_ok, "vectors=%d stray=%u timer=%u %s counts=%s",
		    vectors, stray, irq_counts[VEC_TIMER], mask, detail);
}
