/* virtio-console, port 0 (no MULTIPORT): a line out, a line in. */
#include "guest.h"

#define NRX 8
#define RXLEN 256

static struct virtq *console_tx; /* set once the device is up: console_note() writes there */

/* A line on the virtio console (where a person running strato by hand looks), if it is up. */
void console_note(const char *line)
{
	if (!console_tx)
		return;
	struct vbuf out = {line, strlen(line)};
	if (vq_add(console_tx, &out, 1, NULL, 0, (void *)line, false)) {
		vq_kick(console_tx);
		vq_wait_get(console_tx, NULL, deadline_ms(cfg.timeout_ms));
	}
}

void console_tests(void)
{
	bool want_tx = test_selected("console-tx");
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_CONSOLE, 0);
	if (!vd) {
		if (test_explicit("console"))
			test_skip("console", "no virtio-console device");
		return;
	}
	bool want_rx = host_check_selected("console-rx", "a line typed on the virtio console");
	if (!want_tx && !want_rx)
		return;
	const char *dev = pci_name(vd->pci);
	if (!virtio_setup(vd, 0, 2, 64)) {
		test_result("console", false, "dev=%s setup: %s", dev, vd->err);
		return;
	}
	struct virtq *rx = &vd->vq[0], *tx = &vd->vq[1];
	console_tx = tx;
	u8 *rxbuf = heap_alloc(NRX * RXLEN, 4096);
	for (int i = 0; i < NRX && rxbuf; i++) {
		struct vbuf in = {rxbuf + i * RXLEN, RXLEN};
		vq_add(rx, NULL, 0, &in, 1, rxbuf + i * RXLEN, false);
	}
	vq_kick(rx);

	if (want_tx) {
		static const char line[] = "STRATO-CONSOLE-TX hello from strato-guest\n";
		struct vbuf out = {line, sizeof(line) - 1};
		bool ok = vq_add(tx, &out, 1, NULL, 0, (void *)line, false);
		vq_kick(tx);
		void *tok = ok ? vq_wait_get(tx, NULL, deadline_ms(cfg.timeout_ms)) : NULL;
		test_result("console-tx", tok == line, "dev=%s bytes=%u vector=0x%x", dev,
			    (u32)sizeof(line) - 1, tx->vector);
	}

	if (want_rx && rxbuf) {
		/* The host writes a line to the console after this; a person at the console
		 * (where strato's --console goes) sees the prompt there too. */
		printf("READY console-rx\n");
		console_note("strato-guest: console-rx: type a line and press Enter\n");
		char got[128];
		u32 n = 0;
		bool line_done = false;
		u64 deadline = deadline_ms(cfg.host_timeout_ms);
		while (!line_done && vq_wait(rx, deadline)) {
			u8 *buf;
			u32 len;
			while ((buf = vq_get(rx, &len)) != NULL) {
				for (u32 i = 0; i < len && i < RXLEN; i++) {
					char c = (char)buf[i];
					if (c == '\n' || c == '\r') {
						line_done = n > 0 || line_done;
						continue;
					}
					if (!line_done && n + 1 < sizeof(got))
						got[n++] = (c >= 0x20 && c < 0x7f && c != '"') ? c : '?';
				}
				struct vbuf in = {buf, RXLEN};
				vq_add(rx, NULL, 0, &in, 1, buf, false);
			}
			vq_kick(rx);
		}
		got[n] = 0;
		test_result("console-rx", line_done, "dev=%s got=\"%s\" bytes=%u vector=0x%x", dev, got,
			    n, rx->vector);
	}
}
