/* virtio-net: transmit, checksum offload, receive, and the network benchmarks. */
#include "guest.h"

#define VIRTIO_NET_F_CSUM (1UL << 0)
#define VIRTIO_NET_F_MAC (1UL << 5)
#define VIRTIO_NET_F_STATUS (1UL << 16)
#define VIRTIO_NET_HDR_F_NEEDS_CSUM 1
#define VIRTIO_NET_S_LINK_UP 1

#define ETHERTYPE_TEST 0x88b5 /* IEEE "local experimental" */
#define BUF_SIZE 2048
#define NET_HDR_LEN 12        /* struct virtio_net_hdr with num_buffers (VERSION_1) */
#define MAX_FRAME 1514
#define PATTERN_OFFSET 40     /* test frames carry byte k == k & 0xff from here on */

struct virtio_net_hdr {
	u8 flags;
	u8 gso_type;
	u16 hdr_len;
	u16 gso_size;
	u16 csum_start;
	u16 csum_offset;
	u16 num_buffers;
} __attribute__((packed));

struct net {
	struct virtio_dev *vd;
	struct virtq *rx, *tx;
	u8 mac[6];
	char macstr[18];
	u8 *rxbufs;
	u8 *txbufs;
	u16 nrx, ntx;
	u16 *tx_free; /* stack of free transmit buffers */
	u16 ntx_free;
};

static struct net the_net;
static bool net_ready;

static void post_rx(struct net *n, u16 i)
{
	struct vbuf in = {n->rxbufs + (u64)i * BUF_SIZE, BUF_SIZE};
	vq_add(n->rx, NULL, 0, &in, 1, n->rxbufs + (u64)i * BUF_SIZE, false);
}

static struct net *net_open(char *err, usize errlen)
{
	struct net *n = &the_net;
	if (net_ready)
		return n;
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_NET, 0);
	if (!vd) {
		snprintf(err, errlen, "no virtio-net device");
		return NULL;
	}
	memset(n, 0, sizeof(*n));
	n->vd = vd;
	if (!virtio_setup(vd, VIRTIO_NET_F_CSUM | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS, 2, 256)) {
		snprintf(err, errlen, "dev=%s setup: %s", pci_name(vd->pci), vd->err);
		return NULL;
	}
	n->rx = &vd->vq[0];
	n->tx = &vd->vq[1];
	if (virtio_has(vd, VIRTIO_NET_F_MAC)) {
		for (int i = 0; i < 6; i++)
			n->mac[i] = virtio_cfg_read8(vd, (u32)i);
	} else {
		static const u8 fallback[6] = {0x52, 0x54, 0x00, 0x5a, 0x5a, 0x01};
		memcpy(n->mac, fallback, 6);
	}
	snprintf(n->macstr, sizeof(n->macstr), "%02x:%02x:%02x:%02x:%02x:%02x", n->mac[0],
		 n->mac[1], n->mac[2], n->mac[3], n->mac[4], n->mac[5]);
	n->nrx = n->rx->size;
	n->ntx = n->tx->size;
	n->rxbufs = heap_alloc((u64)n->nrx * BUF_SIZE, 4096);
	n->txbufs = heap_alloc((u64)n->ntx * BUF_SIZE, 4096);
	n->tx_free = heap_alloc(2UL * n->ntx, 8);
	if (!n->rxbufs || !n->txbufs || !n->tx_free) {
		snprintf(err, errlen, "out of memory");
		return NULL;
	}
	for (u16 i = 0; i < n->ntx; i++)
		n->tx_free[n->ntx_free++] = i;
	for (u16 i = 0; i < n->nrx; i++)
		post_rx(n, i);
	vq_kick(n->rx);
	net_ready = true;
	return n;
}

static void tx_reclaim(struct net *n)
{
	u8 *done;
	while ((done = vq_get(n->tx, NULL)) != NULL)
		n->tx_free[n->ntx_free++] = (u16)((done - n->txbufs) / BUF_SIZE);
}

/* A free transmit buffer, reclaiming completed ones; NULL if all are in flight. */
static u8 *tx_buffer(struct net *n)
{
	tx_reclaim(n);
	if (!n->ntx_free)
		return NULL;
	return n->txbufs + (u64)n->tx_free[--n->ntx_free] * BUF_SIZE;
}

static void tx_unget(struct net *n, u8 *buf)
{
	n->tx_free[n->ntx_free++] = (u16)((buf - n->txbufs) / BUF_SIZE);
}

static bool tx_idle(struct net *n)
{
	tx_reclaim(n);
	return n->ntx_free == n->ntx;
}

static bool wait_tx_idle(struct net *n, u64 deadline)
{
	while (!tx_idle(n)) {
		if (!vq_wait(n->tx, deadline))
			return tx_idle(n);
	}
	return true;
}

/* Ethernet header (broadcast destination) + "STRATO-NET-<tag> seq=<n> " + pattern. */
static u32 build_test_frame(struct net *n, u8 *frame, u32 len, const char *tag, u64 seq)
{
	len = MAX(len, 60U);
	len = MIN(len, (u32)MAX_FRAME);
	memset(frame, 0xff, 6);
	memcpy(frame + 6, n->mac, 6);
	frame[12] = ETHERTYPE_TEST >> 8;
	frame[13] = ETHERTYPE_TEST & 0xff;
	for (u32 k = 14; k < len; k++)
		frame[k] = (u8)k;
	char text[PATTERN_OFFSET - 14 + 1];
	int t = snprintf(text, sizeof(text), "STRATO-NET-%s seq=%lu ", tag, seq);
	memcpy(frame + 14, text, (usize)MIN(t, (int)sizeof(text) - 1));
	return len;
}

static bool send_frame(struct net *n, u8 *buf, u32 frame_len)
{
	struct vbuf out = {buf, NET_HDR_LEN + frame_len};
	return vq_add(n->tx, &out, 1, NULL, 0, buf, false);
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}

static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	for (u32 i = 0; i + 1 < len; i += 2)
		sum += (u32)(p[i] << 8 | p[i + 1]);
	if (len & 1)
		sum += (u32)(p[len - 1] << 8);
	return sum;
}

/* An IPv4/UDP frame; the UDP checksum is left to the device when `offload`. */
static u32 build_udp_frame(struct net *n, u8 *frame, struct virtio_net_hdr *h, bool offload)
{
	static const char payload[] = "STRATO-NET-CSUM checksum offload test frame";
	u32 plen = sizeof(payload) - 1;
	u32 udp_len = 8 + plen, ip_len = 20 + udp_len;
	memset(frame, 0xff, 6);
	memcpy(frame + 6, n->mac, 6);
	frame[12] = 0x08;
	frame[13] = 0x00;
	u8 *ip = frame + 14;
	static const u8 src[4] = {192, 0, 2, 1}, dst[4] = {192, 0, 2, 2};
	memset(ip, 0, 20);
	ip[0] = 0x45;
	ip[2] = (u8)(ip_len >> 8);
	ip[3] = (u8)ip_len;
	ip[8] = 64;
	ip[9] = 17;
	memcpy(ip + 12, src, 4);
	memcpy(ip + 16, dst, 4);
	u16 ipsum = (u16)~csum_fold(csum_add(0, ip, 20));
	ip[10] = (u8)(ipsum >> 8);
	ip[11] = (u8)ipsum;
	u8 *udp = ip + 20;
	udp[0] = 40000 >> 8;
	udp[1] = 40000 & 0xff;
	udp[2] = 40001 >> 8;
	udp[3] = 40001 & 0xff;
	udp[4] = (u8)(udp_len >> 8);
	udp[5] = (u8)udp_len;
	udp[6] = udp[7] = 0;
	memcpy(udp + 8, payload, plen);
	/* Pseudo-header: addresses, protocol, UDP length. */
	u32 pseudo = csum_add(0, ip + 12, 8) + 17 + udp_len;
	memset(h, 0, sizeof(*h));
	u16 check;
	if (offload) {
		/* The device sums from csum_start and stores at csum_start + csum_offset;
		 * the field holds the folded pseudo-header sum meanwhile. */
		check = csum_fold(pseudo);
		h->flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
		h->csum_start = 14 + 20;
		h->csum_offset = 6;
	} else {
		check = (u16)~csum_fold(csum_add(pseudo, udp, udp_len));
		if (check == 0)
			check = 0xffff;
	}
	udp[6] = (u8)(check >> 8);
	udp[7] = (u8)check;
	return 14 + ip_len;
}

void net_tests(void)
{
	bool want_tx = test_selected("net-tx"), want_csum = test_selected("net-csum"),
	     want_rx = test_selected("net-rx");
	struct virtio_dev *vd = virtio_find(VIRTIO_ID_NET, 0);
	if (!vd) {
		if (test_explicit("net"))
			test_result("net", false, "no virtio-net device");
		return;
	}
	if (!want_tx && !want_csum && !want_rx)
		return;
	char err[128];
	struct net *n = net_open(err, sizeof(err));
	if (!n) {
		test_result("net", false, "%s", err);
		return;
	}
	const char *dev = pci_name(vd->pci);
	u16 status = virtio_has(vd, VIRTIO_NET_F_STATUS) ? virtio_cfg_read16(vd, 6) : 1;
	printf("INFO net dev=%s mac=%s link=%s features=0x%lx msix=%d rxq=%u txq=%u\n", dev,
	       n->macstr, status & VIRTIO_NET_S_LINK_UP ? "up" : "down", vd->features, vd->msix,
	       n->rx->size, n->tx->size);

	if (want_tx) {
		static const u32 sizes[] = {60, 128, 1514, 64, 300, 1000, 61, 1514};
		u32 sent = 0;
		u64 bytes = 0;
		for (u32 i = 0; i < ARRAY_SIZE(sizes); i++) {
			u8 *buf = tx_buffer(n);
			if (!buf)
				break;
			memset(buf, 0, NET_HDR_LEN);
			u32 len = build_test_frame(n, buf + NET_HDR_LEN, sizes[i], "TX", i);
			if (!send_frame(n, buf, len))
				break;
			sent++;
			bytes += len;
		}
		vq_kick(n->tx);
		bool done = wait_tx_idle(n, deadline_ms(cfg.timeout_ms));
		test_result("net-tx", done && sent == ARRAY_SIZE(sizes),
			    "dev=%s frames=%u bytes=%lu mac=%s completed=%d", dev, sent, bytes,
			    n->macstr, done);
	}

	if (want_csum) {
		bool offload = virtio_has(vd, VIRTIO_NET_F_CSUM);
		u8 *buf = tx_buffer(n);
		u32 len = buf ? build_udp_frame(n, buf + NET_HDR_LEN, (struct virtio_net_hdr *)buf,
						offload)
			      : 0;
		bool ok = buf && send_frame(n, buf, len);
		vq_kick(n->tx);
		ok = ok && wait_tx_idle(n, deadline_ms(cfg.timeout_ms));
		test_result("net-csum", ok, "dev=%s offload=%d bytes=%u", dev, offload, len);
	}

	if (want_rx) {
		/* The host sends frames of ETHERTYPE_TEST with "STRATO-NET-RX seq=<n> "
		 * after it sees this line; everything else on the wire is recycled. */
		printf("READY net-rx mac=%s frames=%lu\n", n->macstr, cfg.net_rx_frames);
		u64 deadline = deadline_ms(cfg.host_timeout_ms);
		u64 got = 0, other = 0, bad = 0, bytes = 0;
		while (got < cfg.net_rx_frames && vq_wait(n->rx, deadline)) {
			u8 *buf;
			u32 len;
			while ((buf = vq_get(n->rx, &len)) != NULL) {
				u8 *f = buf + NET_HDR_LEN;
				u32 flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
				if (flen >= 60 && f[12] == (ETHERTYPE_TEST >> 8) &&
				    f[13] == (ETHERTYPE_TEST & 0xff) &&
				    !memcmp(f + 14, "STRATO-NET-RX", 13)) {
					bool pattern_ok = flen <= MAX_FRAME + 4;
					for (u32 k = PATTERN_OFFSET; k < flen && pattern_ok; k++)
						pattern_ok = f[k] == (u8)k;
					if (pattern_ok) {
						got++;
						bytes += flen;
					} else {
						bad++;
					}
				} else {
					other++;
				}
				post_rx(n, (u16)((buf - n->rxbufs) / BUF_SIZE));
			}
			vq_kick(n->rx);
		}
		test_result("net-rx", got >= cfg.net_rx_frames && bad == 0,
			    "dev=%s frames=%lu bytes=%lu other=%lu corrupt=%lu", dev, got, bytes, other,
			    bad);
	}
	if (n->rx->bad_used || n->tx->bad_used)
		test_result("net", false, "dev=%s the device returned bad used elements (rx=%lu tx=%lu)",
			    dev, n->rx->bad_used, n->tx->bad_used);
}

/* ---- benchmarks: net-tx (size=, qd=), net-rx (host-driven) ------------------------ */
void net_bench(struct bench_cfg *bc)
{
	char err[128];
	struct net *n = net_open(err, sizeof(err));
	if (!n) {
		test_result("bench", false, "%s: %s", bc->name, err);
		return;
	}
	u64 seconds = bc->ops && !bc->seconds ? 0 : bc->seconds;
	if (!strcmp(bc->name, "net-tx")) {
		u32 size = (u32)MIN(MAX(bc->size, 60UL), (u64)MAX_FRAME);
		u64 qd = bc->qd > 1 ? MIN(bc->qd, (u64)n->ntx) : n->ntx;
		u64 ops = 0, bytes = 0, inflight_limit = qd, notif0 = n->tx->notifications;
		u32 irqs0 = n->tx->vector ? irq_counts[n->tx->vector] : 0;
		printf("BENCH-START net-tx size=%u qd=%lu irq=%s\n", size, qd,
		       n->tx->vector ? "msix" : "poll");
		u64 t0 = rdtsc(), end = t0 + ms_to_tsc(seconds * 1000);
		u64 seq = 0;
		for (;;) {
			if ((bc->ops && ops >= bc->ops) || (seconds && expired(end)))
				break;
			u64 batch = 0;
			u8 *buf;
			while (batch < inflight_limit && (!bc->ops || ops + batch < bc->ops) &&
			       (buf = tx_buffer(n)) != NULL) {
				memset(buf, 0, NET_HDR_LEN);
				u32 len = build_test_frame(n, buf + NET_HDR_LEN, size, "BENCH", seq++);
				if (!send_frame(n, buf, len)) {
					tx_unget(n, buf);
					break;
				}
				batch++;
				bytes += len;
			}
			ops += batch;
			vq_kick(n->tx);
			if (!batch && !vq_wait(n->tx, deadline_ms(cfg.timeout_ms))) {
				printf("WARN net-tx: transmit queue stalled\n");
				break;
			}
		}
		bool drained = wait_tx_idle(n, deadline_ms(cfg.timeout_ms));
		u64 us = tsc_to_us(rdtsc() - t0);
		printf("BENCH-END net-tx ops=%lu bytes=%lu guest_us=%lu notifications=%lu irqs=%u\n", ops,
		       bytes, us, n->tx->notifications - notif0,
		       (n->tx->vector ? irq_counts[n->tx->vector] : 0) - irqs0);
		if (!drained)
			test_result("bench", false, "net-tx: frames still in flight at the end");
		return;
	}
	if (!strcmp(bc->name, "net-rx")) {
		/* The host floods frames after READY and ends with a "STRATO-NET-END" frame. */
		printf("READY net-rx-bench mac=%s\n", n->macstr);
		u64 ops = 0, bytes = 0, t0 = 0, end = 0;
		u32 irqs0 = n->rx->vector ? irq_counts[n->rx->vector] : 0;
		bool started = false, finished = false;
		u64 idle_deadline = deadline_ms(cfg.host_timeout_ms);
		while (!finished) {
			if (!vq_wait(n->rx, started && seconds ? MIN(end, idle_deadline) : idle_deadline))
				break;
			u8 *buf;
			u32 len;
			while ((buf = vq_get(n->rx, &len)) != NULL) {
				u8 *f = buf + NET_HDR_LEN;
				u32 flen = len > NET_HDR_LEN ? len - NET_HDR_LEN : 0;
				if (flen >= 30 && f[12] == (ETHERTYPE_TEST >> 8) &&
				    f[13] == (ETHERTYPE_TEST & 0xff)) {
					if (!memcmp(f + 14, "STRATO-NET-END", 14)) {
						finished = true;
					} else {
						if (!started) {
							printf("BENCH-START net-rx irq=%s\n",
							       n->rx->vector ? "msix" : "poll");
							started = true;
							t0 = rdtsc();
							end = t0 + ms_to_tsc(seconds * 1000);
						}
						ops++;
						bytes += flen;
					}
				}
				post_rx(n, (u16)((buf - n->rxbufs) / BUF_SIZE));
			}
			vq_kick(n->rx);
			idle_deadline = deadline_ms(cfg.host_timeout_ms);
			if (started && ((seconds && expired(end)) || (bc->ops && ops >= bc->ops)))
				finished = true;
		}
		if (!started)
			printf("BENCH-START net-rx irq=%s\n", n->rx->vector ? "msix" : "poll");
		u64 us = started ? tsc_to_us(rdtsc() - t0) : 0;
		printf("BENCH-END net-rx ops=%lu bytes=%lu guest_us=%lu irqs=%u\n", ops, bytes, us,
		       (n->rx->vector ? irq_counts[n->rx->vector] : 0) - irqs0);
		if (!ops)
			test_result("bench", false, "net-rx: no frame received");
		return;
	}
	test_result("bench", false, "unknown benchmark %s", bc->name);
}
